"""From cache shards to training batches: held-out split, sharded and shuffled streams, resume.

The training rows are read as `parts x slots` streams (docs/data-stream.md). Epoch `e`
orders the shards by a permutation drawn from `(seed, e)` and lays their training rows end to end;
stream `s = p * slots + q` takes the `s`-th of `parts * slots` equal spans of that sequence, so it
reads only the shards of its span (about `1 / (parts * slots)` of the cache), and shuffles its
span within a window of rows (each row moves ahead by a uniform offset in `[0, window)`), so its
reader holds at most `window` rows plus one shard at a time.

Global micro-batch `b` is `parts` pieces of `G / parts` rows; piece `p` is the next rows of stream
`(p, b % slots)`. Rank `r` of `W` (W divides `parts`) builds the pieces `[r, r + 1) * parts / W`,
so the ranks' union is the single-process batch for any such `W`; DataLoader worker `w` of `n`
(n divides `slots`) builds the micro-batches `b` with `(b - start) % n == w`, which the DataLoader
yields round-robin, and reads only the streams of those slots. The order is a function of (seed,
parts, slots, shuffle window) alone, each stream passes every row of its span once per epoch, and
the whole stream state is the number of micro-batches consumed, which checkpoints store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kernels import IGNORE_INDEX
from student_train.quantity import SIZE_UNITS, parse_quantity
from student_train.selection import Selection
from teacher_cache.errors import CacheError, ConfigError, UserError, one_line
from teacher_cache.format import CacheBatch, Manifest, ShardInfo
from teacher_cache.reader import TeacherCache, open_cache

# Changes whenever a checkpoint's stream position would mean other rows: 2 = sharded streams.
DATA_ORDER = 2

_SPLITMIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def seq_id_hash(seq_ids: np.ndarray) -> np.ndarray:
    """uint64 splitmix64 of each seq_id: a fixed, well-mixed hash, vectorised."""
    x = np.asarray(seq_ids, dtype=np.int64).astype(np.uint64) + np.uint64(_SPLITMIX[0])
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_SPLITMIX[1])
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_SPLITMIX[2])
    return x ^ (x >> np.uint64(31))


def is_held_out(seq_ids: np.ndarray, fraction: float, max_rows: int | None = None) -> np.ndarray:
    """True for the sequences of the held-out split: a hash of the seq_id below `fraction`, and of
    those at most `max_rows`, the ones with the smallest hashes."""
    hashes = seq_id_hash(seq_ids)
    held = hashes < np.uint64(min(int(fraction * 2**64), 2**64 - 1))
    if max_rows is not None and held.sum() > max_rows:
        if max_rows == 0:
            return np.zeros(len(hashes), dtype=bool)
        held &= hashes <= np.partition(hashes[held], max_rows - 1)[max_rows - 1]
    return held


@dataclass(frozen=True)
class RowSplit:
    train: np.ndarray  # sorted seq_ids the student trains on (after selection)
    val: np.ndarray  # sorted held-out seq_ids, never trained on


def split_rows(cache: TeacherCache, val_fraction: float, selection: Selection, seed: int,
               val_max_rows: int | None = None) -> RowSplit:
    """From the cache's row index (seq_id and score of every row): no shard is read."""
    index = cache.read_index()
    held_out = is_held_out(index.seq_ids, val_fraction, val_max_rows)
    train = selection.apply(index.seq_ids[~held_out], index.scores[~held_out], seed)
    if len(train) == 0:
        raise ConfigError(f"{cache.location.uri}: no training rows left ({len(index)} rows, "
                          f"{int(held_out.sum())} held out, selection {selection})")
    return RowSplit(train=train, val=np.sort(index.seq_ids[held_out]))


@dataclass
class Batch:
    seq_ids: torch.Tensor  # int64 [B]
    input_ids: torch.Tensor  # int64 [B, L]
    labels: torch.Tensor  # int64 [B, L]: the next token; IGNORE_INDEX at L - 1
    topk_ids: torch.Tensor  # int64 [B, L, k]: the teacher's targets for the next token
    # float32 [B, L, k]: their logprobs (topk:K) or log draw frequencies (sample:K; -inf: unused)
    topk_logprobs: torch.Tensor
    position_ids: torch.Tensor  # int64 [B, L]: each token's offset in its document (row_positions)

    def positions(self, doc_mask: bool) -> torch.Tensor | None:
        """The position ids the student takes: restarting at each document with --doc-mask, else
        None (each row one sequence)."""
        return self.position_ids if doc_mask else None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self._tensors()))

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        return Batch(*(t.pin_memory() for t in self._tensors()))

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


