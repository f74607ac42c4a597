from __future__ import annotations

import json
import math
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from teacher_cache import CacheError, open_cache
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.corpus import CorpusConfig
from teacher_cache.teacher import distill_home, resolve_teacher


def test_local_directory_identity_is_stable_and_memoized(tiny_teacher_dir: Path):
    first = resolve_teacher(str(tiny_teacher_dir))
    second = resolve_teacher(str(tiny_teacher_dir))
    assert first == second
    assert first.path == str(tiny_teacher_dir)
    assert len(first.weights_sha256) == 64 and len(first.tokenizer_sha256) == 64
    memos = [json.loads(p.read_text()) for p in (distill_home() / "hashes").glob("*.json")]
    assert first.weights_sha256 in {m["sha256"] for m in memos}


def test_changed_weights_change_the_identity(tmp_path: Path, tiny_teacher_dir: Path):
    copy = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, copy)
    original = resolve_teacher(str(copy))
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of a weight: the file stays a valid safetensors
    weights.write_bytes(bytes(data))
    changed = resolve_teacher(str(copy))
    assert changed.weights_sha256 != original.weights_sha256
    assert changed.tokenizer_sha256 == original.tokenizer_sha256


def test_directory_without_tokenizer_is_a_clear_error(tmp_path: Path, tiny_teacher_dir: Path):
    copy = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(CacheError, match="no tokenizer"):
        resolve_teacher(str(copy))


def test_unknown_teacher_is_a_clear_error(tmp_path: Path):
    with pytest.raises(CacheError, match="no such GGUF file"):
        resolve_teacher(str(tmp_path / "missing.gguf"))
    with pytest.raises(CacheError, match="no such directory or file"):
        resolve_teacher(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CacheError, match="expected a model directory or a .gguf file"):
        resolve_teacher(str(tmp_path / "weights.bin"))


@pytest.mark.slow
def test_default_teacher_predicts_stdlib_code_well(tmp_path: Path):
    """The GGUF conversion is right: a broken one (e.g. untied lm_head) gives ~ln(vocab) nats.

    SmolLM2-135M (Q4_1) scores ~2.4 nats/token on the start of the json package's code.
    """
    teacher = resolve_teacher(None)
    config = json.loads((Path(teacher.path) / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model, not a GGUF-backed one
    json_package = Path(sysconfig.get_paths()["stdlib"]) / "json"
    build_cache(BuildConfig(out=str(tmp_path / "cache"), corpus=CorpusConfig([str(json_package)]),
                            max_tokens=4 * 128, seq_len=128, top_k=16, shard_rows=2, batch_size=4,
                            progress=False))
    cache = open_cache(tmp_path / "cache")
    assert cache.manifest.teacher["name"] == "SmolLM2-135M-Instruct"
    targets = np.concatenate([cache.read_shard(i).target_logprobs[:, :-1] for i in cache.shards])
    mean_nll = -float(targets.mean())
    assert mean_nll < 3.0 < math.log(cache.manifest.vocab_size)
