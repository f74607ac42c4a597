"""The teacher cache format: the one definition both the builder and every reader import.

Human-readable description: docs/cache-format.md. Summary:

    CACHE/manifest.json                   Manifest (below); `complete` once every shard is final
    CACHE/index-SHA.arrow                 seq_id, shard and score of every row (index.py)
    CACHE/build.json                      the build identity, written before the first shard
    CACHE/shards/shard-NNNNNN.arrow       Arrow IPC file (zstd), one row per packed sequence
    CACHE/shards/shard-NNNNNN.json        ShardInfo, written after the .arrow: marks the shard done
    CACHE/workers/worker-W-of-N.json      WorkerReport, once a worker went through the corpus
    CACHE/shards/shard-NNNNNN.SHA.arrow   the shard as `score` rewrote it (SHA: its sha256 prefix)
    CACHE/rescore/REFERENCE/shard-NNNNNN.json  ShardInfo of a rescored shard, while `score` runs
    CACHE/rescore/REFERENCE/started.json  the reference and the shard checksums it started from
    CACHE/packed/PLAN/part-PPPPP.arrow    the pack stage's tokens of corpus partition P (pack.py),
                                          deleted once the manifest is complete; .json: its marker

Shard `i` holds the sequences with ids `[i * rows_per_shard, (i + 1) * rows_per_shard)` of the
packed corpus, so shard identity does not depend on how many workers built the cache.

Per position `t` of a sequence the cache holds the teacher's targets for token `t + 1`, of the
manifest's `targets.kind`:
    top_k   `topk_ids[t]`/`topk_logprobs[t]`: the teacher's k most likely tokens (raw logprobs at
            temperature 1, sorted descending)
    sample  `topk_ids[t]`/`sample_counts[t]`: the distinct ids of K draws from the teacher (at the
            sampling temperature) and their counts (sum K), sorted by count; unused slots 0 / 0
and `target_logprobs[t]` is the teacher logprob of the actual token `t + 1`. Position `L - 1` has
no target: its ids are 0, its logprobs (top_k) or counts (sample) 0 and its target NaN.

Version 1 caches (top-k only, no `targets` in the manifest) are still read.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from teacher_cache.errors import CacheError
from teacher_cache.storage import Location, confined

MAX_K = 255  # the most draws per position of a sampled cache: counts are stored as uint8
# 64x the largest vocabularies in use (262k): a larger one is a damaged manifest, not a model.
MAX_VOCAB = 2**24

TargetKind = Literal["top_k", "sample"]
# The spelling of each kind on the command line: "topk:64", "sample:8".
TARGET_PREFIXES: dict[str, TargetKind] = {"topk": "top_k", "sample": "sample"}


@dataclass(frozen=True)
class Targets:
    """What the cache holds per position besides the logprob of the actual next token:
    `top_k`, the teacher's k most likely next tokens, or `sample`, k draws with replacement from
    the teacher at `temperature`, a pure function of (`seed`, sequence id, position)."""

    kind: TargetKind = "top_k"
    k: int = 64
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
COMPRESSION = "zstd"
RECORD_BATCH_ROWS = 16

# The layout: every file and folder name of a cache.
MANIFEST_FILE = "manifest.json"
BUILD_FILE = "build.json"
SHARD_DIR = "shards"
WORKER_DIR = "workers"
RESCORE_DIR = "rescore"
PACKED_DIR = "packed"  # the pack stage's tokens, until the manifest is complete (pack.py)
JOURNAL_FILE = "started.json"  # in a rescore dir: the reference and the shards it started from
# A model saved by student_train carries how it was trained in this file of its directory.
TRAINING_FILE = "training.json"


# Schema metadata key of a shard's Arrow file: the build_id() of the build that wrote it.
BUILD_ID_METADATA = b"distill.build"


def build_id(identity: dict[str, Any]) -> str:
    """A short hash of a build identity, stamped on every shard the build writes. The reference
    is left out: `score` rewrites shards with another reference's scores, keeping their stamp."""
    stamped = {k: v for k, v in identity.items() if not k.startswith("reference.")}
    return hashlib.sha256(json.dumps(stamped, sort_keys=True).encode()).hexdigest()[:16]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.arrow"


