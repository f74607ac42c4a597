"""What --parallel and --activation-checkpointing cost per training step: one process with each
checkpointing mode, then DDP and FSDP on N processes (torchrun; gloo on CPU, NCCL on GPUs).

    python benchmarks/bench_parallel.py [--student s] [--steps 20] [--batch-size 8] [--ranks 2]
        [--rounds 3]

On a synthetic cache (256 sequences of 128 tokens, top-8, vocabulary 4096), each run's
summary.json: seconds per optimizer step over its timed steps, best and median of the rounds.
Every process computes on one thread (the single process too), so a rank's figures compare with
the single process's. The runs take turns, round after round: a burst of load from other
processes on the machine hits one round, not one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from bench_train import describe_machine

from student_train.config import TrainConfig
from student_train.train import train
from teacher_cache.synth import write_synthetic_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="s")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    describe_machine()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        write_synthetic_cache(cache, sequences=256, seq_len=128, top_k=8, vocab_size=4096,
                              rows_per_shard=32)
        flags = {"cache": str(cache), "student": args.student, "max_steps": args.steps,
                 "batch_size": args.batch_size, "eval_every": 0, "checkpoint_every": 0,
                 "log_every": args.steps, "overwrite": True}
        runs = {f"1 process, checkpointing {mode}": partial(single, flags, mode)
                for mode in ("none", "full", "selective")}
        runs |= {f"{args.ranks} ranks, {parallel}": partial(ranks, flags, parallel, args.ranks)
                 for parallel in ("ddp", "fsdp")}
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):  # in turn, so that a burst of load hits one round
            for index, (name, run) in enumerate(runs.items()):
                summary = run(Path(tmp) / f"run-{index}")
                seconds[name].append(summary["train_seconds"] / summary["steps"])
    print(f"student {args.student}, {args.steps} steps of {args.batch_size} x 128 tokens, "
          f"{args.rounds} rounds; seconds per step")
    print(f"{'run':<34} {'best':>7} {'median':>7}")
    for name, times in seconds.items():
        print(f"{name:<34} {min(times):>7.3f} {statistics.median(times):>7.3f}")


def single(flags: dict, mode: str, out: Path) -> dict:
    return train(TrainConfig(out=str(out), activation_checkpointing=mode, **flags))


def ranks(flags: dict, parallel: str, count: int, out: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(count), "-m", "student_train", "--out", str(out), "--parallel", parallel,
               *[f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
                 for k, v in flags.items()]]
    subprocess.run(command, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads((out / "summary.json").read_text())


if __name__ == "__main__":
    main()
