from __future__ import annotations

import argparse
import dataclasses
import json
import pkgutil
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import typing
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MAX_TOKENS, TINY_SEQ_LEN, TINY_SHARD_ROWS, TINY_TOP_K
from helpers import assert_documents_every_field, brute_force_scores

from teacher_cache import open_cache
from teacher_cache.build import BuildConfig
from teacher_cache.cli import build_parser, main
from teacher_cache.corpus import CorpusConfig, open_corpus
from teacher_cache.dataclass_cli import add_fields, from_args, leaves, option
from teacher_cache.errors import CorpusError


def tiny_args(out: Path, teacher: Path, corpus: Path | str) -> list[str]:
    return ["build", "--out", str(out), "--teacher", str(teacher), "--corpus", str(corpus),
            "--seq-len", str(TINY_SEQ_LEN), "--top-k", str(TINY_TOP_K), "--shard-rows",
            str(TINY_SHARD_ROWS), "--max-tokens", str(6 * TINY_SEQ_LEN), "--dtype", "fp32",
            "--no-progress"]


def test_help_documents_every_build_flag():
    result = subprocess.run([sys.executable, "-m", "teacher_cache", "build", "--help"],
                            capture_output=True, text=True, check=True)
    assert "usage: python -m teacher_cache build" in result.stdout
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"build", "finalize", "score", "synth", "verify"}
    assert_documents_every_field(commands["build"], BuildConfig)
    for name, command in commands.items():  # the others' flags too
        assert_documents_every_field(command, BuildConfig, skip=tuple(
            leaf.dest for leaf in leaves(BuildConfig)) if name != "build" else ())


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
    # fp32 as the oracle: auto is bf16 on a CPU with AMX tiles.
    argv = ["score", "--cache", str(out), "--reference", str(tiny_reference_dir), "--dtype", "fp32",
            "--no-progress"]
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


def parse(*argv: str) -> BuildConfig:
    return from_args(build_parser().parse_args(["build", *argv]))


def test_a_config_file_sets_the_build_and_the_flags_given_override_it(tmp_path: Path):
    (tmp_path / "cache.toml").write_text(
        'out = "runs/cache"\nseq_len = 64\nbackend_options = {enforce_eager = true}\n'
        '[corpus]\npaths = ["docs", "README.md"]\ntext_field = "body"\n')
    config = parse("--config", str(tmp_path / "cache.toml"), "--seq-len", "128",
                   "--backend-option", "tensor_parallel_size=2")
    assert (config.out, config.seq_len) == ("runs/cache", 128)
    assert config.corpus == CorpusConfig(paths=["docs", "README.md"], text_field="body")
    assert config.backend_options == {"enforce_eager": True, "tensor_parallel_size": 2}


@pytest.mark.parametrize("text, message", [
    ('out = "c"\n[corpus]\npath = ["docs"]\n', "unknown key 'corpus.path'"),
    ('out = "c"\ncorpus = "docs"\n', "key 'corpus': expected a table"),
    ('out = "c"\nbackend = "jax"\n', "key 'backend': 'jax' is not one of torch, vllm"),
    ('out = "c"\n[corpus]\npaths = "docs"\n', "key 'corpus.paths': expected a list"),
])
def test_a_bad_build_config_is_one_line_naming_the_file_and_the_key(tmp_path: Path, capsys, text,
                                                                    message):
    path = tmp_path / "cache.toml"
    path.write_text(text)
    assert main(["build", "--config", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --config {path}: ") and message in err[0]


def test_build_json_records_the_config_and_a_build_repeated_from_it_resumes(
        tmp_path: Path, tiny_cache: Path, tiny_build_config, capsys):
    record = json.loads((tiny_cache / "build.json").read_text())
    assert record["config"] == dataclasses.asdict(tiny_build_config(tiny_cache))
    assert parse("--config", str(tiny_cache / "build.json")) == tiny_build_config(tiny_cache)
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    assert main(["build", "--config", str(out / "build.json"), "--out", str(out)]) == 0
    assert "built 0 shards" in capsys.readouterr().out


def test_dataset_config_files_and_revision_reach_load_dataset_and_the_fingerprint(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or [{"text": "x"}])
    monkeypatch.setattr("teacher_cache.corpus.hub_unreachable", lambda: None)
    argv = ["--out", "c", "--dataset", "org/corpus", "--dataset-config", "en", "--data-files",
            "a.jsonl", "b.jsonl", "--revision", "v1", "--split", "test"]
    corpus = open_corpus(parse(*argv).corpus)
    corpus.check_first_documents()
    assert calls == [(("org/corpus",), {"split": "test", "streaming": False, "name": "en",
                                        "data_files": ["a.jsonl", "b.jsonl"], "revision": "v1"})]
    assert corpus.description == "dataset:org/corpus:test:text:name=en:data_files=a.jsonl,b.jsonl" \
                                 ":revision=v1"
    fingerprints = {open_corpus(parse(*argv[:-4], *changed).corpus).fingerprint()
                    for changed in (["--revision", "v1"], ["--revision", "v2"], [])}
    assert len(fingerprints) == 3 and corpus.fingerprint() in fingerprints
    assert open_corpus(parse("--out", "c", "--dataset", "org/corpus").corpus).fingerprint() is None
    with pytest.raises(CorpusError, match="need --dataset"):
        parse("--out", "c", "--revision", "v1")


def test_the_console_scripts_are_the_mains_of_python_m():
    import student_train.__main__
    import teacher_cache.cli

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
        "project"]["scripts"]
    assert pkgutil.resolve_name(scripts["distill-cache"]) is teacher_cache.cli.main
    assert pkgutil.resolve_name(scripts["distill-train"]) is student_train.__main__.main


@dataclasses.dataclass
class Inner:
    names: list[str] = option([], "names (default: none)")
    level: int | None = option(None, "a level (default: none)")


@dataclasses.dataclass
class Outer:
    path: str = option(help="where")
    mode: typing.Literal["a", "b"] = option("a", "the mode")
    ratio: float | None = option(None, "a ratio (default: none)")
    options: dict[str, typing.Any] = option({}, "options (default: none)", flag="--option")
    inner: Inner = dataclasses.field(default_factory=Inner)
    quiet: bool = option(False, "say less")


def test_the_generator_reads_resolved_optional_literal_list_map_and_nested_fields():
    parser = argparse.ArgumentParser()
    add_fields(parser, Outer)
    args = parser.parse_args(["--path", "p", "--mode", "b", "--ratio", "0.5", "--option", "n=2",
                              "--option", "s=x", "--names", "u", "v", "--level", "3", "--quiet"])
    assert from_args(args) == Outer("p", "b", 0.5, {"n": 2, "s": "x"}, Inner(["u", "v"], 3), True)
    assert from_args(parser.parse_args(["--path", "p"])) == Outer("p")
    text = parser.format_help()
    assert "--mode {a,b}" in text and "(default: --no-quiet)" in text
    assert_documents_every_field(parser, Outer)
