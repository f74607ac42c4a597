"""MiniPLM difference sampling end to end: train a reference, score the cache, select the top rows.

Brute-force scores, tie-breaking and seeded random selection are in test_cache_score.py and
test_data_selection.py; this file covers what ties them together.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
from helpers import brute_force_scores, synthetic_cache
from torch.utils.data import DataLoader

from student_train.__main__ import main as train_main
from student_train.data import TrainStream, split_rows
from student_train.model import build_student, save_student
from student_train.run_dir import STUDENT_DIR, SUMMARY_FILE
from student_train.selection import Selection
from teacher_cache.build import build_cache
from teacher_cache.cli import main as cache_main
from teacher_cache.reader import open_cache
from teacher_cache.score import reference_entry, rescore_cache
from teacher_cache.teacher import resolve_teacher

SMALL_STUDENT = ["--student", "xs", "--set", "hidden_size=32", "--set", "num_hidden_layers=1",
                 "--set", "num_attention_heads=2", "--set", "num_key_value_heads=2",
                 "--set", "intermediate_size=64"]


def manifest_json(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def test_reference_trained_on_a_subset_scores_the_cache_and_top_selects(
        tmp_path: Path, tiny_cache: Path, tiny_teacher_dir: Path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    run = tmp_path / "reference"
    assert train_main(["--cache", str(cache), "--out", str(run), *SMALL_STUDENT,
                       "--kd-weight", "0", "--select", "random:0.5", "--seed", "1234",
                       "--max-steps", "3", "--batch-size", "2", "--val-fraction", "0.2",
                       "--eval-every", "0"]) == 0
    assert cache_main(["score", "--cache", str(cache), "--reference", str(run / STUDENT_DIR),
                       "--dtype", "fp32", "--no-progress"]) == 0

    manifest = open_cache(cache).manifest
    training = manifest.score["reference"]["training"]
    assert training == json.loads((run / SUMMARY_FILE).read_text())
    assert training["steps"] == 3 and training["kd_weight"] == 0.0
    assert training["tokens_seen"] == 3 * 2 * manifest.seq_len

    seq_ids, scores = open_cache(cache).read_scores()
    input_ids = np.concatenate([open_cache(cache).read_shard(i).input_ids
                                for i in manifest.shards])
    want = brute_force_scores(input_ids, tiny_teacher_dir, run / STUDENT_DIR)
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
    split = split_rows(open_cache(cache), 0.2, Selection.parse("top:0.5"), seed=0)
    candidates = np.setdiff1d(seq_ids, split.val)
    ranked = sorted(candidates.tolist(), key=lambda i: (-want[i], i))
    assert split.train.tolist() == sorted(ranked[:round(0.5 * len(candidates))])

    # A rerun (as `make cache` does) finds the cache scored by this reference and rewrites nothing.
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert cache_main(["score", "--cache", str(cache), "--reference", str(run / STUDENT_DIR),
                       "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == files


def test_a_saved_student_carries_its_training_summary_to_the_score(tmp_path: Path,
                                                                   tiny_cache: Path):
    from transformers import LlamaConfig

    manifest = open_cache(tiny_cache).manifest
    config = LlamaConfig(vocab_size=manifest.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    training = {"steps": 3, "select": "random:0.5"}
    # Any directory: the summary travels with the weights, not with the run's layout.
    model_dir = save_student(build_student(config, seed=0), tmp_path / "reference-model",
                             manifest, training=training)
    assert reference_entry(resolve_teacher(str(model_dir)))["training"] == training


def test_rescoring_changes_only_scores_checksums_and_score_stats(
        tmp_path: Path, tiny_cache: Path, tiny_reference_dir: Path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    before = manifest_json(cache)
    rescore_cache(str(cache), str(tiny_reference_dir), dtype="fp32", progress=False)
    after = manifest_json(cache)

    assert before["score"] is None
    assert after["score"]["reference"]["path"] == str(tiny_reference_dir)
    assert "training" not in after["score"]["reference"]  # not a student_train run
    assert after["score"]["stats"]["count"] == before["totals"]["sequences"]
    assert after["totals"] == before["totals"] | {"bytes": after["totals"]["bytes"]}
    for old, new in zip(before["shards"], after["shards"], strict=True):
        assert new == old | {"path": new["path"], "sha256": new["sha256"], "bytes": new["bytes"]}
    unchanged = set(before) - {"score", "totals", "shards", "index"}
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}
    # The row index names the new scores, and only the current index file is left.
    assert after["index"]["path"] != before["index"]["path"]
    assert sorted(p.name for p in cache.glob("index-*")) == [after["index"]["path"]]
    reader = open_cache(cache)
    index = reader.read_index()
    from_shards = np.concatenate([b.score for b in reader.iter_batches()])
    np.testing.assert_array_equal(index.scores, from_shards)
    assert not np.isnan(index.scores).any()


def test_top_rows_are_the_same_on_every_rank_and_after_resume(tmp_path: Path):
    scores = np.random.default_rng(0).permutation(40).astype(np.float32)
    split = split_rows(synthetic_cache(tmp_path, scores=scores), 0.2, Selection.parse("top:0.5"),
                       seed=0)

    def seen(rank: int, world_size: int, start_batch: int, count: int) -> list[list[int]]:
        stream = TrainStream(str(tmp_path), split.train, global_batch=4, rank=rank,
                             world_size=world_size, seed=0, shuffle_buffer=8,
                             start_batch=start_batch, parts=2)
        batches = itertools.islice(DataLoader(stream, batch_size=None), count)
        return [b.seq_ids.tolist() for b in batches]

    single = seen(0, 1, 0, 12)  # three epochs of the 16 kept rows
    assert set(itertools.chain(*single)) == set(split.train.tolist())
    ranks = [seen(r, 2, 0, 12) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*ranks, strict=True)] == [sorted(b) for b in single]
    assert seen(0, 1, 5, 7) == single[5:]


def test_rerunning_the_build_keeps_the_scores_of_a_rescored_cache(
        tmp_path: Path, tiny_cache: Path, tiny_build_config, tiny_reference_dir: Path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    scored = rescore_cache(str(cache), str(tiny_reference_dir), dtype="fp32", progress=False)
    summary = build_cache(tiny_build_config(cache))  # what `make cache` runs first
    assert summary.shards_built == 0
    assert summary.manifest.score == scored.score
    assert open_cache(cache).manifest.score == scored.score
