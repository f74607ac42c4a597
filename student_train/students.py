"""What `--student` names and the model it builds, each from the one cache:

- a preset (xs, s, m, l; presets.py): a Llama at random init;
- a Hugging Face model directory, a `config.json`, or a hub id where the hub is reachable: that
  architecture, from its weights (`--init pretrained`, the default where weights exist) or at
  random init (`--init random`, the default for a bare config);
- `prune:KEY=VALUE,...`: the cache's teacher pruned to a smaller shape (prune.py), or with
  `--init random` the same shape at random init.

Every student must read the cache's token ids (its vocabulary at least the cache's, its
tokenizer.json the teacher's) and its logits must be its final hidden states times a bias-free
output layer, which is what the fused loss computes (check_fused_head).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from student_train.config import InitMode
from student_train.model import build_student, final_hidden, set_special_tokens
from student_train.presets import LEARNING_RATES, PRESETS, llama_config, resolve_preset
from student_train.prune import (
    Layout,
    PrunePlan,
    PruneSpec,
    Shape,
    apply_plan,
    calibration_rows,
    make_plan,
    measure_importance,
    prune_record,
    resolve_shape,
)
from teacher_cache.errors import ConfigError
from teacher_cache.format import Manifest
from teacher_cache.reader import TeacherCache
from teacher_cache.teacher import WEIGHT_SUFFIXES, _files_sha256, quiet_transformers_bars

Init = Literal["random", "pretrained", "pruned"]  # what a student was built with

# Peak learning rates of the students that are not presets (TrainConfig.lr when --lr is not
# given), from the sweep in BENCHMARKS.md ("Students pruned from the teacher and Hugging Face
# students"): a student starting from the teacher's weights wants a lower rate than the same
# shape at random init.
FROM_WEIGHTS_LR = 3e-4  # pruned from the teacher, or --init pretrained
FROM_SCRATCH_LR = 1e-3  # a Hugging Face architecture or a pruned shape at random init

# Config fields that make the logits something other than hidden @ W.T, and their neutral value.
LOGIT_TRANSFORMS = {"final_logit_softcapping": (None, "soft-caps its logits"),
                    "logit_softcapping": (None, "soft-caps its logits"),
                    "logit_scale": (1.0, "scales its logits"),
                    "logits_scaling": (1.0, "scales its logits"),
                    "lm_head_multiplier": (1.0, "scales its logits")}


@dataclass
class BuiltStudent:
    model: PreTrainedModel
    record: dict[str, Any]  # how it was initialised: `init`, its source, a pruning plan

    def checkpoint_entry(self) -> dict[str, Any]:
        """Plain containers only (checkpoints load with weights_only=True)."""
        return {"config": self.model.config.to_dict(), "record": self.record}


@dataclass(frozen=True)
class PresetStudent:
    name: str

    def init(self, requested: InitMode) -> Init:
        if requested == "pretrained":
            raise ConfigError(f"--init pretrained: preset {self.name} has no weights; give a "
                              f"model directory or prune:... to start from trained weights")
        return "random"


@dataclass(frozen=True)
class ModelStudent:
    """A Hugging Face model directory, a config.json, or a hub id."""

    source: str

    @property
    def is_config_file(self) -> bool:
        return Path(self.source).suffix == ".json"

    @property
    def directory(self) -> Path | None:
        path = Path(self.source).expanduser()
        if path.is_dir():
            return path
        return path.parent if path.is_file() else None

    def has_weights(self) -> bool:
        if self.directory is None:  # a hub id: hub models ship weights
            return True
        return not self.is_config_file and any(
            p.suffix in WEIGHT_SUFFIXES for p in self.directory.iterdir())

    def init(self, requested: InitMode) -> Init:
        if requested == "auto":
            return "pretrained" if self.has_weights() else "random"
        if requested == "pretrained" and not self.has_weights():
            raise ConfigError(f"--init pretrained: student {self.source} has no weights files "
                              f"({', '.join(WEIGHT_SUFFIXES)}); give a model directory with "
                              f"weights, or --init random")
        return requested


@dataclass(frozen=True)
class PrunedStudent:
    text: str
    spec: PruneSpec

    def init(self, requested: InitMode) -> Init:
        return "random" if requested == "random" else "pruned"


Student = PresetStudent | ModelStudent | PrunedStudent


def parse_student(text: str) -> Student:
    if text in PRESETS:
        return PresetStudent(text)
    if text.startswith(PruneSpec.PREFIX):
        return PrunedStudent(text, PruneSpec.parse(text))
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file() or path.is_file() and \
            path.suffix == ".json":
        return ModelStudent(text)
    if text.count("/") == 1 and not path.exists() and not text.startswith((".", "/", "~")):
        return ModelStudent(text)  # a hub id; loading it says whether the hub is reachable
    raise ConfigError(f"unknown student preset {text!r}; choose one of {', '.join(PRESETS)}, or "
                      f"give a Hugging Face model directory or config.json, or prune:KEY=VALUE,...")


def default_learning_rate(text: str, init: InitMode) -> float | None:
    """TrainConfig.lr when --lr is not given; None for a student that cannot be built (which
    fails, with its reason, where it is built)."""
    try:
        student = parse_student(text)
        resolved = student.init(init)
    except ConfigError:
        return None
    if isinstance(student, PresetStudent):
        return LEARNING_RATES[student.name]
    return FROM_SCRATCH_LR if resolved == "random" else FROM_WEIGHTS_LR


# --- the checks every student passes ---


def check_vocabulary(model_config, manifest: Manifest, where: str) -> None:
    vocab = model_config.get_text_config().vocab_size
    if vocab < manifest.vocab_size:
        raise ConfigError(f"{where}: vocabulary of {vocab} tokens, smaller than the cache's "
                          f"{manifest.vocab_size} (manifest.json); the student must cover every "
                          f"token id of the cache")


def check_tokenizer(directory: Path, manifest: Manifest, where: str) -> None:
    """A tokenizer.json in the student's directory must be the cache's: the same file as the
    manifest's tokenizer.sha256, or the same vocabulary as the teacher's tokenizer."""
    file = directory / "tokenizer.json"
    if not file.is_file() or _files_sha256([file]) == manifest.tokenizer.get("sha256"):
        return
    teacher = manifest.teacher.get("path")
    if teacher and os.path.isdir(teacher):
        with quiet_transformers_bars():
            if (AutoTokenizer.from_pretrained(directory).get_vocab()
                    == AutoTokenizer.from_pretrained(teacher).get_vocab()):
                return
    raise ConfigError(f"{where}: its tokenizer.json is not the cache's tokenizer (another file "
                      f"than the manifest's tokenizer.sha256, another vocabulary); the student "
                      f"must read the cache's token ids: use a model of the teacher's tokenizer, "
                      f"or train this architecture from its config.json alone")


@torch.no_grad()
def check_fused_head(model: PreTrainedModel, where: str) -> None:
    """ConfigError unless the logits are the final hidden states times a plain, bias-free output
    layer: the only head the fused loss (hidden states and a weight in, no logits) computes."""
    config = model.config.get_text_config()
    for name, (neutral, what) in LOGIT_TRANSFORMS.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral:
            raise ConfigError(f"{where}: it {what} ({name}={value}), which the fused KD loss "
                              f"does not compute; choose a model with a plain linear head")
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{where}: {type(model).__name__} has no output embeddings "
                          f"(get_output_embeddings), which the fused KD loss needs")
    if type(head) is not nn.Linear:
        raise ConfigError(f"{where}: its output layer is a {type(head).__name__}, not a plain "
                          f"Linear, which the fused KD loss needs")
    if head.bias is not None:
        raise ConfigError(f"{where}: its output layer has a bias, which the fused KD loss does "
                          f"not add; choose a model with a bias-free head")
    was_training = model.training
    model.eval()
    input_ids = torch.arange(8, device=head.weight.device)[None] % config.vocab_size
    logits = model(input_ids=input_ids, use_cache=False).logits
    model.train(was_training)
    fused = final_hidden(model, input_ids) @ head.weight.T
    if not torch.allclose(logits.float(), fused.float(), rtol=1e-4, atol=1e-5):
        raise ConfigError(f"{where}: its logits are not its final hidden states times its output "
                          f"layer's weight (a transformed or scaled head), which is what the "
                          f"fused KD loss computes")


# --- building ---


@dataclass
class BuildContext:
    """What a student is built from: the run's flags, the cache and its training rows."""

    seed: int
    overrides: dict[str, str]
    cache: TeacherCache
    train_ids: np.ndarray
    device: torch.device

    @property
    def manifest(self) -> Manifest:
        return self.cache.manifest


