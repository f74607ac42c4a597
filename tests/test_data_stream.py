"""The training stream: coverage per epoch across ranks and workers, resume, held-out split."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import synthetic_cache
from torch.utils.data import DataLoader

from student_train.data import (
    IGNORE_INDEX,
    TrainStream,
    eval_batches,
    is_held_out,
    plan_epoch,
    shard_of,
    split_rows,
)
from student_train.selection import Selection
from teacher_cache.reader import open_cache

SEQUENCES, SEQ_LEN, TOP_K, VOCAB, ROWS_PER_SHARD = 50, 8, 3, 64, 7
CACHE = dict(sequences=SEQUENCES, seq_len=SEQ_LEN, top_k=TOP_K, vocab_size=VOCAB,
             rows_per_shard=ROWS_PER_SHARD, seed=1)
GLOBAL_BATCH = 6  # divisible by 1, 2 and 3 ranks


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("cache"), **CACHE).location.uri


@pytest.fixture(scope="module")
def split(cache_dir):
    return split_rows(open_cache(cache_dir), 0.2, Selection(), seed=0)


def rank_batches(cache_dir, train_ids, rank, world_size, count, start_batch=0, workers=0,
                 shuffle_buffer=10):
    stream = TrainStream(cache_dir, train_ids, global_batch=GLOBAL_BATCH, rank=rank,
                         world_size=world_size, seed=3, shuffle_buffer=shuffle_buffer,
                         start_batch=start_batch)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return list(itertools.islice(loader, count))


def global_stream(cache_dir, train_ids, world_size, micro_batches):
    """Reassemble the global row order from every rank's batches."""
    order = np.full(micro_batches * GLOBAL_BATCH, -1)
    for rank in range(world_size):
        stream = TrainStream(cache_dir, train_ids, global_batch=GLOBAL_BATCH, rank=rank,
                             world_size=world_size, seed=3, shuffle_buffer=10)
        for b, batch in enumerate(rank_batches(cache_dir, train_ids, rank, world_size,
                                               micro_batches)):
            order[stream.positions(b)] = batch.seq_ids.numpy()
    return order


