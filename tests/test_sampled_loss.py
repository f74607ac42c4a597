"""kernels.sparse_kd_loss on a sampled teacher batch (teacher_cache.sampling): ids with
log(count / k), unused slots id 0 and logprob -inf.

With divergence="fkl" at T = 1 the KD term is sum_j q_j (log q_j - log p_student(id_j)),
q_j = count_j / k: the RS-KD cross-entropy to the sampled tokens plus sum_j q_j log q_j, a
constant of the teacher batch. So the loss is the float64 formula
    CE(labels) + mean over positions of sum_j q_j * (-log p_student(id_j))
plus the mean of that constant, and the gradients are exactly the formula's.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from kernels import IGNORE_INDEX, sparse_kd_loss
from teacher_cache.format import counts_to_logprobs
from teacher_cache.sampling import sample_targets

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Not multiples of the Triton row block or vocabulary tile.
N, H, V, K = 37, 24, 300, 8
# (loss rtol, loss atol, gradient relative error) of float32 against float64, per impl.
TOLERANCES = {"reference": (1e-5, 1e-6, 1e-5), "triton": (2e-5, 2e-6, 1e-5)}


@dataclass
class SampledBatch:
    hidden: Tensor  # float64 [N, H]
    weight: Tensor  # float64 [V, H]
    labels: Tensor  # int64 [N]
    ids: Tensor  # int64 [N, K]
    counts: Tensor  # int64 [N, K]
    logprobs: Tensor  # float32 [N, K], log(count / K), -inf where count is 0


def sampled_batch(seed: int) -> SampledBatch:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64) * 3
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5
    teacher = torch.randn(N, V, generator=gen) * 2.5
    teacher[::4, 0] += 6.0  # id 0 is drawn in these rows, beside padding slots of id 0
    ids, counts = sample_targets(teacher, seed, torch.arange(N), torch.arange(N) % 11, K)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::3] = ids[::3, 0].long()  # a label among the sampled ids
    labels[5::6] = IGNORE_INDEX
    logprobs = torch.from_numpy(counts_to_logprobs(counts.numpy(), K))
    batch = SampledBatch(hidden, weight, labels, ids.long(), counts.long(), logprobs)
    assert (batch.counts == 0).any() and ((batch.ids == 0) & (batch.counts > 0)).any()
    return batch


def rs_kd_formula(batch: SampledBatch, hidden: Tensor, weight: Tensor) -> Tensor:
    """CE(labels) + the count-weighted mean negative student logprob of the sampled ids, float64."""
    logp = torch.log_softmax(hidden @ weight.T, -1)
    valid = batch.labels != IGNORE_INDEX
    ce = -logp.gather(1, torch.where(valid, batch.labels, 0)[:, None])[:, 0]
    sampled = -(batch.counts / K * logp.gather(1, batch.ids)).sum(-1)
    return torch.where(valid, ce + sampled, 0.0).sum() / valid.sum()


def teacher_constant(batch: SampledBatch) -> float:
    """Mean over counted positions of sum_j q_j log q_j (the fkl value's student-free part)."""
    q = batch.counts.double() / K
    per_row = torch.special.xlogy(q, q).sum(-1)
    return per_row[batch.labels != IGNORE_INDEX].mean().item()


def relative_error(got: Tensor, want: Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def check_against_formula(batch: SampledBatch, impl: str) -> None:
    h = batch.hidden.to(DEVICE, torch.float32).requires_grad_()
    w = batch.weight.to(DEVICE, torch.float32).requires_grad_()
    loss = sparse_kd_loss(h, w, batch.labels.to(DEVICE), batch.ids.to(DEVICE),
                          batch.logprobs.to(DEVICE), divergence="fkl", temperature=1.0,
                          impl=impl)
    loss.backward()

    h64, w64 = batch.hidden.clone().requires_grad_(), batch.weight.clone().requires_grad_()
    want = rs_kd_formula(batch, h64, w64)
    want.backward()

    rtol, atol, grad_rel = TOLERANCES[impl]
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(loss.detach().double().cpu() - teacher_constant(batch),
                               want.detach(), rtol=rtol, atol=atol)
    assert relative_error(h.grad.double().cpu(), h64.grad) < grad_rel
    assert relative_error(w.grad.double().cpu(), w64.grad) < grad_rel


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_is_rs_kd(seed: int) -> None:
    check_against_formula(sampled_batch(seed), "reference")


@pytest.mark.parametrize("seed", [0, 1])
def test_triton_is_rs_kd(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE == "cpu":
        # triton's own @jit functions and kernels.triton_kernels read this when first imported
        # (so nothing may import triton before, without it), and sparse_kd_loss on every call.
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from kernels.triton_kernels import INTERPRETED

    assert INTERPRETED == (DEVICE == "cpu"), "the Triton kernels were imported in the wrong mode"
    check_against_formula(sampled_batch(seed), "triton")
