"""Teacher predictions from vLLM's prompt logprobs (one prefill per sequence, no decoding).

Each sequence is submitted as token ids with `prompt_logprobs=k` and `max_tokens=1`; one `predict`
call (a whole shard from the builder) is one `generate` call, so vLLM's scheduler packs the prefills
into full batches of `max_num_batched_tokens`.

vLLM's convention differs from the cache's by one position: `prompt_logprobs[t + 1]` is the
distribution that predicts token t + 1 (entry 0 is None), which the cache stores at position t.
Each entry holds the actual token first (with its true logprob, used for `target_logprobs`) and
then the top-k, so vLLM reports the target even when it is outside the top-k.

Turning vLLM's per-position results into Python objects costs more than a small teacher's forward
pass on a GPU: at k=64, hundreds of microseconds per position as dicts, about ten as flat lists,
under one as arrays (benchmarks/bench_vllm.py). The backend reads them the cheapest way available:

    arrays  keep vLLM's [L - 1, k + 1] logprob tensors as numpy (a hook on vLLM's logprobs
            processor, installed only during `generate` and only where its signature matches)
    flat    `SamplingParams(flat_logprobs=True)`: flat Python lists, no per-position dicts
    dict    the portable list of {token_id: Logprob} dicts

On CPU, the logprobs themselves cost more than the result path: vLLM's V1 model runner normalises
every prompt position over the whole vocabulary in float32 before taking its top-k. With the
in-process engine the backend uses there, it computes them in one pass over the logits instead, the
method of vLLM's V2 (GPU) runner (`teacher_cache.backends.vllm_prompt_logprobs`).

Sampled targets: vLLM cannot sample at prompt positions. The backend draws them with the torch
backend's sampler (`teacher_cache.sampling`) by one of three routes, the `sample_route` option:

    runner  inside vLLM's model runner, from the full logits it computes for every prompt position
            (`vllm_prompt_logprobs.SampledTargets`); the default where the one-pass method runs
            (the in-process engine, the default on CPU) with the arrays path
    hidden  vLLM as a pooling model hands back every position's final hidden state, then our own
            output layer and sampler (`vllm_hidden_states`); the default elsewhere (vLLM's engine
            in another process, the default on GPU), for teachers whose logits are a plain
            linear map of the hidden state
    top     from vLLM's top-K' prompt logprobs (K' = `sample_from_top`, default 64; giving it
            selects this route), renormalised: the teacher mass outside the top-K' is never
            drawn, and `TeacherOutput.uncovered_mass` reports it per position (the manifest its
            mean)

The first two are exact: the draws equal the torch backend's from the same logits.

`BackendConfig.options` are passed to `vllm.LLM` as engine arguments (e.g. gpu_memory_utilization,
max_num_batched_tokens, dtype, enforce_eager), except `logprobs_path`, which forces one of the three
result paths above, `one_pass_logprobs` (true/false), which forces the logprobs method (the
benchmark compares them), `sample_route` and `sample_from_top` (above).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from teacher_cache.backends import vllm_hidden_states, vllm_prompt_logprobs
from teacher_cache.backends.base import BackendConfig, TeacherOutput
from teacher_cache.backends.dtypes import dtype_name, resolve_dtype
from teacher_cache.backends.vllm_hidden_states import HiddenStateSampler
from teacher_cache.errors import TeacherError
from teacher_cache.format import counts_to_logprobs
from teacher_cache.sampling import sample_packed

# On CPU, vLLM's "GPU memory" is a fraction of RAM; its default (0.9) does not fit beside the
# process that builds the cache.
DEFAULT_MEMORY_FRACTION = {"cpu": 0.5, "cuda": 0.9}
DEFAULT_SAMPLE_FROM_TOP = 64  # K' of the "top" route: sampled from the teacher's top-K'
SAMPLE_ROUTES = ("runner", "hidden", "top")


@dataclass
class PromptArrays:
    """One request's prompt logprobs: column 0 is the actual next token, columns 1..k the top-k;
    row t is the distribution that predicts prompt token t + 1."""

    token_ids: np.ndarray  # int [L - 1, k + 1]
    logprobs: np.ndarray  # float32 [L - 1, k + 1]


class VllmBackend:
    name = "vllm"
    sequences_per_call = None  # a whole shard per `generate`: vLLM's scheduler packs the batches

    def __init__(self, config: BackendConfig):
        import torch
        from vllm import LLM
        from vllm.platforms import current_platform

        options = dict(config.options)
        available = supported_logprobs_paths()
        self.logprobs_path = options.pop("logprobs_path", available[0])
        if self.logprobs_path not in available:
            raise TeacherError(f"logprobs_path {self.logprobs_path!r} is not available with this "
                               f"vLLM; choose one of {', '.join(available)}")
        device = "cpu" if current_platform.is_cpu() else "cuda"
        if device == "cpu":
            # In-process engine: no engine and worker processes polling each other for the cores
            # that run the model (starts in seconds instead of a minute on a small machine).
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        one_pass_available = in_process and vllm_prompt_logprobs.supported()
        self.one_pass_logprobs = bool(options.pop("one_pass_logprobs", one_pass_available))
        if self.one_pass_logprobs and not one_pass_available:
            raise TeacherError("one_pass_logprobs needs the in-process engine "
                             "(VLLM_ENABLE_V1_MULTIPROCESSING=0) and vLLM's V1 model runner as of "
                               "vLLM 0.32; pass one_pass_logprobs=false")
        dtype = resolve_dtype(options.pop("dtype", config.dtype), torch.device(device))
        self.dtype_name = dtype_name(dtype)
        self.targets = config.targets
        self.sampler = None  # runner route: draws from the full logits inside vLLM's runner
        self.hidden = None  # hidden route: our output layer and sampler on vLLM's hidden states
        sample_from_top = options.pop("sample_from_top", None)
        route = self._sample_route(options.pop("sample_route", None), sample_from_top is not None)
        if route == "runner":
            self.sampler = vllm_prompt_logprobs.SampledTargets(self.targets)
        # The logprobs vLLM returns per position: the targets' top-k, the top-K' to sample from,
        # or (runner route) the k slots of the sampled ids.
        if route != "top":
            self.top_k = self.targets.k
        else:
            self.top_k = DEFAULT_SAMPLE_FROM_TOP if sample_from_top is None else sample_from_top
        engine_args = {
            "gpu_memory_utilization": DEFAULT_MEMORY_FRACTION[device],
            "dtype": self.dtype_name,
            **options,
            "model": config.model_path,
            "enable_prefix_caching": False,
        }
        if route == "hidden":
            self.hidden = HiddenStateSampler(config.model_path, self.targets, dtype, device)
            engine_args |= vllm_hidden_states.ENGINE_ARGS  # vLLM's pooling needs the tokenizer
        else:
            engine_args |= {"max_logprobs": self.top_k, "logprobs_mode": "raw_logprobs",
                            "skip_tokenizer_init": True}
        self.llm = LLM(**engine_args)

    def _sample_route(self, route: str | None, from_top: bool) -> str | None:
        """How sampled targets are drawn: "runner", "hidden" or "top" (module docstring); the
        option `sample_route`, else "top" where `sample_from_top` is given, else the default."""
        if self.targets.kind != "sample":
            return None
        in_runner = self.one_pass_logprobs and self.logprobs_path == "arrays"
        if route is None:
            return "top" if from_top else "runner" if in_runner else "hidden"
        if route not in SAMPLE_ROUTES:
            raise TeacherError(f"sample_route {route!r} is not one of {', '.join(SAMPLE_ROUTES)}")
        if route == "runner" and not in_runner:
            raise TeacherError("sample_route=runner needs the one-pass logprobs (the in-process "
                               "engine, VLLM_ENABLE_V1_MULTIPROCESSING=0, and vLLM 0.32's V1 "
                               "runner) and logprobs_path=arrays; pass sample_route=hidden")
        return route

    def predict(self, input_ids: np.ndarray, seq_ids: np.ndarray | None = None) -> TeacherOutput:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        top_k = self.top_k
        input_ids = np.asarray(input_ids)
        batch, seq_len = input_ids.shape
        if self.targets.kind == "sample" and seq_ids is None:
            raise ValueError("sampled targets need the sequence ids of the rows (seq_ids)")
        if self.hidden is not None:
            return self._predict_from_hidden_states(input_ids, seq_ids)
        flat = {"flat_logprobs": True} if self.logprobs_path == "flat" else {}
        params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, detokenize=False, **flat)
        if self.sampler is not None:
            seq_list = np.asarray(seq_ids).tolist()
            self.sampler.rows_drawn.clear()
            params = [params.clone() for _ in range(batch)]
            for one, seq_id in zip(params, seq_list, strict=True):
                one.extra_args = {vllm_prompt_logprobs.SEQ_ID: seq_id}
        prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in input_ids]
        with contextlib.ExitStack() as hooks:
            if self.logprobs_path == "arrays":
                hooks.enter_context(keep_prompt_logprobs_as_arrays())
            if self.sampler is not None:
                hooks.enter_context(vllm_prompt_logprobs.prompt_logprobs_sampler(self.sampler))
            elif self.one_pass_logprobs:
                hooks.enter_context(vllm_prompt_logprobs.one_pass_prompt_logprobs())
            results = self.llm.generate(prompts, params, use_tqdm=False)
        if self.sampler is not None and dict(self.sampler.rows_drawn) != dict.fromkeys(
                seq_list, seq_len - 1):
            raise RuntimeError("vLLM computed prompt logprobs without the backend's sampler "
                               "(another model runner?); pass sample_route=hidden")

        topk_ids = np.zeros((batch, seq_len, top_k), dtype=np.int32)
        topk_logprobs = np.zeros((batch, seq_len, top_k), dtype=np.float32)
        target_logprobs = np.full((batch, seq_len), np.nan, dtype=np.float32)
        for row, result in enumerate(results):
            arrays = prompt_arrays(result.prompt_logprobs, input_ids[row], top_k)
            if not np.array_equal(arrays.token_ids[:, 0], input_ids[row, 1:]):
                raise RuntimeError(f"vLLM returned prompt logprobs for other tokens than sequence "
                                   f"{row} of the batch; this vLLM version is not supported")
            topk_ids[row, :-1] = arrays.token_ids[:, 1:]
            topk_logprobs[row, :-1] = arrays.logprobs[:, 1:]
            target_logprobs[row, :-1] = arrays.logprobs[:, 0]
        if self.sampler is not None:  # the slots hold the sampled ids and their counts
            counts = topk_logprobs.astype(np.uint8)
            return TeacherOutput(topk_ids, counts_to_logprobs(counts, top_k), target_logprobs)
        if self.targets.kind == "sample":
            return self._sample(topk_ids, topk_logprobs, target_logprobs, seq_ids)
        return TeacherOutput(topk_ids, topk_logprobs, target_logprobs)

    def _predict_from_hidden_states(self, input_ids: np.ndarray,
                                    seq_ids: np.ndarray) -> TeacherOutput:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in input_ids]
        outputs = self.llm.encode(prompts, PoolingParams(use_activation=False),
                                  pooling_task=vllm_hidden_states.POOLING_TASK, use_tqdm=False)
        return self.hidden.predict([output.outputs.data for output in outputs], input_ids,
                                   np.asarray(seq_ids))

    def _sample(self, top_ids: np.ndarray, top_logprobs: np.ndarray,
                target_logprobs: np.ndarray, seq_ids: np.ndarray | None) -> TeacherOutput:
        """K draws per position from the top-K' logprobs, renormalised (softmax over them)."""
        import torch

        slots, counts, _ = sample_packed(torch.from_numpy(top_logprobs), seq_ids, self.targets)
        slots, counts = slots.long().numpy(), counts.numpy()
        ids = np.where(counts > 0, np.take_along_axis(top_ids, slots, axis=-1), 0)
        uncovered = np.clip(1.0 - np.exp(top_logprobs.astype(np.float64)).sum(-1), 0.0, 1.0)
        return TeacherOutput(ids.astype(np.int32), counts_to_logprobs(counts, self.targets.k),
                             target_logprobs, uncovered.astype(np.float32))

    def close(self) -> None:
        del self.llm


