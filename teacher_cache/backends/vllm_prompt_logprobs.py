"""Prompt logprobs in one pass over the logits for vLLM's V1 model runner, the one vLLM runs on CPU.

For each request, the V1 runner turns the prompt logits into a float32 log_softmax over the whole
vocabulary, takes the top-k of that copy, and counts, over the copy again, the tokens ranked at or
above the actual one: three passes over [positions, vocab] and one float32 copy of it. vLLM's V2
runner (GPU) reads the logits instead: top-k of the raw logits (log_softmax keeps their order),
then one fused pass for each row's logsumexp and the actual token's rank. This module gives the
V1 runner that method, with the fused pass compiled by torch.compile as vLLM compiles its own rank
count. The logprobs are the same numbers up to the float32 summation order of the logsumexp; a
rank may differ where float32 rounding of the logprobs ties two distinct logits.

The same seam draws the cache's sampled targets exactly, from the full logits of every prompt
position (`SampledTargets`): vLLM itself cannot sample at prompt positions. The draws depend on
each row's sequence id and position; the runner's loop does not tell the sampler which request
and positions a call's logits belong to, so `prompt_chunks` reads them, before the loop runs, from
the runner state the loop reads, and every call checks its target tokens against them.

`prompt_logprobs_sampler()` lends the runner's `_get_prompt_logprobs_dict` a stand-in sampler
while it is active. The engine must run in this process (the backend's in-process engine on CPU),
and vLLM's method must have the structure this was written against (vLLM 0.32): `supported()`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from teacher_cache.format import Targets
from teacher_cache.sampling import sample_rows, token_logprobs

# The calls of `_get_prompt_logprobs_dict` the stand-in sampler answers.
_EXPECTED_CALLS = ("self.sampler.compute_logprobs(logits)", "self.sampler.gather_logprobs(")
# The key of SamplingParams.extra_args that carries a request's sequence id (sampled targets).
SEQ_ID = "distill_seq_id"


def supported() -> bool:
    return _patch_target() is not None


def one_pass_prompt_logprobs() -> contextlib.AbstractContextManager[None]:
    """While active, vLLM's V1 runner computes prompt logprobs in one pass (only where
    `supported()`; the logprobs modes that normalise: raw_logprobs, processed_logprobs)."""
    return prompt_logprobs_sampler(OnePassSampler)


@contextlib.contextmanager
def prompt_logprobs_sampler(sampler) -> Iterator[None]:
    """While active, `sampler.for_step(chunks)` (an object with the `compute_logprobs` and
    `gather_logprobs` of vLLM's Sampler, given the step's `prompt_chunks`) computes the V1
    runner's prompt logprobs."""
    runner = _patch_target()
    original = runner._get_prompt_logprobs_dict

    def get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        if self.model_config.logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            return original(self, hidden_states, num_scheduled_tokens)
        step_sampler = sampler.for_step(prompt_chunks(self, num_scheduled_tokens))
        own_sampler, self.sampler = self.sampler, step_sampler
        try:
            return original(self, hidden_states, num_scheduled_tokens)
        finally:
            self.sampler = own_sampler

    runner._get_prompt_logprobs_dict = get_prompt_logprobs_dict
    try:
        yield
    finally:
        runner._get_prompt_logprobs_dict = original


@dataclass(frozen=True)
class PromptChunk:
    """One request's prompt positions whose logits the runner hands `gather_logprobs` in a step:
    logits row i predicts prompt token start + i + 1 (the cache's position start + i)."""

    extra_args: dict | None  # the request's SamplingParams.extra_args
    prompt: list[int]  # the request's prompt token ids
    start: int
    rows: int

    def targets(self) -> list[int]:
        """Prompt tokens start + 1 .. start + rows: the call's `token_ids`."""
        return self.prompt[self.start + 1:self.start + 1 + self.rows]


def prompt_chunks(runner, num_scheduled_tokens: dict[str, int]) -> list[PromptChunk]:
    """The `gather_logprobs` calls `_get_prompt_logprobs_dict` makes this step, in its order: its
    loop's conditions on the state it reads (it changes that state only after the loop)."""
    chunks = []
    for req_id in runner.num_prompt_logprobs:
        scheduled = num_scheduled_tokens.get(req_id)
        if scheduled is None:
            continue
        request = runner.requests[req_id]
        prompt = request.prompt_token_ids
        if prompt is None:
            continue
        start = request.num_computed_tokens
        rows = min(scheduled, len(prompt) - start - 1)
        if rows > 0:
            params = request.sampling_params
            chunks.append(PromptChunk(params.extra_args if params else None, prompt, start,
                                      rows))
    return chunks


class OnePassSampler:
    """Answers the two sampler calls of `_get_prompt_logprobs_dict`: `compute_logprobs` hands
    the logits through untouched and `gather_logprobs` normalises only the k + 1 it keeps."""

    @classmethod
    def for_step(cls, chunks: list[PromptChunk]) -> type:
        return cls

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


class SampledTargets:
    """Draws the cache's sampled targets from the full logits of the prompt positions, as the
    torch backend draws them (`teacher_cache.sampling`), in place of vLLM's prompt logprobs. Each
    request carries its sequence id in `SamplingParams.extra_args[SEQ_ID]` and asks for
    `prompt_logprobs=targets.k`.

    Per row of a result: column 0 is the actual next token and its logprob, columns 1..k the
    distinct sampled ids and, in place of logprobs, their counts (floats; unused slots id 0,
    count 0). Ranks are not computed (zeros). `rows_drawn` counts the rows drawn per sequence id,
    so that the caller can check that every position of every sequence was drawn here.
    """

    def __init__(self, targets: Targets):
        self.targets = targets
        self.rows_drawn: collections.Counter[int] = collections.Counter()
        self._chunks: Iterator[PromptChunk] = iter(())

    def for_step(self, chunks: list[PromptChunk]) -> SampledTargets:
        self._chunks = iter(chunks)
        return self

    compute_logprobs = staticmethod(OnePassSampler.compute_logprobs)

    def gather_logprobs(self, logits: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor):
        from vllm.v1.outputs import LogprobsTensors

        chunk = next(self._chunks, None)
        if chunk is None or token_ids.tolist() != chunk.targets():
            raise RuntimeError("vLLM's prompt logprobs loop does not visit the requests as "
                               "prompt_chunks expects; this vLLM version is not supported")
        if num_logprobs != self.targets.k or SEQ_ID not in (chunk.extra_args or {}):
            raise RuntimeError(f"sampled targets need prompt_logprobs={self.targets.k} and the "
                               f"sequence id in SamplingParams.extra_args[{SEQ_ID!r}]")
        seq_id = chunk.extra_args[SEQ_ID]
        positions = torch.arange(chunk.start, chunk.start + chunk.rows, device=logits.device)
        ids, counts, logsumexp = sample_rows(logits, self.targets.seed,
                                             torch.full_like(positions, seq_id), positions,
                                             self.targets.k, self.targets.temperature)
        target_logprobs = token_logprobs(logits, token_ids, logsumexp)[:, None]
        self.rows_drawn[seq_id] += chunk.rows
        return LogprobsTensors(torch.cat((token_ids[:, None].int(), ids), dim=1),
                               torch.cat((target_logprobs, counts.float()), dim=1),
                               torch.zeros_like(positions))


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
