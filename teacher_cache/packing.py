"""Tokenize documents and pack them into fixed-length sequences.

Each document is followed by EOS; the token stream is cut into `seq_len` pieces with no padding.
`doc_starts` lists the offsets inside a sequence where a document begins. The final partial sequence
is dropped (counted in `Packer.dropped_tokens`) unless `max_tokens` stopped the packing first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np

TOKENIZE_BATCH_DOCS = 64


@dataclass
class PackedSequence:
    seq_id: int
    input_ids: np.ndarray  # int32 [seq_len]
    doc_starts: list[int]


def tokenize_documents(tokenizer, documents: Iterable[str], eos_token_id: int,
                       batch_docs: int = TOKENIZE_BATCH_DOCS) -> Iterator[list[int]]:
    """Token ids of each document followed by EOS, tokenized in batches by a fast tokenizer."""
    documents = iter(documents)
    while batch := list(islice(documents, batch_docs)):
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            yield [*ids, eos_token_id]


class Packer:
    """Packs token documents into sequences; iterate it once."""

    def __init__(self, documents: Iterable[list[int]], seq_len: int, max_tokens: int | None = None):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if max_tokens is not None and max_tokens < seq_len:
            raise ValueError(f"max_tokens {max_tokens} is less than one sequence of {seq_len}")
        self.documents = documents
        self.seq_len = seq_len
        self.max_sequences = None if max_tokens is None else max_tokens // seq_len
        self.dropped_tokens = 0  # tokens of the final partial sequence, known once exhausted
        self.capped = False  # whether max_tokens stopped the packing before the corpus ended
        self.documents_packed = 0  # documents that begin inside the packed sequences

    def __iter__(self) -> Iterator[PackedSequence]:
        buffer: list[int] = []
        starts: list[int] = []  # offsets of document starts inside `buffer`
        seq_id = 0
        for doc in self.documents:
            starts.append(len(buffer))
            buffer.extend(doc)
            while len(buffer) >= self.seq_len:
                doc_starts = [s for s in starts if s < self.seq_len]
                self.documents_packed += len(doc_starts)
                yield PackedSequence(seq_id, np.asarray(buffer[:self.seq_len], dtype=np.int32),
                                     doc_starts)
                seq_id += 1
                if seq_id == self.max_sequences:
                    self.capped = True
                    return
                buffer = buffer[self.seq_len:]
                starts = [s - self.seq_len for s in starts if s >= self.seq_len]
        self.dropped_tokens = len(buffer)