def prompt_arrays(prompt_logprobs, input_ids: np.ndarray, top_k: int) -> PromptArrays:
    """vLLM's prompt logprobs in any of the three result forms, as [L - 1, k + 1] arrays with the
    top-k sorted by descending logprob."""
    arrays = _unsorted_prompt_arrays(prompt_logprobs, input_ids, top_k)
    order = np.argsort(-arrays.logprobs[:, 1:], axis=1, kind="stable") + 1
    order = np.concatenate([np.zeros_like(order[:, :1]), order], axis=1)
    return PromptArrays(np.take_along_axis(arrays.token_ids, order, axis=1),
                        np.take_along_axis(arrays.logprobs, order, axis=1))


def _unsorted_prompt_arrays(prompt_logprobs, input_ids: np.ndarray, top_k: int) -> PromptArrays:
    if isinstance(prompt_logprobs, PromptArrays):
        return prompt_logprobs
    from vllm.logprobs import FlatLogprobs

    positions = len(input_ids) - 1
    if isinstance(prompt_logprobs, FlatLogprobs):
        # Flat results keep every entry, the actual token first even when it is also in the top-k.
        shape = (positions, top_k + 1)
        if len(prompt_logprobs.token_ids) != positions * (top_k + 1):
            raise RuntimeError(f"vLLM returned {len(prompt_logprobs.token_ids)} flat prompt "
                               f"logprobs, expected {positions} x {top_k + 1}")
        return PromptArrays(np.asarray(prompt_logprobs.token_ids).reshape(shape),
                            np.asarray(prompt_logprobs.logprobs, dtype=np.float32).reshape(shape))
    token_ids = np.empty((positions, top_k + 1), dtype=np.int64)
    logprobs = np.empty((positions, top_k + 1), dtype=np.float32)
    for t, (entry, target) in enumerate(zip(prompt_logprobs[1:], input_ids[1:].tolist(),
                                            strict=True)):
        # The actual token comes first; a dict holds it once, so k entries mean it is in the top-k.
        items = list(entry.items())
        top = items[1:] if len(items) > top_k else items
        token_ids[t, 0], logprobs[t, 0] = target, entry[target].logprob
        token_ids[t, 1:] = [token for token, _ in top]
        logprobs[t, 1:] = [logprob.logprob for _, logprob in top]
    return PromptArrays(token_ids, logprobs)


