"""student_train.heldout: text outside the corpus, packed like the cache, and the student's CE on it
against a float64 oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from student_train.heldout import HeldoutText, load_heldout_text, text_ce
from student_train.presets import llama_config, resolve_preset
from teacher_cache import open_cache
from teacher_cache.corpus import package_sources
from teacher_cache.errors import ConfigError, CorpusError
from tests.helpers import TINY


def test_package_sources_are_its_py_files_without_tests_sorted() -> None:
    files = package_sources("json")
    root = files[0].parent
    assert [f.relative_to(root).as_posix() for f in files] == sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*.py") if "tests" not in p.parts)
    assert files[0].name == "__init__.py"
    with pytest.raises(CorpusError, match="not an installed package"):
        package_sources("no_such_package_here")


def test_heldout_text_is_packed_like_the_cache(tiny_cache: Path, tiny_teacher_dir: Path) -> None:
    cache = open_cache(tiny_cache)
    seq_len = cache.manifest.seq_len
    text = load_heldout_text(cache, "json", 3 * seq_len)
    assert text.input_ids.shape == (3, seq_len) and text.input_ids.dtype == torch.int64
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    first = package_sources("json")[0].read_text(encoding="utf-8")
    want = tokenizer(first, add_special_tokens=False)["input_ids"][:3 * seq_len]
    assert len(want) == 3 * seq_len, "json/__init__.py should fill the three sequences"
    assert text.input_ids.flatten().tolist() == want
    assert "json .py sources" in text.description and f"{3 * seq_len:,} tokens" in text.description
    with pytest.raises(ConfigError, match="less than one sequence"):
        load_heldout_text(cache, "json", seq_len - 1)


def test_heldout_positions_restart_at_each_source_file(tiny_cache: Path,
                                                        tiny_teacher_dir: Path) -> None:
    cache = open_cache(tiny_cache)
    seq_len = cache.manifest.seq_len
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    lengths = [len(tokenizer(f.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
               + 1 for f in package_sources("json")]  # + EOS
    text = load_heldout_text(cache, "json", sum(lengths))
    starts = np.cumsum([0, *lengths[:-1]])
    at = np.arange(text.position_ids.numel())
    in_document = at - starts[np.searchsorted(starts, at, side="right") - 1]
    # A row that continues a document counts from the row's start.
    want = np.minimum(in_document, at % seq_len).reshape(-1, seq_len)
    assert (want[:, 1:] == 0).any(), "a boundary inside a row"
    assert text.position_ids.tolist() == want.tolist()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_text_ce_matches_a_float64_oracle(batch_size: int, monkeypatch) -> None:
    preset = resolve_preset("xs", dict(TINY))
    torch.manual_seed(0)
    student = LlamaForCausalLM(llama_config(preset, vocab_size=300, seq_len=12)).train()
    ids = torch.randint(0, 300, (5, 12), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr("student_train.heldout.logits_block_rows",
                        lambda rows, vocab: 7)  # ragged logit chunks
    got = text_ce(student, HeldoutText("random", ids), torch.device("cpu"), batch_size)
    with torch.no_grad():
        logits = student.double()(input_ids=ids).logits[:, :-1]
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])
    assert got == pytest.approx(float(nll.mean()), rel=1e-5)
    assert student.training, "text_ce restores the training mode"
