"""The torch reference of kernels.sparse_kd_loss against a float64 brute force over full logits."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from kernels import sparse_kd_loss
from kernels.reference import TAIL_EPS, KDSpec, sparse_kd_loss_reference

IGNORE = -100


@dataclass
class Inputs:
    hidden: Tensor
    weight: Tensor
    labels: Tensor
    topk_ids: Tensor
    topk_logprobs: Tensor

    def args(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """The five positional arguments, hidden and weight as fresh leaves of dtype."""
        h = self.hidden.to(dtype, copy=True).requires_grad_()
        w = self.weight.to(dtype, copy=True).requires_grad_()
        return h, w, self.labels, self.topk_ids, self.topk_logprobs


def make_inputs(
    n: int, h: int, v: int, k: int, *, seed: int, teacher_scale: float = 3.0,
    logit_scale: float = 1.0, full_teacher_mass: bool = False,
) -> Inputs:
    """Random student and teacher; a third of the labels inside the top-k, a third outside,
    every sixth position ignored. teacher_scale sharpens the teacher (top-k mass -> 1);
    full_teacher_mass renormalises the top-k so the rest has exactly zero mass."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen) * logit_scale
    weight = torch.randn(v, h, generator=gen) / h**0.5
    teacher = torch.log_softmax(torch.randn(n, v, generator=gen) * teacher_scale, -1)
    topk_logprobs, topk_ids = teacher.topk(k, dim=-1)
    if full_teacher_mass:
        topk_logprobs = torch.log_softmax(topk_logprobs, -1)
    labels = torch.randint(0, v, (n,), generator=gen)
    in_topk = torch.arange(n) % 3 == 0
    labels[in_topk] = topk_ids[in_topk, -1]
    outside = torch.arange(n) % 3 == 1
    for row in outside.nonzero().flatten().tolist():
        mask = torch.ones(v, dtype=torch.bool)
        mask[topk_ids[row]] = False
        if mask.any():
            labels[row] = mask.nonzero()[0, 0]
    labels[torch.arange(n) % 6 == 5] = IGNORE
    return Inputs(hidden, weight, labels, topk_ids, topk_logprobs.float())


def brute_force(
    hidden: Tensor, weight: Tensor, labels: Tensor, topk_ids: Tensor, topk_logprobs: Tensor,
    spec: KDSpec,
) -> Tensor:
    """The loss straight from its definition, over the full [N, V] logits, in float64."""
    t = spec.temperature
    x = hidden.double() @ weight.double().T
    teacher = topk_logprobs.double()
    valid = labels != IGNORE
    ce = torch.logsumexp(x, -1) - x.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    if spec.divergence == "fkl":
        s = torch.log_softmax(x / t, -1).gather(1, topk_ids)
        q = torch.softmax(teacher / t, -1)
        kd = (torch.special.xlogy(q, q) - q * s).sum(-1)
    else:
        s = torch.log_softmax(x, -1).gather(1, topk_ids)
        s_rest = torch.clamp(1 - s.exp().sum(-1), min=TAIL_EPS)
        p_rest = torch.clamp(1 - teacher.exp().sum(-1), min=TAIL_EPS)
        u = torch.log_softmax(torch.cat([s, s_rest.log()[:, None]], -1) / t, -1)
        v = torch.log_softmax(torch.cat([teacher, p_rest.log()[:, None]], -1) / t, -1)
        if spec.divergence == "fkl_tail":
            p = v.exp()
            kd = (torch.special.xlogy(p, p) - p * u).sum(-1)
        else:
            kd = (u.exp() * (u - v)).sum(-1)
    per_row = spec.ce_weight * ce + spec.kd_weight * t * t * kd
    return torch.where(valid, per_row, 0.0).sum() / valid.sum().clamp(min=1)


def loss_and_grads(fn, inputs: Inputs, dtype: torch.dtype, spec: KDSpec, **kwargs):
    h, w, *rest = inputs.args(dtype)
    loss = fn(h, w, *rest, spec, **kwargs)
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


def expected(inputs: Inputs, spec: KDSpec):
    return loss_and_grads(brute_force, inputs, torch.float64, spec)


