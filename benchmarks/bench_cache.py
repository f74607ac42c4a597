"""Cache builder throughput vs a naive transformers loop, and the bytes/token it writes.

Both sides run the same teacher, dtype, batch and token ids. The naive loop is forward +
float32 log_softmax + topk and nothing else. The builder (4 shards) runs the teacher, top-k
extraction and target gather, while a background thread encodes (Arrow, zstd) and atomically
writes the previous shard; its wall time adds model load, packing and the last shard's write.

    python benchmarks/bench_cache.py [--tokens 8192] [--seq-len 512] [--top-k 64] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch
from teacher_args import add_teacher_arguments, teacher_path

from teacher_cache.backends.torch_backend import resolve_device, resolve_dtype
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.corpus import CorpusConfig, open_corpus
from teacher_cache.packing import Packer, tokenize_documents


def packed_ids(tokenizer, tokens: int, seq_len: int) -> np.ndarray:
    corpus = open_corpus(CorpusConfig())
    packer = Packer(tokenize_documents(tokenizer, corpus.documents(), tokenizer.eos_token_id),
                    seq_len, tokens)
    return np.stack([s.input_ids for s in packer])


@torch.inference_mode()
def naive_loop(model, ids: np.ndarray, top_k: int, batch_size: int) -> float:
    """Seconds for forward + log_softmax + topk over ids, batches moved to the model's device;
    on CUDA the clock stops once the device has finished."""
    started = time.perf_counter()
    for chunk in torch.from_numpy(ids.astype(np.int64)).split(batch_size):
        logits = model(chunk.to(model.device)).logits
        torch.topk(torch.log_softmax(logits.float(), dim=-1), top_k, dim=-1)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_teacher_arguments(parser)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = teacher_path(args)
    device = resolve_device("auto")
    dtype = resolve_dtype(args.dtype, device)
    ids = packed_ids(AutoTokenizer.from_pretrained(teacher), args.tokens, args.seq_len)
    tokens = ids.size

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype).to(device).eval()
    naive_loop(model, ids[:1, :64], args.top_k, args.batch_size)  # warm-up
    naive_s = naive_loop(model, ids, args.top_k, args.batch_size)
    del model

    with tempfile.TemporaryDirectory() as out:
        summary = build_cache(BuildConfig(
            out=out, teacher=teacher, max_tokens=tokens, seq_len=args.seq_len,
            top_k=args.top_k, batch_size=args.batch_size, dtype=args.dtype,
            shard_rows=max(1, len(ids) // 4), progress=False))
    manifest = summary.manifest

    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {device}")
    print(f"teacher: {os.path.basename(teacher)}, dtype {dtype}, "
          f"batch {args.batch_size} x {args.seq_len} tokens, top-k {args.top_k}, "
          f"{tokens:,} tokens ({len(ids)} sequences)")
    print(f"{'path':<50}{'seconds':>10}{'tokens/s':>12}")
    for label, seconds in [("naive loop (forward+log_softmax+topk)", naive_s),
                           ("builder (teacher+targets, writes overlapped)", summary.compute_s),
                           ("builder wall (+model load, packing, last write)", summary.wall_s)]:
        print(f"{label:<50}{seconds:>10.2f}{tokens / seconds:>12,.0f}")
    print(f"cache: {manifest.totals['bytes']:,} bytes, "
          f"{manifest.totals['bytes'] / manifest.totals['tokens']:.1f} bytes/token "
          f"(raw top-{args.top_k} int32 ids + float16 logprobs: {args.top_k * 6 + 8} bytes/token)")


if __name__ == "__main__":
    main()
