"""Reference scoring (MiniPLM difference sampling) and rescoring of a finished cache.

A sequence's score is the mean over target positions 0..L-2 of
`teacher target logprob - reference target logprob`: high where the teacher knows much more than a
small reference model. The builder fills it in the same pass as the teacher (`--reference`);
`rescore_cache` recomputes it for an existing cache with another reference, without the teacher.
The manifest records the reference's identity and, for a reference trained by `student_train`, the
summary of that run (preset, selection, steps, tokens) that it saved beside the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from teacher_cache.backends import BackendConfig, Targets, TeacherBackend, create_backend
from teacher_cache.format import (
    MANIFEST_FILE,
    RESCORE_DIR,
    TRAINING_FILE,
    CacheError,
    Manifest,
    ShardInfo,
    read_shard,
    rescore_dir,
    score_stats,
    shard_info_name,
    write_shard,
)
from teacher_cache.reader import read_manifest
from teacher_cache.storage import Location, resolve
from teacher_cache.teacher import Teacher, resolve_teacher

# Runs of student_train from before TRAINING_FILE: RUN/student (the model) beside RUN/summary.json.
OLD_STUDENT_DIR, OLD_TRAINING_SUMMARY = "student", "summary.json"


def sequence_scores(teacher_target: np.ndarray, reference_target: np.ndarray) -> np.ndarray:
    """float32 [B]: mean of teacher - reference target logprobs over positions 0..L-2."""
    diff = teacher_target[:, :-1].astype(np.float64) - reference_target[:, :-1]
    return diff.mean(axis=1).astype(np.float32)


def describe_score_stats(stats: dict[str, object]) -> str:
    """`score_stats` as a few readable lines, for the command line."""
    if not stats.get("count"):
        return "score: no sequence was scored"
    quantiles = stats["quantiles"]
    names = "/".join(f"{float(q) * 100:.0f}" for q in quantiles)
    return (f"score (teacher minus reference logprob per token, mean per sequence) over "
            f"{stats['count']:,} sequences:\n"
            f"  mean {stats['mean']:.3f}  std {stats['std']:.3f}  min {stats['min']:.3f}  "
            f"max {stats['max']:.3f}\n"
            f"  quantiles {names}%: {' '.join(f'{v:.2f}' for v in quantiles.values())}")


class ReferenceScorer:
    """A reference model with the teacher's tokenizer, scoring sequences against teacher targets."""

    def __init__(self, reference: Teacher, tokenizer_sha256: str, backend: str = "torch",
                 batch_size: int = 8, dtype: str = "auto"):
        check_same_tokenizer(reference, tokenizer_sha256)
        self.backend: TeacherBackend = create_backend(
            backend, BackendConfig(reference.path, targets=Targets(k=1), batch_size=batch_size,
                                   dtype=dtype))

    def score(self, input_ids: np.ndarray, teacher_target: np.ndarray) -> np.ndarray:
        reference_target = self.backend.predict(input_ids).target_logprobs
        return sequence_scores(teacher_target, reference_target)

    def close(self) -> None:
        self.backend.close()


