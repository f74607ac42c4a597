"""Teacher compute dtypes, shared by the backends that run on torch (torch itself and vLLM)."""

from __future__ import annotations

import torch

from teacher_cache.errors import TeacherError

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        if dtype not in DTYPES:
            raise TeacherError(f"unknown dtype {dtype!r}; choose auto or one of "
                               f"{', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16", "float32", ...: the name the manifest records and vLLM accepts."""
    return str(dtype).removeprefix("torch.")


def _cpu_has_native_bf16() -> bool:
    # Without AVX512-BF16 or AMX, CPU bf16 matmuls are emulated and slower than float32.
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
