"""Sampled teacher targets: K draws per position from the teacher's next-token distribution.

`sample_targets` draws K tokens with replacement from softmax(logits / T) for every row and
returns the distinct ids with their counts (sum K), sorted by count (descending, ties by id),
unused slots id 0 / count 0. `teacher_cache.format.counts_to_logprobs` turns counts into the
reader's teacher logprobs log(count / K), -inf for an unused slot: with `divergence="fkl"` at
temperature 1 the KD loss is then the cross-entropy to the sampled tokens (RS-KD), plus a constant.

Randomness is counter-based: draw j of a row is the uniform `u = hash(seed, sequence id,
position, j)` (splitmix64 chained over the four integers, top 53 bits, in [0, 1)), turned into a
token by inverse CDF: the smallest id whose running sum of exp(x / T - max) (summed in float64)
exceeds u times the row total. So a row's draws are a pure function of (seed, sequence id,
position, the row's logits), independent of batch size, row order, the other rows, workers,
reruns and resumes. Logits are read once per chunk of rows ([rows, V] float32 + float64 scratch
under DRAW_SCRATCH_BYTES); no [N, V] log-softmax is materialised. At T = 1 the same pass yields
each row's logsumexp (max + log of the exp-sum), which the builder needs for the true token's
logprob.

Why inverse CDF and not Gumbel-max (argmax over V of x / T + Gumbel(hash(..., j, v))): Gumbel-max
needs K * V hashes per position, inverse CDF one exp and one cumsum pass over V plus K binary
searches. Measured by benchmarks/bench_target_encoding.py (SmolLM2-135M in float32 on a shared
2-core CPU, 8k tokens): 433 s per 1k positions for Gumbel-max at K = 12 against 3.6 s per 1k
tokens for inverse CDF at K = 4..12 (the forward pass: 69 s; float32 log_softmax + top-64: 1.5 s).

The one caveat of the determinism: the draw depends on the row's logits bit for bit, and on
float rounding in exp and the cumsum. If the teacher's logits for a row differ in the last bit
(e.g. a GPU matmul choosing another kernel for another batch shape) or a backend rounds the
exp/cumsum differently, a draw whose uniform lies within that rounding (~1e-7 relative) of a
CDF boundary may pick the neighbouring token. Equal logits on one backend give equal draws.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from teacher_cache.format import MAX_K, Targets

# Scratch per chunk of rows: float32 exp + float64 cumsum, 12 bytes per logit.
DRAW_SCRATCH_BYTES = 64 * 1024 * 1024

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 torch stores it."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping multiply = unsigned arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def uniforms(seed: int, sequence_ids: Tensor, positions: Tensor, k: int) -> Tensor:
    """float64 [N, k] in [0, 1): u[n, j] = hash(seed, sequence_ids[n], positions[n], j)."""
    device = sequence_ids.device
    h = _splitmix64(torch.full((), _signed(seed), dtype=torch.int64, device=device))
    h = _splitmix64(h ^ sequence_ids.to(torch.int64))
    h = _splitmix64(h ^ positions.to(torch.int64))
    draws = torch.arange(k, dtype=torch.int64, device=device)
    h = _splitmix64(h[:, None] ^ draws)
    return _shift_right(h, 11).double() * 2.0 ** -53


def _draw(logits: Tensor, u: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Inverse-CDF draws [n, k] int64 from softmax(logits / T) for uniforms u [n, k], and the
    float32 logsumexp [n] of the logits at temperature 1, from the same pass when T = 1."""
    x = logits.float()
    peak = x.amax(-1, keepdim=True)
    logsumexp = None
    if temperature != 1.0:
        logsumexp = torch.logsumexp(x, -1)  # at T != 1 the T = 1 logsumexp needs its own pass
        x = x / temperature
        peak = peak / temperature  # division by T > 0 is monotone: this is max(x / T) exactly
    cdf = (x - peak).exp_().cumsum(-1, dtype=torch.float64)
    total = cdf[:, -1:]
    if logsumexp is None:
        logsumexp = (peak.double() + total.log()).squeeze(-1).float()
    # u < 1, but u * total may round up to total: keep the target strictly below the last entry
    # so the search lands on a token of nonzero mass (right=True skips zero-mass tokens).
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True), logsumexp


