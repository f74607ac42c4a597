"""Forward + backward of the fused LM-head sparse KD loss on a GPU, against its baselines.

For each shape (N tokens, hidden H, vocabulary V, teacher top-k) in bf16 it times loss + backward
(median of triton.testing.do_bench) and the peak memory above the inputs for:
  triton         kernels.sparse_kd_loss(impl="triton") (v2: logits once per chunk, 6 N H V)
  reference      the chunked torch reference, eager
  compiled       the same under torch.compile (compile time excluded)
  liger_ce       Liger-Kernel's fused linear cross-entropy (CE only), when importable
  naive          full [N, V] logits, float32 log_softmax, CE + fkl at T = 1, eager autograd
  floor          the three LM-head GEMMs alone (logits, grad_h, grad_W) with cuBLAS
and prints effective TFLOP/s (6 N H V / time) and each time's ratio to the floor.

    python benchmarks/bench_kernel.py --out runs/bench_kernel.json [--n 8192 --v 32768 ...]
    python benchmarks/bench_kernel.py --quick    # `make bench-kernel QUICK=1`

--quick measures the two V = 128256, k = 64 shapes of issue 14's table (N = 16384, H = 2048 and
4096) with shorter timing loops, then prints a per-kernel profile (torch.profiler) of one
triton step at the first shape: meant to finish in a few minutes on one GPU.

Without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernels import DIVERGENCES, IGNORE_INDEX, KDSpec, KDTargets, sparse_kd_loss
from kernels.reference import sparse_kd_loss_reference

IMPLS = ("triton", "reference", "compiled", "liger_ce", "naive", "floor")
QUICK_SHAPES = ((16384, 2048, 128256, 64), (16384, 4096, 128256, 64))


@dataclass(frozen=True)
class Shape:
    n: int
    h: int
    v: int
    k: int

    @property
    def flops(self) -> float:
        return 6.0 * self.n * self.h * self.v


@dataclass
class Result:
    shape: Shape
    impl: str
    ms: float | None = None
    tflops: float | None = None
    peak_mib: float | None = None
    ratio_to_floor: float | None = None
    error: str | None = None


@dataclass
class Problem:
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor


def make_problem(shape: Shape, seed: int = 0, device: str = "cuda",
                 dtype: torch.dtype = torch.bfloat16) -> Problem:
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, generator=gen)
    hidden = torch.randn(shape.n, shape.h, **kw).to(dtype).requires_grad_()
    weight = (torch.randn(shape.v, shape.h, **kw) / shape.h**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, shape.v, (shape.n,), **kw)
    labels[::16] = IGNORE_INDEX
    topk_ids = torch.randint(0, shape.v, (shape.n, shape.k), **kw)
    # A plausible teacher: its top-k holds 90% of the mass.
    topk_logprobs = torch.log_softmax(torch.randn(shape.n, shape.k, **kw) * 2, -1) + math.log(0.9)
    return Problem(hidden, weight, labels, topk_ids, topk_logprobs.float())


def loss_step(impl: str, problem: Problem, divergence: str) -> Callable[[], None]:
    """One forward + backward of impl on problem."""
    p = problem
    spec = KDSpec(divergence)
    if impl == "triton":
        def run() -> torch.Tensor:
            return sparse_kd_loss(p.hidden, p.weight, p.labels, p.topk_ids, p.topk_logprobs,
                                  divergence=divergence, impl="triton")
    elif impl in ("reference", "compiled"):
        fn = sparse_kd_loss_reference if impl == "reference" else torch.compile(
            sparse_kd_loss_reference
        )
        targets = KDTargets(p.labels, p.topk_ids, p.topk_logprobs)

        def run() -> torch.Tensor:
            return fn(p.hidden, p.weight, targets, spec)[0]
    elif impl == "liger_ce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def run() -> torch.Tensor:
            return liger(p.weight, p.hidden, p.labels)
    elif impl == "naive":
        if divergence != "fkl":
            raise ValueError("the naive baseline computes fkl only")

        def run() -> torch.Tensor:
            return naive_loss(p)
    else:
        return floor_step(problem)

    def step() -> None:
        run().backward()

    return step


def naive_loss(p: Problem) -> torch.Tensor:
    """CE + fkl at T = 1 over the full float32 log-softmax, as a plain training script writes it."""
    logp = torch.log_softmax((p.hidden @ p.weight.T).float(), -1)
    valid = p.labels != IGNORE_INDEX
    ce = torch.nn.functional.nll_loss(logp, p.labels, ignore_index=IGNORE_INDEX)
    q = p.topk_logprobs.softmax(-1)
    kd = (q * (q.log() - logp.gather(1, p.topk_ids))).sum(-1)
    return ce + kd[valid].mean()


def profile_step(shape: Shape, divergence: str, rows: int = 15) -> None:
    """Print the device time per kernel of one warm triton fwd+bwd at shape."""
    from torch.profiler import ProfilerActivity, profile

    problem = make_problem(shape)
    step = loss_step("triton", problem, divergence)
    step()  # compile and autotune outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"\nper-kernel profile, triton, N={shape.n} H={shape.h} V={shape.v} k={shape.k}:")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows), flush=True)
    del problem
    torch.cuda.empty_cache()


def floor_step(problem: Problem) -> Callable[[], None]:
    """The LM head's three GEMMs: logits = h W^T, grad_h = dZ W, grad_W = dZ^T h."""
    h, w = problem.hidden.detach(), problem.weight.detach()
    logits = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
    grad_h, grad_w = torch.empty_like(h), torch.empty_like(w)

    def step() -> None:
        torch.mm(h, w.T, out=logits)
        torch.mm(logits, w, out=grad_h)
        torch.mm(logits.T, h, out=grad_w)

    return step


