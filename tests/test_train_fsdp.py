"""--parallel fsdp and --activation-checkpointing: the same run as one process and as DDP, sharded
checkpoints that resume exactly (on another number of ranks too), the gathered student."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_files
from helpers import (
    TINY,
    TRAINING_FIGURES,
    assert_same_run,
    cli_flags,
    one_thread_env,
    tiny_config,
    torchrun,
    torchrun_command,
    train_until_killed,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig

import student_train.checkpoint as checkpoint_module
from student_train.__main__ import main
from student_train.checkpoint import CHECKPOINT_FILE, SHARDS_DIR, load_checkpoint
from student_train.config import ConfigError
from student_train.model import DistillationObjective, build_student
from student_train.run_dir import STUDENT_DIR, SUMMARY_FILE
from student_train.runtime import checkpoint_activations, decoder_layers
from student_train.train import train

# Two decoder layers: one FSDP unit that reshards after its forward, one that does not. Five
# held-out rows over two ranks in batches of two: rank 0 runs two batches, rank 1 one and an empty
# one (every FSDP forward is a collective). Two micro-steps: the first without gradient sync.
SETTINGS = dict(overrides=TINY | {"num_hidden_layers": "2"}, max_steps=3, eval_every=2,
                val_max_rows=5, eval_batch_size=2, grad_accum=2)
FIGURES = (*TRAINING_FIGURES, "grad_norm", "val_ce", "val_kl", "val_top1")


@pytest.mark.slow
def test_fsdp_matches_ddp_and_one_process_with_and_without_activation_checkpointing(
        cache_dir, tmp_path):
    # One process reading the two data parts that two ranks read.
    train(tiny_config(cache_dir, tmp_path / "single", data_parts=2, **SETTINGS))
    runs = {"fsdp": {"parallel": "fsdp"},
            "fsdp-selective-compiled": {"parallel": "fsdp", "activation_checkpointing": "selective",
                                        "compile": "on", "compile_backend": "aot_eager"},
            "ddp-full": {"activation_checkpointing": "full"}}
    for name, options in runs.items():
        result = torchrun(tiny_config(cache_dir, tmp_path / name, **SETTINGS, **options))
        assert ("2 rank(s) on cpu, FSDP" in result.stdout) == name.startswith("fsdp")
    # Measured: at most 1.2e-7 relative on the figures (grad_norm included: the global norm over
    # the shards) and 2.0e-7 absolute on the weights, against one process and between FSDP and
    # DDP (the ranks' float sums in another order); the bounds are ~15x that.
    for name in runs:
        assert_same_run(tmp_path / "single", tmp_path / name, FIGURES, rel=2e-6, atol=3e-6)
    assert_same_run(tmp_path / "ddp-full", tmp_path / "fsdp", FIGURES, rel=2e-6, atol=3e-6)
    # The gathered student is a plain Hugging Face model: the DDP student's logits.
    ids = torch.arange(16)[None]
    fsdp, ddp = (AutoModelForCausalLM.from_pretrained(tmp_path / run / STUDENT_DIR)
                 for run in ("fsdp", "ddp-full"))
    with torch.no_grad():
        torch.testing.assert_close(fsdp(input_ids=ids).logits, ddp(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    assert fsdp.lm_head.weight is fsdp.model.embed_tokens.weight  # still tied
    # Each rank wrote its own shards; checkpoint.pt names them and holds no weights.
    checkpoint = load_checkpoint(tmp_path / "fsdp")
    assert "model" not in checkpoint and "optimizer" not in checkpoint
    shards = tmp_path / "fsdp" / SHARDS_DIR / checkpoint["shards"]
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert [p.name for p in (tmp_path / "fsdp" / SHARDS_DIR).iterdir()] == [shards.name]


@pytest.mark.slow
def test_a_sharded_checkpoint_of_two_ranks_resumes_on_one(cache_dir, tmp_path):
    # The learning rate of the first 4 steps is the warmup's, whatever max_steps: the run of 4
    # steps on two ranks is the first half of the run of 8 on one.
    settings = dict(SETTINGS, max_steps=8, warmup=4, parallel="fsdp", checkpoint_every=4)
    train(tiny_config(cache_dir, tmp_path / "straight", data_parts=2, **settings))
    torchrun(tiny_config(cache_dir, tmp_path / "resumed", **(settings | {"max_steps": 4})))
    train(tiny_config(cache_dir, tmp_path / "resumed", resume=True, **settings))
    # Measured: 1.2e-7 relative on the figures, 2.9e-7 absolute on the weights.
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", FIGURES, rel=2e-6, atol=3e-6)


def children(pid: int) -> list[int]:
    return [int(child) for path in Path(f"/proc/{pid}/task").glob("*/children")
            for child in path.read_text().split()]


@pytest.mark.slow
def test_two_fsdp_ranks_killed_with_sigkill_resume_exactly(cache_dir, tmp_path):
    settings = dict(SETTINGS, max_steps=60, eval_every=0, checkpoint_every=5, log_every=10,
                    parallel="fsdp")
    torchrun(tiny_config(cache_dir, tmp_path / "straight", **settings))
    out = tmp_path / "resumed"
    # Both ranks killed as soon as a first checkpoint is there: mid-step, or while they write the
    # next one. (torchrun then ends, having reaped them.)
    run = subprocess.Popen(torchrun_command(tiny_config(cache_dir, out, **settings)),
                           env=one_thread_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / CHECKPOINT_FILE).exists():
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    ranks = children(run.pid)
    assert len(ranks) == 2
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    assert run.wait(timeout=60) != 0
    assert not (out / SUMMARY_FILE).exists()  # killed before the end
    torchrun(tiny_config(cache_dir, out, resume=True, **settings))
    # The same ranks summing in the same order: equal to the last bit.
    assert_same_run(tmp_path / "straight", out, FIGURES, rel=0, atol=0)


def test_fsdp_killed_after_a_checkpoint_or_inside_one_resumes_exactly(cache_dir, tmp_path,
                                                                       monkeypatch):
    settings = dict(SETTINGS, max_steps=8, parallel="fsdp", checkpoint_every=2)
    train(tiny_config(cache_dir, tmp_path / "straight", **settings))
    killed = tiny_config(cache_dir, tmp_path / "resumed", **settings)
    train_until_killed(killed, monkeypatch, at_step=4)

    # Killed while the shards of step 6 are written: the checkpoint of step 4 stays.
    def save_then_crash(state_dict, checkpoint_id):
        real_save(state_dict, checkpoint_id=checkpoint_id)
        raise KeyboardInterrupt

    real_save = checkpoint_module.dcp.save
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module.dcp, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(cache_dir, tmp_path / "resumed", resume=True, **settings))
    shards = tmp_path / "resumed" / SHARDS_DIR
    assert load_checkpoint(tmp_path / "resumed")["step"] == 4
    assert len(list(shards.iterdir())) == 2  # step 4's, and step 6's that none names

    summary = train(tiny_config(cache_dir, tmp_path / "resumed", resume=True, **settings))
    assert summary["steps"] == 8
    assert [p.name for p in shards.iterdir()] == [load_checkpoint(tmp_path / "resumed")["shards"]]
    # One process: the same sums as the straight run, equal to the last bit.
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", FIGURES, rel=0, atol=0)


def assert_one_line(capsys, *expected: str) -> None:
    """The error is one line of stderr (after the progress bar, if training had started)."""
    *bar, line = capsys.readouterr().err.strip().split("\n")  # the bar redraws itself with \r
    assert line.startswith("error: ") and len(bar) <= 1, (bar, line)
    assert all(text in line for text in expected), line


def test_a_damaged_or_missing_sharded_checkpoint_is_one_line(cache_dir, tmp_path, capsys):
    train(tiny_config(cache_dir, tmp_path, max_steps=2, eval_every=0, parallel="fsdp"))
    shards = tmp_path / SHARDS_DIR / load_checkpoint(tmp_path)["shards"]
    resume = cli_flags(tiny_config(cache_dir, tmp_path, max_steps=4, eval_every=0,
                                   parallel="fsdp", resume=True))
    capsys.readouterr()
    (shards / "__0_0.distcp").write_bytes((shards / "__0_0.distcp").read_bytes()[:100])
    assert main(resume) == 2
    assert_one_line(capsys, f"{shards}: the sharded weights", "are unreadable (", "--overwrite")
    (shards / ".metadata").unlink()
    assert main(resume) == 2
    assert_one_line(capsys, f"{shards}: the sharded weights", "are missing (no ")


def test_a_full_disk_while_the_ranks_write_is_one_line_and_keeps_the_last_checkpoint(
        cache_dir, tmp_path, capsys, monkeypatch):
    config = tiny_config(cache_dir, tmp_path, max_steps=2, eval_every=0, parallel="fsdp")
    train(config)
    kept = load_checkpoint(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp_files, "_write_item", full_disk)
    capsys.readouterr()
    assert main(cli_flags(tiny_config(cache_dir, tmp_path, max_steps=4, eval_every=0,
                                      parallel="fsdp", resume=True))) == 2
    assert_one_line(capsys, "cannot write the checkpoint", "No space left on device",
                    "the previous checkpoint is kept")
    assert load_checkpoint(tmp_path)["shards"] == kept["shards"]


def test_activation_checkpointing_and_fsdp_on_one_process_are_the_plain_run(cache_dir, tmp_path):
    train(tiny_config(cache_dir, tmp_path / "plain", **SETTINGS))
    for mode in ("full", "selective"):
        out = tmp_path / f"fsdp-{mode}"
        train(tiny_config(cache_dir, out, parallel="fsdp", activation_checkpointing=mode,
                          **SETTINGS))
        # One process sums in the same order: equal to the last bit.
        assert_same_run(tmp_path / "plain", out, FIGURES, rel=0, atol=0)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def backward_ops(mode: str) -> Counter:
    """The aten ops the backward of a 2-layer student runs, by op, under checkpointing MODE."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
    student = build_student(config, seed=0)
    checkpoint_activations(student, mode)
    objective = DistillationObjective(student, divergence="fkl", temperature=1.0, ce_weight=1.0,
                                      kd_weight=1.0)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 64, (2, 8), generator=gen)
    topk_logprobs, topk_ids = torch.log_softmax(torch.randn(2, 8, 64, generator=gen), -1).topk(4)
    loss, _ = objective(input_ids, input_ids.roll(-1, 1), topk_ids, topk_logprobs)
    with CountOps() as ops:
        loss.backward()
    return ops.counts


