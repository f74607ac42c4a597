"""The row index: start-up reads no shard, finalize reads no shard bytes, format 2 still opens,
a damaged index is one line and `verify --repair` writes it again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import synthetic_cache

import teacher_cache.finalize as finalize_module
from student_train.data import TrainStream, split_rows
from student_train.selection import Selection
from teacher_cache.errors import CacheError
from teacher_cache.finalize import finalize_cache
from teacher_cache.format import MANIFEST_FILE, SHARD_DIR
from teacher_cache.reader import open_cache
from teacher_cache.storage import Location
from teacher_cache.verify import verify_cache


class CountingShardBytes:
    """Shard files read, whole (Location.read_bytes) or by their score column (finalize)."""

    def __init__(self, monkeypatch):
        self.files: list[str] = []
        read_bytes, read_scores = Location.read_bytes, finalize_module.read_score_column

        def whole(location, *parts):
            if "/".join(parts).startswith(f"{SHARD_DIR}/") and parts[-1].endswith(".arrow"):
                self.files.append("/".join(parts))
            return read_bytes(location, *parts)

        def column(location, info):
            self.files.append(info.path)
            return read_scores(location, info)

        monkeypatch.setattr(Location, "read_bytes", whole)
        monkeypatch.setattr(finalize_module, "read_score_column", column)


def scored_cache(path: Path, sequences: int = 30) -> Path:
    scores = np.random.default_rng(0).normal(size=sequences).astype(np.float32)
    synthetic_cache(path, sequences=sequences, seq_len=8, top_k=2, vocab_size=64,
                    rows_per_shard=4, scores=scores)
    return path


def test_start_up_reads_the_manifest_and_the_index_but_no_shard(tmp_path, monkeypatch):
    cache_dir = scored_cache(tmp_path / "cache")
    counter = CountingShardBytes(monkeypatch)
    cache = open_cache(cache_dir)
    split = split_rows(cache, 0.2, Selection.parse("top:0.5"), seed=0, val_max_rows=3)
    TrainStream(str(cache_dir), split.train, global_batch=4, rank=0, world_size=1, seed=0,
                shuffle_buffer="8")
    assert counter.files == []
    assert len(split.val) == 3 and len(split.train) == round(0.5 * 27)
    # What the index says is what the shards hold.
    index = cache.read_index()
    batches = list(cache.iter_batches())
    np.testing.assert_array_equal(index.seq_ids, np.concatenate([b.seq_ids for b in batches]))
    np.testing.assert_array_equal(index.scores, np.concatenate([b.score for b in batches]))
    assert counter.files, "iter_batches reads the shards (the counter counts)"


def test_a_format_2_cache_without_an_index_reads_its_shards_instead(tmp_path):
    cache_dir = scored_cache(tmp_path / "cache")
    new = open_cache(cache_dir).read_index()
    manifest = json.loads((cache_dir / MANIFEST_FILE).read_text())
    (cache_dir / manifest.pop("index")["path"]).unlink()
    (cache_dir / MANIFEST_FILE).write_text(json.dumps(manifest | {"version": 2}))
    old = open_cache(cache_dir)
    assert old.manifest.version == 2 and old.manifest.index is None
    index = old.read_index()
    for name in ("seq_ids", "shard", "scores"):
        np.testing.assert_array_equal(getattr(index, name), getattr(new, name))
    assert verify_cache(str(cache_dir)) == []


@pytest.mark.parametrize("damage", ["corrupt", "missing", "other rows"])
def test_a_damaged_index_is_one_line_and_verify_repair_writes_it_again(tmp_path, damage):
    cache_dir = scored_cache(tmp_path / "cache")
    good = open_cache(cache_dir).read_index()
    entry = json.loads((cache_dir / MANIFEST_FILE).read_text())["index"]
    index_file = cache_dir / entry["path"]
    if damage == "corrupt":
        index_file.write_bytes(index_file.read_bytes()[:-3] + b"xyz")
    elif damage == "missing":
        index_file.unlink()
    else:  # a valid index of another cache, checksum and all, named by this manifest
        other = scored_cache(tmp_path / "other", sequences=31)
        other_entry = json.loads((other / MANIFEST_FILE).read_text())["index"]
        shutil.copy(other / other_entry["path"], index_file)
        manifest = json.loads((cache_dir / MANIFEST_FILE).read_text())
        manifest["index"] |= {"sha256": other_entry["sha256"], "bytes": other_entry["bytes"]}
        (cache_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    message = {"corrupt": "checksum mismatch", "missing": "is missing",
               "other rows": "does not list the rows"}[damage]
    with pytest.raises(CacheError, match=message) as error:
        split_rows(open_cache(cache_dir), 0.2, Selection(), seed=0)
    assert "\n" not in str(error.value) and "verify" in str(error.value)
    with pytest.raises(CacheError, match=message):
        verify_cache(str(cache_dir))
    assert verify_cache(str(cache_dir), repair=True) == []
    repaired = open_cache(cache_dir).read_index()
    np.testing.assert_array_equal(repaired.scores, good.scores)
    assert len(list(cache_dir.glob("index-*"))) == 1


def test_finalize_reads_no_shard_bytes_of_an_unscored_build(tmp_path, tiny_cache, monkeypatch):
    cache_dir = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache_dir)
    want = json.loads((tiny_cache / MANIFEST_FILE).read_text())
    (cache_dir / MANIFEST_FILE).unlink()
    for index_file in cache_dir.glob("index-*"):
        index_file.unlink()
    counter = CountingShardBytes(monkeypatch)
    finalize_cache(str(cache_dir))
    assert counter.files == []
    assert json.loads((cache_dir / MANIFEST_FILE).read_text()) == want
    assert np.isnan(open_cache(cache_dir).read_index().scores).all()
