"""The row index of a cache: seq_id, shard and score of every row, in one small Arrow file.

Training start, resume and `read_scores` read the manifest and this file, never a shard, so their
cost grows with the number of rows (16 bytes each in memory), not with the cache's bytes. The file
is named by its content (`index-SHA16.arrow`) and the manifest's `index` entry names it, so the
one atomic write of the manifest switches both: `publish_manifest` writes the index, then the
manifest, then deletes index files no manifest names. A manifest without an `index` (format 2 and
older) is read the slow way, from the shards' columns.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from teacher_cache.errors import CacheError, IndexMissing
from teacher_cache.format import (
    COMPRESSION,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SHARD_DIR,
    Manifest,
    ShardInfo,
    shard_name,
    write_manifest,
)
from teacher_cache.storage import Location, confined

INDEX_PREFIX = "index-"
INDEX_SCHEMA = pa.schema([pa.field("seq_id", pa.int64(), nullable=False),
                          pa.field("shard", pa.int32(), nullable=False),
                          pa.field("score", pa.float32())])


@dataclass(frozen=True)
class RowIndex:
    """Every row of a cache in manifest order: its seq_id, the position of its shard in
    `manifest.shards`, and its score (NaN where not scored)."""

    seq_ids: np.ndarray  # int64 [N]
    shard: np.ndarray  # int32 [N]
    scores: np.ndarray  # float32 [N]

    def __len__(self) -> int:
        return len(self.seq_ids)


def manifest_rows(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(seq_ids, shard positions) of every row, from the manifest alone: shard `i` holds the
    contiguous ids `[first_seq_id, first_seq_id + rows)`."""
    firsts = np.array([s.first_seq_id for s in manifest.shards], dtype=np.int64)
    rows = np.array([s.rows for s in manifest.shards], dtype=np.int64)
    shard = np.repeat(np.arange(len(rows), dtype=np.int32), rows)
    seq_ids = np.arange(int(rows.sum()), dtype=np.int64)
    seq_ids += np.repeat(firsts - (np.cumsum(rows) - rows), rows)
    return seq_ids, shard


def index_name(sha256: str) -> str:
    return f"{INDEX_PREFIX}{sha256[:16]}.arrow"


def encode_index(manifest: Manifest, scores: np.ndarray) -> bytes:
    seq_ids, shard = manifest_rows(manifest)
    scores = np.asarray(scores, dtype=np.float32)
    if len(scores) != len(seq_ids):
        raise ValueError(f"{len(scores)} scores for {len(seq_ids)} rows")
    missing = np.isnan(scores)
    table = pa.table([pa.array(seq_ids), pa.array(shard),
                      pa.array(scores, mask=missing) if missing.any() else pa.array(scores)],
                     schema=INDEX_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, INDEX_SCHEMA,
                         options=pa.ipc.IpcWriteOptions(compression=COMPRESSION)) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def publish_manifest(location: Location, manifest: Manifest, scores: np.ndarray) -> None:
    """Write the row index of `manifest` with these scores (one per row, in manifest order),
    then the manifest naming it (the switch), then delete index files it does not name."""
    data = encode_index(manifest, scores)
    manifest.version = FORMAT_VERSION  # a manifest with an index is a version-3 manifest
    sha256 = hashlib.sha256(data).hexdigest()
    manifest.index = {"path": index_name(sha256), "rows": len(scores), "sha256": sha256,
                      "bytes": len(data)}
    location.write_bytes_atomic(data, manifest.index["path"])
    write_manifest(location, manifest)
    for name in location.list():
        if name.startswith(INDEX_PREFIX) and name != manifest.index["path"]:
            location.delete(name)


def read_index(location: Location, manifest: Manifest) -> RowIndex:
    """The manifest's row index, checked against its checksum and against the manifest's shards;
    CacheError (one line) if it does not match."""
    entry = manifest.index
    where = f"{location.uri.rstrip('/')}/{MANIFEST_FILE}: index"
    if not isinstance(entry, dict) or set(entry) != {"path", "rows", "sha256", "bytes"}:
        raise CacheError(f"{where} is {str(entry)[:80]}, not an entry with path, rows, sha256 "
                         f"and bytes; the cache is damaged, rebuild it")
    path = confined(str(entry["path"]))
    repair = (f"`python -m teacher_cache verify --cache {location.uri} --repair` writes it again "
              f"from the shards")
    try:
        data = location.read_bytes(path)
    except FileNotFoundError:
        raise IndexMissing(f"{location.uri.rstrip('/')}/{path}: the row index the manifest names "
                           f"is missing; {repair}") from None
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CacheError(f"{location.uri.rstrip('/')}/{path}: checksum mismatch (the row index "
                         f"is corrupt or was modified); {repair}")
    table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    seq_ids, shard = manifest_rows(manifest)
    if (table.schema != INDEX_SCHEMA or table.num_rows != len(seq_ids)
            or not np.array_equal(table.column("seq_id").to_numpy(), seq_ids)
            or not np.array_equal(table.column("shard").to_numpy(), shard)):
        raise CacheError(f"{location.uri.rstrip('/')}/{path}: the row index does not list the "
                         f"rows of the manifest's shards; {repair}")
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
    return RowIndex(seq_ids, shard, scores)


def is_rescored(info: ShardInfo) -> bool:
    """Whether `score` rewrote this shard (its file is named by its content)."""
    return info.path != f"{SHARD_DIR}/{shard_name(info.index)}"


def read_score_column(location: Location, info: ShardInfo) -> np.ndarray:
    """A shard's scores (NaN where null), reading only that column's buffers of the file. The
    shard's checksum is not checked here: that needs the whole file (`verify` does it)."""
    with location.fs.open_input_file(location.path(info.path)) as f:
        reader = pa.ipc.open_file(f)
        column = reader.schema.get_field_index("score")
        projected = pa.ipc.open_file(f, options=pa.ipc.IpcReadOptions(included_fields=[column]))
        table = projected.read_all()
    if table.num_rows != info.rows:
        raise CacheError(f"{location.uri.rstrip('/')}/{info.path}: holds {table.num_rows} rows, "
                         f"its marker says {info.rows}; delete it and its .json and rerun the "
                         f"build")
    return table.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
