"""benchmarks/bench_gpu.py (`make bench-gpu`): its dry run measures every planned row of every
section on the CPU and writes report.md and report.json with the machine's fields; a section that
fails or outlives its budget is recorded and does not stop the others; the targets say met or not
from the rows. Nothing here checks a timing."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_kernel  # noqa: E402
from bench_gpu import budgets, estimate, run_process, section_rows  # noqa: E402
from bench_gpu_common import DRY, FULL, SECTIONS, Row  # noqa: E402
from bench_gpu_kernel import autotune_choice, measure_on_cpu  # noqa: E402
from bench_gpu_report import TITLES, apply_targets, markdown, nvidia_smi  # noqa: E402

MACHINE_FIELDS = ("date", "python", "machine", "cpu", "cpus", "torch", "triton", "transformers",
                  "pyarrow", "gpu", "driver", "clocks")
# The value each section's measured rows carry.
MEASURED = {"kernel": "ms", "student": "tokens_per_s", "teacher": "tokens_per_s",
            "stream": "tokens_per_s"}
ROWS_PER_SECTION = {"kernel": 6 * len(DRY.kernel_shapes), "student": 2 * len(DRY.presets) + 3,
                    "teacher": 5 * len(DRY.teachers), "stream": len(DRY.stream_workers)}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench_gpu")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--dry",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out, done.stdout


@pytest.mark.slow
def test_dry_run_measures_every_row_of_every_section(dry_run: tuple[Path, str]) -> None:
    report = json.loads((dry_run[0] / "report.json").read_text())
    assert report["mode"] == "dry"
    assert list(report["sections"]) == list(SECTIONS)
    for name, section in report["sections"].items():
        assert section["status"] == "ok", (name, section["error"])
        assert len(section["rows"]) == ROWS_PER_SECTION[name], (name, section["rows"])
        for row in section["rows"]:
            assert row["error"] is None, (name, row)
            skipped = row["note"].startswith("skipped: ") and row["values"]["impl"] == "liger_ce"
            assert skipped or row["values"].get(MEASURED[name]) is not None, (name, row)


@pytest.mark.slow
def test_dry_run_writes_the_machine_and_prints_the_markdown(dry_run: tuple[Path, str]) -> None:
    out, stdout = dry_run
    env = json.loads((out / "report.json").read_text())["environment"]
    for field in MACHINE_FIELDS:
        assert env.get(field) not in (None, ""), field
    text = (out / "report.md").read_text()
    assert text.startswith("# GPU report (`make bench-gpu`)")
    assert "Dry run on the CPU" in text
    for field in MACHINE_FIELDS:
        assert f"| {field} |" in text, field
    for title in TITLES.values():
        assert f"## {title}: ok" in text, title
    assert text.strip() in stdout


def test_a_section_past_its_budget_is_killed_with_its_output_kept(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    result = run_process(sleeper, budget_s=2, log=tmp_path / "log")
    assert result["status"] == "stopped at its budget of 2 s"
    assert result["seconds"] < 30
    assert "started" in result["error"]


def test_a_failing_section_reports_its_exit_code_and_last_output(tmp_path: Path) -> None:
    failing = [sys.executable, "-c", "import sys; print('boom', flush=True); sys.exit(3)"]
    result = run_process(failing, budget_s=60, log=tmp_path / "log")
    assert result["status"] == "failed (exit code 3)"
    assert "boom" in result["error"]


def test_planned_rows_not_written_are_marked_not_measured() -> None:
    records = [{"type": "plan", "names": ["a", "b", "c"]},
               {"type": "row", "name": "c", "values": {"ms": 1.0}, "note": "", "error": None,
                "target": "", "met": None},
               {"type": "note", "text": "hello"},
               {"type": "row", "name": "setup", "values": {}, "note": "", "error": "boom",
                "target": "", "met": None}]
    rows, notes = section_rows(records, "stopped at its budget of 9 s")
    assert [r.name for r in rows] == ["a", "b", "c", "setup"]
    assert rows[0].error == rows[1].error == "not measured: the section's budget ran out first"
    assert rows[2].values == {"ms": 1.0} and rows[2].error is None
    assert notes == ["hello"]
    failed, _ = section_rows(records, "failed (exit code 1)")
    assert failed[0].error == "not measured: the section failed first"


def test_budgets_take_one_for_all_or_one_per_section() -> None:
    assert budgets(DRY, [], ["kernel", "stream"]) == {"kernel": DRY.budgets_s["kernel"],
                                                      "stream": DRY.budgets_s["stream"]}
    assert budgets(DRY, ["30"], ["kernel", "stream"]) == {"kernel": 30.0, "stream": 30.0}
    assert budgets(DRY, ["30", "stream=5"], ["kernel", "stream"]) == {"kernel": 30.0,
                                                                      "stream": 5.0}
    with pytest.raises(SystemExit, match="unknown section"):
        budgets(DRY, ["gpu=5"], ["kernel"])
    with pytest.raises(SystemExit, match="not a positive number"):
        budgets(DRY, ["kernel=soon"], ["kernel"])


def test_the_full_run_fits_seven_minutes() -> None:
    assert set(FULL.budgets_s) == set(SECTIONS)
    assert estimate(FULL.budgets_s)["total_s"] <= 7 * 60


def test_the_dry_kernel_measure_takes_bench_kernel_measures_arguments() -> None:
    assert list(inspect.signature(measure_on_cpu).parameters) == \
        list(inspect.signature(bench_kernel.measure).parameters)


def kernel(impl: str, ms: float | None, vocab: int = 128256, ratio: float | None = None) -> Row:
    return Row(impl, {"shape": f"V={vocab}", "vocab": vocab, "impl": impl, "ms": ms,
                      "ratio_to_floor": ratio})


def test_each_row_says_whether_its_target_is_met() -> None:
    sections = {
        "kernel": [kernel("triton", 10.0, ratio=1.2), kernel("compiled", 12.0),
                   kernel("liger_ce", 9.0), kernel("triton", 30.0, 262144, ratio=1.5),
                   kernel("compiled", None, 262144), kernel("floor", 8.0)],
        "student": [Row("l eager", {"preset": "l", "tokens_per_s": 100.0}),
                    Row("l compiled", {"preset": "l", "tokens_per_s": 150.0, "speedup": 1.5}),
                    Row("m compiled", {"preset": "m", "tokens_per_s": 300.0, "speedup": 2.0})],
        "teacher": [Row("t: builder sample:8", {"row": "builder sample:8",
                                                "vs_forward_logits": 0.9})],
        "stream": [Row("0 workers", {"tokens_per_s": 2000.0}),
                   Row("4 workers", {"tokens_per_s": 4000.0})],
    }
    apply_targets({name: {"rows": rows} for name, rows in sections.items()}, FULL)
    met = {name: [(row.target != "", row.met) for row in rows] for name, rows in sections.items()}
    assert met["kernel"] == [(True, True), (True, True), (True, False), (False, None),
                             (True, None), (False, None)]
    assert met["student"] == [(False, None), (True, False), (False, None)]
    assert met["teacher"] == [(True, True)]
    assert met["stream"] == [(True, False), (True, True)]
    assert sections["stream"][1].values["vs_consumption"] == pytest.approx(4000 / 300)


def test_the_autotuned_tile_is_reported_for_the_shapes_vocabulary(monkeypatch) -> None:
    import triton
    import triton.language as tl

    from kernels import triton_kernels

    @triton.jit
    def kernel(x_ptr, vocab, TEMPERED: tl.constexpr):
        pass

    tuner = triton.autotune([triton.Config({"BLOCK_N": 2, "BLOCK_V": 2048}, num_warps=8)],
                            key=["vocab", "TEMPERED"])(kernel)
    tuner.cache = {(128256, False, "torch.bfloat16"): triton.Config(
                       {"BLOCK_N": 2, "BLOCK_V": 2048}, num_warps=8),
                   (262144, False, "torch.bfloat16"): triton.Config(
                       {"BLOCK_N": 8, "BLOCK_V": 1024}, num_warps=16)}
    monkeypatch.setattr(triton_kernels, "_chunk_statistics", tuner)
    assert autotune_choice(128256) == "chunk_statistics: BLOCK_N=2 BLOCK_V=2048 warps=8"
    assert autotune_choice(262144) == "chunk_statistics: BLOCK_N=8 BLOCK_V=1024 warps=16"


def test_driver_and_clocks_come_from_nvidia_smi(tmp_path: Path, monkeypatch) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 570.86.15, 345 MHz, 1980 MHz, 3201 MHz, "
                   "3201 MHz, 700.00 W, 31'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    got = nvidia_smi()
    assert got["driver"] == "570.86.15"
    assert got["clocks"] == ("NVIDIA H200: SM 345 MHz (max 1980 MHz), memory 3201 MHz (max "
                             "3201 MHz), power limit 700.00 W, 31 C")


def test_a_failed_section_shows_its_output_and_unmeasured_rows() -> None:
    rows, _ = section_rows([{"type": "plan", "names": ["l eager"]}], "failed (exit code 1)")
    report = {"mode": "full", "command": "benchmarks/bench_gpu.py", "wall_s": 12.0,
              "environment": {"gpu": "none"}, "budget": estimate({"student": 140.0}),
              "sections": {"student": {"status": "failed (exit code 1)", "seconds": 3.0,
                                       "budget_s": 140.0, "error": "Traceback ...\nOOM",
                                       "rows": rows, "notes": []}}}
    text = markdown(report)
    assert "## 2. Student step: failed (exit code 1)" in text
    assert "```\nTraceback ...\nOOM\n```" in text
    assert "| not measured: the section failed first |" in text
    assert "Dry run" not in text
