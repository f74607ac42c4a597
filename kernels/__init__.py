"""Fused LM-head + cross-entropy + sparse knowledge-distillation loss (k cached teacher targets
per position: sampled ids or the top-k).

`sparse_kd_loss` lives in `kernels.loss`; the choices (`Divergence`, `Impl`) in `kernels.choices`.
The loss and its types import torch on first use, so that reading the choices does not.
"""

from __future__ import annotations

import importlib
from typing import Any

from kernels.choices import DIVERGENCES, IGNORE_INDEX, IMPLS, Divergence, Impl

__all__ = [
    "DIVERGENCES", "IGNORE_INDEX", "IMPLS", "Divergence", "Impl", "KDSpec", "KDTargets",
    "sparse_kd_loss",
]
_TORCH_NAMES = {"sparse_kd_loss": "kernels.loss", "KDSpec": "kernels.divergences",
                "KDTargets": "kernels.divergences"}


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        return getattr(importlib.import_module(_TORCH_NAMES[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