def row_positions(doc_starts: list[np.ndarray], seq_len: int) -> np.ndarray:
    """int64 [B, L]: each token's offset from the last document start at or before it, or from
    the row's start (a row's first tokens may continue a document begun in the row before)."""
    starts = np.zeros((len(doc_starts), seq_len), dtype=bool)
    starts[:, 0] = True
    for row, offsets in enumerate(doc_starts):
        starts[row, offsets] = True
    positions = np.arange(seq_len)
    return positions - np.maximum.accumulate(np.where(starts, positions, 0), axis=1)


def make_batch(rows: list[CacheBatch]) -> Batch:
    """One training batch from cache rows (each a CacheBatch of one or more rows)."""

    def stack(name: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([getattr(r, name) for r in rows]))

    input_ids = stack("input_ids")
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    position_ids = row_positions([d for r in rows for d in r.doc_starts], input_ids.shape[1])
    return Batch(seq_ids=stack("seq_ids"), input_ids=input_ids, labels=labels,
                 topk_ids=stack("topk_ids"), topk_logprobs=stack("topk_logprobs"),
                 position_ids=torch.from_numpy(position_ids))


def shard_of(shards: list[ShardInfo], seq_ids: np.ndarray) -> np.ndarray:
    """The index into `shards` holding each seq_id (shard i holds a contiguous id range)."""
    firsts = np.array([s.first_seq_id for s in shards], dtype=np.int64)
    ends = firsts + np.array([s.rows for s in shards], dtype=np.int64)
    where = np.searchsorted(firsts, seq_ids, side="right") - 1
    outside = (where < 0) | (seq_ids >= ends[np.maximum(where, 0)])
    if outside.any():
        raise CacheError(f"seq_id {int(seq_ids[outside][0])} is in no shard of the manifest")
    return where




def decoded_row_bytes(manifest: Manifest) -> int:
    """Memory of one decoded row (CacheBatch: int64 ids, float32 logprobs)."""
    return manifest.seq_len * (8 + manifest.top_k * 12 + 4) + 8


def window_rows(spec: str, row_bytes: int) -> int:
    """The shuffle window of `--shuffle-buffer`: a size (`256MB`: that many bytes of decoded rows)
    or a number of rows (`1000`); at least 1."""
    quantity = parse_quantity(spec, SIZE_UNITS)
    if quantity is None:
        raise ConfigError(f"--shuffle-buffer {spec!r}: expected a size such as 256MB or 2GB, or "
                          f"a number of rows")
    value, unit = quantity
    if not unit:
        if value < 1:
            raise ConfigError(f"--shuffle-buffer {spec!r}: at least 1 row")
        return int(value)
    rows = value * SIZE_UNITS[unit] / row_bytes
    if rows < 1:
        raise ConfigError(f"--shuffle-buffer {spec!r} holds less than one row of "
                          f"{row_bytes:,} bytes; give at least {row_bytes // 2**10 + 1}KB")
    return int(rows)


