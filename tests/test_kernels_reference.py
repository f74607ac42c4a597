"""The torch reference of kernels.sparse_kd_loss against a float64 brute force over full logits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import (
    IGNORE,
    TOLERANCES,
    assert_matches_float64,
    brute_force,
    expected,
    loss_and_grads,
    make_inputs,
    relative_error,
)

from kernels import sparse_kd_loss
from kernels.divergences import KDSpec
from kernels.reference import sparse_kd_loss_reference

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
    assert_matches_float64(got, want, TOLERANCES[torch.float32])


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
    assert_matches_float64(got, want, replace(TOLERANCES[torch.float32], grad_rel=1e-4))


@pytest.mark.parametrize("divergence", ["fkl", "fkl_tail", "rkl"])
def test_large_logits_stay_finite(divergence: str) -> None:
    spec = KDSpec(divergence, 1.0)
    inputs = make_inputs(12, 32, 200, 8, seed=4, logit_scale=30.0)
    got = loss_and_grads(sparse_kd_loss_reference, inputs, torch.float32, spec)
    want = expected(inputs, spec)
    assert all(torch.isfinite(g).all() for g in got)
    assert_matches_float64(
        got, want, replace(TOLERANCES[torch.float32], loss_atol=1e-5, grad_rel=1e-4)
    )


@pytest.mark.parametrize("spec", SPECS[::2], ids=lambda s: s.divergence)
def test_bfloat16_close_to_float64(spec: KDSpec) -> None:
    inputs = make_inputs(40, 64, 300, 16, seed=5, logit_scale=2.0)
    got = loss_and_grads(sparse_kd_loss_reference, inputs, torch.bfloat16, spec)
    want = expected(inputs, spec)
    assert got[0].dtype == torch.float64
    assert_matches_float64(got, want, TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("divergence", ["fkl", "fkl_tail"])
def test_teacher_logprob_minus_inf_is_zero_mass(divergence: str) -> None:
    spec = KDSpec(divergence, 1.5)
    inputs = make_inputs(15, 16, 80, 8, seed=10)
    inputs.topk_logprobs[::2, -3:] = float("-inf")
    got = loss_and_grads(sparse_kd_loss_reference, inputs, torch.float32, spec)
    want = expected(inputs, spec)
    assert all(torch.isfinite(g).all() for g in want)
    assert_matches_float64(got, want, TOLERANCES[torch.float32])


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


def test_bf16_autocast_casts_a_float32_weight_next_to_bf16_hidden_states() -> None:
    """The loss owns the autocast cast, as nn.Linear would: callers need not cast either input."""
    inputs = make_inputs(10, 16, 60, 4, seed=9)
    _, w, *rest = inputs.args(torch.float32)
    h = inputs.hidden.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sparse_kd_loss(h, w, *rest, divergence="fkl")
    loss.backward()
    want = loss_and_grads(sparse_kd_loss_reference, inputs, torch.bfloat16, KDSpec("fkl"))
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
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


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.divergence}-T{s.temperature}")
def test_terms_are_the_means_of_ce_and_the_divergence(spec: KDSpec) -> None:
    """return_terms: the loss as without it, and its two terms, detached, from their definitions."""
    inputs = make_inputs(23, 16, 131, 8, seed=2)
    h, w, *rest = inputs.args(torch.float64)
    want_loss, want_terms = brute_force(h, w, inputs.targets(), spec)
    _, terms = sparse_kd_loss_reference(h, w, inputs.targets(), spec, rows_per_chunk=5)
    torch.testing.assert_close(terms, want_terms, rtol=1e-9, atol=1e-12)

    h, w, *rest = inputs.args(torch.float32)
    options = dict(divergence=spec.divergence, temperature=spec.temperature,
                   ce_weight=spec.ce_weight, kd_weight=spec.kd_weight)
    loss, terms = sparse_kd_loss(h, w, *rest, **options, return_terms=True)
    assert not terms.requires_grad and terms.dtype == torch.float32 and terms.shape == (2,)
    assert torch.equal(loss, sparse_kd_loss(h, w, *rest, **options))
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    t2 = spec.temperature ** 2
    torch.testing.assert_close(loss, spec.ce_weight * terms[0] + spec.kd_weight * t2 * terms[1])
