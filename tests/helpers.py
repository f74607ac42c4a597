"""Plain helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from student_train.synthetic import write_synthetic_cache
from teacher_cache.reader import TeacherCache, open_cache

# --- caches: synthetic cache factory ---


def synthetic_cache(path: str | os.PathLike, *, sequences: int = 40, seq_len: int = 4,
                    top_k: int = 2, vocab_size: int = 32, rows_per_shard: int = 6, seed: int = 0,
                    scores: np.ndarray | None = None) -> TeacherCache:
    """A complete synthetic cache written at `path` (a directory or fsspec URL), opened."""
    write_synthetic_cache(path, sequences=sequences, seq_len=seq_len, top_k=top_k,
                          vocab_size=vocab_size, rows_per_shard=rows_per_shard, seed=seed,
                          scores=scores)
    return open_cache(path)


def shard_bytes(path: Path) -> dict[str, bytes]:
    """Every shard file of a local cache (the .arrow and its .json) by name."""
    return {p.name: p.read_bytes() for p in sorted((path / "shards").glob("shard-*"))}
