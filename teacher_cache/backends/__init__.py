"""Teacher backends by name; each module exposes `create(BackendConfig) -> TeacherBackend`."""

from __future__ import annotations

import importlib

from teacher_cache.backends.base import BackendConfig, Targets, TeacherBackend, TeacherOutput

BACKENDS = {
    "torch": "teacher_cache.backends.torch_backend",
    "vllm": "teacher_cache.backends.vllm_backend",
}


def create_backend(name: str, config: BackendConfig) -> TeacherBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name]).create(config)


__all__ = ["BACKENDS", "BackendConfig", "Targets", "TeacherBackend", "TeacherOutput",
           "create_backend"]
