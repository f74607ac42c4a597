"""`python -m student_train`: bad input gets one clear message and exit code 2, before any step."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
from helpers import TINY_ARGS, assert_documents_every_field, corrupt_shard

from student_train import pretrain
from student_train.__main__ import build_parser, main
from student_train.checkpoint import CHECKPOINT_FILE
from student_train.config import TrainConfig
from student_train.run_dir import CONFIG_FILE, LOCK_FILE, METRICS_FILE, STUDENT_DIR, SUMMARY_FILE
from teacher_cache.dataclass_cli import from_args
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
    assert "usage: python -m student_train" in capsys.readouterr().out
    assert_documents_every_field(build_parser(), TrainConfig)
    assert_documents_every_field(pretrain.build_parser(), TrainConfig,
                                 skip=("student", "init", "resume"))  # set per run


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
    assert (tmp_path / STUDENT_DIR / "model.safetensors").exists()


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
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def test_corrupt_shard(cli_cache_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(cli_cache_dir, cache)
    corrupt_shard(cache, 1)
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
    weights = Path(tmp_path / STUDENT_DIR / "model.safetensors").read_bytes()
    assert run(cli_cache_dir, tmp_path, "--resume") == 0
    assert Path(tmp_path / STUDENT_DIR / "model.safetensors").read_bytes() == weights


def test_a_corrupt_shard_read_by_a_dataloader_worker_is_one_line(tmp_path, capsys):
    write_synthetic_cache(tmp_path / "cache", sequences=40, seq_len=8, top_k=2, vocab_size=64,
                          rows_per_shard=4)
    corrupt_shard(tmp_path / "cache", 3, tail=True)
    code = run(tmp_path / "cache", tmp_path / "out", "--workers", "2", "--max-steps", "30",
               "--eval-every", "0")
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert "shard-000003.arrow: checksum mismatch" in err and "verify" in err


def parse(*argv: str) -> TrainConfig:
    return from_args(build_parser().parse_args(list(argv)))


def test_a_config_file_sets_what_the_flags_do_and_the_flags_given_override_it(tmp_path):
    (tmp_path / "run.toml").write_text(
        'cache = "c"\nout = "o"\nmax_steps = 3\nlr = 0.5\ndivergence = "rkl"\nresume = true\n'
        '[overrides]\nhidden_size = "32"\n')
    config = parse("--config", str(tmp_path / "run.toml"), "--max-steps", "5", "--no-resume",
                   "--set", "num_hidden_layers=1")
    assert (config.cache, config.out, config.max_steps, config.lr) == ("c", "o", 5, 0.5)
    assert (config.divergence, config.resume) == ("rkl", False)
    assert config.overrides == {"hidden_size": "32", "num_hidden_layers": "1"}
    assert parse("--config", str(tmp_path / "run.toml"), "--out", "p").out == "p"


@pytest.mark.parametrize("text, message", [
    ('cache = "c"\nout = "o"\nmax_step = 3\n', "key 'max_step'"),
    ('cache = "c"\nout = "o"\nmax_steps = "ten"\n', "key 'max_steps': expected int, got 'ten'"),
    ('cache = "c"\nout = "o"\nlr = true\n', "key 'lr': expected float, got True"),
    ('cache = "c"\nout = "o"\ndivergence = "kl"\n', "key 'divergence': 'kl' is not one of fkl"),
    ('cache = "c"\nout = "o"\n[overrides]\nhidden_size = 32\n',
     "key 'overrides': expected str, got 32"),
    ("cache = \n", "not valid TOML"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_the_key(tmp_path, capsys, text,
                                                                   message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --config {path}: "), err
    assert message in err[0]


def test_a_yaml_config_reads_like_the_toml_and_a_missing_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("cache: c\nout: o\nlr: 1\noverrides: {hidden_size: '32'}\n")
    config = parse("--config", str(tmp_path / "run.yaml"))
    assert (config.cache, config.lr, config.overrides) == ("c", 1.0, {"hidden_size": "32"})
    assert main(["--config", str(tmp_path / "nowhere.toml")]) == 2
    assert capsys.readouterr().err == (f"error: --config {tmp_path / 'nowhere.toml'}: cannot read "
                                       f"it (No such file or directory)\n")


def test_required_flags_missing_from_flags_and_file_are_one_line(capsys):
    assert main(["--max-steps", "2"]) == 2
    assert capsys.readouterr().err == (
        "error: --cache, --out: required (as a flag or in --config FILE)\n")


def test_a_run_repeated_from_its_config_json_has_the_same_config(cli_cache_dir, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    assert run(cli_cache_dir, first, "--lr", "0.01", "--select", "random:0.5") == 0
    recorded = json.loads((first / "config.json").read_text())
    assert recorded == dataclasses.asdict(parse("--cache", str(cli_cache_dir), "--out", str(first),
                                                "--max-steps", "2", "--batch-size", "2",
                                                *TINY_ARGS, "--lr", "0.01",
                                                "--select", "random:0.5"))
    assert dataclasses.asdict(parse("--config", str(first / "config.json"))) == recorded
    assert main(["--config", str(first / "config.json"), "--out", str(again)]) == 0
    assert json.loads((again / "config.json").read_text()) == recorded | {"out": str(again)}
    losses = [[json.loads(line).get("loss") for line in (run_dir / METRICS_FILE).open()]
              for run_dir in (first, again)]
    assert losses[0] == losses[1]


class FakeSummaryWriter:
    """torch.utils.tensorboard.SummaryWriter's calls, recorded."""

    instances: list[FakeSummaryWriter] = []

    def __init__(self, log_dir: str):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        self.instances.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


def test_report_to_tensorboard_gets_every_metrics_record(cli_cache_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    FakeSummaryWriter.instances.clear()
    assert run(cli_cache_dir, tmp_path, "--report-to", "tensorboard", "--log-every", "1") == 0
    (writer,) = FakeSummaryWriter.instances
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.closed
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    want = [(key, value, r["step"]) for r in records for key, value in r.items()
            if key != "step" and isinstance(value, int | float)]
    assert writer.scalars == want
    assert ("loss", records[1]["loss"], 1) in writer.scalars and ("val_ce", records[0]["val_ce"],
                                                                    0) in writer.scalars


def test_report_to_wandb_logs_each_record_at_its_step(cli_cache_dir, tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                                 log=lambda data, step: calls.append(("log", data, step)),
                                 finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert run(cli_cache_dir, tmp_path, "--report-to", "wandb") == 0
    assert calls[0] == ("init", {"project": "distill", "name": tmp_path.name, "config": json.loads(
        (tmp_path / "config.json").read_text())})
    steps = [json.loads(line)["step"] for line in (tmp_path / METRICS_FILE).open()]
    assert [c[2] for c in calls if c[0] == "log"] == steps and calls[-1] == ("finish",)


def test_report_to_a_tracker_not_installed_says_what_to_install(cli_cache_dir, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trackio", None)  # import trackio raises ImportError
    expect_error(capsys, run(cli_cache_dir, tmp_path, "--report-to", "trackio"),
                 "--report-to trackio", "pip install trackio")


def test_the_run_directorys_names_are_the_documented_ones():
    """What the docs and users' scripts name; the other tests spell them by their constants."""
    assert (CHECKPOINT_FILE, METRICS_FILE, SUMMARY_FILE, CONFIG_FILE, STUDENT_DIR, LOCK_FILE) == (
        "checkpoint.pt", "metrics.jsonl", "summary.json", "config.json", "student", "run.lock")