def reference_entry(reference: Teacher) -> dict[str, Any]:
    """The manifest's `score.reference`: the identity, plus `training` when the model was saved by
    `student_train` (its TRAINING_FILE, or an older run's summary.json next to the model)."""
    model_dir = Path(reference.path)
    summary = model_dir / TRAINING_FILE
    if not summary.is_file() and model_dir.name == OLD_STUDENT_DIR:
        summary = model_dir.parent / OLD_TRAINING_SUMMARY
    if not summary.is_file():
        return reference.identity()
    try:
        training = json.loads(summary.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{summary}: not valid JSON ({e}); fix or delete it") from None
    return reference.identity() | {"training": training}


def is_scored_by(manifest: Manifest, reference: Teacher) -> bool:
    """A complete cache whose scores already come from these reference weights."""
    scored = (manifest.score or {}).get("reference") or {}
    return manifest.complete and scored.get("weights_sha256") == reference.weights_sha256


def check_same_tokenizer(reference: Teacher, tokenizer_sha256: str) -> None:
    if reference.tokenizer_sha256 != tokenizer_sha256:
        raise CacheError(f"reference {reference.path}: its tokenizer (sha256 "
                         f"{reference.tokenizer_sha256[:12]}) differs from the cache's teacher "
                         f"tokenizer ({tokenizer_sha256[:12]}); a reference must share it")


def rescore_cache(cache: str, reference_spec: str, batch_size: int = 8, dtype: str = "auto",
                  progress: bool = True) -> Manifest:
    """Recompute every shard's `score` column with another reference, resumably.

    A cache already scored by the same reference weights is left as it is. Each shard is
    rewritten atomically with only `score` changed and a marker under `rescore/` records it; the
    manifest is marked incomplete meanwhile (its checksums are stale) and rewritten with the new
    checksums and score statistics at the end. Rerunning after a kill resumes.
    """
    location = resolve(cache)
    manifest = read_manifest(location)
    reference = resolve_teacher(reference_spec)
    check_same_tokenizer(reference, manifest.tokenizer["sha256"])
    if is_scored_by(manifest, reference):
        return manifest
    marker_dir = rescore_dir(reference.weights_sha256)
    if not manifest.complete and "rescoring" not in manifest.build:
        raise CacheError(f"{location.uri}: the cache is incomplete; finish its build first")
    manifest.complete = False
    manifest.build["rescoring"] = reference.path
    location.write_bytes_atomic(manifest.to_json().encode(), MANIFEST_FILE)

    scorer: ReferenceScorer | None = None
    new_infos: list[ShardInfo] = []
    try:
        for info in tqdm(manifest.shards, desc="rescore", unit="shard", disable=not progress):
            marker = shard_info_name(info.index)
            if location.exists(marker_dir, marker):
                new_infos.append(ShardInfo.from_json(location.read_bytes(marker_dir, marker)))
                continue
            # Unverified: a kill between the shard write and its marker leaves a valid shard whose
            # checksum is already the new one; recomputing its scores is idempotent.
            table = read_shard(location, info, verify=False)
            scorer = scorer or ReferenceScorer(reference, manifest.tokenizer["sha256"],
                                               batch_size=batch_size, dtype=dtype)
            new_infos.append(_rescore_shard(location, manifest, info, table, scorer))
            location.write_bytes_atomic(new_infos[-1].to_json().encode(), marker_dir, marker)
    finally:
        if scorer is not None:
            scorer.close()

    manifest.shards = new_infos
    manifest.totals["bytes"] = sum(s.bytes for s in new_infos)
    manifest.build.pop("rescoring")
    manifest.complete = True
    manifest.score = {"reference": reference_entry(reference),
                      "stats": score_stats(_all_scores(location, new_infos))}
    location.write_bytes_atomic(manifest.to_json().encode(), MANIFEST_FILE)
    location.fs.delete_dir(location.path(RESCORE_DIR))
    return manifest


def _rescore_shard(location: Location, manifest: Manifest, info: ShardInfo, table: pa.Table,
                   scorer: ReferenceScorer) -> ShardInfo:
    seq_len = manifest.seq_len
    input_ids = table.column("input_ids").combine_chunks().flatten().to_numpy()
    teacher_target = table.column("target_logprobs").combine_chunks().flatten().to_numpy()
    scores = scorer.score(input_ids.reshape(-1, seq_len),
                          teacher_target.reshape(-1, seq_len))
    rescored = table.set_column(table.schema.get_field_index("score"), "score",
                                pa.array(scores, type=pa.float32()))
    batches = rescored.combine_chunks().to_batches()
    return write_shard(location, info.index, batches, manifest.rows_per_shard)


def _all_scores(location: Location, infos: list[ShardInfo]) -> np.ndarray:
    parts = [read_shard(location, info).column("score").to_numpy(zero_copy_only=False)
             for info in infos]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

