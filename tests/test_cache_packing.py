from __future__ import annotations

import numpy as np
import pytest

from teacher_cache.packing import Packer, tokenize_documents

EOS = 0


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
    for text, ids in zip(texts, tokenized, strict=True):
        assert ids[-1] == eos
        assert smollm2_tokenizer.decode(ids[:-1]) == text
