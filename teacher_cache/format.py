"""The teacher cache format: the one definition both the builder and every reader import.

Human-readable description: docs/cache-format.md. Summary:

    CACHE/manifest.json             Manifest (below); `complete` is true once every shard is final
    CACHE/shards/shard-NNNNNN.arrow Arrow IPC file (zstd), one row per packed sequence
    CACHE/shards/shard-NNNNNN.json  ShardInfo, written after the .arrow: marks the shard done

Shard `i` holds the sequences with ids `[i * rows_per_shard, (i + 1) * rows_per_shard)` of the
packed corpus, so shard identity does not depend on how many workers built the cache.

Per position `t` of a sequence, `topk_ids[t]`/`topk_logprobs[t]` are the teacher's k most likely
tokens for position `t + 1` (raw logprobs at temperature 1, sorted descending) and
`target_logprobs[t]` is the teacher logprob of the actual token `t + 1`. Position `L - 1` has no
target: its ids are 0, its logprobs 0 and its target NaN.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from teacher_cache.storage import Location

FORMAT_NAME = "distill.teacher-cache"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"
COMPRESSION = "zstd"
RECORD_BATCH_ROWS = 16

# Logprobs are stored as float16: its 11-bit mantissa keeps |error| < 0.008 nats at logprob -16,
# well under the noise of a bf16 teacher, at half the bytes of float32.
COLUMN_TYPES = {
    "seq_id": "int64",
    "input_ids": "int32[seq_len]",
    "doc_starts": "list<int32>",
    "topk_ids": "int32[seq_len * top_k]",
    "topk_logprobs": "float16[seq_len * top_k]",
    "target_logprobs": "float32[seq_len]",
    "score": "float32 (null until scored)",
}


class CacheError(Exception):
    """A cache that cannot be read or written as asked; the message says which file and why."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.arrow"


def shard_info_name(index: int) -> str:
    return f"shard-{index:06d}.json"


def schema(seq_len: int, top_k: int) -> pa.Schema:
    return pa.schema([
        pa.field("seq_id", pa.int64(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32(), seq_len), nullable=False),
        pa.field("doc_starts", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_ids", pa.list_(pa.int32(), seq_len * top_k), nullable=False),
        pa.field("topk_logprobs", pa.list_(pa.float16(), seq_len * top_k), nullable=False),
        pa.field("target_logprobs", pa.list_(pa.float32(), seq_len), nullable=False),
        pa.field("score", pa.float32(), nullable=True),
    ])


@dataclass
class ShardInfo:
    index: int
    path: str  # relative to the cache root
    rows: int
    tokens: int
    sha256: str
    bytes: int
    first_seq_id: int


@dataclass
class Manifest:
    seq_len: int
    top_k: int
    vocab_size: int
    teacher: dict[str, Any]  # name, path, weights_sha256, dtype, backend, dtype_reason (optional)
    tokenizer: dict[str, Any]  # sha256, eos_token_id, bos_token_id
    corpus: dict[str, Any]  # description, documents, skipped files, max_tokens
    rows_per_shard: int
    shards: list[ShardInfo] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)  # sequences, tokens, bytes
    score: dict[str, Any] | None = None  # reference identity and score statistics
    build: dict[str, Any] = field(default_factory=dict)  # backend, wall time, tokens/s, workers
    complete: bool = False
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    compression: str = COMPRESSION
    columns: dict[str, str] = field(default_factory=lambda: dict(COLUMN_TYPES))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST_FILE) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise CacheError(f"{source}: not valid JSON ({e}); the cache is damaged, rebuild it"
                             ) from e
        if raw.get("format") != FORMAT_NAME:
            raise CacheError(
                f"{source}: format {raw.get('format')!r} is not a {FORMAT_NAME} manifest")
        if raw.get("version") != FORMAT_VERSION:
            raise CacheError(
                f"{source}: cache format version {raw.get('version')!r} is not supported by this "
                f"reader (it knows version {FORMAT_VERSION}); upgrade distill or rebuild the cache")
        raw["shards"] = [ShardInfo(**s) for s in raw.get("shards", [])]
        try:
            return cls(**raw)
        except TypeError as e:
            raise CacheError(f"{source}: unexpected manifest fields ({e})") from e

    def build_identity(self) -> dict[str, Any]:
        """What must match for a rerun to extend this cache rather than conflict with it."""
        return {
            "teacher.weights_sha256": self.teacher.get("weights_sha256"),
            "tokenizer.sha256": self.tokenizer.get("sha256"),
            "top_k": self.top_k,
            "seq_len": self.seq_len,
            "rows_per_shard": self.rows_per_shard,
            "corpus": self.corpus.get("description"),
        }


@dataclass
class CacheBatch:
    """Decoded rows, numpy arrays with B rows, L = seq_len, k = top_k."""

    seq_ids: np.ndarray  # int64 [B]
    input_ids: np.ndarray  # int64 [B, L]
    topk_ids: np.ndarray  # int64 [B, L, k]
    topk_logprobs: np.ndarray  # float32 [B, L, k]
    target_logprobs: np.ndarray  # float32 [B, L], NaN at L - 1
    score: np.ndarray  # float32 [B], NaN where not scored
    doc_starts: list[np.ndarray]  # B arrays of int32 document start offsets

    def __len__(self) -> int:
        return len(self.seq_ids)


