"""Shard files: written atomically, then their ShardInfo marker; read back checked against it."""

from __future__ import annotations

import hashlib

import pyarrow as pa

from teacher_cache.errors import ShardError, ShardMissing
from teacher_cache.format.codec import COMPRESSION
from teacher_cache.format.layout import BUILD_ID_METADATA, SHARD_DIR, shard_info_name, shard_name
from teacher_cache.format.records import ShardInfo
from teacher_cache.storage import Location

RECORD_BATCH_ROWS = 16


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