def shard_info_name(index: int) -> str:
    return f"shard-{index:06d}.json"


def rescored_shard_name(index: int, sha256: str) -> str:
    """A shard file `score` wrote, named by its content: no file a manifest lists ever changes."""
    return f"shard-{index:06d}.{sha256[:16]}.arrow"


# Arrow schema metadata of a shard `score` wrote: the reference weights that made its scores (a
# shard without it was scored by the build's reference, if any).
SCORE_REFERENCE_KEY = b"distill.score_reference"


def partition_name(index: int) -> str:
    """Under PACKED_DIR/PLAN: the pack stage's tokens of corpus partition `index` (pack.py)."""
    return f"part-{index:05d}.arrow"


def partition_info_name(index: int) -> str:
    return f"part-{index:05d}.json"


def worker_report_name(worker_index: int, num_workers: int) -> str:
    return f"worker-{worker_index}-of-{num_workers}.json"


def rescore_dir(reference_weights_sha256: str) -> str:
    return f"{RESCORE_DIR}/{reference_weights_sha256[:16]}"


def counts_to_logprobs(counts: np.ndarray, k: int) -> np.ndarray:
    """float32 log(count / k) of uint8 counts (any shape); -inf where count is 0 (zero mass)."""
    with np.errstate(divide="ignore"):
        table = np.log(np.arange(MAX_K + 1, dtype=np.float64) / k).astype(np.float32)
    return table[np.asarray(counts, dtype=np.uint8)]


@dataclass(frozen=True)
class Column:
    name: str
    values: str  # Arrow type alias of the values: int64, int32, float16, float32
    # Fixed-size list of prod(sizes) values, sizes named after Manifest fields; () a scalar,
    # None a variable-length list.
    sizes: tuple[str, ...] | None = ()
    null_means: str | None = None  # nullable: what a null stands for

    def arrow_field(self, dims: dict[str, int]) -> pa.Field:
        values = pa.type_for_alias(self.values)
        if self.sizes is None:
            arrow_type = pa.list_(values)
        elif self.sizes:
            arrow_type = pa.list_(values, math.prod(dims[s] for s in self.sizes))
        else:
            arrow_type = values
        return pa.field(self.name, arrow_type, nullable=self.null_means is not None)

    def describe(self) -> str:
        if self.sizes is None:
            text = f"list<{self.values}>"
        elif self.sizes:
            text = f"{self.values}[{' * '.join(self.sizes)}]"
        else:
            text = self.values
        return text if self.null_means is None else f"{text} (null {self.null_means})"


# Logprobs are stored as float16: its 11-bit mantissa keeps |error| < 0.008 nats at logprob -16,
# well under the noise of a bf16 teacher, at half the bytes of float32.
TOP_K_COLUMNS = (
    Column("seq_id", "int64"),
    Column("input_ids", "int32", ("seq_len",)),
    Column("doc_starts", "int32", None),
    Column("topk_ids", "int32", ("seq_len", "top_k")),
    Column("topk_logprobs", "float16", ("seq_len", "top_k")),
    Column("target_logprobs", "float32", ("seq_len",)),
    Column("score", "float32", null_means="until scored"),
)
# A sampled cache stores counts instead of logprobs: K fixed slots per position, padded with 0 / 0.
# Chosen by measurement (docs/cache-format.md): zstd takes the padding and the small counts to a
# few bytes per token, and decoding is a reshape, no scatter of variable-length lists.
SAMPLE_COLUMNS = tuple(Column("sample_counts", "uint8", ("seq_len", "top_k"))
                       if c.name == "topk_logprobs" else c for c in TOP_K_COLUMNS)
COLUMNS: dict[TargetKind, tuple[Column, ...]] = {"top_k": TOP_K_COLUMNS, "sample": SAMPLE_COLUMNS}


def column_types(kind: TargetKind) -> dict[str, str]:
    return {column.name: column.describe() for column in COLUMNS[kind]}


