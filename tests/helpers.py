"""Plain helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from kernels import IGNORE_INDEX
from kernels.divergences import TAIL_EPS, KDSpec, KDTargets
from student_train.config import TrainConfig
from student_train.data import Batch
from student_train.run_dir import METRICS_FILE, STUDENT_DIR
from teacher_cache.dataclass_cli import leaves
from teacher_cache.reader import TeacherCache, open_cache
from teacher_cache.synth import write_synthetic_cache

# --- kernels: float64 oracle and tolerances ---

IGNORE = IGNORE_INDEX  # the kernel tests' short name


@dataclass
class Inputs:
    hidden: Tensor
    weight: Tensor
    labels: Tensor
    topk_ids: Tensor
    topk_logprobs: Tensor

    def args(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """The five positional arguments, hidden and weight as fresh leaves of dtype."""
        h = self.hidden.to(dtype, copy=True).requires_grad_()
        w = self.weight.to(dtype, copy=True).requires_grad_()
        return h, w, self.labels, self.topk_ids, self.topk_logprobs

    def targets(self) -> KDTargets:
        return KDTargets(self.labels, self.topk_ids, self.topk_logprobs, IGNORE)


def make_inputs(
    n: int, h: int, v: int, k: int, *, seed: int, teacher_scale: float = 3.0,
    logit_scale: float = 1.0, full_teacher_mass: bool = False,
) -> Inputs:
    """Random student and teacher; a third of the labels inside the top-k, a third outside,
    every sixth position ignored. teacher_scale sharpens the teacher (top-k mass -> 1);
    full_teacher_mass renormalises the top-k so the rest has exactly zero mass."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen) * logit_scale
    weight = torch.randn(v, h, generator=gen) / h**0.5
    teacher = torch.log_softmax(torch.randn(n, v, generator=gen) * teacher_scale, -1)
    topk_logprobs, topk_ids = teacher.topk(k, dim=-1)
    if full_teacher_mass:
        topk_logprobs = torch.log_softmax(topk_logprobs, -1)
    labels = torch.randint(0, v, (n,), generator=gen)
    in_topk = torch.arange(n) % 3 == 0
    labels[in_topk] = topk_ids[in_topk, -1]
    outside = torch.arange(n) % 3 == 1
    for row in outside.nonzero().flatten().tolist():
        mask = torch.ones(v, dtype=torch.bool)
        mask[topk_ids[row]] = False
        if mask.any():
            labels[row] = mask.nonzero()[0, 0]
    labels[torch.arange(n) % 6 == 5] = IGNORE
    return Inputs(hidden, weight, labels, topk_ids, topk_logprobs.float())


def brute_force(hidden: Tensor, weight: Tensor, targets: KDTargets,
                spec: KDSpec) -> tuple[Tensor, Tensor]:
    """(loss, [mean CE, mean D]) straight from their definitions, over the full [N, V] logits, in
    float64."""
    t = spec.temperature
    labels, topk_ids = targets.labels, targets.topk_ids
    x = hidden.double() @ weight.double().T
    teacher = targets.topk_logprobs.double()
    valid = labels != targets.ignore_index
    ce = torch.logsumexp(x, -1) - x.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    if spec.divergence == "fkl":
        s = torch.log_softmax(x / t, -1).gather(1, topk_ids)
        q = torch.softmax(teacher / t, -1)
        kd = (torch.special.xlogy(q, q) - q * s).sum(-1)
    else:
        s = torch.log_softmax(x, -1).gather(1, topk_ids)
        s_rest = torch.clamp(1 - s.exp().sum(-1), min=TAIL_EPS)
        p_rest = torch.clamp(1 - teacher.exp().sum(-1), min=TAIL_EPS)
        u = torch.log_softmax(torch.cat([s, s_rest.log()[:, None]], -1) / t, -1)
        v = torch.log_softmax(torch.cat([teacher, p_rest.log()[:, None]], -1) / t, -1)
        if spec.divergence == "fkl_tail":
            p = v.exp()
            kd = (torch.special.xlogy(p, p) - p * u).sum(-1)
        else:
            kd = (u.exp() * (u - v)).sum(-1)
    per_row = torch.stack([spec.ce_weight * ce + spec.kd_weight * t * t * kd, ce, kd])
    loss, *terms = torch.where(valid, per_row, 0.0).sum(-1) / valid.sum().clamp(min=1)
    return loss, torch.stack(terms).detach()


def loss_and_grads(fn, inputs: Inputs, dtype: torch.dtype, spec: KDSpec, **kwargs):
    """(loss, grad_hidden, grad_weight) in float64 of fn(hidden, weight, targets, spec), which
    returns (loss, terms)."""
    h, w, *_ = inputs.args(dtype)
    loss, _ = fn(h, w, inputs.targets(), spec, **kwargs)
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


def expected(inputs: Inputs, spec: KDSpec):
    """The float64 oracle: loss_and_grads of the brute force."""
    return loss_and_grads(brute_force, inputs, torch.float64, spec)


