"""The JSON records of a cache, each with its reader and writer: Targets, ShardInfo, WorkerReport,
Manifest, BuildRecord (docs/cache-format.md, "Manifest"). A record that is not what it should be
is a CacheError of one line naming the file and the field."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from teacher_cache.errors import CacheError
from teacher_cache.format.codec import COMPRESSION, MAX_K, TargetKind, column_types
from teacher_cache.format.layout import BUILD_FILE, MANIFEST_FILE, WORKER_DIR, worker_report_name
from teacher_cache.storage import Location, confined
from teacher_cache.version import distill_version

# 64x the largest vocabularies in use (262k): a larger one is a damaged manifest, not a model.
MAX_VOCAB = 2**24

# The spelling of each kind on the command line: "topk:64", "sample:8".
TARGET_PREFIXES: dict[str, TargetKind] = {"topk": "top_k", "sample": "sample"}


@dataclass(frozen=True)
class Targets:
    """What the cache holds per position besides the logprob of the actual next token:
    `top_k`, the teacher's k most likely next tokens, or `sample`, k draws with replacement from
    the teacher at `temperature`, a pure function of (`seed`, sequence id, position). The
    defaults are those of a build (`--targets`)."""

    kind: TargetKind = "sample"
    k: int = 8
    temperature: float = 1.0  # sampling temperature (kind "sample" only)
    seed: int = 0  # kind "sample" only

    @classmethod
    def parse(cls, text: str, temperature: float = 1.0, seed: int = 0) -> Targets:
        """"sample:K" or "topk:K", as --targets spells them; CacheError (one line) otherwise."""
        prefix, _, k = text.partition(":")
        if prefix not in TARGET_PREFIXES or not k.isdigit():
            raise CacheError(f"--targets {text!r}: expected sample:K or topk:K with K a positive "
                             f"integer, e.g. sample:8 or topk:64")
        return cls(TARGET_PREFIXES[prefix], int(k), temperature, seed)

    @property
    def spec(self) -> str:
        prefix = next(p for p, kind in TARGET_PREFIXES.items() if kind == self.kind)
        return f"{prefix}:{self.k}"

    def validate(self, vocab_size: int | None = None) -> None:
        """CacheError (one line) for a K or temperature the cache cannot hold."""
        if self.k < 1:
            raise CacheError(f"--targets {self.spec}: K must be at least 1")
        if self.kind == "sample":
            if self.k > MAX_K:
                raise CacheError(f"--targets {self.spec}: K must be at most {MAX_K} (counts are "
                                 f"stored as uint8)")
            if not self.temperature > 0:
                raise CacheError(f"--sample-temperature must be positive, got {self.temperature}")
        elif vocab_size is not None and self.k > vocab_size:
            raise CacheError(f"--targets {self.spec}: K is more than the teacher's vocabulary of "
                             f"{vocab_size} tokens; choose K <= {vocab_size}")

    def manifest_entry(self) -> dict[str, Any]:
        if self.kind == "top_k":
            return {"kind": self.kind, "k": self.k}
        return {"kind": self.kind, "k": self.k, "temperature": self.temperature, "seed": self.seed}

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> Targets:
        return cls(**{name: entry[name] for name in ("kind", "k", "temperature", "seed")
                      if name in entry})


FORMAT_NAME = "distill.teacher-cache"
FORMAT_VERSION = 3
# 1: top-k only, before the manifest named its targets; 2: no row index (teacher_cache/index.py)
READABLE_VERSIONS = (1, 2, 3)


def _parse(text: str | bytes, source: str, repair: str) -> object:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{source}: not valid JSON ({e}); {repair}") from None


class _Fields:
    """The checks of a JSON record's fields: names, required ones, types (int where `types` names
    none). Precomputed, as a manifest checks up to ~10^5 shard entries."""

    def __init__(self, record: type, noun: str, types: dict[str, tuple[type, ...]],
                 repair: str = "the cache is damaged, rebuild it"):
        self.names = {f.name: None for f in fields(record)}.keys()  # ordered, for the message
        self.required = {f.name for f in fields(record)
                         if f.default is MISSING and f.default_factory is MISSING}
        self.noun, self.types, self.repair = noun, types, repair

    def check(self, raw: object, source: str) -> None:
        """CacheError (one line naming `source` and the field) unless `raw` is such a record."""
        if not isinstance(raw, dict) or not self.required <= raw.keys() <= self.names:
            optional = [name for name in self.names if name not in self.required]
            required = f"all but {' and '.join(optional)} required" if optional else "all required"
            found = (f"got {str(raw)[:120]}" if not isinstance(raw, dict) else
                     ", ".join([f"missing {name}" for name in self.names
                                if name in self.required and name not in raw]
                               + [f"unknown {name}" for name in raw if name not in self.names]))
            raise CacheError(f"{source}: a {self.noun} entry has the fields "
                             f"{', '.join(self.names)} ({required}); {found}; {self.repair}")
        for name, value in raw.items():
            expected = self.types.get(name, (int,))
            if type(value) not in expected:
                raise CacheError(f"{source}: {self.noun} field {name} = {value!r} is not of type "
                                 f"{expected[0].__name__}; {self.repair}")


@dataclass
class ShardInfo:
    index: int
    path: str  # relative to the cache root
    rows: int
    tokens: int
    sha256: str
    bytes: int
    first_seq_id: int
    build: str | None = None  # build_id() of the build that wrote it (BUILD_ID_METADATA)
    # Sampled from a backend's top-K' only (vLLM): mean teacher mass outside that top-K'.
    uncovered_mass: float | None = None

    def __post_init__(self) -> None:
        confined(self.path)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "shard marker") -> ShardInfo:
        return cls.from_dict(_parse(text, source, "delete it and rerun"), source)

    @classmethod
    def from_dict(cls, raw: object, source: str) -> ShardInfo:
        _SHARD_FIELDS.check(raw, source)
        try:
            return cls(**raw)
        except CacheError as e:
            raise CacheError(f"{source}: shard {raw['index']} path {e}") from None


_SHARD_FIELDS = _Fields(ShardInfo, "shard", {
    "path": (str,), "sha256": (str,), "build": (str, type(None)),
    "uncovered_mass": (float, type(None))})


@dataclass
class WorkerReport:
    worker_index: int
    num_workers: int
    sequences: int  # in the whole packed corpus, the same for every worker
    documents: int  # that begin inside the cached sequences
    skipped_files: list[str]
    dropped_tokens: int  # of the final partial sequence
    capped: bool  # packing stopped at max_tokens before the corpus ended
    tokens_computed: int
    compute_s: float
    dtype: str | None  # the dtype the teacher ran in, None if this run computed nothing

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> WorkerReport:
        raw = _parse(text, source, _WORKER_FIELDS.repair)
        _WORKER_FIELDS.check(raw, source)
        return cls(**raw)


_WORKER_FIELDS = _Fields(WorkerReport, "worker report", {
    "skipped_files": (list,), "capped": (bool,), "compute_s": (float, int),
    "dtype": (str, type(None))}, repair="delete it and rerun that worker")


def write_worker_report(location: Location, report: WorkerReport) -> None:
    location.write_bytes_atomic(report.to_json().encode(), WORKER_DIR,
                                worker_report_name(report.worker_index, report.num_workers))


def read_worker_report(location: Location, worker_index: int,
                       num_workers: int) -> WorkerReport | None:
    """The report a worker left, or None if it has not gone through the corpus yet."""
    name = worker_report_name(worker_index, num_workers)
    if not location.exists(WORKER_DIR, name):
        return None
    return _read_worker_report(location, name)


def read_worker_reports(location: Location) -> list[WorkerReport]:
    return [_read_worker_report(location, name)
            for name in location.list(WORKER_DIR) if name.endswith(".json")]


def _read_worker_report(location: Location, name: str) -> WorkerReport:
    return WorkerReport.from_json(location.read_bytes(WORKER_DIR, name),
                                  f"{location.uri.rstrip('/')}/{WORKER_DIR}/{name}")


@dataclass
class Manifest:
    seq_len: int
    top_k: int
    vocab_size: int
    teacher: dict[str, Any]  # name, path, weights_sha256, dtype, backend, dtype_reason (optional)
    tokenizer: dict[str, Any]  # sha256, eos_token_id, bos_token_id
    corpus: dict[str, Any]  # description, documents, skipped files, max_tokens
    rows_per_shard: int
    targets: dict[str, Any] | None = None  # Targets.manifest_entry(); None: top_k of top_k
    shards: list[ShardInfo] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)  # sequences, tokens, bytes
    score: dict[str, Any] | None = None  # reference identity and score statistics
    build: dict[str, Any] = field(default_factory=dict)  # backend, wall time, tokens/s, workers
    complete: bool = False
    index: dict[str, Any] | None = None  # the row index file (teacher_cache/index.py)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    compression: str = COMPRESSION
    columns: dict[str, str] | None = None  # None: those of the target kind
    distill_version: str | None = None  # of the distill that wrote it (absent in older caches)

    def __post_init__(self) -> None:
        if self.targets is None:  # version 1, or a writer that predates sampled targets
            self.targets = Targets("top_k", self.top_k).manifest_entry()
        if self.columns is None:
            self.columns = column_types(self.target_kind)

    @property
    def target_kind(self) -> TargetKind:
        return self.targets["kind"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = MANIFEST_FILE) -> Manifest:
        return cls.from_dict(_parse(text, source, "the cache is damaged, rebuild it"), source)

    @classmethod
    def from_dict(cls, raw: object, source: str) -> Manifest:
        if not isinstance(raw, dict):
            raise CacheError(f"{source}: a manifest is a JSON object, not {type(raw).__name__}; "
                             f"the cache is damaged, rebuild it")
        if raw.get("format") != FORMAT_NAME:
            raise CacheError(
                f"{source}: format {raw.get('format')!r} is not a {FORMAT_NAME} manifest")
        if raw.get("version") not in READABLE_VERSIONS:
            raise CacheError(
                f"{source}: cache format version {raw.get('version')!r} is not supported by this "
                f"reader (it knows version {FORMAT_VERSION}); upgrade distill or rebuild the cache")
        _check_manifest_fields(raw, source)
        raw["shards"] = [ShardInfo.from_dict(s, f"{source}: shards[{i}]")
                         for i, s in enumerate(raw.get("shards", []))]
        _check_shard_order(raw["shards"], source)
        return cls(**raw)

    def build_identity(self) -> dict[str, Any]:
        """What must match for a rerun to extend this cache rather than conflict with it."""
        return {
            "teacher.weights_sha256": self.teacher.get("weights_sha256"),
            "tokenizer.sha256": self.tokenizer.get("sha256"),
            "top_k": self.top_k,
            "targets": Targets.from_manifest(self.targets).spec,
            "sample_temperature": self.targets.get("temperature"),
            "seed": self.targets.get("seed"),
            "seq_len": self.seq_len,
            "rows_per_shard": self.rows_per_shard,
            "corpus": self.corpus.get("description"),
        }


def _check_manifest_fields(raw: dict[str, Any], source: str) -> None:
    """Names and basic types of a manifest's fields, so a damaged one fails here with one line and
    not deep inside a reader. Whether the shards hold what it says is checked as they are read."""
    known = {f.name: f for f in fields(Manifest)}
    required = [name for name, f in known.items()
                if f.default is MISSING and f.default_factory is MISSING]
    problems = [f"unknown field {name!r}" for name in raw if name not in known]
    problems += [f"missing field {name!r}" for name in required if name not in raw]
    if type(raw.get("vocab_size")) is int and raw["vocab_size"] > MAX_VOCAB:
        problems.append(f"vocab_size {raw['vocab_size']:,} is more than {MAX_VOCAB:,}")
    problems += [f"{name} = {raw[name]!r} is not a positive integer"
                 for name in ("seq_len", "top_k", "vocab_size", "rows_per_shard")
                 if name in raw and (type(raw[name]) is not int or raw[name] < 1)]
    if not isinstance(raw.get("shards", []), list):
        problems.append("shards is not a list")
    if problems:
        raise CacheError(f"{source}: {'; '.join(problems)}; the cache is damaged or from another "
                         f"tool, rebuild it")


def _check_shard_order(shards: list[ShardInfo], source: str) -> None:
    """Shards in increasing index order over disjoint, increasing seq_id ranges: a shard listed
    twice would train on its rows twice."""
    for i in range(1, len(shards)):
        before, shard = shards[i - 1], shards[i]
        if shard.index <= before.index or shard.first_seq_id < before.first_seq_id + before.rows:
            raise CacheError(f"{source}: shards[{i}] (shard {shard.index}, seq_ids from "
                             f"{shard.first_seq_id}) repeats or overlaps shards[{i - 1}] (shard "
                             f"{before.index}); the cache is damaged, rebuild it")


def read_manifest(location: Location) -> Manifest:
    if not location.exists(MANIFEST_FILE):
        raise CacheError(f"{location.uri}: no {MANIFEST_FILE} here; is this a teacher cache? "
                         f"Build one with `python -m teacher_cache build --out {location.uri}`")
    return Manifest.from_json(location.read_bytes(MANIFEST_FILE),
                              source=f"{location.uri.rstrip('/')}/{MANIFEST_FILE}")


def read_manifest_if_any(location: Location) -> Manifest | None:
    """The manifest a build or finalize would replace, if there is a readable one."""
    try:
        return read_manifest(location) if location.exists(MANIFEST_FILE) else None
    except CacheError:  # damaged: the caller writes a new one
        return None


def write_manifest(location: Location, manifest: Manifest) -> None:
    """The one write of `manifest.json`, atomic: readers see the old manifest or the new one."""
    manifest.distill_version = distill_version()
    location.write_bytes_atomic(manifest.to_json().encode(), MANIFEST_FILE)


@dataclass
class BuildRecord:
    """`build.json`: the identity a rerun must match, the manifest fields known up front, the
    reference that fills `score` (None: no reference) and the claiming worker's configuration
    (`--config CACHE/build.json` repeats it; None in a build.json of an earlier version)."""

    identity: dict[str, Any]
    manifest: Manifest
    reference: dict[str, Any] | None
    config: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


_BUILD_FIELDS = _Fields(BuildRecord, "build record", {
    "identity": (dict,), "manifest": (dict,), "reference": (dict, type(None)),
    "config": (dict, type(None))},
    repair=f"it is not the {BUILD_FILE} of a teacher cache build; delete it and rerun the build, "
           f"or pick another --out")


def read_build_record(location: Location) -> BuildRecord | None:
    """`build.json`, None if there is none; CacheError (one line) if it is not one a build wrote."""
    try:
        text = location.read_bytes(BUILD_FILE)
    except FileNotFoundError:
        return None
    source = f"{location.uri.rstrip('/')}/{BUILD_FILE}"
    raw = _parse(text, source, _BUILD_FIELDS.repair)
    _BUILD_FIELDS.check(raw, source)
    return BuildRecord(raw["identity"], Manifest.from_dict(raw["manifest"], f"{source}: manifest"),
                       raw["reference"], raw.get("config"))

