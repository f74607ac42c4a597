"""CE on text outside the cache's corpus: what a student learned that carries beyond the cached
documents (the cache's own validation rows come from the same documents as its training rows).

The text is an installed package's .py sources (`teacher_cache.corpus.package_sources`), tokenized
with the cache's teacher tokenizer and packed like the cache: EOS after each document, the cache's
seq_len, the first `max_tokens` tokens; a student trained with --doc-mask reads each document of a
row on its own, as it trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kernels.reference import logits_block_rows
from student_train.data import row_positions
from student_train.model import final_hidden
from teacher_cache.corpus import CorpusConfig, open_corpus, package_sources
from teacher_cache.errors import ConfigError
from teacher_cache.packing import Packer, tokenize_documents
from teacher_cache.reader import TeacherCache


@dataclass
class HeldoutText:
    description: str  # what the text is, for the report
    input_ids: torch.Tensor  # int64 [sequences, seq_len]
    # int64 [sequences, seq_len]: offsets in their documents (data.row_positions); None for rows
    # not packed from documents here (prune.py's calibration rows)
    position_ids: torch.Tensor | None = None


def whole_documents(pieces: Iterable[tuple[list[int], bool]]) -> Iterator[list[int]]:
    """The token ids of each document from tokenize_documents' pieces, as the cache packs them."""
    document: list[int] = []
    for ids, last in pieces:
        document.extend(ids)
        if last:
            yield document
            document = []


def load_heldout_text(cache: TeacherCache, package: str, max_tokens: int) -> HeldoutText:
    from transformers import AutoTokenizer

    seq_len = cache.manifest.seq_len
    if max_tokens < seq_len:
        raise ConfigError(f"--heldout-tokens {max_tokens}: less than one sequence of the cache's "
                          f"seq_len {seq_len}")
    files = package_sources(package)
    teacher = cache.manifest.teacher
    where = teacher.get("path") or teacher.get("name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--heldout-package {package}: the cache's teacher tokenizer ({where}, "
                          f"manifest.json) cannot be loaded here ({type(e).__name__}); build the "
                          f"cache on this machine or pass --heldout-package ''") from None
    corpus = open_corpus(CorpusConfig(paths=[str(f) for f in files]))
    packer = Packer(whole_documents(tokenize_documents(tokenizer, corpus.documents(),
                                                       tokenizer.eos_token_id)),
                    seq_len, max_tokens)
    sequences = list(packer)
    if not sequences:
        raise ConfigError(f"--heldout-package {package}: its sources hold less than one sequence "
                          f"of {seq_len} tokens")
    input_ids = torch.from_numpy(np.stack([s.input_ids for s in sequences]).astype(np.int64))
    positions = row_positions([np.asarray(s.doc_starts, np.int64) for s in sequences], seq_len)
    return HeldoutText(f"{package} .py sources ({len(files)} files, not in the cache's corpus), "
                       f"first {input_ids.numel():,} tokens", input_ids,
                       torch.from_numpy(positions))


@torch.no_grad()
def text_ce(student, text: HeldoutText, device: torch.device, batch_size: int = 8,
            doc_mask: bool = False) -> float:
    """The student's CE (nats/token) on the true next token over every sequence of `text`;
    `doc_mask`: each document attends only to itself (text.position_ids)."""
    was_training = student.training
    student.eval().to(device)
    weight = student.lm_head.weight
    total, count = 0.0, 0
    for first in range(0, len(text.input_ids), batch_size):
        sequences = slice(first, first + batch_size)
        batch = text.input_ids[sequences].to(device)
        positions = text.position_ids[sequences].to(device) if doc_mask else None
        hidden = final_hidden(student, batch, positions)[:, :-1]
        hidden, labels = hidden.flatten(0, 1), batch[:, 1:].flatten()
        block = logits_block_rows(len(labels), weight.shape[0])
        for start in range(0, len(labels), block):
            rows = slice(start, start + block)
            logits = (hidden[rows] @ weight.T).float()
            total += float(F.cross_entropy(logits, labels[rows], reduction="sum"))
        count += labels.numel()
    student.train(was_training)
    return total / count
