"""Prompt logprobs in one pass over the logits for vLLM's V1 model runner, the one vLLM runs on CPU.

For each request, the V1 runner turns the prompt logits into a float32 log_softmax over the whole
vocabulary, takes the top-k of that copy, and counts, over the copy again, the tokens ranked at or
above the actual one: three passes over [positions, vocab] and one float32 copy of it. vLLM's V2
runner (GPU) reads the logits instead: top-k of the raw logits (log_softmax keeps their order),
then one fused pass for each row's logsumexp and the actual token's rank. This module gives the
V1 runner that method, with the fused pass compiled by torch.compile as vLLM compiles its own rank
count. The logprobs are the same numbers up to the float32 summation order of the logsumexp; a
rank may differ where float32 rounding of the logprobs ties two distinct logits.

`one_pass_prompt_logprobs()` lends the runner's `_get_prompt_logprobs_dict` a stand-in sampler
while it is active. The engine must run in this process (the backend's in-process engine on CPU),
and vLLM's method must have the structure this was written against (vLLM 0.32): `supported()`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch

# The calls of `_get_prompt_logprobs_dict` the stand-in sampler answers.
_EXPECTED_CALLS = ("self.sampler.compute_logprobs(logits)", "self.sampler.gather_logprobs(")


def supported() -> bool:
    return _patch_target() is not None


def one_pass_prompt_logprobs() -> contextlib.AbstractContextManager[None]:
    """While active, vLLM's V1 runner computes prompt logprobs in one pass (only where
    `supported()`; the logprobs modes that normalise: raw_logprobs, processed_logprobs)."""
    return prompt_logprobs_sampler(OnePassSampler)


@contextlib.contextmanager
def prompt_logprobs_sampler(sampler: type) -> Iterator[None]:
    """While active, `sampler` (an object with the `compute_logprobs` and `gather_logprobs` of
    vLLM's Sampler) computes the V1 runner's prompt logprobs."""
    runner = _patch_target()
    original = runner._get_prompt_logprobs_dict

    def get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        if self.model_config.logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            return original(self, hidden_states, num_scheduled_tokens)
        own_sampler, self.sampler = self.sampler, sampler
        try:
            return original(self, hidden_states, num_scheduled_tokens)
        finally:
            self.sampler = own_sampler

    runner._get_prompt_logprobs_dict = get_prompt_logprobs_dict
    try:
        yield
    finally:
        runner._get_prompt_logprobs_dict = original


class OnePassSampler:
    """Answers the two sampler calls of `_get_prompt_logprobs_dict`: `compute_logprobs` hands
    the logits through untouched and `gather_logprobs` normalises only the k + 1 it keeps."""

    @staticmethod
    def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
        return logits

    @staticmethod
    def gather_logprobs(logits: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor):
        from vllm.v1.outputs import LogprobsTensors

        top_logits, top_ids = torch.topk(logits, num_logprobs, dim=-1)
        token_logits = logits.gather(-1, token_ids[:, None])
        logsumexp, ranks = _logsumexp_and_rank()(logits, token_logits)
        ids = torch.cat((token_ids[:, None], top_ids), dim=1).to(torch.int32)
        logprobs = torch.cat((token_logits, top_logits), dim=1).float() - logsumexp[:, None]
        return LogprobsTensors(ids, logprobs, ranks)


def logsumexp_and_rank(logits: torch.Tensor, token_logits: torch.Tensor):
    """Per row: float32 logsumexp, and the number of logits at or above the token's (its rank,
    counted as vLLM counts it)."""
    x = logits.float()
    row_max = x.amax(dim=-1, keepdim=True)
    logsumexp = row_max.squeeze(-1) + (x - row_max).exp().sum(dim=-1).log()
    return logsumexp, (x >= token_logits.float()).sum(dim=-1)


@functools.cache
def _logsumexp_and_rank():
    from vllm.platforms import current_platform

    return torch.compile(logsumexp_and_rank, dynamic=True,
                         backend=current_platform.simple_compile_backend)


@functools.cache  # once per process, before any patch: the source check reads the file
def _patch_target():
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        return None
    method = getattr(GPUModelRunner, "_get_prompt_logprobs_dict", None)
    if method is None:
        return None
    if list(inspect.signature(method).parameters) != ["self", "hidden_states",
                                                       "num_scheduled_tokens"]:
        return None
    try:
        source = inspect.getsource(method)
    except OSError:
        return None
    return GPUModelRunner if all(call in source for call in _EXPECTED_CALLS) else None
