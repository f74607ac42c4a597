"""Where and how a training run computes: its processes and device (torchrun's environment), how
the ranks share the student (DDP or FSDP2), activation checkpointing, bf16 autocast and the compiled
decoder."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers import PreTrainedModel

from student_train.config import ActivationCheckpointing, Parallel
from student_train.model import DistillationObjective, decoder_of
from teacher_cache.backends.torch_backend import resolve_device
from teacher_cache.errors import ConfigError, UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device
    # A process group of this one process, made for FSDP (torchrun made none): closed by `close`.
    own_group: bool = False

    def close(self) -> None:
        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()

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


def init_distributed(device: str, parallel: Parallel = "ddp") -> Distributed:
    """Join the process group torchrun (or any launcher setting RANK/WORLD_SIZE) describes. FSDP
    needs one on a single process too: there it is a group of this process alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    device = resolve_device(device)
    target = torch.device(f"cuda:{local_rank}") if device == torch.device("cuda") else device
    if target.type == "cuda":
        torch.cuda.set_device(target)
    backend = "nccl" if target.type == "cuda" else "gloo"
    own_group = False
    if not dist.is_initialized():
        if world_size > 1:
            dist.init_process_group(backend)
        elif parallel == "fsdp":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            own_group = True
    return Distributed(rank=int(os.environ.get("RANK", "0")), world_size=world_size,
                       device=target, own_group=own_group)


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


def decoder_layers(student: PreTrainedModel) -> nn.ModuleList:
    """The decoder's blocks: what activation checkpointing and FSDP wrap one by one."""
    layers = getattr(decoder_of(student), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{type(student).__name__}: its decoder keeps no `layers` list of "
                          f"blocks, which --activation-checkpointing and --parallel fsdp wrap; "
                          f"use --activation-checkpointing none and --parallel ddp")
    return layers


# What a selectively checkpointed layer keeps: the outputs of the matmuls and of attention, the
# costly ops; norms, activations, rotary embeddings and residual adds are recomputed.
SAVED_OPS = frozenset(getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention") if hasattr(torch.ops.aten, name))


def _keep_costly_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_activations(student: PreTrainedModel, mode: ActivationCheckpointing) -> None:
    """Wrap each decoder layer in torch's checkpoint wrapper (non-reentrant): `full` keeps only
    the layer's input for the backward, `selective` also the outputs of SAVED_OPS. Its state_dict
    keys stay the unwrapped ones (the wrapper strips its prefix), so checkpoints and the saved
    student do not depend on it."""
    if mode == "none":
        return
    layers = decoder_layers(student)
    options = ({} if mode == "full" else
               {"context_fn": partial(create_selective_checkpoint_contexts, _keep_costly_outputs)})
    for index, layer in enumerate(layers):
        layers[index] = checkpoint_wrapper(layer, **options)


def shard(objective: DistillationObjective, env: Distributed, bf16: bool) -> None:
    """FSDP2 over all ranks: each decoder layer is a unit of its own; the objective is the root,
    which holds the rest (embedding, final norm, LM head, tied or not), so its pre-forward gathers
    the full LM head weight for the loss, which takes it directly (model.output_weight), and its
    backward reduce-scatters the head's gradient to the shards. Also around the objective's
    `evaluate`. bf16 runs on CUDA gather the weights in bf16 and reduce the gradients in float32;
    on CPU (gloo) the weights stay float32 and autocast casts them, as without FSDP."""
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 and env.device.type == "cuda" else MixedPrecisionPolicy())
    layers = decoder_layers(objective.student)
    for index, layer in enumerate(layers):
        # The last layer's backward comes first: its weights stay gathered after the forward.
        fully_shard(layer, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=index < len(layers) - 1)
    fully_shard(objective, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(objective, "evaluate")