def measure(impl: str, shape: Shape, divergence: str, warmup_ms: int, rep_ms: int) -> Result:
    from triton.testing import do_bench

    result = Result(shape, impl)
    try:
        problem = make_problem(shape)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()  # the inputs; everything above them is counted
        step = loss_step(impl, problem, divergence)
        step()  # compile / autotune outside the timed and measured region
        problem.hidden.grad = problem.weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        result.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        grads = [problem.hidden, problem.weight]
        result.ms = do_bench(step, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads,
                             return_mode="median")
        result.tflops = shape.flops / (result.ms * 1e-3) / 1e12
    except ImportError as exc:
        result.error = f"not importable: {exc}"
    except torch.cuda.OutOfMemoryError:
        result.error = "out of memory"
    except Exception as exc:  # noqa: BLE001 - one failing baseline must not end the run
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
        torch.cuda.empty_cache()
    return result


def environment() -> dict[str, str]:
    import triton

    env = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
    }
    try:
        from importlib.metadata import version

        env["liger_kernel"] = version("liger-kernel")
    except Exception:  # noqa: BLE001 - absent is a valid answer
        env["liger_kernel"] = "not installed"
    return env


def print_row(result: Result) -> None:
    s = result.shape
    head = f"N={s.n:<6} H={s.h:<5} V={s.v:<7} k={s.k:<3} {result.impl:<10}"
    if result.error:
        print(f"{head} {result.error}", flush=True)
        return
    ratio = f"{result.ratio_to_floor:6.2f}x" if result.ratio_to_floor else "      -"
    print(f"{head} {result.ms:9.2f} ms {result.tflops:7.1f} TFLOP/s "
          f"{result.peak_mib:9.0f} MiB peak  {ratio} floor", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_kernel.json"))
    parser.add_argument("--n", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--h", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--v", type=int, nargs="+", default=[32768, 128256, 262144])
    parser.add_argument("--k", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--divergence", choices=DIVERGENCES, default="fkl")
    parser.add_argument("--warmup-ms", type=int, default=100)
    parser.add_argument("--rep-ms", type=int, default=500)
    parser.add_argument("--quick", action="store_true",
                        help="issue 14's first two shapes, short timing loops, then a profile")
    parser.add_argument("--profile", action="store_true",
                        help="print a per-kernel profile of one triton step at the first shape")
    args = parser.parse_args(argv)
    shapes = [Shape(*s) for s in itertools.product(args.n, args.h, args.v, args.k)]
    if args.quick:
        shapes = [Shape(*s) for s in QUICK_SHAPES]
        args.warmup_ms, args.rep_ms, args.profile = 25, 200, True

    if not torch.cuda.is_available():
        print("bench_kernel: no CUDA device; this benchmark needs a GPU. Nothing was measured.")
        return 0
    env = environment()
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)

    results: list[Result] = []
    for shape in shapes:
        impls = [i for i in args.impls if i != "floor"]
        floor = measure("floor", shape, args.divergence, args.warmup_ms, args.rep_ms)
        shape_results = [floor] + [
            measure(impl, shape, args.divergence, args.warmup_ms, args.rep_ms) for impl in impls
        ]
        for result in shape_results:
            if result.ms and floor.ms:
                result.ratio_to_floor = result.ms / floor.ms
            if result.impl in args.impls:
                print_row(result)
                results.append(result)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": env,
        "divergence": args.divergence,
        "dtype": "bfloat16",
        "flops_per_step": "6 N H V",
        "results": [asdict(r) for r in results],
    }
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    if args.profile and "triton" in args.impls:
        profile_step(shapes[0], args.divergence)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
