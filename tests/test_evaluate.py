"""The held-out metrics (student_train.evaluate) against their float64 definitions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import brute_force_metrics, student_logits64, synthetic_cache

from student_train.data import eval_batches

VOCAB, TOP_K = 64, 4


def test_metrics_equal_their_float64_definitions(tmp_path):
    # Imported here: transformers imports triton, which must first see TRITON_INTERPRET as
    # test_kernels_triton.py sets it when it is collected after this module.
    from transformers import LlamaConfig

    from student_train.evaluate import evaluate
    from student_train.model import build_student

    cache = synthetic_cache(tmp_path, sequences=10, seq_len=12, top_k=TOP_K, vocab_size=VOCAB)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    student = build_student(config, seed=0)
    batches = []
    for batch in eval_batches(cache, np.arange(10), batch_size=4):
        # The teacher's top-1 is the student's argmax at every other position (so top-1
        # agreement is far from zero, and far from agreement with any other teacher rank).
        student_topk = student_logits64(student, batch.input_ids).topk(TOP_K, -1).indices
        agrees = torch.arange(batch.input_ids.shape[1]) % 2 == 0
        topk_ids = torch.where(agrees[None, :, None], student_topk, batch.topk_ids)
        batches.append(dataclasses.replace(batch, topk_ids=topk_ids))

    got = evaluate(student, batches, torch.device("cpu"), impl="reference")
    want = brute_force_metrics(student, batches)
    assert got.tokens == 10 * 11
    assert got.top1 == want["val_top1"] and got.top1 >= 0.5
    assert got.ce == pytest.approx(want["val_ce"], rel=1e-6)
    assert got.kl == pytest.approx(want["val_kl"], rel=1e-6)
    assert got.ppl == pytest.approx(np.exp(want["val_ce"]), rel=1e-6)
