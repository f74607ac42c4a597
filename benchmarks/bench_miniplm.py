"""MiniPLM difference sampling on a scored cache: does training on the top-scoring half help?

    python benchmarks/bench_miniplm.py [--cache runs/cache] [--student xs] [--steps 100]
        [--batch-size 2] [--fraction 0.5] [--out runs/miniplm]

Trains the same student preset for the same number of tokens on (a) every training sequence,
(b) `random:F` and (c) `top:F` (highest MiniPLM score), each with KD (kd_weight 1) and CE only
(kd_weight 0), and compares their CE on the held-out split. The held-out split is a hash of the
seq_id, the same for every run, and selection only ever sees the training rows: the script checks
both. The cache must be scored first (`make cache`, or `python -m teacher_cache score`). Each run
resumes from its own directory under --out, so a rerun only finishes what is missing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow
import torch
import transformers

from student_train.config import TrainConfig
from student_train.data import split_rows
from student_train.selection import Selection
from student_train.train import train
from teacher_cache.format import Manifest
from teacher_cache.reader import open_cache
from teacher_cache.storage import write_json


def describe(cache_dir: str, manifest: Manifest, config: TrainConfig) -> dict[str, Any]:
    reference = manifest.score["reference"]
    training = reference.get("training", {})
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch threads "
                   f"{torch.get_num_threads()}, CUDA {torch.cuda.is_available()}, load average "
                   f"{os.getloadavg()[0]:.1f}",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
                    f"transformers {transformers.__version__}, pyarrow {pyarrow.__version__}",
        "cache": f"{cache_dir}: {manifest.totals['sequences']} sequences x {manifest.seq_len} "
                 f"tokens, top-{manifest.top_k}, vocabulary {manifest.vocab_size}, teacher "
                 f"{manifest.teacher['name']}",
        "reference": f"{reference['name']} ({reference['path']}), "
                     + (f"{training.get('student')} trained {training.get('steps')} steps, "
                        f"{training.get('tokens_seen')} tokens, kd_weight "
                        f"{training.get('kd_weight')}, {training.get('train_seconds', 0):.0f} s"
                        if training else
                        "not trained by student_train"),
        "student": f"{config.student}, {config.max_steps} steps x {config.rows_per_step} "
                   f"sequences, lr {config.lr}, seed {config.seed}",
    }


def check_splits(cache_dir: str, selections: list[str], val_fraction: float,
                 seed: int) -> dict[str, dict[str, float]]:
    """Every selection shares one held-out split and never trains on it; their score statistics."""
    cache = open_cache(cache_dir)
    seq_ids, scores = cache.read_scores()
    score_of = dict(zip(seq_ids.tolist(), scores.tolist(), strict=True))
    splits = {s: split_rows(cache, val_fraction, Selection.parse(s), seed) for s in selections}
    val = splits[selections[0]].val
    stats = {}
    for name, split in splits.items():
        assert np.array_equal(split.val, val), f"{name}: another held-out split"
        assert not set(split.train.tolist()) & set(val.tolist()), f"{name}: trains on held-out"
        kept = np.array([score_of[i] for i in split.train.tolist()])
        stats[name] = {"rows": len(split.train), "score_mean": float(kept.mean())}
    stats["held-out"] = {"rows": len(val),
                         "score_mean": float(np.mean([score_of[i] for i in val.tolist()]))}
    return stats


def format_table(results: list[dict[str, Any]]) -> str:
    header = (f"{'selection':<12}{'KD':>4}{'rows':>6}{'score':>8}{'tokens':>9}{'val CE':>9}"
              f"{'val PPL':>9}{'top-1':>7}{'tok/s':>7}")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r['select']:<12}{r['kd_weight']:>4g}{r['rows']:>6}{r['score_mean']:>8.3f}"
                     f"{r['tokens_seen']:>9,}{r['val_ce']:>9.4f}{r['val_ppl']:>9.1f}"
                     f"{r['val_top1']:>7.3f}{r['tokens_per_s'] or 0:>7.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="runs/cache", help="a scored teacher cache")
    parser.add_argument("--student", default="xs", help="student preset of every run")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every run")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step")
    parser.add_argument("--fraction", type=float, default=0.5, help="F of random:F and top:F")
    parser.add_argument("--seed", type=int, default=0, help="model init, data order, random:F")
    parser.add_argument("--out", default="runs/miniplm", help="run directories and results.json")
    args = parser.parse_args()

    manifest = open_cache(args.cache).manifest
    if not manifest.score:
        sys.exit(f"{args.cache} has no scores: run `make cache` or `python -m teacher_cache score "
                 f"--cache {args.cache} --reference MODEL` first")
    selections = ["none", f"random:{args.fraction:g}", f"top:{args.fraction:g}"]
    base = TrainConfig(cache=args.cache, out="", student=args.student, max_steps=args.steps,
                       batch_size=args.batch_size, seed=args.seed,
                       eval_every=max(args.steps // 4, 1), checkpoint_every=args.steps,
                       resume=True)
    header = describe(args.cache, manifest, base)
    for key, value in header.items():
        print(f"{key}: {value}")
    stats = check_splits(args.cache, selections, base.val_fraction, args.seed)
    print(f"held-out: {stats['held-out']['rows']} sequences, the same for every run, never "
          f"trained on")

    out = Path(args.out)
    results = []
    started = time.perf_counter()
    for select in selections:
        for kd_weight in (1.0, 0.0):
            name = f"{select.replace(':', '-')}-{'kd' if kd_weight else 'ce'}"
            print(f"== {name} ==", flush=True)
            summary = train(replace(base, out=str(out / name), select=select,
                                    kd_weight=kd_weight))
            results.append({"run": name, "select": select, **stats[select], **summary})
    elapsed = time.perf_counter() - started

    print()
    print(format_table(results))
    print(f"\n{len(results)} runs in {elapsed / 60:.1f} min")
    out.mkdir(parents=True, exist_ok=True)
    report = {**header, "score_stats": manifest.score["stats"], "held_out": stats["held-out"],
              "runs": results, "seconds": elapsed}
    write_json(out / "results.json", report)
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
