"""--compile: the compiled decoder trains like the eager one, in one graph compiled once, and its
checkpoints and saved students are interchangeable with eager ones.

The compiled runs use the aot_eager backend: it traces, partitions and differentiates the decoder as
inductor does but runs the ops eagerly, so it needs no C++ compiler and compiles in seconds, where
inductor takes minutes on a small CPU (benchmarks/bench_train.py measures inductor).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    TINY,
    TRAINING_FIGURES,
    assert_same_run,
    records,
    tiny_config,
    torchrun,
    train_until_killed,
)
from safetensors.torch import load_file

from student_train.__main__ import main as train_main
from student_train.checkpoint import load_checkpoint
from student_train.run_dir import STUDENT_DIR
from student_train.runtime import use_compile
from student_train.train import Trainer, train

COMPILED = {"compile": "on", "compile_backend": "aot_eager"}


def test_auto_compiles_on_cuda_only():
    assert use_compile("auto", torch.device("cuda", 0))
    assert not use_compile("auto", torch.device("cpu"))
    assert use_compile("on", torch.device("cpu")) and not use_compile("off", torch.device("cuda"))


def step_with_gradients(trainer: Trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """One optimizer step of `trainer` on its next batch: (loss, every parameter's gradient)."""
    batch = next(trainer.batches)
    loss, _ = trainer.model(batch.input_ids, batch.labels, batch.topk_ids, batch.topk_logprobs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.student.named_parameters()}
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_compiled_decoder_gives_the_eager_loss_and_gradients(cache_dir, tmp_path):
    eager = Trainer(tiny_config(cache_dir, tmp_path / "eager", compile="off"))
    compiled = Trainer(tiny_config(cache_dir, tmp_path / "compiled", **COMPILED))
    assert not eager.compiled and compiled.compiled
    for _ in range(3):
        eager_loss, eager_grads = step_with_gradients(eager)
        compiled_loss, compiled_grads = step_with_gradients(compiled)
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
        assert compiled_grads.keys() == eager_grads.keys()
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_one_graph_without_breaks_compiled_once(cache_dir, tmp_path):
    # eval_batch_size 4 over the held-out rows leaves a smaller last batch (checked below).
    trainer = Trainer(tiny_config(cache_dir, tmp_path, max_steps=4, grad_accum=2,
                                  eval_batch_size=4, **COMPILED))
    assert len(trainer.split.val) % trainer.config.eval_batch_size
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    trainer.train_step()  # compiles
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    with torch.compiler.set_stance("fail_on_recompile"):
        trainer.evaluate()  # eager: neither no_grad nor the last batch's shape recompiles
        for _ in range(3):
            trainer.train_step()
        trainer.evaluate()


def test_compiled_run_matches_the_eager_run_and_saves_the_same_keys(cache_dir, tmp_path, capsys):
    eager = train(tiny_config(cache_dir, tmp_path / "eager", max_steps=4))
    compiled = train(tiny_config(cache_dir, tmp_path / "compiled", max_steps=4, **COMPILED))
    assert_same_run(tmp_path / "eager", tmp_path / "compiled",
                    (*TRAINING_FIGURES, "val_ce", "grad_norm"), rel=1e-4, atol=1e-6)
    want = load_checkpoint(tmp_path / "eager")["model"].keys()
    assert load_checkpoint(tmp_path / "compiled")["model"].keys() == want
    assert not [k for k in want if "_orig_mod" in k]
    assert (load_file(tmp_path / "compiled" / STUDENT_DIR / "model.safetensors").keys()
            == load_file(tmp_path / "eager" / STUDENT_DIR / "model.safetensors").keys())
    # The first step (the compile) is reported apart from, and left out of, tokens/s.
    assert eager["compile_seconds"] is None and compiled["compile_seconds"] > 0
    assert compiled["train_seconds"] > 0 and compiled["tokens_per_s"] > 0
    assert [r["tokens_per_s"] for r in records(tmp_path / "compiled", "tokens_per_s")][0] is None
    assert "compile: the first step took" in capsys.readouterr().out


@pytest.mark.parametrize("first,then", [("off", "on"), ("on", "off")])
def test_resume_across_eager_and_compiled(cache_dir, tmp_path, monkeypatch, first, then):
    modes = {"on": COMPILED, "off": {"compile": "off"}}
    train(tiny_config(cache_dir, tmp_path / "straight", **modes[first]))
    train_until_killed(tiny_config(cache_dir, tmp_path / "resumed", **modes[first]), monkeypatch)
    summary = train(tiny_config(cache_dir, tmp_path / "resumed", resume=True, **modes[then]))
    assert summary["steps"] == 8
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", (*TRAINING_FIGURES, "val_ce"),
                    rel=1e-4, atol=1e-6)


def test_inductor_without_a_cpp_compiler_is_one_clear_error(cache_dir, tmp_path, capsys):
    from torch._inductor import config as inductor_config

    flags = ["--cache", cache_dir, "--out", str(tmp_path), "--compile", "on",
             *[f for k, v in TINY.items() for f in ("--set", f"{k}={v}")]]
    with inductor_config.patch({"cpp.cxx": ("no-such-c++-compiler",)}):
        assert train_main(flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --compile with the inductor backend on CPU needs a C++ compiler")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_ddp_wraps_the_compiled_decoder(cache_dir, tmp_path):
    # One process reading the two data parts that two ranks read.
    train(tiny_config(cache_dir, tmp_path / "single", max_steps=4, eval_every=2, data_parts=2))
    result = torchrun(tiny_config(cache_dir, tmp_path / "ddp", max_steps=4, eval_every=2,
                                  compile="on", compile_backend="aot_eager"))
    assert "compiled decoder" in result.stdout
    assert_same_run(tmp_path / "single", tmp_path / "ddp", (*TRAINING_FIGURES, "val_ce", "val_kl"),
                    rel=1e-4, atol=1e-5)
