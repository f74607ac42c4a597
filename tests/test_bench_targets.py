"""benchmarks/bench_targets.py's SharedForward: builders in threads share one teacher forward per
batch of input ids, and no more than `ahead` batches wait in memory."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_targets import SharedForward  # noqa: E402


class CountingModel:
    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, use_cache: bool) -> SimpleNamespace:
        self.calls += 1
        return SimpleNamespace(logits=input_ids.double() * 2)


def test_each_batch_is_computed_once_for_all_builders():
    shared, model = SharedForward(users=3, ahead=2), CountingModel()
    batches = [torch.full((2, 4), i) for i in range(12)]
    got: dict[int, list[torch.Tensor]] = {u: [] for u in range(3)}
    held: list[int] = []

    def builder(user: int) -> None:
        for batch in batches:
            got[user].append(shared.logits(model, batch))
            held.append(len(shared.held))

    threads = [threading.Thread(target=builder, args=(u,)) for u in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "the builders deadlocked"
    assert model.calls == len(batches)
    for user in range(3):
        assert all(torch.equal(g, b.double() * 2) for g, b in zip(got[user], batches, strict=True))
    assert max(held) <= 2 and not shared.held