def test_checkpointing_recomputes_in_the_backward_what_it_did_not_keep():
    silu, mm = torch.ops.aten.silu.default, torch.ops.aten.mm.default
    plain, full, selective = (backward_ops(mode) for mode in ("none", "full", "selective"))
    assert plain[silu] == 0  # the plain backward uses the saved activations
    # Full: each layer's forward again, SiLU and matmuls too: q, k, v, o, gate and up, not down
    # (the recomputation stops once it has every tensor the backward needs).
    assert (full[silu], full[mm] - plain[mm]) == (2, 2 * 6)
    # Selective: the SiLU again, not the matmuls, whose outputs it kept.
    assert (selective[silu], selective[mm]) == (2, plain[mm])


def test_the_compiled_decoder_with_activation_checkpointing_under_fsdp(cache_dir, tmp_path):
    compiled = dict(compile="on", compile_backend="aot_eager", **SETTINGS)
    train(tiny_config(cache_dir, tmp_path / "eager", **SETTINGS))
    train(tiny_config(cache_dir, tmp_path / "compiled", parallel="fsdp",
                      activation_checkpointing="selective", **compiled))
    # Measured: equal to the last bit (aot_eager runs the traced ops eagerly); the bounds leave
    # room for a decomposition that sums in another order.
    assert_same_run(tmp_path / "eager", tmp_path / "compiled", FIGURES, rel=1e-6, atol=1e-7)


def test_resuming_under_the_other_parallelism_is_one_line(cache_dir, tmp_path, capsys):
    config = tiny_config(cache_dir, tmp_path, max_steps=2, eval_every=0)
    train(config)
    capsys.readouterr()
    flags = cli_flags(tiny_config(cache_dir, tmp_path, max_steps=4, eval_every=0,
                                  parallel="fsdp", resume=True))
    assert main(flags) == 2
    assert_one_line(capsys, "--resume with a different configuration (parallel: 'ddp' -> 'fsdp')")


def test_a_decoder_without_a_list_of_layers_is_refused():
    class Flat(nn.Module):
        def get_decoder(self) -> nn.Module:
            return nn.Linear(2, 2)

    with pytest.raises(ConfigError, match="its decoder keeps no `layers` list"):
        decoder_layers(Flat())

