"""Students pruned from the teacher against the same shapes from random init, on one cache
(BENCHMARKS.md, "Students pruned from the teacher and Hugging Face students").

    python benchmarks/bench_students.py --cache CACHE --out DIR \
        --students "prune:layers=8 prune:layers=8,hidden=256" --seeds 0 1 --steps 60

Each student trains from each of --inits (pruned: cut from the teacher; random: its shape at
random init) at the trainer's default learning rate of that init, or at each of --lrs; with KD
(CE + KD, fkl) and, for the students --ce-only names, also CE only. Per run: the validation CE and
the CE on an installed package's sources (--heldout-package, text outside the corpus) right after
the build (step 0) and after training, the training tokens/s and the build's seconds (the
pruning importance included). --steps 0 builds and evaluates only. A finished run is kept
(OUT/<run>/bench.json) and its heavy files dropped; rerun the command to continue.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_train import describe_machine

from student_train.config import TrainConfig
from student_train.heldout import load_heldout_text, text_ce
from student_train.pretrain import student_name
from student_train.train import Trainer
from teacher_cache import open_cache

INITS = {"pruned": "auto", "random": "random"}  # the table's word -> TrainConfig.init


def run_one(args: argparse.Namespace, text, student: str, init: str, lr: float | None, seed: int,
            ce_only: bool) -> dict:
    name = (f"{student_name(student)}-{init}-lr{lr if lr else 'default'}-seed{seed}"
            + ("-ce" if ce_only else ""))
    out = Path(args.out) / name
    if (out / "bench.json").is_file():
        return json.loads((out / "bench.json").read_text())
    config = TrainConfig(cache=args.cache, out=str(out), student=student, init=INITS[init], lr=lr,
                         seed=seed, max_steps=max(args.steps, 1), batch_size=args.batch_size,
                         eval_every=0, checkpoint_every=0, log_every=10,
                         kd_weight=0.0 if ce_only else 1.0, overwrite=True)
    started = time.perf_counter()
    trainer = Trainer(config)
    build_seconds = time.perf_counter() - started
    device = trainer.env.device
    result = {"run": name, "student": student, "init": init, "lr": config.lr, "seed": seed,
              "kd": not ce_only, "steps": args.steps, "parameters": trainer.parameters,
              "build_seconds": build_seconds, "val_ce_0": trainer.evaluate()["val_ce"],
              "text_ce_0": text_ce(trainer.student, text, device, doc_mask=trainer.doc_mask)}
    if args.steps:
        summary = trainer.run()
        result |= {"val_ce": summary["val_ce"],
                   "text_ce": text_ce(trainer.student, text, device, doc_mask=trainer.doc_mask),
                   "tokens_per_s": summary["tokens_per_s"], "tokens": summary["tokens_seen"]}
    for heavy in (out / "checkpoint.pt", out / "student" / "model.safetensors"):
        heavy.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    return result


def table(results: list[dict]) -> str:
    lines = ["| student | init | params | lr | seed | loss | val CE step 0 | val CE | "
             "text CE step 0 | text CE | train tokens/s | build s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        trained = "val_ce" in r
        lines.append(
            f"| {r['student']} | {r['init']} | {r['parameters'] / 1e6:.1f}M | {r['lr']:g} | "
            f"{r['seed']} | {'CE + KD' if r['kd'] else 'CE only'} | {r['val_ce_0']:.3f} | "
            f"{r['val_ce']:.3f} | {r['text_ce_0']:.3f} | {r['text_ce']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {r['build_seconds']:.0f} |" if trained else
            f"| {r['student']} | {r['init']} | {r['parameters'] / 1e6:.1f}M | {r['lr']:g} | "
            f"{r['seed']} | - | {r['val_ce_0']:.3f} | - | {r['text_ce_0']:.3f} | - | - | "
            f"{r['build_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--students", required=True, help="space separated prune: specs")
    parser.add_argument("--inits", default="pruned random")
    parser.add_argument("--seeds", default="0 1")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lrs", default="", help="learning rates to sweep (default: each "
                                                  "init's default)")
    parser.add_argument("--ce-only", default="", help="students also trained CE only")
    parser.add_argument("--heldout-package", default="numpy")
    parser.add_argument("--heldout-tokens", type=int, default=16384)
    args = parser.parse_args(argv)
    text = load_heldout_text(open_cache(args.cache), args.heldout_package, args.heldout_tokens)
    describe_machine()
    print(f"{time.strftime('%Y-%m-%d')}; held-out text: {text.description}", flush=True)
    lrs = [float(lr) for lr in args.lrs.split()] or [None]
    results = []
    for seed in map(int, args.seeds.split()):
        for student in args.students.split():
            for init in args.inits.split():
                for lr in lrs:
                    for ce_only in (False, True) if student in args.ce_only.split() else (False,):
                        result = run_one(args, text, student, init, lr, seed, ce_only)
                        print(json.dumps(result), flush=True)
                        results.append(result)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
