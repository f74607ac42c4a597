"""Cache targets: sampled (the default) and top-k, the version-1 fixture, the trainer's refusals."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SEQ_LEN
from helpers import shard_bytes, synthetic_cache

from student_train.config import TrainConfig
from student_train.run_dir import STUDENT_DIR
from student_train.train import train
from teacher_cache import CacheError, open_cache
from teacher_cache import build as build_module
from teacher_cache.build import build_cache
from teacher_cache.cli import main
from teacher_cache.errors import ConfigError
from teacher_cache.finalize import finalize_cache
from teacher_cache.format import (
    FORMAT_VERSION,
    TRAINING_FILE,
    Targets,
    counts_to_logprobs,
    logprobs_to_counts,
)
from teacher_cache.sampling import sample_targets

K = 8
V1_CACHE = Path(__file__).parent / "data" / "cache-v1"
TINY = {"hidden_size": "32", "num_hidden_layers": "1", "num_attention_heads": "2",
        "num_key_value_heads": "2", "intermediate_size": "64"}


def sampled(tiny_build_config, out: Path, **overrides):
    return tiny_build_config(out, **({"top_k": None, "targets": f"sample:{K}"} | overrides))


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, tiny_build_config) -> Path:
    out = tmp_path_factory.mktemp("sampled") / "cache"
    build_cache(sampled(tiny_build_config, out))
    return out


def all_rows(path: Path):
    cache = open_cache(path)
    rows = [cache.read_shard(info) for info in cache.shards]
    return cache, rows


def test_targets_parse_and_refuse_bad_specs():
    assert Targets.parse("sample:8", temperature=2.0, seed=3) == Targets("sample", 8, 2.0, 3)
    assert Targets.parse("topk:64") == Targets("top_k", 64)
    assert Targets.parse("topk:64").spec == "topk:64"
    for bad in ("sample", "sample:", "topk:-1", "gumbel:8", "sample:8.5", ""):
        with pytest.raises(CacheError, match="expected sample:K or topk:K"):
            Targets.parse(bad)
    with pytest.raises(CacheError, match="at most 255"):
        Targets("sample", 256).validate()
    with pytest.raises(CacheError, match="vocabulary of 100 tokens"):
        Targets("top_k", 101).validate(vocab_size=100)
    Targets("sample", 101).validate(vocab_size=100)  # draws repeat: fine
    with pytest.raises(CacheError, match="--sample-temperature must be positive"):
        Targets("sample", 8, temperature=0.0).validate()


def test_counts_round_trip_through_logprobs():
    counts = np.arange(256, dtype=np.uint8)
    assert np.array_equal(logprobs_to_counts(counts_to_logprobs(counts, 255), 255), counts)


def test_default_build_samples_8_and_the_manifest_names_the_targets(sampled_cache: Path,
                                                                     tiny_build_config):
    default = tiny_build_config("unused", top_k=None)
    assert default.target_spec() == Targets("sample", 8, 1.0, 0)
    manifest = open_cache(sampled_cache).manifest
    assert manifest.version == FORMAT_VERSION == 3
    assert manifest.targets == {"kind": "sample", "k": K, "temperature": 1.0, "seed": 0}
    assert manifest.top_k == K and manifest.target_kind == "sample"
    assert "sample_counts" in manifest.columns and "topk_logprobs" not in manifest.columns


def test_sampled_rows_are_the_samplers_draws_from_the_teachers_logits(sampled_cache: Path,
                                                                      tiny_teacher_dir: Path):
    from transformers import AutoModelForCausalLM

    cache, rows = all_rows(sampled_cache)
    assert {r.target_kind for r in rows} == {"sample"}
    ids = np.concatenate([r.topk_ids for r in rows])
    logprobs = np.concatenate([r.topk_logprobs for r in rows])
    target = np.concatenate([r.target_logprobs for r in rows])
    input_ids = torch.as_tensor(np.concatenate([r.input_ids for r in rows]))
    seq_ids = np.concatenate([r.seq_ids for r in rows])
    b, seq_len, k = ids.shape
    assert k == K
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(input_ids).logits.float()
    want_ids, want_counts = sample_targets(
        logits.flatten(0, 1), 0, torch.as_tensor(seq_ids).repeat_interleave(seq_len),
        torch.arange(seq_len).repeat(b), K)
    body = np.s_[:, :-1]
    np.testing.assert_array_equal(ids[body], want_ids.view(b, seq_len, K)[body])
    np.testing.assert_array_equal(logprobs[body], counts_to_logprobs(
        want_counts.view(b, seq_len, K).numpy(), K)[body])
    # Each position: counts sum to K (the slots' probabilities to 1), unused slots -inf and id 0.
    np.testing.assert_allclose(np.exp(logprobs[body]).sum(-1), 1.0, rtol=1e-6)
    assert (ids[np.isneginf(logprobs)] == 0).all()
    assert np.isneginf(logprobs[:, -1]).all() and (ids[:, -1] == 0).all()
    full = torch.log_softmax(logits, -1)
    want_target = full[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
    # float32 logsumexp against log_softmax: another summation order over 49152 logits.
    np.testing.assert_allclose(target[body], want_target, rtol=1e-5, atol=1e-4)
    assert np.isnan(target[:, -1]).all()


def test_sampled_shards_are_byte_identical_for_any_batch_size_and_workers(
        sampled_cache: Path, tmp_path: Path, tiny_build_config):
    want = shard_bytes(sampled_cache)
    build_cache(sampled(tiny_build_config, tmp_path / "rerun"))
    assert shard_bytes(tmp_path / "rerun") == want
    build_cache(sampled(tiny_build_config, tmp_path / "batch1", batch_size=1))
    assert shard_bytes(tmp_path / "batch1") == want
    out = tmp_path / "workers3"
    for worker in range(3):
        build_cache(sampled(tiny_build_config, out, batch_size=8, num_workers=3,
                            worker_index=worker))
    finalize_cache(str(out))
    assert shard_bytes(out) == want


def test_a_killed_sampled_build_resumes_to_the_same_bytes(sampled_cache: Path, tmp_path: Path,
                                                          tiny_build_config, monkeypatch):
    real_write_shard, written = build_module.write_shard, []

    def crash_after_one_shard(*args):
        if written:
            raise RuntimeError("simulated crash")
        written.append(real_write_shard(*args))
        return written[-1]

    monkeypatch.setattr(build_module, "write_shard", crash_after_one_shard)
    out = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(sampled(tiny_build_config, out))
    monkeypatch.undo()
    summary = build_cache(sampled(tiny_build_config, out))
    assert (summary.shards_skipped, summary.shards_built) == (1, 3)
    assert shard_bytes(out) == shard_bytes(sampled_cache)


def test_another_seed_draws_other_samples_and_is_another_build(sampled_cache: Path,
                                                                tmp_path: Path,
                                                                tiny_build_config):
    out = tmp_path / "seed1"
    build_cache(sampled(tiny_build_config, out, seed=1))
    assert open_cache(out).manifest.targets["seed"] == 1
    _, base = all_rows(sampled_cache)
    _, other = all_rows(out)
    def draws(rows) -> np.ndarray:  # ids and logprobs side by side, [B, L - 1, 2 K]
        return np.concatenate([np.concatenate([r.topk_ids, r.topk_logprobs], -1) for r in rows])[
            :, :-1]

    # The tiny teacher is peaked (about half its positions draw one token K times): half differ.
    assert (draws(base) != draws(other)).any(-1).mean() > 0.4
    copy = tmp_path / "copy"
    shutil.copytree(sampled_cache, copy)
    with pytest.raises(CacheError) as refused:
        build_cache(sampled(tiny_build_config, copy, seed=1))
    assert "seed: 0 in the cache, 1 now" in str(refused.value)
    with pytest.raises(CacheError) as refused:
        build_cache(tiny_build_config(copy))  # top-k
    assert "targets: 'sample:8' in the cache, 'topk:8' now" in str(refused.value)


def test_cli_targets_options(tmp_path: Path, tiny_teacher_dir: Path, tiny_corpus_dir: Path,
                             capsys):
    base = ["build", "--out", str(tmp_path / "cache"), "--teacher", str(tiny_teacher_dir),
            "--corpus", str(tiny_corpus_dir), "--seq-len", str(TINY_SEQ_LEN), "--shard-rows", "2",
            "--max-tokens", str(2 * TINY_SEQ_LEN), "--dtype", "fp32", "--no-progress"]
    for extra, message in [
        (["--targets", "sample:x"], "--targets 'sample:x': expected sample:K or topk:K"),
        (["--targets", "topk:8", "--top-k", "4"], "--top-k 4 and --targets topk:8 disagree"),
        (["--targets", "sample:300"], "K must be at most 255"),
        (["--targets", "topk:50000"], "vocabulary of 49152 tokens"),
    ]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert main([*base, "--targets", "sample:4", "--sample-temperature", "2", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "targets sample:4" in out and "bytes/token" in out
    assert open_cache(tmp_path / "cache").manifest.targets == {
        "kind": "sample", "k": 4, "temperature": 2.0, "seed": 7}
    assert main([*base, "--out", str(tmp_path / "topk"), "--top-k", "3",
                 "--targets", "topk:3"]) == 0
    assert open_cache(tmp_path / "topk").manifest.targets == {"kind": "top_k", "k": 3}


def train_config(cache: Path, out: Path, **changes) -> TrainConfig:
    values = dict(cache=str(cache), out=str(out), student="xs", overrides=dict(TINY),
                  max_steps=2, batch_size=2, lr=1e-2, warmup=1, eval_every=2,
                  checkpoint_every=2, log_every=1, val_fraction=0.2, shuffle_buffer="4",
                  eval_batch_size=2)
    return TrainConfig(**(values | changes))


def test_a_version_1_cache_opens_decodes_and_trains(tmp_path: Path):
    cache = open_cache(V1_CACHE)
    assert cache.manifest.version == 1 and cache.manifest.targets == {"kind": "top_k", "k": 4}
    rows = cache.read_shard(0)
    assert rows.target_kind == "top_k" and rows.topk_logprobs.shape == (4, 16, 4)
    assert np.isfinite(rows.topk_logprobs).all()
    assert (np.diff(rows.topk_logprobs[:, :-1], axis=-1) <= 0).all()  # sorted descending
    summary = train(train_config(V1_CACHE, tmp_path / "run"))
    assert np.isfinite(summary["val_ce"]) and summary["tokens_seen"] == 2 * 2 * 16


def test_the_distill_version_is_recorded_in_the_manifest_and_the_training_record(
        tmp_path: Path):
    assert open_cache(V1_CACHE).manifest.distill_version is None  # from before it was recorded
    cache = synthetic_cache(tmp_path / "cache", sequences=12, seq_len=16, top_k=4, vocab_size=64)
    assert cache.manifest.distill_version == version("distill")
    summary = train(train_config(tmp_path / "cache", tmp_path / "run"))
    training = json.loads((tmp_path / "run" / STUDENT_DIR / TRAINING_FILE).read_text())
    assert summary["distill_version"] == training["distill_version"] == version("distill")


def test_the_trainer_trains_on_sampled_targets_only_as_rs_kd(sampled_cache: Path,
                                                             tmp_path: Path):
    with pytest.raises(ConfigError, match="only with --divergence fkl"):
        train(train_config(sampled_cache, tmp_path / "rkl", divergence="rkl"))
    with pytest.raises(ConfigError, match="only with --divergence fkl"):
        train(train_config(sampled_cache, tmp_path / "tail", divergence="fkl_tail"))
    with pytest.raises(ConfigError, match="pass --temperature 1.0, not 2.0"):
        train(train_config(sampled_cache, tmp_path / "t2", temperature=2.0))
    summary = train(train_config(sampled_cache, tmp_path / "fkl"))
    assert np.isfinite(summary["val_ce"]) and np.isfinite(summary["val_kl"])
    # CE only needs no teacher distribution: any divergence setting is fine.
    train(train_config(sampled_cache, tmp_path / "ce", divergence="rkl", kd_weight=0.0))


def test_vllm_samples_from_its_top_logprobs_and_reports_the_uncovered_mass():
    from teacher_cache.backends.vllm_backend import VllmBackend

    backend = object.__new__(VllmBackend)  # no engine: only the sampling of its results
    backend.targets = Targets("sample", K, 1.0, 5)
    gen = torch.Generator().manual_seed(0)
    b, seq_len, top = 2, 6, 16
    full = torch.log_softmax(torch.randn(b, seq_len, 1000, generator=gen) * 3, -1)
    top_logprobs, top_ids = full.topk(top, -1)
    target = np.zeros((b, seq_len), np.float32)
    out = backend._sample(top_ids.int().numpy(), top_logprobs.numpy(), target, np.array([3, 9]))
    # The draws are the torch sampler's over the renormalised top-K', mapped to token ids.
    slots, counts = sample_targets(top_logprobs.flatten(0, 1), 5, torch.tensor([3, 9]).
                                   repeat_interleave(seq_len), torch.arange(seq_len).repeat(b), K)
    want = torch.where(counts > 0, top_ids.flatten(0, 1).gather(1, slots.long()), 0)
    np.testing.assert_array_equal(out.topk_ids.reshape(-1, K), want.numpy())
    np.testing.assert_array_equal(out.topk_logprobs.reshape(-1, K),
                                  counts_to_logprobs(counts.numpy(), K))
    np.testing.assert_allclose(out.uncovered_mass, 1 - top_logprobs.exp().sum(-1).numpy(),
                               atol=1e-6)
    assert out.target_logprobs is target


def test_the_manifest_records_the_mean_uncovered_mass(tmp_path: Path, tiny_build_config,
                                                      monkeypatch):
    from teacher_cache.backends.torch_backend import TorchBackend

    real_predict = TorchBackend.predict

    def predict_from_a_top(self, input_ids, seq_ids=None):  # as the vLLM backend reports it
        output = real_predict(self, input_ids, seq_ids)
        output.uncovered_mass = np.full(input_ids.shape, 0.25, np.float32)
        output.uncovered_mass[0, :-1] = 0.75 if seq_ids[0] == 0 else 0.25
        return output

    monkeypatch.setattr(TorchBackend, "predict", predict_from_a_top)
    manifest = build_cache(sampled(tiny_build_config, tmp_path / "cache")).manifest
    # Shard 0's first row (seq 0) has 0.75: (0.75 + 3 * 0.25) / 4; the others 0.25.
    assert [s.uncovered_mass for s in manifest.shards] == [0.375, 0.25, 0.25, 0.25]
    assert manifest.targets["uncovered_mass"] == pytest.approx((0.375 * 4 + 0.25 * 10) / 14)
    assert open_cache(tmp_path / "cache").manifest.targets == manifest.targets