def relative_error(got: Tensor, want: Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


@dataclass(frozen=True)
class Tolerance:
    """Against the float64 oracle: the loss within torch.testing.assert_close(rtol, atol), each
    gradient with a relative_error below grad_rel."""

    loss_rtol: float
    loss_atol: float
    grad_rel: float


# Per input dtype, for well-conditioned inputs; harder cases loosen an entry with
# dataclasses.replace where they are tested.
# bfloat16: the reference on make_inputs(40, 64, 300, 16, logit_scale=2.0), seeds 0-4, fkl /
# fkl_tail / rkl at T = 1 measured at most 8.4e-5 relative loss error and 5.0e-3 relative
# gradient error; the bounds are about 5x and 4x that. All loss math in bf16 instead of float32
# measured 2.5e-3 to 4.3e-3 on the loss, which loss_rtol must catch.
TOLERANCES = {
    torch.float32: Tolerance(loss_rtol=1e-5, loss_atol=1e-6, grad_rel=1e-5),
    torch.bfloat16: Tolerance(loss_rtol=4e-4, loss_atol=0.0, grad_rel=2e-2),
}


def assert_matches_float64(got: tuple[Tensor, ...], want: tuple[Tensor, ...],
                           tolerance: Tolerance) -> None:
    """(loss, grad_hidden, grad_weight) against the float64 oracle."""
    torch.testing.assert_close(got[0], want[0], rtol=tolerance.loss_rtol,
                               atol=tolerance.loss_atol)
    for g, e in zip(got[1:], want[1:], strict=True):
        assert relative_error(g, e) < tolerance.grad_rel


# --- command lines ---


def assert_documents_every_field(parser: argparse.ArgumentParser, cls: type,
                                 skip: tuple[str, ...] = ()) -> None:
    """Every field of `cls` but `skip` has a flag of `parser`; every flag has help that shows its
    default (or says it has none), unless it is required; every flag is in the help text."""
    text = " ".join(parser.format_help().split())
    required = {leaf.dest for leaf in leaves(cls) if leaf.required}
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    missing = {leaf.dest for leaf in leaves(cls)} - {a.dest for a in actions} - set(skip)
    assert not missing, f"fields without a flag: {missing}"
    for action in actions:
        assert action.help, f"{action.option_strings} has no help"
        assert action.required or action.dest in required or "default" in action.help, (
            f"{action.option_strings} shows no default")
        for option in action.option_strings:
            assert option in text


# --- caches: synthetic cache factory ---


def synthetic_cache(path: str | os.PathLike, *, sequences: int = 40, seq_len: int = 4,
                    top_k: int = 2, vocab_size: int = 32, rows_per_shard: int = 6, seed: int = 0,
                    scores: np.ndarray | None = None) -> TeacherCache:
    """A complete synthetic cache written at `path` (a directory or fsspec URL), opened."""
    write_synthetic_cache(path, sequences=sequences, seq_len=seq_len, top_k=top_k,
                          vocab_size=vocab_size, rows_per_shard=rows_per_shard, seed=seed,
                          scores=scores)
    return open_cache(path)


def shard_bytes(path: Path) -> dict[str, bytes]:
    """Every shard file of a local cache (the .arrow and its .json) by name."""
    return {p.name: p.read_bytes() for p in sorted((path / "shards").glob("shard-*"))}


def corrupt_shard(cache: Path, index: int, *, tail: bool = False) -> Path:
    """Damage shard `index` of a local cache in place, its size kept: one byte in its middle
    flipped, or (`tail`) its last 8 bytes zeroed. Returns the shard's path."""
    shard = cache / "shards" / f"shard-{index:06d}.arrow"
    data = bytearray(shard.read_bytes())
    if tail:
        data[-8:] = bytes(8)
    else:
        data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard


def crash_on_second_shard(monkeypatch) -> None:
    """`score` raises RuntimeError("simulated kill") when it writes its second shard."""
    from teacher_cache import score as score_module

    real = score_module.serialize_shard
    calls = []

    def serialize(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(score_module, "serialize_shard", serialize)


# --- training runs: a tiny student on a tiny synthetic cache ---

TINY = {"hidden_size": "32", "num_hidden_layers": "1", "num_attention_heads": "2",
        "num_key_value_heads": "2", "intermediate_size": "64"}
# The same student on the command line.
TINY_ARGS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]


def tiny_config(cache_dir, out, **changes) -> TrainConfig:
    values = dict(cache=cache_dir, out=str(out), student="xs", overrides=dict(TINY), max_steps=8,
                  batch_size=4, lr=1e-2, warmup=2, eval_every=4, checkpoint_every=4, log_every=1,
                  val_fraction=0.2, shuffle_buffer="8", eval_batch_size=4)
    return TrainConfig(**(values | changes))


def train_until_killed(config: TrainConfig, monkeypatch, at_step: int = 4) -> None:
    """Train, as if the process were killed right after the checkpoint of `at_step` (whole or
    sharded)."""
    import student_train.train as train_module

    def then_crash(save):
        def save_then_crash(run_dir, state, *rest):
            save(run_dir, state, *rest)
            if state["step"] == at_step:
                raise KeyboardInterrupt
        return save_then_crash

    with monkeypatch.context() as patch:
        for name in ("save_checkpoint", "save_sharded_checkpoint"):
            patch.setattr(train_module, name, then_crash(getattr(train_module, name)))
        with pytest.raises(KeyboardInterrupt):
            train_module.train(config)


def cli_flags(config: TrainConfig) -> list[str]:
    """The command line of `python -m student_train` that trains CONFIG."""
    flags = []
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "overrides":
            flags += [arg for key, v in value.items() for arg in ("--set", f"{key}={v}")]
        elif f.type == "bool":
            flags += [flag] if value else []
        elif value is not None and (f.default is MISSING or value != f.default):
            flags += [flag, str(value)]
    return flags


def torchrun_command(config: TrainConfig, nproc: int = 2) -> list[str]:
    """`torchrun --standalone --nproc_per_node NPROC` training CONFIG."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), "-m", "student_train", *cli_flags(config)]


def one_thread_env() -> dict[str, str]:
    """This environment with one compute thread per process (two ranks share two cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(config: TrainConfig, nproc: int = 2) -> subprocess.CompletedProcess:
    """Train CONFIG under torchrun, a thread per rank; the finished process (its stdout and
    stderr captured), which must have succeeded."""
    result = subprocess.run(torchrun_command(config, nproc), env=one_thread_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(out, key) -> list[dict]:
    lines = (Path(out) / METRICS_FILE).read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


# What every training record of metrics.jsonl logs and a resumed or DDP run must log alike.
TRAINING_FIGURES = ("loss", "ce", "kd", "lr")


def assert_same_run(expected: Path, got: Path, keys: tuple[str, ...], rel: float,
                    atol: float) -> None:
    """Both runs logged the same metrics at the same steps and saved the same student weights."""
    for key in keys:
        want, have = records(expected, key), records(got, key)
        assert [r["step"] for r in have] == [r["step"] for r in want]
        assert [r[key] for r in have] == pytest.approx([r[key] for r in want], rel=rel)
    want_weights = load_file(expected / STUDENT_DIR / "model.safetensors")
    have_weights = load_file(got / STUDENT_DIR / "model.safetensors")
    for name, tensor in want_weights.items():
        torch.testing.assert_close(have_weights[name], tensor, rtol=rel, atol=atol)


# --- independent oracles for what the code computes from a cache ---


def brute_force_scores(input_ids: np.ndarray, teacher_dir: Path, reference_dir: Path) -> np.ndarray:
    """MiniPLM scores from both models' float32 forward passes: the mean over positions 0..L-2 of
    teacher minus reference log-probability of the next token, in float64."""
    from transformers import AutoModelForCausalLM

    ids = torch.as_tensor(input_ids, dtype=torch.long)
    targets = []
    for path in (teacher_dir, reference_dir):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)
        targets.append(logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).double())
    return (targets[0] - targets[1]).mean(dim=1).numpy()


def student_logits64(student, input_ids: Tensor) -> Tensor:
    """[B, L, V] float64 logits: the student's float32 hidden states times its LM head."""
    with torch.no_grad():
        hidden = student.model(input_ids=input_ids, use_cache=False).last_hidden_state
    return hidden.double() @ student.lm_head.weight.double().T


def brute_force_metrics(student, batches: Iterable[Batch]) -> dict[str, float]:
    """val_ce, val_kl (forward KL from the renormalised teacher top-k) and val_top1 (student
    argmax == teacher top-1 id) from their definitions, in float64, token-weighted."""
    ce = kl = agree = tokens = 0.0
    for batch in batches:
        x = student_logits64(student, batch.input_ids)
        valid = batch.labels != IGNORE_INDEX
        logp = torch.log_softmax(x, -1)
        q = torch.softmax(batch.topk_logprobs.double(), -1)
        student_at_topk = logp.gather(-1, batch.topk_ids)
        row_ce = -logp.gather(-1, torch.where(valid, batch.labels, 0)[..., None])[..., 0]
        row_kl = (torch.special.xlogy(q, q) - q * student_at_topk).sum(-1)
        ce += row_ce[valid].sum().item()
        kl += row_kl[valid].sum().item()
        agree += (x.argmax(-1) == batch.topk_ids[..., 0])[valid].sum().item()
        tokens += valid.sum().item()
    return {"val_ce": ce / tokens, "val_kl": kl / tokens, "val_top1": agree / tokens}


# --- vLLM engines, each in its own Python: vLLM binds threads, patches torch.set_num_threads and
# may spawn workers, none of which belongs in the pytest process ---

# Eager (no torch.compile) and a small KV cache: an engine starts in seconds.
VLLM_ENGINE_OPTIONS = {"enforce_eager": True, "max_model_len": 128,
                       "kv_cache_memory_bytes": 1 << 26}


def run_vllm_script(script: str, *args: str) -> str:
    """`python -c script *args` with the engine core in that process; its stdout."""
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
