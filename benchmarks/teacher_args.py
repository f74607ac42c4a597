"""Command-line arguments shared by the benchmarks that run a teacher over packed tokens."""

from __future__ import annotations

import argparse
from pathlib import Path

from teacher_cache.teacher import distill_home, resolve_teacher

# Architectures of larger teachers, for throughput only: compute per token depends on the shape,
# not on the weights, so a randomly initialised copy runs at the real model's speed.
RANDOM_TEACHERS = {
    "smollm2-360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                     "num_attention_heads": 15, "num_key_value_heads": 5},
    "smollm2-1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                     "num_attention_heads": 32, "num_key_value_heads": 32},
}


def add_teacher_arguments(parser: argparse.ArgumentParser, batch_help: str | None = None) -> None:
    teacher = parser.add_mutually_exclusive_group()
    teacher.add_argument("--teacher", help="default: the default teacher (SmolLM2-135M-Instruct)")
    teacher.add_argument("--random-teacher", choices=RANDOM_TEACHERS,
                         help="random weights in a larger SmolLM2's shape (throughput only)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help=batch_help)
    parser.add_argument("--dtype", default="auto")


def teacher_arguments(args: argparse.Namespace) -> list[str]:
    """The teacher arguments of `args` again, for a child process."""
    if args.random_teacher:
        return [f"--random-teacher={args.random_teacher}"]
    return [f"--teacher={args.teacher}"] if args.teacher else []


def teacher_path(args: argparse.Namespace) -> str:
    if args.random_teacher:
        return str(random_teacher(args.random_teacher))
    return str(resolve_teacher(args.teacher).path)


def random_teacher(name: str) -> Path:
    """A randomly initialised Llama in the shape `RANDOM_TEACHERS[name]`, with the default
    teacher's tokenizer, saved once under $DISTILL_HOME/random-teachers."""
    path = distill_home() / "random-teachers" / name
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    base_path = resolve_teacher(None).path
    base = AutoConfig.from_pretrained(base_path)
    config = base.__class__(**base.to_dict() | RANDOM_TEACHERS[name])
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(path)
    return path
