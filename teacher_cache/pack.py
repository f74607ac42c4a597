"""The pack stage: the corpus tokenized once, split across the build workers, into fixed partitions.

    CACHE/packed/PLAN/part-PPPPP.arrow  partition P's tokens: Arrow IPC (zstd), one row per
                                        document, column `tokens` large_list<int32>, EOS last
    CACHE/packed/PLAN/part-PPPPP.json   its PartitionInfo (tokens, documents, skipped files,
                                        bytes, sha256), written after it: marks it packed

PLAN hashes what the files hold (corpus content, tokenizer, partition bounds), so a build reads only
files it would have written byte for byte itself. Partitions 0, 1, ... (corpus.py) concatenated are
the one global token stream that the build cuts into sequences (packing.py): shard `i` is sequences
`[i * R, (i + 1) * R)` of it, whatever the number of workers.

Worker `w` of `W` first packs the partitions `p` with `p % W == w` (under --max-tokens only those
that, by estimate, begin before the cap), then reads the token ranges of its shards from the files,
packing itself any partition that nobody has packed yet: the files are deterministic and written
atomically, so a duplicate is harmless and nobody waits. A kill loses at most the partition in
flight. Once the manifest is complete, `drop_packed_tokens` deletes the token files (~1.1
bytes/token of code with zstd, next to the cache's ~14) and keeps the markers: a rerun knows every
count and tokenizes only what a shard it has to rebuild needs.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from tqdm.auto import tqdm

from teacher_cache.corpus import Corpus, Partition
from teacher_cache.errors import CacheError
from teacher_cache.format import COMPRESSION, PACKED_DIR, partition_info_name, partition_name
from teacher_cache.packing import (
    PackedSequence,
    cut_sequences,
    max_sequences,
    stream_cut,
    tokenize_documents,
)
from teacher_cache.storage import Location

PACKED_VERSION = 2  # of the partition files; part of PLAN (2: long documents tokenized in pieces)
RECENT_PARTITIONS = 2  # kept in memory: a worker's consecutive shards often share a partition


@dataclass(frozen=True)
class PartitionInfo:
    index: int
    tokens: int
    documents: int
    skipped: list[str]  # files (or .jsonl byte ranges) skipped as not UTF-8
    bytes: int
    sha256: str
    # False: packing stopped once the cap had its tokens; `tokens` are the partition's first ones
    # and serve only builds with that cap (the build identity holds it)
    complete: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass(frozen=True)
class PackedPartition:
    tokens: np.ndarray  # int32: its documents, each followed by EOS
    starts: np.ndarray  # int64: where each document begins in `tokens`


@dataclass(frozen=True)
class StreamTotals:
    """What a WorkerReport says about the whole packed corpus."""

    sequences: int
    documents: int  # that begin inside the sequences
    dropped_tokens: int
    capped: bool
    skipped: list[str]


def encode_partition(part: PackedPartition) -> bytes:
    offsets = np.append(part.starts, len(part.tokens)).astype(np.int64)
    column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(part.tokens, pa.int32()))
    table = pa.table({"tokens": column})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema,
                         options=pa.ipc.IpcWriteOptions(compression=COMPRESSION)) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_partition(data: bytes) -> PackedPartition:
    column = pa.ipc.open_file(pa.BufferReader(data)).read_all().column("tokens").combine_chunks()
    offsets = column.offsets.to_numpy()
    return PackedPartition(np.asarray(column.flatten().to_numpy(), dtype=np.int32),
                           (offsets[:-1] - offsets[0]).astype(np.int64))


def plan_id(partitions: list[Partition], source: dict) -> str:
    """The name of a partitioning: `source` (corpus content, tokenizer) and every partition's
    bounds."""
    text = json.dumps({"version": PACKED_VERSION, "source": source,
                       "partitions": [p.key() for p in partitions]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PackedCorpus:
    """The corpus as packed partitions under CACHE/packed/PLAN/, cut into sequences of `seq_len`
    (at most max_tokens // seq_len). Partitions are read (or packed) lazily, in stream order, as
    far as a question needs. `known`: the totals an earlier run of this build reported, so that a
    rerun asks nothing of the partitions until a shard needs its tokens."""

    def __init__(self, location: Location, corpus: Corpus, partitions: list[Partition],
                 tokenizer, source: dict, seq_len: int, max_tokens: int | None,
                 known: StreamTotals | None = None):
        self.location = location
        self.corpus = corpus
        self.partitions = partitions
        self.tokenizer = tokenizer
        self.plan = plan_id(partitions, source)
        self.seq_len = seq_len
        self.most_sequences = max_sequences(seq_len, max_tokens)
        self.cap = None if self.most_sequences is None else self.most_sequences * seq_len
        self.known = known
        self.infos: list[PartitionInfo | None] = [None] * len(partitions)
        self.offsets = [0]  # stream offset of each partition known in order, and of the next
        self.recent: OrderedDict[int, PackedPartition] = OrderedDict()
        self.tokens_tokenized = self.partitions_tokenized = 0

    # --- the pack stage ---

    def pack(self, worker_index: int, num_workers: int, progress: bool = False) -> None:
        """Pack the partitions this worker owns that are not packed yet. Under a cap, the first
        one whose estimated start lies past the cap ends it (should the shards need it after all,
        it is packed when they do)."""
        own = self.partitions[worker_index::num_workers]
        with tqdm(total=len(own), unit="partition", disable=not progress, dynamic_ncols=True,
                  desc=f"packing (worker {worker_index}/{num_workers})") as bar:
            for partition in own:
                if self._marker(partition.index) is None:
                    if self.cap is not None and self._estimated_start(partition.index) >= self.cap:
                        return
                    self._pack(partition.index)
                bar.update()

    def _estimated_start(self, index: int) -> float:
        """The stream offset where partition `index` begins: exact when every partition before it
        is known (always so for a single worker), else the counts known plus, for the others,
        their size at the tokens per byte of those known."""
        counts = np.array([-1 if info is None else info.tokens for info in self.infos],
                          dtype=np.float64)
        sizes = np.array([p.size for p in self.partitions], dtype=np.float64)
        known, before = counts >= 0, slice(0, index)
        if known[before].all():
            return float(counts[before].sum())
        rate = counts[known].sum() / max(sizes[known].sum(), 1.0)
        return float(np.where(known[before], counts[before], sizes[before] * rate).sum())

    # --- sequences and totals ---

    def sequences_upto(self, count: int) -> int:
        """min(count, the corpus's sequences), reading partitions only as far as that takes."""
        if self.known is not None:
            return min(count, self.known.sequences)
        if self.most_sequences is not None:
            count = min(count, self.most_sequences)
        self._resolve(count * self.seq_len)
        return min(count, self.offsets[-1] // self.seq_len)

    def sequences(self, first: int, rows: int) -> list[PackedSequence]:
        """Sequences `first .. first + rows - 1`, which must exist (`sequences_upto`)."""
        start, stop = first * self.seq_len, (first + rows) * self.seq_len
        self._resolve(stop)
        tokens, starts = [], []
        index = bisect_right(self.offsets, start) - 1
        while index < len(self.offsets) - 1 and self.offsets[index] < stop:
            base = self.offsets[index]
            if self.infos[index].tokens:
                part = self._tokens(index)
                low, high = max(start - base, 0), min(stop - base, len(part.tokens))
                tokens.append(part.tokens[low:high])
                begins = part.starts[np.searchsorted(part.starts, low):
                                     np.searchsorted(part.starts, high)]
                starts.append(begins + (base - start))
            index += 1
        return cut_sequences(np.concatenate(tokens), np.concatenate(starts), first, self.seq_len)

    def totals(self) -> StreamTotals:
        if self.known is not None:
            return self.known
        self._resolve(self.cap)
        sequences, dropped, capped = stream_cut(self.offsets[-1], self.seq_len, self.most_sequences)
        cut, resolved = sequences * self.seq_len, len(self.offsets) - 1
        inside = bisect_right(self.offsets, cut) - 1  # the partition the cut falls in, if any
        documents = sum(self.infos[q].documents for q in range(min(inside, resolved)))
        if inside < resolved and cut > self.offsets[inside]:
            documents += int(np.searchsorted(self._tokens(inside).starts,
                                             cut - self.offsets[inside]))
        return StreamTotals(sequences, documents, dropped, capped,
                            [f for info in self.infos[:resolved] for f in info.skipped])

    # --- partitions ---

    def _resolve(self, until: int | None) -> None:
        """Learn the counts of partitions in order until they cover `until` tokens (None: all)."""
        while len(self.offsets) <= len(self.partitions) and (until is None
                                                             or self.offsets[-1] < until):
            index = len(self.offsets) - 1
            info = self._marker(index) or self._pack(index)
            if not info.complete and (until is None or self.offsets[-1] + info.tokens < until):
                raise CacheError(f"{self._uri(index, '.json')} holds the first {info.tokens} "
                                 f"tokens of its partition only, fewer than this build needs: "
                                 f"the packed files are not this build's; delete "
                                 f"{self.location.uri}/{PACKED_DIR} and rerun")
            self.offsets.append(self.offsets[-1] + info.tokens)

    def _marker(self, index: int) -> PartitionInfo | None:
        """The PartitionInfo of a packed partition, or None if nobody has packed it yet."""
        if self.infos[index] is None and self.location.exists(*self._path(index, ".json")):
            raw = self.location.read_bytes(*self._path(index, ".json"))
            try:
                self.infos[index] = PartitionInfo(**json.loads(raw))
            except (ValueError, TypeError):
                warnings.warn(f"{self._uri(index, '.json')}: not a partition marker; packing "
                              f"that partition again", stacklevel=2)
        return self.infos[index]

    def _tokens(self, index: int) -> PackedPartition:
        """A packed partition's tokens: from memory, its file, or packed again if that is gone
        (deleted with the complete cache) or damaged."""
        if index not in self.recent:
            info, path, data = self.infos[index], self._path(index, ".arrow"), None
            if self.location.exists(*path):
                data = self.location.read_bytes(*path)
            if data is not None and len(data) == info.bytes and hashlib.sha256(
                    data).hexdigest() == info.sha256:
                self._remember(index, decode_partition(data))
            else:
                if data is not None:
                    warnings.warn(f"{self._uri(index, '.arrow')}: checksum mismatch; packing "
                                  f"that partition again", stacklevel=2)
                self._pack(index)
        self.recent.move_to_end(index)
        return self.recent[index]

    def _pack(self, index: int) -> PartitionInfo:
        """Tokenize a partition and write it, then its marker. Under the cap, with the partition's
        start known, tokenizing stops once it holds the tokens the cap needs of it."""
        skipped: list[str] = []
        need = self._tokens_needed(index)
        pieces, lengths, tokens, begins, complete = [], [], 0, True, True
        for ids, last in tokenize_documents(
                self.tokenizer, self.corpus.partition_documents(self.partitions[index], skipped),
                self.tokenizer.eos_token_id):
            if begins:
                lengths.append(0)
            pieces.append(np.asarray(ids, dtype=np.int32))
            lengths[-1] += len(ids)
            tokens += len(ids)
            begins = last
            if need is not None and tokens >= need:
                complete = False  # perhaps the end after all: a partial marker is still right
                break
        lengths = np.array(lengths, dtype=np.int64)
        part = PackedPartition(np.concatenate(pieces) if pieces else np.zeros(0, np.int32),
                               np.cumsum(lengths) - lengths)
        data = encode_partition(part)
        info = PartitionInfo(index, tokens, len(lengths), skipped, len(data),
                             hashlib.sha256(data).hexdigest(), complete=complete)
        earlier = self.infos[index]
        if earlier is not None and (earlier.tokens, earlier.documents) != (info.tokens,
                                                                           info.documents):
            raise CacheError(f"{self._uri(index, '.json')} says {earlier.tokens} tokens, packing "
                             f"it again gives {info.tokens}: the packed files are not this "
                             f"build's; delete {self.location.uri}/{PACKED_DIR} and rerun")
        self.location.write_bytes_atomic(data, *self._path(index, ".arrow"))
        self.location.write_bytes_atomic(info.to_json().encode(), *self._path(index, ".json"))
        self.infos[index] = info
        self.tokens_tokenized += info.tokens
        self.partitions_tokenized += 1
        self._remember(index, part)
        return info

    def _tokens_needed(self, index: int) -> int | None:
        """How many tokens the cap takes from partition `index`, when the counts of all before it
        are known (always so in stream order); None: all of them."""
        if self.cap is None or any(info is None for info in self.infos[:index]):
            return None
        return self.cap - sum(info.tokens for info in self.infos[:index])

    def _remember(self, index: int, part: PackedPartition) -> None:
        self.recent[index] = part
        while len(self.recent) > RECENT_PARTITIONS:
            self.recent.popitem(last=False)

    def _path(self, index: int, suffix: str) -> tuple[str, str, str]:
        name = partition_name(index) if suffix == ".arrow" else partition_info_name(index)
        return PACKED_DIR, self.plan, name

    def _uri(self, index: int, suffix: str) -> str:
        return f"{self.location.uri.rstrip('/')}/{'/'.join(self._path(index, suffix))}"


def drop_packed_tokens(location: Location) -> None:
    """Delete the packed token files of a complete cache, keeping their markers."""
    selector = pafs.FileSelector(location.path(PACKED_DIR), recursive=True, allow_not_found=True)
    for info in location.fs.get_file_info(selector):
        if info.type == pafs.FileType.File and info.base_name.endswith(".arrow"):
            location.fs.delete_file(info.path)
