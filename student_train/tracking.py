"""--report-to: the metrics.jsonl records also go to TensorBoard, Weights & Biases or Trackio.

Each tracker's package is an optional extra, imported only when chosen; only rank 0 opens one.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from student_train.config import TrainConfig
from student_train.run_dir import TENSORBOARD_DIR
from teacher_cache.errors import ConfigError

PROJECT = "distill"
# What each tracker imports, and the pip requirement that provides it.
PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"),
            "wandb": ("wandb", "wandb"), "trackio": ("trackio", "trackio")}


class Tracker:
    """A TensorBoard SummaryWriter, or a wandb/trackio run (the two share one API)."""

    def __init__(self, config: TrainConfig):
        name = config.report_to
        module, requirement = PACKAGES[name]
        try:
            self.module = importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"--report-to {name}: {e}; pip install {requirement} (or "
                              f"'distill[{name}]')") from None
        out = Path(config.out)
        if name == "tensorboard":
            self.writer = self.module.SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))
        else:
            self.writer = None
            self.module.init(project=PROJECT, name=out.name, config=asdict(config))

    def log(self, record: dict[str, Any]) -> None:
        """A metrics record: its numbers, at its step."""
        step = record["step"]
        figures = {key: value for key, value in record.items() if key != "step"
                   and isinstance(value, int | float) and not isinstance(value, bool)}
        if self.writer is None:
            self.module.log(figures, step=step)
            return
        for key, value in figures.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is None:
            self.module.finish()
        else:
            self.writer.close()


def open_tracker(config: TrainConfig) -> Tracker | None:
    return None if config.report_to == "none" else Tracker(config)
