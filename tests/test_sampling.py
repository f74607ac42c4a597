"""teacher_cache.sampling: the draws follow the teacher, are a pure function of (seed, sequence,
position, logits), and come back in the documented layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from teacher_cache import sampling
from teacher_cache.format import Targets, counts_to_logprobs
from teacher_cache.sampling import sample_targets, uniforms

# Goodness of fit: a false alarm rate of 1e-6 per check (the seed is fixed, so a pass is stable).
ALPHA = 1e-6
Z_ALPHA = 4.753  # upper 1e-6 quantile of the standard normal


def chi_square_threshold(df: int) -> float:
    """Upper ALPHA quantile of chi-square(df), Wilson-Hilferty approximation."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + Z_ALPHA * math.sqrt(c)) ** 3


def tv_threshold(vocab: int, draws: int) -> float:
    """With probability >= 1 - ALPHA the empirical distribution of `draws` samples lies within
    this total variation of the truth: TV = max over the 2^V subsets A of |P_n(A) - P(A)|,
    Hoeffding per subset plus a union bound."""
    return math.sqrt((vocab * math.log(2) + math.log(1 / ALPHA)) / (2 * draws))


def empirical_counts(logits: torch.Tensor, rows: int, k: int, temperature: float) -> np.ndarray:
    """Per-token totals of rows * k draws from one row of logits, repeated at many positions."""
    batch = logits.expand(rows, -1)
    ids, counts = sample_targets(batch, seed=7, sequence_ids=torch.full((rows,), 3),
                                 positions=torch.arange(rows), k=k, temperature=temperature)
    return np.bincount(ids.long().flatten().numpy(), weights=counts.flatten().numpy(),
                       minlength=logits.shape[-1])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_frequencies_match_the_teacher(temperature: float) -> None:
    vocab, rows, k = 24, 2000, 64
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 2.5
    observed = empirical_counts(logits, rows, k, temperature)
    draws = rows * k
    assert observed.sum() == draws
    p = torch.softmax(logits.double() / temperature, -1).numpy()

    chi2 = ((observed - draws * p) ** 2 / (draws * p)).sum()
    assert chi2 < chi_square_threshold(vocab - 1)
    tv = 0.5 * np.abs(observed / draws - p).sum()
    assert tv < tv_threshold(vocab, draws)
    # The checks have power: the other temperature's distribution fails both.
    wrong = torch.softmax(logits.double() / (3.0 - temperature), -1).numpy()
    assert ((observed - draws * wrong) ** 2 / (draws * wrong)).sum() > chi_square_threshold(
        vocab - 1)
    assert 0.5 * np.abs(observed / draws - wrong).sum() > tv_threshold(vocab, draws)


def test_zero_mass_tokens_are_never_drawn() -> None:
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(1))
    banned = torch.zeros(30, dtype=torch.bool)
    banned[[0, 5, 6, 29]] = True  # the first and last ids are the CDF's edge cases
    logits[:, banned] = float("-inf")
    ids, counts = sample_targets(logits.expand(200, 8, 30).reshape(-1, 30), 0,
                                 torch.arange(1600), torch.zeros(1600, dtype=torch.int64), 32)
    drawn = ids[counts > 0].long()
    assert not banned[drawn].any()


def test_one_certain_token_takes_every_draw() -> None:
    logits = torch.full((3, 10), -1e4)
    logits[torch.arange(3), torch.tensor([0, 4, 9])] = 0.0
    ids, counts = sample_targets(logits, 5, torch.arange(3), torch.arange(3), 8)
    assert ids[:, 0].tolist() == [0, 4, 9]
    assert counts[:, 0].tolist() == [8, 8, 8]
    assert not counts[:, 1:].any() and not ids[:, 1:].any()


def random_batch(n: int = 40, vocab: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 2
    sequence_ids = torch.randint(0, 1000, (n,), generator=g)
    positions = torch.randint(0, 512, (n,), generator=g)
    return logits, sequence_ids, positions


def test_same_inputs_same_draws_and_seed_changes_them() -> None:
    logits, seqs, pos = random_batch()
    first = sample_targets(logits, 11, seqs, pos, 8)
    again = sample_targets(logits.clone(), 11, seqs.clone(), pos.clone(), 8)
    other_seed = sample_targets(logits, 12, seqs, pos, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other_seed[0])
    # Sequence id and position each enter the hash.
    assert not torch.equal(first[0], sample_targets(logits, 11, seqs + 1, pos, 8)[0])
    assert not torch.equal(first[0], sample_targets(logits, 11, seqs, pos + 1, 8)[0])


def test_a_rows_draws_do_not_depend_on_the_rest_of_the_batch(monkeypatch) -> None:
    logits, seqs, pos = random_batch()
    ids, counts = sample_targets(logits, 3, seqs, pos, 12)

    order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(2))
    p_ids, p_counts = sample_targets(logits[order], 3, seqs[order], pos[order], 12)
    assert torch.equal(p_ids, ids[order]) and torch.equal(p_counts, counts[order])

    subset = order[:7]
    s_ids, s_counts = sample_targets(logits[subset], 3, seqs[subset], pos[subset], 12)
    assert torch.equal(s_ids, ids[subset]) and torch.equal(s_counts, counts[subset])

    one_ids, _ = sample_targets(logits[5:6], 3, seqs[5:6], pos[5:6], 12)
    assert torch.equal(one_ids, ids[5:6])

    # Chunks of 3 rows (not dividing 40) instead of one chunk.
    monkeypatch.setattr(sampling, "DRAW_SCRATCH_BYTES", 3 * 12 * logits.shape[1])
    c_ids, c_counts = sample_targets(logits, 3, seqs, pos, 12)
    assert torch.equal(c_ids, ids) and torch.equal(c_counts, counts)


