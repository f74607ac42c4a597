"""What the sections of benchmarks/bench_gpu.py share: their scale (the GPU run or the CPU dry
run), the rows they write, their deadline, and the synthetic cache that sections 2 and 4 read.

A section runs in a child process and appends one JSON record per line to its rows file as it
goes: first its plan (the names of the rows it means to measure, in report order), then one record
per row measured, note or error, so that the rows measured before a section is stopped at its
budget survive it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SECTIONS = ("kernel", "student", "teacher", "stream")

# A Llama in SmolLM2-135M's shape (the default teacher) and one in Llama-3.2-1B's shape: random
# weights, for throughput only (compute per token depends on the shape, not on the weights).
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "tie_word_embeddings": True, "rope_theta": 100000.0,
                "max_position_embeddings": 8192}
LLAMA_1B = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 64, "tie_word_embeddings": True, "rope_theta": 500000.0,
            "max_position_embeddings": 131072}
TINY_LLAMA = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": True, "max_position_embeddings": 256}


@dataclass(frozen=True)
class Scale:
    """Every size and budget of one run: FULL on a GPU, DRY on a CPU in under a minute."""

    name: str
    budgets_s: dict[str, float]  # hard cap of each section's wall time, its start-up included
    # 1. loss kernel: (N, H, V, k) per shape; shapes with V == floor_target_vocab carry the target
    kernel_shapes: tuple[tuple[int, int, int, int], ...]
    floor_target_vocab: int
    kernel_warmup_ms: int
    kernel_rep_ms: int
    # 2. student step, on the synthetic cache below
    presets: tuple[str, ...]
    compile_target_preset: str  # the preset whose compiled/eager ratio has a target
    batch_size: int
    seq_len: int
    vocab_size: int
    cache_sequences: int
    cache_rows_per_shard: int
    student_steps: int  # timed optimizer steps per trainer
    student_warm_steps: int  # untimed steps after the first (the compile) one
    precision: str
    compile_backend: str
    train_workers: int
    # 3. teacher pass
    teachers: dict[str, dict[str, Any]]
    teacher_sequences: int
    teacher_seq_len: int
    teacher_batch: int
    teacher_repeats: int
    # 4. stream
    stream_workers: tuple[int, ...]
    stream_seconds: float
    stream_reference_preset: str  # what the stream must feed 10x over


FULL = Scale(
    name="full",
    budgets_s={"kernel": 145.0, "student": 175.0, "teacher": 50.0, "stream": 30.0},
    kernel_shapes=((16384, 2048, 128256, 64), (16384, 4096, 128256, 64),
                   (16384, 2048, 262144, 64)),
    floor_target_vocab=128256, kernel_warmup_ms=25, kernel_rep_ms=200,
    presets=("l", "m"), compile_target_preset="l", batch_size=32, seq_len=1024,
    vocab_size=49152, cache_sequences=1024, cache_rows_per_shard=128, student_steps=15,
    student_warm_steps=2, precision="bf16", compile_backend="inductor", train_workers=2,
    teachers={"SmolLM2-135M shape": SMOLLM2_135M, "Llama-3.2-1B shape": LLAMA_1B},
    teacher_sequences=64, teacher_seq_len=2048, teacher_batch=16, teacher_repeats=3,
    stream_workers=(0, 1, 4), stream_seconds=5.0, stream_reference_preset="m",
)

DRY = Scale(
    name="dry",
    budgets_s={"kernel": 90.0, "student": 90.0, "teacher": 60.0, "stream": 60.0},
    kernel_shapes=((64, 32, 512, 8),), floor_target_vocab=512, kernel_warmup_ms=0,
    kernel_rep_ms=20,
    presets=("xs",), compile_target_preset="xs", batch_size=4, seq_len=32, vocab_size=256,
    cache_sequences=48, cache_rows_per_shard=16, student_steps=2, student_warm_steps=1,
    precision="auto", compile_backend="aot_eager", train_workers=0,
    teachers={"tiny Llama": TINY_LLAMA}, teacher_sequences=8, teacher_seq_len=32,
    teacher_batch=4, teacher_repeats=1,
    stream_workers=(0, 1, 4), stream_seconds=0.3, stream_reference_preset="xs",
)

SCALES = {scale.name: scale for scale in (FULL, DRY)}


@dataclass
class Row:
    """One measured line of a section: `values` are its columns (None: not measured)."""

    name: str
    values: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    error: str | None = None
    target: str = ""  # filled in by bench_gpu_report.apply_targets
    met: bool | None = None


class RowWriter:
    """Appends a section's records to its rows file, one JSON line each, flushed at once."""

    def __init__(self, path: Path):
        self.path = path

    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def plan(self, names: list[str]) -> None:
        self._append({"type": "plan", "names": names})

    def row(self, row: Row) -> None:
        self._append({"type": "row", **asdict(row)})
        detail = row.error or ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in row.values.items())
        print(f"[row] {row.name}: {detail}", flush=True)

    def note(self, text: str) -> None:
        self._append({"type": "note", "text": text})
        print(f"[note] {text}", flush=True)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a rows file; a line cut short by a kill is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class Deadline:
    """A section stops starting rows at `end` (wall-clock seconds since the epoch: the parent
    kills it there anyway)."""

    def __init__(self, end: float):
        self.end = end

    def passed(self) -> bool:
        return time.time() >= self.end


def error_text(exc: BaseException) -> str:
    """An exception as one line of the report: its first line, and its last where it has more
    (a DataLoader worker's error ends with the original exception)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(exc).__name__}: {text}"[:400]


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float | None:
    """Peak memory allocated by torch since the last reset (None off CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Document boundaries in the synthetic cache, so that --doc-mask (on by default) costs what it
# costs on a real one: web text's documents run to several hundred tokens.
CACHE_DOCUMENT_TOKENS = 512


def shared_cache(scale: Scale, scratch: Path) -> tuple[str, str]:
    """The synthetic sample:8 cache of sections 2 and 4 (written once per scratch directory, a
    partial one rewritten) and a note saying how it was obtained."""
    from teacher_cache.errors import CacheError
    from teacher_cache.reader import open_cache
    from teacher_cache.synth import document_starts, write_synthetic_cache

    path = scratch / (f"synthetic-sample8-{scale.cache_sequences}x{scale.seq_len}"
                      f"-v{scale.vocab_size}-docs{CACHE_DOCUMENT_TOKENS}")
    shape = (f"{scale.cache_sequences} x {scale.seq_len} tokens, sample:8, vocabulary "
             f"{scale.vocab_size}, documents of mean {CACHE_DOCUMENT_TOKENS} tokens")
    try:
        open_cache(path)
        return str(path), f"synthetic cache ({shape}) reused from {path.name}"
    except (CacheError, OSError):
        shutil.rmtree(path, ignore_errors=True)
    started = time.perf_counter()
    write_synthetic_cache(path, sequences=scale.cache_sequences, seq_len=scale.seq_len, top_k=8,
                          vocab_size=scale.vocab_size, rows_per_shard=scale.cache_rows_per_shard,
                          kind="sample", doc_starts=document_starts(
                              scale.cache_sequences, scale.seq_len, CACHE_DOCUMENT_TOKENS, seed=0))
    return str(path), f"synthetic cache ({shape}) written in {time.perf_counter() - started:.1f} s"
