"""Teacher compute dtypes, shared by the backends that run on torch (torch itself and vLLM).

Which dtype `auto` picks, and why, is `teacher.choose_dtype`'s to say."""

from __future__ import annotations

import torch

from teacher_cache.teacher import choose_dtype


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    return getattr(torch, choose_dtype(dtype, device.type).dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16", "float32", ...: the name the manifest records and vLLM accepts."""
    return str(dtype).removeprefix("torch.")
