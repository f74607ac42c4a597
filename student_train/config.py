"""The training run's configuration: one dataclass, from which the command line is generated."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

from kernels import Divergence, Impl
from teacher_cache.dataclass_cli import option as _opt
from teacher_cache.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16"]
CompileMode = Literal["auto", "on", "off"]
InitMode = Literal["auto", "random", "pretrained"]
# aot_eager traces and differentiates like inductor but runs the ops eagerly: no C++ compiler
# needed, so it checks the compiled path anywhere (tests), without inductor's speed.
CompileBackend = Literal["inductor", "aot_eager"]
Tracker = Literal["none", "tensorboard", "wandb", "trackio"]
DocMaskMode = Literal["auto", "on", "off"]
Parallel = Literal["ddp", "fsdp"]
ActivationCheckpointing = Literal["none", "full", "selective"]


@dataclass
class TrainConfig:
    cache: str = _opt(MISSING, "teacher cache directory or fsspec URL")
    out: str = _opt(MISSING, "run directory: checkpoint, metrics.jsonl, summary.json, config.json, "
                      "student/")
    student: str = _opt("xs", "the student: a preset (xs, s, m, l), a Hugging Face model "
                        "directory or config.json (any causal LM with a plain linear head), or "
                        "prune:KEY=VALUE,... for the cache's teacher pruned to layers=, hidden=, "
                        "intermediate=, heads=, kv_heads= or a size params= (e.g. 30M), with "
                        "depth=block|loss and rows= calibration rows (student_train/prune.py)")
    init: InitMode = _opt("auto", "start from weights (pretrained; a prune: student is cut from "
                          "the teacher's) or from random init; auto: weights where the student "
                          "has them")
    overrides: dict[str, str] = _opt(
        None, "override a preset field, e.g. --set hidden_size=256 (repeatable; default: none)",
        flag="--set",
        metavar="KEY=VALUE")
    max_steps: int = _opt(200, "optimizer steps to train for")
    batch_size: int = _opt(8, "sequences per micro-step summed over all ranks (the global batch "
                           "is batch_size * grad_accum)")
    grad_accum: int = _opt(1, "micro-steps accumulated per optimizer step")
    lr: float | None = _opt(None, "peak learning rate (default: the preset's, LEARNING_RATES "
                            "in student_train/presets.py; for other students the rate of their "
                            "init in student_train/students.py)")
    min_lr_ratio: float = _opt(0.1, "final learning rate of the cosine decay, as a fraction of lr")
    warmup: int = _opt(20, "linear warmup steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 disables)")
    ce_weight: float = _opt(1.0, "weight of the cross-entropy on the true next token")
    kd_weight: float = _opt(1.0, "weight of the divergence to the teacher's cached targets "
                                 "(0: CE only)")
    divergence: Divergence = _opt("fkl", "divergence to the teacher")
    temperature: float = _opt(1.0, "distillation temperature")
    select: str = _opt("none", "training rows: none, top:F (highest-score fraction F) or random:F")
    val_fraction: float = _opt(0.05, "fraction of sequences held out for evaluation (chosen by a "
                               "hash of the seq_id)")
    val_max_rows: int = _opt(512, "at most this many held-out sequences (those with the smallest "
                             "hashes; the rest of --val-fraction trains), so that an evaluation "
                             "takes seconds on any cache")
    shuffle_buffer: str = _opt("256MB", "shuffle window of each data stream: a size of decoded "
                               "rows (256MB, 1GB) or a number of rows; a process holds about "
                               "this much per stream it reads")
    data_parts: int | None = _opt(None, "streams each global micro-batch is cut into, each reading "
                                  "its own 1/N of the shards (default: the number of ranks; a "
                                  "resume keeps the checkpoint's and may run on any divisor of it "
                                  "ranks)")
    data_slots: int | None = _opt(None, "streams per part, taking turns by micro-batch (default: "
                                  "--workers, at least 1; a resume keeps the checkpoint's and may "
                                  "use any divisor of it as --workers)")
    seed: int = _opt(0, "seed of the model init and the data order")
    eval_every: int = _opt(50, "evaluate every N steps (and at the end; 0: only at the end)")
    eval_batch_size: int = _opt(8, "sequences per evaluation forward")
    checkpoint_every: int = _opt(50, "write a checkpoint every N steps (0: only at the end)")
    log_every: int = _opt(10, "write a training metrics record every N steps")
    resume: bool = _opt(False, "continue from OUT/checkpoint.pt if it exists")
    overwrite: bool = _opt(False, "replace the run in OUT (its checkpoint, student and summary) "
                           "with a new one")
    chat_template: bool = _opt(False, "keep the teacher's chat template in the saved student's "
                               "tokenizer (by default a student trained on raw text is saved as "
                               "a base model, without one)")
    precision: Precision = _opt("auto", "auto: bf16 autocast on GPUs that support it, fp32 on "
                                "CPU")
    device: str = _opt("auto", "auto, cpu, cuda")
    workers: int = _opt(0, "data loader worker processes per rank")
    loss_impl: Impl = _opt("auto", "kernels.sparse_kd_loss implementation")
    compile: CompileMode = _opt("auto", "torch.compile the decoder (the loss stays eager); auto: "
                                "on for CUDA, off on CPU, where compiling costs more than it "
                                "saves on short runs (BENCHMARKS.md)")
    compile_backend: CompileBackend = _opt("inductor", "torch.compile backend of --compile")
    report_to: Tracker = _opt("none", "also send the metrics.jsonl records to this tracker, from "
                              "rank 0 (pip install 'distill[NAME]'); tensorboard writes into "
                              "OUT/tensorboard")
    doc_mask: DocMaskMode = _opt("auto", "attend only within each document of a packed row "
                                 "(position ids restarting at every document start, so that "
                                 "transformers masks block-causally); auto: on where the "
                                 "student's attention keeps to the documents, checked at start "
                                 "(sdpa, eager, flex_attention on architectures that mask from "
                                 "position ids: Llama, Qwen2, Mistral...), off elsewhere "
                                 "(flash_attention_* too); on: refused elsewhere")
    parallel: Parallel = _opt("ddp", "how the ranks under torchrun share the student: ddp (each "
                              "holds all of it) or fsdp (FSDP2: weights, gradients and optimizer "
                              "states sharded over the ranks; also on one process). "
                              "docs/training-at-scale.md")
    activation_checkpointing: ActivationCheckpointing = _opt(
        "none", "recompute activations in the backward instead of keeping them: full (each "
        "decoder layer keeps only its input) or selective (each layer keeps its matmul and "
        "attention outputs and recomputes the rest). docs/training-at-scale.md")

    def __post_init__(self) -> None:
        self.overrides = dict(self.overrides or {})
        if self.lr is None:
            from student_train.students import default_learning_rate  # imports torch and this

            self.lr = default_learning_rate(self.student, self.init)  # None fails where built
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: choose one "
                                  f"of {', '.join(choices)}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batch_size", "data_parts",
                     "data_slots"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for f in fields(self):  # argparse's float() takes "nan" and "inf"
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name.replace('_', '-')} {value}: must be a finite number")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"--lr {self.lr}: the learning rate must be positive")
        if self.val_max_rows < 0:
            raise ConfigError("--val-max-rows must be at least 0")
        from student_train.data import window_rows  # imports torch: not for --help

        window_rows(self.shuffle_buffer, 1)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("--val-fraction must be in [0, 1)")
        if self.ce_weight < 0 or self.kd_weight < 0 or self.ce_weight + self.kd_weight == 0:
            raise ConfigError("--ce-weight and --kd-weight must be >= 0 and not both 0")
        if self.temperature <= 0:
            raise ConfigError("--temperature must be positive")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other: continue the run in "
                              "--out or replace it")

    def check_cache_targets(self, cache: str, targets: dict[str, Any]) -> None:
        """ConfigError unless the KD term can train on the cache's targets (the manifest's
        `targets`): sampled targets are RS-KD only with divergence fkl at the sampling
        temperature (their unused slots are -inf, and the counts estimate the teacher at that
        temperature, not at another)."""
        if targets["kind"] != "sample" or self.kd_weight == 0:
            return
        where = f"{cache}: a cache of sampled targets (sample:{targets['k']})"
        if self.divergence != "fkl":
            raise ConfigError(f"{where} trains only with --divergence fkl (RS-KD), not "
                              f"{self.divergence}; use fkl, or a topk:K cache")
        if self.temperature != targets["temperature"]:
            raise ConfigError(f"{where} was sampled at temperature {targets['temperature']}: "
                              f"pass --temperature {targets['temperature']}, not "
                              f"{self.temperature}")

    @property
    def rows_per_step(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.batch_size * self.grad_accum


# The fields typed as a Literal, and their values: what __post_init__ accepts.
CHOICES: dict[str, tuple[str, ...]] = {
    name: get_args(hint) for name, hint in get_type_hints(TrainConfig).items()
    if get_origin(hint) is Literal
}

# What a resumed run may change without changing the result of the steps already taken.
RESUMABLE_CHANGES = frozenset({
    "out", "cache", "max_steps", "eval_every", "checkpoint_every", "log_every", "resume",
    "overwrite", "device", "workers", "eval_batch_size", "compile", "compile_backend",
    "chat_template",  # what the saved student's tokenizer carries, not what it learned
    "report_to",
    "activation_checkpointing",  # recomputes the same activations
    "data_parts", "data_slots"})  # these two: checked against the checkpoint's stream layout
