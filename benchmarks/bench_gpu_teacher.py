"""Section 3 of the GPU report: the torch teacher backend building sample:8 and topk:64 targets,
against the same model's plain forward pass and forward + logits on the same batches.

Each teacher is a Llama with random weights built from a config dict here (no hub; speed does not
depend on the weights) and saved to a scratch directory, from which the backend loads it as it
loads any teacher. Rows per teacher, all on the same seeded token ids, batched alike, best of
`teacher_repeats` after a warm-up batch:
  forward           the decoder alone (no LM head)
  forward + logits  the model's [B, L, V] logits, nothing done with them: the builder's floor
  naive top-k loop  bench_cache's loop: forward, float32 log_softmax, top-k
  builder sample:8  TorchBackend.predict with sampled targets (exact draws, true-token logprob)
  builder topk:64   TorchBackend.predict with top-64 targets
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_cache import naive_loop
from bench_gpu_common import Deadline, Row, RowWriter, Scale, error_text, release_memory
from bench_vllm import best_time

from teacher_cache.backends import BackendConfig, Targets, create_backend
from teacher_cache.backends.torch_backend import resolve_device, resolve_dtype

TARGETS = ("sample:8", "topk:64")
NAIVE_TOP_K = 64
FLOOR_ROW = "forward + logits"
ROWS = ("forward", FLOOR_ROW, "naive top-k loop", *(f"builder {t}" for t in TARGETS))


def row_name(teacher: str, row: str) -> str:
    return f"{teacher}: {row}"


def save_random_teacher(shape: dict[str, Any], path: Path) -> Path:
    """A Llama of config `shape`, random weights (normal, std 0.02), saved at `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = resolve_device("auto")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape, use_cache=False))
    model = model.to_empty(device=device).to(resolve_dtype("auto", device))
    model.tie_weights()  # to_empty gives the tied LM head a tensor of its own
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    model.save_pretrained(path)
    del model
    release_memory()
    return path


def token_ids(vocab_size: int, sequences: int, seq_len: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab_size, (sequences, seq_len))


def forward_pass(model, ids: np.ndarray, batch_size: int, logits: bool) -> Callable[[], None]:
    """The model over `ids` in batches, decoder only or with the [B, L, V] logits; the clock
    stops once the device has finished."""
    forward = model if logits else model.model  # LlamaForCausalLM, or its decoder alone

    @torch.inference_mode()
    def run() -> None:
        for chunk in torch.from_numpy(ids).split(batch_size):
            forward(input_ids=chunk.to(model.device), use_cache=False)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    return run


Run = tuple[str, Callable[[], object], Callable[[], object]]  # (row, timed run, warm-up run)


def model_runs(model, ids: np.ndarray, warm_ids: np.ndarray, batch: int) -> list[Run]:
    """The rows that run the model without the backend, the floor first (the ratios need it)."""
    return [
        (FLOOR_ROW, forward_pass(model, ids, batch, True),
         forward_pass(model, warm_ids, batch, True)),
        ("forward", forward_pass(model, ids, batch, False),
         forward_pass(model, warm_ids, batch, False)),
        ("naive top-k loop", lambda: naive_loop(model, ids, NAIVE_TOP_K, batch),
         lambda: naive_loop(model, warm_ids, NAIVE_TOP_K, batch)),
    ]


def builder_run(backend, target: str, ids: np.ndarray, warm_ids: np.ndarray) -> Run:
    return (f"builder {target}", lambda: backend.predict(ids, np.arange(len(ids))),
            lambda: backend.predict(warm_ids, np.arange(len(warm_ids))))


class TeacherRows:
    """Times the rows of one teacher and writes each as it is measured."""

    def __init__(self, name: str, scale: Scale, writer: RowWriter):
        self.name, self.scale, self.writer = name, scale, writer
        self.ids = token_ids(scale.teachers[name]["vocab_size"], scale.teacher_sequences,
                             scale.teacher_seq_len)
        self.warm_ids = self.ids[:scale.teacher_batch]
        self.floor: float | None = None  # forward + logits tokens/s

    def measure(self, runs: list[Run], dtype: str, deadline: Deadline) -> None:
        for row, run, warm in runs:
            if deadline.passed():
                return
            self.write(row, run, warm, dtype)

    def write(self, row: str, run: Callable[[], object], warm: Callable[[], object],
              dtype: str) -> None:
        values: dict[str, Any] = {"teacher": self.name, "row": row, "dtype": dtype,
                                  "tokens": self.ids.size}
        try:
            warm()
            seconds = best_time(run, self.scale.teacher_repeats)
        except Exception as exc:  # noqa: BLE001 - one failing row must not end the section
            self.writer.row(Row(row_name(self.name, row), values, error=error_text(exc)))
            release_memory()
            return
        rate = self.ids.size / seconds
        self.floor = rate if row == FLOOR_ROW else self.floor
        values |= {"seconds": seconds, "tokens_per_s": rate,
                   "vs_forward_logits": rate / self.floor if self.floor else None}
        self.writer.row(Row(row_name(self.name, row), values))


def teacher_rows(name: str, path: Path, scale: Scale, writer: RowWriter,
                 deadline: Deadline) -> None:
    """Every row of one teacher: the model rows and the first builder on the first backend's
    model, then each other target kind on its own backend."""
    rows = TeacherRows(name, scale, writer)
    config = BackendConfig(str(path), batch_size=scale.teacher_batch, dtype="auto")
    for index, target in enumerate(TARGETS):
        if deadline.passed():
            return
        backend = create_backend("torch", dataclasses.replace(config,
                                                              targets=Targets.parse(target)))
        runs = model_runs(backend.model, rows.ids, rows.warm_ids, scale.teacher_batch) \
            if index == 0 else []
        rows.measure(runs + [builder_run(backend, target, rows.ids, rows.warm_ids)],
                     backend.dtype_name, deadline)
        backend.close()
        del backend, runs
        release_memory()


def run(scale: Scale, writer: RowWriter, deadline: Deadline, scratch: Path) -> None:
    writer.plan([row_name(t, r) for t in scale.teachers for r in ROWS])
    writer.note(f"{scale.teacher_sequences} sequences x {scale.teacher_seq_len} tokens per row, "
                f"batches of {scale.teacher_batch}, best of {scale.teacher_repeats} after a "
                f"warm-up batch; dtype auto (bf16 on CUDA)")
    for name, shape in scale.teachers.items():
        if deadline.passed():
            return
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            try:
                started = time.perf_counter()
                path = save_random_teacher(shape, Path(tmp) / "teacher")
                writer.note(f"{name}: random weights built and saved in "
                            f"{time.perf_counter() - started:.1f} s")
                teacher_rows(name, path, scale, writer, deadline)
            except Exception as exc:  # noqa: BLE001 - the next teacher still runs
                writer.row(Row(row_name(name, "setup"), {"teacher": name, "row": "setup"},
                               error=error_text(exc)))
            release_memory()