def schema(seq_len: int, top_k: int, kind: TargetKind = "top_k") -> pa.Schema:
    dims = {"seq_len": seq_len, "top_k": top_k}
    return pa.schema([column.arrow_field(dims) for column in COLUMNS[kind]])


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

    def __post_init__(self) -> None:
        confined(self.path)
    # Sampled from a backend's top-K' only (vLLM): mean teacher mass outside that top-K'.
    uncovered_mass: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "shard marker") -> ShardInfo:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise CacheError(f"{source}: not valid JSON ({e}); delete it and rerun") from None
        return cls.from_dict(raw, source)

    @classmethod
    def from_dict(cls, raw: object, source: str) -> ShardInfo:
        # A manifest lists up to ~10^5 shards: the field checks are precomputed (_SHARD_FIELDS).
        names, required, types = _SHARD_FIELDS
        if not isinstance(raw, dict) or not required <= raw.keys() <= names:
            raise CacheError(f"{source}: a shard entry has the fields {', '.join(names)} (all "
                             f"but build and uncovered_mass required); got {str(raw)[:120]}; the "
                             f"cache is damaged, rebuild it")
        for name, value in raw.items():
            expected = types.get(name, (int,))
            if type(value) not in expected:
                raise CacheError(f"{source}: shard field {name} = {value!r} is not of type "
                                 f"{expected[0].__name__}; the cache is damaged, rebuild it")
        try:
            return cls(**raw)
        except CacheError as e:
            raise CacheError(f"{source}: shard {raw['index']} path {e}") from None


