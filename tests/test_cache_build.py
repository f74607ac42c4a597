from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DOCUMENTS, TINY_MAX_TOKENS, TINY_SEQ_LEN, TINY_SHARD_ROWS, TINY_TOP_K
from helpers import shard_bytes

from teacher_cache import CacheError, open_cache
from teacher_cache import build as build_module
from teacher_cache.build import build_cache
from teacher_cache.corpus import CorpusConfig
from teacher_cache.finalize import finalize_cache

FLOAT16 = {"rtol": 2 ** -10, "atol": 1e-3}  # float16 storage: 11-bit mantissa


def all_rows(path: Path):
    cache = open_cache(path)
    rows = [cache.read_shard(info) for info in cache.shards]
    return cache, {name: np.concatenate([getattr(r, name) for r in rows]) for name in
                   ("seq_ids", "input_ids", "topk_ids", "topk_logprobs", "target_logprobs")}


def test_manifest_describes_the_build(tiny_cache: Path, tiny_teacher_dir: Path):
    manifest = open_cache(tiny_cache).manifest
    assert manifest.complete
    assert (manifest.seq_len, manifest.top_k, manifest.rows_per_shard) == (
        TINY_SEQ_LEN, TINY_TOP_K, TINY_SHARD_ROWS)
    assert [s.rows for s in manifest.shards] == [4, 4, 4, 2]
    assert manifest.totals["sequences"] == TINY_MAX_TOKENS // TINY_SEQ_LEN
    assert manifest.totals["tokens"] == TINY_MAX_TOKENS
    assert manifest.teacher["path"] == str(tiny_teacher_dir)
    assert manifest.teacher["dtype"] == "float32"
    assert len(manifest.teacher["weights_sha256"]) == 64
    assert manifest.vocab_size == 49152
    assert manifest.corpus["capped_by_max_tokens"]
    assert manifest.corpus["documents"] == 4
    assert manifest.score is None


def test_topk_and_targets_equal_the_models_float32_log_softmax(tiny_cache: Path,
                                                              tiny_teacher_dir: Path):
    from transformers import AutoModelForCausalLM

    _, rows = all_rows(tiny_cache)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = torch.as_tensor(rows["input_ids"])
        logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)
    values, indices = logprobs.topk(TINY_TOP_K, dim=-1)
    body = np.s_[:, :-1]  # the last position has no target and is masked
    np.testing.assert_allclose(rows["topk_logprobs"][body], values[body], **FLOAT16)
    # Ids may differ only between (near-)tied logprobs: the cached ids have the cached values.
    at_cached = logprobs.gather(-1, torch.as_tensor(rows["topk_ids"]))
    np.testing.assert_allclose(rows["topk_logprobs"][body], at_cached[body], **FLOAT16)
    assert (rows["topk_ids"][body] == indices[body].numpy()).mean() > 0.99
    target = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    np.testing.assert_allclose(rows["target_logprobs"][body], target, rtol=1e-5, atol=1e-5)
    assert np.isnan(rows["target_logprobs"][:, -1]).all()
    assert (rows["topk_ids"][:, -1] == 0).all() and (rows["topk_logprobs"][:, -1] == 0).all()


def test_sequences_are_the_packed_corpus_with_doc_starts(tiny_cache: Path, smollm2_tokenizer):
    cache, rows = all_rows(tiny_cache)
    np.testing.assert_array_equal(rows["seq_ids"], np.arange(len(rows["seq_ids"])))
    eos = smollm2_tokenizer.eos_token_id
    documents = [smollm2_tokenizer(DOCUMENTS[name], add_special_tokens=False)["input_ids"] + [eos]
                 for name in sorted(DOCUMENTS)]
    stream = np.concatenate(documents)
    np.testing.assert_array_equal(rows["input_ids"].reshape(-1), stream[:TINY_MAX_TOKENS])
    starts = np.cumsum([0] + [len(d) for d in documents])
    expected = [[int(s - i * TINY_SEQ_LEN) for s in starts
                 if i * TINY_SEQ_LEN <= s < (i + 1) * TINY_SEQ_LEN]
                for i in range(len(rows["seq_ids"]))]
    actual = [d.tolist() for info in cache.shards for d in cache.read_shard(info).doc_starts]
    assert actual == expected


