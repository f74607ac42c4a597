from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import brute_force_scores, crash_on_second_shard

from teacher_cache import CacheError, open_cache
from teacher_cache import score as score_module
from teacher_cache.format import read_shard, score_stats
from teacher_cache.score import rescore_cache, sequence_scores


def tables(path: Path) -> list[pa.Table]:
    cache = open_cache(path)
    return [read_shard(cache.location, info) for info in cache.shards]


def column_values(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name).combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        column = column.flatten()
    return column.to_numpy(zero_copy_only=False)


def test_sequence_scores_average_target_positions_only():
    teacher = np.array([[-1.0, -2.0, np.nan], [-0.5, -0.5, np.nan]], dtype=np.float32)
    reference = np.array([[-3.0, -3.0, np.nan], [-0.5, -1.5, np.nan]], dtype=np.float32)
    np.testing.assert_allclose(sequence_scores(teacher, reference), [1.5, 0.5])


def test_score_stats():
    stats = score_stats(np.array([1.0, 2.0, np.nan, 3.0, 4.0], dtype=np.float32))
    assert stats["count"] == 4 and stats["mean"] == 2.5 and stats["min"] == 1 and stats["max"] == 4
    assert stats["quantiles"]["0.5"] == 2.5
    assert list(stats["quantiles"]) == [f"0.{i}" for i in range(1, 10)]


def test_build_with_reference_fills_scores(scored_cache: Path, tiny_teacher_dir: Path,
                                           tiny_reference_dir: Path):
    cache = open_cache(scored_cache)
    seq_ids, scores = cache.read_scores()
    input_ids = np.concatenate([cache.read_shard(i).input_ids for i in cache.shards])
    expected = brute_force_scores(input_ids, tiny_teacher_dir, tiny_reference_dir)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    score = cache.manifest.score
    assert score["reference"]["path"] == str(tiny_reference_dir)
    assert score["stats"]["count"] == len(seq_ids)
    assert score["stats"]["mean"] == pytest.approx(float(expected.mean()), abs=1e-4)


def test_rescore_changes_only_the_score_column(tmp_path: Path, scored_cache: Path,
                                               tiny_teacher_dir: Path):
    out = tmp_path / "cache"
    shutil.copytree(scored_cache, out)
    before = tables(out)
    manifest = rescore_cache(str(out), str(tiny_teacher_dir), dtype="fp32", progress=False)
    after = tables(out)
    for old, new in zip(before, after, strict=True):
        assert old.schema == new.schema
        for name in old.column_names:
            if name != "score":
                np.testing.assert_array_equal(column_values(old, name), column_values(new, name))
    # The teacher as its own reference: every difference is zero.
    _, scores = open_cache(out).read_scores()
    np.testing.assert_allclose(scores, 0.0, atol=1e-6)
    assert manifest.score["reference"]["path"] == str(tiny_teacher_dir)
    assert manifest.score["stats"]["max"] == pytest.approx(0.0, abs=1e-6)
    old_manifest = open_cache(scored_cache).manifest
    assert [s.sha256 for s in manifest.shards] != [s.sha256 for s in old_manifest.shards]
    assert manifest.totals["sequences"] == old_manifest.totals["sequences"]
    assert not (out / "rescore").exists()


def rescore_killed_on_second_shard(cache: Path, out: Path, reference: Path,
                                   monkeypatch) -> None:
    """A copy of CACHE at OUT whose rescore with REFERENCE was killed in its second shard."""
    shutil.copytree(cache, out)
    crash_on_second_shard(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated kill"):
        rescore_cache(str(out), str(reference), dtype="fp32", progress=False)
    monkeypatch.undo()


def test_rescore_resumes_after_a_crash(tmp_path: Path, tiny_cache: Path, scored_cache: Path,
                                       tiny_reference_dir: Path, monkeypatch):
    out = tmp_path / "cache"
    rescore_killed_on_second_shard(tiny_cache, out, tiny_reference_dir, monkeypatch)
    assert open_cache(out).manifest == open_cache(tiny_cache).manifest  # the old version, whole

    # The resume skips the shard finished before the crash (its marker) and rescores the rest.
    real_rescore_shard, written = score_module._rescore_shard, []

    def record_rescored(location, manifest, info, *rest):
        written.append(info.index)
        return real_rescore_shard(location, manifest, info, *rest)

    monkeypatch.setattr(score_module, "_rescore_shard", record_rescored)
    manifest = rescore_cache(str(out), str(tiny_reference_dir), dtype="fp32", progress=False)
    assert written == list(range(1, len(manifest.shards)))
    # Same reference and dtype as the scored build: the same scores and statistics.
    expected = open_cache(scored_cache)
    np.testing.assert_array_equal(open_cache(out).read_scores()[1], expected.read_scores()[1])
    assert manifest.score["stats"] == expected.manifest.score["stats"]


def test_a_damaged_rescore_journal_is_one_line_or_a_fresh_start(
        tmp_path: Path, tiny_cache: Path, scored_cache: Path, tiny_teacher_dir: Path,
        tiny_reference_dir: Path, monkeypatch):
    out = tmp_path / "cache"
    rescore_killed_on_second_shard(tiny_cache, out, tiny_reference_dir, monkeypatch)
    [journal] = (out / "rescore").glob("*/started.json")
    journal.write_text("{not json")
    with pytest.raises(CacheError, match="an interrupted `score` with reference .* is pending"):
        rescore_cache(str(out), str(tiny_teacher_dir), dtype="fp32", progress=False)
    rescore_cache(str(out), str(tiny_reference_dir), dtype="fp32", progress=False)
    np.testing.assert_array_equal(open_cache(out).read_scores()[1],
                                  open_cache(scored_cache).read_scores()[1])


def test_reference_with_another_tokenizer_is_refused(tmp_path: Path, tiny_cache: Path,
                                                     tiny_teacher_dir: Path):
    other = tmp_path / "other"
    shutil.copytree(tiny_teacher_dir, other)
    (other / "tokenizer.json").write_text('{"version": "1.0"}', encoding="utf-8")
    with pytest.raises(CacheError, match="tokenizer .* differs"):
        rescore_cache(str(tiny_cache), str(other), progress=False)
