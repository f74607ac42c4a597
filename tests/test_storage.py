"""storage.atomic_output, the one write path: a file is replaced whole or not at all, locally and
through fsspec URLs."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from student_train.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from teacher_cache.errors import CacheError
from teacher_cache.storage import atomic_output, replace_directory, resolve


class Interrupted(Exception):
    pass


def test_local_write_replaces_the_file_or_leaves_it(tmp_path: Path):
    target = tmp_path / "new" / "dir" / "file.json"
    with atomic_output(target) as f:
        f.write(b"old")
    with pytest.raises(Interrupted), atomic_output(target) as f:
        f.write(b"half of the new")
        raise Interrupted
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"], "a temp file was left"
    with atomic_output(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"


def test_fsspec_url_write_is_one_put_or_nothing():
    location = resolve(f"memory://distill-test-{uuid.uuid4().hex}/cache")
    location.write_bytes_atomic(b"old", "sub", "file.json")
    with pytest.raises(Interrupted), atomic_output(location.path("sub", "file.json"),
                                                   location.fs) as f:
        f.write(b"half of the new")
        raise Interrupted
    with pytest.raises(Interrupted), atomic_output(location.path("other.json"), location.fs) as f:
        raise Interrupted
    assert location.read_bytes("sub", "file.json") == b"old"
    assert not location.exists("other.json")


def test_an_interrupted_checkpoint_leaves_the_previous_one(tmp_path: Path):
    save_checkpoint(tmp_path, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise Interrupted

    with pytest.raises(Interrupted):
        save_checkpoint(tmp_path, {"step": 2, "bad": Unpicklable()})
    assert load_checkpoint(tmp_path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_replace_directory_moves_a_built_directory_into_place(tmp_path: Path):
    build = tmp_path / ".build" / "model"
    build.mkdir(parents=True)
    (build / "config.json").write_text(json.dumps({"ok": True}))
    replace_directory(build, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text()) == {"ok": True}
    assert not build.exists()


def test_an_unknown_url_scheme_is_a_cache_error():
    with pytest.raises(CacheError, match="nosuch://x: cannot open this location"):
        resolve("nosuch://x")
