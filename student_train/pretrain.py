"""`make pretrain`: train several students on one cache, then compare them in a table and a plot.

    python -m student_train.pretrain --cache DIR --students "xs s prune:layers=8" --out DIR
        --max-steps N [--baseline [STUDENTS]] [--random-init [STUDENTS]]
        [--heldout-package NAME] [any flag of python -m student_train]

A student is anything --student takes: a preset, prune:..., a Hugging Face model directory. Each
trains in OUT/<name> (the preset's name, prune-layers8 for prune:layers=8, the directory's name;
OUT/<name>-ce for the CE-only baseline of --baseline, OUT/<name>-random for the same shape from
random init of --random-init) and resumes from its checkpoint when the command is rerun (a
finished run is kept as it is; --overwrite retrains every run from scratch). Results:
OUT/results.json and OUT/val_ce.png (validation CE against training tokens, with the teacher's CE
on the same held-out rows as a reference line). At the end, the held-out comparison: each larger
random-init student against the next smaller one, each pruned or pretrained student against the
same shape from random init, and each student with KD against its CE-only baseline, on the
cache's validation rows and on text outside the corpus (--heldout-package).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from student_train.config import TrainConfig
from student_train.presets import PRESETS, describe_presets
from student_train.prune import PruneSpec
from student_train.students import PresetStudent, parse_student
from teacher_cache import open_cache
from teacher_cache.dataclass_cli import add_fields, from_args
from teacher_cache.errors import ConfigError, reports_user_errors
from teacher_cache.storage import write_json
from teacher_cache.teacher import quiet_transformers_bars

RESULTS_FILE = "results.json"
PLOT_FILE = "val_ce.png"
ALL_STUDENTS = "all"  # --baseline or --random-init with no value: every student
# Sized for the default cache (256 x 512 tokens) on 2 CPU cores: 200 steps of 2 sequences are 1.6
# epochs, about 1 minute of training for xs and 3 to 5 for s (benchmarks/bench_train.py).
DRIVER_DEFAULTS = {"batch_size": 2, "eval_every": 40, "checkpoint_every": 50, "log_every": 5}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m student_train.pretrain",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--students", default="xs s",
                        help=f"students to train, space separated: presets ({describe_presets()}), "
                             f"prune:KEY=VALUE,... students cut from the cache's teacher, Hugging "
                             f"Face model directories (default: xs s)")
    parser.add_argument("--baseline", nargs="?", const=ALL_STUDENTS, default="", metavar="STUDENTS",
                        help="also train these students (space separated; alone: every one) "
                             "CE-only (kd_weight=0) for comparison (default: none)")
    parser.add_argument("--random-init", nargs="?", const=ALL_STUDENTS, default="",
                        metavar="STUDENTS",
                        help="also train the shape of these pruned or pretrained students from "
                             "random init (space separated; alone: every one), for the "
                             "comparison 'pruned from the teacher vs the same shape from random "
                             "init'; default: none)")
    parser.add_argument("--heldout-package", default="", metavar="NAME",
                        help="also report each student's CE on this installed package's .py "
                             "sources, text outside the cache's corpus (e.g. numpy for the stdlib "
                             "cache; default: none)")
    parser.add_argument("--heldout-tokens", type=int, default=16384,
                        help="tokens of that text to evaluate on (default: 16384)")
    parser.add_argument("--out", required=True,
                        help="directory holding one run directory per student, the results and "
                             "the plot")
    add_fields(parser, TrainConfig, skip=("student", "init", "resume", "out"),
               defaults=DRIVER_DEFAULTS, config_file=False)
    return parser


CE_ONLY, RANDOM_INIT = "ce", "random"  # the variants of a student's run


def student_name(student: str) -> str:
    """A --students entry as a directory name: the preset's name, prune-layers8-hidden256 for
    prune:layers=8,hidden=256, a model directory's (or its config.json's directory's) name."""
    if student.startswith(PruneSpec.PREFIX):
        body = student.removeprefix(PruneSpec.PREFIX)
        return "prune-" + re.sub(r"[^A-Za-z0-9.]+", "-", body.replace("=", ""))
    path = Path(student)
    return path.parent.name if path.suffix == ".json" else path.name