def _distinct_counts(draws: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Distinct ids and their counts per row, sorted by count (desc) then id; padding 0 / 0."""
    ordered = draws.sort(-1).values
    counts = (ordered[:, :, None] == ordered[:, None, :]).sum(-1)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    # ids < 2**32 and counts <= 255, so the key orders by count desc, then id; padding last.
    key = torch.where(first, -counts * (1 << 32) + ordered, torch.iinfo(torch.int64).max)
    key, order = key.sort(-1)
    used = key < 0
    ids = torch.where(used, ordered.gather(1, order), 0)
    counts = torch.where(used, counts.gather(1, order), 0)
    return ids.to(torch.int32), counts.to(torch.uint8)


def sample_rows(logits: Tensor, seed: int, sequence_ids: Tensor, positions: Tensor, k: int,
                temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """`sample_targets` plus the float32 logsumexp [N] of the logits at temperature 1 (from the
    sampler's own pass at T = 1), which a backend needs for the true token's logprob."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [N, V]; got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    n, vocab = logits.shape
    if sequence_ids.shape != (n,) or positions.shape != (n,):
        raise ValueError(f"sequence_ids and positions must have shape ({n},); got "
                         f"{tuple(sequence_ids.shape)} and {tuple(positions.shape)}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}] (counts are uint8); got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    u = uniforms(seed, sequence_ids.to(logits.device), positions.to(logits.device), k)
    rows = max(1, DRAW_SCRATCH_BYTES // (12 * vocab))
    chunks = [_draw(logits[start:start + rows], u[start:start + rows], temperature)
              for start in range(0, n, rows)]
    if not chunks:
        return *_distinct_counts(u.long(), k), u.new_zeros(0, dtype=torch.float32)
    draws, logsumexp = (torch.cat(parts) for parts in zip(*chunks, strict=True))
    return *_distinct_counts(draws, k), logsumexp


def sample_targets(logits: Tensor, seed: int, sequence_ids: Tensor, positions: Tensor, k: int,
                   temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """K draws with replacement per row of logits [N, V] (any float dtype, any device) from
    softmax(logits / temperature) computed in float32.

    sequence_ids, positions: int [N], with `seed` the whole source of randomness (see the module
    docstring). Returns (ids int32 [N, k], counts uint8 [N, k]) on the logits' device: distinct
    ids sorted by count (desc, ties by id), counts summing to k, unused slots id 0 and count 0.
    """
    ids, counts, _ = sample_rows(logits, seed, sequence_ids, positions, k, temperature)
    return ids, counts


def sample_packed(logits: Tensor, seq_ids: np.ndarray | None,
                  targets: Targets) -> tuple[Tensor, Tensor, Tensor]:
    """`sample_targets` for B packed sequences: logits [B, L, V] -> (ids int32 [B, L, k], counts
    uint8 [B, L, k], logsumexp float32 [B, L] of the logits at temperature 1, from the sampler's
    own pass at T = 1); position t of row r draws with (targets.seed, seq_ids[r], t)."""
    if seq_ids is None:
        raise ValueError("sampled targets need the sequence ids of the rows (predict's seq_ids)")
    b, seq_len, vocab = logits.shape
    seqs = torch.as_tensor(np.asarray(seq_ids, dtype=np.int64), device=logits.device)
    positions = torch.arange(seq_len, device=logits.device).repeat(b)
    ids, counts, logsumexp = sample_rows(logits.reshape(b * seq_len, vocab), targets.seed,
                                         seqs.repeat_interleave(seq_len), positions, targets.k,
                                         targets.temperature)
    return ids.view(b, seq_len, -1), counts.view(b, seq_len, -1), logsumexp.view(b, seq_len)


def token_logprobs(logits: Tensor, token_ids: Tensor, logsumexp: Tensor) -> Tensor:
    """float32 [...]: the logprob of token_ids [...] under logits [..., V] whose logsumexp [...] is
    given (`sample_rows`'s): the gathered logit minus it, with no log-softmax over V."""
    return logits.gather(-1, token_ids[..., None].long())[..., 0].float() - logsumexp


def true_token_logprobs(logits: Tensor, input_ids: Tensor, logsumexp: Tensor) -> Tensor:
    """float32 [B, L]: the logprob of input_ids[:, t + 1] under logits [B, L, V] with their
    logsumexp [B, L] (`sample_packed`'s); NaN at position L - 1, which has no next token."""
    target = torch.full_like(logsumexp, float("nan"))
    target[:, :-1] = token_logprobs(logits[:, :-1], input_ids[:, 1:], logsumexp[:, :-1])
    return target
