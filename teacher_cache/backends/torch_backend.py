"""Teacher forward passes with plain PyTorch + transformers, on CUDA or CPU.

The model runs in bf16 where the hardware computes it natively (`teacher.choose_dtype`: CUDA, or
CPUs with AMX: about 4-7x the float32 throughput on such a CPU, see benchmarks/bench_cache.py).
Top-k targets: log_softmax, top-k and the target gather run in float32, one sequence at a time so
that at most one [L, V] float32 slice exists besides the model's [B, L, V] logits. Sampled
targets: exact draws from the full logits (`teacher_cache.sampling`, in row chunks) and the target
logprob as the gathered logit minus the row logsumexp that the sampler's pass yields, in one read
of the logits with no log-softmax copy.
"""

from __future__ import annotations

import numpy as np
import torch

from teacher_cache.backends.base import BackendConfig, TeacherOutput
from teacher_cache.backends.dtypes import dtype_name, resolve_dtype
from teacher_cache.format import counts_to_logprobs
from teacher_cache.sampling import sample_packed, true_token_logprobs
from teacher_cache.teacher import quiet_transformers_bars


def resolve_device(device: str) -> torch.device:
    """"auto" is cuda where available, else cpu; anything else as torch spells it ("cuda:1")."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TorchBackend:
    name = "torch"

    def __init__(self, config: BackendConfig):
        from transformers import AutoModelForCausalLM

        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.dtype_name = dtype_name(self.dtype)
        self.targets = config.targets
        with quiet_transformers_bars():
            self.model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=self.dtype)
        self.model.to(self.device).eval()

    @property
    def sequences_per_call(self) -> int:
        return self.config.batch_size

    @torch.inference_mode()
    def predict(self, input_ids: np.ndarray, seq_ids: np.ndarray | None = None) -> TeacherOutput:
        ids = torch.from_numpy(np.array(input_ids, dtype=np.int64)).to(self.device)
        size = self.config.batch_size
        outputs = [self._predict_batch(ids[start:start + size],
                                       None if seq_ids is None else seq_ids[start:start + size])
                   for start in range(0, len(ids), size)]
        return TeacherOutput(*(np.concatenate(parts) for parts in zip(*outputs, strict=True)))

    def _predict_batch(self, ids: torch.Tensor,
                       seq_ids: np.ndarray | None) -> tuple[np.ndarray, ...]:
        logits = self.model(input_ids=ids, use_cache=False).logits
        if self.targets.kind == "sample":
            return self._sample(logits, ids, seq_ids)
        b, seq_len = ids.shape
        top_k = self.targets.k
        topk_ids = torch.empty(b, seq_len, top_k, dtype=torch.int32, device=self.device)
        topk_logprobs = torch.empty(b, seq_len, top_k, dtype=torch.float32, device=self.device)
        target = torch.full((b, seq_len), float("nan"), dtype=torch.float32, device=self.device)
        for row in range(b):
            logprobs = torch.log_softmax(logits[row].float(), dim=-1)
            values, indices = torch.topk(logprobs, top_k, dim=-1)
            topk_logprobs[row], topk_ids[row] = values, indices.int()
            target[row, :-1] = logprobs[:-1].gather(-1, ids[row, 1:, None]).squeeze(-1)
        return topk_ids.cpu().numpy(), topk_logprobs.cpu().numpy(), target.cpu().numpy()

    def _sample(self, logits: torch.Tensor, ids: torch.Tensor,
                seq_ids: np.ndarray | None) -> tuple[np.ndarray, ...]:
        sampled_ids, counts, logsumexp = sample_packed(logits, seq_ids, self.targets)
        target = true_token_logprobs(logits, ids, logsumexp)
        return (sampled_ids.cpu().numpy(),
                counts_to_logprobs(counts.cpu().numpy(), self.targets.k), target.cpu().numpy())

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def create(config: BackendConfig) -> TorchBackend:
    return TorchBackend(config)