def relative_error(got: Tensor, want: Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def assert_matches_float64(got: tuple[Tensor, ...], want: tuple[Tensor, ...], *,
                           loss_atol: float, grad_rel: float) -> None:
    """(loss, grad_hidden, grad_weight) against the float64 brute force."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=loss_atol)
    for g, e in zip(got[1:], want[1:], strict=True):
        assert relative_error(g, e) < grad_rel


SPECS = [
    KDSpec("fkl", 1.0),
    KDSpec("fkl", 2.0, ce_weight=0.5, kd_weight=2.0),
    KDSpec("fkl_tail", 1.0),
    KDSpec("fkl_tail", 0.5, ce_weight=0.0),
    KDSpec("rkl", 1.0, kd_weight=0.7),
    KDSpec("rkl", 2.0),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.divergence}-T{s.temperature}")
def test_float64_gradients_match_autograd_exactly(spec: KDSpec) -> None:
    """The closed-form dL/dx of every divergence (module docstring) equals autograd's."""
    inputs = make_inputs(23, 16, 131, 8, seed=1)
    got = loss_and_grads(sparse_kd_loss_reference, inputs, torch.float64, spec, rows_per_chunk=5)
    for g, e in zip(got, expected(inputs, spec), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.divergence}-T{s.temperature}")
@pytest.mark.parametrize("k", [1, 8, 64])
def test_float32_matches_float64(spec: KDSpec, k: int) -> None:
    n, h, v = 37, 24, 257  # N not a multiple of the chunk, V odd
    inputs = make_inputs(n, h, v, k, seed=k, logit_scale=4.0)
    got = loss_and_grads(sparse_kd_loss_reference, inputs, torch.float32, spec, rows_per_chunk=8)
    want = expected(inputs, spec)
    assert_matches_float64(got, want, loss_atol=1e-6, grad_rel=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_and_options(seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=gen))

    n, h, v = draw(1, 60), draw(1, 48), draw(2, 400)
    k = draw(1, min(v, 70))
    spec = KDSpec(
        ("fkl", "fkl_tail", "rkl")[draw(0, 2)], temperature=(0.7, 1.0, 3.0)[draw(0, 2)],
        ce_weight=(0.0, 1.0)[draw(0, 1)], kd_weight=(0.5, 1.0)[draw(0, 1)],
    )
    inputs = make_inputs(n, h, v, k, seed=seed, logit_scale=2.0)
    got = loss_and_grads(
        sparse_kd_loss_reference, inputs, torch.float32, spec, rows_per_chunk=draw(1, 64)
    )
    want = expected(inputs, spec)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, e in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * e.abs().max().item() + 1e-12)


@pytest.mark.parametrize("divergence", ["fkl_tail", "rkl"])
@pytest.mark.parametrize("full_mass", [False, True], ids=["mass-1e-5", "mass-1"])
def test_teacher_mass_near_one(divergence: str, full_mass: bool) -> None:
    """A very sharp teacher (rest mass ~1e-5) and one whose top-k holds all the mass, where
    log p_rest is clamped: finite and equal to float64."""
    spec = KDSpec(divergence, 1.0)
    inputs = make_inputs(20, 16, 97, 8, seed=3, teacher_scale=12.0, full_teacher_mass=full_mass)
    rest = 1 - inputs.topk_logprobs.double().exp().sum(-1)
    assert (rest < 1e-3).all()
    got = loss_and_grads(sparse_kd_loss_reference, inputs, torch.float32, spec)
    want = expected(inputs, spec)
    assert all(torch.isfinite(g).all() for g in got)
    assert_matches_float64(got, want, loss_atol=1e-6, grad_rel=1e-4)


@pytest.mark.parametrize("divergence", ["fkl", "fkl_tail", "rkl"])
def test_large_logits_stay_finite(divergence: str) -> None:
    spec = KDSpec(divergence, 1.0)
    inputs = make_inputs(12, 32, 200, 8, seed=4, logit_scale=30.0)
    got = loss_and_grads(sparse_kd_loss_reference, inputs, torch.float32, spec)
    want = expected(inputs, spec)
    assert all(torch.isfinite(g).all() for g in got)
    assert_matches_float64(got, want, loss_atol=1e-5, grad_rel=1e-4)


