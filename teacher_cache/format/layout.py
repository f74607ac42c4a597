"""The layout of a cache: every file and folder name, and the build stamp its shards carry
(docs/cache-format.md, "Layout")."""

from __future__ import annotations

import hashlib
import json
from typing import Any

MANIFEST_FILE = "manifest.json"
BUILD_FILE = "build.json"
SHARD_DIR = "shards"
WORKER_DIR = "workers"
RESCORE_DIR = "rescore"
PACKED_DIR = "packed"  # the pack stage's tokens, until the manifest is complete (pack.py)
JOURNAL_FILE = "started.json"  # in a rescore dir: the reference and the shards it started from
# A model saved by student_train carries how it was trained in this file of its directory.
TRAINING_FILE = "training.json"


# Schema metadata key of a shard's Arrow file: the build_id() of the build that wrote it.
BUILD_ID_METADATA = b"distill.build"


def build_id(identity: dict[str, Any]) -> str:
    """A short hash of a build identity, stamped on every shard the build writes. The reference
    is left out: `score` rewrites shards with another reference's scores, keeping their stamp."""
    stamped = {k: v for k, v in identity.items() if not k.startswith("reference.")}
    return hashlib.sha256(json.dumps(stamped, sort_keys=True).encode()).hexdigest()[:16]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.arrow"


def shard_info_name(index: int) -> str:
    return f"shard-{index:06d}.json"


def rescored_shard_name(index: int, sha256: str) -> str:
    """A shard file `score` wrote, named by its content: no file a manifest lists ever changes."""
    return f"shard-{index:06d}.{sha256[:16]}.arrow"


# Arrow schema metadata of a shard `score` wrote: the reference weights that made its scores (a
# shard without it was scored by the build's reference, if any).
SCORE_REFERENCE_KEY = b"distill.score_reference"


def partition_name(index: int) -> str:
    """Under PACKED_DIR/PLAN: the pack stage's tokens of corpus partition `index` (pack.py)."""
    return f"part-{index:05d}.arrow"


def partition_info_name(index: int) -> str:
    return f"part-{index:05d}.json"


def worker_report_name(worker_index: int, num_workers: int) -> str:
    return f"worker-{worker_index}-of-{num_workers}.json"


def rescore_dir(reference_weights_sha256: str) -> str:
    return f"{RESCORE_DIR}/{reference_weights_sha256[:16]}"

