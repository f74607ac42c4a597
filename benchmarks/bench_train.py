"""Student training throughput per preset (float32 and bf16 autocast, eager and compiled decoder)
and cache reader throughput.

    python benchmarks/bench_train.py [--cache DIR] [--presets xs s] [--steps 8] [--batch-size 2]
        [--precisions fp32 bf16] [--compile off on] [--compile-backend inductor]

Without --cache it writes a synthetic cache shaped like the default one (256 sequences of 512
tokens, top-64, vocabulary 49152). Training times the real step (`Trainer.train_step`), so the
steps include data loading and the optimizer. Reported per preset: median and best tokens/s over the
timed steps, and the median process CPU seconds per step (less sensitive to other processes on the
machine than wall time). The eager and compiled trainers of a preset and precision step in turn
(interleaved), so load from other processes hits both alike; the compiled one's first step (the
compile) is reported apart. Model FLOPs: 6 x parameters (a tied embedding once: the LM head) plus
attention's 12 x layers x hidden x seq_len, per token; utilisation against the device's dense bf16
peak on known GPUs, GFLOP/s elsewhere. The reader figures are decode-only (every shard) and the
full training stream (plan, shuffle, batches) for one epoch.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow
import torch
import transformers

from student_train.config import CHOICES, TrainConfig
from student_train.data import TrainStream, split_rows
from student_train.selection import Selection
from student_train.train import Trainer
from teacher_cache.reader import open_cache
from teacher_cache.synth import write_synthetic_cache


def synchronize() -> None:
    """Wait for the GPU, so that a clock read after a step times the step, not its launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_step(trainer) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one `trainer.train_step()`."""
    synchronize()
    started, started_cpu = time.perf_counter(), time.process_time()
    trainer.train_step()
    synchronize()
    return time.perf_counter() - started, time.process_time() - started_cpu


def describe_machine() -> None:
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, CUDA {torch.cuda.is_available()}, load average "
          f"{os.getloadavg()[0]:.1f} (other processes share the CPUs above 0)")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, pyarrow {pyarrow.__version__}, "
          f"numpy {np.__version__}")


# Dense bf16 peaks from the vendors' spec sheets, by a substring of torch.cuda.get_device_name().
BF16_PEAK_FLOPS = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}


def bf16_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS.items() if key in name), None)


def model_flops_per_token(trainer: Trainer) -> float:
    """Forward + backward FLOPs per training token: 6 per matmul parameter, plus attention."""
    config = trainer.student.config
    parameters = trainer.parameters
    if not config.tie_word_embeddings:  # the input embedding is a lookup, not a matmul
        parameters -= trainer.student.get_input_embeddings().weight.numel()
    attention = 12 * config.num_hidden_layers * config.hidden_size * trainer.manifest.seq_len
    return 6 * parameters + attention


def throughput_column(flops_per_s: float, peak: float | None) -> str:
    return f"{flops_per_s / peak:.1%}" if peak else f"{flops_per_s / 1e9:,.1f}"


def reader_throughput(cache_dir: str, batch_size: int) -> tuple[float, float]:
    """(decode tokens/s over every shard, training stream tokens/s over one epoch)."""
    cache = open_cache(cache_dir)
    started = time.perf_counter()
    tokens = sum(cache.read_shard(i).input_ids.size for i in range(len(cache.shards)))
    decode = tokens / (time.perf_counter() - started)

    split = split_rows(cache, 0.05, Selection(), seed=0)
    stream = iter(TrainStream(cache_dir, split.train, global_batch=batch_size, rank=0,
                              world_size=1, seed=0, shuffle_buffer=256))
    started = time.perf_counter()
    tokens = sum(next(stream).num_tokens for _ in range(len(split.train) // batch_size))
    return decode, tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="an existing cache (default: a synthetic one)")
    parser.add_argument("--presets", nargs="+", default=["xs", "s"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"],
                        help="decoder modes to compare (default: off on)")
    parser.add_argument("--compile-backend", default="inductor", choices=CHOICES["compile_backend"])
    args = parser.parse_args()

    describe_machine()
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = args.cache
        if cache_dir is None:
            cache_dir = str(Path(scratch) / "cache")
            write_synthetic_cache(cache_dir, sequences=256, seq_len=512, top_k=64,
                                  vocab_size=49152, rows_per_shard=64)
        m = open_cache(cache_dir).manifest
        print(f"cache: {m.totals.get('sequences')} sequences x seq_len {m.seq_len}, "
              f"top-k {m.top_k}, vocab {m.vocab_size}; batch {args.batch_size} sequences "
              f"({args.batch_size * m.seq_len} tokens) per step")

        decode, stream = reader_throughput(cache_dir, args.batch_size)
        print(f"reader: decode {decode:,.0f} tokens/s, training stream {stream:,.0f} tokens/s")

        fastest = 0.0
        peak = bf16_peak_flops(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        print(f"\n{'preset':<8}{'params':>10}{'precision':>11}{'decoder':>10}{'tokens/s':>10}"
              f"{'best':>8}{'s/step':>8}{'CPU s/step':>12}{'MFU' if peak else 'GFLOP/s':>9}"
              f"{'speed-up':>10}{'compile s':>11}")
        for preset in args.presets:
            for precision in args.precisions:
                trainers, first_step = {}, {}
                for mode in args.compile:
                    config = TrainConfig(
                        cache=cache_dir, out=str(Path(scratch) / f"{preset}-{precision}-{mode}"),
                        student=preset, max_steps=args.steps + 1, batch_size=args.batch_size,
                        warmup=1, precision=precision, compile=mode,
                        compile_backend=args.compile_backend)
                    trainers[mode] = trainer = Trainer(config)
                    # Warm-up, timed: first-call allocations, thread start, and the compile.
                    started = time.perf_counter()
                    trainer.train_step()
                    synchronize()
                    first_step[mode] = time.perf_counter() - started
                wall = {mode: [] for mode in trainers}
                cpu = {mode: [] for mode in trainers}
                for _ in range(args.steps):
                    for mode, trainer in trainers.items():
                        seconds, cpu_seconds = timed_step(trainer)
                        wall[mode].append(seconds)
                        cpu[mode].append(cpu_seconds)
                eager_rate = None
                for mode, trainer in trainers.items():
                    tokens = trainer.tokens_per_step
                    rate = tokens / statistics.median(wall[mode])
                    eager_rate = rate if mode == "off" else eager_rate
                    fastest = max(fastest, rate)
                    speedup = f"{rate / eager_rate:.2f}x" if eager_rate else "-"
                    compile_s = f"{first_step[mode]:.1f}" if trainer.compiled else "-"
                    flops = throughput_column(rate * model_flops_per_token(trainer), peak)
                    print(f"{preset:<8}{trainer.parameters / 1e6:>9.2f}M{precision:>11}"
                          f"{'compiled' if trainer.compiled else 'eager':>10}{rate:>10,.0f}"
                          f"{tokens / min(wall[mode]):>8,.0f}{statistics.median(wall[mode]):>8.2f}"
                          f"{statistics.median(cpu[mode]):>12.2f}{flops:>9}{speedup:>10}"
                          f"{compile_s:>11}", flush=True)
        print(f"\nreader stream / fastest training: {stream / fastest:,.0f}x; load average now "
              f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
