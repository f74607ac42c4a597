"""A synthetic teacher cache for tests and benchmarks, in the real format, with no teacher to run.

The "teacher" is a Markov chain: after token `t` it puts its top-k on the ids `c(t), c(t) + 1, ...`
(mod V) with geometrically decreasing probabilities, and the sequences are sampled from it, so a
student can learn both the true tokens and the teacher's distribution.
"""

from __future__ import annotations

import os

import numpy as np

from teacher_cache.format import (
    MANIFEST_FILE,
    CacheBatch,
    Manifest,
    encode_batch,
    unscored,
    write_shard,
)
from teacher_cache.storage import resolve

TOP_K_DECAY = 0.7  # probability ratio between consecutive teacher ranks
TAIL_MASS = 0.05  # teacher probability outside its top-k


def teacher_topk(tokens: np.ndarray, vocab_size: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k ids and logprobs after each of `tokens` ([...] -> [..., k])."""
    first = (tokens * 7919 + 1) % vocab_size
    ids = (first[..., None] + np.arange(top_k)) % vocab_size
    weights = TOP_K_DECAY ** np.arange(top_k)
    logprobs = np.log(weights / weights.sum() * (1 - TAIL_MASS))
    return ids, np.broadcast_to(logprobs, ids.shape).astype(np.float32)


def write_synthetic_cache(path: str | os.PathLike, *, sequences: int, seq_len: int, top_k: int,
                          vocab_size: int, rows_per_shard: int, seed: int = 0,
                          scores: np.ndarray | None = None, complete: bool = True) -> Manifest:
    """Write a cache of `sequences` rows; `scores` (one per row) fills the score column."""
    rng = np.random.default_rng(seed)
    logprobs = teacher_topk(np.zeros(1, np.int64), vocab_size, top_k)[1][0]
    probs = np.exp(logprobs)
    tokens = np.empty((sequences, seq_len), dtype=np.int64)
    target = np.zeros((sequences, seq_len), dtype=np.float32)  # position L - 1 is masked on write
    tokens[:, 0] = rng.integers(0, vocab_size, sequences)
    for t in range(1, seq_len):
        rank = rng.choice(top_k, size=sequences, p=probs / probs.sum())
        tokens[:, t] = teacher_topk(tokens[:, t - 1], vocab_size, top_k)[0][
            np.arange(sequences), rank]
        target[:, t - 1] = logprobs[rank]
    topk_ids, topk_logprobs = teacher_topk(tokens, vocab_size, top_k)

    location = resolve(path)
    manifest = Manifest(
        seq_len=seq_len, top_k=top_k, vocab_size=vocab_size,
        teacher={"name": "synthetic-markov", "path": None},
        tokenizer={"sha256": None, "eos_token_id": None, "bos_token_id": None},
        corpus={"description": f"synthetic seed={seed}", "documents": sequences},
        rows_per_shard=rows_per_shard, score={"kind": "synthetic"} if scores is not None else None)
    for index, start in enumerate(range(0, sequences, rows_per_shard)):
        rows = slice(start, min(start + rows_per_shard, sequences))
        batch = CacheBatch(
            seq_ids=np.arange(sequences)[rows], input_ids=tokens[rows], topk_ids=topk_ids[rows],
            topk_logprobs=topk_logprobs[rows], target_logprobs=target[rows],
            score=unscored(sequences)[rows] if scores is None else scores[rows],
            doc_starts=[np.zeros(1, np.int32)] * len(tokens[rows]))
        manifest.shards.append(write_shard(location, index, [encode_batch(batch)],
                                           rows_per_shard))
    manifest.totals = {"sequences": sequences, "tokens": sequences * seq_len,
                       "bytes": sum(s.bytes for s in manifest.shards)}
    manifest.complete = complete
    location.write_bytes_atomic(manifest.to_json().encode(), MANIFEST_FILE)
    return manifest
