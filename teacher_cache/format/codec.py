"""A shard's Arrow schema and the codec between its rows and `CacheBatch` (docs/cache-format.md,
"Columns").

Per position `t` the row holds the teacher's targets for token `t + 1`; position `L - 1` has no
target (ids 0, logprobs or counts 0, target NaN)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from teacher_cache.errors import CacheError

MAX_K = 255  # the most draws per position of a sampled cache: counts are stored as uint8
TargetKind = Literal["top_k", "sample"]
COMPRESSION = "zstd"


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

