"""`sparse_kd_loss`: validation, autocast, and dispatch to one implementation.

The math of every divergence and its gradient is in `kernels.divergences`' module docstring.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch
from torch import Tensor

from kernels.choices import IGNORE_INDEX, IMPLS, Divergence, Impl
from kernels.divergences import KDSpec, KDTargets
from kernels.reference import sparse_kd_loss_reference

# (hidden, weight, targets, spec) -> (loss, terms), see sparse_kd_loss.
LossFunction = Callable[[Tensor, Tensor, KDTargets, KDSpec], tuple[Tensor, Tensor]]
# No float16: the gradients are formed in the forward pass, before any loss scaling, and the
# per-position terms (~1 / N) would underflow in float16 dL/dx.
_FLOAT_DTYPES = (torch.float32, torch.bfloat16)
_INT_DTYPES = (torch.int32, torch.int64)


def _validate(hidden: Tensor, weight: Tensor, targets: KDTargets) -> None:
    labels, topk_ids, topk_logprobs = targets.labels, targets.topk_ids, targets.topk_logprobs
    ignore_index = targets.ignore_index
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H]; got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    n, vocab = hidden.shape[0], weight.shape[0]
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden and weight must share one dtype of {_FLOAT_DTYPES}; got {hidden.dtype} "
            f"and {weight.dtype}"
        )
    if labels.shape != (n,) or labels.dtype not in _INT_DTYPES:
        raise ValueError(
            f"labels must be an integer tensor of shape ({n},); got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_ids.dtype not in _INT_DTYPES:
        raise ValueError(
            f"topk_ids must be an integer tensor of shape ({n}, k); got {topk_ids.dtype} "
            f"{tuple(topk_ids.shape)}"
        )
    if topk_logprobs.shape != topk_ids.shape or not topk_logprobs.is_floating_point():
        raise ValueError(
            f"topk_logprobs must be a float tensor shaped like topk_ids {tuple(topk_ids.shape)}; "
            f"got {topk_logprobs.dtype} {tuple(topk_logprobs.shape)}"
        )
    devices = {t.device for t in (hidden, weight, labels, topk_ids, topk_logprobs)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(map(str, devices))}")
    if topk_ids.shape[1] == 0:
        raise ValueError("topk_ids must have at least one column (k >= 1)")
    # One host sync: an out-of-range id would otherwise read arbitrary memory in the kernel.
    bad_label = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    bad_id = (topk_ids < 0) | (topk_ids >= vocab)
    if bool(bad_label.any() | bad_id.any()):
        raise ValueError(
            f"labels (other than ignore_index={ignore_index}) and topk_ids must lie in "
            f"[0, {vocab}) for a vocabulary of {vocab} rows in weight"
        )


def _autocast(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Under bf16 autocast the LM-head matmuls run in bf16, as nn.Linear's would: float32 hidden
    or weight is cast (float16 autocast keeps float32, see _FLOAT_DTYPES). This is the loss's one
    autocast owner: callers hand over hidden states and weight as they come."""
    device = hidden.device.type
    if not (torch.is_autocast_enabled(device)
            and torch.get_autocast_dtype(device) == torch.bfloat16):
        return hidden, weight
    return tuple(t.to(torch.bfloat16) if t.dtype == torch.float32 else t for t in (hidden, weight))


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton(hidden: Tensor) -> LossFunction:
    if not _triton_available():
        raise ValueError("impl='triton' needs the triton package: pip install 'distill[triton]'")
    if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got {hidden.device}); use impl='reference', or "
            "set TRITON_INTERPRET=1 to run the kernels in the (slow) Triton interpreter"
        )
    if hidden.shape[0] == 0:  # an empty batch launches no kernels
        return sparse_kd_loss_reference
    from kernels.triton_autograd import sparse_kd_loss_triton  # imports triton: only when used

    return sparse_kd_loss_triton


# impl -> the loss function for these hidden states (a ValueError says why it cannot run them).
_IMPLEMENTATIONS: dict[Impl, Callable[[Tensor], LossFunction]] = {
    "reference": lambda hidden: sparse_kd_loss_reference,
    "triton": _triton,
}


def sparse_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    divergence: Divergence = "fkl",
    temperature: float = 1.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    impl: Impl = "auto",
    return_terms: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mean over non-ignored positions of ce_weight * CE + kd_weight * T^2 * D.

    hidden [N, H] and the LM-head weight [V, H] (one float dtype), labels [N], the cached teacher
    targets topk_ids [N, k] and topk_logprobs [N, k] (raw log-probabilities at T = 1: of the top-k,
    or the sampled ids' draw frequencies). CE is taken at T = 1, the divergence D ("fkl",
    "fkl_tail" or "rkl") at temperature T. The [N, V] logits are never materialised. impl:
    "reference" (torch), "triton" (CUDA, or the Triton interpreter) or "auto" (Triton on CUDA when
    available, else the reference). Under bf16 autocast, float32 hidden/weight are cast to bf16
    for the matmuls. Returns a float32 scalar; 0 with a valid graph when every label is ignored.
    return_terms: (loss, terms), terms a detached float32 [2] tensor of the means of CE and D over
    the same positions (loss = ce_weight * terms[0] + kd_weight * T^2 * terms[1]), summed in the
    same pass, on the device: no extra host sync.
    """
    spec = KDSpec(divergence, temperature, ce_weight, kd_weight)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    targets = KDTargets(labels, topk_ids, topk_logprobs, ignore_index)
    hidden, weight = _autocast(hidden, weight)
    _validate(hidden, weight, targets)
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and _triton_available() else "reference"
    loss_fn = _IMPLEMENTATIONS[impl](hidden)
    # The dtypes are settled above; autocast must not re-cast the chunk matmuls inside.
    with torch.autocast(hidden.device.type, enabled=False):
        loss, terms = loss_fn(hidden.contiguous(), weight.contiguous(), targets, spec)
    return (loss, terms) if return_terms else loss
