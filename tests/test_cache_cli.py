from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MAX_TOKENS, TINY_SEQ_LEN, TINY_SHARD_ROWS, TINY_TOP_K
from helpers import brute_force_scores

from teacher_cache import open_cache
from teacher_cache.cli import build_parser, main
from teacher_cache.dataclass_cli import from_args


def tiny_args(out: Path, teacher: Path, corpus: Path | str) -> list[str]:
    return ["build", "--out", str(out), "--teacher", str(teacher), "--corpus", str(corpus),
            "--seq-len", str(TINY_SEQ_LEN), "--top-k", str(TINY_TOP_K), "--shard-rows",
            str(TINY_SHARD_ROWS), "--max-tokens", str(6 * TINY_SEQ_LEN), "--dtype", "fp32",
            "--no-progress"]


def test_help_documents_every_build_flag():
    result = subprocess.run([sys.executable, "-m", "teacher_cache", "build", "--help"],
                            capture_output=True, text=True, check=True)
    for flag in ("--corpus", "--teacher", "--out", "--max-tokens", "--seq-len", "--top-k",
                 "--backend", "--dataset", "--split", "--streaming", "--text-field",
                 "--batch-size", "--dtype", "--shard-rows", "--num-workers", "--worker-index",
                 "--overwrite", "--reference"):
        assert flag in result.stdout


def test_build_then_finalize_from_the_command_line(tmp_path: Path, tiny_teacher_dir: Path,
                                                   tiny_corpus_dir: Path, capsys):
    out = tmp_path / "cache"
    for worker in ("0", "1"):
        argv = tiny_args(out, tiny_teacher_dir, tiny_corpus_dir)
        assert main([*argv, "--num-workers", "2", "--worker-index", worker]) == 0
    assert "finalize" in capsys.readouterr().out
    assert main(["finalize", "--out", str(out)]) == 0
    assert "complete, 6 sequences in 2 shards" in capsys.readouterr().out
    assert open_cache(out).num_sequences == 6


@pytest.mark.parametrize("problem, expected", [
    ("missing", "missing.txt: no such file or directory"),
    ("bad-line", "bad.jsonl:1: malformed JSON line"),
    ("bad-field", "fields.jsonl:1: no field 'text'; fields here: body"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_2(tmp_path: Path, tiny_teacher_dir: Path,
                                                     capsys, problem: str, expected: str):
    (tmp_path / "bad.jsonl").write_text("{oops\n", encoding="utf-8")
    (tmp_path / "fields.jsonl").write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    corpus = {"missing": tmp_path / "missing.txt", "bad-line": tmp_path / "bad.jsonl",
              "bad-field": tmp_path / "fields.jsonl"}[problem]
    assert main(tiny_args(tmp_path / "cache", tiny_teacher_dir, corpus)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]


def test_finalize_of_an_empty_directory_exits_2(tmp_path: Path, capsys):
    assert main(["finalize", "--out", str(tmp_path)]) == 2
    assert "nothing was built here yet" in capsys.readouterr().err


def test_invalid_numbers_exit_2(tmp_path: Path, tiny_teacher_dir: Path, tiny_corpus_dir: Path,
                                capsys):
    argv = tiny_args(tmp_path / "cache", tiny_teacher_dir, tiny_corpus_dir)
    assert main([*argv, "--num-workers", "2", "--worker-index", "2"]) == 2
    assert "--worker-index must be in [0, 2)" in capsys.readouterr().err


def test_score_command_rescores_a_cache(tmp_path: Path, tiny_cache: Path, tiny_teacher_dir: Path,
                                        tiny_reference_dir: Path, capsys):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    argv = ["score", "--cache", str(out), "--reference", str(tiny_reference_dir), "--no-progress"]
    assert main(argv) == 0
    assert "rescored" in capsys.readouterr().out
    cache = open_cache(out)
    _, scores = cache.read_scores()
    input_ids = np.concatenate([cache.read_shard(i).input_ids for i in cache.shards])
    want = brute_force_scores(input_ids, tiny_teacher_dir, tiny_reference_dir)
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)


def test_sigkill_mid_build_then_rerun_gives_the_same_cache(tmp_path: Path, tiny_cache: Path,
                                                           tiny_teacher_dir: Path,
                                                           tiny_corpus_dir: Path):
    out = tmp_path / "cache"
    argv = tiny_args(out, tiny_teacher_dir, tiny_corpus_dir)
    argv[argv.index("--max-tokens") + 1] = str(TINY_MAX_TOKENS)
    command = [sys.executable, "-m", "teacher_cache", *argv]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_shard = out / "shards" / "shard-000000.json"
    while not first_shard.exists() and process.poll() is None:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists(), "the build finished before it could be killed"

    subprocess.run(command, check=True, capture_output=True)
    cache = open_cache(out)
    assert cache.manifest.shards == open_cache(tiny_cache).manifest.shards


def test_backend_options_reach_the_build_config(tmp_path: Path):
    args = build_parser().parse_args([
        "build", "--out", str(tmp_path), "--backend", "vllm",
        "--backend-option", "tensor_parallel_size=2", "--backend-option", "enforce_eager=true",
        "--backend-option", "kv_cache_dtype=fp8"])
    assert from_args(args).backend_options == {
        "tensor_parallel_size": 2, "enforce_eager": True, "kv_cache_dtype": "fp8"}


def test_malformed_backend_option_exits_2(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["build", "--out", str(tmp_path), "--backend-option", "no-equals-sign"])
    assert exit_info.value.code == 2
    assert "KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("targets, kind", [("sample:8", "sample"), ("topk:4", "top_k")])
def test_synth_writes_a_cache_of_the_real_format(tmp_path: Path, capsys, targets, kind):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--tokens", "5000", "--seq-len", "64",
                 "--shard-rows", "16", "--targets", targets, "--vocab-size", "512",
                 "--no-progress"]) == 0
    assert "78 sequences, 4,992 tokens in 5 shards" in capsys.readouterr().out
    cache = open_cache(out)
    assert cache.manifest.target_kind == kind and cache.manifest.top_k == int(targets[-1])
    assert main(["verify", "--cache", str(out)]) == 0
    batches = list(cache.iter_batches(16))
    assert sum(len(b) for b in batches) == 78 and max(b.topk_ids.max() for b in batches) < 512
    if kind == "sample":  # K draws per position: the counts sum to K
        for batch in batches:
            assert (np.rint(np.exp(batch.topk_logprobs[:, :-1]) * 8).sum(-1) == 8).all()
    capsys.readouterr()
    assert main(["synth", "--out", str(out), "--tokens", "5000"]) == 2
    assert "already holds a cache" in capsys.readouterr().err
