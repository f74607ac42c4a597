"""Reference scoring (MiniPLM difference sampling) and rescoring of a finished cache.

A sequence's score is the mean over target positions 0..L-2 of
`teacher target logprob - reference target logprob`: high where the teacher knows much more than a
small reference model. The builder fills it in the same pass as the teacher (`--reference`);
`rescore_cache` recomputes it for an existing cache with another reference, without the teacher.
The manifest records the reference's identity and, for a reference trained by `student_train`, the
summary of that run (preset, selection, steps, tokens) that it saved beside the weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from tqdm.auto import tqdm

from teacher_cache.backends import BackendConfig, Targets, TeacherBackend, create_backend
from teacher_cache.errors import CacheError
from teacher_cache.format import (
    JOURNAL_FILE,
    RESCORE_DIR,
    SCORE_REFERENCE_KEY,
    SHARD_DIR,
    TRAINING_FILE,
    Manifest,
    ShardInfo,
    read_build_record,
    read_manifest,
    read_shard,
    rescore_dir,
    rescored_shard_name,
    score_stats,
    serialize_shard,
    shard_info_name,
)
from teacher_cache.index import publish_manifest, read_score_column
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
            backend, BackendConfig(reference.path, targets=Targets("top_k", 1),
                                   batch_size=batch_size, dtype=dtype))

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


def check_same_tokenizer(reference: Teacher, tokenizer_sha256: str) -> None:
    if reference.tokenizer_sha256 != tokenizer_sha256:
        raise CacheError(f"reference {reference.path}: its tokenizer (sha256 "
                         f"{reference.tokenizer_sha256[:12]}) differs from the cache's teacher "
                         f"tokenizer ({tokenizer_sha256[:12]}); a reference must share it")


def check_vocabulary(reference: Teacher, vocab_size: int) -> None:
    """A reference must give a logprob to every token id the teacher's vocabulary holds."""
    from transformers import AutoConfig

    theirs = AutoConfig.from_pretrained(reference.path).vocab_size
    if theirs < vocab_size:
        raise CacheError(f"reference {reference.path}: its vocabulary ({theirs:,} tokens) is "
                         f"smaller than the cache's teacher vocabulary ({vocab_size:,}); use a "
                         f"reference with the teacher's full vocabulary")


def is_scored_by(location: Location, manifest: Manifest, reference: Teacher) -> bool:
    """A complete cache whose every shard (read and verified) holds scores from these reference
    weights, as its manifest says."""
    scored = (manifest.score or {}).get("reference") or {}
    if not manifest.complete or scored.get("weights_sha256") != reference.weights_sha256:
        return False
    built_by = _build_reference(location)
    for info in manifest.shards:
        table = read_shard(location, info)
        metadata = table.schema.metadata or {}
        made_by = metadata.get(SCORE_REFERENCE_KEY, b"").decode() or built_by
        if made_by != reference.weights_sha256 or table.column("score").null_count:
            return False
    return True


def rescore_cache(cache: str, reference_spec: str, batch_size: int = 8, dtype: str = "auto",
                  progress: bool = True) -> Manifest:
    """Recompute every shard's `score` column with another reference: all shards or none.

    Readers keep the current version meanwhile: each rescored shard goes to a new file named by its
    content, recorded under `rescore/REF/`; once all are written, one atomic write of the manifest
    switches to them, then the build's shard markers follow and the old files are deleted. A kill
    leaves the previous version intact; rerunning with the same reference resumes, another one is
    refused until that rescore is finished or abandoned. A cache whose every shard already holds
    this reference's scores is left as it is.
    """
    location = resolve(cache)
    manifest = read_manifest(location)
    if not manifest.complete:
        raise CacheError(f"{location.uri}: the cache is incomplete; finish its build first")
    reference = resolve_teacher(reference_spec)
    check_same_tokenizer(reference, manifest.tokenizer["sha256"])
    check_vocabulary(reference, manifest.vocab_size)
    journal = rescore_dir(reference.weights_sha256)
    _refuse_other_rescores(location, journal)
    if location.exists(journal) and _already_switched(location, manifest, journal):
        _clean_up_after_switch(location, manifest)
        return manifest
    if not location.exists(journal) and is_scored_by(location, manifest, reference):
        return manifest
    _start_journal(location, manifest, reference, journal)

    scorer: ReferenceScorer | None = None
    new_infos: list[ShardInfo] = []
    scores: list[np.ndarray] = []
    try:
        for info in tqdm(manifest.shards, desc="rescore", unit="shard", disable=not progress):
            marker = shard_info_name(info.index)
            if location.exists(journal, marker):  # rescored by an earlier, interrupted run
                new_infos.append(ShardInfo.from_json(location.read_bytes(journal, marker)))
                scores.append(read_score_column(location, new_infos[-1]))
                continue
            table = read_shard(location, info)
            scorer = scorer or ReferenceScorer(reference, manifest.tokenizer["sha256"],
                                               batch_size=batch_size, dtype=dtype)
            new_info, shard_scores = _rescore_shard(location, manifest, info, table, scorer,
                                                    reference)
            location.write_bytes_atomic(new_info.to_json().encode(), journal, marker)
            new_infos.append(new_info)
            scores.append(shard_scores)
    finally:
        if scorer is not None:
            scorer.close()

    manifest.shards = new_infos
    manifest.totals["bytes"] = sum(s.bytes for s in new_infos)
    manifest.build.pop("rescoring", None)  # left by versions that rescored in place
    all_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    manifest.score = {"reference": reference_entry(reference), "stats": score_stats(all_scores)}
    publish_manifest(location, manifest, all_scores)  # the switch
    _clean_up_after_switch(location, manifest)
    return manifest


