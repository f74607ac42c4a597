"""docs/scale-out.md's Ray recipe: one task per worker, a dead worker retried, then finalize."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import shard_bytes

from teacher_cache import open_cache
from teacher_cache.finalize import finalize_cache

ray = pytest.importorskip("ray", reason="ray is part of the dev environment (make install)")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=80 * 2**20,
             runtime_env={"env_vars": {"DISTILL_HOME": os.environ["DISTILL_HOME"]}})
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_workers_with_a_crash_and_retry_equal_one_worker(tmp_path: Path, tiny_cache: Path,
                                                             tiny_build_config, local_ray):
    out = tmp_path / "cache"
    crashed = tmp_path / "worker-0-crashed"

    # Defined here so that Ray pickles it by value (workers cannot import test modules).
    @ray.remote(num_cpus=1, max_retries=1)
    def build_worker(config, crash_marker: str | None) -> tuple[int, int]:
        from teacher_cache import build as build_module

        if crash_marker is not None and not os.path.exists(crash_marker):
            open(crash_marker, "w").close()
            write_shard = build_module.write_shard

            def write_then_die(*args, **kwargs):
                write_shard(*args, **kwargs)
                os._exit(1)  # the worker process dies right after its first shard

            build_module.write_shard = write_then_die
        summary = build_module.build_cache(config)
        return summary.shards_built, summary.shards_skipped

    results = ray.get([
        build_worker.remote(tiny_build_config(out, num_workers=2, worker_index=index),
                            str(crashed) if index == 0 else None)
        for index in range(2)])

    assert crashed.exists()
    assert results == [(1, 1), (2, 0)]  # worker 0's retry resumed after its first shard
    manifest = finalize_cache(str(out))
    assert manifest.complete and manifest.build["workers"] == 2
    assert shard_bytes(out) == shard_bytes(tiny_cache)
    assert manifest.shards == open_cache(tiny_cache).manifest.shards
