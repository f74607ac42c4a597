"""From cache shards to training batches: held-out split, shuffled stream, rank/worker sharding.

The training data is one endless stream of rows, epoch after epoch. Epoch `e` visits the shards in
an order drawn from `(seed, e)` and passes their rows through a shuffle buffer driven by the same
generator. The order depends only on row ids, never on data, so it is computed up front: global
position `g` of the stream is row `g % N` of epoch `g // N`'s order (N training rows).

Global micro-batch `b` is positions `[b * G, (b + 1) * G)`. Rank `r` of `W` takes every `W`-th of
them (`G / W` rows), so the union over ranks is the single-process batch for any `W`; data loader
worker `w` of `n` builds the micro-batches `b` with `(b - start) % n == w`, which the DataLoader
yields round-robin, so the rank's sequence of batches is independent of `n`. The whole stream state
is the number of micro-batches consumed, which checkpoints store.

Each consumer reads the shards of an epoch in that epoch's order, keeps only the rows it will emit
(the rows waiting in its share of the shuffle buffer) and reads each shard at most once per epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from student_train.config import ConfigError
from student_train.selection import Selection
from teacher_cache.format import CacheBatch, CacheError, ShardInfo
from teacher_cache.reader import TeacherCache, open_cache

IGNORE_INDEX = -100


def is_held_out(seq_ids: np.ndarray, fraction: float) -> np.ndarray:
    """True for the sequences of the held-out split: a hash of the seq_id below `fraction`."""
    threshold = int(fraction * 2**64)
    return np.array([
        int.from_bytes(hashlib.blake2b(int(i).to_bytes(8, "little"), digest_size=8).digest(),
                       "little") < threshold
        for i in seq_ids], dtype=bool)


@dataclass(frozen=True)
class RowSplit:
    train: np.ndarray  # sorted seq_ids the student trains on (after selection)
    val: np.ndarray  # sorted held-out seq_ids, never trained on


def split_rows(cache: TeacherCache, val_fraction: float, selection: Selection,
               seed: int) -> RowSplit:
    """Reads (seq_id, score) of every row once; this also verifies every shard's checksum."""
    seq_ids, scores = cache.read_scores()
    held_out = is_held_out(seq_ids, val_fraction)
    train = selection.apply(seq_ids[~held_out], scores[~held_out], seed)
    if len(train) == 0:
        raise ConfigError(f"{cache.location.uri}: no training rows left ({len(seq_ids)} rows, "
                          f"{int(held_out.sum())} held out, selection {selection})")
    return RowSplit(train=train, val=np.sort(seq_ids[held_out]))


@dataclass
class Batch:
    seq_ids: torch.Tensor  # int64 [B]
    input_ids: torch.Tensor  # int64 [B, L]
    labels: torch.Tensor  # int64 [B, L]: the next token; IGNORE_INDEX at L - 1
    topk_ids: torch.Tensor  # int64 [B, L, k]: teacher top-k for the next token
    topk_logprobs: torch.Tensor  # float32 [B, L, k]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self._tensors()))

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        return Batch(*(t.pin_memory() for t in self._tensors()))

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


def make_batch(rows: list[CacheBatch]) -> Batch:
    """One training batch from cache rows (each a CacheBatch of one or more rows)."""

    def stack(name: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([getattr(r, name) for r in rows]))

    input_ids = stack("input_ids")
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return Batch(seq_ids=stack("seq_ids"), input_ids=input_ids, labels=labels,
                 topk_ids=stack("topk_ids"), topk_logprobs=stack("topk_logprobs"))


def shard_of(shards: list[ShardInfo], seq_ids: np.ndarray) -> np.ndarray:
    """The index into `shards` holding each seq_id (shard i holds a contiguous id range)."""
    firsts = np.array([s.first_seq_id for s in shards], dtype=np.int64)
    ends = firsts + np.array([s.rows for s in shards], dtype=np.int64)
    where = np.searchsorted(firsts, seq_ids, side="right") - 1
    outside = (where < 0) | (seq_ids >= ends[np.maximum(where, 0)])
    if outside.any():
        raise CacheError(f"seq_id {int(seq_ids[outside][0])} is in no shard of the manifest")
    return where


@dataclass(frozen=True)
class EpochPlan:
    shard_order: np.ndarray  # indices into the manifest's shards, in reading order
    rows: np.ndarray  # seq_ids in the order the shuffle buffer emits them


