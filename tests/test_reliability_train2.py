"""Training as a careless user or a busy machine runs it (issue 26): --overwrite on folders it did
not write, NaN, a resume on another cache, two runs on one --out, kills and full disks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest
import torch
from helpers import IGNORE, make_inputs
from safetensors import SafetensorError
from test_reliability_train import one_error_line, train

import student_train.checkpoint as checkpoint_module
import teacher_cache.synth as synth_module
from kernels import sparse_kd_loss
from kernels.choices import DIVERGENCES
from student_train.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from student_train.run_dir import (
    LOCK_FILE,
    METRICS_FILE,
    STUDENT_DIR,
    SUMMARY_FILE,
    RunLock,
    check_run_dir_path,
)
from teacher_cache.errors import ConfigError
from teacher_cache.synth import write_synthetic_cache


def error_line(capsys, code: int, *fragments: str) -> str:
    """The one line a run that trained some steps ends with (after its progress bar)."""
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n"), err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    for fragment in fragments:
        assert fragment in last, last
    return last


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} in JSON")
    return json.loads(text, parse_constant=refuse)


def run_files(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


# --- --overwrite deletes only what a run of this tool wrote ---

def test_overwrite_refuses_a_student_folder_this_tool_did_not_save(cli_cache_dir, tmp_path,
                                                                   capsys):
    out = tmp_path / "proj"
    (out / STUDENT_DIR).mkdir(parents=True)
    (out / STUDENT_DIR / "thesis.tex").write_text("years of work")
    one_error_line(capsys, train(cli_cache_dir, out, "--overwrite"), str(out / STUDENT_DIR),
                   "training.json", "move it away")
    assert (out / STUDENT_DIR / "thesis.tex").read_text() == "years of work"
    assert not (out / CHECKPOINT_FILE).exists()


def test_overwrite_never_deletes_or_writes_through_a_symbolic_link(cli_cache_dir, tmp_path,
                                                                   capsys):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    assert train(cli_cache_dir, elsewhere) == 0  # a real student, with its training.json
    before = run_files(elsewhere)
    capsys.readouterr()
    out.mkdir()
    (out / STUDENT_DIR).symlink_to(elsewhere / STUDENT_DIR)
    one_error_line(capsys, train(cli_cache_dir, out, "--overwrite"), str(out / STUDENT_DIR),
                   "symbolic link")
    one_error_line(capsys, train(cli_cache_dir, out, "--resume"), "symbolic link")
    assert run_files(elsewhere) == before


def test_a_run_directory_that_is_a_link_or_the_root_is_refused(cli_cache_dir, tmp_path, capsys):
    system = tmp_path / "etc"
    system.mkdir()
    (system / "passwd").write_text("root:x:0:0")
    (tmp_path / "run").symlink_to(system)
    one_error_line(capsys, train(cli_cache_dir, tmp_path / "run"), "symbolic link", str(system))
    assert sorted(p.name for p in system.iterdir()) == ["passwd"]
    # The root through the function, so that a regression cannot write into it.
    with pytest.raises(ConfigError, match="root of the filesystem"):
        check_run_dir_path(tmp_path.joinpath(*[".."] * len(tmp_path.parts)))
    inside = tmp_path / "linked-home"
    inside.symlink_to(tmp_path)  # a link above the run directory is fine
    assert train(cli_cache_dir, inside / "run2") == 0


def test_overwrite_refuses_a_checkpoint_of_another_tool(cli_cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"epoch": 3, "weights": torch.ones(2)}, out / CHECKPOINT_FILE)
    before = (out / CHECKPOINT_FILE).read_bytes()
    one_error_line(capsys, train(cli_cache_dir, out, "--overwrite"), str(out / CHECKPOINT_FILE),
                   "not a checkpoint of this version")
    assert (out / CHECKPOINT_FILE).read_bytes() == before


# --- NaN and inf ---

@pytest.mark.parametrize("lr, message", [("-1", "positive"), ("0", "positive"),
                                         ("nan", "finite"), ("inf", "finite")])
def test_a_learning_rate_that_is_not_positive_and_finite_is_one_line(cli_cache_dir, tmp_path,
                                                                     capsys, lr, message):
    one_error_line(capsys, train(cli_cache_dir, tmp_path / "run", "--lr", lr), "--lr", message)
    assert not (tmp_path / "run").exists()


def test_other_non_finite_flags_are_one_line(cli_cache_dir, tmp_path, capsys):
    one_error_line(capsys, train(cli_cache_dir, tmp_path, "--ce-weight", "nan"), "--ce-weight")


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_teacher_logprob_makes_the_loss_non_finite_like_its_gradient(
        impl, divergence, bad):
    if impl == "triton":
        pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_inputs(12, 8, 40, 4, seed=3)
    inputs.topk_logprobs[0, 1] = bad
    for counted in (True, False):
        inputs.labels[0] = 5 if counted else IGNORE
        h, w, *rest = (t.to(device) for t in inputs.args(torch.float32))
        h.retain_grad(), w.retain_grad()
        loss = sparse_kd_loss(h, w, *rest, divergence=divergence, impl=impl)
        loss.backward()
        finite = [bool(torch.isfinite(t).all()) for t in (loss, h.grad, w.grad)]
        assert finite == [not counted] * 3, (counted, finite)  # ignored rows may hold anything


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ce_only_ignores_the_teacher_columns_whatever_they_hold(impl, divergence):
    """kd_weight 0 is the CE of the labels, loss and gradient, even on the -inf slots of a
    sampled cache, where rkl is infinite (0 * inf would be NaN)."""
    if impl == "triton":
        pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_inputs(12, 8, 40, 4, seed=4)
    inputs.topk_logprobs[:, 2:] = float("-inf")
    grads = []
    for logprobs in (inputs.topk_logprobs, torch.zeros_like(inputs.topk_logprobs)):
        h, w, labels, ids, _ = (t.to(device) for t in inputs.args(torch.float32))
        h.retain_grad(), w.retain_grad()
        loss = sparse_kd_loss(h, w, labels, ids, logprobs.to(device), divergence=divergence,
                              kd_weight=0.0, impl=impl)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    ce = torch.nn.functional.cross_entropy((h @ w.T).detach().double(), labels.long(),
                                           ignore_index=IGNORE)
    assert float(grads[0][0]) == pytest.approx(float(ce), rel=1e-5)
    for first, second in zip(grads[0], grads[1], strict=True):  # the teacher takes no part
        assert torch.isfinite(first).all() and torch.equal(first, second)


def test_a_checkpoint_with_nan_weights_stops_at_its_first_step_and_keeps_the_run(
        cli_cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(cli_cache_dir, out) == 0
    state = load_checkpoint(out)
    next(iter(state["model"].values()))[0] = float("nan")
    save_checkpoint(out, state)
    before = run_files(out)
    capsys.readouterr()
    error_line(capsys, train(cli_cache_dir, out, "--resume", "--max-steps", "4"), str(out),
                   "diverged", "step 3", "checkpoint of step 2 is kept")
    assert run_files(out) == before


@contextmanager
def poisoned_teacher(value: float):
    """write_synthetic_cache writes VALUE into every teacher logprob of its second shard."""
    real = synth_module.encode_batch

    def encode(batch):
        if batch.seq_ids[0] > 0:
            batch.topk_logprobs[:] = value
        return real(batch)

    synth_module.encode_batch = encode
    try:
        yield
    finally:
        synth_module.encode_batch = real


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_teacher_logprobs_in_the_cache_stop_the_run_naming_the_step(tmp_path, capsys,
                                                                               bad):
    cache, out = tmp_path / "cache", tmp_path / "run"
    with poisoned_teacher(bad):
        write_synthetic_cache(cache, sequences=16, seq_len=8, top_k=2, vocab_size=64,
                              rows_per_shard=8)
    code = train(cache, out, "--max-steps", "8", "--checkpoint-every", "1", "--log-every", "1",
                 "--val-fraction", "0")
    err = error_line(capsys, code, "diverged", "at step")
    step = int(err.split("at step ")[1].split(";")[0])
    assert load_checkpoint(out) is None if step == 1 else load_checkpoint(out)["step"] == step - 1
    assert not (out / STUDENT_DIR).exists() and not (out / SUMMARY_FILE).exists()
    records = [strict_json(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, step))


def test_a_huge_learning_rate_never_writes_nan(cli_cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    error_line(capsys, train(cli_cache_dir, out, "--lr", "1e30", "--max-steps", "6",
                                 "--log-every", "1", "--checkpoint-every", "1"), "diverged")
    for line in (out / METRICS_FILE).read_text().splitlines():
        strict_json(line)
    assert not (out / STUDENT_DIR).exists() and not (out / SUMMARY_FILE).exists()
    state = load_checkpoint(out)
    assert state is None or all(torch.isfinite(t).all() for t in state["model"].values())


# --- --resume on another cache ---

def test_resume_follows_a_moved_cache_and_refuses_another_one(cli_cache_dir, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run"
    shutil.copytree(cli_cache_dir, cache)
    assert train(cache, out) == 0
    moved = tmp_path / "moved"
    cache.rename(moved)
    assert train(moved, out, "--resume", "--max-steps", "3") == 0

    other = tmp_path / "other"  # the same shape, another build (seed)
    write_synthetic_cache(other, sequences=24, seq_len=8, top_k=2, vocab_size=64,
                          rows_per_shard=8, seed=1)
    capsys.readouterr()
    error_line(capsys, train(other, out, "--resume", "--max-steps", "4"),
                   str(out / CHECKPOINT_FILE), "another cache", "build:")


def test_resume_on_another_vocabulary_is_one_line(cli_cache_dir, tmp_path, capsys):
    other, out = tmp_path / "other", tmp_path / "run"
    write_synthetic_cache(other, sequences=24, seq_len=8, top_k=2, vocab_size=48,
                          rows_per_shard=8)
    assert train(cli_cache_dir, out) == 0
    capsys.readouterr()
    error_line(capsys, train(other, out, "--resume", "--max-steps", "3"), "vocab_size: 64 -> 48")
    state = load_checkpoint(out)
    del state["cache"], state["student"]  # as a version that recorded neither wrote it
    save_checkpoint(out, state)
    error_line(capsys, train(other, out, "--resume", "--max-steps", "3"), "do not fit the student",
               "size mismatch")


# --- one run per run directory ---

def test_a_run_directory_in_use_is_refused_and_a_dead_runs_lock_taken_over(cli_cache_dir,
                                                                           tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid}
        (out / LOCK_FILE).write_text(json.dumps(lock))
        one_error_line(capsys, train(cli_cache_dir, out), "in use", f"pid {holder.pid}",
                       str(out / LOCK_FILE))
        assert sorted(os.listdir(out)) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    assert train(cli_cache_dir, out) == 0  # its holder is gone: taken over, then released
    assert not (out / LOCK_FILE).exists()

    (out / LOCK_FILE).write_text(json.dumps({"host": "another-machine", "pid": 1}))
    capsys.readouterr()
    one_error_line(capsys, train(cli_cache_dir, out, "--resume", "--max-steps", "3"),
                   "pid 1 on another-machine")


def test_two_runs_finding_the_same_dead_lock_do_not_both_take_it_over(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    judged, go = threading.Event(), threading.Event()
    stale = RunLock._stale

    def stale_then_wait(self, text):  # the first run pauses between its judgement and its move
        result = stale(self, text)
        if not judged.is_set():
            judged.set()
            go.wait(10)
        return result

    monkeypatch.setattr(RunLock, "_stale", stale_then_wait)
    outcomes = []

    def claim():
        try:
            outcomes.append(RunLock(out))
        except ConfigError as e:
            outcomes.append(e)

    first, second = threading.Thread(target=claim), threading.Thread(target=claim)
    first.start()
    assert judged.wait(10)
    second.start()
    second.join(0.5)  # time to take the dead lock over too, were it not one step
    go.set()
    first.join()
    second.join()
    held = [o for o in outcomes if isinstance(o, RunLock)]
    refused = [str(o) for o in outcomes if isinstance(o, ConfigError)]
    assert len(held) == 1 and len(refused) == 1 and "in use" in refused[0]
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    held[0].release()
    assert not (out / LOCK_FILE).exists()


def test_a_run_holds_its_lock_while_it_trains(cli_cache_dir, tmp_path, monkeypatch):
    import student_train.train as train_module

    out, seen = tmp_path / "run", []
    save = train_module.save_checkpoint

    def save_and_look(run_dir, state):
        seen.append(json.loads((out / LOCK_FILE).read_text()))
        save(run_dir, state)

    monkeypatch.setattr(train_module, "save_checkpoint", save_and_look)
    assert train(cli_cache_dir, out) == 0
    assert seen == [{"host": socket.gethostname(), "pid": os.getpid()}]
    assert not (out / LOCK_FILE).exists()


# --- kills and full disks ---

def test_stale_temp_files_of_a_killed_write_go_when_the_next_run_starts(cli_cache_dir, tmp_path):
    out = tmp_path / "run"
    assert train(cli_cache_dir, out) == 0
    (out / ".tmp-0123456789ab-checkpoint.pt").write_bytes(b"x" * 1000)
    (out / ".tmp-abcdef012345-student").mkdir()
    (out / ".tmp-abcdef012345-student" / "config.json").write_text("{}")
    (out / ".tmp-notes").write_text("not ours")
    assert train(cli_cache_dir, out, "--resume", "--max-steps", "3") == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".tmp-notes"]


def test_the_saved_student_gets_the_umasks_mode(cli_cache_dir, tmp_path):
    previous = os.umask(0o022)
    try:
        assert train(cli_cache_dir, tmp_path / "run") == 0
    finally:
        os.umask(previous)
    student = tmp_path / "run" / STUDENT_DIR
    assert student.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in student.iterdir()} == {
        p.name: 0o644 for p in student.iterdir()}


def test_a_full_disk_while_saving_the_student_keeps_the_previous_one(cli_cache_dir, tmp_path,
                                                                     capsys, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    out = tmp_path / "run"
    assert train(cli_cache_dir, out) == 0
    student = run_files(out / STUDENT_DIR)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(modeling_utils, "safe_save_file", full)
        error_line(capsys, train(cli_cache_dir, out, "--resume", "--max-steps", "3"),
                       f"cannot write the student {out / 'student'}", "No space left on device")
    assert run_files(out / STUDENT_DIR) == student
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert train(cli_cache_dir, out, "--resume", "--max-steps", "3") == 0
    assert strict_json((out / STUDENT_DIR / "training.json").read_text())["steps"] == 3


def test_a_full_disk_while_writing_a_checkpoint_is_one_line(cli_cache_dir, tmp_path, capsys,
                                                            monkeypatch):
    out = tmp_path / "run"
    assert train(cli_cache_dir, out) == 0
    before = (out / CHECKPOINT_FILE).read_bytes()
    real = checkpoint_module.atomic_output

    class FillsUp:  # a disk with room for 100 more bytes
        def __init__(self, file):
            self.file, self.room = file, 100

        def write(self, data):
            if len(data) > self.room:
                raise OSError(28, "No space left on device")
            self.room -= len(data)
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

    @contextmanager
    def full_disk(target, *args, **kwargs):
        with real(target, *args, **kwargs) as f:
            yield FillsUp(f)

    monkeypatch.setattr(checkpoint_module, "atomic_output", full_disk)
    capsys.readouterr()
    error_line(capsys, train(cli_cache_dir, out, "--resume", "--max-steps", "3"),
                   str(out / CHECKPOINT_FILE), "No space left on device")
    assert (out / CHECKPOINT_FILE).read_bytes() == before


def test_no_held_out_sequences_warn_once_and_write_no_nan(cli_cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(cli_cache_dir, out, "--val-fraction", "0", "--eval-every", "1") == 0
    assert capsys.readouterr().err.count("no held-out sequences") == 1
    summary = strict_json((out / SUMMARY_FILE).read_text())
    assert summary["val_ce"] is None
    assert strict_json((out / STUDENT_DIR / "training.json").read_text())["val_ce"] is None
    for line in (out / METRICS_FILE).read_text().splitlines():
        strict_json(line)
