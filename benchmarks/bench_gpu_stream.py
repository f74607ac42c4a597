"""Section 4 of the GPU report: tokens/s of the training data stream (TrainStream through a
DataLoader, as the trainer builds it) from the synthetic sample:8 cache, on this host's CPUs, per
number of data loader workers; the report sets it next to what section 2's student consumes.

`training_batches` is the one place that obtains the stream: it takes the trainer's own iterator,
so the stream is built exactly as in training, whatever its constructor's arguments become.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from bench_gpu_common import Deadline, Row, RowWriter, Scale, error_text, shared_cache

from student_train.config import TrainConfig
from student_train.data import Batch
from student_train.train import Trainer

STREAM_STUDENT = "xs"  # the trainer needs a student; the stream does not depend on it


def training_batches(config: TrainConfig) -> Iterator[Batch]:
    """The trainer's own batch iterator: Trainer.__init__ (student_train/train.py) builds the
    TrainStream and its DataLoader (pin_memory on CUDA) from `config`, as for any run. The student
    it also builds is the smallest preset's; only the iterator is kept."""
    return Trainer(config).batches


def stream_rate(batches: Iterator[Batch], warm: int, seconds: float) -> tuple[float, int]:
    """(tokens/s, batches timed) over at least `seconds`, after `warm` batches (the workers'
    start and first shard reads)."""
    for _ in range(warm):
        next(batches)
    tokens, count, started = 0, 0, time.perf_counter()
    while count < 2 or time.perf_counter() - started < seconds:
        tokens += next(batches).num_tokens
        count += 1
    return tokens / (time.perf_counter() - started), count


def stream_row(scale: Scale, cache: str, scratch: Path, workers: int) -> Row:
    name = f"{workers} workers"
    config = TrainConfig(cache=cache, out=str(scratch / f"stream-{workers}"),
                         student=STREAM_STUDENT, batch_size=scale.batch_size, workers=workers,
                         overwrite=True)
    try:
        batches = training_batches(config)
        rate, count = stream_rate(batches, max(1, workers), scale.stream_seconds)
        del batches  # shuts the workers down
    except Exception as exc:  # noqa: BLE001 - one failing worker count must not end the section
        return Row(name, {"workers": workers}, error=error_text(exc))
    return Row(name, {"workers": workers, "batch": f"{scale.batch_size} x {scale.seq_len}",
                      "batches": count, "tokens_per_s": rate})


def run(scale: Scale, writer: RowWriter, deadline: Deadline, scratch: Path) -> None:
    writer.plan([f"{workers} workers" for workers in scale.stream_workers])
    cache, note = shared_cache(scale, scratch)
    writer.note(note)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    writer.note(f"{cpus} CPUs usable by this process, torch threads {torch.get_num_threads()}; "
                f"pin_memory {torch.cuda.is_available()}; each row timed for at least "
                f"{scale.stream_seconds} s after max(1, workers) warm-up batches")
    for workers in scale.stream_workers:
        if deadline.passed():
            return
        writer.row(stream_row(scale, cache, scratch, workers))
