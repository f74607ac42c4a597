"""The GPU report in one command (`make bench-gpu`): every GPU figure the project claims, measured
side by side in one run of about 7 minutes on one H100/H200, with no network and nothing but this
repository (torch, triton, transformers and pyarrow installed).

    python benchmarks/bench_gpu.py [--sections kernel student teacher stream]
        [--budget-s SECONDS | --budget-s kernel=165 student=150 ...] [--out runs/bench_gpu]
    python benchmarks/bench_gpu.py --dry    # `make bench-gpu DRY=1`: tiny shapes on the CPU
    python benchmarks/bench_gpu.py --plan   # print the sections' budgets and the estimate only

Sections (each its own module, bench_gpu_<name>.py, over the existing benchmarks):
  kernel   the fused loss kernel vs the torch reference (eager, compiled), Liger, naive, GEMM floor
  student  presets l and m, eager and compiled, through the real trainer on a synthetic cache;
           l also under FSDP2 and with full activation checkpointing
  teacher  the torch teacher backend (sample:8, topk:64) vs the model's forward (+ logits)
  stream   the training data stream's tokens/s for 0, 1 and 4 data loader workers

Each section runs in a child process of its own with a hard wall-clock budget, its start-up
included: at the budget it is killed, the rows it had measured are kept and the others are marked
not measured; a section that fails (or is killed) does not stop the next one. The estimate is the
sum of the selected sections' budgets plus the start-up and report: an upper bound, since no
section outlives its budget. Writes OUT/report.md and OUT/report.json (machine, driver, versions,
GPU name and clocks, date, every row with its target and whether it is met), prints the markdown;
children's output goes to the console and to OUT/logs/<section>.log.

The dry run sets TRITON_INTERPRET=1 (the Triton kernels in the interpreter) and hides any GPU
before torch is imported, and runs every section at tiny shapes in under a minute, so that
tests/test_bench_gpu.py checks the whole script without a GPU. Without CUDA and without --dry it
prints why and measures nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):  # the repository's packages need no install
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_gpu_common import SCALES, SECTIONS, Row, Scale, read_records  # noqa: E402

SETUP_ESTIMATE_S = 15.0  # the driver's own imports, the machine's description, the report
POLL_S = 0.2


# ---- command line ----

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="sections to run, in the report's order (default: all)")
    parser.add_argument("--budget-s", nargs="+", default=[], metavar="[SECTION=]SECONDS",
                        help="wall-clock cap of every section (SECONDS) or of one (NAME=SECONDS)")
    parser.add_argument("--out", type=Path, help="report directory (default: runs/bench_gpu, "
                        "runs/bench_gpu-dry for --dry)")
    parser.add_argument("--dry", action="store_true",
                        help="tiny shapes on the CPU, Triton interpreted: checks the script")
    parser.add_argument("--plan", action="store_true",
                        help="print the budgets and the estimate, run nothing")
    parser.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out or Path("runs/bench_gpu-dry" if args.dry else "runs/bench_gpu")
    args.sections = [s for s in SECTIONS if s in args.sections]
    return args


def budgets(scale: Scale, overrides: list[str], sections: list[str]) -> dict[str, float]:
    """The budget of each selected section: the scale's, unless --budget-s says otherwise."""
    chosen = {s: scale.budgets_s[s] for s in sections}
    for item in overrides:
        name, _, seconds = item.rpartition("=")
        if name and name not in SECTIONS:
            raise SystemExit(f"--budget-s {item}: unknown section {name!r}; choose one of "
                             f"{', '.join(SECTIONS)}")
        try:
            value = float(seconds)
        except ValueError:
            value = 0.0
        if not value > 0:
            raise SystemExit(f"--budget-s {item}: {seconds!r} is not a positive number of "
                             f"seconds")
        for section in [name] if name else sections:
            if section in chosen:
                chosen[section] = value
    return chosen


def estimate(section_budgets: dict[str, float]) -> dict[str, float]:
    sections = sum(section_budgets.values())
    return {"sections_s": sections, "setup_s": SETUP_ESTIMATE_S,
            "total_s": sections + SETUP_ESTIMATE_S, **{f"{k}_s": v for k, v in
                                                       section_budgets.items()}}


def print_estimate(scale: Scale, budget: dict[str, float], section_budgets: dict[str, float]):
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in section_budgets.items())
    print(f"bench_gpu ({scale.name} run): budgets {parts}; estimated run at most "
          f"{budget['total_s']:.0f} s ({budget['total_s'] / 60:.1f} min: the sections' budgets "
          f"are hard caps, plus ~{SETUP_ESTIMATE_S:.0f} s of start-up and report)", flush=True)


