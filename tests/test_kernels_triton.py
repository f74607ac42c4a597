"""The Triton kernels against float64: on CUDA when present, else in the Triton interpreter
(tiny shapes: the interpreter runs at ~0.1 GFLOP/s)."""

from __future__ import annotations

from dataclasses import replace

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Without CUDA the kernels run in the Triton interpreter: conftest.py sets TRITON_INTERPRET for
# the whole session, before anything imports triton (which reads it at import).

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
from kernels.autograd import LMHeadGradients  # noqa: E402
from kernels.divergences import KDSpec  # noqa: E402
from kernels.reference import sparse_kd_loss_reference  # noqa: E402
from kernels.triton_autograd import (  # noqa: E402
    MAX_LOGITS_BUFFER_BYTES,
    free_memory,
    logits_buffer_rows,
    sparse_kd_loss_triton,
)
from kernels.triton_kernels import (  # noqa: E402
    INTERPRETED,
    INTERPRETER_TILE,
    chunk_statistics,
    softmax_gradient_,
    sparse_dlogits,
)

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
    x = inputs.hidden @ inputs.weight.T
    temperature = 2.0
    # Several row blocks and vocabulary tiles, the last of each partial: the online LSE
    # combines tiles and masks both edges.
    assert N % INTERPRETER_TILE.block_n and V % INTERPRETER_TILE.block_v
    assert V > 2 * INTERPRETER_TILE.block_v

    ids = torch.cat([inputs.topk_ids, inputs.labels.clamp(min=0)[:, None]], -1).contiguous()
    lse, lse_t = torch.full((2, N), float("nan"), device=DEVICE)
    gathered = torch.full(ids.shape, float("nan"), device=DEVICE)
    chunk_statistics(x, ids, 1 / temperature, lse, lse_t, gathered)
    torch.testing.assert_close(lse, torch.logsumexp(x, -1))
    torch.testing.assert_close(lse_t, torch.logsumexp(x / temperature, -1))
    torch.testing.assert_close(gathered, x.gather(1, ids))

    coef, coef_t = torch.rand(N, device=DEVICE), torch.rand(N, device=DEVICE)
    dz = x.clone()
    softmax_gradient_(dz, lse, coef, lse_t, coef_t, 1 / temperature)
    softmax_t = torch.softmax(x / temperature, -1)
    want = coef[:, None] * torch.softmax(x, -1) + coef_t[:, None] * softmax_t
    torch.testing.assert_close(dz, want)

    sparse = torch.randn(ids.shape, device=DEVICE)
    sparse_dlogits(ids, gathered, sparse, lse, coef, lse_t, coef_t, 1 / temperature, dz)
    want.scatter_add_(1, ids, sparse)
    torch.testing.assert_close(dz, want)


def test_untempered_statistics_and_gradient_match_torch() -> None:
    """T = 1: no tempered sums are read or written; bf16 logits are read and written as bf16."""
    inputs = on_device(make_inputs(N, H, V, 8, seed=10, logit_scale=3.0))
    x = (inputs.hidden @ inputs.weight.T).bfloat16()
    ids = torch.cat([inputs.topk_ids, inputs.labels.clamp(min=0)[:, None]], -1).contiguous()
    lse = torch.empty(N, device=DEVICE)
    gathered = torch.empty(ids.shape, device=DEVICE)
    chunk_statistics(x, ids, None, lse, None, gathered)
    torch.testing.assert_close(lse, torch.logsumexp(x.float(), -1))
    assert torch.equal(gathered, x.gather(1, ids).float())

    coef = torch.rand(N, device=DEVICE)
    dz = x.clone()
    softmax_gradient_(dz, lse, coef, None, None, 1.0)
    want = (coef[:, None] * torch.softmax(x.float(), -1)).bfloat16()
    torch.testing.assert_close(dz, want)