def run_name(student: str, variant: str = "") -> str:
    return f"{student_name(student)}-{variant}" if variant else student_name(student)


def eval_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    from student_train.run_dir import METRICS_FILE

    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    points = [(r["tokens"], r["val_ce"]) for r in records if "val_ce" in r]
    return [t for t, _ in points], [ce for _, ce in points]


def format_table(results: list[dict[str, Any]]) -> str:
    text = any("heldout_ce" in r for r in results)
    width = max([10] + [len(r["run"]) + 2 for r in results])
    header = (f"{'run':<{width}}{'init':<11}{'params':>9}{'tokens':>10}{'val CE':>9}"
              f"{'val PPL':>10}{'val KL':>9}{'top-1':>8}{'tokens/s':>10}"
              + (f"{'text CE':>9}" if text else ""))
    rows = [header, "-" * len(header)]
    for r in results:
        tokens_per_s = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        rows.append(f"{r['run']:<{width}}{r.get('init', 'random'):<11}"
                    f"{r['parameters'] / 1e6:>8.2f}M{r['tokens_seen']:>10,}"
                    f"{r['val_ce']:>9.3f}{r['val_ppl']:>10.1f}{r['val_kl']:>9.3f}"
                    f"{r['val_top1']:>8.3f}{tokens_per_s:>10}"
                    + (f"{r['heldout_ce']:>9.3f}" if text else ""))
    return "\n".join(rows)


def teacher_val_ce(cache: str, val_fraction: float, val_max_rows: int | None) -> float | None:
    """The teacher's CE on the rows the students are evaluated on (the same held-out split and
    positions 0..L-2): the mean of the cached -target_logprobs; None without held-out rows."""
    from student_train.data import ShardRows, is_held_out

    reader = open_cache(cache)
    seq_ids = reader.read_index().seq_ids
    val = np.sort(seq_ids[is_held_out(seq_ids, val_fraction, val_max_rows)])
    source = ShardRows(reader, val)
    total, count = 0.0, 0
    for i, seq_id in enumerate(val.tolist()):
        held_out = source.take(i, seq_id).target_logprobs[:, :-1]
        total -= float(held_out.astype(np.float64).sum())
        count += held_out.size
    return total / count if count else None


def ce_axis_limits(curves: list[list[float]],
                   teacher_ce: float | None) -> tuple[float, float] | None:
    """CE axis around the curves after their first point (the untrained student's ~ln(vocab) would
    squash the range where runs differ); the teacher's line joins it only when it is near. None
    when no run has a finite CE."""
    values = [ce for curve in curves for ce in (curve[1:] or curve) if math.isfinite(ce)]
    if not values:
        return None
    low, high = min(values), max(values)
    if teacher_ce is not None and teacher_ce >= low - (high - low):
        low = min(low, teacher_ce)
    pad = 0.08 * (high - low) or 0.1
    return low - pad, high + pad


