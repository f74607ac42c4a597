"""`python -m teacher_cache verify [--repair]`: check every shard a cache lists and its row index;
drop bad shards, rewrite a bad index.

Repair marks the manifest incomplete, then deletes each bad shard's `.json` marker and its file, so
the same build command rebuilds exactly those shards (it skips every shard whose marker exists) and
its finalize writes a new index. With every shard intact, a bad or missing index is written again
from the shards' score columns.
"""

from __future__ import annotations

import numpy as np

from teacher_cache.errors import CacheError, ShardError
from teacher_cache.format import (
    SHARD_DIR,
    read_manifest,
    read_shard,
    shard_info_name,
    write_manifest,
)
from teacher_cache.index import publish_manifest, read_index
from teacher_cache.storage import resolve


def verify_cache(cache: str, repair: bool = False) -> list[ShardError]:
    """What is wrong with each shard of CACHE's manifest that is missing, corrupt or unreadable;
    with `repair`, those shards are dropped. A bad row index (all shards intact) is a CacheError
    without `repair`, and is rewritten with it."""
    location = resolve(cache)
    manifest = read_manifest(location)
    bad, scores = [], []
    for info in manifest.shards:
        try:
            scores.append(read_shard(location, info).column("score").to_numpy(
                zero_copy_only=False).astype(np.float32))
        except ShardError as e:
            bad.append(e)
    if repair and bad:
        manifest.complete = False
        write_manifest(location, manifest)
        for error in bad:
            location.delete(SHARD_DIR, shard_info_name(error.info.index))
            location.delete(error.info.path)
    if bad or manifest.index is None:  # a format-2 cache has no index to check
        return bad
    try:
        read_index(location, manifest)
    except CacheError:
        if not repair:
            raise
        publish_manifest(location, manifest, np.concatenate(scores) if scores
                         else np.zeros(0, np.float32))
    return bad