def test_held_out_split_is_a_stable_hash_of_the_seq_id(split):
    ids = np.arange(20000)
    held = is_held_out(ids, 0.2)
    assert abs(held.mean() - 0.2) < 0.01
    np.testing.assert_array_equal(held[:SEQUENCES], np.isin(np.arange(SEQUENCES), split.val))
    assert not (is_held_out(ids, 0.1) & ~held).any(), "a larger fraction only adds rows"
    assert not is_held_out(ids, 0.0).any()
    assert set(split.train).isdisjoint(split.val)
    assert sorted([*split.train, *split.val]) == list(range(SEQUENCES))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_training_row_once_per_epoch_and_same_stream_for_any_world_size(
        cache_dir, split, world_size):
    n = len(split.train)
    micro_batches = -(-3 * n // GLOBAL_BATCH)  # three epochs and a bit
    order = global_stream(cache_dir, split.train, world_size, micro_batches)
    for epoch in range(3):
        seen = order[epoch * n:(epoch + 1) * n]
        assert sorted(seen) == sorted(split.train), f"epoch {epoch}"
    assert not np.array_equal(order[:n], order[n:2 * n]), "epochs must be reshuffled"
    # The stream is the epochs' plans end to end, whatever the number of ranks.
    train_ids = np.sort(split.train)
    shards = shard_of(open_cache(cache_dir).shards, train_ids)
    plans = [plan_epoch(train_ids, shards, -(-SEQUENCES // ROWS_PER_SHARD), seed=3, epoch=e,
                        buffer_size=10).rows for e in range(-(-len(order) // n))]
    np.testing.assert_array_equal(order, np.concatenate(plans)[:len(order)])


def test_workers_do_not_change_a_ranks_batches(cache_dir, split):
    single = rank_batches(cache_dir, split.train, rank=1, world_size=2, count=9)
    pooled = rank_batches(cache_dir, split.train, rank=1, world_size=2, count=9, workers=2)
    assert [b.seq_ids.tolist() for b in single] == [b.seq_ids.tolist() for b in pooled]
    for a, b in zip(single, pooled, strict=True):
        assert torch.equal(a.topk_logprobs, b.topk_logprobs)


@pytest.mark.parametrize("start", [3, 7, 13])  # mid-epoch and across an epoch boundary
def test_resume_from_any_micro_batch_continues_the_same_order(cache_dir, split, start):
    full = rank_batches(cache_dir, split.train, rank=0, world_size=2, count=start + 6)
    resumed = rank_batches(cache_dir, split.train, rank=0, world_size=2, count=6,
                           start_batch=start, workers=2)
    for a, b in zip(full[start:], resumed, strict=True):
        assert torch.equal(a.seq_ids, b.seq_ids)
        assert torch.equal(a.input_ids, b.input_ids)


def test_batches_hold_the_cached_rows_with_shifted_labels(cache_dir, split):
    cache = open_cache(cache_dir)
    cached = {int(seq_id): (rows, i) for rows in cache for i, seq_id in enumerate(rows.seq_ids)}
    batch = rank_batches(cache_dir, split.train, rank=0, world_size=1, count=1)[0]
    for j, seq_id in enumerate(batch.seq_ids.tolist()):
        rows, i = cached[seq_id]
        np.testing.assert_array_equal(batch.input_ids[j], rows.input_ids[i])
        np.testing.assert_array_equal(batch.topk_ids[j], rows.topk_ids[i])
        np.testing.assert_array_equal(batch.topk_logprobs[j], rows.topk_logprobs[i])
    assert torch.equal(batch.labels[:, :-1], batch.input_ids[:, 1:])
    assert (batch.labels[:, -1] == IGNORE_INDEX).all()
    assert batch.input_ids.dtype == batch.labels.dtype == batch.topk_ids.dtype == torch.int64
    assert batch.topk_logprobs.dtype == torch.float32


def test_held_out_rows_never_reach_training_and_eval_reads_all_of_them(cache_dir, split):
    streamed = np.concatenate([b.seq_ids.numpy() for b in rank_batches(
        cache_dir, split.train, rank=0, world_size=1, count=20)])
    assert np.isin(streamed, split.val).sum() == 0
    cache = open_cache(cache_dir)
    per_rank = [np.concatenate([b.seq_ids.numpy() for b in
                                eval_batches(cache, split.val, 4, rank, 3)]) for rank in range(3)]
    assert sorted(np.concatenate(per_rank)) == sorted(split.val)


def test_plan_reads_shards_in_a_seeded_order_through_the_buffer(split):
    cache_shards = np.arange(SEQUENCES) // ROWS_PER_SHARD
    ids = split.train
    no_buffer = plan_epoch(ids, cache_shards[ids], 8, seed=3, epoch=0, buffer_size=1)
    shard_sequence = cache_shards[no_buffer.rows]
    assert list(dict.fromkeys(shard_sequence)) == [s for s in no_buffer.shard_order
                                                    if s in set(shard_sequence)]
    assert all(np.all(np.diff(no_buffer.rows[shard_sequence == s]) > 0) for s in range(8))
    shuffled = plan_epoch(ids, cache_shards[ids], 8, seed=3, epoch=0, buffer_size=10)
    assert sorted(shuffled.rows) == sorted(ids)
    assert not np.array_equal(shuffled.rows, no_buffer.rows)
    again = plan_epoch(ids, cache_shards[ids], 8, seed=3, epoch=0, buffer_size=10)
    np.testing.assert_array_equal(shuffled.rows, again.rows)


def test_shard_of_maps_ids_to_their_shard(cache_dir):
    cache = open_cache(cache_dir)
    np.testing.assert_array_equal(shard_of(cache.shards, np.arange(SEQUENCES)),
                                  np.arange(SEQUENCES) // ROWS_PER_SHARD)


def test_streams_from_an_fsspec_url(cache_dir, split):
    url = "memory://distill-test/cache"
    assert np.array_equal(split_rows(synthetic_cache(url, **CACHE), 0.2, Selection(), seed=0).train,
                          split.train)
    local = rank_batches(cache_dir, split.train, rank=0, world_size=1, count=3)
    remote = rank_batches(url, split.train, rank=0, world_size=1, count=3)
    for a, b in zip(local, remote, strict=True):
        assert torch.equal(a.seq_ids, b.seq_ids) and torch.equal(a.topk_ids, b.topk_ids)
