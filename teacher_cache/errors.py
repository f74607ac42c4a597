"""User errors: input a person can fix, which every command line reports as one line, exit code 2.

The home of the whole family, the trainer's included, and of the helper the mains share; it lives
in teacher_cache because student_train imports teacher_cache, never the reverse.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec

if TYPE_CHECKING:
    from teacher_cache.format import ShardInfo
    from teacher_cache.storage import Location

P = ParamSpec("P")
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Input a user can fix (a flag, a file, a model, a cache); the message says which and what to
    do. Anything else that escapes a main is a bug and keeps its traceback."""


class CacheError(UserError):
    """A cache that cannot be read or written as asked; the message says which file and why."""


class CorpusError(CacheError):
    """A corpus that cannot be read as asked. A CacheError, the error of the build it feeds, so
    callers catching that still catch it."""


class TeacherError(CacheError):
    """A teacher or reference model that cannot be found, loaded or run with the given settings."""


class ShardError(CacheError):
    """A shard that cannot be read as its ShardInfo says: `problem` says why, in one line."""

    def __init__(self, location: Location, info: ShardInfo, problem: str):
        self.info, self.problem = info, problem
        super().__init__(f"{location.uri.rstrip('/')}/{info.path}: {problem}; `python -m "
                         f"teacher_cache verify --cache {location.uri} --repair` drops it, then "
                         f"the same build command rebuilds it")


class ShardMissing(ShardError):
    """A shard file the manifest lists is not there (a reader may find a newer manifest)."""


class IndexMissing(CacheError):
    """The index file a manifest names is gone (a reader may find a newer manifest)."""


class ConfigError(UserError):
    """A configuration that cannot run (bad flag or config file, student/cache mismatch); says
    what to fix."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from; says which file and what to do."""


class TrainingDiverged(ConfigError):
    """A loss, gradient or weight that is not finite: the run stops before writing any of it."""


def one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def reports_user_errors(main: Callable[P, int]) -> Callable[P, int]:
    """Wrap a command-line main: a UserError becomes `error: <message>` on one line of stderr and
    exit code 2."""

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return EXIT_USER_ERROR

    return wrapper
