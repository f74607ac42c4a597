"""torch.autograd.Function around the Triton epilogue kernels of `kernels.triton_kernels`.

Forward, per chunk of rows: the chunk's logits x = h W^T once (cuBLAS, input dtype) into one
reused [rows, V] buffer; one sweep for LSE(x) (and LSE(x / T)) and the k + 1 gathered logits;
the per-row loss and gradient coefficients in torch (`kernels.divergences.row_terms`, O(rows k));
and, since the loss is a scalar, the gradients too: dL/dx written over x in place (its sparse
entries computed in fp32 before rounding), then grad_h = dL/dx @ W and grad_W += dL/dx^T @ h,
with grad_W accumulated across chunks in fp32 (`kernels.autograd.LMHeadGradients`).
Backward only scales the stored gradients by the incoming one.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from kernels.autograd import GradientsInForward, LMHeadGradients, LossTotals
from kernels.divergences import KDSpec, KDTargets, row_terms, row_weights
from kernels.triton_kernels import chunk_statistics, softmax_gradient_, sparse_dlogits

# The logits buffer of one chunk: at most this size (4096 rows of a 128k bf16 vocabulary, the
# chunk the prototype ran with), and at most a quarter of the free memory.
MAX_LOGITS_BUFFER_BYTES = 1 << 30
FREE_MEMORY_SHARE = 4
# Rows per chunk are rounded to this multiple (GEMM-friendly) when that stays within the budget.
ROW_MULTIPLE = 128


def logits_buffer_rows(num_rows: int, vocab: int, itemsize: int, free_bytes: int) -> int:
    """Rows of the [rows, vocab] logits buffer within its budget of bytes: as few chunks as it
    allows, of (nearly) equal size so the last chunk is not a sliver, each at least one row."""
    budget = min(MAX_LOGITS_BUFFER_BYTES, free_bytes // FREE_MEMORY_SHARE)
    max_rows = max(1, budget // (vocab * itemsize))
    chunks = -(-num_rows // max_rows)
    rows = -(-num_rows // chunks)
    rounded = -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE
    return min(num_rows, rounded if rounded <= max_rows else rows)


def free_memory(device: torch.device) -> int:
    """Bytes a new buffer can take: free device memory plus torch's cached blocks on CUDA, the
    available physical memory elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _fused_loss(
    hidden: Tensor, weight: Tensor, targets: KDTargets, spec: KDSpec, rows_per_chunk: int,
    compute_grads: bool,
) -> tuple[LossTotals, LMHeadGradients | None]:
    row_weight, safe_labels = row_weights(targets.labels, targets.ignore_index)
    ids = torch.cat([targets.topk_ids, safe_labels[:, None]], -1).to(torch.int64).contiguous()
    teacher = targets.topk_logprobs.float()
    tempered = spec.needs_tempered_lse
    inv_t = 1.0 / spec.temperature
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device

    rows_per_chunk = min(rows_per_chunk, n_rows)
    logits_buffer = torch.empty(rows_per_chunk, vocab, dtype=hidden.dtype, device=device)
    lse = torch.empty(n_rows, device=device)
    lse_t = torch.empty(n_rows, device=device) if tempered else None
    gathered = torch.empty(ids.shape, device=device)
    totals = LossTotals(torch.float32, device)
    grads = LMHeadGradients(hidden, weight, torch.float32) if compute_grads else None
    for start in range(0, n_rows, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        h = hidden[rows]
        x = logits_buffer[: h.shape[0]]
        torch.mm(h, weight.T, out=x)
        chunk_lse_t = lse_t[rows] if tempered else None
        chunk_statistics(x, ids[rows], inv_t if tempered else None, lse[rows], chunk_lse_t,
                         gathered[rows])
        terms = row_terms(lse[rows], lse[rows] if chunk_lse_t is None else chunk_lse_t,
                          gathered[rows], teacher[rows], row_weight[rows], spec)
        totals.add(terms)
        if not compute_grads:
            continue
        # At T = 1 (or for the bucket divergences) both dense terms are the same softmax.
        coef, coef_t = (terms.a1, terms.a_t) if tempered else (terms.a1 + terms.a_t, None)
        softmax_gradient_(x, lse[rows], coef, chunk_lse_t, coef_t, inv_t)
        sparse_dlogits(ids[rows], gathered[rows], terms.sparse, lse[rows], coef, chunk_lse_t,
                       coef_t, inv_t, x)
        grads.add(rows, x, h)

    return totals, grads


def sparse_kd_loss_triton(
    hidden: Tensor, weight: Tensor, targets: KDTargets, spec: KDSpec,
    rows_per_chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton implementation of `kernels.sparse_kd_loss` (inputs validated, contiguous): (loss,
    terms) as `GradientsInForward` returns them."""
    rows = rows_per_chunk or logits_buffer_rows(hidden.shape[0], weight.shape[0],
                                                hidden.element_size(), free_memory(hidden.device))
    return GradientsInForward.apply(hidden, weight, targets, spec, rows, _fused_loss)
