"""Sparse knowledge-distillation loss: the divergences, their gradients, and the loss inputs.

Notation for one position n (all in float32):
  x = h W^T                the student logits at T = 1 (computed in the input dtype, upcast)
  lse1 = LSE(x),  lseT = LSE(x / T),  sigma1 = softmax(x),  sigmaT = softmax(x / T)
  g_j = x[id_j] (j = 1..k, the cached teacher ids),  g_y = x[y] (the label)
  l_j                      the cached teacher logprobs (raw, T = 1)

loss = mean over non-ignored n of  ce_weight * CE + kd_weight * T^2 * D

CE is always taken at T = 1 (as in standard KD; the temperature only softens the KD term):
  CE = lse1 - g_y,                dCE/dx = sigma1 - e_y

fkl (forward KL on the teacher's k targets, top-k or sampled, renormalised at temperature T):
  q = softmax(l / T) over the k ids,  s_j = g_j / T - lseT
  D = sum_j q_j (log q_j - s_j),  d(T^2 D)/dx = T (sigmaT - sum_j q_j e_{id_j})

fkl_tail / rkl (k+1 buckets: the top-k plus "the rest of the vocabulary"):
  Both distributions are first reduced to the k+1 buckets at T = 1, then tempered alike:
    student  B_j = g_j - lse1,  S = sum_j e^{B_j},  s_rest = max(1 - S, EPS),  B_r = log s_rest
    teacher  L_j = l_j,                             p_rest = max(1 - sum_j e^{l_j}, EPS),
             L_r = log p_rest
    u = log_softmax(B / T),  v = log_softmax(L / T)  over the k+1 buckets,  Q = e^u,  P = e^v
  At T = 1 this is exactly the k+1-bucket definition (u = B, v = L); at T != 1 the unknown tail
  of the teacher is treated as one bucket on both sides, so D = 0 when student and teacher agree
  on the buckets. 1 - S is computed as -expm1(LSE(B)), so it keeps its precision as S -> 1;
  EPS = 1e-6 is about the resolution of that quantity in float32.
    fkl_tail  D = sum_i P_i (v_i - u_i),   G_i = dD/dB_i = (Q_i - P_i) / T
    rkl       D = sum_i Q_i (u_i - v_i),   G_i = dD/dB_i = Q_i (u_i - v_i - D) / T
  A teacher logprob of -inf is a bucket of zero mass (0 log 0 = 0) for fkl and fkl_tail; rkl
  is infinite there, as reverse KL is when the teacher rules out a token the student allows.
  A NaN or +inf teacher logprob (a damaged cache) makes its row's loss NaN, as its gradient is:
  the two always agree, so a trainer that checks its loss sees what its gradient would do.
  With dB_j/dx = e_{id_j} - sigma1 and dB_r/dx = (S sigma1 - sum_j e^{B_j} e_{id_j}) / s_rest
  (zero where the clamp is active), and r = G_r / s_rest (0 where clamped):
    dD/dx = (S r - sum_j G_j) sigma1 + sum_j (G_j - r e^{B_j}) e_{id_j}

So for every divergence the gradient of one row's loss with respect to its logits is
    dL/dx = a1 * sigma1 + aT * sigmaT + sum_j c_j e_{id_j} + c_y e_y
with (before the per-row weight 1 / n_valid):
    fkl       a1 = ce_weight, aT = kd_weight T,  c_j = -kd_weight T q_j
    tail/rkl  a1 = ce_weight + kd_weight T^2 (S r - sum_j G_j), aT = 0,
              c_j = kd_weight T^2 (G_j - r e^{B_j})
    all       c_y = -ce_weight
`row_terms` evaluates these per row from (lse1, lseT, g, l); it is shared by the torch reference
(`kernels.reference`) and the Triton path (`kernels.triton_autograd`), and checked against
float64 autograd in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.choices import DIVERGENCES, IGNORE_INDEX, Divergence

TAIL_EPS = 1e-6


@dataclass(frozen=True)
class KDSpec:
    divergence: Divergence = "fkl"
    temperature: float = 1.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def needs_tempered_lse(self) -> bool:
        """Only fkl at T != 1 needs LSE(x / T); the bucket modes temper after bucketing."""
        return self.divergence == "fkl" and self.temperature != 1.0


@dataclass(frozen=True)
class KDTargets:
    """What each of the N positions is trained towards: labels [N] (ignore_index: not counted)
    and the cached teacher topk_ids [N, k] with their topk_logprobs [N, k] (raw, T = 1)."""

    labels: Tensor
    topk_ids: Tensor
    topk_logprobs: Tensor
    ignore_index: int = IGNORE_INDEX


@dataclass
class RowTerms:
    """Per-row loss, its two terms and the coefficients of dL/dx (see the module docstring), each
    already multiplied by the row weight (1 / n_valid, 0 for ignored rows)."""

    loss: Tensor  # [n], ce_weight * ce + kd_weight * T^2 * kd
    ce: Tensor  # [n], CE at T = 1
    kd: Tensor  # [n], the divergence D at temperature T
    a1: Tensor  # [n], coefficient of softmax(x)
    a_t: Tensor  # [n], coefficient of softmax(x / T)
    sparse: Tensor  # [n, k + 1], coefficients at the k teacher ids, then at the label


def _log_one_minus_exp(log_mass: Tensor) -> tuple[Tensor, Tensor]:
    """log(max(1 - e^log_mass, EPS)) and whether the clamp is inactive."""
    rest = -torch.expm1(log_mass)
    unclamped = rest > TAIL_EPS
    return torch.log(torch.clamp(rest, min=TAIL_EPS)), unclamped


def _weighted_sum(weight: Tensor, log_ratio: Tensor) -> Tensor:
    """sum_j w_j log_ratio_j with 0 * log 0 = 0: a -inf teacher logprob is a bucket of no mass.
    A NaN weight (from a NaN or +inf teacher logprob) stays NaN, as in the gradient."""
    return torch.where(weight == 0, 0.0, weight * log_ratio).sum(-1)


def row_terms(
    lse1: Tensor,
    lse_t: Tensor,
    gathered: Tensor,
    teacher_logprobs: Tensor,
    row_weight: Tensor,
    spec: KDSpec,
) -> RowTerms:
    """Loss and gradient coefficients for each row, in float32.

    gathered: [n, k + 1] student logits x at the k teacher ids, then at the label.
    row_weight: [n], 1 / n_valid for counted rows and 0 for ignored rows.
    """
    t = spec.temperature
    g_topk, g_label = gathered[:, :-1], gathered[:, -1]
    ce = lse1 - g_label

    if spec.kd_weight == 0:  # CE only: the teacher columns (rkl is infinite on -inf) take no part
        kd = torch.zeros_like(ce)
        a1 = torch.full_like(lse1, spec.ce_weight)
        a_t = torch.zeros_like(lse1)
        c_topk = torch.zeros_like(g_topk)
    elif spec.divergence == "fkl":
        log_q = torch.log_softmax(teacher_logprobs / t, dim=-1)
        q = log_q.exp()
        student = g_topk / t - lse_t[:, None]
        kd = _weighted_sum(q, log_q - student)
        a1 = torch.full_like(lse1, spec.ce_weight)
        a_t = torch.full_like(lse1, spec.kd_weight * t)
        c_topk = -spec.kd_weight * t * q
    else:
        b_topk = g_topk - lse1[:, None]
        b_rest, student_unclamped = _log_one_minus_exp(torch.logsumexp(b_topk, -1))
        # float64 is free at [n, k] and keeps a small teacher rest mass (~1e-5) accurate.
        l_rest, _ = _log_one_minus_exp(torch.logsumexp(teacher_logprobs.double(), -1))
        l_rest = l_rest.to(teacher_logprobs.dtype)
        u = torch.log_softmax(torch.cat([b_topk, b_rest[:, None]], -1) / t, dim=-1)
        v = torch.log_softmax(torch.cat([teacher_logprobs, l_rest[:, None]], -1) / t, dim=-1)
        if spec.divergence == "fkl_tail":
            p = v.exp()
            kd = _weighted_sum(p, v - u)
            grad_b = (u.exp() - p) / t
        else:
            q = u.exp()
            kd = (q * (u - v)).sum(-1)
            grad_b = q * (u - v - kd[:, None]) / t
        grad_topk, grad_rest = grad_b[:, :-1], grad_b[:, -1]
        student_topk = b_topk.exp()
        r = torch.where(student_unclamped, grad_rest / b_rest.exp(), torch.zeros_like(grad_rest))
        scale = spec.kd_weight * t * t
        a1 = spec.ce_weight + scale * (student_topk.sum(-1) * r - grad_topk.sum(-1))
        a_t = torch.zeros_like(lse1)
        c_topk = scale * (grad_topk - r[:, None] * student_topk)

    loss = spec.ce_weight * ce + spec.kd_weight * t * t * kd
    c_label = torch.full_like(lse1, -spec.ce_weight)
    sparse = torch.cat([c_topk, c_label[:, None]], -1)

    # where, not multiply: ignored rows may carry arbitrary (even non-finite) teacher data.
    counted = row_weight > 0
    w = row_weight[:, None]
    return RowTerms(
        loss=torch.where(counted, loss * row_weight, 0.0),
        ce=torch.where(counted, ce * row_weight, 0.0),
        kd=torch.where(counted, kd * row_weight, 0.0),
        a1=torch.where(counted, a1 * row_weight, 0.0),
        a_t=torch.where(counted, a_t * row_weight, 0.0),
        sparse=torch.where(counted[:, None], sparse * w, 0.0),
    )


def row_weights(
    labels: Tensor, ignore_index: int, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """(weight per row = 1 / n_valid or 0, labels with ignored entries replaced by 0)."""
    valid = labels != ignore_index
    n_valid = valid.sum().clamp(min=1)
    weight = valid.to(dtype) / n_valid
    return weight, torch.where(valid, labels, 0)
