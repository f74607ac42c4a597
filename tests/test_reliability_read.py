"""Reliability of the read and score side: interrupted `score`, confined shard paths, reading while
`score` runs, `verify --repair`, damaged manifests and references (docs/reliability.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import corrupt_shard, crash_on_second_shard, synthetic_cache

from teacher_cache import CacheError, open_cache
from teacher_cache.build import build_cache
from teacher_cache.cli import main
from teacher_cache.format import ShardInfo
from teacher_cache.score import is_scored_by, rescore_cache
from teacher_cache.storage import resolve
from teacher_cache.teacher import resolve_teacher


def rescore(cache: Path, reference: Path) -> None:
    rescore_cache(str(cache), str(reference), dtype="fp32", progress=False)


def edit_manifest(cache: Path, edit) -> None:
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(edit(manifest)))


def arrow_files(cache: Path) -> set[str]:
    return {p.name for p in (cache / "shards").glob("*.arrow")}


def test_an_interrupted_score_changes_nothing_and_resumes_only_with_its_reference(
        tmp_path: Path, scored_cache: Path, tiny_build_config, tiny_teacher_dir: Path,
        tiny_reference_dir: Path, monkeypatch):
    out = tmp_path / "cache"
    shutil.copytree(scored_cache, out)
    before = open_cache(out).read_scores()
    crash_on_second_shard(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated kill"):
        rescore(out, tiny_teacher_dir)  # reference A: the teacher itself
    monkeypatch.undo()
    # All or nothing: the cache is still complete, with R's scores in every row.
    np.testing.assert_array_equal(open_cache(out).read_scores()[1], before[1])
    # What the old error message advised: rerun the build. It has nothing to do.
    assert build_cache(tiny_build_config(out, reference=str(tiny_reference_dir))).shards_built == 0
    np.testing.assert_array_equal(open_cache(out).read_scores()[1], before[1])
    with pytest.raises(CacheError, match=f"interrupted `score` with reference {tiny_teacher_dir}"):
        rescore(out, tiny_reference_dir)

    rescore(out, tiny_teacher_dir)  # resumes; the teacher as its own reference scores 0
    cache = open_cache(out)
    np.testing.assert_allclose(cache.read_scores()[1], 0.0, atol=1e-6)
    assert arrow_files(out) == {Path(s.path).name for s in cache.shards}
    assert not (out / "rescore").exists()
    rescore(out, tiny_reference_dir)  # and back: every row is R's again
    np.testing.assert_allclose(open_cache(out).read_scores()[1], before[1], rtol=1e-6)


def test_is_scored_by_checks_every_shard_not_the_manifest_alone(
        tmp_path: Path, scored_cache: Path, tiny_teacher_dir: Path, tiny_reference_dir: Path):
    out = tmp_path / "cache"
    shutil.copytree(scored_cache, out)
    claim = open_cache(out).manifest.score["reference"]
    before = open_cache(out).read_scores()[1]
    rescore(out, tiny_teacher_dir)
    # The end state of the reported bug: the manifest names R, the shards hold A's scores.
    edit_manifest(out, lambda m: m | {"score": m["score"] | {"reference": claim}})
    reference = resolve_teacher(str(tiny_reference_dir))
    assert not is_scored_by(resolve(out), open_cache(out).manifest, reference)
    rescore(out, tiny_reference_dir)
    assert is_scored_by(resolve(out), open_cache(out).manifest, reference)
    np.testing.assert_allclose(open_cache(out).read_scores()[1], before, rtol=1e-6)


def test_a_reader_keeps_reading_while_score_rewrites_the_cache(
        tmp_path: Path, tiny_cache: Path, tiny_reference_dir: Path, monkeypatch):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    reader = open_cache(out)  # e.g. a training run, opened before `score` starts
    expected = [open_cache(tiny_cache).read_shard(i) for i in range(len(reader.shards))]
    crash_on_second_shard(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated kill"):
        rescore(out, tiny_reference_dir)
    monkeypatch.undo()
    np.testing.assert_array_equal(reader.read_shard(0).topk_ids, expected[0].topk_ids)
    rescore(out, tiny_reference_dir)  # finishes: the files the reader opened are gone

    for i, rows in enumerate(expected[1:], start=1):
        got = reader.read_shard(i)
        np.testing.assert_array_equal(got.input_ids, rows.input_ids)
        np.testing.assert_array_equal(got.topk_logprobs, rows.topk_logprobs)
    _, scores = reader.read_scores()  # one version: every row scored by the reference
    assert not np.isnan(scores).any()


def test_shard_paths_outside_the_cache_are_refused(tmp_path: Path):
    synthetic_cache(tmp_path / "cache")
    outside = tmp_path / "other"
    outside.mkdir()
    shutil.copy(tmp_path / "cache" / "shards" / "shard-000000.arrow", outside)
    for path in ("../other/shard-000000.arrow", str(outside / "shard-000000.arrow"),
                 "shards/../../other/shard-000000.arrow"):
        edit_manifest(tmp_path / "cache", lambda m, p=path: m | {
            "shards": [m["shards"][0] | {"path": p}, *m["shards"][1:]]})
        with pytest.raises(CacheError, match="not a path inside the cache directory"):
            open_cache(tmp_path / "cache").read_shard(0)
    with pytest.raises(CacheError, match="not a path inside"):  # and on write
        ShardInfo(index=0, path="../x.arrow", rows=1, tokens=1, sha256="", bytes=0,
                  first_seq_id=0)
    with pytest.raises(CacheError, match="not a path inside"):
        resolve(tmp_path / "cache").write_bytes_atomic(b"x", "..", "escaped.json")
    assert not (tmp_path / "escaped.json").exists()


def test_verify_repair_drops_a_corrupt_shard_and_the_build_rebuilds_only_it(
        tmp_path: Path, tiny_cache: Path, tiny_build_config, capsys):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    corrupt_shard(out, 1, tail=True)
    with pytest.raises(CacheError, match="checksum mismatch.*verify --cache .* --repair"):
        open_cache(out).read_shard(1)

    assert main(["verify", "--cache", str(out)]) == 1
    assert "bad shard 1 (shards/shard-000001.arrow): checksum mismatch" in capsys.readouterr().out
    assert main(["verify", "--cache", str(out), "--repair"]) == 0
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(out)
    summary = build_cache(tiny_build_config(out))
    assert (summary.shards_built, summary.shards_skipped) == (1, 3)
    assert open_cache(out).manifest.shards == open_cache(tiny_cache).manifest.shards
    assert main(["verify", "--cache", str(out)]) == 0


@pytest.mark.parametrize("edit, message", [
    (lambda m: [], "a manifest is a JSON object"),
    (lambda m: m | {"colour": "red"}, "unknown field 'colour'"),
    (lambda m: m | {"seq_len": "4"}, "seq_len = '4' is not a positive integer"),
    (lambda m: m | {"shards": [m["shards"][0] | {"extra": 1}]}, "shards\\[0\\]: a shard entry"),
    (lambda m: m | {"shards": {}}, "shards is not a list"),
    (lambda m: m | {"vocab_size": 10**12}, "vocab_size 1,000,000,000,000 is more than"),
    (lambda m: m | {"shards": [m["shards"][0], m["shards"][0], *m["shards"][1:]]},
     "shards\\[1\\] \\(shard 0, seq_ids from 0\\) repeats or overlaps shards\\[0\\]"),
])
def test_a_manifest_of_the_wrong_structure_is_one_line(tmp_path: Path, edit, message, capsys):
    synthetic_cache(tmp_path)
    edit_manifest(tmp_path, edit)
    with pytest.raises(CacheError, match=message):
        open_cache(tmp_path)
    assert main(["verify", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.json" in err[0]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m | {"top_k": 3}, "column topk_ids holds 8 values per row.*top_k 3 need 12"),
    (lambda m: m | {"seq_len": 5}, "column input_ids holds 4 values per row"),
    (lambda m: m | {"vocab_size": 8}, "holds token id .* vocab_size is 8"),
])
def test_a_manifest_that_does_not_match_its_shards_is_refused(tmp_path: Path, edit, message):
    synthetic_cache(tmp_path, seq_len=4, top_k=2, vocab_size=32)
    edit_manifest(tmp_path, edit)
    with pytest.raises(CacheError, match=message):
        next(iter(open_cache(tmp_path)))


def test_score_with_a_smaller_vocabulary_is_refused_before_touching_the_cache(
        tmp_path: Path, tiny_cache: Path, tiny_reference_dir: Path, capsys):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small"
    tokenizer = AutoTokenizer.from_pretrained(tiny_reference_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer) - 64, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).save_pretrained(small)
    tokenizer.save_pretrained(small)
    capsys.readouterr()  # the save's progress bar
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    manifest = (out / "manifest.json").read_bytes()
    assert main(["score", "--cache", str(out), "--reference", str(small), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocabulary" in err[0] and str(small) in err[0]
    assert (out / "manifest.json").read_bytes() == manifest
    assert not (out / "rescore").exists()


def test_a_rerun_of_finalize_on_a_rescored_cache_keeps_its_score(
        tmp_path: Path, tiny_cache: Path, tiny_reference_dir: Path):
    from teacher_cache.finalize import finalize_cache

    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    rescore(out, tiny_reference_dir)
    scored = open_cache(out)
    finalize_cache(str(out))
    again = open_cache(out)
    assert again.manifest.score == scored.manifest.score
    assert again.manifest.shards == scored.manifest.shards
    np.testing.assert_array_equal(again.read_index().scores, scored.read_index().scores)
    assert not np.isnan(again.read_index().scores).any()


@pytest.mark.parametrize("target", [".", "manifest.json", "shards", "index"])
def test_a_cache_every_user_can_write_is_refused_in_one_line(tmp_path: Path, target, capsys):
    cache = tmp_path / "cache"
    synthetic_cache(cache)
    path = next(cache.glob("index-*")) if target == "index" else cache / target
    path.chmod(path.stat().st_mode | 0o002)
    with pytest.raises(CacheError, match="writable by every user") as error:
        open_cache(cache)
    assert str(path) in str(error.value) and "chmod -R o-w" in str(error.value)
    path.chmod(path.stat().st_mode & ~0o002)
    assert open_cache(cache).num_sequences > 0
