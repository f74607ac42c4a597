"""What `--doc-mask` costs a training step: the same student on the same rows, with and without it.

    python benchmarks/bench_doc_mask.py [--presets xs s] [--steps 8] [--batch-size 2]
        [--seq-len 512] [--doc-tokens 128]

A synthetic cache shaped like the default one (vocabulary 49152, top-64) whose rows are packed from
documents of geometric lengths with mean `--doc-tokens` (every row but a rare one has a boundary:
the masked case). Per preset two trainers, `--doc-mask off` and `on`, take their steps in turn
(interleaved, in alternating order), so load from other processes hits both alike; each one's
first step is a warm-up, left out. Reported: median and best wall seconds per step, median
process CPU seconds per step (less sensitive to other processes than wall time), and the on / off
ratios of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from bench_train import describe_machine, timed_step

from student_train.config import TrainConfig
from student_train.train import Trainer
from teacher_cache.synth import document_starts, write_synthetic_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["xs", "s"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--doc-tokens", type=int, default=128)
    args = parser.parse_args()

    describe_machine()
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = str(Path(scratch) / "cache")
        rows = 64
        starts = document_starts(rows, args.seq_len, args.doc_tokens, seed=0)
        write_synthetic_cache(cache_dir, sequences=rows, seq_len=args.seq_len, top_k=64,
                              vocab_size=49152, rows_per_shard=16, doc_starts=starts)
        boundaries = sum(len([s for s in row if s > 0]) for row in starts)
        print(f"cache: {rows} sequences x seq_len {args.seq_len}, top-64, vocab 49152; "
              f"{boundaries / rows:.1f} document boundaries per row (mean document "
              f"{args.doc_tokens} tokens), {sum(all(s == 0 for s in r) for r in starts)} rows "
              f"without one; batch {args.batch_size} sequences per step")
        print(f"\n{'preset':<8}{'params':>10}{'doc mask':>10}{'s/step':>9}{'best':>8}"
              f"{'CPU s/step':>12}{'on / off':>10}{'CPU on / off':>14}")
        for preset in args.presets:
            trainers = {}
            for mode in ("off", "on"):
                trainers[mode] = trainer = Trainer(TrainConfig(
                    cache=cache_dir, out=str(Path(scratch) / f"{preset}-{mode}"), student=preset,
                    max_steps=args.steps + 1, batch_size=args.batch_size, warmup=1,
                    doc_mask=mode))
                assert trainer.doc_mask == (mode == "on")
                trainer.train_step()  # warm-up: first-call allocations, thread start
            wall = {mode: [] for mode in trainers}
            cpu = {mode: [] for mode in trainers}
            for step in range(args.steps):
                # off, on, on, off, ...: neither mode always follows the other
                for mode in ("off", "on") if step % 2 == 0 else ("on", "off"):
                    seconds, cpu_seconds = timed_step(trainers[mode])
                    wall[mode].append(seconds)
                    cpu[mode].append(cpu_seconds)
            for mode, trainer in trainers.items():
                ratios = [statistics.median(t[mode]) / statistics.median(t["off"])
                          for t in (wall, cpu)]
                print(f"{preset:<8}{trainer.parameters / 1e6:>9.2f}M{mode:>10}"
                      f"{statistics.median(wall[mode]):>9.3f}{min(wall[mode]):>8.3f}"
                      f"{statistics.median(cpu[mode]):>12.3f}{ratios[0]:>9.3f}x"
                      f"{ratios[1]:>13.3f}x", flush=True)
    print(f"\nload average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
