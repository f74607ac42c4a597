"""Atomic training checkpoints: everything needed to continue a run as if it never stopped."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from teacher_cache.storage import atomic_output

CHECKPOINT_FILE = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` to RUN_DIR/checkpoint.pt atomically: a kill at any moment leaves the previous
    checkpoint or the new one, never a torn file."""
    target = Path(run_dir) / CHECKPOINT_FILE
    with atomic_output(target) as f:
        torch.save(state, f)
    return target


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint in RUN_DIR, or None if there is none."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    # Our own file: it holds numpy RNG state and plain dicts, which weights_only refuses.
    return torch.load(path, map_location="cpu", weights_only=False)