def create_student(text: str, init: InitMode, context: BuildContext) -> BuiltStudent:
    """The student `text` names, on the CPU, with the cache's special token ids."""
    student = parse_student(text)
    resolved = student.init(init)
    if context.overrides and not isinstance(student, PresetStudent):
        raise ConfigError(f"--set changes a preset's fields; student {text} is not a preset "
                          f"(change its config.json, or its prune: spec)")
    where = f"student {text}"
    if isinstance(student, PresetStudent):
        manifest = context.manifest
        config = llama_config(resolve_preset(student.name, context.overrides),
                              manifest.vocab_size, manifest.seq_len)
        built = BuiltStudent(build_student(config, context.seed),
                             {"init": resolved, "student": text})
    elif isinstance(student, ModelStudent):
        built = _model_student(student, resolved, context, where)
    else:
        built = _pruned_student(student, resolved, context, where)
    check_vocabulary(built.model.config, context.manifest, where)
    check_fused_head(built.model, where)
    set_special_tokens(built.model, context.manifest)
    train_every_embedding_row(built.model)
    return built


def train_every_embedding_row(model: PreTrainedModel) -> None:
    """No padding row in the input embedding: the cache separates documents with EOS, which is
    also the pad id, so as an input it is a token like any other, and an nn.Embedding built with
    padding_idx (transformers passes the config's pad id) would never update its row."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, nn.Embedding):
        embedding.padding_idx = None


def restore_student(saved: dict[str, Any], manifest: Manifest) -> BuiltStudent:
    """The student of a checkpoint's `student` entry, its weights still to load: the pruning plan
    and the importance it came from are the checkpoint's, never measured again."""
    config = dict(saved["config"])
    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[config["model_type"]].from_dict(config))
    set_special_tokens(model, manifest)
    train_every_embedding_row(model)
    return BuiltStudent(model, saved["record"])


