"""Row selection by teacher score: exact rows kept, deterministic across ranks and resumes."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import synthetic_cache

from student_train.data import split_rows
from student_train.selection import Selection
from teacher_cache.errors import ConfigError
from teacher_cache.reader import open_cache

SEQUENCES = 40


def test_parse():
    assert Selection.parse("none") == Selection()
    assert Selection.parse("top:0.5") == Selection("top", 0.5)
    assert Selection.parse("random:0.25") == Selection("random", 0.25)
    for bad in ("top", "top:x", "top:0", "top:1.5", "best:0.5", "none:0.5"):
        with pytest.raises(ConfigError, match="--select"):
            Selection.parse(bad)


def test_top_keeps_the_highest_scores_with_ties_broken_by_seq_id(tmp_path):
    scores = (np.arange(SEQUENCES) % 5).astype(np.float32)  # many ties
    cache = synthetic_cache(tmp_path, scores=scores)
    split = split_rows(cache, 0.2, Selection.parse("top:0.5"), seed=0)
    candidates = sorted(set(range(SEQUENCES)) - set(split.val.tolist()))
    keep = round(0.5 * len(candidates))
    expected = sorted(sorted(candidates, key=lambda i: (-scores[i], i))[:keep])
    assert split.train.tolist() == expected
    # The cut falls inside a tie group, so the tie-break decides real rows.
    assert scores[expected].min() in scores[sorted(set(candidates) - set(expected))]


def test_random_is_seeded_and_the_same_size_as_top(tmp_path):
    cache = synthetic_cache(tmp_path, scores=np.linspace(0, 1, SEQUENCES, dtype=np.float32))
    top = split_rows(cache, 0.2, Selection.parse("top:0.5"), seed=0)
    first = split_rows(cache, 0.2, Selection.parse("random:0.5"), seed=7)
    again = split_rows(open_cache(tmp_path), 0.2, Selection.parse("random:0.5"), seed=7)
    other = split_rows(cache, 0.2, Selection.parse("random:0.5"), seed=8)
    assert len(first.train) == len(top.train)
    np.testing.assert_array_equal(first.train, again.train)  # every rank, every resume
    assert not np.array_equal(first.train, other.train)
    assert set(first.train).isdisjoint(first.val)


def test_none_keeps_every_training_row(tmp_path):
    split = split_rows(synthetic_cache(tmp_path), 0.2, Selection(), seed=0)
    assert sorted([*split.train, *split.val]) == list(range(SEQUENCES))


def test_top_on_an_unscored_cache_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no score"):
        split_rows(synthetic_cache(tmp_path), 0.2, Selection.parse("top:0.5"), seed=0)
