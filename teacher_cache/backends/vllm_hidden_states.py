"""Sampled targets from vLLM's final hidden states: the exact route where our sampler cannot run
inside vLLM's model runner (its engine in another process, the default on GPU, or a runner the
one-pass seam does not know).

vLLM runs the teacher as a pooling model with ALL pooling (`token_embed`, no activation): it hands
back every prompt position's final hidden state, after the model's last norm. This module applies
the teacher's own output layer to them and samples with `teacher_cache.sampling`, as the torch
backend does from its logits. That takes a teacher whose logits are one bias-free linear map of
the final hidden state (Llama, Mistral, Qwen2, SmolLM2, ...): `load_output_layer` refuses the
others (logit soft-capping or scaling, a bias), whose logits vLLM computes with model code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from teacher_cache.backends.base import TeacherOutput
from teacher_cache.errors import TeacherError
from teacher_cache.format import Targets, counts_to_logprobs
from teacher_cache.sampling import sample_packed, true_token_logprobs

# vLLM engine arguments: the teacher as a pooling model that returns every position's hidden state.
ENGINE_ARGS = {"runner": "pooling",
               "pooler_config": {"pooling_type": "ALL", "task": "token_embed"}}
POOLING_TASK = "token_embed"
# config.json entries that change the logits after the linear map (in Gemma, Cohere, Granite, ...).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def load_output_layer(model_path: str, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The teacher's output layer weight [V, H] from its safetensors: `lm_head.weight`, or with
    tied embeddings `model.embed_tokens.weight`."""
    from safetensors import safe_open

    path = Path(model_path)
    config = json.loads((path / "config.json").read_text())
    transforms = [name for name in _LOGIT_TRANSFORMS if config.get(name) not in (None, 1, 1.0)]
    if transforms:
        raise TeacherError(f"{path}: the teacher's logits are not a plain linear map of its "
                           f"hidden states ({', '.join(transforms)} in config.json); build "
                           f"sampled targets with --backend torch")
    index = path / "model.safetensors.index.json"
    files = (json.loads(index.read_text())["weight_map"] if index.is_file()
             else dict.fromkeys(_tensor_names(path / "model.safetensors"), "model.safetensors"))
    if "lm_head.bias" in files:
        raise TeacherError(f"{path}: the teacher's output layer has a bias; build sampled "
                           f"targets with --backend torch")
    names = ["lm_head.weight"] + ["model.embed_tokens.weight"] * bool(
        config.get("tie_word_embeddings"))
    name = next((name for name in names if name in files), None)
    if name is None:
        raise TeacherError(f"{path}: no output layer weight ({' or '.join(names)}) in its "
                           f"safetensors; build sampled targets with --backend torch")
    with safe_open(path / files[name], framework="pt", device="cpu") as weights:
        return weights.get_tensor(name).to(device=device, dtype=dtype)


def _tensor_names(file: Path) -> list[str]:
    from safetensors import safe_open

    if not file.is_file():
        raise TeacherError(f"{file.parent}: no model.safetensors (or its index); the hidden-state "
                           f"route reads the output layer from safetensors")
    with safe_open(file, framework="pt", device="cpu") as weights:
        return list(weights.keys())


class HiddenStateSampler:
    """The teacher's output layer and the cache's sampler, applied to vLLM's hidden states."""

    def __init__(self, model_path: str, targets: Targets, dtype: torch.dtype, device: str):
        self.targets = targets
        self.weight = load_output_layer(model_path, dtype, device)

    @torch.inference_mode()
    def predict(self, hidden_states: list[torch.Tensor], input_ids: np.ndarray,
                seq_ids: np.ndarray) -> TeacherOutput:
        """hidden_states: per sequence [L, H] (vLLM's pooling outputs, in order) of the packed
        input_ids [B, L]; one sequence's [L, V] logits at a time."""
        rows = []
        for row, hidden in enumerate(hidden_states):
            logits = (hidden.to(self.weight) @ self.weight.T)[None]
            ids, counts, logsumexp = sample_packed(logits, seq_ids[row:row + 1], self.targets)
            target = true_token_logprobs(
                logits, torch.as_tensor(input_ids[row:row + 1], device=logits.device), logsumexp)
            rows.append((ids.cpu().numpy(), counts.cpu().numpy(), target.cpu().numpy()))
        ids, counts, target = (np.concatenate(parts) for parts in zip(*rows, strict=True))
        return TeacherOutput(ids, counts_to_logprobs(counts, self.targets.k), target)