@pytest.mark.parametrize("spec", SPECS[::2], ids=lambda s: s.divergence)
def test_bfloat16_close_to_float64(spec: KDSpec) -> None:
    inputs = make_inputs(40, 64, 300, 16, seed=5, logit_scale=2.0)
    got = loss_and_grads(sparse_kd_loss_reference, inputs, torch.bfloat16, spec)
    want = expected(inputs, spec)
    assert got[0].dtype == torch.float64 and abs(got[0] - want[0]) / want[0] < 2e-2
    for g, e in zip(got[1:], want[1:], strict=True):
        assert relative_error(g, e) < 3e-2


@pytest.mark.parametrize("divergence", ["fkl", "fkl_tail"])
def test_teacher_logprob_minus_inf_is_zero_mass(divergence: str) -> None:
    spec = KDSpec(divergence, 1.5)
    inputs = make_inputs(15, 16, 80, 8, seed=10)
    inputs.topk_logprobs[::2, -3:] = float("-inf")
    got = loss_and_grads(sparse_kd_loss_reference, inputs, torch.float32, spec)
    want = expected(inputs, spec)
    assert all(torch.isfinite(g).all() for g in want)
    assert_matches_float64(got, want, loss_atol=1e-6, grad_rel=1e-5)


def test_all_ignored_is_zero_with_a_graph() -> None:
    inputs = make_inputs(9, 8, 50, 4, seed=6)
    inputs.labels[:] = IGNORE
    inputs.topk_logprobs[:] = float("nan")  # ignored rows may hold anything
    h, w, *rest = inputs.args(torch.float32)
    loss = sparse_kd_loss(h, w, *rest, divergence="rkl")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_public_api_scales_by_upstream_grad_and_matches_no_grad() -> None:
    inputs = make_inputs(10, 8, 60, 4, seed=7)
    h, w, *rest = inputs.args(torch.float32)
    loss = sparse_kd_loss(h, w, *rest, divergence="fkl_tail", temperature=1.0, impl="auto")
    (3.0 * loss).backward()
    want = expected(inputs, KDSpec("fkl_tail"))
    assert relative_error(h.grad.double(), 3.0 * want[1]) < 1e-5
    with torch.no_grad():
        again = sparse_kd_loss(h, w, *rest, divergence="fkl_tail", impl="reference")
    assert again.item() == loss.item() and again.grad_fn is None


@pytest.mark.parametrize(
    ("autocast_dtype", "matmul_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
    ids=["bf16-autocast", "fp16-autocast-stays-fp32"],
)
def test_autocast_picks_the_matmul_dtype(autocast_dtype, matmul_dtype) -> None:
    inputs = make_inputs(10, 16, 60, 4, seed=9)
    h, w, *rest = inputs.args(torch.float32)
    with torch.autocast("cpu", dtype=autocast_dtype):
        loss = sparse_kd_loss(h, w, *rest, divergence="rkl")
    loss.backward()
    want = loss_and_grads(sparse_kd_loss_reference, inputs, matmul_dtype, KDSpec("rkl"))
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert loss.item() == want[0].item()
    torch.testing.assert_close(w.grad.double(), want[2])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(hidden=a["hidden"][:, :-1]), "hidden must be"),
        (lambda a: a.update(weight=a["weight"].double()), "share one dtype"),
        (lambda a: a.update(hidden=a["hidden"].half(), weight=a["weight"].half()), "one dtype"),
        (lambda a: a.update(labels=a["labels"].float()), "labels must be"),
        (lambda a: a.update(topk_ids=a["topk_ids"][:-1]), "topk_ids must be"),
        (lambda a: a.update(topk_logprobs=a["topk_logprobs"][:, :-1]), "topk_logprobs must"),
        (lambda a: a["topk_ids"].__setitem__((0, 0), 50), r"\[0, 50\)"),
        (lambda a: a["labels"].__setitem__(0, -1), r"\[0, 50\)"),
        (lambda a: a.update(divergence="jsd"), "divergence must be"),
        (lambda a: a.update(temperature=0.0), "temperature must be"),
        (lambda a: a.update(impl="cuda"), "impl must be"),
    ],
)
def test_bad_input_raises_value_error(change, message: str) -> None:
    inputs = make_inputs(6, 8, 50, 4, seed=8)
    kwargs = dict(
        hidden=inputs.hidden, weight=inputs.weight, labels=inputs.labels.clone(),
        topk_ids=inputs.topk_ids.clone(), topk_logprobs=inputs.topk_logprobs,
    )
    change(kwargs)
    with pytest.raises(ValueError, match=message):
        sparse_kd_loss(**kwargs)
