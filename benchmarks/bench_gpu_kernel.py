"""Section 1 of the GPU report: fwd+bwd of the fused LM-head loss against its baselines, measured
by benchmarks/bench_kernel.py's own `measure` (quick mode's timing loops) on CUDA.

Rows per shape: floor, triton, reference, naive, liger_ce (when liger_kernel is importable), then
the compiled reference of every shape last: its compile is the least predictable cost, so it is
the row a tight budget drops. Dynamo is reset before each compiled row, so that every shape gets a
static compile of its own, not a dynamic-shape recompile of the previous one. Without CUDA (the
dry run) the same rows run on the CPU in float32 at a tiny shape through bench_kernel's
`loss_step`, the Triton path under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_gpu_common import Deadline, Row, RowWriter, Scale, error_text
from bench_kernel import Problem, Result, Shape, floor_step, loss_step, make_problem, measure

DIVERGENCE = "fkl"
FIRST = ("floor", "triton", "reference", "naive", "liger_ce")
LAST = ("compiled",)
TUNED_KERNELS = ("_chunk_statistics", "_softmax_gradient")


def shape_label(shape: Shape) -> str:
    return f"N={shape.n} H={shape.h} V={shape.v} k={shape.k}"


def row_name(shape: Shape, impl: str) -> str:
    return f"{impl} {shape_label(shape)}"


def planned(scale: Scale) -> tuple[list[tuple[Shape, str]], list[str]]:
    """(the measurements in the order they run, the row names in report order)."""
    shapes = [Shape(*s) for s in scale.kernel_shapes]
    runs = [(s, impl) for s in shapes for impl in FIRST] + [(s, i) for s in shapes for i in LAST]
    report = [row_name(s, impl) for s in shapes for impl in FIRST + LAST]
    return runs, report


def step_times_ms(step: Callable[[], None], problem: Problem, at_least_ms: float,
                  runs: int) -> list[float]:
    """Wall times of `step` (gradients cleared before each) over at least `runs` runs and
    `at_least_ms` milliseconds."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - started) * 1e3 < at_least_ms:
        problem.hidden.grad = problem.weight.grad = None
        began = time.perf_counter()
        step()
        times.append((time.perf_counter() - began) * 1e3)
    return times


def measure_on_cpu(impl: str, shape: Shape, divergence: str, warmup_ms: int,
                   rep_ms: int) -> Result:
    """bench_kernel.measure's result for the dry run: the same steps, timed on the CPU."""
    result = Result(shape, impl)
    try:
        problem = make_problem(shape, device="cpu", dtype=torch.float32)
        step = floor_step(problem) if impl == "floor" else loss_step(impl, problem, divergence)
        step()  # compile outside the timing, as measure does
        step_times_ms(step, problem, warmup_ms, runs=0)
        result.ms = statistics.median(step_times_ms(step, problem, rep_ms, runs=3))
        result.tflops = shape.flops / (result.ms * 1e-3) / 1e12
    except ImportError as exc:
        result.error = f"not importable: {exc}"
    except Exception as exc:  # noqa: BLE001 - one failing baseline must not end the section
        result.error = error_text(exc)
    return result


def measurer() -> Callable[[str, Shape, str, int, int], Result]:
    return measure if torch.cuda.is_available() else measure_on_cpu


def autotune_choice(vocab: int) -> str:
    """The tile the row kernels' autotuner picked for this vocabulary, where it ran."""
    from triton.runtime.autotuner import Autotuner

    from kernels import triton_kernels

    choices = []
    for name in TUNED_KERNELS:
        tuner = getattr(triton_kernels, name, None)
        if not isinstance(tuner, Autotuner):
            continue
        for key, config in tuner.cache.items():
            if key and key[0] == vocab:
                meta = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
                choices.append(f"{name.strip('_')}: {meta} warps={config.num_warps}")
    return "; ".join(choices) or "none exposed (not autotuned here: Triton interpreter)"


def kernel_row(result: Result, floor: Result | None, autotune: str = "") -> Row:
    ratio = result.ms / floor.ms if result.ms and floor is not None and floor.ms else None
    values = {"shape": shape_label(result.shape), "vocab": result.shape.v,
              "impl": result.impl, "ms": result.ms,
              "tflops": result.tflops, "ratio_to_floor": ratio, "peak_mib": result.peak_mib}
    if autotune:
        values["autotune"] = autotune
    return Row(row_name(result.shape, result.impl), values, error=result.error)


def liger_skip() -> str | None:
    """Why the Liger row cannot run here (None: it can)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "skipped: liger_kernel is not installed (optional)"
    if not torch.cuda.is_available():
        return "skipped: Liger's kernels need CUDA"
    return None


def skipped_row(shape: Shape, impl: str, why: str) -> Row:
    return Row(row_name(shape, impl), {"shape": shape_label(shape), "vocab": shape.v,
                                       "impl": impl}, note=why)


def run(scale: Scale, writer: RowWriter, deadline: Deadline, scratch: Path) -> None:
    runs, report_order = planned(scale)
    writer.plan(report_order)
    how = ("bf16 on CUDA, bench_kernel.measure: triton.testing.do_bench median, peak memory "
           "above the inputs" if torch.cuda.is_available() else "float32 on the CPU, median")
    writer.note(f"fwd+bwd, divergence {DIVERGENCE}, {how}; warm-up {scale.kernel_warmup_ms} ms, "
                f"{scale.kernel_rep_ms} ms of repetitions")
    measure_fn = measurer()
    skip = {"liger_ce": liger_skip()}
    floors: dict[Shape, Result] = {}
    for shape, impl in runs:
        if deadline.passed():
            break
        if skip.get(impl):
            writer.row(skipped_row(shape, impl, skip[impl]))
            continue
        if impl == "compiled":  # each shape compiled afresh, static, as one training run is
            torch.compiler.reset()
        result = measure_fn(impl, shape, DIVERGENCE, scale.kernel_warmup_ms, scale.kernel_rep_ms)
        if impl == "floor":
            floors[shape] = result
        autotune = autotune_choice(shape.v) if impl == "triton" and not result.error else ""
        writer.row(kernel_row(result, floors.get(shape), autotune))