def supported_logprobs_paths() -> tuple[str, ...]:
    """The result paths this vLLM offers, fastest first."""
    from vllm import SamplingParams

    has_hook = _array_hook_target() is not None
    has_flat = "flat_logprobs" in inspect.signature(SamplingParams).parameters
    return ("arrays",) * has_hook + ("flat",) * has_flat + ("dict",)


def _array_hook_target():
    """vLLM's per-request logprobs processor, if its prompt-logprobs method has the one signature
    the array hook was written against (vLLM 0.32); None otherwise."""
    try:
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:
        return None
    method = getattr(LogprobsProcessor, "_update_prompt_logprobs", None)
    if method is None or list(inspect.signature(method).parameters) != [
            "self", "prompt_logprobs_tensors"]:
        return None
    return LogprobsProcessor


@contextlib.contextmanager
def keep_prompt_logprobs_as_arrays() -> Iterator[None]:
    """While active, vLLM hands back each request's prompt logprobs as one PromptArrays instead of
    building Python objects per position. vLLM delivers a request's prompt logprobs in a single
    update, once its prefill is complete, as [L - 1, k + 1] CPU tensors."""
    processor = _array_hook_target()
    original = processor._update_prompt_logprobs

    def keep_arrays(self, prompt_logprobs_tensors) -> None:
        token_ids, logprobs, *_ = prompt_logprobs_tensors
        self.prompt_logprobs = PromptArrays(token_ids.numpy(), logprobs.numpy())

    processor._update_prompt_logprobs = keep_arrays
    try:
        yield
    finally:
        processor._update_prompt_logprobs = original


def create(config: BackendConfig) -> VllmBackend:
    return VllmBackend(config)