def dry_environment(env: dict[str, str]) -> None:
    """Before torch or triton is imported: the Triton interpreter, and no GPU."""
    env["TRITON_INTERPRET"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""


# ---- one section, in a child process ----

def run_child(args: argparse.Namespace) -> int:
    from bench_gpu_common import Deadline, RowWriter

    scale = SCALES["dry" if args.dry else "full"]
    writer = RowWriter(args.rows)
    module = importlib.import_module(f"bench_gpu_{args.child}")
    scratch = args.out / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        module.run(scale, writer, Deadline(args.deadline), scratch)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def child_command(args: argparse.Namespace, section: str, rows: Path, deadline: float) -> list:
    return [sys.executable, str(Path(__file__).resolve()), "--child", section, "--rows",
            str(rows), "--deadline", repr(deadline), "--out", str(args.out),
            *(["--dry"] if args.dry else [])]


def echo(log: Path, shown: int) -> int:
    """Print what `log` holds past byte `shown`; returns the new position."""
    with log.open("rb") as f:
        f.seek(shown)
        chunk = f.read()
    sys.stdout.write(chunk.decode(errors="replace"))
    sys.stdout.flush()
    return shown + len(chunk)


def follow(process: subprocess.Popen, log: Path, budget_s: float) -> bool:
    """Echo the child's log while it runs; kill its process group (the child, its data loader
    and compile workers) at the budget. True if it finished within the budget."""
    started, shown = time.monotonic(), 0
    while process.poll() is None:
        shown = echo(log, shown)
        if time.monotonic() - started >= budget_s:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            echo(log, shown)
            return False
        time.sleep(POLL_S)
    echo(log, shown)
    return True


def log_tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def run_process(command: list, budget_s: float, log: Path) -> dict[str, Any]:
    """Run `command` in its own process group with output to `log`, for at most `budget_s`:
    its status, wall seconds and (unless it succeeded) the last lines of its output."""
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    in_time = follow(process, log, budget_s)
    seconds = time.monotonic() - started
    if not in_time:
        status = f"stopped at its budget of {budget_s:.0f} s"
    elif process.returncode:
        status = f"failed (exit code {process.returncode})"
    else:
        return {"status": "ok", "seconds": seconds, "error": None}
    return {"status": status, "seconds": seconds, "error": log_tail(log)}


def section_rows(records: list[dict[str, Any]], status: str) -> tuple[list[Row], list[str]]:
    """The rows of a section in its plan's order, the planned ones it did not write marked not
    measured; and its notes."""
    plan = next((r["names"] for r in records if r["type"] == "plan"), [])
    written = {r["name"]: Row(**{k: v for k, v in r.items() if k != "type"})
               for r in records if r["type"] == "row"}
    reason = ("the section's budget ran out first" if status == "ok" or "budget" in status else
              "the section failed first")
    rows = [written.pop(name, None) or Row(name, error=f"not measured: {reason}")
            for name in plan]
    notes = [r["text"] for r in records if r["type"] == "note"]
    return rows + list(written.values()), notes


def run_section(args: argparse.Namespace, section: str, budget_s: float) -> dict[str, Any]:
    rows_file, log = args.out / "rows" / f"{section}.jsonl", args.out / "logs" / f"{section}.log"
    for path in (rows_file, log):
        path.parent.mkdir(parents=True, exist_ok=True)
    rows_file.unlink(missing_ok=True)
    print(f"\n== {section} (budget {budget_s:.0f} s) ==", flush=True)
    result = run_process(child_command(args, section, rows_file, time.time() + budget_s),
                         budget_s, log)
    rows, notes = section_rows(read_records(rows_file), result["status"])
    return result | {"budget_s": budget_s, "rows": rows, "notes": notes}


# ---- the whole report ----

def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry:
        dry_environment(os.environ)
    if args.child:
        return run_child(args)
    scale = SCALES["dry" if args.dry else "full"]
    section_budgets = budgets(scale, args.budget_s, args.sections)
    budget = estimate(section_budgets)
    print_estimate(scale, budget, section_budgets)
    if args.plan:
        return 0
    if not args.dry and not cuda_available():
        print("bench_gpu: no CUDA device; the report needs a GPU (--dry checks the script on "
              "the CPU). Nothing was measured.")
        return 0
    from bench_gpu_report import apply_targets, environment, nvidia_smi, write_report

    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    sections = {name: run_section(args, name, seconds)
                for name, seconds in section_budgets.items()}
    env["clocks_after_run"] = nvidia_smi()["clocks"]
    apply_targets(sections, scale)
    report = {"mode": scale.name, "command": " ".join(["benchmarks/bench_gpu.py",
                                                       *(argv or sys.argv[1:])]),
              "environment": env, "budget": budget, "sections": sections,
              "wall_s": time.monotonic() - started}
    print("\n" + write_report(args.out, report))
    print(f"wrote {args.out / 'report.md'} and {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
