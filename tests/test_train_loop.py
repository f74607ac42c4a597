"""The training loop on a tiny synthetic cache: learning, exact resume, DDP, the saved student."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    TRAINING_FIGURES,
    assert_same_run,
    brute_force_metrics,
    records,
    tiny_config,
    torchrun,
    train_until_killed,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from student_train.checkpoint import load_checkpoint
from student_train.data import TrainStream, eval_batches, split_rows
from student_train.model import DistillationObjective, build_student
from student_train.run_dir import METRICS_FILE, STUDENT_DIR
from student_train.selection import Selection
from student_train.train import lr_factor, train
from teacher_cache.reader import open_cache


def test_a_few_steps_lower_the_loss(cache_dir, tmp_path):
    summary = train(tiny_config(cache_dir, tmp_path, max_steps=30, eval_every=10))
    losses = [r["loss"] for r in records(tmp_path, "loss")]
    evals = records(tmp_path, "val_ce")
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert evals[-1]["val_ce"] < evals[0]["val_ce"] - 0.3
    assert evals[-1]["val_kl"] < evals[0]["val_kl"]
    assert summary["tokens_seen"] == 30 * 4 * 16
    # The summary's metrics are those of the saved student, recomputed from their definitions.
    student = AutoModelForCausalLM.from_pretrained(tmp_path / STUDENT_DIR).eval()
    config = tiny_config(cache_dir, tmp_path)
    split = split_rows(open_cache(cache_dir), config.val_fraction, Selection(), config.seed)
    want = brute_force_metrics(student, eval_batches(open_cache(cache_dir), split.val, 4))
    assert summary["val_top1"] == want["val_top1"]
    assert summary["val_ce"] == pytest.approx(want["val_ce"], rel=1e-5)
    assert summary["val_kl"] == pytest.approx(want["val_kl"], rel=1e-5)
    # What selected the training rows is recorded (MiniPLM manifests copy it for references).
    assert (summary["select"], summary["seed"], summary["rows_per_step"],
            summary["held_out_fraction"]) == ("none", 0, 4, 0.2)


def test_resume_continues_exactly(cache_dir, tmp_path, monkeypatch):
    train(tiny_config(cache_dir, tmp_path / "straight", grad_accum=2))

    train_until_killed(tiny_config(cache_dir, tmp_path / "resumed", grad_accum=2), monkeypatch)
    checkpoint = load_checkpoint(tmp_path / "resumed")
    assert checkpoint["step"] == 4
    assert checkpoint["data"]["micro_batches"] == 8
    with (tmp_path / "resumed" / METRICS_FILE).open("a") as f:  # written after the checkpoint
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    train(tiny_config(cache_dir, tmp_path / "resumed", grad_accum=2, resume=True))

    assert_same_run(tmp_path / "straight", tmp_path / "resumed", (*TRAINING_FIGURES, "val_ce"),
                    rel=1e-5, atol=1e-6)


def test_logged_figures_are_the_intervals_means_and_the_rate_each_step_used(
        cache_dir, tmp_path, monkeypatch):
    options = dict(kd_weight=0.5, temperature=2.0, eval_every=0)
    train(tiny_config(cache_dir, tmp_path / "every", **options))
    every = records(tmp_path / "every", "loss")
    config = tiny_config(cache_dir, tmp_path / "interval", log_every=3, **options)
    train(config)
    interval = records(tmp_path / "interval", "loss")
    assert [r["step"] for r in interval] == [3, 6, 8]
    for record, first in zip(interval, (0, 3, 6), strict=True):
        steps = every[first:record["step"]]
        for key in ("loss", "ce", "kd"):
            assert record[key] == pytest.approx(sum(r[key] for r in steps) / len(steps), rel=1e-6)
    for r in every:
        assert r["loss"] == pytest.approx(r["ce"] + 0.5 * 4.0 * r["kd"], rel=1e-6)
        assert r["lr"] == pytest.approx(config.lr * lr_factor(r["step"] - 1, config))
    # Killed inside an interval (at the checkpoint of step 4), resumed: the same means.
    killed = tiny_config(cache_dir, tmp_path / "resumed", log_every=3, **options)
    train_until_killed(killed, monkeypatch)
    train(tiny_config(cache_dir, tmp_path / "resumed", log_every=3, resume=True, **options))
    assert_same_run(tmp_path / "interval", tmp_path / "resumed", TRAINING_FIGURES,
                    rel=1e-6, atol=1e-7)


def test_saved_student_loads_and_gives_the_training_logits(cache_dir, tmp_path):
    config = tiny_config(cache_dir, tmp_path, max_steps=3)
    train(config)
    checkpoint = load_checkpoint(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / STUDENT_DIR)
    assert isinstance(loaded, LlamaForCausalLM)
    trained = LlamaForCausalLM(loaded.config)
    trained.load_state_dict(checkpoint["model"])
    split = split_rows(open_cache(cache_dir), config.val_fraction, Selection(), config.seed)
    batch = next(iter(TrainStream(cache_dir, split.train, global_batch=2, rank=0, world_size=1,
                                  seed=0, shuffle_buffer=4)))
    with torch.no_grad():
        hidden = trained.model(input_ids=batch.input_ids).last_hidden_state
        expected = hidden @ trained.lm_head.weight.T
        torch.testing.assert_close(loaded(input_ids=batch.input_ids).logits, expected)


def test_student_of_a_real_cache_ships_the_teachers_tokenizer(tiny_cache, tmp_path):
    train(tiny_config(str(tiny_cache), tmp_path, max_steps=2, eval_every=0, batch_size=2))
    manifest = open_cache(tiny_cache).manifest
    student = AutoModelForCausalLM.from_pretrained(tmp_path / STUDENT_DIR)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / STUDENT_DIR)
    assert student.config.vocab_size == manifest.vocab_size == len(tokenizer)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    assert student(input_ids=ids).logits.shape == (1, ids.shape[1], manifest.vocab_size)


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process(cache_dir, tmp_path):
    # One process reading the two data parts that two ranks read (the default: a part per rank).
    train(tiny_config(cache_dir, tmp_path / "single", max_steps=4, eval_every=2, data_parts=2))
    torchrun(tiny_config(cache_dir, tmp_path / "ddp", max_steps=4, eval_every=2))
    assert_same_run(tmp_path / "single", tmp_path / "ddp",
                    (*TRAINING_FIGURES, "val_ce", "val_kl", "val_top1"), rel=1e-4, atol=1e-5)


def test_bf16_autocast_follows_the_float32_run(cache_dir, tmp_path):
    linear_outputs = {}  # precision -> dtypes of every nn.Linear output while it trained

    def record(module, args, output):
        if isinstance(module, torch.nn.Linear):
            linear_outputs[precision].add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        for precision in ("fp32", "bf16"):
            linear_outputs[precision] = set()
            train(tiny_config(cache_dir, tmp_path / precision, max_steps=3, precision=precision))
    finally:
        hook.remove()
    assert linear_outputs["fp32"] == {torch.float32}
    assert torch.bfloat16 in linear_outputs["bf16"]  # evaluation runs without autocast
    fp32, bf16 = (records(tmp_path / p, "loss") for p in ("fp32", "bf16"))
    assert [r["loss"] for r in bf16] == pytest.approx([r["loss"] for r in fp32], rel=0.02)


def test_learning_rate_warms_up_then_decays_to_the_floor(cache_dir, tmp_path):
    config = tiny_config(cache_dir, tmp_path, max_steps=100, warmup=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert factors[100] == pytest.approx(0.1)


def test_the_objective_hands_hidden_states_to_the_loss_as_they_come_under_fp16_autocast():
    """The loss owns the autocast cast: under fp16 autocast it keeps float32 (which the kernel
    needs), so the objective matches its float32 value instead of failing on float16 inputs."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
    objective = DistillationObjective(build_student(config, seed=0), divergence="fkl",
                                      temperature=1.0, ce_weight=1.0, kd_weight=1.0)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 64, (2, 8), generator=gen)
    topk_logprobs, topk_ids = torch.log_softmax(torch.randn(2, 8, 64, generator=gen), -1).topk(4)
    batch = (input_ids, input_ids.roll(-1, 1), topk_ids, topk_logprobs)
    want, _ = objective(*batch)
    with torch.autocast("cpu", dtype=torch.float16):
        got, _ = objective(*batch)
    got.backward()
    assert got.dtype == torch.float32 and objective.student.lm_head.weight.grad is not None
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0.0)
