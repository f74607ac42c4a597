from __future__ import annotations

import numpy as np
import pytest

from teacher_cache.packing import (
    PackedSequence,
    Packer,
    max_sequences,
    stream_cut,
    tokenize_documents,
)

EOS = 0


class OldPacker:
    """The oracle: the packer before it was made linear (its buffer was re-sliced per sequence,
    quadratic in a document's length); benchmarks/bench_scale_build.py times it too."""

    def __init__(self, documents, seq_len: int, max_tokens: int | None = None):
        self.documents, self.seq_len = documents, seq_len
        self.max_sequences = None if max_tokens is None else max_tokens // seq_len
        self.dropped_tokens, self.capped, self.documents_packed = 0, False, 0

    def __iter__(self):
        buffer, starts, seq_id = [], [], 0
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


def assert_packs_as_before(documents: list[list[int]], seq_len: int,
                           max_tokens: int | None = None) -> None:
    new, old = Packer(documents, seq_len, max_tokens), OldPacker(documents, seq_len, max_tokens)
    got = [(s.seq_id, s.input_ids.tolist(), s.doc_starts) for s in new]
    assert got == [(s.seq_id, s.input_ids.tolist(), s.doc_starts) for s in old]
    assert (new.dropped_tokens, new.capped, new.documents_packed) == (
        old.dropped_tokens, old.capped, old.documents_packed)
    assert stream_cut(sum(map(len, documents)), seq_len, max_sequences(seq_len, max_tokens)) == (
        len(got), old.dropped_tokens, old.capped)


def docs(*lengths: int, start: int = 1) -> list[list[int]]:
    """Documents of distinct token ids, each ending with EOS."""
    out, token = [], start
    for n in lengths:
        out.append([*range(token, token + n - 1), EOS])
        token += n - 1
    return out


def test_packs_stream_into_fixed_sequences_with_doc_starts():
    documents = docs(3, 6, 2, 5)  # 16 tokens: starts at 0, 3, 9, 11
    packer = Packer(documents, seq_len=4)
    sequences = list(packer)
    stream = np.concatenate(documents)
    assert [s.seq_id for s in sequences] == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.concatenate([s.input_ids for s in sequences]), stream)
    assert [s.doc_starts for s in sequences] == [[0, 3], [], [1, 3], []]
    assert all(s.input_ids.dtype == np.int32 for s in sequences)
    assert packer.documents_packed == 4


def test_drops_the_final_partial_sequence():
    packer = Packer(docs(5, 4), seq_len=4)
    sequences = list(packer)
    assert len(sequences) == 2
    assert packer.dropped_tokens == 1
    assert not packer.capped


def test_document_starting_exactly_at_a_sequence_boundary():
    sequences = list(Packer(docs(4, 4), seq_len=4))
    assert [s.doc_starts for s in sequences] == [[0], [0]]


def test_long_document_spans_several_sequences():
    sequences = list(Packer(docs(2, 11, 3), seq_len=4))
    assert [s.doc_starts for s in sequences] == [[0, 2], [], [], [1]]


def test_max_tokens_caps_the_number_of_sequences():
    packer = Packer(docs(10, 10, 10), seq_len=4, max_tokens=9)
    assert len(list(packer)) == 2
    assert packer.capped


def test_rejects_max_tokens_below_one_sequence():
    with pytest.raises(ValueError, match="less than one sequence"):
        Packer(docs(10), seq_len=8, max_tokens=7)


def test_tokenize_documents_appends_eos_to_each(smollm2_tokenizer):
    texts = ["hello world", "def f():\n    return 1\n", "x"]
    eos = smollm2_tokenizer.eos_token_id
    tokenized = list(tokenize_documents(smollm2_tokenizer, texts, eos, batch_docs=2))
    assert len(tokenized) == 3
    for text, (ids, last) in zip(texts, tokenized, strict=True):
        assert last and ids[-1] == eos
        assert smollm2_tokenizer.decode(ids[:-1]) == text


def test_a_long_document_is_tokenized_in_bounded_pieces(smollm2_tokenizer):
    text = "".join(f"line {i} of a long document\n" for i in range(400)) + "x" * 3000
    calls = []

    def tokenizer(batch, **kwargs):
        calls.append(sum(map(len, batch)))
        return smollm2_tokenizer(batch, **kwargs)

    eos = smollm2_tokenizer.eos_token_id
    pieces = list(tokenize_documents(tokenizer, [text, "end"], eos, chunk_chars=1000))
    assert max(calls) < 2 * 1000 and len(pieces) > len(text) // 1000
    assert [last for _, last in pieces] == [False] * (len(pieces) - 2) + [True, True]
    ids = [i for piece, _ in pieces[:-1] for i in piece]
    assert ids[-1] == eos and smollm2_tokenizer.decode(ids[:-1]) == text


def test_a_long_document_packs_as_before():
    assert_packs_as_before(docs(3, 20_000, 5), seq_len=16)
    assert_packs_as_before(docs(20_000), seq_len=7, max_tokens=10_000)


def test_many_short_documents_pack_as_before():
    assert_packs_as_before(docs(*[1 + i % 5 for i in range(3_000)]), seq_len=16)
    assert_packs_as_before(docs(*[1 + i % 5 for i in range(3_000)]), seq_len=16, max_tokens=480)


@pytest.mark.parametrize("seed", range(6))
def test_random_documents_and_caps_pack_as_before(seed: int):
    rng = np.random.default_rng(seed)
    lengths = rng.choice([1, 2, 3, 8, 31, 64, 500], size=int(rng.integers(1, 60))).tolist()
    seq_len = int(rng.integers(2, 70))
    total = sum(lengths)
    for max_tokens in (None, seq_len, total - total % seq_len or seq_len, total + seq_len):
        assert_packs_as_before(docs(*lengths), seq_len, max_tokens)


def test_empty_documents_pack_as_before():
    assert_packs_as_before([[], [1, 2, 3], [], [], [4, 5, 6, 7, 8], []], seq_len=4)