@dataclass(frozen=True)
class StreamLayout:
    """How the training rows are cut into streams (the module docstring)."""

    parts: int  # pieces of every global micro-batch, one stream each
    slots: int  # streams per piece, taking turns by micro-batch
    global_batch: int

    def __post_init__(self) -> None:
        if self.global_batch % self.parts:
            raise ConfigError(f"--batch-size {self.global_batch} is not divisible by the "
                              f"{self.parts} data parts (--data-parts, default the number of "
                              f"ranks)")

    @property
    def streams(self) -> int:
        return self.parts * self.slots

    @property
    def piece(self) -> int:
        return self.global_batch // self.parts

    def check_consumers(self, world_size: int, workers: int) -> None:
        if self.parts % world_size:
            raise ConfigError(f"{world_size} ranks do not divide the {self.parts} data parts of "
                              f"this run (--data-parts); use a divisor of {self.parts} ranks")
        if self.slots % max(workers, 1):
            raise ConfigError(f"--workers {workers} does not divide the {self.slots} data slots "
                              f"of this run (--data-slots); use a divisor of {self.slots}")

    def span(self, stream: int, rows: int) -> tuple[int, int]:
        """The rows `[start, end)` of an epoch's sequence that `stream` reads."""
        return stream * rows // self.streams, (stream + 1) * rows // self.streams

    def rows_before(self, slot: int, batch: int) -> int:
        """Rows a stream of `slot` has handed out before global micro-batch `batch`."""
        return max(0, -(-(batch - slot) // self.slots)) * self.piece


class EpochRows:
    """The training rows in shard order: which rows an epoch's span holds, in O(shards + span)."""

    def __init__(self, shards: list[ShardInfo], train_ids: np.ndarray):
        self.train_ids = np.sort(train_ids, kind="stable")
        position = shard_of(shards, self.train_ids)
        self.num_shards = len(shards)
        self.starts = np.searchsorted(position, np.arange(self.num_shards + 1))

    def __len__(self) -> int:
        return len(self.train_ids)

    def shard_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(self.num_shards)

    def span(self, order: np.ndarray, start: int, end: int) -> np.ndarray:
        """seq_ids at positions `[start, end)` of the rows laid out in shard `order`."""
        counts = np.diff(self.starts)[order]
        ends = np.cumsum(counts)
        first, last = np.searchsorted(ends, [start, end], side="right")
        pieces, offset = [], 0 if first == 0 else int(ends[first - 1])
        for shard in order[first:min(last + 1, len(order))].tolist():
            rows = self.train_ids[self.starts[shard]:self.starts[shard + 1]]
            lo, hi = max(start - offset, 0), min(end - offset, len(rows))
            if lo < hi:
                pieces.append(rows[lo:hi])
            offset += len(rows)
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)


def window_shuffle(rows: np.ndarray, window: int, rng: np.random.Generator) -> np.ndarray:
    """Each row moves ahead by a uniform offset in `[0, window)` positions: row `i` is emitted
    after every row `j < i - window`, so a reader in input order holds at most `window` rows it
    has read but not emitted (mosaic streaming's py1e shuffle, within one stream)."""
    keys = np.arange(len(rows)) + rng.uniform(0, window, len(rows))
    return rows[np.argsort(keys, kind="stable")]


def stream_plan(rows: EpochRows, layout: StreamLayout, stream: int, seed: int, epoch: int,
                window: int) -> np.ndarray:
    """The seq_ids stream `stream` hands out in `epoch`, in order."""
    start, end = layout.span(stream, len(rows))
    span = rows.span(rows.shard_order(seed, epoch), start, end)
    return window_shuffle(span, window, np.random.default_rng([seed, epoch, stream]))


class ShardRows:
    """Hands out the rows `wanted` (in that order), reading each shard once, when its first row is
    due, and letting it go after its last: at most the rows between those two stay in memory."""

    def __init__(self, cache: TeacherCache, wanted: np.ndarray):
        self.cache = cache
        self.position = shard_of(cache.shards, wanted)
        self.left = np.bincount(self.position, minlength=len(cache.shards))
        self.open: dict[int, CacheBatch] = {}

    def take(self, at: int, seq_id: int) -> CacheBatch:
        """Row `seq_id`, the `at`-th of `wanted`."""
        shard = int(self.position[at])
        if shard not in self.open:
            self.open[shard] = self.cache.read_shard(shard)
        rows = self.open[shard]
        row = seq_id - self.cache.shards[shard].first_seq_id
        if not 0 <= row < len(rows) or rows.seq_ids[row] != seq_id:
            raise CacheError(f"{self.cache.location.uri}: seq_id {seq_id} is missing from the "
                             f"shard the manifest puts it in")
        self.left[shard] -= 1
        if not self.left[shard]:
            del self.open[shard]
        return rows.take(slice(row, row + 1))

    def skip(self, count: int) -> None:
        """The first `count` wanted rows were handed out before (a resume): never read them."""
        np.subtract.at(self.left, self.position[:count], 1)


class _Stream:
    """One stream's endless sequence of rows (`plan(epoch)`, each `length` rows), epoch after
    epoch, from its `consumed`-th row."""

    def __init__(self, cache: TeacherCache, plan: Callable[[int], np.ndarray], length: int,
                 consumed: int):
        self.cache, self.plan, self.length = cache, plan, length
        self.epoch, self.offset = divmod(consumed, length)
        self._open_epoch()

    def _open_epoch(self) -> None:
        self.order = self.plan(self.epoch)
        self.source = ShardRows(self.cache, self.order)
        self.source.skip(self.offset)

    def take(self, count: int) -> list[CacheBatch]:
        out = []
        for _ in range(count):
            if self.offset == self.length:
                self.epoch, self.offset = self.epoch + 1, 0
                self._open_epoch()
            out.append(self.source.take(self.offset, int(self.order[self.offset])))
            self.offset += 1
        return out


class TrainStream(IterableDataset):
    """Rank `rank`'s micro-batches of the endless training stream, from micro-batch `start_batch`.

    Use with `DataLoader(stream, batch_size=None, num_workers=n)`, n dividing `slots`.
    """

    def __init__(self, cache_path: str, train_ids: np.ndarray, *, global_batch: int, rank: int,
                 world_size: int, seed: int, shuffle_buffer: str | int, start_batch: int = 0,
                 parts: int | None = None, slots: int = 1):
        self.layout = StreamLayout(parts or world_size, slots, global_batch)
        self.layout.check_consumers(world_size, 0)
        self.cache_path = cache_path
        self.train_ids = np.sort(train_ids, kind="stable")
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.start_batch = start_batch

    def parts_of_rank(self) -> range:
        per_rank = self.layout.parts // self.world_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def __iter__(self) -> Iterator[Batch | WorkerFailure]:
        info = get_worker_info()
        if info is None:
            yield from self.batches(0, 1)
            return
        try:
            yield from self.batches(info.id, info.num_workers)
        except UserError as e:  # its one line, as data: the DataLoader would re-raise a traceback
            yield WorkerFailure(one_line(e))

    def batches(self, worker: int, workers: int) -> Iterator[Batch]:
        """The micro-batches DataLoader worker `worker` of `workers` builds."""
        layout = self.layout
        layout.check_consumers(self.world_size, workers)
        cache = open_cache(self.cache_path)
        rows = EpochRows(cache.shards, self.train_ids)
        window = window_rows(self.shuffle_buffer, decoded_row_bytes(cache.manifest))
        streams: dict[int, _Stream] = {}

        def stream(part: int, slot: int) -> _Stream:
            s = part * layout.slots + slot
            if s not in streams:
                start, end = layout.span(s, len(rows))
                if start == end:
                    raise ConfigError(f"{cache.location.uri}: fewer training rows ({len(rows)}) "
                                      f"than the {layout.streams} data streams; use fewer "
                                      f"--data-parts, --data-slots or ranks")
                streams[s] = _Stream(
                    cache, lambda epoch: stream_plan(rows, layout, s, self.seed, epoch, window),
                    end - start, layout.rows_before(slot, batch))
            return streams[s]

        batch = self.start_batch + worker
        while True:
            slot = batch % layout.slots
            yield make_batch([row for part in self.parts_of_rank()
                              for row in stream(part, slot).take(layout.piece)])
            batch += workers


@dataclass(frozen=True)
class WorkerFailure:
    """A user error in a DataLoader worker (a corrupt shard, say), sent as a batch would be."""

    message: str


def raise_worker_failures(batches: Iterator[Batch | WorkerFailure]) -> Iterator[Batch]:
    """The batches of a DataLoader over a TrainStream; a worker's user error is raised here, in
    the main process, as the one-line CacheError it was."""
    for batch in batches:
        if isinstance(batch, WorkerFailure):
            raise CacheError(batch.message)
        yield batch


def stream_position(micro_batches: int, global_batch: int, num_rows: int,
                    layout: StreamLayout) -> dict[str, int]:
    """Where the stream stands after `micro_batches`, as stored in checkpoints (`epoch` counts the
    rows handed out over all streams; each stream keeps its own epochs)."""
    consumed = micro_batches * global_batch
    return {"micro_batches": micro_batches, "rows_consumed": consumed,
            "epoch": consumed // num_rows, "epoch_offset": consumed % num_rows,
            "order": DATA_ORDER, "parts": layout.parts, "slots": layout.slots}


def eval_batches(cache: TeacherCache, val_ids: np.ndarray, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[Batch]:
    """This rank's share of the held-out rows, in seq_id order; each shard holding one is read
    once."""
    mine = np.sort(val_ids)[rank::world_size]
    source = ShardRows(cache, mine)
    for start in range(0, len(mine), batch_size):
        yield make_batch([source.take(i, int(mine[i]))
                          for i in range(start, min(start + batch_size, len(mine)))])
