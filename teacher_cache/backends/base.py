"""The one interface every teacher backend implements; the cache writer knows nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from teacher_cache.format import Targets


@dataclass
class TeacherOutput:
    """Teacher predictions for B packed sequences of length L, in the cache's convention.

    Position t predicts token t + 1: `topk_*[:, t]` are the targets of the backend's `Targets`
    (top_k: the k most likely next tokens, raw logprobs at temperature 1, sorted descending;
    sample: the distinct ids of k draws with log(count / k), sorted by count, unused slots id 0
    and logprob -inf) and `target_logprobs[:, t]` is the logprob of `input_ids[:, t+1]`.
    Position L - 1 is undefined (the writer masks it).
    """

    topk_ids: np.ndarray  # int [B, L, k]
    topk_logprobs: np.ndarray  # float32 [B, L, k]
    target_logprobs: np.ndarray  # float32 [B, L]
    # Sampled from a top-K' only (vLLM): teacher mass outside that top-K', float32 [B, L].
    uncovered_mass: np.ndarray | None = None


@dataclass
class BackendConfig:
    model_path: str  # a local Hugging Face model directory
    targets: Targets = field(default_factory=Targets)  # what every `predict` computes
    batch_size: int = 16  # sequences per forward
    dtype: str = "auto"  # "auto" = bf16 where the device supports it, else float32
    device: str = "auto"  # "auto" = cuda if available, else cpu
    options: dict = field(default_factory=dict)  # backend-specific knobs (e.g. vLLM memory share)


class TeacherBackend(Protocol):
    """Created once from a BackendConfig; every `predict` produces its `targets`."""

    name: str  # "torch", "vllm", ...
    # Sequences the builder passes per `predict` call; None: a whole shard (an engine that
    # schedules its own batches wants as much work per call as it can get).
    sequences_per_call: int | None
    dtype_name: str  # the dtype the teacher computes in, as the manifest records it: "float32"

    def predict(self, input_ids: np.ndarray, seq_ids: np.ndarray | None = None) -> TeacherOutput:
        """Run the teacher on int [B, L] token ids of the packed sequences `seq_ids` (int [B]; the
        draws of sampled targets depend on them and on the positions 0..L-1, so they are
        required for `Targets.kind == "sample"`)."""
        ...

    def close(self) -> None:
        ...
