"""`open_cache`: the read side of the cache, shared by the trainer and by users."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from teacher_cache.format import (
    MANIFEST_FILE,
    CacheBatch,
    CacheError,
    Manifest,
    ShardInfo,
    Targets,
    decode_batch,
    read_shard,
)
from teacher_cache.storage import Location, resolve


class TeacherCache:
    """A finished cache. Iterating yields `CacheBatch`es of `batch_size` rows in storage order."""

    def __init__(self, location: Location, manifest: Manifest, verify: bool = True,
                 batch_size: int = 8):
        self.location = location
        self.manifest = manifest
        self.verify = verify
        self.batch_size = batch_size

    @property
    def shards(self) -> list[ShardInfo]:
        return self.manifest.shards

    @property
    def num_sequences(self) -> int:
        return sum(s.rows for s in self.shards)

    def read_shard(self, shard: int | ShardInfo) -> CacheBatch:
        """All rows of one shard, decoded (checksum verified unless `verify=False`)."""
        info = self.shards[shard] if isinstance(shard, int) else shard
        table = read_shard(self.location, info, verify=self.verify)
        m = self.manifest
        return decode_batch(table, m.seq_len, m.top_k, m.target_kind)

    def read_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(seq_ids, scores) of every row. Reads whole shards: their checksum covers the whole
        file, so this also verifies every shard (unless `verify=False`)."""
        seq_ids, scores = [], []
        for info in self.shards:
            table = read_shard(self.location, info, verify=self.verify)
            seq_ids.append(table.column("seq_id").to_numpy())
            scores.append(table.column("score").to_numpy(zero_copy_only=False).astype(np.float32))
        if not seq_ids:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(seq_ids), np.concatenate(scores)

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


def read_manifest(location: Location) -> Manifest:
    if not location.exists(MANIFEST_FILE):
        raise CacheError(f"{location.uri}: no {MANIFEST_FILE} here; is this a teacher cache? "
                         f"Build one with `python -m teacher_cache build --out {location.uri}`")
    text = location.read_bytes(MANIFEST_FILE).decode("utf-8")
    return Manifest.from_json(text, source=f"{location.uri.rstrip('/')}/{MANIFEST_FILE}")


def open_cache(path: str | os.PathLike, *, verify: bool = True, batch_size: int = 8,
               allow_incomplete: bool = False) -> TeacherCache:
    """Open a finished cache at a local path or fsspec URL.

    Raises CacheError if the manifest is missing, of an unknown format version, or marks the cache
    incomplete (a build still running or interrupted: rerun it to finish).
    """
    location = resolve(path)
    manifest = read_manifest(location)
    if not manifest.complete and not allow_incomplete:
        raise CacheError(f"{location.uri}: the cache is incomplete (its build was interrupted or "
                         f"is still running); rerun the same build command to finish it")
    return TeacherCache(location, manifest, verify=verify, batch_size=batch_size)
