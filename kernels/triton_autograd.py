"""torch.autograd.Function around the Triton kernels of `kernels.triton_kernels`.

Forward computes LSE(x) (and LSE(x / T)) and the k + 1 gathered logits without materialising
x, evaluates the per-row loss and gradient coefficients (`kernels.divergences.row_terms`, O(N k)),
and, since the loss is a scalar, the gradients too: per chunk of rows, dL/dx is written once in
the input dtype (its sparse entries computed in fp32 before rounding), then
grad_h = dL/dx @ W and grad_W += dL/dx^T @ h, with grad_W accumulated across chunks in fp32.
Backward only scales the stored gradients by the incoming one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.autograd import GradientsInForward, LMHeadGradients
from kernels.divergences import KDSpec, KDTargets, RowTerms, row_terms, row_weights
from kernels.triton_kernels import dense_dlogits, gather_logits, row_logsumexp, sparse_dlogits

# Rows per chunk are chosen so the chunk's dL/dx buffer stays under this size.
DLOGITS_CHUNK_BYTES = 512 * 1024 * 1024


def dlogits_chunk_rows(num_rows: int, vocab: int, dtype: torch.dtype) -> int:
    row_bytes = vocab * torch.finfo(dtype).bits // 8
    return max(1, min(num_rows, DLOGITS_CHUNK_BYTES // row_bytes))


class _FusedSparseKDLoss(GradientsInForward):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: KDTargets,
        spec: KDSpec,
        compute_grads: bool,
        rows_per_chunk: int,
    ) -> Tensor:
        row_weight, safe_labels = row_weights(targets.labels, targets.ignore_index)
        ids = torch.cat([targets.topk_ids, safe_labels[:, None]], -1).to(torch.int64).contiguous()
        tempered = spec.needs_tempered_lse
        lse, lse_t = row_logsumexp(hidden, weight, spec.temperature if tempered else None)
        gathered = torch.empty(ids.shape, dtype=torch.float32, device=hidden.device)
        gather_logits(hidden, weight, ids, gathered)
        teacher = targets.topk_logprobs.float()
        terms = row_terms(lse, lse if lse_t is None else lse_t, gathered, teacher, row_weight, spec)
        loss = terms.loss.sum()
        if compute_grads:
            ctx.save_for_backward(*_gradients(hidden, weight, ids, gathered, lse, lse_t, terms,
                                              spec, rows_per_chunk))
        return loss


def _gradients(
    hidden: Tensor, weight: Tensor, ids: Tensor, gathered: Tensor, lse: Tensor,
    lse_t: Tensor | None, terms: RowTerms, spec: KDSpec, rows_per_chunk: int,
) -> tuple[Tensor, Tensor]:
    tempered = lse_t is not None
    # At T = 1 (or for the bucket divergences) both dense terms are the same softmax.
    coef, coef_t = (terms.a1, terms.a_t) if tempered else (terms.a1 + terms.a_t, None)
    inv_t = 1.0 / spec.temperature
    grads = LMHeadGradients(hidden, weight, torch.float32)
    dz_buffer = torch.empty(
        rows_per_chunk, weight.shape[0], dtype=hidden.dtype, device=hidden.device
    )
    for start in range(0, hidden.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        h = hidden[rows]
        dz = dz_buffer[: h.shape[0]]
        dense_dlogits(
            h, weight, lse[rows], coef[rows], lse_t[rows] if tempered else None,
            coef_t[rows] if tempered else None, inv_t, dz,
        )
        sparse_dlogits(
            ids[rows], gathered[rows], terms.sparse[rows], lse[rows], coef[rows],
            lse_t[rows] if tempered else None, coef_t[rows] if tempered else None, inv_t, dz,
        )
        grads.add(rows, dz, h)
    return grads.result()


def sparse_kd_loss_triton(
    hidden: Tensor, weight: Tensor, targets: KDTargets, spec: KDSpec,
    rows_per_chunk: int | None = None,
) -> Tensor:
    """Triton implementation of `kernels.sparse_kd_loss` (inputs validated, contiguous)."""
    compute_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    rows = rows_per_chunk or dlogits_chunk_rows(hidden.shape[0], weight.shape[0], hidden.dtype)
    return _FusedSparseKDLoss.apply(hidden, weight, targets, spec, compute_grads, rows)
