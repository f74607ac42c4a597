"""The student's distillation objective, how the fused loss reaches any causal LM's decoder and
output layer, and the student's saved form."""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from kernels import IGNORE_INDEX, sparse_kd_loss
from student_train.data import Batch
from student_train.model_card import write_model_card
from teacher_cache.errors import CacheError, ConfigError
from teacher_cache.format import TRAINING_FILE, Manifest
from teacher_cache.storage import USER_FIXABLE_ERRNOS, replace_directory, write_json
from teacher_cache.teacher import quiet_transformers_bars

if TYPE_CHECKING:
    from student_train.evaluate import EvalMetrics

log = logging.getLogger(__name__)


def build_student(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A model of `config`'s architecture at random init: the same weights for the same seed."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters: a tied embedding counts once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def decoder_of(student: PreTrainedModel) -> nn.Module:
    """The module that maps input ids to the final hidden states (final norm included): what the
    fused loss takes in place of the logits."""
    return student.get_decoder()


def output_weight(student: PreTrainedModel) -> torch.Tensor:
    """The [vocab, hidden] weight of the student's output layer (students.check_fused_head made
    sure the logits are the final hidden states times it, nothing else)."""
    return student.get_output_embeddings().weight


def final_hidden(student: PreTrainedModel, input_ids: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's output; with `position_ids` restarting at document starts (data.row_positions)
    each document attends only to itself where `keeps_to_documents`."""
    return decoder_of(student)(input_ids=input_ids, position_ids=position_ids,
                               use_cache=False).last_hidden_state


@torch.no_grad()
def keeps_to_documents(student: PreTrainedModel) -> bool:
    """Whether restarting position ids confine the student's attention to each document: in a
    batch of two rows of two documents each, every second document gets the hidden states it gets
    alone. transformers derives a block-causal mask from them (masking_utils, packed sequences)
    for sdpa, eager and flex_attention on the architectures that pass position ids to their mask
    creation (Llama, Qwen2, Mistral and most others); flash_attention_* takes them as varlen
    boundaries for a batch of one row only, hence the two rows."""
    was_training = student.training
    student.eval()
    device = student.get_input_embeddings().weight.device
    vocab_size = student.config.get_text_config().vocab_size
    input_ids = (torch.arange(16, device=device).view(2, 8) * 7 + 1) % vocab_size
    position_ids = torch.arange(8, device=device).expand(2, -1) % 4
    packed = final_hidden(student, input_ids, position_ids)[:, 4:]
    alone = final_hidden(student, input_ids[:, 4:])
    student.train(was_training)
    return torch.allclose(packed.float(), alone.float(), rtol=1e-4, atol=1e-5)


def resolve_doc_mask(mode: str, student: PreTrainedModel, where: str) -> bool:
    """TrainConfig.doc_mask: on (or auto) where `keeps_to_documents`; on elsewhere is refused."""
    if mode == "off":
        return False
    if keeps_to_documents(student):
        return True
    if mode == "on":
        config = student.config
        raise ConfigError(f"--doc-mask on: {where} ({type(student).__name__}, "
                          f"{config._attn_implementation} attention) attends across the documents "
                          f"of a packed row even with restarting position ids; use --doc-mask "
                          f"off (auto turns it off for this student)")
    return False


class DistillationObjective(nn.Module):
    """CE on the true next token plus a divergence to the teacher's cached targets (its sampled
    ids or its top-k), as one module so DistributedDataParallel (or FSDP, as its root) wraps the
    whole step. The full [tokens, vocab] logits never exist: the loss kernel takes the final hidden
    states and the output layer's weight."""

    def __init__(self, student: PreTrainedModel, *, divergence: str, temperature: float,
                 ce_weight: float, kd_weight: float, impl: str = "auto"):
        super().__init__()
        self.student = student
        self.loss_options = dict(divergence=divergence, temperature=temperature,
                                 ce_weight=ce_weight, kd_weight=kd_weight,
                                 ignore_index=IGNORE_INDEX, impl=impl)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
                topk_logprobs: torch.Tensor, position_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, its detached terms [CE, divergence]) as `sparse_kd_loss` returns them;
        `position_ids` as final_hidden takes them (None: one sequence per row)."""
        hidden = final_hidden(self.student, input_ids, position_ids)
        # The loss is the LM head and applies autocast to it, as a Linear would.
        return sparse_kd_loss(hidden.flatten(0, 1), output_weight(self.student), labels.flatten(),
                              topk_ids.flatten(0, 1), topk_logprobs.flatten(0, 1),
                              **self.loss_options, return_terms=True)

    def evaluate(self, batches: Iterable[Batch], device: torch.device, impl: str,
                 doc_mask: bool) -> EvalMetrics:
        """The student's held-out metrics (student_train.evaluate): a method of the objective so
        that FSDP gathers the weights outside the decoder layers for it, as for `forward`."""
        from student_train.evaluate import evaluate  # which imports this module

        return evaluate(self.student, batches, device, impl=impl, doc_mask=doc_mask)


def special_token_ids(manifest: Manifest) -> dict[str, int | None]:
    """bos/eos/pad of the cache's tokenizer. A manifest without a pad id pads with EOS, as the
    default teacher's tokenizer does."""
    tokenizer = manifest.tokenizer
    eos = tokenizer.get("eos_token_id")
    return {"bos_token_id": tokenizer.get("bos_token_id"), "eos_token_id": eos,
            "pad_token_id": tokenizer.get("pad_token_id", eos)}


