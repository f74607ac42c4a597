"""Student training throughput per preset (float32 and bf16 autocast) and cache reader throughput.

    python benchmarks/bench_train.py [--cache DIR] [--presets xs s] [--steps 8] [--batch-size 2]

Without --cache it writes a synthetic cache shaped like the default one (256 sequences of 512
tokens, top-64, vocabulary 49152). Training times the real step (`Trainer.train_step`), so the
steps include data loading and the optimizer. Reported per preset: median and best tokens/s over the
timed steps, and the median process CPU seconds per step (less sensitive to other processes on the
machine than wall time). The reader figures are decode-only (every shard) and the full training
stream (plan, shuffle, batches) for one epoch.
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

from student_train.config import TrainConfig
from student_train.data import TrainStream, split_rows
from student_train.selection import Selection
from student_train.synthetic import write_synthetic_cache
from student_train.train import Trainer
from teacher_cache.reader import open_cache


def describe_machine() -> None:
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, CUDA {torch.cuda.is_available()}, load average "
          f"{os.getloadavg()[0]:.1f} (other processes share the CPUs above 0)")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, pyarrow {pyarrow.__version__}, "
          f"numpy {np.__version__}")


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
        print(f"\n{'preset':<8}{'params':>10}{'precision':>11}{'tokens/s':>10}{'best':>8}"
              f"{'s/step':>8}{'CPU s/step':>12}")
        for preset in args.presets:
            for precision in args.precisions:
                config = TrainConfig(
                    cache=cache_dir, out=str(Path(scratch) / f"{preset}-{precision}"),
                    student=preset, max_steps=args.steps + 1, batch_size=args.batch_size,
                    warmup=1, precision=precision)
                trainer = Trainer(config)
                trainer.train_step()  # warm-up: first-call allocations and thread start
                wall, cpu = [], []
                for _ in range(args.steps):
                    started, started_cpu = time.perf_counter(), time.process_time()
                    trainer.train_step()
                    wall.append(time.perf_counter() - started)
                    cpu.append(time.process_time() - started_cpu)
                tokens = trainer.tokens_per_step
                fastest = max(fastest, tokens / statistics.median(wall))
                print(f"{preset:<8}{trainer.parameters / 1e6:>9.2f}M{precision:>11}"
                      f"{tokens / statistics.median(wall):>10,.0f}{tokens / min(wall):>8,.0f}"
                      f"{statistics.median(wall):>8.2f}{statistics.median(cpu):>12.2f}")
        print(f"\nreader stream / fastest training: {stream / fastest:,.0f}x; load average now "
              f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
