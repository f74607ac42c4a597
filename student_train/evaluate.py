"""Held-out metrics: CE and perplexity on the true tokens, KL to the teacher, agreement with the
teacher's first target."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from kernels import IGNORE_INDEX, sparse_kd_loss
from kernels.reference import logits_block_rows
from student_train.data import Batch
from student_train.model import final_hidden, output_weight


@dataclass
class EvalMetrics:
    ce: float  # nats per token on the true next token
    ppl: float
    kl: float  # forward KL from the teacher's cached targets (renormalised) to the student, T = 1
    # fraction of positions where the student's argmax is the teacher's first target: its top-1 on
    # a top-k cache, its most-drawn id on a sampled one
    top1: float
    tokens: int

    def as_record(self, prefix: str = "val_") -> dict[str, float]:
        return {prefix + k: v for k, v in asdict(self).items()}


def _batch_totals(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                  impl: str) -> torch.Tensor:
    """[CE sum, KL sum, first-target agreements, tokens] over the rows of one batch."""
    valid = labels != IGNORE_INDEX
    tokens = int(valid.sum())
    _, terms = sparse_kd_loss(hidden, weight, labels, topk_ids, topk_logprobs, divergence="fkl",
                              temperature=1.0, ignore_index=IGNORE_INDEX, impl=impl,
                              return_terms=True)
    ce, kl = terms.tolist()
    agree = 0
    block = logits_block_rows(hidden.shape[0], weight.shape[0])
    for start in range(0, hidden.shape[0], block):
        rows = slice(start, start + block)
        argmax = (hidden[rows] @ weight.T).argmax(dim=-1)
        agree += int(((argmax == topk_ids[rows, 0]) & valid[rows]).sum())
    return torch.tensor([ce * tokens, kl * tokens, agree, tokens], dtype=torch.float64)


@torch.no_grad()
def evaluate(student: PreTrainedModel, batches: Iterable[Batch], device: torch.device,
             impl: str = "auto", doc_mask: bool = False) -> EvalMetrics:
    """Token-weighted metrics over `batches`, summed over ranks when running distributed;
    `doc_mask`: each document attends only to itself, as the student trained (--doc-mask)."""
    was_training = student.training
    student.eval()
    weight = output_weight(student)
    totals = torch.zeros(4, dtype=torch.float64)  # CE sum, KL sum, agreements, tokens
    for batch in batches:
        batch = batch.to(device)
        hidden = final_hidden(student, batch.input_ids, batch.positions(doc_mask))
        totals += _batch_totals(hidden.flatten(0, 1), weight,
                                batch.labels.flatten(), batch.topk_ids.flatten(0, 1),
                                batch.topk_logprobs.flatten(0, 1), impl)
    if dist.is_initialized():
        totals = totals.to(device)
        dist.all_reduce(totals)
    student.train(was_training)
    ce_sum, kl_sum, agree, tokens = totals.cpu().tolist()
    if tokens == 0:
        nan = float("nan")
        return EvalMetrics(ce=nan, ppl=nan, kl=nan, top1=nan, tokens=0)
    ce = ce_sum / tokens
    return EvalMetrics(ce=ce, ppl=math.exp(min(ce, 700.0)), kl=kl_sum / tokens,
                       top1=agree / tokens, tokens=int(tokens))