@pytest.mark.parametrize("chunk", [1, 7, N, 4 * N])
def test_any_chunk_size_gives_the_same_result(chunk: int) -> None:
    """Chunks of one row, ragged chunks, one chunk, and a chunk larger than the batch."""
    spec = KDSpec("fkl", 2.0)
    inputs = make_inputs(N, H, V, 4, seed=14, logit_scale=3.0)
    got = loss_and_grads(sparse_kd_loss_triton, on_device(inputs), torch.float32, spec,
                         rows_per_chunk=chunk)
    assert_close_to_float64(tuple(t.cpu() for t in got), expected(inputs, spec), grad_tol=1e-5)


def test_logits_buffer_rows_follows_the_memory_budget() -> None:
    gib = 1 << 30
    # Plenty of memory: 1 GiB buffers, equal chunks, GEMM-friendly row counts.
    assert logits_buffer_rows(16384, 128256, 2, 80 * gib) == 4096
    assert logits_buffer_rows(16384, 128256, 4, 80 * gib) == 2048
    assert logits_buffer_rows(8192, 262144, 2, 80 * gib) == 2048
    assert logits_buffer_rows(16384, 32768, 2, 80 * gib) == 16384  # one chunk holds everything
    # Little memory: a quarter of it, and never less than a row.
    assert logits_buffer_rows(16384, 128256, 2, gib) * 128256 * 2 <= gib // 4
    assert logits_buffer_rows(100, 128256, 2, 0) == 1
    # A batch of 5000 rows in two near-equal chunks (2560 + 2440), not 4096 + 904.
    assert logits_buffer_rows(5000, 128256, 2, 80 * gib) == 2560
    for n, v, itemsize, free in [(70, 1000, 4, 10**6), (16383, 50257, 2, 8 * gib),
                                 (3, 7, 4, 100), (12345, 151936, 4, 40 * gib)]:
        rows = logits_buffer_rows(n, v, itemsize, free)
        assert 1 <= rows <= n
        assert rows == 1 or rows * v * itemsize <= min(MAX_LOGITS_BUFFER_BYTES, free // 4)


def test_free_memory_is_positive() -> None:
    assert free_memory(torch.device(DEVICE)) > 0


def test_grad_weight_accumulates_bfloat16_chunks_in_float32() -> None:
    """Each chunk's bf16 product is rounded at most once (on CUDA the GEMM adds it into the fp32
    accumulator directly where torch can) and the sum over many chunks stays fp32: a bf16
    running sum would be off by ~1.3e-2 here, against ~1.6e-3."""
    gen = torch.Generator().manual_seed(15)
    hidden = torch.randn(256, 16, generator=gen).bfloat16().to(DEVICE)
    weight = torch.randn(32, 16, generator=gen).bfloat16().to(DEVICE)
    dlogits = (torch.randn(256, 32, generator=gen) * 1e-3).bfloat16().to(DEVICE)
    grads = LMHeadGradients(hidden, weight, torch.float32)
    if DEVICE == "cpu":
        assert not grads.fused  # torch's CPU build has no out_dtype addmm
    for start in range(0, 256, 2):
        rows = slice(start, start + 2)
        grads.add(rows, dlogits[rows], hidden[rows])
    want = dlogits.double().T @ hidden.double()
    assert grads.grad_weight.dtype == torch.float32
    assert relative_error(grads.grad_weight.double().cpu(), want.cpu()) < 3e-3
    torch.testing.assert_close(grads.grad_hidden.double(), dlogits.double() @ weight.double(),
                               rtol=1e-2, atol=1e-5)


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


@pytest.mark.parametrize("spec", [KDSpec("fkl", 2.0, ce_weight=0.5), KDSpec("rkl", 1.0)],
                         ids=lambda s: f"{s.divergence}-T{s.temperature}")
def test_terms_match_the_reference(spec: KDSpec) -> None:
    inputs = on_device(make_inputs(N, H, V, 8, seed=3))
    h, w, *_ = inputs.args(torch.float32)
    loss, terms = sparse_kd_loss_triton(h, w, inputs.targets(), spec, rows_per_chunk=CHUNK)
    want_loss, want_terms = sparse_kd_loss_reference(h, w, inputs.targets(), spec)
    assert not terms.requires_grad
    torch.testing.assert_close(terms, want_terms, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=2e-6)
