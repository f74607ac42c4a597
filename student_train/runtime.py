"""Where and how a training run computes: its processes and device (torchrun's environment, DDP),
bf16 autocast and the compiled decoder."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from student_train.model import decoder_of
from teacher_cache.backends.torch_backend import resolve_device
from teacher_cache.errors import ConfigError, UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def on_main(env: Distributed, action: Callable[[], T]) -> T | None:
    """ACTION's result on rank 0 (None on the others). A UserError it raises is raised on every
    rank: the others would otherwise wait for rank 0 in their first collective."""
    result, error = None, None
    if env.is_main:
        try:
            result = action()
        except UserError as e:
            error = e
    if env.world_size > 1:
        message = [None if error is None else str(error)]
        dist.broadcast_object_list(message, src=0)
        if error is None and message[0] is not None:
            error = ConfigError(message[0])
    if error is not None:
        raise error
    return result


def init_distributed(device: str) -> Distributed:
    """Join the process group torchrun (or any launcher setting RANK/WORLD_SIZE) describes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    device = resolve_device(device)
    target = torch.device(f"cuda:{local_rank}") if device == torch.device("cuda") else device
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Distributed(rank=int(os.environ.get("RANK", "0")), world_size=world_size,
                       device=target)


def use_bf16(precision: str, device: torch.device) -> bool:
    # On CPU bf16 autocast gave no consistent speed-up (benchmarks/bench_train.py: slower for xs,
    # mixed for s, on a 2-core CPU with bf16 units) and is emulated elsewhere: there it is opt-in.
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def use_compile(mode: str, device: torch.device) -> bool:
    # On CPU the first step's compile outweighs the gain on short runs (benchmarks/bench_train.py):
    # there it is opt-in.
    if mode == "auto":
        return device.type == "cuda"
    return mode == "on"


def compile_decoder(student: PreTrainedModel, backend: str, device: torch.device) -> None:
    """Compile the decoder in place, so its state_dict keys stay the eager ones; the loss (an
    autograd Function, the LM head) stays outside the graph. Every training batch has the same
    shape, hence dynamic=False: one compile, on the first step."""
    if backend == "inductor" and device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            get_cpp_compiler()
        except InvalidCxxCompiler:
            raise ConfigError("--compile with the inductor backend on CPU needs a C++ compiler "
                              "(g++, or $CXX); install one, or use --compile off or "
                              "--compile-backend aot_eager") from None
    decoder_of(student).compile(backend=backend, dynamic=False)
