"""The training loop: one student, one cache, CE + sparse KD, resumable, single process, DDP or
FSDP."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from kernels import IGNORE_INDEX
from student_train.checkpoint import (
    CHECKPOINT_FILE,
    load_checkpoint,
    load_sharded_checkpoint,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)
from student_train.config import RESUMABLE_CHANGES, TrainConfig
from student_train.data import (
    DATA_ORDER,
    Batch,
    RowSplit,
    StreamLayout,
    TrainStream,
    eval_batches,
    raise_worker_failures,
    split_rows,
    stream_position,
)
from student_train.evaluate import EvalMetrics
from student_train.model import (
    DistillationObjective,
    count_parameters,
    resolve_doc_mask,
    save_student,
)
from student_train.run_dir import (
    CONFIG_FILE,
    METRICS_FILE,
    STUDENT_DIR,
    SUMMARY_FILE,
    RunLock,
    claim_run_dir,
)
from student_train.runtime import (
    checkpoint_activations,
    compile_decoder,
    init_distributed,
    on_main,
    shard,
    use_bf16,
    use_compile,
)
from student_train.selection import Selection
from student_train.students import BuildContext, create_student, restore_student
from student_train.tracking import Tracker, open_tracker
from teacher_cache.errors import CheckpointError, ConfigError, TrainingDiverged
from teacher_cache.format import Manifest, build_id
from teacher_cache.reader import open_cache
from teacher_cache.storage import atomic_output, write_json
from teacher_cache.version import distill_version


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


class LogInterval:
    """The training figures summed on the device over the steps since the last log record (the
    host reads them only there): `loss` (ce_weight * CE + kd_weight * T^2 * KD), `ce` and `kd`
    (the divergence to the teacher at the run's temperature), each a step's mean over its tokens.
    Checkpointed, so a resumed run logs the means an uninterrupted one does."""

    KEYS = ("loss", "ce", "kd")

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.KEYS), device=device)
        self.steps = 0

    def add(self, figures: torch.Tensor) -> None:
        self.sums += figures
        self.steps += 1

    def take_means(self) -> dict[str, float]:
        """The means over the interval, which then starts again."""
        means = dict(zip(self.KEYS, (self.sums / self.steps).tolist(), strict=True))
        self.sums.zero_()
        self.steps = 0
        return means

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.tolist(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = torch.tensor(state["sums"], device=self.sums.device)
        self.steps = state["steps"]


class MetricsLog:
    """metrics.jsonl, and the --report-to tracker; a resumed run first drops the records written
    after its checkpoint."""

    def __init__(self, path: Path, keep_through_step: int, tracker: Tracker | None):
        kept = []
        if keep_through_step > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= keep_through_step]
        with atomic_output(path) as f:
            f.write("".join(line + "\n" for line in kept).encode())
        self.path = path
        self.tracker = tracker

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    # Before --init every student was built as auto builds it, before --doc-mask every row was
    # attended as one sequence, before --parallel every run was DDP.
    saved = {"init": "auto", "doc_mask": "off", "parallel": "ddp"} | saved
    changed = [f.name for f in fields(TrainConfig)
               if f.name not in RESUMABLE_CHANGES and saved.get(f.name) != getattr(config, f.name)]
    if changed:
        details = ", ".join(f"{n}: {saved.get(n)!r} -> {getattr(config, n)!r}" for n in changed)
        raise ConfigError(f"{config.out}: --resume with a different configuration ({details}); "
                          f"use the checkpoint's settings, --overwrite or a new --out")


def continue_as_saved(saved: dict[str, Any], config: TrainConfig) -> TrainConfig:
    """A run from before --doc-mask attended across documents: `auto` resumes it that way."""
    if "doc_mask" not in saved and config.doc_mask == "auto":
        return replace(config, doc_mask="off")
    return config


def stream_layout(config: TrainConfig, world_size: int,
                  checkpoint: dict[str, Any] | None) -> StreamLayout:
    """The data streams of this run: a new run's from the flags (default: one part per rank, one
    slot per worker), a resumed run's from its checkpoint, which ranks and workers must divide."""
    saved = (checkpoint or {}).get("data", {})
    if checkpoint is not None and saved.get("order") != DATA_ORDER:
        raise ConfigError(f"{config.out}: the checkpoint was written by an earlier version of "
                          f"the data stream, which orders the rows otherwise; resume it with "
                          f"that version, or start over (--overwrite or a new --out)")
    layout = {"parts": config.data_parts or saved.get("parts") or world_size,
              "slots": config.data_slots or saved.get("slots") or max(config.workers, 1)}
    for name, value in layout.items():
        if checkpoint is not None and value != saved[name]:
            raise ConfigError(f"{config.out}: --data-{name} {value} differs from the "
                              f"checkpoint's {saved[name]}; --resume keeps the run's data order")
    result = StreamLayout(layout["parts"], layout["slots"], config.batch_size)
    result.check_consumers(world_size, config.workers)
    return result


