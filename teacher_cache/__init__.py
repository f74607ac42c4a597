"""Teacher-logit cache: run a teacher once over a corpus, keep its top-k predictions."""

from teacher_cache.errors import CacheError
from teacher_cache.format import CacheBatch, Manifest, ShardInfo
from teacher_cache.reader import TeacherCache, open_cache

__all__ = ["CacheBatch", "CacheError", "Manifest", "ShardInfo", "TeacherCache", "open_cache"]
