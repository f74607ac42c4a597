"""What the torch reference and the Triton loss share as autograd functions: both form the
gradients during the forward pass, while a chunk's logits are at hand (the loss is a scalar, so
backward only scales them by the incoming gradient), and fold each chunk's dL/dx into the LM
head's gradients."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from kernels.divergences import KDSpec, KDTargets, RowTerms


class LossTotals:
    """The loss and its terms (CE, the divergence D), summed over the chunks of rows."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.loss = torch.zeros((), dtype=dtype, device=device)
        self.terms = torch.zeros(2, dtype=dtype, device=device)

    def add(self, rows: RowTerms) -> None:
        self.loss += rows.loss.sum()
        self.terms += torch.stack([rows.ce.sum(), rows.kd.sum()])


# (hidden, weight, targets, spec, rows_per_chunk, compute_grads) -> the totals, and the LM head's
# gradients when compute_grads.
ChunkLoop = Callable[[Tensor, Tensor, KDTargets, KDSpec, int, bool],
                     tuple[LossTotals, "LMHeadGradients | None"]]


class GradientsInForward(torch.autograd.Function):
    """apply(hidden, weight, targets, spec, rows_per_chunk, chunk_loop) -> (loss, terms): the
    scalar loss and its detached terms (LossTotals), from a chunk loop that also formed the
    gradients of hidden and weight when either needs one; backward only scales those."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: KDTargets, spec: KDSpec,
                rows_per_chunk: int, chunk_loop: ChunkLoop) -> tuple[Tensor, Tensor]:
        compute_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        totals, grads = chunk_loop(hidden, weight, targets, spec, rows_per_chunk, compute_grads)
        if grads is not None:
            ctx.save_for_backward(*grads.result())
        ctx.mark_non_differentiable(totals.terms)
        return totals.loss, totals.terms

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_terms: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None


@functools.cache
def _addmm_widens(device: torch.device, dtype: torch.dtype, wide: torch.dtype) -> bool:
    """Whether torch.addmm(acc, a, b, out_dtype=wide, out=acc) accumulates a product of dtype
    matrices into a wide acc here (CUDA in recent torch; not the CPU build)."""
    a = torch.ones(2, 2, dtype=dtype, device=device)
    acc = torch.ones(2, 2, dtype=wide, device=device)
    try:
        torch.addmm(acc, a, a, out_dtype=wide, out=acc)
    except (NotImplementedError, RuntimeError, TypeError):
        return False
    return bool((acc == 3).all())


class LMHeadGradients:
    """grad_hidden and grad_weight of the LM head, filled chunk of rows by chunk of rows from
    dL/dx: grad_hidden[rows] = dL/dx @ W, and grad_weight += dL/dx^T @ h summed in
    `accumulate_dtype` (bf16 accumulation of grad_weight across chunks makes training diverge)."""

    def __init__(self, hidden: Tensor, weight: Tensor, accumulate_dtype: torch.dtype):
        self.weight = weight
        self.grad_hidden = torch.empty_like(hidden)
        self.grad_weight = torch.zeros_like(weight, dtype=accumulate_dtype)
        self.widening = weight.dtype != accumulate_dtype
        self.fused = self.widening and _addmm_widens(weight.device, weight.dtype, accumulate_dtype)
        self.chunk_grad_weight = torch.empty_like(weight) if self.widening and not self.fused \
            else None

    def add(self, rows: slice, dlogits: Tensor, hidden_rows: Tensor) -> None:
        torch.mm(dlogits, self.weight, out=self.grad_hidden[rows])
        if not self.widening:
            self.grad_weight.addmm_(dlogits.T, hidden_rows)
        elif self.fused:  # the GEMM adds its wide result into the accumulator: no extra pass
            torch.addmm(self.grad_weight, dlogits.T, hidden_rows, out_dtype=self.grad_weight.dtype,
                        out=self.grad_weight)
        else:  # the chunk product is rounded once; the sum over chunks stays wide
            self.grad_weight += torch.mm(dlogits.T, hidden_rows, out=self.chunk_grad_weight)

    def result(self) -> tuple[Tensor, Tensor]:
        return self.grad_hidden, self.grad_weight.to(self.weight.dtype)
