"""The Triton kernels against float64: on CUDA when present, else in the Triton interpreter
(tiny shapes: the interpreter runs at ~0.1 GFLOP/s)."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Without CUDA the kernels run in the Triton interpreter. @triton.jit reads TRITON_INTERPRET when
# kernels.triton_kernels is imported, so it is set for that import (then restored, so it does not
# leak into other test modules) and again around every test here.
_saved_interpret = os.environ.get("TRITON_INTERPRET")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from helpers import (  # noqa: E402
    IGNORE,
    TOLERANCES,
    Inputs,
    assert_matches_float64,
    expected,
    loss_and_grads,
    make_inputs,
    relative_error,
)

from kernels import sparse_kd_loss  # noqa: E402
from kernels.divergences import KDSpec  # noqa: E402
from kernels.reference import sparse_kd_loss_reference  # noqa: E402
from kernels.triton_autograd import sparse_kd_loss_triton  # noqa: E402
from kernels.triton_kernels import (  # noqa: E402
    INTERPRETED,
    dense_dlogits,
    gather_logits,
    lse_partials,
    lse_splits,
    tile_config,
)

if _saved_interpret is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _saved_interpret
assert INTERPRETED == (DEVICE == "cpu"), "kernels.triton_kernels was imported in the wrong mode"


@pytest.fixture(autouse=True)
def _interpreter_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


# N not a multiple of the row block nor of the chunk, V not a multiple of the vocabulary tile.
N, H, V = 70, 40, 1000
CHUNK = 48


def on_device(inputs: Inputs) -> Inputs:
    return Inputs(*(t.to(DEVICE) for t in vars(inputs).values()))


def triton_result(inputs: Inputs, dtype: torch.dtype, spec: KDSpec):
    result = loss_and_grads(
        sparse_kd_loss_triton, on_device(inputs), dtype, spec, rows_per_chunk=CHUNK
    )
    return tuple(t.cpu() for t in result)


def assert_close_to_float64(got, want, grad_tol: float) -> None:
    assert all(torch.isfinite(t).all() for t in got)
    loosened = replace(TOLERANCES[torch.float32], loss_rtol=2e-5, loss_atol=2e-6, grad_rel=grad_tol)
    assert_matches_float64(got, want, loosened)


@pytest.mark.parametrize(
    ("spec", "k"),
    [
        (KDSpec("fkl", 1.0), 8),
        (KDSpec("fkl", 2.0, ce_weight=0.5), 64),
        (KDSpec("fkl_tail", 1.0), 1),
        (KDSpec("fkl_tail", 0.5, kd_weight=2.0), 8),
        (KDSpec("rkl", 1.0), 64),
        (KDSpec("rkl", 2.0, ce_weight=0.0), 8),
    ],
    ids=lambda p: f"{p.divergence}-T{p.temperature}" if isinstance(p, KDSpec) else f"k{p}",
)
def test_float32_matches_float64(spec: KDSpec, k: int) -> None:
    inputs = make_inputs(N, H, V, k, seed=k, logit_scale=3.0)
    assert_close_to_float64(triton_result(inputs, torch.float32, spec), expected(inputs, spec),
                            grad_tol=1e-5)


@pytest.mark.parametrize("divergence", ["fkl_tail", "rkl"])
def test_teacher_mass_near_one_and_large_logits(divergence: str) -> None:
    spec = KDSpec(divergence, 1.0)
    inputs = make_inputs(N, H, V, 8, seed=11, teacher_scale=30.0, logit_scale=20.0,
                         full_teacher_mass=divergence == "rkl")
    assert (1 - inputs.topk_logprobs.double().exp().sum(-1) < 1e-3).all()
    assert_close_to_float64(triton_result(inputs, torch.float32, spec), expected(inputs, spec),
                            grad_tol=1e-4)


@pytest.mark.parametrize(
    "spec", [KDSpec("fkl", 2.0), KDSpec("fkl_tail"), KDSpec("rkl")], ids=lambda s: s.divergence
)
def test_bfloat16_no_worse_than_torch_bfloat16(spec: KDSpec) -> None:
    inputs = make_inputs(N, 64, V, 16, seed=5, logit_scale=2.0)
    want = expected(inputs, spec)
    got = triton_result(inputs, torch.bfloat16, spec)
    torch_bf16 = loss_and_grads(sparse_kd_loss_reference, inputs, torch.bfloat16, spec)
    assert abs(got[0] - want[0]) <= abs(torch_bf16[0] - want[0]) + 1e-3 * abs(want[0])
    for g, t, e in zip(got[1:], torch_bf16[1:], want[1:], strict=True):
        assert relative_error(g, e) <= relative_error(t, e) + 5e-3


def test_all_ignored_is_zero_without_nan() -> None:
    inputs = make_inputs(N, H, V, 8, seed=6)
    inputs.labels[:] = IGNORE
    inputs.topk_logprobs[:] = float("nan")
    h, w, *rest = on_device(inputs).args(torch.float32)
    loss = sparse_kd_loss(h, w, *rest, divergence="fkl_tail", impl="triton")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_empty_batch_is_zero() -> None:
    inputs = on_device(make_inputs(6, H, V, 8, seed=13))
    empty = Inputs(inputs.hidden[:0], inputs.weight, inputs.labels[:0], inputs.topk_ids[:0],
                   inputs.topk_logprobs[:0])
    h, w, *rest = empty.args(torch.float32)
    loss = sparse_kd_loss(h, w, *rest, impl="triton")
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, H)
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, w, *rest = make_inputs(4, 8, 50, 4, seed=12).args(torch.float32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        sparse_kd_loss(h, w, *rest, impl="triton")


def test_kernels_write_every_output_element() -> None:
    """Outputs start as NaN: every element must be written with the torch value."""
    inputs = on_device(make_inputs(N, H, V, 8, seed=9, logit_scale=3.0))
    h, w = inputs.hidden, inputs.weight
    x = h @ w.T
    temperature = 2.0

    splits, _ = lse_splits(N, V, tile_config(h.dtype))
    assert splits > 1  # the cross-split combine is exercised
    partials = torch.full((3, splits, N), float("nan"), device=DEVICE)
    lse_partials(h, w, 1 / temperature, *partials)
    assert torch.isfinite(partials).all()
    row_max = partials[0].amax(0)
    torch.testing.assert_close(row_max, x.amax(-1))
    lse = row_max + (partials[1] * (partials[0] - row_max).exp()).sum(0).log()
    torch.testing.assert_close(lse, torch.logsumexp(x, -1))
    shift_t = (partials[0] - row_max) / temperature
    lse_t = row_max / temperature + (partials[2] * shift_t.exp()).sum(0).log()
    torch.testing.assert_close(lse_t, torch.logsumexp(x / temperature, -1))

    ids = torch.cat([inputs.topk_ids, inputs.labels.clamp(min=0)[:, None]], -1).contiguous()
    gathered = torch.full(ids.shape, float("nan"), device=DEVICE)
    gather_logits(h, w, ids, gathered)
    torch.testing.assert_close(gathered, x.gather(1, ids))

    coef, coef_t = torch.rand(N, device=DEVICE), torch.rand(N, device=DEVICE)
    dz = torch.full((N, V), float("nan"), device=DEVICE)
    dense_dlogits(h, w, lse, coef, lse_t, coef_t, 1 / temperature, dz)
    softmax_t = torch.softmax(x / temperature, -1)
    want = coef[:, None] * torch.softmax(x, -1) + coef_t[:, None] * softmax_t
    torch.testing.assert_close(dz, want)


def test_bfloat16_grad_weight_is_summed_over_chunks_in_float32(monkeypatch) -> None:
    """The Triton wrapper folds its bf16 chunks into LMHeadGradients with a float32 sum, whose
    accuracy over many chunks test_kernels_precision.py measures (many interpreted launches per
    chunk make that measurement too slow here)."""
    import kernels.autograd
    import kernels.triton_autograd

    accumulate_dtypes = []

    class Recording(kernels.autograd.LMHeadGradients):
        def __init__(self, hidden, weight, accumulate_dtype):
            accumulate_dtypes.append(accumulate_dtype)
            super().__init__(hidden, weight, accumulate_dtype)

    monkeypatch.setattr(kernels.triton_autograd, "LMHeadGradients", Recording)
    inputs = make_inputs(12, 16, 64, 4, seed=12)
    triton_result(inputs, torch.bfloat16, KDSpec("fkl"))
    assert accumulate_dtypes == [torch.float32]