def encode_batch(seq_ids: np.ndarray, input_ids: np.ndarray, doc_starts: list[list[int]],
                 topk_ids: np.ndarray, topk_logprobs: np.ndarray, target_logprobs: np.ndarray,
                 score: np.ndarray | None = None) -> pa.RecordBatch:
    """Rows as Arrow. Arrays are [B, L], [B, L, k] and [B]; position L - 1 is masked here."""
    b, seq_len, top_k = topk_ids.shape
    topk_ids = np.array(topk_ids, dtype=np.int32)
    topk_logprobs = np.array(topk_logprobs, dtype=np.float16)
    target_logprobs = np.array(target_logprobs, dtype=np.float32)
    topk_ids[:, -1] = 0
    topk_logprobs[:, -1] = 0
    target_logprobs[:, -1] = np.nan

    def fixed(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)

    scores = pa.nulls(b, pa.float32()) if score is None else pa.array(
        np.asarray(score, dtype=np.float32), mask=np.isnan(np.asarray(score, dtype=np.float32)))
    return pa.RecordBatch.from_arrays([
        pa.array(np.asarray(seq_ids, dtype=np.int64)),
        fixed(np.asarray(input_ids, dtype=np.int32), seq_len),
        pa.array([list(map(int, d)) for d in doc_starts], type=pa.list_(pa.int32())),
        fixed(topk_ids, seq_len * top_k),
        fixed(topk_logprobs, seq_len * top_k),
        fixed(target_logprobs, seq_len),
        scores,
    ], schema=schema(seq_len, top_k))


def decode_batch(rows: pa.RecordBatch | pa.Table, seq_len: int, top_k: int) -> CacheBatch:
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
    return CacheBatch(
        seq_ids=rows.column("seq_id").to_numpy(zero_copy_only=False).astype(np.int64),
        input_ids=fixed("input_ids", np.int64, seq_len),
        topk_ids=fixed("topk_ids", np.int64, seq_len, top_k),
        topk_logprobs=fixed("topk_logprobs", np.float32, seq_len, top_k),
        target_logprobs=fixed("target_logprobs", np.float32, seq_len),
        score=np.asarray(score, dtype=np.float32),  # nulls come back as NaN
        doc_starts=[starts[offsets[i]:offsets[i + 1]] for i in range(b)],
    )


def serialize_shard(batches: list[pa.RecordBatch]) -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=COMPRESSION)
    with pa.ipc.new_file(sink, batches[0].schema, options=options) as writer:
        for batch in batches:
            for start in range(0, batch.num_rows, RECORD_BATCH_ROWS):
                writer.write_batch(batch.slice(start, RECORD_BATCH_ROWS))
    return sink.getvalue().to_pybytes()


def write_shard(location: Location, index: int, batches: list[pa.RecordBatch],
                rows_per_shard: int) -> ShardInfo:
    """Write one complete shard atomically, then its ShardInfo (which marks it done)."""
    data = serialize_shard(batches)
    seq_len = batches[0].schema.field("input_ids").type.list_size
    rows = sum(b.num_rows for b in batches)
    info = ShardInfo(index=index, path=f"{SHARD_DIR}/{shard_name(index)}", rows=rows,
                     tokens=rows * seq_len, sha256=hashlib.sha256(data).hexdigest(),
                     bytes=len(data), first_seq_id=index * rows_per_shard)
    location.write_bytes_atomic(data, SHARD_DIR, shard_name(index))
    location.write_bytes_atomic(json.dumps(asdict(info)).encode(), SHARD_DIR,
                                shard_info_name(index))
    return info


def read_shard_info(location: Location, index: int) -> ShardInfo | None:
    """The ShardInfo of a finished shard, or None if the shard is missing or unfinished."""
    if not location.exists(SHARD_DIR, shard_info_name(index)):
        return None
    return ShardInfo(**json.loads(location.read_bytes(SHARD_DIR, shard_info_name(index))))


def read_shard(location: Location, info: ShardInfo, verify: bool = True) -> pa.Table:
    """A shard's rows as an Arrow table, after checking its size and sha256 against `info`."""
    where = f"{location.uri.rstrip('/')}/{info.path}"
    try:
        data = location.read_bytes(info.path)
    except FileNotFoundError as e:
        raise CacheError(f"{where}: shard listed in the manifest is missing") from e
    if verify and (len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256):
        raise CacheError(f"{where}: checksum mismatch (the shard is corrupt or was modified); "
                         f"rebuild it by deleting it and rerunning the build")
    try:
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    except pa.ArrowInvalid as e:
        raise CacheError(f"{where}: not a readable Arrow IPC file ({e})") from e
    if table.num_rows != info.rows:
        raise CacheError(f"{where}: holds {table.num_rows} rows, the manifest says {info.rows}")
    return table
