"""Tokenize documents and pack them into fixed-length sequences.

Each document is followed by EOS; the token stream is cut into `seq_len` pieces with no padding.
`doc_starts` lists the offsets inside a sequence where a document begins. The final partial sequence
is dropped (counted in `Packer.dropped_tokens`) unless `max_tokens` stopped the packing first.

Packing is linear in the stream's length: the documents that complete a sequence are joined once
into a block, the block is cut into all its whole sequences at once (views of it), and only the
remainder, shorter than a sequence, is carried into the next block. A document of any length is
thus copied once, not once per sequence it spans.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

TOKENIZE_BATCH_DOCS = 64
# The most characters one tokenizer call gets (about twice this at most): a longer document is
# tokenized in pieces, so that memory stays bounded and a capped build stops inside it.
TOKENIZE_CHUNK_CHARS = 1 << 20


@dataclass
class PackedSequence:
    seq_id: int
    input_ids: np.ndarray  # int32 [seq_len]
    doc_starts: list[int]


def tokenize_documents(tokenizer, documents: Iterable[str], eos_token_id: int,
                       batch_docs: int = TOKENIZE_BATCH_DOCS,
                       chunk_chars: int | None = None) -> Iterator[tuple[list[int], bool]]:
    """(token ids, whether the document ends there) of each document's pieces in order, EOS after
    its last, tokenized in batches by a fast tokenizer. A document longer than `chunk_chars`
    (default TOKENIZE_CHUNK_CHARS) is cut into pieces of at most that many characters, after a
    newline where the piece's second half has one; a batch holds at most `batch_docs` pieces and
    stops growing at `chunk_chars` characters. Where a cut falls the tokens may differ from those
    of the whole text (a token is not merged across it); they depend on the text alone."""
    size = chunk_chars or TOKENIZE_CHUNK_CHARS
    pieces = (piece for text in documents for piece in _pieces(text, size))
    while batch := _batch(pieces, batch_docs, size):
        encoded = tokenizer([text for text, _ in batch], add_special_tokens=False)["input_ids"]
        for ids, (_, last) in zip(encoded, batch, strict=True):
            yield ([*ids, eos_token_id] if last else ids), last


def _pieces(text: str, size: int) -> Iterator[tuple[str, bool]]:
    """`text` in pieces of at most `size` characters, each with whether it is the last."""
    start = 0
    while len(text) - start > size:
        stop = text.rfind("\n", start + size // 2, start + size) + 1 or start + size
        yield text[start:stop], False
        start = stop
    yield text[start:], True


def _batch(pieces: Iterator[tuple[str, bool]], most: int, chars: int) -> list[tuple[str, bool]]:
    batch, filled = [], 0
    while len(batch) < most and filled < chars and (piece := next(pieces, None)) is not None:
        batch.append(piece)
        filled += len(piece[0])
    return batch


def max_sequences(seq_len: int, max_tokens: int | None) -> int | None:
    """The most sequences `max_tokens` allows (None: no cap)."""
    return None if max_tokens is None else max_tokens // seq_len


def stream_cut(stream_tokens: int, seq_len: int,
               most_sequences: int | None) -> tuple[int, int, bool]:
    """(sequences, dropped_tokens, capped) of a whole stream of `stream_tokens`, as a Packer
    counts them: the cap counts as reached when the stream fills it exactly, and then nothing is
    dropped."""
    sequences = stream_tokens // seq_len
    if most_sequences is not None and sequences >= most_sequences:
        return most_sequences, 0, True
    return sequences, stream_tokens - sequences * seq_len, False


def cut_sequences(tokens: np.ndarray, doc_starts: np.ndarray, first_seq_id: int,
                  seq_len: int) -> list[PackedSequence]:
    """The whole sequences of a block of the stream that begins at a sequence boundary: sequence
    `first_seq_id + r` holds `tokens[r * seq_len:(r + 1) * seq_len]` (a view). `doc_starts`: the
    sorted offsets in `tokens` where a document begins (those past the last whole sequence are
    ignored)."""
    rows = len(tokens) // seq_len
    ids = np.asarray(tokens[:rows * seq_len], dtype=np.int32).reshape(rows, seq_len)
    starts = np.asarray(doc_starts, dtype=np.int64)
    bounds = np.searchsorted(starts, np.arange(rows + 1, dtype=np.int64) * seq_len)
    return [PackedSequence(first_seq_id + r, ids[r],
                           (starts[bounds[r]:bounds[r + 1]] - r * seq_len).tolist())
            for r in range(rows)]


class Packer:
    """Packs token documents into sequences; iterate it once."""

    def __init__(self, documents: Iterable[list[int]], seq_len: int, max_tokens: int | None = None):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if max_tokens is not None and max_tokens < seq_len:
            raise ValueError(f"max_tokens {max_tokens} is less than one sequence of {seq_len}")
        self.documents = documents
        self.seq_len = seq_len
        self.max_sequences = max_sequences(seq_len, max_tokens)
        self.dropped_tokens = 0  # tokens of the final partial sequence, known once exhausted
        self.capped = False  # whether max_tokens stopped the packing before the corpus ended
        self.documents_packed = 0  # documents that begin inside the packed sequences

    def __iter__(self) -> Iterator[PackedSequence]:
        pending: list[np.ndarray] = []  # the carried remainder, then the documents after it
        pending_tokens = 0
        starts: list[int] = []  # offsets of document starts inside the pending tokens
        seq_id = 0
        for doc in self.documents:
            starts.append(pending_tokens)
            pending.append(np.asarray(doc, dtype=np.int32))
            pending_tokens += len(pending[-1])
            if pending_tokens < self.seq_len:
                continue
            block = np.concatenate(pending)
            rows = pending_tokens // self.seq_len
            if self.max_sequences is not None:
                rows = min(rows, self.max_sequences - seq_id)
            for sequence in cut_sequences(block[:rows * self.seq_len], starts, seq_id,
                                          self.seq_len):
                self.documents_packed += len(sequence.doc_starts)
                yield sequence
            seq_id += rows
            if seq_id == self.max_sequences:
                self.capped = True
                return
            used = rows * self.seq_len
            pending, pending_tokens = [block[used:]], pending_tokens - used
            starts = [s - used for s in starts if s >= used]
        self.dropped_tokens = pending_tokens
