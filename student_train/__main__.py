"""`python -m student_train --cache DIR --student xs --out DIR --max-steps N ...`

Under `torchrun --nproc_per_node N -m student_train ...` every process runs this and the run is DDP
(FSDP with `--parallel fsdp`).
"""

from __future__ import annotations

import argparse
import sys

from student_train.config import TrainConfig
from student_train.presets import describe_presets
from teacher_cache.dataclass_cli import add_fields, from_args
from teacher_cache.errors import reports_user_errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m student_train",
        description="Train a student on a teacher cache with CE on the true tokens plus a "
                    "divergence to the teacher's cached targets (sampled ids or top-k). Student "
                    "presets: "
                    + describe_presets() + ".")
    add_fields(parser, TrainConfig)
    return parser


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # torch only after argument errors and --help, which stay fast without it
    import torch.distributed as dist

    from student_train.train import train

    try:
        train(from_args(args))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
