"""`make pretrain`: train several students on one cache, then compare them in a table and a plot.

    python -m student_train.pretrain --cache DIR --students "xs s" --out DIR --max-steps N
        [--baseline] [any training flag of python -m student_train]

Each student trains in OUT/<preset> (OUT/<preset>-ce for the CE-only baseline of --baseline) and
resumes from its checkpoint when the command is rerun (a finished run is kept as it is; --overwrite
retrains every run from scratch). Results: OUT/results.json and OUT/val_ce.png (validation CE
against training tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from student_train.config import ConfigError, add_arguments, config_from_args
from student_train.presets import PRESETS
from teacher_cache.errors import reports_user_errors

RESULTS_FILE = "results.json"
PLOT_FILE = "val_ce.png"
# Sized for the default cache (256 x 512 tokens) on 2 CPU cores: 200 steps of 2 sequences are 1.6
# epochs, about 1 minute of training for xs and 3 to 5 for s (benchmarks/bench_train.py).
DRIVER_DEFAULTS = {"batch_size": 2, "eval_every": 40, "checkpoint_every": 50, "log_every": 5}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m student_train.pretrain",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--students", default="xs s",
                        help=f"presets to train, space separated, from {', '.join(PRESETS)} "
                             f"(default: xs s)")
    parser.add_argument("--baseline", action="store_true",
                        help="also train every student CE-only (kd_weight=0) for comparison")
    parser.add_argument("--out", required=True,
                        help="directory holding one run directory per student, the results and "
                             "the plot")
    add_arguments(parser, skip=("student", "resume", "out"))
    parser.set_defaults(**DRIVER_DEFAULTS)
    return parser


def run_name(student: str, ce_only: bool) -> str:
    return f"{student}-ce" if ce_only else student


def eval_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    points = [(r["tokens"], r["val_ce"]) for r in records if "val_ce" in r]
    return [t for t, _ in points], [ce for _, ce in points]


def format_table(results: list[dict[str, Any]]) -> str:
    header = (f"{'run':<10}{'params':>9}{'tokens':>10}{'val CE':>9}{'val PPL':>10}"
              f"{'val KL':>9}{'top-1':>8}{'tokens/s':>10}")
    rows = [header, "-" * len(header)]
    for r in results:
        tokens_per_s = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        rows.append(f"{r['run']:<10}{r['parameters'] / 1e6:>8.2f}M{r['tokens_seen']:>10,}"
                    f"{r['val_ce']:>9.3f}{r['val_ppl']:>10.1f}{r['val_kl']:>9.3f}"
                    f"{r['val_top1']:>8.3f}{tokens_per_s:>10}")
    return "\n".join(rows)


def plot_curves(out: Path, run_dirs: dict[str, Path]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for name, run_dir in run_dirs.items():
        student, ce_only = name.removesuffix("-ce"), name.endswith("-ce")
        color = colors.setdefault(student, f"C{len(colors)}")
        tokens, ce = eval_curve(run_dir)
        ax.plot(tokens, ce, marker="o", markersize=3, color=color,
                linestyle="--" if ce_only else "-",
                label=f"{student} CE only" if ce_only else f"{student} CE + KD")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation CE (nats/token)")
    ax.set_title("Students on the teacher cache")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / PLOT_FILE
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from student_train.train import train  # after argument errors, so --help stays fast

    out = Path(args.out)
    students = args.students.split()
    unknown = [s for s in students if s not in PRESETS]
    if not students or unknown:
        raise ConfigError(f"--students {args.students!r}: choose from {', '.join(PRESETS)}")
    base = config_from_args(args, student=students[0], resume=not args.overwrite)
    results, run_dirs = [], {}
    for ce_only in [False, True] if args.baseline else [False]:
        for student in students:
            name = run_name(student, ce_only)
            run_dirs[name] = out / name
            print(f"== {name} ==", flush=True)
            config = replace(base, student=student, out=str(run_dirs[name]),
                             **({"kd_weight": 0.0} if ce_only else {}))
            results.append({"run": name, **train(config)})
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(format_table(results))
    print(f"\nresults: {out / RESULTS_FILE}")
    try:
        print(f"plot: {plot_curves(out, run_dirs)}")
    except ImportError:
        print("plot: skipped, matplotlib is not installed (pip install 'distill[plot]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
