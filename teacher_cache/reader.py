"""`open_cache`: the read side of the cache, shared by the trainer and by users."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from teacher_cache.errors import CacheError, IndexMissing, ShardMissing
from teacher_cache.format import (
    MANIFEST_FILE,
    SHARD_DIR,
    CacheBatch,
    Manifest,
    ShardInfo,
    Targets,
    decode_batch,
    read_manifest,
    read_shard,
)
from teacher_cache.index import RowIndex, manifest_rows, read_index
from teacher_cache.storage import Location, refuse_writable_by_others, resolve


class TeacherCache:
    """A finished cache. Iterating yields `CacheBatch`es of `batch_size` rows in storage order.

    `score` never changes a file a manifest lists: it writes new shard files, switches the
    manifest, then deletes the old files. A shard deleted under this reader is read from the
    current manifest instead, when that one holds the same sequences (the teacher columns are then
    the same bytes; only `score` may differ, and `read_index` returns one version's).
    """

    def __init__(self, location: Location, manifest: Manifest, verify: bool = True,
                 batch_size: int = 8):
        self.location = location
        self.manifest = manifest
        self.verify = verify
        self.batch_size = batch_size
        self._position_of: tuple[Manifest | None, dict[int, int]] = (None, {})

    @property
    def shards(self) -> list[ShardInfo]:
        return self.manifest.shards

    @property
    def num_sequences(self) -> int:
        return sum(s.rows for s in self.shards)

    def read_shard(self, shard: int | ShardInfo) -> CacheBatch:
        """All rows of one shard (its position in `shards`, or its ShardInfo), decoded (checksum
        verified unless `verify=False`)."""
        position = shard if isinstance(shard, int) else self._positions()[shard.index]
        table = self._read_table(position)
        m = self.manifest
        self._check_shapes(table, shard)
        batch = decode_batch(table, m.seq_len, m.top_k, m.target_kind)
        largest = max(int(batch.input_ids.max(initial=0)), int(batch.topk_ids.max(initial=0)))
        if largest >= self.manifest.vocab_size:
            raise CacheError(f"{self._where(shard)}: holds token id {largest}, but the manifest's "
                             f"vocab_size is {self.manifest.vocab_size}; the manifest does not "
                             f"belong to these shards, rebuild the cache")
        return batch

    def _positions(self) -> dict[int, int]:
        """Shard index -> position in `shards`, for the current manifest."""
        if self._position_of[0] is not self.manifest:
            self._position_of = (self.manifest,
                                 {s.index: i for i, s in enumerate(self.manifest.shards)})
        return self._position_of[1]

    def read_index(self) -> RowIndex:
        """seq_id, shard and score of every row, all from one version of the cache: the row
        index the manifest names, which reads no shard. A cache of format 2 has none: its shards
        are read whole instead (and so verified, unless `verify=False`)."""
        while True:
            version = self.manifest
            try:
                if version.index is not None:
                    return read_index(self.location, version)
                tables = [self._read_table(i) for i in range(len(self.shards))]
            except IndexMissing:
                if not self._follow_new_manifest():
                    raise
                continue
            if self.manifest is version:
                break  # else `score` switched the manifest meanwhile: read the new version
        seq_ids, shard = manifest_rows(version)
        scores = [t.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
                  for t in tables]
        return RowIndex(seq_ids, shard, np.concatenate(scores) if scores
                        else np.zeros(0, np.float32))

    def read_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(seq_ids, scores) of every row, all from one version of the cache (`read_index`)."""
        index = self.read_index()
        return index.seq_ids, index.scores

    def _read_table(self, position: int) -> pa.Table:
        try:
            return read_shard(self.location, self.shards[position], verify=self.verify)
        except ShardMissing:
            if not self._follow_new_manifest():
                raise
            return read_shard(self.location, self.shards[position], verify=self.verify)

    def _follow_new_manifest(self) -> bool:
        """Switch to the cache's current manifest if it holds the same sequences as ours (a
        `score` finished since we opened it); False if it is the one we have."""
        current = read_manifest(self.location)
        if current == self.manifest:
            return False
        if not current.complete or same_sequences(current) != same_sequences(self.manifest):
            raise CacheError(f"{self.location.uri}: the cache was rebuilt while being read; "
                             f"restart the reader")
        self.manifest = current
        return True

    def _check_shapes(self, table: pa.Table, shard: int | ShardInfo) -> None:
        m = self.manifest
        widths = {"input_ids": m.seq_len, "topk_ids": m.seq_len * m.top_k}
        for name, width in widths.items():
            kind = table.schema.field(name).type if name in table.schema.names else None
            found = kind.list_size if kind and pa.types.is_fixed_size_list(kind) else width
            if found != width:
                raise CacheError(f"{self._where(shard)}: column {name} holds {found} values per "
                                 f"row, the manifest's seq_len {m.seq_len} and top_k {m.top_k} "
                                 f"need {width}; the manifest does not belong to these shards, "
                                 f"rebuild the cache")

    def _where(self, shard: int | ShardInfo) -> str:
        info = self.shards[shard] if isinstance(shard, int) else shard
        return f"{self.location.uri.rstrip('/')}/{info.path}"

    def iter_batches(self, batch_size: int | None = None) -> Iterator[CacheBatch]:
        batch_size = batch_size or self.batch_size
        for info in self.shards:
            rows = self.read_shard(info)
            for start in range(0, len(rows), batch_size):
                yield rows.take(slice(start, start + batch_size))

    def __iter__(self) -> Iterator[CacheBatch]:
        return self.iter_batches()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TeacherCache({self.location.uri!r}, sequences={self.num_sequences}, "
                f"seq_len={m.seq_len}, targets={Targets.from_manifest(m.targets).spec}, "
                f"teacher={m.teacher.get('name')!r})")


def same_sequences(manifest: Manifest) -> tuple:
    """What two versions of a cache share when they differ only by `score`."""
    shards = [(s.index, s.rows, s.first_seq_id, s.tokens) for s in manifest.shards]
    return manifest.build_identity(), manifest.vocab_size, shards


def open_cache(path: str | os.PathLike, *, verify: bool = True, batch_size: int = 8,
               allow_incomplete: bool = False) -> TeacherCache:
    """Open a finished cache at a local path or fsspec URL.

    Raises CacheError if the manifest is missing, of an unknown format version, or marks the cache
    incomplete (a build still running or interrupted: rerun it to finish), or if the directory,
    its manifest, index or shard folder can be written by every user.
    """
    location = resolve(path)
    refuse_writable_by_others(location, MANIFEST_FILE, SHARD_DIR)
    manifest = read_manifest(location)
    if isinstance(manifest.index, dict) and isinstance(manifest.index.get("path"), str):
        refuse_writable_by_others(location, manifest.index["path"])
    if not manifest.complete and not allow_incomplete:
        raise CacheError(f"{location.uri}: the cache is incomplete (its build was interrupted or "
                         f"is still running); rerun the same build command to finish it")
    return TeacherCache(location, manifest, verify=verify, batch_size=batch_size)
