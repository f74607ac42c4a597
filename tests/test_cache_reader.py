"""The reader verifies every shard it decodes, not only the ones read_scores saw first."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import corrupt_shard, synthetic_cache

from student_train.data import TrainStream, split_rows
from student_train.selection import Selection
from teacher_cache.errors import CacheError


def test_a_shard_corrupted_after_split_rows_fails_its_checksum_when_training_reads_it(tmp_path):
    cache = synthetic_cache(tmp_path, sequences=12, rows_per_shard=6)
    split = split_rows(cache, 0.0, Selection(), seed=0)  # verifies every shard once
    corrupt_shard(tmp_path, 1)

    with pytest.raises(CacheError, match="shard-000001.arrow.*checksum"):
        cache.read_shard(1)
    stream = TrainStream(str(tmp_path), split.train, global_batch=12, rank=0, world_size=1,
                         seed=0, shuffle_buffer=4)
    with pytest.raises(CacheError, match="checksum"):
        next(iter(stream))
    np.testing.assert_array_equal(cache.read_shard(0).seq_ids, np.arange(6))
