"""Command-line arguments shared by the benchmarks that run a teacher over packed tokens."""

from __future__ import annotations

import argparse


def add_teacher_arguments(parser: argparse.ArgumentParser, batch_help: str | None = None) -> None:
    parser.add_argument("--teacher", help="default: the default teacher (SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help=batch_help)
    parser.add_argument("--dtype", default="auto")
