"""What a new user meets first: the teacher's dtype, the help texts, the plot, the score summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from teacher_cache import open_cache
from teacher_cache.backends.torch_backend import resolve_dtype
from teacher_cache.teacher import choose_dtype, resolve_teacher

# --- --dtype auto ---------------------------------------------------------------------------


@pytest.fixture
def cpu_flags(monkeypatch):
    """Set what the CPU reports: cpu_flags(amx=..., avx512_bf16=...)."""
    def set_flags(*, amx: bool, avx512_bf16: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    return set_flags


@pytest.mark.parametrize(("amx", "avx512_bf16", "expected"), [
    (False, True, "float32"),  # the EPYC of the report: bf16 without AMX was the slower one
    (False, False, "float32"),
    (True, True, "bfloat16"),
    (True, False, "bfloat16"),
])
def test_auto_dtype_on_cpu_follows_amx(cpu_flags, amx, avx512_bf16, expected):
    cpu_flags(amx=amx, avx512_bf16=avx512_bf16)
    choice = choose_dtype("auto", "cpu")
    assert choice.dtype == expected
    assert "AMX" in choice.reason
    assert resolve_dtype("auto", torch.device("cpu")) == getattr(torch, expected)


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_on_cuda_follows_native_bf16(monkeypatch, cpu_flags, bf16, expected):
    cpu_flags(amx=not bf16, avx512_bf16=True)  # the CPU has no say for a GPU teacher
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert choose_dtype("auto", "cuda").dtype == expected


def test_an_explicit_dtype_is_kept_and_an_unknown_one_refused(cpu_flags):
    cpu_flags(amx=False, avx512_bf16=False)
    assert choose_dtype("bf16", "cpu").dtype == "bfloat16"
    assert choose_dtype("fp32", "cuda").reason == "--dtype fp32 was requested"
    with pytest.raises(ValueError, match="unknown dtype 'int8'; choose auto or one of"):
        choose_dtype("int8", "cpu")


def test_manifest_records_the_dtype_and_why(cpu_flags, monkeypatch, tiny_teacher_dir: Path,
                                            tiny_build_config, tmp_path: Path):
    cpu_flags(amx=False, avx512_bf16=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    teacher = resolve_teacher(str(tiny_teacher_dir))
    assert "no AMX" in teacher.manifest_entry("auto", "torch")["dtype_reason"]

    from teacher_cache.build import build_cache

    build_cache(tiny_build_config(tmp_path / "cache", dtype="auto", max_tokens=64))
    recorded = open_cache(tmp_path / "cache").manifest.teacher
    assert recorded["dtype"] == "float32"
    assert recorded["dtype_reason"].startswith("--dtype auto chose float32: the CPU has no AMX")


def test_a_manifest_without_dtype_reason_still_loads(tiny_cache: Path, tmp_path: Path):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["teacher"].pop("dtype_reason", None)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert open_cache(copy).manifest.teacher["dtype"] == "float32"
