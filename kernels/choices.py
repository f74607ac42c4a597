"""The loss's choices as Literal types and its label convention, without importing torch: a
command line's --help reads them (student_train's config) and stays fast."""

from __future__ import annotations

from typing import Literal, get_args

Divergence = Literal["fkl", "fkl_tail", "rkl"]
DIVERGENCES: tuple[Divergence, ...] = get_args(Divergence)
Impl = Literal["auto", "reference", "triton"]
IMPLS: tuple[Impl, ...] = get_args(Impl)
# The label of a position no loss or metric counts (PyTorch's convention).
IGNORE_INDEX = -100
