"""The GPU report of benchmarks/bench_gpu.py: the machine it ran on, the targets each row is held
to, and report.md / report.json.

Targets (from the issue; each row says whether it meets its own, `-` where it has none):
  kernel   triton at V = floor_target_vocab: at most 1.3x the GEMM floor; the compiled reference
           and Liger's fused linear CE at every shape: slower than triton at that shape
  student  the compile target preset (l): compiled at least 1.8x eager; MFU printed for all
  teacher  builder sample:8: at least 85% of the same model's forward + logits tokens/s
  stream   every worker count: at least 10x the tokens/s that section 2's reference preset (m)
           consumes (its fastest row)
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench_gpu_common import Row, Scale

TITLES = {"kernel": "1. Loss kernel", "student": "2. Student step", "teacher": "3. Teacher pass",
          "stream": "4. Stream"}
FLOOR_RATIO_TARGET = 1.3
COMPILE_SPEEDUP_TARGET = 1.8
BUILDER_SHARE_TARGET = 0.85
STREAM_MARGIN_TARGET = 10.0
PACKAGES = ("torch", "triton", "transformers", "pyarrow", "numpy", "liger-kernel")
SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem",
              "clocks.max.mem", "power.limit", "temperature.gpu")

# (value key, column header, format) per section; the target, met and note columns follow.
COLUMNS = {
    "kernel": [("shape", "shape", "text"), ("impl", "impl", "text"), ("ms", "ms", "ms"),
               ("tflops", "TFLOP/s", "one"), ("ratio_to_floor", "vs floor", "ratio"),
               ("peak_mib", "peak MiB", "count")],
    "student": [("preset", "preset", "text"), ("parameters_m", "params (M)", "one"),
                ("batch", "batch", "text"), ("precision", "precision", "text"),
                ("mode", "mode", "text"), ("tokens_per_s", "tokens/s", "count"),
                ("step_ms", "ms/step", "one"), ("first_step_s", "first step s", "one"),
                ("tflops", "TFLOP/s", "one"), ("mfu", "MFU", "percent"),
                ("speedup", "vs eager", "ratio"), ("peak_gib", "peak GiB", "one")],
    "teacher": [("teacher", "teacher", "text"), ("row", "row", "text"),
                ("dtype", "dtype", "text"), ("tokens", "tokens", "count"),
                ("seconds", "s", "ms"), ("tokens_per_s", "tokens/s", "count"),
                ("vs_forward_logits", "vs forward + logits", "percent")],
    "stream": [("workers", "workers", "text"), ("batch", "batch", "text"),
               ("batches", "batches", "count"), ("tokens_per_s", "tokens/s", "count"),
               ("vs_consumption", "vs student", "ratio")],
}


# ---- the machine ----

def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_device() -> dict[str, Any]:
    """What torch says of the GPU (CUDA runtime, name, memory, SMs)."""
    import torch

    info: dict[str, Any] = {"cuda_runtime": str(torch.version.cuda)}
    if not torch.cuda.is_available():
        return info | {"gpu": "none (no CUDA device)"}
    props = torch.cuda.get_device_properties(0)
    return info | {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                   "gpu_capability": f"{props.major}.{props.minor}",
                   "gpu_sms": props.multi_processor_count,
                   "gpus_visible": torch.cuda.device_count()}


def nvidia_smi() -> dict[str, str]:
    """Driver and clocks of every GPU, as nvidia-smi reports them (one line per GPU)."""
    if shutil.which("nvidia-smi") is None:
        return {"driver": "unavailable (no nvidia-smi)", "clocks": "unavailable (no nvidia-smi)"}
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return {"driver": f"unavailable ({exc})", "clocks": "unavailable"}
    gpus = [dict(zip(SMI_FIELDS, (v.strip() for v in line.split(",")), strict=False))
            for line in out.strip().splitlines()]
    return {
        "driver": ", ".join(sorted({g.get("driver_version", "?") for g in gpus})),
        "clocks": " / ".join(
            f"{g.get('name')}: SM {g.get('clocks.sm')} (max {g.get('clocks.max.sm')}), memory "
            f"{g.get('clocks.mem')} (max {g.get('clocks.max.mem')}), power limit "
            f"{g.get('power.limit')}, {g.get('temperature.gpu')} C" for g in gpus),
    }


def environment() -> dict[str, Any]:
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            **package_versions(), **torch_device(), **nvidia_smi()}


# ---- targets ----

def _ms_less(fast: Row | None, slow: Row) -> bool | None:
    a, b = (fast.values.get("ms") if fast else None), slow.values.get("ms")
    return None if a is None or b is None else a < b


def kernel_targets(rows: list[Row], scale: Scale) -> None:
    triton = {r.values.get("shape"): r for r in rows if r.values.get("impl") == "triton"}
    for row in rows:
        impl, ratio = row.values.get("impl"), row.values.get("ratio_to_floor")
        if impl == "triton" and row.values.get("vocab") == scale.floor_target_vocab:
            row.target = f"at most {FLOOR_RATIO_TARGET}x floor"
            row.met = None if ratio is None else ratio <= FLOOR_RATIO_TARGET
        elif impl in ("compiled", "liger_ce"):
            row.target = "triton faster"
            row.met = _ms_less(triton.get(row.values.get("shape")), row)


def student_targets(rows: list[Row], scale: Scale) -> None:
    for row in rows:
        if row.values.get("preset") == scale.compile_target_preset and \
                row.name.endswith("compiled"):
            row.target = f"at least {COMPILE_SPEEDUP_TARGET}x eager"
            speedup = row.values.get("speedup")
            row.met = None if speedup is None else speedup >= COMPILE_SPEEDUP_TARGET


def teacher_targets(rows: list[Row]) -> None:
    for row in rows:
        if row.values.get("row") == "builder sample:8":
            row.target = f"at least {BUILDER_SHARE_TARGET:.0%} of forward + logits"
            share = row.values.get("vs_forward_logits")
            row.met = None if share is None else share >= BUILDER_SHARE_TARGET


def consumption(student: list[Row], preset: str) -> float | None:
    """The fastest tokens/s section 2 measured for `preset`."""
    rates = [r.values["tokens_per_s"] for r in student
             if r.values.get("preset") == preset and r.values.get("tokens_per_s")]
    return max(rates, default=None)


def stream_targets(rows: list[Row], student: list[Row], scale: Scale) -> None:
    preset = scale.stream_reference_preset
    consumed = consumption(student, preset)
    for row in rows:
        rate = row.values.get("tokens_per_s")
        row.target = (f"at least {STREAM_MARGIN_TARGET:.0f}x preset {preset}'s "
                      f"{consumed:,.0f} tokens/s" if consumed else
                      f"at least {STREAM_MARGIN_TARGET:.0f}x preset {preset} (not measured in "
                      f"section 2)")
        if rate and consumed:
            row.values["vs_consumption"] = rate / consumed
            row.met = rate >= STREAM_MARGIN_TARGET * consumed


def apply_targets(sections: dict[str, dict[str, Any]], scale: Scale) -> None:
    rows = {name: section["rows"] for name, section in sections.items()}
    kernel_targets(rows.get("kernel", []), scale)
    student_targets(rows.get("student", []), scale)
    teacher_targets(rows.get("teacher", []))
    stream_targets(rows.get("stream", []), rows.get("student", []), scale)


# ---- report.md / report.json ----

def cell(value: Any, kind: str) -> str:
    if value is None or value == "":
        return "-"
    if kind == "text" or isinstance(value, str):
        return str(value).replace("|", "/")
    return {"ms": f"{value:,.2f}", "one": f"{value:,.1f}", "count": f"{value:,.0f}",
            "ratio": f"{value:.2f}x", "percent": f"{value:.1%}"}[kind]


def met_cell(row: Row) -> str:
    if not row.target:
        return "-"
    return {True: "yes", False: "**no**", None: "unknown"}[row.met]


def section_table(name: str, rows: list[Row]) -> list[str]:
    columns = COLUMNS[name]
    lines = ["| " + " | ".join([h for _, h, _ in columns] + ["target", "met", "note"]) + " |",
             "|" + "---|" * (len(columns) + 3)]
    for row in rows:
        note = row.error or "; ".join(filter(None, [row.note, row.values.get("autotune")]))
        cells = [cell(row.values.get(key), kind) for key, _, kind in columns]
        lines.append("| " + " | ".join(cells + [row.target or "-", met_cell(row),
                                                 cell(note, "text")]) + " |")
    return lines


def section_markdown(name: str, section: dict[str, Any]) -> list[str]:
    lines = [f"## {TITLES[name]}: {section['status']}",
             f"{section['seconds']:.0f} s of a {section['budget_s']:.0f} s budget.", ""]
    lines += [f"- {note}" for note in section["notes"]]
    if section["rows"]:
        lines += [""] + section_table(name, section["rows"])
    if section.get("error"):
        lines += ["", "Its last output:", "", "```", section["error"], "```"]
    return lines + [""]


def markdown(report: dict[str, Any]) -> str:
    env, budget = report["environment"], report["budget"]
    lines = ["# GPU report (`make bench-gpu`)", ""]
    if report["mode"] == "dry":
        lines += ["**Dry run on the CPU at tiny shapes: no figure here is a GPU measurement, and "
                  "the targets are evaluated only to check the report's mechanics.**", ""]
    lines += [f"`{report['command']}`: {report['wall_s']:.0f} s in all; estimated budget "
              f"{budget['total_s']:.0f} s (sections {budget['sections_s']:.0f} s + start-up "
              f"and report {budget['setup_s']:.0f} s).", "", "| machine | |", "|---|---|"]
    lines += [f"| {key} | {cell(value, 'text')} |" for key, value in env.items()]
    lines.append("")
    for name, section in report["sections"].items():
        lines += section_markdown(name, section)
    return "\n".join(lines)


def rows_as_dicts(report: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import asdict

    return report | {"sections": {
        name: section | {"rows": [asdict(r) for r in section["rows"]]}
        for name, section in report["sections"].items()}}


def write_report(out: Path, report: dict[str, Any]) -> str:
    """Write report.json and report.md in `out` (each replaced whole); returns the markdown."""
    text = markdown(report)
    for name, content in (("report.json", json.dumps(rows_as_dicts(report), indent=2,
                                                     default=str)),
                          ("report.md", text + "\n")):
        tmp = out / (name + ".tmp")
        tmp.write_text(content)
        tmp.replace(out / name)
    return text
