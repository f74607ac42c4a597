"""CE on text outside the cache's corpus: what a student learned that carries beyond the cached
documents (the cache's own validation rows come from the same documents as its training rows).

The text is an installed package's .py sources (`teacher_cache.corpus.package_sources`), tokenized
with the cache's teacher tokenizer and packed like the cache: EOS after each document, the cache's
seq_len, the first `max_tokens` tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kernels.reference import logits_block_rows
from teacher_cache.corpus import CorpusConfig, open_corpus, package_sources
from teacher_cache.errors import ConfigError
from teacher_cache.packing import Packer, tokenize_documents
from teacher_cache.reader import TeacherCache


@dataclass
class HeldoutText:
    description: str  # what the text is, for the report
    input_ids: torch.Tensor  # int64 [sequences, seq_len]


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
    rows = [sequence.input_ids for sequence in packer]
    if not rows:
        raise ConfigError(f"--heldout-package {package}: its sources hold less than one sequence "
                          f"of {seq_len} tokens")
    input_ids = torch.from_numpy(np.stack(rows).astype(np.int64))
    return HeldoutText(f"{package} .py sources ({len(files)} files, not in the cache's corpus), "
                       f"first {input_ids.numel():,} tokens", input_ids)


@torch.no_grad()
def text_ce(student, text: HeldoutText, device: torch.device, batch_size: int = 8) -> float:
    """The student's CE (nats/token) on the true next token over every sequence of `text`."""
    was_training = student.training
    student.eval().to(device)
    weight = student.lm_head.weight
    total, count = 0.0, 0
    for batch in text.input_ids.split(batch_size):
        batch = batch.to(device)
        hidden = student.model(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
        hidden, labels = hidden.flatten(0, 1), batch[:, 1:].flatten()
        block = logits_block_rows(len(labels), weight.shape[0])
        for start in range(0, len(labels), block):
            rows = slice(start, start + block)
            logits = (hidden[rows] @ weight.T).float()
            total += float(F.cross_entropy(logits, labels[rows], reduction="sum"))
        count += labels.numel()
    student.train(was_training)
    return total / count
