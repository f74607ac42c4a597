"""The training stream: streams over disjoint shard spans, coverage per epoch, resume, held-out."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import synthetic_cache
from torch.utils.data import DataLoader

from kernels import IGNORE_INDEX
from student_train.data import (
    EpochRows,
    StreamLayout,
    TrainStream,
    eval_batches,
    is_held_out,
    seq_id_hash,
    shard_of,
    split_rows,
    stream_plan,
    window_rows,
    window_shuffle,
)
from student_train.quantity import COUNT_UNITS, SIZE_UNITS, parse_quantity
from student_train.selection import Selection
from teacher_cache.errors import ConfigError
from teacher_cache.reader import TeacherCache, open_cache

SEQUENCES, SEQ_LEN, TOP_K, VOCAB, ROWS_PER_SHARD = 120, 8, 3, 64, 5
CACHE = dict(sequences=SEQUENCES, seq_len=SEQ_LEN, top_k=TOP_K, vocab_size=VOCAB,
             rows_per_shard=ROWS_PER_SHARD, seed=1)
GLOBAL_BATCH = 6  # divisible by 1, 2 and 3 ranks
WINDOW = "4"  # rows


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("cache"), **CACHE).location.uri


@pytest.fixture(scope="module")
def split(cache_dir):
    return split_rows(open_cache(cache_dir), 0.2, Selection(), seed=0)


def stream(cache_dir, train_ids, rank=0, world_size=1, start_batch=0, parts=None, slots=1):
    return TrainStream(cache_dir, train_ids, global_batch=GLOBAL_BATCH, rank=rank,
                       world_size=world_size, seed=3, shuffle_buffer=WINDOW,
                       start_batch=start_batch, parts=parts, slots=slots)


def rank_batches(cache_dir, train_ids, count, workers=0, **layout):
    loader = DataLoader(stream(cache_dir, train_ids, **layout), batch_size=None,
                        num_workers=workers)
    return list(itertools.islice(loader, count))


def seq_ids(batches) -> list[list[int]]:
    return [b.seq_ids.tolist() for b in batches]


class CountingReads:
    """Which shards `TeacherCache.read_shard` is asked for, per call."""

    def __init__(self, monkeypatch):
        self.shards: list[int] = []
        original = TeacherCache.read_shard

        def counted(cache, shard):
            self.shards.append(shard if isinstance(shard, int) else shard.index)
            return original(cache, shard)

        monkeypatch.setattr(TeacherCache, "read_shard", counted)


def test_held_out_split_is_a_stable_vectorised_hash_capped_by_rows(split):
    ids = np.arange(20000)
    held = is_held_out(ids, 0.2)
    assert abs(held.mean() - 0.2) < 0.01
    np.testing.assert_array_equal(held[:SEQUENCES], np.isin(np.arange(SEQUENCES), split.val))
    assert not (is_held_out(ids, 0.1) & ~held).any(), "a larger fraction only adds rows"
    assert not is_held_out(ids, 0.0).any()
    assert set(split.train).isdisjoint(split.val)
    assert sorted([*split.train, *split.val]) == list(range(SEQUENCES))
    capped = is_held_out(ids, 0.2, max_rows=100)
    assert capped.sum() == 100 and not (capped & ~held).any()
    # The cap keeps the smallest hashes: a larger cap only adds rows.
    assert not (capped & ~is_held_out(ids, 0.2, max_rows=200)).any()
    assert not is_held_out(ids, 0.2, max_rows=0).any()
    # The hash is splitmix64, a fixed function: these values must never change.
    assert seq_id_hash(np.array([0, 1]))[0] == np.uint64(0xE220A8397B1DCDAF)
    assert len(set(seq_id_hash(ids).tolist())) == len(ids)


@pytest.mark.parametrize("parts, slots", [(1, 1), (2, 1), (3, 2)])
def test_each_stream_reads_its_own_span_and_every_row_once_per_epoch(split, cache_dir, parts,
                                                                     slots):
    cache = open_cache(cache_dir)
    rows = EpochRows(cache.shards, split.train)
    layout = StreamLayout(parts, slots, GLOBAL_BATCH)
    for epoch in range(2):
        plans = [stream_plan(rows, layout, s, seed=3, epoch=epoch, window=4)
                 for s in range(layout.streams)]
        assert sorted(np.concatenate(plans).tolist()) == sorted(split.train.tolist())
        shard_sets = [set(shard_of(cache.shards, p).tolist()) for p in plans]
        # Adjacent spans share at most the shard on their boundary; others share none.
        for a, b in itertools.combinations(range(len(plans)), 2):
            assert len(shard_sets[a] & shard_sets[b]) <= (1 if b == a + 1 else 0)
        # A stream's shards are about 1/streams of them (plus the two boundary shards).
        num_shards = -(-SEQUENCES // ROWS_PER_SHARD)
        assert max(map(len, shard_sets)) <= num_shards / layout.streams + 2
    if layout.streams > 1:  # the shard order is drawn again: a stream reads other rows
        assert set(stream_plan(rows, layout, 0, seed=3, epoch=0, window=4)) != set(
            stream_plan(rows, layout, 0, seed=3, epoch=1, window=4))
    again = stream_plan(rows, layout, 0, seed=3, epoch=1, window=4)
    np.testing.assert_array_equal(again, stream_plan(rows, layout, 0, seed=3, epoch=1, window=4))
    assert not np.array_equal(again, stream_plan(rows, layout, 0, seed=3, epoch=0, window=4))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_read_disjoint_shards_and_together_make_the_single_process_batches(
        cache_dir, split, world_size, monkeypatch):
    """W ranks over 6 parts are the batches of one process over 6 parts; each rank reads only the
    shards of its parts, each once per epoch (counted)."""
    count = 3 * len(split.train) // GLOBAL_BATCH  # three epochs
    single = seq_ids(rank_batches(cache_dir, split.train, count, parts=6))
    reads, counter = [], CountingReads(monkeypatch)
    for rank in range(world_size):
        before = len(counter.shards)
        got = seq_ids(rank_batches(cache_dir, split.train, count, rank=rank,
                                   world_size=world_size, parts=6))
        per_rank = GLOBAL_BATCH // world_size
        assert got == [b[rank * per_rank:(rank + 1) * per_rank] for b in single]
        reads.append(counter.shards[before:])
    num_shards = -(-SEQUENCES // ROWS_PER_SHARD)
    for shards in reads:  # three epochs of the rank's 6 / W streams, a boundary shard each
        assert len(shards) <= 3 * (num_shards / world_size + 6 / world_size + 1)
    if world_size > 1:
        assert set(reads[0]) != set(reads[1])


def test_every_training_row_once_per_epoch(cache_dir, split):
    n = len(split.train)  # one stream: its epochs follow each other, whatever the batch size
    order = np.concatenate(seq_ids(rank_batches(cache_dir, split.train, -(-3 * n // GLOBAL_BATCH))))
    for epoch in range(3):
        assert sorted(order[epoch * n:(epoch + 1) * n]) == sorted(split.train), f"epoch {epoch}"
    assert not np.array_equal(order[:n], order[n:2 * n]), "epochs must be reshuffled"


def test_workers_do_not_change_a_ranks_batches_and_read_only_their_slots(cache_dir, split):
    single = rank_batches(cache_dir, split.train, 9, rank=1, world_size=2, slots=2)
    pooled = rank_batches(cache_dir, split.train, 9, workers=2, rank=1, world_size=2, slots=2)
    assert seq_ids(single) == seq_ids(pooled)
    for a, b in zip(single, pooled, strict=True):
        assert torch.equal(a.topk_logprobs, b.topk_logprobs)
    # Slot q serves the micro-batches b with b % 2 == q: two streams of disjoint rows per epoch.
    even = set(itertools.chain(*seq_ids(single)[0:4:2]))
    odd = set(itertools.chain(*seq_ids(single)[1:4:2]))
    assert even.isdisjoint(odd)


def test_workers_must_divide_the_slots(cache_dir, split):
    with pytest.raises(ConfigError, match="--workers 2 does not divide the 3 data slots"):
        StreamLayout(1, 3, GLOBAL_BATCH).check_consumers(1, 2)
    with pytest.raises(ConfigError, match="4 ranks do not divide the 6 data parts"):
        StreamLayout(6, 1, GLOBAL_BATCH).check_consumers(4, 0)
    with pytest.raises(ConfigError, match="--batch-size 6 is not divisible by the 4 data parts"):
        StreamLayout(4, 1, GLOBAL_BATCH)


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 0), (2, 2)])
@pytest.mark.parametrize("start", [3, 7, 26])  # mid-epoch, and past the first epoch
def test_resume_from_any_micro_batch_continues_the_same_order(cache_dir, split, start,
                                                              world_size, workers):
    layout = dict(world_size=world_size, parts=2, slots=2)
    full = rank_batches(cache_dir, split.train, start + 6, **layout)
    resumed = rank_batches(cache_dir, split.train, 6, workers=workers, start_batch=start,
                           **layout)
    for a, b in zip(full[start:], resumed, strict=True):
        assert torch.equal(a.seq_ids, b.seq_ids)
        assert torch.equal(a.input_ids, b.input_ids)


def test_resume_reads_no_shard_of_the_rows_already_consumed(cache_dir, split, monkeypatch):
    n = len(split.train)
    counter = CountingReads(monkeypatch)
    rank_batches(cache_dir, split.train, 1, start_batch=n // GLOBAL_BATCH - 1)  # last of epoch 0
    num_shards = -(-SEQUENCES // ROWS_PER_SHARD)
    assert len(counter.shards) < num_shards / 2


def test_window_shuffle_moves_each_row_less_than_the_window():
    rows = np.arange(1000)
    out = window_shuffle(rows, 50, np.random.default_rng(0))
    assert sorted(out) == list(rows)
    position = np.empty(1000, int)
    position[out] = np.arange(1000)
    assert (position - rows > -50).all() and (position - rows < 50).all()
    assert np.abs(position - rows).mean() > 5  # it does shuffle
    # Held rows: read in input order, each emitted after every row 50 before it.
    assert np.all(np.maximum.accumulate(out) - np.arange(1000) < 50)


def test_the_window_is_a_size_of_decoded_rows_or_a_number_of_rows():
    assert window_rows("256MB", 2**20) == 256
    assert window_rows("1.5 gb", 2**20) == 1536
    assert window_rows("1000", 2**20) == 1000
    with pytest.raises(ConfigError, match="expected a size such as 256MB"):
        window_rows("lots", 1)
    with pytest.raises(ConfigError, match="less than one row"):
        window_rows("1KB", 2**20)
    with pytest.raises(ConfigError, match="expected a size"):
        window_rows("30M", 2**20)  # a count's unit, not a size's


def test_quantities_take_only_their_own_units():
    assert parse_quantity("30M", COUNT_UNITS) == (30.0, "M")
    assert parse_quantity(" 0.5 k", COUNT_UNITS) == (0.5, "K")
    assert parse_quantity("12", COUNT_UNITS) == (12.0, "")
    assert parse_quantity("2GB", SIZE_UNITS) == (2.0, "GB")
    for text, units in (("30MB", COUNT_UNITS), ("30M", SIZE_UNITS), ("-1", COUNT_UNITS),
                        ("M", COUNT_UNITS), ("1e3", COUNT_UNITS)):
        assert parse_quantity(text, units) is None


def test_batches_hold_the_cached_rows_with_shifted_labels(cache_dir, split):
    cache = open_cache(cache_dir)
    cached = {int(seq_id): (rows, i) for rows in cache for i, seq_id in enumerate(rows.seq_ids)}
    batch = rank_batches(cache_dir, split.train, 1)[0]
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
    streamed = np.concatenate(seq_ids(rank_batches(cache_dir, split.train, 20)))
    assert np.isin(streamed, split.val).sum() == 0
    cache = open_cache(cache_dir)
    per_rank = [np.concatenate([b.seq_ids.numpy() for b in
                                eval_batches(cache, split.val, 4, rank, 3)]) for rank in range(3)]
    assert sorted(np.concatenate(per_rank)) == sorted(split.val)


def test_shard_of_maps_ids_to_their_shard(cache_dir):
    cache = open_cache(cache_dir)
    np.testing.assert_array_equal(shard_of(cache.shards, np.arange(SEQUENCES)),
                                  np.arange(SEQUENCES) // ROWS_PER_SHARD)


def test_streams_from_an_fsspec_url(cache_dir, split):
    url = "memory://distill-test/cache"
    assert np.array_equal(split_rows(synthetic_cache(url, **CACHE), 0.2, Selection(), seed=0).train,
                          split.train)
    local = rank_batches(cache_dir, split.train, 3)
    remote = rank_batches(url, split.train, 3)
    for a, b in zip(local, remote, strict=True):
        assert torch.equal(a.seq_ids, b.seq_ids) and torch.equal(a.topk_ids, b.topk_ids)
