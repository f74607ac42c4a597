"""Section 2 of the GPU report: the student's optimizer step through the real trainer
(`student_train.train.Trainer.train_step`: data loading, CE + sparse KD loss, backward, AdamW),
eager and with the compiled decoder, on the synthetic sample:8 cache; for the compile target
preset also under FSDP2 on this one GPU (the wrapping's cost, no sharding gain), with full
activation checkpointing (its time and its peak memory against eager) and without the document
mask that every other row applies (`--doc-mask off`: the mask's cost, from the ratio).

Per trainer: the first step is timed apart (for a compiled decoder, the compile), then a few
untimed steps, then the timed steps with one device synchronisation at their end (the CPU may run
ahead of the GPU between steps, as in training). Model FLOPs and the bf16 peaks are
benchmarks/bench_train.py's.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from bench_gpu_common import (
    Deadline,
    Row,
    RowWriter,
    Scale,
    error_text,
    peak_memory_gib,
    release_memory,
    reset_peak_memory,
    shared_cache,
    synchronize,
)
from bench_train import bf16_peak_flops, model_flops_per_token

from student_train.config import TrainConfig
from student_train.train import Trainer

# Each mode's TrainConfig settings; eager first, the others' "vs eager".
MODES = {"eager": {"compile": "off"}, "compiled": {"compile": "on"},
         "fsdp": {"compile": "off", "parallel": "fsdp"},
         "checkpointed": {"compile": "off", "activation_checkpointing": "full"},
         "no doc mask": {"compile": "off", "doc_mask": "off"}}
EVERY_PRESET = ("eager", "compiled")


def row_name(preset: str, mode: str) -> str:
    return f"{preset} {mode}"


def train_config(scale: Scale, cache: str, out: Path, preset: str, mode: str) -> TrainConfig:
    steps = 1 + scale.student_warm_steps + scale.student_steps
    return TrainConfig(cache=cache, out=str(out / f"student-{preset}-{mode}"), student=preset,
                       max_steps=steps, batch_size=scale.batch_size, warmup=1,
                       precision=scale.precision, compile_backend=scale.compile_backend,
                       workers=scale.train_workers, eval_every=0, checkpoint_every=0,
                       overwrite=True, **MODES[mode])


def time_steps(trainer: Trainer, warm_steps: int, steps: int) -> tuple[float, float]:
    """(seconds of the first step, seconds of `steps` timed steps after `warm_steps` more)."""
    device = trainer.env.device
    started = time.perf_counter()
    trainer.train_step()
    synchronize(device)
    first = time.perf_counter() - started
    for _ in range(warm_steps):
        trainer.train_step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    synchronize(device)
    return first, time.perf_counter() - started


def student_row(scale: Scale, config: TrainConfig, mode: str, peak: float | None,
                eager_rate: float | None) -> Row:
    trainer = Trainer(config)
    device = trainer.env.device
    reset_peak_memory(device)
    try:
        first, seconds = time_steps(trainer, scale.student_warm_steps, scale.student_steps)
    finally:
        trainer.close()  # FSDP's process group of this process alone goes with it
    rate = scale.student_steps * trainer.tokens_per_step / seconds
    flops = rate * model_flops_per_token(trainer)
    values = {
        "preset": config.student, "parameters_m": trainer.parameters / 1e6,
        "batch": f"{config.batch_size} x {trainer.manifest.seq_len}",
        "precision": "bf16" if trainer.bf16 else "fp32",
        "mode": mode,
        "tokens_per_s": rate, "step_ms": seconds / scale.student_steps * 1e3,
        "first_step_s": first, "mfu": flops / peak if peak else None,
        "tflops": flops / 1e12, "speedup": rate / eager_rate if eager_rate else None,
        "peak_gib": peak_memory_gib(device),
    }
    del trainer
    release_memory()
    return Row(row_name(config.student, mode), values)


def run(scale: Scale, writer: RowWriter, deadline: Deadline, scratch: Path) -> None:
    plan = [(preset, mode) for preset in scale.presets for mode in EVERY_PRESET]
    plan += [(scale.compile_target_preset, mode) for mode in MODES if mode not in EVERY_PRESET]
    writer.plan([row_name(preset, mode) for preset, mode in plan])
    cache, note = shared_cache(scale, scratch)
    writer.note(note)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = bf16_peak_flops(device)
    writer.note(f"MFU: model FLOPs (6 x parameters + attention, bench_train) against a dense bf16 "
                f"peak of {peak / 1e12:.0f} TFLOP/s ({torch.cuda.get_device_name(device)})"
                if peak else f"MFU: no bf16 peak known for {device}; TFLOP/s only")
    writer.note(f"{scale.batch_size} sequences x {scale.seq_len} tokens per step, precision "
                f"{scale.precision}, compile backend {scale.compile_backend}, "
                f"{scale.train_workers} data loader workers; first step timed apart, then "
                f"{scale.student_warm_steps} untimed and {scale.student_steps} timed steps")
    eager: dict[str, float] = {}
    for preset, mode in plan:
        if deadline.passed():
            break
        config = train_config(scale, cache, scratch, preset, mode)
        try:
            row = student_row(scale, config, mode, peak,
                              eager.get(preset) if mode != "eager" else None)
        except Exception as exc:  # noqa: BLE001 - one failing trainer must not end the section
            row = Row(row_name(preset, mode), {"preset": preset}, error=error_text(exc))
            release_memory()
        if mode == "eager" and row.values.get("tokens_per_s"):
            eager[preset] = row.values["tokens_per_s"]
        writer.row(row)
