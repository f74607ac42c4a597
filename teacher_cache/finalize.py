"""Finalize a cache: check that every expected shard is there, then write the index and manifest.

Each worker leaves `workers/worker-W-of-N.json` (a WorkerReport) when it has gone through the whole
corpus; the reports give the number of sequences, hence the expected shards `0 .. ceil(S / R) - 1`.
Every shard must carry the id of the build in `build.json`: a shard another build wrote into the
same directory (two builds started together, say) is refused, never mixed into the manifest.
Finalize trusts the size and sha256 each shard's marker recorded as it was written (the trainer
checks them as it reads a shard, `verify` checks all): it reads no shard, except the score column
of shards that hold scores, so its cost does not grow with the cache's bytes.
"""

from __future__ import annotations

import math

import numpy as np

from teacher_cache.errors import CacheError
from teacher_cache.format import (
    BUILD_FILE,
    SHARD_DIR,
    Manifest,
    ShardInfo,
    WorkerReport,
    build_id,
    read_build_record,
    read_manifest_if_any,
    read_shard_info,
    read_worker_reports,
    score_stats,
    shard_info_name,
)
from teacher_cache.index import is_rescored, publish_manifest, read_score_column
from teacher_cache.pack import drop_packed_tokens
from teacher_cache.storage import Location, resolve


def finalize_cache(out: str) -> Manifest:
    """Check that all shards are there (markers, rows, build) and write the index and
    `manifest.json`."""
    location = resolve(out)
    record = read_build_record(location)
    if record is None:
        raise CacheError(f"{location.uri}: no {BUILD_FILE}; nothing was built here yet "
                         f"(run `python -m teacher_cache build --out {location.uri}` first)")
    reports = _worker_reports(location)
    manifest = record.manifest
    sequences = reports[0].sequences
    infos = _finished_shards(location, sequences, manifest.rows_per_shard, reports[0].num_workers)
    _check_same_build(location, infos, build_id(record.identity))

    scored_build = bool(record.reference)
    scores = []
    for info in infos:
        expected_rows = min(manifest.rows_per_shard, sequences - info.first_seq_id)
        if info.rows != expected_rows:
            raise CacheError(f"{location.uri}/{info.path}: {info.rows} rows, expected "
                             f"{expected_rows}; delete it and its .json and rerun the build")
        if not location.exists(info.path):
            raise CacheError(f"{location.uri}/{info.path}: its marker is there but the shard is "
                             f"not; delete {SHARD_DIR}/{shard_info_name(info.index)} and rerun "
                             f"the build")
        holds_scores = scored_build or is_rescored(info)
        scores.append(read_score_column(location, info) if holds_scores
                      else np.full(info.rows, np.nan, np.float32))
    scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)

    dtypes = sorted({r.dtype for r in reports if r.dtype})
    manifest.teacher["dtype"] = ",".join(dtypes) or manifest.teacher["dtype"]
    manifest.corpus |= {"documents": reports[0].documents,
                        "skipped": sorted({f for r in reports for f in r.skipped_files}),
                        "dropped_tokens": reports[0].dropped_tokens,
                        "capped_by_max_tokens": reports[0].capped}
    manifest.shards = infos
    manifest.totals = {"sequences": sequences, "tokens": sum(i.tokens for i in infos),
                       "bytes": sum(i.bytes for i in infos)}
    covered = [i for i in infos if i.uncovered_mass is not None]
    if covered:  # sampled from a backend's top-K' only: how much teacher mass that left out
        manifest.targets["uncovered_mass"] = round(
            sum(i.uncovered_mass * i.tokens for i in covered) / sum(i.tokens for i in covered), 6)
    computed = sum(r.tokens_computed for r in reports)
    compute_s = sum(r.compute_s for r in reports)
    manifest.build = {"backend": manifest.teacher["backend"], "workers": reports[0].num_workers,
                      "tokens_computed": computed, "compute_s": round(compute_s, 3),
                      "tokens_per_s": round(computed / compute_s, 1) if compute_s else None}
    previous = read_manifest_if_any(location)
    if scored_build:
        manifest.score = {"reference": record.reference, "stats": score_stats(scores)}
    elif previous is not None and previous.score and previous.shards == infos:
        manifest.score = previous.score  # `score` rescored these very files since the build
    manifest.complete = True
    publish_manifest(location, manifest, scores)
    drop_packed_tokens(location)  # the shards hold every packed token now
    return manifest


def _worker_reports(location: Location) -> list[WorkerReport]:
    reports = read_worker_reports(location)
    if not reports:
        raise CacheError(f"{location.uri}: no worker has finished going through the corpus; "
                         f"run (or rerun) the build workers, then finalize")
    counts = {r.sequences for r in reports}
    if len(counts) > 1:
        raise CacheError(f"{location.uri}: workers packed different numbers of sequences "
                         f"({sorted(counts)}); the corpus changed between runs, rebuild with "
                         f"--overwrite")
    return reports


def _check_same_build(location: Location, infos: list[ShardInfo], build: str) -> None:
    foreign = [info.path for info in infos if info.build != build]
    if foreign:
        raise CacheError(f"{location.uri}: {len(foreign)} shards were written by another build "
                         f"than the one in {BUILD_FILE} ({', '.join(foreign[:5])}); delete them "
                         f"and their .json files and rerun the build, or rebuild with --overwrite")


def _finished_shards(location: Location, sequences: int, rows_per_shard: int,
                     num_workers: int) -> list[ShardInfo]:
    infos = [read_shard_info(location, i) for i in range(math.ceil(sequences / rows_per_shard))]
    missing = [i for i, info in enumerate(infos) if info is None]
    if missing:
        workers = sorted({i % num_workers for i in missing})
        raise CacheError(f"{location.uri}: {len(missing)} shards missing (e.g. "
                         f"{', '.join(map(str, missing[:5]))}); rerun worker(s) "
                         f"{', '.join(map(str, workers))} of {num_workers}, then finalize")
    return infos
