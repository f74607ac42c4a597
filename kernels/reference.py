"""The chunked torch reference of `kernels.sparse_kd_loss` (the math: `kernels.divergences`).

Like the Triton path it forms the gradients during the forward pass (`kernels.autograd`): it
costs the three LM-head GEMMs (6 N H V FLOPs) and never holds more than one chunk of float32
logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.autograd import GradientsInForward, LMHeadGradients, LossTotals
from kernels.divergences import KDSpec, KDTargets, row_terms, row_weights

# The most bytes one float32 [rows, V] logits block may take.
LOGITS_BLOCK_BYTES = 256 * 1024 * 1024


def logits_block_rows(num_rows: int, vocab: int, budget_bytes: int = LOGITS_BLOCK_BYTES) -> int:
    """Rows of a float32 [rows, vocab] logits block within `budget_bytes` (1 to `num_rows`)."""
    return max(1, min(num_rows, budget_bytes // (4 * vocab)))


def _chunked_loss(
    hidden: Tensor, weight: Tensor, targets: KDTargets, spec: KDSpec, rows_per_chunk: int,
    compute_grads: bool,
) -> tuple[LossTotals, LMHeadGradients | None]:
    """Chunk over rows; per chunk build the float32 logits, the loss and dL/dx, and fold dL/dx
    straight into the LM head's gradients. Peak extra memory is O(rows * V)."""
    # float32 math for float32/bf16 inputs; float64 inputs (tests) stay float64.
    math_dtype = torch.promote_types(hidden.dtype, torch.float32)
    row_weight, safe_labels = row_weights(targets.labels, targets.ignore_index, math_dtype)
    ids = torch.cat([targets.topk_ids.long(), safe_labels[:, None].long()], -1)
    teacher = targets.topk_logprobs.to(math_dtype)
    t = spec.temperature

    totals = LossTotals(math_dtype, hidden.device)
    grads = LMHeadGradients(hidden, weight, math_dtype) if compute_grads else None
    for start in range(0, hidden.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        h = hidden[rows]
        x = (h @ weight.T).to(math_dtype)
        gathered = x.gather(1, ids[rows])
        # One exp pass per temperature: e = exp(x - max) gives both LSE and the softmax.
        row_max = x.amax(-1)
        if spec.needs_tempered_lse:
            exp_t = (x / t).sub_(row_max[:, None] / t).exp_()
            sum_t = exp_t.sum(-1)
            lse_t = row_max / t + sum_t.log()
        exp_1 = x.sub_(row_max[:, None]).exp_()  # x is dead after this
        sum_1 = exp_1.sum(-1)
        lse1 = row_max + sum_1.log()
        if not spec.needs_tempered_lse:
            lse_t = lse1
        terms = row_terms(lse1, lse_t, gathered, teacher[rows], row_weight[rows], spec)
        totals.add(terms)
        if not compute_grads:
            continue
        if spec.needs_tempered_lse:
            dx = exp_1.mul_((terms.a1 / sum_1)[:, None])
            dx += exp_t.mul_((terms.a_t / sum_t)[:, None])
        else:
            dx = exp_1.mul_(((terms.a1 + terms.a_t) / sum_1)[:, None])
        dx.scatter_add_(1, ids[rows], terms.sparse)
        grads.add(rows, dx.to(hidden.dtype), h)

    return totals, grads


def sparse_kd_loss_reference(
    hidden: Tensor, weight: Tensor, targets: KDTargets, spec: KDSpec,
    rows_per_chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Torch implementation of `kernels.sparse_kd_loss` (inputs already validated): (loss, terms)
    as `GradientsInForward` returns them."""
    rows = rows_per_chunk or logits_block_rows(hidden.shape[0], weight.shape[0])
    return GradientsInForward.apply(hidden, weight, targets, spec, rows, _chunked_loss)