_SHARD_FIELDS = (
    {f.name: None for f in fields(ShardInfo)}.keys(),  # ordered, for the message
    {f.name for f in fields(ShardInfo) if f.default is MISSING},
    {"path": (str,), "sha256": (str,), "build": (str, type(None)),
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
    def from_json(cls, text: str | bytes) -> WorkerReport:
        return cls(**json.loads(text))


def write_worker_report(location: Location, report: WorkerReport) -> None:
    location.write_bytes_atomic(report.to_json().encode(), WORKER_DIR,
                                worker_report_name(report.worker_index, report.num_workers))


def read_worker_report(location: Location, worker_index: int,
                       num_workers: int) -> WorkerReport | None:
    """The report a worker left, or None if it has not gone through the corpus yet."""
    name = worker_report_name(worker_index, num_workers)
    if not location.exists(WORKER_DIR, name):
        return None
    return WorkerReport.from_json(location.read_bytes(WORKER_DIR, name))


def read_worker_reports(location: Location) -> list[WorkerReport]:
    return [WorkerReport.from_json(location.read_bytes(WORKER_DIR, name))
            for name in location.list(WORKER_DIR) if name.endswith(".json")]


SCORE_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def score_stats(scores: np.ndarray) -> dict[str, object]:
    """The manifest's `score.stats` of a score column (nulls, as NaN, are not counted)."""
    scores = scores[~np.isnan(scores)].astype(np.float64)
    if not len(scores):
        return {"count": 0}
    return {"count": int(len(scores)), "mean": float(scores.mean()), "std": float(scores.std()),
            "min": float(scores.min()), "max": float(scores.max()),
            "quantiles": {f"{q:.1f}": float(np.quantile(scores, q)) for q in SCORE_QUANTILES}}


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
    def from_json(cls, text: str, source: str = MANIFEST_FILE) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise CacheError(f"{source}: not valid JSON ({e}); the cache is damaged, rebuild it"
                             ) from e
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


@dataclass
class CacheBatch:
    """Rows of a cache as numpy arrays: B rows, L = seq_len, k = top_k. `decode_batch` returns
    them with these dtypes; `encode_batch` takes any integer/float dtypes."""

    seq_ids: np.ndarray  # int64 [B]
    input_ids: np.ndarray  # int64 [B, L]
    topk_ids: np.ndarray  # int64 [B, L, k]
    topk_logprobs: np.ndarray  # float32 [B, L, k]
    target_logprobs: np.ndarray  # float32 [B, L], NaN at L - 1
    score: np.ndarray  # float32 [B], NaN where not scored
    doc_starts: list[np.ndarray]  # B arrays of int32 document start offsets
    # top_k: the teacher's k most likely tokens; sample: the distinct ids of k draws with
    # log(count / k), unused slots id 0 and logprob -inf (zero mass).
    target_kind: TargetKind = "top_k"

    def __len__(self) -> int:
        return len(self.seq_ids)

    def take(self, rows: slice | np.ndarray | list[int]) -> CacheBatch:
        """The rows selected by a slice (views) or by indices (copies)."""
        positions = np.arange(len(self))[rows]
        return CacheBatch(
            seq_ids=self.seq_ids[rows], input_ids=self.input_ids[rows],
            topk_ids=self.topk_ids[rows], topk_logprobs=self.topk_logprobs[rows],
            target_logprobs=self.target_logprobs[rows], score=self.score[rows],
            doc_starts=[self.doc_starts[i] for i in positions.tolist()],
            target_kind=self.target_kind)


def logprobs_to_counts(logprobs: np.ndarray, k: int) -> np.ndarray:
    """uint8 counts of sampled logprobs log(count / k), the inverse of `counts_to_logprobs`."""
    return np.rint(np.exp(np.asarray(logprobs, dtype=np.float64)) * k).astype(np.uint8)


def encode_batch(rows: CacheBatch) -> pa.RecordBatch:
    """Rows as Arrow, the inverse of `decode_batch`; position L - 1 is masked here."""
    b, seq_len, top_k = rows.topk_ids.shape
    topk_ids = np.array(rows.topk_ids, dtype=np.int32)
    if rows.target_kind == "sample":
        name, values = "sample_counts", logprobs_to_counts(rows.topk_logprobs, top_k)
    else:
        name, values = "topk_logprobs", np.array(rows.topk_logprobs, dtype=np.float16)
    target_logprobs = np.array(rows.target_logprobs, dtype=np.float32)
    topk_ids[:, -1] = 0
    values[:, -1] = 0
    target_logprobs[:, -1] = np.nan

    def fixed(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)

    score = np.asarray(rows.score, dtype=np.float32)
    missing = np.isnan(score)
    columns = {
        "seq_id": pa.array(np.asarray(rows.seq_ids, dtype=np.int64)),
        "input_ids": fixed(np.asarray(rows.input_ids, dtype=np.int32), seq_len),
        "doc_starts": pa.array([list(map(int, d)) for d in rows.doc_starts],
                               type=pa.list_(pa.int32())),
        "topk_ids": fixed(topk_ids, seq_len * top_k),
        name: fixed(values, seq_len * top_k),
        "target_logprobs": fixed(target_logprobs, seq_len),
        # An unscored column is all nulls with zero values, whatever the NaNs held.
        "score": pa.nulls(b, pa.float32()) if missing.all() else pa.array(score, mask=missing),
    }
    return pa.RecordBatch.from_arrays([columns[c.name] for c in COLUMNS[rows.target_kind]],
                                      schema=schema(seq_len, top_k, rows.target_kind))


def unscored(rows: int) -> np.ndarray:
    """The score column of rows no reference has scored."""
    return np.full(rows, np.nan, dtype=np.float32)


def decode_batch(rows: pa.RecordBatch | pa.Table, seq_len: int, top_k: int,
                 target_kind: TargetKind = "top_k") -> CacheBatch:
    if isinstance(rows, pa.Table):
        rows = rows.combine_chunks().to_batches()[0] if rows.num_rows else None
        if rows is None:
            raise CacheError("cannot decode an empty table")
    b = rows.num_rows

    def fixed(name: str, dtype, *shape: int) -> np.ndarray:
        values = rows.column(name).flatten().to_numpy(zero_copy_only=False)
        return values.astype(dtype, copy=False).reshape(b, *shape)

    offsets = rows.column("doc_starts").offsets.to_numpy()
    starts = rows.column("doc_starts").flatten().to_numpy(zero_copy_only=False)
    score = rows.column("score").to_numpy(zero_copy_only=False)
    if target_kind == "sample":
        topk_logprobs = counts_to_logprobs(fixed("sample_counts", np.uint8, seq_len, top_k), top_k)
    else:
        topk_logprobs = fixed("topk_logprobs", np.float32, seq_len, top_k)
    return CacheBatch(
        seq_ids=rows.column("seq_id").to_numpy(zero_copy_only=False).astype(np.int64),
        input_ids=fixed("input_ids", np.int64, seq_len),
        topk_ids=fixed("topk_ids", np.int64, seq_len, top_k),
        topk_logprobs=topk_logprobs,
        target_logprobs=fixed("target_logprobs", np.float32, seq_len),
        score=np.asarray(score, dtype=np.float32),  # nulls come back as NaN
        doc_starts=[starts[offsets[i]:offsets[i + 1]] for i in range(b)],
        target_kind=target_kind,
    )


def serialize_shard(batches: list[pa.RecordBatch]) -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=COMPRESSION)
    # Record batches of RECORD_BATCH_ROWS whatever the rows per teacher call, so the bytes do not
    # depend on --batch-size.
    table = pa.Table.from_batches(batches).combine_chunks()
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=RECORD_BATCH_ROWS)
    return sink.getvalue().to_pybytes()