def draw_curves(curves: dict[str, tuple[list[int], list[float]]], teacher_ce: float | None):
    """The figure of `plot_curves`: validation CE per run; below a break, the teacher's CE when it
    lies far under the students'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limits = ce_axis_limits([ce for _, ce in curves.values()], teacher_ce)
    teacher_apart = teacher_ce is not None and limits is not None and teacher_ce < limits[0]
    if teacher_apart:
        fig, (ax, teacher_ax) = plt.subplots(2, 1, sharex=True, figsize=(7, 5),
                                             height_ratios=[5, 1])
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        teacher_ax = ax
    colors = {}
    for name, (tokens, ce) in curves.items():
        student, ce_only = name.removesuffix("-ce"), name.endswith("-ce")
        color = colors.setdefault(student, f"C{len(colors)}")
        ax.plot(tokens, ce, marker="o", markersize=3, color=color,
                linestyle="--" if ce_only else "-",
                label=f"{student} CE only" if ce_only else f"{student} CE + KD")
    if teacher_ce is not None:
        teacher_ax.axhline(teacher_ce, color="black", linestyle=":",
                           label=f"teacher ({teacher_ce:.2f})")
    if limits is not None:
        ax.set_ylim(*limits)
    starts = [ce[0] for _, ce in curves.values() if limits and ce and ce[0] > limits[1]]
    if starts:
        ax.text(0.01, 0.98, f"at 0 tokens: {min(starts):.2f}"
                + (f" to {max(starts):.2f}" if max(starts) > min(starts) else "") + " (above)",
                transform=ax.transAxes, va="top", fontsize=8, color="dimgray")
    if teacher_apart:
        teacher_ax.set_ylim(teacher_ce - 0.5, teacher_ce + 0.5)
        ax.spines.bottom.set_visible(False)
        teacher_ax.spines.top.set_visible(False)
        ax.tick_params(bottom=False)
        teacher_ax.legend(loc="upper right", fontsize=8)
    teacher_ax.set_xlabel("training tokens")
    ax.set_ylabel("validation CE (nats/token)")
    ax.set_title("Students on the teacher cache (validation rows)")
    for axis in {ax, teacher_ax}:
        axis.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def plot_curves(out: Path, run_dirs: dict[str, Path], teacher_ce: float | None = None) -> Path:
    import matplotlib.pyplot as plt

    fig = draw_curves({name: eval_curve(d) for name, d in run_dirs.items()}, teacher_ce)
    path = out / PLOT_FILE
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def chosen_students(students: list[str], chosen: str, flag: str) -> list[str]:
    """The students a --baseline or --random-init value names (ALL_STUDENTS: every one)."""
    if chosen == ALL_STUDENTS:
        return students
    names = chosen.split()
    if stray := [b for b in names if b not in students]:
        raise ConfigError(f"{flag} {chosen!r}: {stray[0]} is not among --students "
                          f"{' '.join(students)}")
    return [s for s in students if s in names]


def random_init_students(students: list[str], chosen: str) -> list[str]:
    """The students of --random-init: those that do not start from random init anyway."""
    if not chosen:
        return []
    from_weights = [s for s in students if not isinstance(parse_student(s), PresetStudent)
                    and parse_student(s).init("auto") != "random"]
    if chosen == ALL_STUDENTS:
        return from_weights
    picked = chosen_students(students, chosen, "--random-init")
    if stray := [s for s in picked if s not in from_weights]:
        raise ConfigError(f"--random-init {chosen!r}: {stray[0]} starts from random init "
                          f"already; name pruned or pretrained students")
    return picked


def _init(result: dict[str, Any]) -> str:
    return result.get("init", "random")


def comparisons(results: list[dict[str, Any]]) -> list[tuple[str, dict, dict]]:
    """(what, expected better run, other run): each random-init KD student against the next
    smaller one, each pruned or pretrained KD student against the same shape from random init,
    then each student's KD run against its CE-only run."""
    by_name = {r["run"]: r for r in results}
    kd = [r for r in results if r["kd_weight"] > 0]
    scratch = sorted((r for r in kd if _init(r) == "random"), key=lambda r: r["parameters"])
    pairs = [(f"{big['run']} vs {small['run']} (larger student, CE + KD)", big, small)
             for small, big in itertools.pairwise(scratch)]
    pairs += [(f"{r['run']} {'pruned from the teacher' if _init(r) == 'pruned' else 'pretrained'}"
               f" vs the same shape from random init", r, by_name[f"{r['run']}-{RANDOM_INIT}"])
              for r in kd if _init(r) != "random" and f"{r['run']}-{RANDOM_INIT}" in by_name]
    pairs += [(f"{r['run']} CE + KD vs CE only", r, by_name[f"{r['run']}-{CE_ONLY}"])
              for r in kd if f"{r['run']}-{CE_ONLY}" in by_name]
    return pairs


def compare_cell(better: float, other: float) -> str:
    """`5.974 vs 6.010  better by 0.036`, WORSE when the expected winner lost; n/a without rows."""
    if not (math.isfinite(better) and math.isfinite(other)):
        return "n/a (no rows)"
    verdict = "better" if better < other else "WORSE"
    return f"{better:.3f} vs {other:.3f}  {verdict} by {abs(better - other):.3f}"


