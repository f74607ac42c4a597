"""`python -m teacher_cache verify [--repair]`: check every shard a cache lists; drop bad ones.

Repair marks the manifest incomplete, then deletes each bad shard's `.json` marker and its file, so
the same build command rebuilds exactly those shards (it skips every shard whose marker exists).
"""

from __future__ import annotations

from teacher_cache.format import MANIFEST_FILE, SHARD_DIR, ShardError, read_shard, shard_info_name
from teacher_cache.reader import read_manifest
from teacher_cache.storage import resolve


def verify_cache(cache: str, repair: bool = False) -> list[ShardError]:
    """What is wrong with each shard of CACHE's manifest that is missing, corrupt or unreadable;
    with `repair`, those shards are dropped."""
    location = resolve(cache)
    manifest = read_manifest(location)
    bad = []
    for info in manifest.shards:
        try:
            read_shard(location, info)
        except ShardError as e:
            bad.append(e)
    if repair and bad:
        manifest.complete = False
        location.write_bytes_atomic(manifest.to_json().encode(), MANIFEST_FILE)
        for error in bad:
            location.delete(SHARD_DIR, shard_info_name(error.info.index))
            location.delete(error.info.path)
    return bad
