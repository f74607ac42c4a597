"""The teacher cache format: the one definition both the builder and every reader import.

The contract, for people and for readers in other languages, is docs/cache-format.md. Here:
`layout` names every file of a cache, `codec` holds a shard's Arrow schema and the codec of its
rows, `records` the JSON records (Targets, ShardInfo, WorkerReport, Manifest), `shards` shard
I/O, `stats` the score statistics. Version 1 and 2 caches are still read.
"""

from teacher_cache.format.codec import (
    COLUMNS,
    COMPRESSION,
    MAX_K,
    SAMPLE_COLUMNS,
    TOP_K_COLUMNS,
    CacheBatch,
    Column,
    TargetKind,
    column_types,
    counts_to_logprobs,
    decode_batch,
    encode_batch,
    logprobs_to_counts,
    schema,
    unscored,
)
from teacher_cache.format.layout import (
    BUILD_FILE,
    BUILD_ID_METADATA,
    JOURNAL_FILE,
    MANIFEST_FILE,
    PACKED_DIR,
    RESCORE_DIR,
    SCORE_REFERENCE_KEY,
    SHARD_DIR,
    TRAINING_FILE,
    WORKER_DIR,
    build_id,
    partition_info_name,
    partition_name,
    rescore_dir,
    rescored_shard_name,
    shard_info_name,
    shard_name,
    worker_report_name,
)
from teacher_cache.format.records import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_VOCAB,
    READABLE_VERSIONS,
    TARGET_PREFIXES,
    BuildRecord,
    Manifest,
    ShardInfo,
    Targets,
    WorkerReport,
    read_build_record,
    read_manifest,
    read_manifest_if_any,
    read_worker_report,
    read_worker_reports,
    write_manifest,
    write_worker_report,
)
from teacher_cache.format.shards import (
    RECORD_BATCH_ROWS,
    read_shard,
    read_shard_info,
    serialize_shard,
    write_shard,
)
from teacher_cache.format.stats import SCORE_QUANTILES, score_stats

__all__ = [
    "BUILD_FILE", "BUILD_ID_METADATA", "COLUMNS", "COMPRESSION", "FORMAT_NAME", "FORMAT_VERSION",
    "JOURNAL_FILE", "MANIFEST_FILE", "MAX_K", "MAX_VOCAB", "PACKED_DIR", "READABLE_VERSIONS",
    "RECORD_BATCH_ROWS", "RESCORE_DIR", "SAMPLE_COLUMNS", "SCORE_QUANTILES", "SCORE_REFERENCE_KEY",
    "SHARD_DIR", "TARGET_PREFIXES", "TOP_K_COLUMNS", "TRAINING_FILE", "WORKER_DIR", "BuildRecord",
    "CacheBatch", "Column", "Manifest", "ShardInfo", "TargetKind", "Targets", "WorkerReport",
    "build_id", "column_types", "counts_to_logprobs", "decode_batch", "encode_batch",
    "logprobs_to_counts", "partition_info_name", "partition_name", "read_build_record",
    "read_manifest", "read_manifest_if_any", "read_shard", "read_shard_info", "read_worker_report",
    "read_worker_reports", "rescore_dir", "rescored_shard_name", "schema", "score_stats",
    "serialize_shard", "shard_info_name", "shard_name", "unscored", "worker_report_name",
    "write_manifest", "write_shard", "write_worker_report",
]