def write_shard(location: Location, index: int, batches: list[pa.RecordBatch],
                rows_per_shard: int, uncovered_mass: float | None = None) -> ShardInfo:
    """Write one complete shard atomically, then its ShardInfo (which marks it done and carries
    the build id found in the batches' schema metadata)."""
    data = serialize_shard(batches)
    seq_len = batches[0].schema.field("input_ids").type.list_size
    rows = sum(b.num_rows for b in batches)
    build = (batches[0].schema.metadata or {}).get(BUILD_ID_METADATA)
    info = ShardInfo(index=index, path=f"{SHARD_DIR}/{shard_name(index)}", rows=rows,
                     tokens=rows * seq_len, sha256=hashlib.sha256(data).hexdigest(),
                     bytes=len(data), first_seq_id=index * rows_per_shard,
                     build=build.decode() if build else None, uncovered_mass=uncovered_mass)
    location.write_bytes_atomic(data, SHARD_DIR, shard_name(index))
    location.write_bytes_atomic(info.to_json().encode(), SHARD_DIR, shard_info_name(index))
    return info


def read_shard_info(location: Location, index: int) -> ShardInfo | None:
    """The ShardInfo of a finished shard, or None if the shard is missing or unfinished."""
    if not location.exists(SHARD_DIR, shard_info_name(index)):
        return None
    return ShardInfo.from_json(location.read_bytes(SHARD_DIR, shard_info_name(index)),
                               f"{location.uri.rstrip('/')}/{SHARD_DIR}/{shard_info_name(index)}")


class ShardError(CacheError):
    """A shard that cannot be read as its ShardInfo says: `problem` says why, in one line."""

    def __init__(self, location: Location, info: ShardInfo, problem: str):
        self.info, self.problem = info, problem
        super().__init__(f"{location.uri.rstrip('/')}/{info.path}: {problem}; `python -m "
                         f"teacher_cache verify --cache {location.uri} --repair` drops it, then "
                         f"the same build command rebuilds it")


class ShardMissing(ShardError):
    """A shard file the manifest lists is not there (a reader may find a newer manifest)."""


def read_shard(location: Location, info: ShardInfo, verify: bool = True) -> pa.Table:
    """A shard's rows as an Arrow table, after checking its size and sha256 against `info`."""
    try:
        data = location.read_bytes(info.path)
    except FileNotFoundError:
        raise ShardMissing(location, info, "shard listed in the manifest is missing") from None
    if verify and (len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256):
        raise ShardError(location, info,
                         "checksum mismatch (the shard is corrupt or was modified)")
    try:
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    except pa.ArrowInvalid as e:
        raise ShardError(location, info, f"not a readable Arrow IPC file ({e})") from None
    if table.num_rows != info.rows:
        raise ShardError(location, info,
                         f"holds {table.num_rows} rows, the manifest says {info.rows}")
    return table
