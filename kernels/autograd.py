"""What the torch reference and the Triton loss share as autograd functions: both form the
gradients during the forward pass, while a chunk's logits are at hand (the loss is a scalar, so
backward only scales them by the incoming gradient), and fold each chunk's dL/dx into the LM
head's gradients."""

from __future__ import annotations

import torch
from torch import Tensor


class GradientsInForward(torch.autograd.Function):
    """A scalar loss whose forward saved (grad_hidden, grad_weight) for its first two inputs,
    hidden and weight; backward only scales them by the incoming gradient."""

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        no_grads = (None,) * (len(ctx.needs_input_grad) - 2)  # the other forward inputs
        return grad_hidden * grad_loss, grad_weight * grad_loss, *no_grads


class LMHeadGradients:
    """grad_hidden and grad_weight of the LM head, filled chunk of rows by chunk of rows from
    dL/dx: grad_hidden[rows] = dL/dx @ W, and grad_weight += dL/dx^T @ h summed in
    `accumulate_dtype` (bf16 accumulation of grad_weight across chunks makes training diverge)."""

    def __init__(self, hidden: Tensor, weight: Tensor, accumulate_dtype: torch.dtype):
        self.weight = weight
        self.grad_hidden = torch.empty_like(hidden)
        self.grad_weight = torch.zeros_like(weight, dtype=accumulate_dtype)
        self.chunk_grad_weight = None if weight.dtype == accumulate_dtype else \
            torch.empty_like(weight)

    def add(self, rows: slice, dlogits: Tensor, hidden_rows: Tensor) -> None:
        torch.mm(dlogits, self.weight, out=self.grad_hidden[rows])
        if self.chunk_grad_weight is None:
            self.grad_weight.addmm_(dlogits.T, hidden_rows)
        else:  # the chunk product is rounded once; the sum over chunks stays wide
            self.grad_weight += torch.mm(dlogits.T, hidden_rows, out=self.chunk_grad_weight)

    def result(self) -> tuple[Tensor, Tensor]:
        return self.grad_hidden, self.grad_weight.to(self.weight.dtype)