def format_comparison(results: list[dict[str, Any]], teacher_ce: float | None,
                      text: str | None) -> str:
    """Held-out CE of each comparison's two runs (the expected winner first)."""
    columns = [("val_ce", "validation rows")] + ([("heldout_ce", "outside text")] if text else [])
    pairs = comparisons(results)
    width = max([38] + [len(what) + 2 for what, _, _ in pairs])
    lines = ["held-out comparison, CE in nats/token (lower is better):",
             (f"  {'':<{width}}" + "".join(f"{title:<34}" for _, title in columns)).rstrip()]
    for what, better, other in pairs:
        lines.append(f"  {what:<{width}}" + "".join(f"{compare_cell(better[key], other[key]):<34}"
                                                    for key, _ in columns).rstrip())
    if teacher_ce is not None:
        lines.append(f"  teacher on the validation rows: {teacher_ce:.3f}")
    lines.append("  validation rows: the cache's held-out sequences (same documents as training)")
    if text:
        lines.append(f"  outside text: {text}")
    return "\n".join(lines)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers import AutoModelForCausalLM  # after argument errors: --help stays fast

    from student_train.heldout import load_heldout_text, text_ce
    from student_train.model_card import write_model_card
    from student_train.run_dir import STUDENT_DIR
    from student_train.train import train
    from teacher_cache.backends.torch_backend import resolve_device

    out = Path(args.out)
    students = args.students.split()
    if not students:
        raise ConfigError(f"--students {args.students!r}: name at least one student, e.g. "
                          f"{' '.join(PRESETS)}")
    for student in students:
        try:
            parse_student(student)
        except ConfigError as e:
            raise ConfigError(f"--students {args.students!r}: choose from presets, prune:... specs "
                              f"and model directories; {e}") from None
    runs = ([(s, "") for s in students]
            + [(s, CE_ONLY) for s in chosen_students(students, args.baseline, "--baseline")
               if args.baseline]
            + [(s, RANDOM_INIT) for s in random_init_students(students, args.random_init)])
    names = [run_name(s, variant) for s, variant in runs]
    if clash := next((n for n in names if names.count(n) > 1), None):
        raise ConfigError(f"--students {args.students!r}: two runs would share the directory "
                          f"{out / clash}; name each student once")
    base = from_args(args, student=students[0], out=args.out)
    cache = open_cache(base.cache) if args.heldout_package else None
    text = (load_heldout_text(cache, args.heldout_package, args.heldout_tokens)
            if cache is not None else None)
    device = resolve_device(base.device)
    results, run_dirs = [], {}
    for (student, variant), name in zip(runs, names, strict=True):
        run_dirs[name] = out / name
        print(f"== {name} ==", flush=True)
        # From the flags again, not replace(base): an unset --lr is each student's own. --set
        # changes the presets only.
        config = from_args(args, student=student, out=str(run_dirs[name]),
                           resume=not base.overwrite,
                           init=RANDOM_INIT if variant == RANDOM_INIT else "auto",
                           **({"kd_weight": 0.0} if variant == CE_ONLY else {}),
                           **({} if isinstance(parse_student(student), PresetStudent)
                              else {"overrides": {}}))
        summary = train(config)
        if summary["val_ce"] is None:
            raise ConfigError(f"{run_dirs[name]}: the cache gave no held-out sequences, which the "
                              f"comparison needs; raise --val-fraction or --val-max-rows")
        result = {"run": name, **summary}
        if text is not None:
            with quiet_transformers_bars():
                trained = AutoModelForCausalLM.from_pretrained(run_dirs[name] / STUDENT_DIR)
            result["heldout_ce"] = text_ce(trained, text, device, doc_mask=summary["doc_mask"])
            write_model_card(run_dirs[name] / STUDENT_DIR, cache.manifest, summary,
                             (text.description, result["heldout_ce"]))
        results.append(result)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RESULTS_FILE, results)
    teacher_ce = teacher_val_ce(base.cache, base.val_fraction, base.val_max_rows)
    print()
    print(format_table(results))
    print()
    print(format_comparison(results, teacher_ce, text and text.description))
    print(f"\nresults: {out / RESULTS_FILE}")
    try:
        print(f"plot: {plot_curves(out, run_dirs, teacher_ce)}")
    except ImportError:
        print("plot: skipped, matplotlib is not installed (pip install 'distill[plot]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