def _refuse_other_rescores(location: Location, journal: str) -> None:
    selector = pafs.FileSelector(location.path(RESCORE_DIR), allow_not_found=True)
    for entry in location.fs.get_file_info(selector):
        name = f"{RESCORE_DIR}/{entry.base_name}"
        if entry.type == pafs.FileType.Directory and name != journal:
            started = _read_journal(location, name) or {}
            raise CacheError(
                f"{location.uri}: an interrupted `score` with reference "
                f"{started.get('reference', {}).get('path', entry.base_name)} is pending in "
                f"{name}; rerun it with that reference to finish it, or delete "
                f"{location.path(RESCORE_DIR)} to abandon it (the cache is unchanged)")


def _start_journal(location: Location, manifest: Manifest, reference: Teacher,
                   journal: str) -> None:
    """Record what this rescore starts from; a journal from another starting point (the cache was
    rebuilt or repaired since) is discarded with the files it made."""
    base = {"reference": reference.identity(), "base": [s.sha256 for s in manifest.shards]}
    if location.exists(journal, JOURNAL_FILE):
        if _read_journal(location, journal) == base:
            return
        _clean_up_after_switch(location, manifest)
    location.write_bytes_atomic(json.dumps(base).encode(), journal, JOURNAL_FILE)


def _read_journal(location: Location, journal: str) -> dict | None:
    """The journal's record; None if there is none or it is damaged (it is written atomically, so
    only something else damages it: then this rescore starts over, as from another base)."""
    try:
        record = json.loads(location.read_bytes(journal, JOURNAL_FILE))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _already_switched(location: Location, manifest: Manifest, journal: str) -> bool:
    """The manifest already lists what the journal recorded: a kill after the switch."""
    markers = [shard_info_name(s.index) for s in manifest.shards]
    return all(location.exists(journal, m) for m in markers) and manifest.shards == [
        ShardInfo.from_json(location.read_bytes(journal, m)) for m in markers]


def _clean_up_after_switch(location: Location, manifest: Manifest) -> None:
    """Make the build's shard markers name the manifest's files (so a rerun of the build keeps
    them), delete every shard file the manifest does not list, then the rescore journal."""
    for info in manifest.shards:
        text = info.to_json().encode()
        marker = shard_info_name(info.index)
        if not location.exists(SHARD_DIR, marker) or location.read_bytes(SHARD_DIR,
                                                                         marker) != text:
            location.write_bytes_atomic(text, SHARD_DIR, marker)
    listed = {info.path for info in manifest.shards}
    for name in location.list(SHARD_DIR):
        if name.endswith(".arrow") and f"{SHARD_DIR}/{name}" not in listed:
            location.delete(SHARD_DIR, name)
    if location.exists(RESCORE_DIR):
        location.fs.delete_dir(location.path(RESCORE_DIR))


def _build_reference(location: Location) -> str | None:
    """The weights sha256 of the reference the build scored with, None if it had none."""
    record = read_build_record(location)
    reference = record.reference if record else None
    return (reference or {}).get("weights_sha256")


def _rescore_shard(location: Location, manifest: Manifest, info: ShardInfo, table: pa.Table,
                   scorer: ReferenceScorer, reference: Teacher) -> tuple[ShardInfo, np.ndarray]:
    """Write the shard with new scores to a new file (named by its content); its ShardInfo and
    the scores."""
    seq_len = manifest.seq_len
    input_ids = table.column("input_ids").combine_chunks().flatten().to_numpy()
    teacher_target = table.column("target_logprobs").combine_chunks().flatten().to_numpy()
    scores = scorer.score(input_ids.reshape(-1, seq_len),
                          teacher_target.reshape(-1, seq_len))
    rescored = table.set_column(table.schema.get_field_index("score"), "score",
                                pa.array(scores, type=pa.float32()))
    rescored = rescored.replace_schema_metadata(
        {**(table.schema.metadata or {}), SCORE_REFERENCE_KEY: reference.weights_sha256.encode()})
    data = serialize_shard(rescored.combine_chunks().to_batches())
    sha256 = hashlib.sha256(data).hexdigest()
    name = rescored_shard_name(info.index, sha256)
    location.write_bytes_atomic(data, SHARD_DIR, name)
    return replace(info, path=f"{SHARD_DIR}/{name}", sha256=sha256, bytes=len(data)), scores
