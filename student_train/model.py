"""The student: a Llama from transformers, its distillation objective, and its saved form."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kernels import sparse_kd_loss
from student_train.data import IGNORE_INDEX
from teacher_cache.format import TRAINING_FILE, Manifest
from teacher_cache.storage import write_json
from teacher_cache.teacher import quiet_transformers_bars

log = logging.getLogger(__name__)


def build_student(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters: a tied embedding counts once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class DistillationObjective(nn.Module):
    """CE on the true next token plus a divergence to the teacher's cached top-k, as one module so
    DistributedDataParallel wraps the whole step. The full [tokens, vocab] logits never exist: the
    loss kernel takes the final hidden states and the LM head weight."""

    def __init__(self, student: LlamaForCausalLM, *, divergence: str, temperature: float,
                 ce_weight: float, kd_weight: float, impl: str = "auto"):
        super().__init__()
        self.student = student
        self.loss_options = dict(divergence=divergence, temperature=temperature,
                                 ce_weight=ce_weight, kd_weight=kd_weight,
                                 ignore_index=IGNORE_INDEX, impl=impl)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
                topk_logprobs: torch.Tensor) -> torch.Tensor:
        hidden = self.student.model(input_ids=input_ids, use_cache=False).last_hidden_state
        # The loss is the LM head and applies autocast to it, as a Linear would.
        return sparse_kd_loss(hidden.flatten(0, 1), self.student.lm_head.weight, labels.flatten(),
                              topk_ids.flatten(0, 1), topk_logprobs.flatten(0, 1),
                              **self.loss_options)


def save_student(student: LlamaForCausalLM, out_dir: str | os.PathLike, manifest: Manifest,
                 training: dict[str, Any] | None = None) -> Path:
    """A Hugging Face model directory (config, safetensors, and the teacher's tokenizer when its
    path in the manifest exists on this machine) that `AutoModelForCausalLM` loads, plus the
    run's `training` summary in TRAINING_FILE, which the cache's `score` records for a reference."""
    out = Path(out_dir)
    with quiet_transformers_bars():
        student.save_pretrained(out, safe_serialization=True)
    if training is not None:
        write_json(out / TRAINING_FILE, training)
    teacher_path = manifest.teacher.get("path")  # the teacher's local Hugging Face directory
    if teacher_path and os.path.isdir(teacher_path):
        try:
            AutoTokenizer.from_pretrained(teacher_path).save_pretrained(out)
        except (OSError, ValueError) as e:
            log.warning("teacher tokenizer at %s not copied: %s", teacher_path, e)
    return out