def cache_identity(manifest: Manifest, split: RowSplit) -> dict[str, Any]:
    """What a resumed run must find again in its cache: the build that wrote it (teacher,
    tokenizer, targets, corpus), its vocabulary, and the rows it trains on and holds out. Not its
    path: a moved or copied cache resumes."""
    rows = hashlib.sha256(split.train.astype("<i8").tobytes() + b"/"
                          + split.val.astype("<i8").tobytes()).hexdigest()[:16]
    return {"build": build_id(manifest.build_identity()), "vocab_size": manifest.vocab_size,
            "sequences": len(split.train) + len(split.val), "rows": rows}


def check_same_cache(saved: dict[str, Any] | None, current: dict[str, Any],
                     config: TrainConfig) -> None:
    if saved is None:  # a checkpoint from before the cache identity was recorded
        return
    changed = ", ".join(f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items()
                        if saved.get(k) != v)
    if changed:
        raise CheckpointError(f"{Path(config.out) / CHECKPOINT_FILE}: trained on another cache "
                              f"than {config.cache} ({changed}); resume it with the cache it "
                              f"trained on, or start over (--overwrite or a new --out)")


def finished_summary(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The summary of a run that already trained to `step`, or None if it has none."""
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return summary if summary.get("steps") == step else None


class Trainer:
    """One student on one cache: setup (or resume), the step, evaluation, checkpoints, summary."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.env = init_distributed(config.device, config.parallel)
        self.out = Path(config.out)
        self.metrics: MetricsLog | None = None
        self.lock: RunLock | None = on_main(self.env, lambda: claim_run_dir(config))
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the tracker, release the run directory (also done when this process ends)."""
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.release()
        self.env.close()

    def _setup(self) -> None:
        config, env = self.config, self.env
        self.cache = open_cache(config.cache)
        self.manifest = self.cache.manifest
        config.check_cache_targets(config.cache, self.manifest.targets)
        selection = Selection.parse(config.select)
        checkpoint = load_checkpoint(self.out) if config.resume else None
        if checkpoint is not None:
            config = self.config = continue_as_saved(checkpoint["config"], config)
            check_resumable(checkpoint["config"], config)
        self.layout = stream_layout(config, env.world_size, checkpoint)
        self.split = split_rows(self.cache, config.val_fraction, selection, config.seed,
                                config.val_max_rows)
        self.cache_identity = cache_identity(self.manifest, self.split)
        if checkpoint is not None:
            check_same_cache(checkpoint.get("cache"), self.cache_identity, config)
        self._val_batches: list | None = None

        # A resumed student is rebuilt from its checkpoint (a pruned one is not measured again).
        self.built = (restore_student(checkpoint["student"], self.manifest)
                      if checkpoint is not None and "student" in checkpoint else
                      create_student(config.student, config.init,
                                     BuildContext(config.seed, config.overrides, self.cache,
                                                  self.split.train, env.device)))
        # Probed on the CPU, where every student is built, before it moves or compiles.
        self.doc_mask = resolve_doc_mask(config.doc_mask, self.built.model,
                                         f"student {config.student}")
        self.sharded = config.parallel == "fsdp"
        # fully_shard moves each unit to the device as it shards it: no device ever holds the
        # whole student, only one layer of it besides the shards.
        self.student = self.built.model if self.sharded else self.built.model.to(env.device)
        self.parameters = count_parameters(self.student)
        self.objective = DistillationObjective(
            self.student, divergence=config.divergence, temperature=config.temperature,
            ce_weight=config.ce_weight, kd_weight=config.kd_weight, impl=config.loss_impl)
        self.bf16 = use_bf16(config.precision, env.device)
        checkpoint_activations(self.student, config.activation_checkpointing)
        self.compiled = use_compile(config.compile, env.device)
        if self.compiled:
            compile_decoder(self.student, config.compile_backend, env.device)
        if self.sharded:  # before the optimizer: fully_shard replaces the parameters
            shard(self.objective, env, self.bf16)
        self.optimizer = make_optimizer(self.student, config, env.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config))
        self.step, self.train_seconds, self.timed_steps = 0, 0.0, 0
        self.interval = LogInterval(env.device)
        # A rerun over a finished run returns its summary and rewrites nothing, measured figures
        # (tokens/s, seconds) included.
        self.finished: dict[str, Any] | None = None
        self.checkpoint_step = None if checkpoint is None else checkpoint["step"]
        if checkpoint is not None and "shards" in checkpoint:
            load_sharded_checkpoint(self.out, checkpoint, self.objective, self.optimizer)
        elif checkpoint is not None:
            try:
                self.student.load_state_dict(checkpoint["model"])
            except RuntimeError as e:  # another vocabulary or architecture
                raise CheckpointError(
                    f"{self.out / CHECKPOINT_FILE}: its weights do not fit the student built "
                    f"for {config.cache} ({str(e).splitlines()[-1].strip()}); resume it with "
                    f"the cache it trained on, or start over (--overwrite or a new --out)"
                ) from None
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            set_rng_state(checkpoint["rng"])
            self.step, self.train_seconds = checkpoint["step"], checkpoint["train_seconds"]
            self.timed_steps = checkpoint["timed_steps"]
            if "log_interval" in checkpoint:  # absent from checkpoints written before it
                self.interval.load_state_dict(checkpoint["log_interval"])
            if self.step >= config.max_steps:
                self.finished = finished_summary(self.out, self.step)
        self.model: torch.nn.Module = self.objective
        if env.world_size > 1 and not self.sharded:
            self.model = DistributedDataParallel(
                self.objective,
                device_ids=[env.device.index] if env.device.type == "cuda" else None)

        stream = TrainStream(config.cache, self.split.train, global_batch=config.batch_size,
                             rank=env.rank, world_size=env.world_size, seed=config.seed,
                             shuffle_buffer=config.shuffle_buffer,
                             start_batch=self.step * config.grad_accum,
                             parts=self.layout.parts, slots=self.layout.slots)
        self.batches = raise_worker_failures(iter(DataLoader(
            stream, batch_size=None, num_workers=config.workers,
            pin_memory=env.device.type == "cuda")))
        self.tokens_per_step = config.rows_per_step * self.manifest.seq_len
        self.metrics = (MetricsLog(self.out / METRICS_FILE, self.step, open_tracker(config))
                        if env.is_main else None)
        # The first step whose loss or gradient norm was not finite (0: none). Kept on the
        # device and read only by check_finite, where the host waits for the device anyway
        # (logging reads the loss, evaluation and checkpoints copy to the host): no sync per step.
        self.first_bad_step = torch.zeros((), dtype=torch.int64, device=env.device)

    def train_step(self) -> torch.Tensor | None:
        """One optimizer step over `grad_accum` micro-batches, its loss and terms added to the
        log interval's; returns its gradient norm."""
        config, ddp = self.config, isinstance(self.model, DistributedDataParallel)
        figures = torch.zeros(len(LogInterval.KEYS), device=self.env.device)  # loss, ce, kd
        for micro in range(config.grad_accum):
            batch = next(self.batches).to(self.env.device)
            last = micro == config.grad_accum - 1
            if self.sharded:  # reduce-scatter the gradients once, in the last micro-step
                self.objective.set_requires_gradient_sync(last)
            with self.model.no_sync() if ddp and not last else nullcontext():
                with torch.autocast(self.env.device.type, dtype=torch.bfloat16,
                                    enabled=self.bf16):
                    loss, terms = self.model(batch.input_ids, batch.labels, batch.topk_ids,
                                             batch.topk_logprobs, batch.positions(self.doc_mask))
                    loss = loss / config.grad_accum
                loss.backward()
            figures += torch.cat([loss.detach()[None], terms / config.grad_accum])
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.student.parameters(), config.grad_clip)
                     if config.grad_clip > 0 else None)
        if isinstance(grad_norm, DTensor):  # the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.env.world_size > 1:
            dist.all_reduce(figures, op=dist.ReduceOp.AVG)
        finite = torch.isfinite(figures[0])
        if grad_norm is not None:
            finite &= torch.isfinite(grad_norm)
        self.first_bad_step = torch.where(finite | (self.first_bad_step > 0),
                                          self.first_bad_step, self.step)
        self.interval.add(figures)
        return grad_norm

    def check_finite(self) -> None:
        """TrainingDiverged if a step's loss or gradient norm was not finite, or the weights are
        not: called before anything of a step is logged or written, so nothing poisoned is."""
        weights_finite = torch.stack([
            (p.to_local() if isinstance(p, DTensor) else p).isfinite().all()
            for p in self.student.parameters()]).all().long()
        if self.sharded:  # each rank checked its shards: all ranks stop together, or none
            dist.all_reduce(weights_finite, op=dist.ReduceOp.MIN)
        bad_step, weights_ok = torch.stack([self.first_bad_step, weights_finite]).tolist()
        if bad_step:
            self.diverged(f"the loss or its gradient norm is NaN or infinite at step {bad_step}")
        if not weights_ok:
            self.diverged(f"the weights are NaN or infinite after step {self.step}")

    def diverged(self, what: str) -> NoReturn:
        kept = ("no checkpoint was written" if self.checkpoint_step is None else
                f"its checkpoint of step {self.checkpoint_step} is kept")
        raise TrainingDiverged(f"{self.out}: training diverged, {what}; nothing of it was "
                               f"written ({kept}). Lower --lr, or look for NaN or inf in the "
                               f"cache's teacher logprobs or in the checkpoint resumed from")

    def evaluate(self) -> dict[str, Any]:
        """The held-out figures after this step, logged (null without held-out sequences)."""
        env = self.env
        self.check_finite()
        if len(self.split.val) == 0:
            return {"step": self.step, **{f"val_{f.name}": None for f in fields(EvalMetrics)},
                    "val_tokens": 0}
        if self._val_batches is None:  # the held-out rows are few (--val-max-rows): read once
            self._val_batches = list(eval_batches(self.cache, self.split.val,
                                                  self.config.eval_batch_size, env.rank,
                                                  env.world_size))
            if self.sharded:
                self._val_batches = self._padded_to_longest(self._val_batches)
        # Eager: a no-grad graph and the last, smaller batch would each cost another compile.
        with torch.compiler.set_stance("force_eager"):
            result = self.objective.evaluate(iter(self._val_batches), env.device,
                                             self.config.loss_impl, self.doc_mask)
        if self.sharded:  # the root does not reshard after a forward (the backward would gather)
            self.objective.reshard()
        record = {"step": self.step, "tokens": self.step * self.tokens_per_step,
                  **result.as_record()}
        if not all(map(math.isfinite, asdict(result).values())):
            self.diverged(f"the held-out figures are not finite after step {self.step} "
                          f"(val CE {result.ce}, KL {result.kl})")
        self.log(record)
        return record

    def _padded_to_longest(self, batches: list[Batch]) -> list[Batch]:
        """Every FSDP forward gathers weights from all ranks: each runs as many held-out batches
        as the rank with most, its extra ones a row whose labels are all ignored (which adds
        nothing to the figures)."""
        count = torch.tensor(len(batches), device=self.env.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        shape = (1, self.manifest.seq_len)
        targets = torch.zeros((*shape, self.manifest.top_k))
        ignored = Batch(seq_ids=torch.zeros(1, dtype=torch.int64),
                        input_ids=torch.zeros(shape, dtype=torch.int64),
                        labels=torch.full(shape, IGNORE_INDEX), topk_ids=targets.long(),
                        topk_logprobs=targets,
                        position_ids=torch.arange(shape[1]).expand(shape).clone())
        return batches + [ignored] * (int(count) - len(batches))

    def save_checkpoint(self) -> None:
        self.check_finite()
        state = {
            "step": self.step, "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
            "train_seconds": self.train_seconds, "timed_steps": self.timed_steps,
            "log_interval": self.interval.state_dict(),
            "config": asdict(self.config), "student": self.built.checkpoint_entry(),
            "cache": self.cache_identity,
            "data": stream_position(self.step * self.config.grad_accum,
                                    self.config.batch_size, len(self.split.train),
                                    self.layout),
        }
        if self.sharded:
            save_sharded_checkpoint(self.out, state, self.objective, self.optimizer,
                                    self.env.rank)
        elif self.env.is_main:
            save_checkpoint(self.out, {**state, "model": self.student.state_dict(),
                                       "optimizer": self.optimizer.state_dict()})
        self.checkpoint_step = self.step
        if self.env.world_size > 1:
            dist.barrier()

    def tokens_per_s(self) -> float | None:
        """Over the timed steps of the whole run (a compiled session's first step is not one)."""
        if not self.train_seconds:
            return None
        return self.timed_steps * self.tokens_per_step / self.train_seconds

    def log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def _step(self, progress: tqdm, compile_step: int | None) -> dict[str, Any] | None:
        """One optimizer step with its logging, evaluation and checkpoint; the evaluation's record
        if it evaluated."""
        config = self.config
        started = time.perf_counter()
        grad_norm = self.train_step()
        self.last_step_seconds = time.perf_counter() - started
        if self.step != compile_step:
            self.train_seconds += self.last_step_seconds
            self.timed_steps += 1
        tokens_per_s = self.tokens_per_s()
        progress.update(1)
        step, record = self.step, None
        if step % config.log_every == 0 or step == config.max_steps:
            self.check_finite()
            means = self.interval.take_means()
            progress.set_postfix(loss=f"{means['loss']:.4f}", tok_s=f"{tokens_per_s or 0:,.0f}")
            self.log({"step": step, "tokens": step * self.tokens_per_step, **means,
                      "lr": self.step_lr,
                      "grad_norm": None if grad_norm is None else grad_norm.item(),
                      "tokens_per_s": tokens_per_s})
        if config.eval_every > 0 and step % config.eval_every == 0 and step < config.max_steps:
            record = self.evaluate()
        if config.checkpoint_every > 0 and step % config.checkpoint_every == 0:
            self.save_checkpoint()
        return record

    def run(self) -> dict[str, Any]:
        """Train to `max_steps`; returns (and writes to OUT/summary.json) the run's summary."""
        config, env = self.config, self.env
        if self.finished is not None:
            if env.is_main:
                print(f"{self.out}: already trained for {self.step} steps, kept as it is "
                      f"(--overwrite retrains it)")
            return self.finished
        if env.is_main:
            checkpointing = ("" if config.activation_checkpointing == "none" else
                             f", {config.activation_checkpointing} activation checkpointing")
            print(f"student {config.student} ({self.built.record['init']} init): "
                  f"{self.parameters / 1e6:.2f}M parameters, "
                  f"{len(self.split.train)} training / {len(self.split.val)} held-out sequences, "
                  f"{self.tokens_per_step} tokens per step, {env.world_size} rank(s) on "
                  f"{env.device}{', FSDP' if self.sharded else ''}"
                  f"{', bf16 autocast' if self.bf16 else ''}{checkpointing}"
                  f"{', compiled decoder' if self.compiled else ''}"
                  f"{', attention within documents' if self.doc_mask else ''}")
            if config.doc_mask == "auto" and not self.doc_mask:
                print(f"note: --doc-mask auto is off for this student: its attention "
                      f"({self.student.config._attn_implementation}) does not keep to the "
                      f"documents of a packed row", file=sys.stderr)
            if len(self.split.val) == 0:
                print("warning: no held-out sequences (--val-fraction, --val-max-rows): no "
                      "validation figures, null in summary.json", file=sys.stderr)
        last_eval = self.evaluate() if self.step == 0 and config.eval_every > 0 else None
        # A compiled run's first step (of each session) compiles: it is timed apart and left out
        # of tokens/s.
        compile_seconds, compile_step = None, self.step + 1 if self.compiled else None
        progress = tqdm(total=config.max_steps, initial=self.step, unit="step",
                        disable=not env.is_main, dynamic_ncols=True)
        try:
            while self.step < config.max_steps:
                last_eval = self._step(progress, compile_step) or last_eval
                if self.step == compile_step:
                    compile_seconds = self.last_step_seconds
        finally:  # so that an error's one line starts a line of its own
            progress.close()

        if last_eval is None or last_eval["step"] != self.step:
            last_eval = self.evaluate()
        if config.checkpoint_every == 0 or self.step % config.checkpoint_every:
            self.save_checkpoint()
        # Measured over every step of the run, the ones before a resume included (checkpointed).
        summary = {
            "student": config.student, "init": self.built.record["init"],
            "init_details": self.built.record, "parameters": self.parameters, "steps": self.step,
            "tokens_seen": self.step * self.tokens_per_step,
            "tokens_per_s": self.tokens_per_s(),
            "train_seconds": self.train_seconds, "compile_seconds": compile_seconds,
            "lr": config.lr, "ce_weight": config.ce_weight,
            "kd_weight": config.kd_weight, "divergence": config.divergence,
            "select": config.select, "seed": config.seed, "rows_per_step": config.rows_per_step,
            "doc_mask": self.doc_mask,
            "held_out_fraction": config.val_fraction,
            **{k: v for k, v in last_eval.items() if k.startswith("val_")},
            "distill_version": distill_version(),
        }
        # A sharded student is gathered on rank 0 (on the CPU, a tensor at a time): on every rank.
        weights = (get_model_state_dict(self.student, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True)) if self.sharded else None)
        if env.is_main:
            save_student(self.student, self.out / STUDENT_DIR, self.manifest, training=summary,
                         chat_template=config.chat_template, state_dict=weights)
            write_json(self.out / SUMMARY_FILE, summary)
            write_json(self.out / CONFIG_FILE, asdict(config))
            figures = ("" if summary["val_ce"] is None else
                       f", val CE {summary['val_ce']:.4f} (PPL {summary['val_ppl']:.1f}), KL "
                       f"{summary['val_kl']:.4f}, top-1 {summary['val_top1']:.3f}")
            print(f"done: {self.step} steps, {summary['tokens_seen']:,} tokens{figures}; "
                  f"student saved to {self.out / STUDENT_DIR}")
            if compile_seconds is not None:
                print(f"compile: the first step took {compile_seconds:.1f} s (compilation "
                      f"included), not counted in tokens/s")
        return summary


def train(config: TrainConfig) -> dict[str, Any]:
    """Train one student; returns (and writes to OUT/summary.json) the run's summary."""
    trainer = Trainer(config)
    try:
        return trainer.run()
    finally:
        trainer.close()
