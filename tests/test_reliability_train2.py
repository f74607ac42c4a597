"""Training as a careless user or a busy machine runs it (issue 26): --overwrite on folders it did
not write, NaN, a resume on another cache, two runs on one --out, kills and full disks."""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE, make_inputs
from test_reliability_train import one_error_line, train

from kernels import sparse_kd_loss
from kernels.choices import DIVERGENCES

# --- NaN and inf ---

@pytest.mark.parametrize("lr, message", [("-1", "positive"), ("0", "positive"),
                                         ("nan", "finite"), ("inf", "finite")])
def test_a_learning_rate_that_is_not_positive_and_finite_is_one_line(cli_cache_dir, tmp_path,
                                                                     capsys, lr, message):
    one_error_line(capsys, train(cli_cache_dir, tmp_path / "run", "--lr", lr), "--lr", message)
    assert not (tmp_path / "run").exists()


def test_other_non_finite_flags_are_one_line(cli_cache_dir, tmp_path, capsys):
    one_error_line(capsys, train(cli_cache_dir, tmp_path, "--ce-weight", "nan"), "--ce-weight")


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_teacher_logprob_makes_the_loss_non_finite_like_its_gradient(
        impl, divergence, bad):
    if impl == "triton":
        pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_inputs(12, 8, 40, 4, seed=3)
    inputs.topk_logprobs[0, 1] = bad
    for counted in (True, False):
        inputs.labels[0] = 5 if counted else IGNORE
        h, w, *rest = (t.to(device) for t in inputs.args(torch.float32))
        h.retain_grad(), w.retain_grad()
        loss = sparse_kd_loss(h, w, *rest, divergence=divergence, impl=impl)
        loss.backward()
        finite = [bool(torch.isfinite(t).all()) for t in (loss, h.grad, w.grad)]
        assert finite == [not counted] * 3, (counted, finite)  # ignored rows may hold anything