def test_resume_after_a_crash_writes_the_same_bytes(tmp_path: Path, tiny_cache: Path,
                                                    tiny_build_config, monkeypatch):
    real_write_shard = build_module.write_shard
    written = []

    def crash_after_two_shards(*args, **kwargs):
        if len(written) == 2:
            raise RuntimeError("simulated crash")
        written.append(real_write_shard(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(build_module, "write_shard", crash_after_two_shards)
    out = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(tiny_build_config(out))
    with pytest.raises(CacheError, match="no manifest.json"):
        open_cache(out)
    monkeypatch.undo()

    summary = build_cache(tiny_build_config(out))
    assert (summary.shards_skipped, summary.shards_built) == (2, 2)
    assert shard_bytes(out) == shard_bytes(tiny_cache)
    assert open_cache(out).manifest.shards == open_cache(tiny_cache).manifest.shards


class PredictCalls(list):
    """Sequences per teacher `predict` call, in order; `recorded` is notified after each."""

    def __init__(self):
        super().__init__()
        self.recorded = threading.Condition()


@pytest.fixture
def predict_calls(monkeypatch) -> PredictCalls:
    """Records every call of the torch backend's `predict` (which still runs)."""
    from teacher_cache.backends.torch_backend import TorchBackend

    real_predict, calls = TorchBackend.predict, PredictCalls()

    def predict(self, input_ids, seq_ids=None):
        with calls.recorded:
            calls.append(len(input_ids))
            calls.recorded.notify_all()
        return real_predict(self, input_ids, seq_ids)

    monkeypatch.setattr(TorchBackend, "predict", predict)
    return calls


def test_the_teacher_computes_the_next_shard_while_the_last_is_written(
        tmp_path: Path, tiny_cache: Path, tiny_build_config, monkeypatch, predict_calls):
    real_write_shard = build_module.write_shard
    overlapped = []  # per shard write: did the teacher start the next shard meanwhile?

    def write_shard(location, index, *args):
        if index < 3:  # the last shard has no next one; one predict call per shard
            with predict_calls.recorded:
                overlapped.append(predict_calls.recorded.wait_for(
                    lambda: len(predict_calls) > index + 1, timeout=60))
        return real_write_shard(location, index, *args)

    monkeypatch.setattr(build_module, "write_shard", write_shard)
    assert tiny_build_config(tmp_path).batch_size == TINY_SHARD_ROWS
    summary = build_cache(tiny_build_config(tmp_path / "cache"))
    assert summary.shards_built == 4 and overlapped == [True, True, True]
    assert shard_bytes(tmp_path / "cache") == shard_bytes(tiny_cache)


def test_an_engine_that_batches_itself_gets_a_whole_shard_per_call(
        tmp_path: Path, tiny_build_config, monkeypatch, predict_calls):
    from teacher_cache.backends.torch_backend import TorchBackend

    build_cache(tiny_build_config(tmp_path / "batched", batch_size=1))
    assert predict_calls == [1] * 14
    predict_calls.clear()
    monkeypatch.setattr(TorchBackend, "sequences_per_call", None)
    build_cache(tiny_build_config(tmp_path / "whole", batch_size=1))
    assert predict_calls == [TINY_SHARD_ROWS] * 3 + [2]


def test_two_workers_and_finalize_equal_one_worker(tmp_path: Path, tiny_cache: Path,
                                                   tiny_build_config):
    out = tmp_path / "cache"
    first = build_cache(tiny_build_config(out, num_workers=2, worker_index=1))
    assert first.manifest is None and first.shards_built == 2
    with pytest.raises(CacheError, match=r"2 shards missing .*rerun worker\(s\) 0 of 2"):
        finalize_cache(str(out))
    build_cache(tiny_build_config(out, num_workers=2, worker_index=0))
    manifest = finalize_cache(str(out))
    assert manifest.complete and manifest.build["workers"] == 2
    assert shard_bytes(out) == shard_bytes(tiny_cache)
    assert manifest.shards == open_cache(tiny_cache).manifest.shards


def test_a_different_build_into_the_same_cache_names_each_difference(tiny_cache: Path,
                                                                     tiny_build_config):
    before = shard_bytes(tiny_cache)
    with pytest.raises(CacheError) as error:
        build_cache(tiny_build_config(tiny_cache, top_k=4, seq_len=16))
    message = str(error.value)
    assert "top_k: 8 in the cache, 4 now" in message
    assert "seq_len: 32 in the cache, 16 now" in message
    assert "--overwrite" in message
    assert shard_bytes(tiny_cache) == before


def test_overwrite_replaces_the_cache(tmp_path: Path, tiny_cache: Path, tiny_build_config):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    build_cache(tiny_build_config(out, top_k=4, overwrite=True))
    cache = open_cache(out)
    assert cache.manifest.top_k == 4
    assert cache.read_shard(0).topk_ids.shape == (TINY_SHARD_ROWS, TINY_SEQ_LEN, 4)


def test_skipped_files_are_counted_in_the_manifest(tmp_path: Path, tiny_corpus_dir: Path,
                                                   tiny_build_config):
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus_dir, corpus)
    (corpus / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.warns(UserWarning, match="not UTF-8"):
        build_cache(tiny_build_config(tmp_path / "cache", max_tokens=4 * TINY_SEQ_LEN,
                                      corpus=CorpusConfig(paths=[str(corpus)])))
    manifest = open_cache(tmp_path / "cache").manifest
    assert manifest.corpus["skipped"] == [str(corpus / "latin.txt")]


def test_corpus_smaller_than_one_sequence_is_an_error(tmp_path: Path, tiny_build_config):
    (tmp_path / "tiny.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(CacheError, match="fewer tokens than one sequence"):
        build_cache(tiny_build_config(tmp_path / "cache",
                                      corpus=CorpusConfig(paths=[str(tmp_path / "tiny.txt")])))


def test_builds_into_an_fsspec_url(tiny_cache: Path, tiny_build_config):
    url = f"memory://test-cache-{id(tiny_build_config)}"
    build_cache(tiny_build_config(url))
    cache = open_cache(url)
    assert cache.manifest.shards == open_cache(tiny_cache).manifest.shards


def test_rerun_of_a_finished_build_keeps_its_teacher_throughput(tmp_path: Path,
                                                               tiny_build_config):
    out = tmp_path / "cache"
    first = build_cache(tiny_build_config(out)).manifest.build
    again = build_cache(tiny_build_config(out))
    assert again.shards_built == 0
    assert first["tokens_computed"] > 0
    assert again.manifest.build == first


def test_a_backend_computes_the_targets_its_config_names(tiny_teacher_dir: Path):
    from teacher_cache.backends import BackendConfig, Targets, create_backend

    backend = create_backend("torch", BackendConfig(str(tiny_teacher_dir),
                                                    targets=Targets("top_k", 3), dtype="fp32"))
    output = backend.predict(np.arange(2 * 16).reshape(2, 16))
    backend.close()
    assert output.topk_ids.shape == output.topk_logprobs.shape == (2, 16, 3)
    assert output.target_logprobs.shape == (2, 16)
    assert backend.dtype_name == "float32"