def plan_epoch(train_ids: np.ndarray, shard_index: np.ndarray, num_shards: int, seed: int,
               epoch: int, buffer_size: int) -> EpochPlan:
    """Shuffle the shard order, then stream rows through a shuffle buffer of `buffer_size`."""
    rng = np.random.default_rng([seed, epoch])
    shard_order = rng.permutation(num_shards)
    position = np.empty(num_shards, dtype=np.int64)
    position[shard_order] = np.arange(num_shards)
    incoming = train_ids[np.lexsort((train_ids, position[shard_index]))]
    draws = rng.integers(0, buffer_size, size=max(len(incoming) - buffer_size, 0))
    buffer = list(incoming[:buffer_size])
    emitted = []
    for slot, seq_id in zip(draws, incoming[buffer_size:], strict=True):
        emitted.append(buffer[slot])
        buffer[slot] = seq_id
    emitted.extend(rng.permutation(np.array(buffer, dtype=np.int64)))
    return EpochPlan(shard_order=shard_order, rows=np.array(emitted, dtype=np.int64))


class ShardRows:
    """Hands out the rows `wanted` (one-row CacheBatches), reading shards in `shard_order`, each
    at most once."""

    def __init__(self, cache: TeacherCache, shard_order: np.ndarray, wanted: np.ndarray):
        self.cache = cache
        self.wanted = set(wanted.tolist())
        holding = set(shard_of(cache.shards, wanted).tolist())
        self.pending = [int(s) for s in shard_order if s in holding]
        self.stash: dict[int, CacheBatch] = {}

    def take(self, seq_id: int) -> CacheBatch:
        while seq_id not in self.stash:
            if not self.pending:
                raise CacheError(f"{self.cache.location.uri}: seq_id {seq_id} is missing from "
                                 f"the shard the manifest puts it in")
            self._read(self.pending.pop(0))
        return self.stash.pop(seq_id)

    def _read(self, shard: int) -> None:
        rows = self.cache.read_shard(shard)
        for i, seq_id in enumerate(rows.seq_ids.tolist()):
            if seq_id in self.wanted:
                self.stash[seq_id] = rows.take([i])  # a copy: the shard's arrays can go


class TrainStream(IterableDataset):
    """Rank `rank`'s micro-batches of the endless training stream, from micro-batch `start_batch`.

    Use with `DataLoader(stream, batch_size=None, num_workers=n)`.
    """

    def __init__(self, cache_path: str, train_ids: np.ndarray, *, global_batch: int, rank: int,
                 world_size: int, seed: int, shuffle_buffer: int, start_batch: int = 0):
        if global_batch % world_size:
            raise ConfigError(f"--batch-size {global_batch} is not divisible by the "
                              f"{world_size} ranks")
        self.cache_path = cache_path
        self.train_ids = np.sort(train_ids)
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.start_batch = start_batch

    def positions(self, batch: int) -> np.ndarray:
        """Global stream positions of this rank's rows in micro-batch `batch`."""
        return batch * self.global_batch + self.rank + self.world_size * np.arange(
            self.global_batch // self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cache = open_cache(self.cache_path)
        shard_index = shard_of(cache.shards, self.train_ids)
        sources: dict[int, tuple[EpochPlan, ShardRows]] = {}
        n = len(self.train_ids)

        def open_epoch(epoch: int) -> tuple[EpochPlan, ShardRows]:
            plan = plan_epoch(self.train_ids, shard_index, len(cache.shards), self.seed, epoch,
                              self.shuffle_buffer)
            g = epoch * n + np.arange(n)
            batch = g // self.global_batch
            mine = ((g % self.world_size == self.rank) & (batch >= self.start_batch)
                    & ((batch - self.start_batch) % workers == worker))
            return plan, ShardRows(cache, plan.shard_order, plan.rows[mine])

        batch = self.start_batch + worker
        while True:
            positions = self.positions(batch)
            epochs = positions // n
            for stale in [e for e in sources if e < epochs[0]]:
                del sources[stale]
            rows = []
            for epoch, offset in zip(epochs.tolist(), (positions % n).tolist(), strict=True):
                if epoch not in sources:
                    sources[epoch] = open_epoch(epoch)
                plan, source = sources[epoch]
                rows.append(source.take(int(plan.rows[offset])))
            yield make_batch(rows)
            batch += workers


def stream_position(micro_batches: int, global_batch: int, num_rows: int) -> dict[str, int]:
    """Where the stream stands after `micro_batches`, as stored in checkpoints."""
    consumed = micro_batches * global_batch
    return {"micro_batches": micro_batches, "rows_consumed": consumed,
            "epoch": consumed // num_rows, "epoch_offset": consumed % num_rows}


def eval_batches(cache: TeacherCache, val_ids: np.ndarray, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[Batch]:
    """This rank's share of the held-out rows, in seq_id order."""
    mine = np.sort(val_ids)[rank::world_size]
    if len(mine) == 0:
        return
    source = ShardRows(cache, np.arange(len(cache.shards)), mine)
    for start in range(0, len(mine), batch_size):
        yield make_batch([source.take(int(i)) for i in mine[start:start + batch_size]])
