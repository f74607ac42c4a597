"""Atomic training checkpoints: everything needed to continue a run as if it never stopped.

A checkpoint holds tensors, plain containers and numbers only, so it loads with
`torch.load(weights_only=True)`: resuming never runs code a crafted file carries. A sharded (FSDP)
run's checkpoint.pt holds the trainer's state and names a torch.distributed.checkpoint folder in
SHARDS_DIR with the weights and optimizer states, which every rank writes its part of.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from teacher_cache.errors import CacheError, CheckpointError, one_line
from teacher_cache.storage import USER_FIXABLE_ERRNOS, atomic_output

CHECKPOINT_FILE = "checkpoint.pt"
# 2: loadable with weights_only=True. Version 1 (pickled numpy state) is refused, never unpickled.
CHECKPOINT_FORMAT = 2
SHARDS_DIR = "checkpoint-shards"
SHARDS_NAME = re.compile(r"step-\d+-[0-9a-f]{8}\Z")  # one folder per sharded checkpoint


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(),
             "numpy": {**numpy_state, "state": {
                 "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                 "pos": numpy_state["state"]["pos"]}},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state({**numpy_state, "state": {
        "key": numpy_state["state"]["key"].numpy().astype(np.uint32),
        "pos": numpy_state["state"]["pos"]}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _WriteErrors:
    """A file whose failed write keeps its OSError: torch.save reports one as a RuntimeError
    ("unexpected pos") that no longer says why (a full disk)."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` to RUN_DIR/checkpoint.pt atomically: a kill at any moment leaves the previous
    checkpoint or the new one, never a torn file. A full disk is a CacheError naming the file."""
    target = Path(run_dir) / CHECKPOINT_FILE
    with atomic_output(target) as f:
        file = _WriteErrors(f)
        try:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, file)
        except RuntimeError:
            if file.error is None:
                raise
            raise file.error from None  # atomic_output turns it into its one line
    return target


def save_sharded_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any], model: nn.Module,
                            optimizer: torch.optim.Optimizer, rank: int) -> None:
    """On every rank: MODEL's and OPTIMIZER's shards into a new folder of RUN_DIR/SHARDS_DIR (no
    rank gathers the whole model), then on rank 0 `state` naming that folder into checkpoint.pt
    (save_checkpoint). checkpoint.pt names the folder only once every rank has written its part
    (dcp.save returns on rank 0 after the others): a kill at any moment leaves the previous
    checkpoint or the new one. The folders no checkpoint names go once a new one is written."""
    shards = Path(run_dir) / SHARDS_DIR
    name = [f"step-{state['step']}-{secrets.token_hex(4)}"]
    dist.broadcast_object_list(name, src=0)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        shards.mkdir(exist_ok=True)
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 checkpoint_id=shards / name[0])
    except (OSError, CheckpointException) as e:  # DCP raises every rank's failures on each rank
        errors = [e] if isinstance(e, OSError) else [f for f, _ in e.failures.values()]
        fixable = [f for f in errors if isinstance(f, OSError) and f.errno in USER_FIXABLE_ERRNOS]
        if not fixable:
            raise
        raise CacheError(f"cannot write the checkpoint {shards / name[0]}: "
                         f"{os.strerror(fixable[0].errno)} (the previous checkpoint is kept); "
                         f"make room or fix the permissions, then rerun the same command with "
                         f"--resume") from None
    if rank == 0:
        save_checkpoint(run_dir, {**state, "shards": name[0]})
        for entry in os.scandir(shards):
            if entry.name != name[0]:
                shutil.rmtree(entry.path)


def load_sharded_checkpoint(run_dir: str | os.PathLike, checkpoint: dict[str, Any],
                            model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The weights and optimizer states CHECKPOINT names into MODEL and OPTIMIZER, resharded to
    this run's ranks, whatever their number when it was written."""
    path = Path(run_dir) / SHARDS_DIR / checkpoint["shards"]
    where = (f"{path}: the sharded weights and optimizer states of "
             f"{Path(run_dir) / CHECKPOINT_FILE}")
    advice = "start over (--overwrite or a new --out)"
    if not (path / ".metadata").is_file():  # DCP would print its traceback before raising
        raise CheckpointError(f"{where} are missing (no {path / '.metadata'}); {advice}")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # a damaged folder
        error = e.failures[min(e.failures)][0] if isinstance(e, CheckpointException) else e
        reason = type(error).__name__ + (f": {one_line(error)}" if one_line(error) else "")
        raise CheckpointError(f"{where} are unreadable ({reason}); {advice}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint in RUN_DIR, or None if there is none. A file holding anything but tensors,
    plain containers and numbers is refused (CheckpointError) without running any of it."""
    path = Path(run_dir) / CHECKPOINT_FILE
    return _read(path) if path.exists() else None


def is_checkpoint(path: Path) -> bool:
    """Whether PATH is a checkpoint this version wrote (read lazily: its tensors stay on disk)."""
    try:
        _read(path, mmap=True)
    except CheckpointError:
        return False
    return True


def _read(path: Path, mmap: bool = False) -> dict[str, Any]:
    # --overwrite deletes only a checkpoint that reads (is_checkpoint): never point to it here.
    advice = ("resume it with the version that wrote it, or move it away (or choose a new --out) "
              "to train anew")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: refused, it holds objects other than tensors, containers "
                              f"and numbers (an older version's checkpoint, or a tampered file); "
                              f"{advice}") from None
    except Exception as e:  # torch reports a torn or foreign file as RuntimeError, OSError, ...
        raise CheckpointError(f"{path}: unreadable ({str(e).split('. ')[0]}); {advice}") from None
    found = state.get("format") if isinstance(state, dict) else None
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {found!r}, this version reads "
                              f"{CHECKPOINT_FORMAT}; {advice}")
    return state
