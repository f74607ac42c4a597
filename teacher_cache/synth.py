"""A synthetic teacher cache in the real format, with no teacher to run: `python -m teacher_cache
synth`, and the one generator the tests and benchmarks share.

The "teacher" is a Markov chain: after token `t` it puts its mass on the ids `c(t), c(t) + 1, ...`
(mod V) with geometrically decreasing probabilities, and the sequences are sampled from it, so a
student can learn both the true tokens and the teacher's distribution. A top-k cache stores the
chain's k most likely ids; a sampled cache stores k draws from the chain, as the builder does.
Shard `i` is drawn from its own generator `(seed, i)`: the cache is written shard by shard in
constant memory, and any size can be generated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from teacher_cache.format import (
    CacheBatch,
    Manifest,
    TargetKind,
    Targets,
    encode_batch,
    unscored,
    write_shard,
)
from teacher_cache.index import publish_manifest
from teacher_cache.storage import resolve

TOP_K_DECAY = 0.7  # probability ratio between consecutive teacher ranks
TAIL_MASS = 0.05  # teacher probability outside its top-k
SAMPLE_SUPPORT = 16  # ids a sampled cache's chain draws from


def _first(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    return (tokens * 7919 + 1) % vocab_size


def teacher_topk(tokens: np.ndarray, vocab_size: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k ids and logprobs after each of `tokens` ([...] -> [..., k])."""
    ids = (_first(tokens, vocab_size)[..., None] + np.arange(top_k)) % vocab_size
    weights = TOP_K_DECAY ** np.arange(top_k)
    logprobs = np.log(weights / weights.sum() * (1 - TAIL_MASS))
    return ids, np.broadcast_to(logprobs, ids.shape).astype(np.float32)


def _shard_rows(rng: np.random.Generator, rows: int, seq_len: int, support: int,
                vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [rows, seq_len] drawn from the chain and the rank of each draw (t >= 1)."""
    logprobs = teacher_topk(np.zeros(1, np.int64), vocab_size, support)[1][0]
    probs = np.exp(logprobs)
    ranks = rng.choice(support, size=(rows, seq_len), p=probs / probs.sum())
    tokens = np.empty((rows, seq_len), dtype=np.int64)
    tokens[:, 0] = rng.integers(0, vocab_size, rows)
    for t in range(1, seq_len):
        tokens[:, t] = (_first(tokens[:, t - 1], vocab_size) + ranks[:, t]) % vocab_size
    return tokens, ranks


def _sampled_targets(rng: np.random.Generator, tokens: np.ndarray, k: int,
                     vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """k draws per position from the chain: distinct ids by count (ties by rank), log(count/k)."""
    logprobs = teacher_topk(np.zeros(1, np.int64), vocab_size, SAMPLE_SUPPORT)[1][0]
    probs = np.exp(logprobs)
    draws = rng.choice(SAMPLE_SUPPORT, size=(*tokens.shape, k), p=probs / probs.sum())
    counts = (draws[..., None] == np.arange(SAMPLE_SUPPORT)).sum(axis=-2)
    order = np.argsort(-counts, axis=-1, kind="stable")[..., :k]
    counts = np.take_along_axis(counts, order, axis=-1)
    ids = np.where(counts > 0, (_first(tokens, vocab_size)[..., None] + order) % vocab_size, 0)
    with np.errstate(divide="ignore"):
        return ids, np.log(counts / k).astype(np.float32)


def document_starts(rows: int, seq_len: int, mean_tokens: int, seed: int) -> list[list[int]]:
    """Each row's document starts when documents of geometric lengths (mean `mean_tokens`) are
    packed end to end, as teacher_cache.packing lays them out."""
    rng = np.random.default_rng(seed)
    lengths = rng.geometric(1 / mean_tokens, size=rows * seq_len // mean_tokens * 2 + 1)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    starts = starts[starts < rows * seq_len]
    return [(starts[(starts >= r * seq_len) & (starts < (r + 1) * seq_len)] - r * seq_len).tolist()
            for r in range(rows)]


def write_synthetic_cache(path: str | os.PathLike, *, sequences: int, seq_len: int, top_k: int,
                          vocab_size: int, rows_per_shard: int, seed: int = 0,
                          scores: np.ndarray | None = None, complete: bool = True,
                          kind: TargetKind = "top_k", progress: bool = False,
                          doc_starts: Sequence[Sequence[int]] | None = None) -> Manifest:
    """Write a cache of `sequences` rows (top_k: the chain's top-k; sample: `top_k` draws per
    position); `scores` (one per row) fills the score column, `doc_starts` (one list per row) the
    document starts (default: each row one document, starting at 0)."""
    targets = Targets(kind, top_k)
    location = resolve(path)
    manifest = Manifest(
        seq_len=seq_len, top_k=top_k, vocab_size=vocab_size,
        teacher={"name": "synthetic-markov", "path": None},
        tokenizer={"sha256": None, "eos_token_id": None, "bos_token_id": None},
        corpus={"description": f"synthetic seed={seed}", "documents": sequences},
        rows_per_shard=rows_per_shard, targets=targets.manifest_entry(),
        score={"kind": "synthetic"} if scores is not None else None)
    all_scores = unscored(sequences) if scores is None else np.asarray(scores, np.float32)
    support = top_k if kind == "top_k" else SAMPLE_SUPPORT
    starts = range(0, sequences, rows_per_shard)
    for index, start in enumerate(tqdm(starts, desc="synth", unit="shard", disable=not progress)):
        rows = min(rows_per_shard, sequences - start)
        rng = np.random.default_rng([seed, index])
        tokens, ranks = _shard_rows(rng, rows, seq_len, support, vocab_size)
        target = np.zeros((rows, seq_len), dtype=np.float32)  # position L - 1 is masked on write
        chain = teacher_topk(np.zeros(1, np.int64), vocab_size, support)[1][0]
        target[:, :-1] = chain[ranks[:, 1:]]
        if kind == "top_k":
            ids, logprobs = teacher_topk(tokens, vocab_size, top_k)
        else:
            ids, logprobs = _sampled_targets(rng, tokens, top_k, vocab_size)
        batch = CacheBatch(
            seq_ids=np.arange(start, start + rows), input_ids=tokens, topk_ids=ids,
            topk_logprobs=logprobs, target_logprobs=target, score=all_scores[start:start + rows],
            doc_starts=[np.zeros(1, np.int32)] * rows if doc_starts is None else
            [np.asarray(d, np.int32) for d in doc_starts[start:start + rows]], target_kind=kind)
        manifest.shards.append(write_shard(location, index, [encode_batch(batch)],
                                           rows_per_shard))
    manifest.totals = {"sequences": sequences, "tokens": sequences * seq_len,
                       "bytes": sum(s.bytes for s in manifest.shards)}
    manifest.complete = complete
    publish_manifest(location, manifest, all_scores)
    return manifest