def test_uniforms_are_splitmix64_of_the_counters() -> None:
    mask = (1 << 64) - 1

    def splitmix64(x: int) -> int:
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    assert splitmix64(0) == 0xE220A8397B1DCDAF  # the published first output from state 0
    seed, seq, pos = 2**63 + 12345, 2**40 + 7, 511  # a seed above int64's range wraps
    u = uniforms(seed, torch.tensor([seq]), torch.tensor([pos]), 5)
    for j in range(5):
        h = splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ seq) ^ pos) ^ j)
        assert u[0, j].item() == (h >> 11) * 2.0**-53
    many = uniforms(0, torch.arange(1000), torch.zeros(1000, dtype=torch.int64), 100)
    assert many.dtype == torch.float64 and 0 <= many.min() and many.max() < 1
    assert abs(many.mean().item() - 0.5) < 0.005  # 1e5 uniforms: sd of the mean 0.0009


@pytest.mark.parametrize("k", [1, 4, 8, 12, 255])
def test_layout_counts_sum_to_k_sorted_padded(k: int) -> None:
    logits, seqs, pos = random_batch(vocab=50)
    ids, counts = sample_targets(logits, 0, seqs, pos, k)
    assert ids.dtype == torch.int32 and counts.dtype == torch.uint8
    assert ids.shape == counts.shape == (len(logits), k)
    c = counts.long()
    assert (c.sum(-1) == k).all()
    used = c > 0
    # Used slots first, counts non-increasing, ties ordered by id, ids distinct.
    assert (used[:, 1:] <= used[:, :-1]).all()
    assert (c[:, 1:] <= c[:, :-1]).all()
    tie = used[:, 1:] & (c[:, 1:] == c[:, :-1])
    assert (ids[:, 1:][tie] > ids[:, :-1][tie]).all()
    for row_ids, row_used in zip(ids, used, strict=True):
        assert len(set(row_ids[row_used].tolist())) == int(row_used.sum())
    assert not ids[~used].any()


def test_counts_to_logprobs_pads_with_minus_inf() -> None:
    logits, seqs, pos = random_batch(vocab=50)
    _, counts = sample_targets(logits, 0, seqs, pos, 8)
    logprobs = counts_to_logprobs(counts.numpy(), 8)
    assert logprobs.dtype == np.float32 and logprobs.shape == counts.shape
    used = counts.numpy() > 0
    assert (~used).any(), "the batch should have unused slots"
    assert np.isneginf(logprobs[~used]).all()
    np.testing.assert_allclose(logprobs[used], np.log(counts.numpy()[used] / 8.0), rtol=1e-6)
    np.testing.assert_allclose(np.exp(logprobs.astype(np.float64)).sum(-1), 1.0, rtol=1e-6)


def test_bf16_logits_sample_their_float32_values() -> None:
    logits, seqs, pos = random_batch()
    half = logits.to(torch.bfloat16)
    ids, counts = sample_targets(half, 9, seqs, pos, 8, temperature=2.0)
    ref_ids, ref_counts = sample_targets(half.float(), 9, seqs, pos, 8, temperature=2.0)
    assert torch.equal(ids, ref_ids) and torch.equal(counts, ref_counts)
    assert (counts.long().sum(-1) == 8).all()


def test_empty_batch() -> None:
    ids, counts = sample_targets(torch.zeros(0, 10), 0, torch.zeros(0, dtype=torch.int64),
                                 torch.zeros(0, dtype=torch.int64), 4)
    assert ids.shape == counts.shape == (0, 4)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"k": 0}, "k must be"),
    ({"k": 256}, "k must be"),
    ({"temperature": 0.0}, "temperature must be"),
    ({"positions": torch.zeros(3, dtype=torch.int64)}, "positions must have shape"),
    ({"logits": torch.zeros(4, 2, 10)}, "logits must be"),
    ({"logits": torch.zeros(4, 10, dtype=torch.int64)}, "logits must be"),
])
def test_bad_arguments_say_which(kwargs: dict, message: str) -> None:
    args = {"logits": torch.zeros(4, 10), "seed": 0, "sequence_ids": torch.arange(4),
            "positions": torch.arange(4), "k": 8, "temperature": 1.0} | kwargs
    with pytest.raises(ValueError, match=message):
        sample_targets(**args)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_packed_sampling_returns_the_true_tokens_logprob(temperature: float) -> None:
    """The builder's `target_logprobs`: the true next token's logprob at T = 1 (its logsumexp from
    the sampler's own pass there) against a float64 oracle, NaN at the last position; the draws
    are `sample_targets`'."""
    logits, _, _ = random_batch(n=3 * 5, vocab=70)
    packed = logits.view(3, 5, 70).to(torch.bfloat16)
    input_ids = torch.randint(0, 70, (3, 5), generator=torch.Generator().manual_seed(1))
    targets = Targets.parse("sample:6", temperature=temperature, seed=4)
    seq_ids = np.array([8, 2, 5])
    ids, counts, logsumexp = sampling.sample_packed(packed, seq_ids, targets)
    target = sampling.true_token_logprobs(packed, input_ids, logsumexp)
    want = packed.double().log_softmax(-1)[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(target[:, :-1].double(), want, rtol=0, atol=2e-6)
    assert target[:, -1].isnan().all()
    flat_ids, flat_counts = sample_targets(packed.flatten(0, 1), 4,
                                           torch.tensor(seq_ids).repeat_interleave(5),
                                           torch.arange(5).repeat(3), 6, temperature)
    assert torch.equal(ids.flatten(0, 1), flat_ids) and torch.equal(counts.flatten(0, 1),
                                                                     flat_counts)