def _model_student(student: ModelStudent, init: Init, context: BuildContext,
                   where: str) -> BuiltStudent:
    if student.directory is not None:
        check_tokenizer(student.directory, context.manifest, where)
    try:
        with quiet_transformers_bars():
            config = AutoConfig.from_pretrained(student.source)
            if init == "pretrained":
                torch.manual_seed(context.seed)
                model = AutoModelForCausalLM.from_pretrained(student.source, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        what = ("no such local directory, and the hub does not serve it"
                if student.directory is None else "cannot load it as a causal LM")
        raise ConfigError(f"{where}: {what} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]})") from None
    if init == "random":
        config.use_cache = False
        try:
            model = build_student(config, context.seed)
        except ValueError as e:
            raise ConfigError(f"{where}: not a causal LM architecture transformers knows "
                              f"({str(e).splitlines()[0]})") from None
    model.config.use_cache = False
    source = student.directory.name if student.directory is not None else student.source
    return BuiltStudent(model, {"init": init, "student": student.source, "source": source,
                                "architecture": type(model).__name__})


def _teacher_dir(manifest: Manifest, where: str) -> str:
    path = manifest.teacher.get("path")
    if not path or not os.path.isdir(path):
        raise ConfigError(f"{where}: pruning starts from the cache's teacher, and its directory "
                          f"({path}, manifest.json teacher.path) is not on this machine; build "
                          f"or copy the cache's teacher here")
    return path


def _pruned_student(student: PrunedStudent, init: Init, context: BuildContext,
                    where: str) -> BuiltStudent:
    teacher_dir = _teacher_dir(context.manifest, where)
    record: dict[str, Any] = {"init": init, "student": student.text,
                              "teacher": context.manifest.teacher.get("name")}
    with quiet_transformers_bars():
        if init == "random":
            teacher_config = AutoConfig.from_pretrained(teacher_dir)
            with torch.device("meta"):
                layout = Layout.of(AutoModelForCausalLM.from_config(teacher_config), where)
            shape = resolve_shape(student.spec, layout, where)
            config = layout.pruned_config(shape, list(range(shape.layers)), where)
            return BuiltStudent(build_student(config, context.seed),
                                record | {"shape": asdict(shape)})
        # bf16 on a GPU halves the teacher's memory there (the importance sums in float64 either
        # way); the student cut from it trains in float32 as every student does.
        dtype = torch.bfloat16 if context.device.type == "cuda" else torch.float32
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype)
    layout = Layout.of(teacher, where)
    shape = resolve_shape(student.spec, layout, where)
    found = _importance_plan(teacher.to(context.device), layout, shape, student.spec, context)
    model = apply_plan(teacher, PrunePlan(**found["plan"])).float()
    return BuiltStudent(model, record | {"shape": asdict(shape), "prune": found,
                                         "teacher_dtype": str(dtype).removeprefix("torch.")})


def _importance_plan(teacher: PreTrainedModel, layout: Layout, shape: Shape, spec: PruneSpec,
                     context: BuildContext) -> dict[str, Any]:
    """The pruning record (prune.prune_record), measured once: on rank 0, then broadcast, so that
    every rank builds the same student even where two devices would round an importance
    differently."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    found: list[dict[str, Any] | None] = [None]
    if not distributed or dist.get_rank() == 0:
        seq_ids, input_ids = calibration_rows(context.cache, context.train_ids, spec.rows,
                                              context.seed)
        importance = measure_importance(teacher, input_ids, spec.depth)
        found[0] = prune_record(importance, make_plan(importance, layout.shape, shape),
                                layout.shape, seq_ids, context.seed)
    if distributed:
        dist.broadcast_object_list(found, src=0)
    return found[0]