def set_special_tokens(student: PreTrainedModel, manifest: Manifest) -> None:
    """The cache tokenizer's special ids in the config and the generation config, so that the
    saved student stops at the teacher's EOS, not at the ids of LlamaConfig's defaults."""
    for name, value in special_token_ids(manifest).items():
        setattr(student.config, name, value)
        if student.generation_config is not None:
            setattr(student.generation_config, name, value)


def save_student(student: PreTrainedModel, out_dir: str | os.PathLike, manifest: Manifest,
                 training: dict[str, Any] | None = None, chat_template: bool = False,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """A Hugging Face model directory that `AutoModelForCausalLM` loads and generates with (KV
    cache on), the teacher's tokenizer when its path in the manifest exists on this machine
    (without its chat template unless `chat_template`: a student trained on raw text is a base
    model), the run's `training` summary in TRAINING_FILE (which the cache's `score` records for a
    reference) and a model card. `state_dict`: the weights to write in place of the student's own
    (a sharded student's, gathered).

    Written whole into a temp folder beside OUT_DIR, then renamed into place (an earlier student
    there is replaced only then), so OUT_DIR is never partial; its files get the umask's mode. A
    write refused for room or permissions is a CacheError naming OUT_DIR."""
    out = Path(out_dir)
    staging = _temp_sibling(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir(0o777)  # the mode the umask gives, which its files get too (below)
        _write_student(student, staging, manifest, training, chat_template, state_dict)
        file_mode = staging.stat().st_mode & 0o666
        for entry in os.scandir(staging):  # safetensors writes through a temp file of mode 0600
            if entry.is_file(follow_symlinks=False):
                os.chmod(entry.path, file_mode)
        previous = _temp_sibling(out) if os.path.lexists(out) else None
        if previous is not None:
            os.rename(out, previous)
        try:
            replace_directory(staging, out)
        except BaseException:
            if previous is not None:
                os.rename(previous, out)
            raise
    except (OSError, SafetensorError) as e:
        code = e.errno if isinstance(e, OSError) else _os_error(e)
        if code not in USER_FIXABLE_ERRNOS:
            raise
        raise CacheError(f"cannot write the student {out}: {os.strerror(code)} (nothing of it "
                         f"was saved); make room or fix the permissions, then rerun the same "
                         f"command with --resume") from e
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    if previous is not None:
        shutil.rmtree(previous)
    return out


def _temp_sibling(path: Path) -> Path:
    """A new name beside PATH in the temp-file pattern of teacher_cache.storage, which
    student_train.run_dir clears when a run starts."""
    return path.with_name(f".tmp-{secrets.token_hex(6)}-{path.name}")


def _os_error(error: SafetensorError) -> int | None:
    """The errno safetensors names in its message ("... (os error 28)"): its I/O failures are not
    OSErrors."""
    found = re.search(r"os error (\d+)", str(error))
    return int(found[1]) if found else None


def _write_student(student: PreTrainedModel, out: Path, manifest: Manifest,
                   training: dict[str, Any] | None, chat_template: bool,
                   state_dict: dict[str, torch.Tensor] | None) -> None:
    training_cache = student.config.use_cache
    student.config.use_cache = True  # off while training, where nothing is generated
    if student.generation_config is not None:
        student.generation_config.use_cache = True
    try:
        with quiet_transformers_bars():
            student.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    finally:
        student.config.use_cache = training_cache
    if training is not None:
        write_json(out / TRAINING_FILE, training)
        write_model_card(out, manifest, training)
    teacher_path = manifest.teacher.get("path")  # the teacher's local Hugging Face directory
    if teacher_path and os.path.isdir(teacher_path):
        try:
            tokenizer = AutoTokenizer.from_pretrained(teacher_path)
        except (OSError, ValueError) as e:
            log.warning("teacher tokenizer at %s not copied: %s", teacher_path, e)
            return
        if not chat_template:
            tokenizer.chat_template = None
        tokenizer.save_pretrained(out)
