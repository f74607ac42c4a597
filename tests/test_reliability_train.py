"""Training as a hostile or unlucky user runs it: crafted checkpoints, reruns over finished runs."""

from __future__ import annotations

import json
import pathlib
import random
import shutil

import numpy as np
import pytest
import torch
from helpers import TINY_ARGS

from student_train.__main__ import main as train_main
from student_train.checkpoint import (
    CHECKPOINT_FILE,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from student_train.pretrain import main as pretrain_main
from student_train.run_dir import STUDENT_DIR, SUMMARY_FILE


def train(cache, out, *extra) -> int:
    return train_main(["--cache", str(cache), "--out", str(out), "--max-steps", "2",
                       "--batch-size", "2", *TINY_ARGS, *extra])


def one_error_line(capsys, code: int, *fragments: str) -> str:
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


class TouchOnLoad:
    """Unpickling this calls Path.touch(marker): a stand-in for any command a crafted file runs."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("kind, message", [
    ("crafted", "objects other than tensors"),
    ("older_version", "objects other than tensors"),  # pickled numpy RNG state, as before
    ("no_format", "checkpoint format None"),
    ("torn", "unreadable"),
])
def test_resume_refuses_a_checkpoint_that_does_not_load_safely(cli_cache_dir, tmp_path, capsys,
                                                               kind, message):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    out.mkdir()
    checkpoint = out / CHECKPOINT_FILE
    if kind in ("crafted", "torn"):
        torch.save({"step": 1, "model": TouchOnLoad(marker)}, checkpoint)
    elif kind == "older_version":
        torch.save({"step": 1, "rng": {"numpy": np.random.get_state()}}, checkpoint)
    else:
        torch.save({"step": 1}, checkpoint)
    if kind == "crafted":  # the payload is live: an unrestricted load runs it
        torch.load(checkpoint, weights_only=False)
        assert marker.exists()
        marker.unlink()
    if kind == "torn":
        checkpoint.write_bytes(checkpoint.read_bytes()[:100])

    one_error_line(capsys, train(cli_cache_dir, out, "--resume"), str(checkpoint), message,
                   "move it away")
    assert not marker.exists()
    assert not (out / STUDENT_DIR).exists()


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.normal()  # leaves a cached Gaussian in numpy's state
    save_checkpoint(tmp_path, {"rng": rng_state()})
    expected = (random.random(), np.random.normal(), np.random.randint(1 << 30), torch.rand(3))
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)  # loads without error
    set_rng_state(state["rng"])
    got = (random.random(), np.random.normal(), np.random.randint(1 << 30), torch.rand(3))
    assert got[:3] == expected[:3]
    torch.testing.assert_close(got[3], expected[3], rtol=0, atol=0)
    assert load_checkpoint(tmp_path)["format"] == 2


def test_a_finished_run_is_not_replaced_without_resume_or_overwrite(cli_cache_dir, tmp_path,
                                                                    capsys):
    out = tmp_path / "run"
    assert train(cli_cache_dir, out) == 0
    weights = (out / STUDENT_DIR / "model.safetensors").read_bytes()
    summary = json.loads((out / SUMMARY_FILE).read_text())
    capsys.readouterr()

    one_error_line(capsys, train(cli_cache_dir, out, "--max-steps", "1"), str(out),
                   "checkpoint.pt and student", "--resume", "--overwrite")
    assert (out / STUDENT_DIR / "model.safetensors").read_bytes() == weights
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary

    # Only the student left (checkpoint deleted): still a run.
    (out / CHECKPOINT_FILE).unlink()
    one_error_line(capsys, train(cli_cache_dir, out), str(out), "(student)")
    one_error_line(capsys, train(cli_cache_dir, out, "--resume", "--overwrite"), "--overwrite")

    assert train(cli_cache_dir, out, "--overwrite", "--max-steps", "3") == 0
    assert json.loads((out / SUMMARY_FILE).read_text())["steps"] == 3
    assert load_checkpoint(out)["step"] == 3


def test_resume_with_other_settings_names_the_run(cli_cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(cli_cache_dir, out) == 0
    capsys.readouterr()
    one_error_line(capsys, train(cli_cache_dir, out, "--resume", "--batch-size", "4"), str(out),
                   "batch_size: 2 -> 4")


def pretrain(cache, out) -> int:
    return pretrain_main(["--cache", str(cache), "--students", "xs", "--out", str(out),
                          "--max-steps", "4", "--eval-every", "2", *TINY_ARGS])


def test_rerunning_pretrain_keeps_the_finished_runs_measured_figures(cli_cache_dir, tmp_path,
                                                                     capsys):
    out = tmp_path / "pretrain"
    assert pretrain(cli_cache_dir, out) == 0
    run = out / "xs"
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    first = json.loads((out / "results.json").read_text())[0]
    assert first["tokens_per_s"] > 0 and first["train_seconds"] > 0
    capsys.readouterr()

    assert pretrain(cli_cache_dir, out) == 0
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    assert json.loads((out / "results.json").read_text())[0] == first
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("xs "))
    assert row.endswith(f"{first['tokens_per_s']:,.0f}")
    assert "already trained" in printed


def test_a_run_killed_before_its_summary_reports_the_checkpointed_figures(cli_cache_dir, tmp_path):
    out = tmp_path / "pretrain"
    assert pretrain(cli_cache_dir, out) == 0
    run = out / "xs"
    checkpointed = load_checkpoint(run)["train_seconds"]
    assert checkpointed > 0
    (run / SUMMARY_FILE).unlink()
    shutil.rmtree(run / STUDENT_DIR)

    assert pretrain(cli_cache_dir, out) == 0
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["train_seconds"] == checkpointed
    assert summary["tokens_per_s"] == pytest.approx(4 * 2 * 8 / checkpointed)
