"""The training loop: one student, one cache, CE + sparse KD, resumable, single process or DDP."""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from student_train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from student_train.config import RESUMABLE_CHANGES, ConfigError, TrainConfig
from student_train.data import TrainStream, eval_batches, split_rows, stream_position
from student_train.evaluate import evaluate
from student_train.model import (
    DistillationObjective,
    build_student,
    count_parameters,
    save_student,
)
from student_train.presets import llama_config, resolve_preset
from student_train.selection import Selection
from teacher_cache.reader import open_cache

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STUDENT_DIR = "student"


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Distributed:
    """Join the process group torchrun (or any launcher setting RANK/WORLD_SIZE) describes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Distributed(rank=int(os.environ.get("RANK", "0")), world_size=world_size,
                       device=target)


def use_bf16(precision: str, device: torch.device) -> bool:
    # On CPU bf16 autocast gained only 10-20% per step (xs, s presets; benchmarks/bench_train.py)
    # and is emulated, hence much slower, on CPUs without bf16 units: there it stays opt-in.
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def make_optimizer(model: torch.nn.Module, config: TrainConfig,
                   device: torch.device) -> torch.optim.AdamW:
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95),
                             fused=device.type == "cuda")


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio` at `max_steps`."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.max_steps - config.warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


class MetricsLog:
    """metrics.jsonl; a resumed run first drops the records written after its checkpoint."""

    def __init__(self, path: Path, keep_through_step: int):
        kept = []
        if keep_through_step > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= keep_through_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in kept))
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    changed = [f.name for f in fields(TrainConfig)
               if f.name not in RESUMABLE_CHANGES and saved.get(f.name) != getattr(config, f.name)]
    if changed:
        details = ", ".join(f"{n}: {saved.get(n)!r} -> {getattr(config, n)!r}" for n in changed)
        raise ConfigError(f"--resume with a different configuration ({details}); use the "
                          f"checkpoint's settings or a new --out")


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def train(config: TrainConfig) -> dict[str, Any]:
    """Train one student; returns (and writes to OUT/summary.json) the run's summary."""
    env = init_distributed(config.device)
    out = Path(config.out)
    cache = open_cache(config.cache)
    manifest = cache.manifest
    model_config = llama_config(resolve_preset(config.student, config.overrides),
                                manifest.vocab_size, manifest.seq_len)
    selection = Selection.parse(config.select)
    checkpoint = load_checkpoint(out) if config.resume else None
    if checkpoint is not None:
        check_resumable(checkpoint["config"], config)
    split = split_rows(cache, config.val_fraction, selection, config.seed)

    student = build_student(model_config, config.seed).to(env.device)
    parameters = count_parameters(student)
    objective = DistillationObjective(
        student, divergence=config.divergence, temperature=config.temperature,
        ce_weight=config.ce_weight, kd_weight=config.kd_weight, impl=config.loss_impl)
    optimizer = make_optimizer(student, config, env.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    step = 0
    if checkpoint is not None:
        student.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])
        step = checkpoint["step"]
    model = objective
    if env.world_size > 1:
        model = DistributedDataParallel(
            objective, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    stream = TrainStream(config.cache, split.train, global_batch=config.batch_size,
                         rank=env.rank, world_size=env.world_size, seed=config.seed,
                         shuffle_buffer=config.shuffle_buffer, start_batch=step * config.grad_accum)
    batches = iter(DataLoader(stream, batch_size=None, num_workers=config.workers,
                              pin_memory=env.device.type == "cuda"))
    tokens_per_step = config.rows_per_step * manifest.seq_len
    bf16 = use_bf16(config.precision, env.device)
    metrics = MetricsLog(out / METRICS_FILE, step) if env.is_main else None
    if env.is_main:
        print(f"student {config.student}: {parameters / 1e6:.2f}M parameters, "
              f"{len(split.train)} training / {len(split.val)} held-out sequences, "
              f"{tokens_per_step} tokens per step, {env.world_size} rank(s) on {env.device}"
              f"{', bf16 autocast' if bf16 else ''}")

    def run_eval() -> dict[str, Any]:
        result = evaluate(student, eval_batches(cache, split.val, config.eval_batch_size,
                                                env.rank, env.world_size),
                          env.device, impl=config.loss_impl)
        record = {"step": step, "tokens": step * tokens_per_step, **result.as_record()}
        if metrics is not None:
            metrics.write(record)
        return record

    def checkpoint_now() -> None:
        if env.is_main:
            save_checkpoint(out, {
                "step": step, "model": student.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(), "config": asdict(config),
                "data": stream_position(step * config.grad_accum, config.batch_size,
                                        len(split.train)),
            })
        if env.world_size > 1:
            dist.barrier()

    last_eval = run_eval() if step == 0 and config.eval_every > 0 else None
    train_seconds, start_step = 0.0, step
    progress = tqdm(total=config.max_steps, initial=step, unit="step", disable=not env.is_main,
                    dynamic_ncols=True)
    while step < config.max_steps:
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=env.device)
        for micro in range(config.grad_accum):
            batch = next(batches).to(env.device)
            last = micro == config.grad_accum - 1
            sync = nullcontext() if last or env.world_size == 1 else model.no_sync()
            with sync:
                with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = model(batch.input_ids, batch.labels, batch.topk_ids,
                                 batch.topk_logprobs) / config.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = (torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
                     if config.grad_clip > 0 else None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_seconds += time.perf_counter() - started
        tokens_per_s = (step - start_step) * tokens_per_step / train_seconds
        progress.update(1)

        if step % config.log_every == 0 or step == config.max_steps:
            if env.world_size > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            progress.set_postfix(loss=f"{loss_sum.item():.4f}", tok_s=f"{tokens_per_s:,.0f}")
            if metrics is not None:
                metrics.write({"step": step, "tokens": step * tokens_per_step,
                               "loss": loss_sum.item(), "lr": scheduler.get_last_lr()[0],
                               "grad_norm": None if grad_norm is None else grad_norm.item(),
                               "tokens_per_s": tokens_per_s})
        if config.eval_every > 0 and step % config.eval_every == 0 and step < config.max_steps:
            last_eval = run_eval()
        if config.checkpoint_every > 0 and step % config.checkpoint_every == 0:
            checkpoint_now()
    progress.close()

    if last_eval is None or last_eval["step"] != step:
        last_eval = run_eval()
    if config.checkpoint_every == 0 or step % config.checkpoint_every:
        checkpoint_now()
    summary = {
        "student": config.student, "parameters": parameters, "steps": step,
        "tokens_seen": step * tokens_per_step, "tokens_per_s": (
            (step - start_step) * tokens_per_step / train_seconds if train_seconds else None),
        "train_seconds": train_seconds, "ce_weight": config.ce_weight,
        "kd_weight": config.kd_weight, "divergence": config.divergence,
        **{k: v for k, v in last_eval.items() if k.startswith("val_")},
    }
    if env.is_main:
        save_student(student, out / STUDENT_DIR, manifest)
        _write_json(out / SUMMARY_FILE, summary)
        print(f"done: {step} steps, {summary['tokens_seen']:,} tokens, val CE "
              f"{summary['val_ce']:.4f} (PPL {summary['val_ppl']:.1f}), KL "
              f"{summary['val_kl']:.4f}, top-1 {summary['val_top1']:.3f}; student saved to "
              f"{out / STUDENT_DIR}")
    return summary
