"""`python -m student_train`: bad input gets one clear message and exit code 2, before any step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import TINY_ARGS

from student_train.__main__ import build_parser, main
from student_train.config import TrainConfig
from teacher_cache.errors import ConfigError
from teacher_cache.synth import write_synthetic_cache


def run(cache, out, *extra) -> int:
    return main(["--cache", str(cache), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
                 *TINY_ARGS, *extra])


def expect_error(capsys, code: int, *fragments: str) -> None:
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--cache", "--student", "--out", "--max-steps", "--batch-size", "--grad-accum",
                 "--lr", "--warmup", "--ce-weight", "--kd-weight", "--divergence",
                 "--temperature", "--select", "--seed", "--eval-every", "--checkpoint-every",
                 "--resume", "--set"):
        assert flag in text


def test_choices_come_from_the_config_types_and_fail_at_parse_time(capsys):
    assert "--loss-impl {auto,reference,triton}" in build_parser().format_help()
    assert "--divergence {fkl,fkl_tail,rkl}" in build_parser().format_help()
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--cache", "c", "--out", "o", "--loss-impl", "trition"])
    assert exit_info.value.code == 2
    assert "--loss-impl: invalid choice: 'trition'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--loss-impl 'trition': choose one of auto, "):
        TrainConfig(cache="c", out="o", loss_impl="trition")


def test_a_good_run_exits_zero(cli_cache_dir, tmp_path):
    assert run(cli_cache_dir, tmp_path) == 0
    assert (tmp_path / "student" / "model.safetensors").exists()


def test_missing_cache(tmp_path, capsys):
    expect_error(capsys, run(tmp_path / "nowhere", tmp_path / "out"), "nowhere",
                 "no manifest.json")


def test_incomplete_cache(tmp_path, capsys):
    write_synthetic_cache(tmp_path / "cache", sequences=8, seq_len=8, top_k=2, vocab_size=64,
                          rows_per_shard=8, complete=False)
    expect_error(capsys, run(tmp_path / "cache", tmp_path / "out"), "incomplete")


def test_vocabulary_mismatch(cli_cache_dir, tmp_path, capsys):
    expect_error(capsys, run(cli_cache_dir, tmp_path, "--set", "vocab_size=100"),
                 "vocab_size 100", "64")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_corrupt_shard(cli_cache_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(cli_cache_dir, cache)
    shard = cache / "shards" / "shard-000001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    expect_error(capsys, run(cache, tmp_path / "out"), "shard-000001.arrow", "checksum")


@pytest.mark.parametrize("extra, message", [
    (["--set", "depth=3"], "--set depth"),
    (["--set", "hidden_size=big"], "--set hidden_size=big"),
    (["--student", "xxl"], "unknown student preset 'xxl'"),
    (["--select", "top:2"], "--select"),
    (["--select", "top:0.5"], "no score"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_settings(cli_cache_dir, tmp_path, capsys, extra, message):
    expect_error(capsys, run(cli_cache_dir, tmp_path, *extra), message)


def test_resume_with_other_settings_is_refused(cli_cache_dir, tmp_path, capsys):
    assert run(cli_cache_dir, tmp_path) == 0
    capsys.readouterr()
    expect_error(capsys, run(cli_cache_dir, tmp_path, "--resume", "--lr", "0.5"), "lr", "--resume")


def test_resume_of_a_finished_run_changes_nothing(cli_cache_dir, tmp_path):
    assert run(cli_cache_dir, tmp_path) == 0
    weights = Path(tmp_path / "student" / "model.safetensors").read_bytes()
    assert run(cli_cache_dir, tmp_path, "--resume") == 0
    assert Path(tmp_path / "student" / "model.safetensors").read_bytes() == weights


def test_a_corrupt_shard_read_by_a_dataloader_worker_is_one_line(tmp_path, capsys):
    write_synthetic_cache(tmp_path / "cache", sequences=40, seq_len=8, top_k=2, vocab_size=64,
                          rows_per_shard=4)
    shard = tmp_path / "cache" / "shards" / "shard-000003.arrow"
    shard.write_bytes(shard.read_bytes()[:-8] + bytes(8))
    code = run(tmp_path / "cache", tmp_path / "out", "--workers", "2", "--max-steps", "30",
               "--eval-every", "0")
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert "shard-000003.arrow: checksum mismatch" in err and "verify" in err
