"""The run directory: its lock, what a run of this tool wrote there, and --overwrite.

One process trains into a run directory at a time (`RunLock`). `--overwrite` deletes only what a
run of this tool wrote, never through a symbolic link; the temp files a killed write left behind
go when the next run starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import weakref
from collections.abc import Iterator
from pathlib import Path

from student_train.checkpoint import CHECKPOINT_FILE, SHARDS_DIR, SHARDS_NAME, is_checkpoint
from student_train.config import TrainConfig
from teacher_cache.errors import ConfigError
from teacher_cache.format import TRAINING_FILE

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"  # the finished run's TrainConfig: `--config OUT/config.json` repeats it
STUDENT_DIR = "student"
TENSORBOARD_DIR = "tensorboard"  # --report-to tensorboard's event files
LOCK_FILE = "run.lock"
RUN_FILES = (CHECKPOINT_FILE, SHARDS_DIR, STUDENT_DIR, SUMMARY_FILE, METRICS_FILE, CONFIG_FILE,
             TENSORBOARD_DIR)
# The temp names of atomic writes (teacher_cache.storage: `.tmp-<12 hex>-NAME`) of RUN_FILES; the
# student is written into such a folder too (student_train.model.save_student).
STALE_TEMP = re.compile(r"\.tmp-[0-9a-f]{12}-(" + "|".join(map(re.escape, RUN_FILES)) + r")\Z")


class RunLock:
    """RUN_DIR/run.lock, created exclusively and naming its holder's host and pid. The lock of a
    process of this host that is gone (killed) is taken over, one process at a time; any other is
    refused with one line.
    `release` (or the end of this process) removes it."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.holder = {"host": socket.gethostname(), "pid": os.getpid()}
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._acquire(run_dir)
        except OSError as e:  # a file, a folder this user cannot write, ...
            raise ConfigError(f"{run_dir}: cannot be a run directory ({e.strerror}); choose "
                              f"another --out") from None
        self._finalizer = weakref.finalize(self, _release, self.path, json.dumps(self.holder))

    def release(self) -> None:
        self._finalizer()

    def _acquire(self, run_dir: Path) -> None:
        # Judging a lock stale and removing it is one step for every process of this host: two
        # that found the same dead holder would otherwise both proceed.
        with _folder_locked(run_dir):
            while not self._create():
                try:
                    text = self.path.read_text()
                except FileNotFoundError:  # released meanwhile
                    continue
                if not self._stale(text):
                    raise ConfigError(f"{run_dir}: in use by another student_train run "
                                      f"({self._describe(text)}, {self.path}); wait for it to "
                                      f"end or choose another --out (if no such process runs, "
                                      f"delete {self.path})")
                self.path.unlink()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.holder))
        return True

    def _stale(self, text: str) -> bool:
        holder = _parse(text)
        if holder is None or holder["host"] != self.holder["host"] or holder["pid"] == os.getpid():
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        return False

    @staticmethod
    def _describe(text: str) -> str:
        holder = _parse(text)
        if holder is None:
            return "a lock that names no process"
        return f"pid {holder['pid']} on {holder['host']}"


@contextlib.contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: only that race stays open there
            pass
        yield
    finally:
        os.close(fd)


def _parse(text: str) -> dict | None:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:  # empty: its creator is writing it, or died before it could
        return None
    ok = (isinstance(holder, dict) and isinstance(holder.get("host"), str)
          and type(holder.get("pid")) is int)
    return holder if ok else None


def _release(path: Path, holder: str) -> None:
    # A forked DataLoader worker inherits the finalizer: only the holder itself removes the lock.
    if json.loads(holder)["pid"] != os.getpid():
        return
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == holder:
            path.unlink()


def foreign(path: Path) -> str | None:
    """Why PATH (one of RUN_FILES in a run directory) is not what a run of this tool wrote there,
    or None if it is."""
    if path.is_symlink():
        return "a symbolic link"
    if path.name == STUDENT_DIR and not (path / TRAINING_FILE).is_file():
        return f"a folder without the {TRAINING_FILE} of a student this tool saved"
    if path.name == CHECKPOINT_FILE and not is_checkpoint(path):
        return "not a checkpoint of this version of student_train"
    if path.name == SHARDS_DIR and not (path.is_dir() and all(
            SHARDS_NAME.match(entry.name) for entry in os.scandir(path))):
        return "not a folder of sharded checkpoints of student_train"
    return None


def check_run_dir_path(out: Path) -> None:
    """The run directory must be the folder it was named: not a symbolic link (every write and
    --overwrite would land in its target, maybe a system folder, without a word) and not a
    filesystem root. A link above it is fine: a home folder on another disk is one."""
    if out.is_symlink():
        raise ConfigError(f"{out}: is a symbolic link to {os.path.realpath(out)}; give the folder "
                          f"itself as --out if the run belongs there")
    real = os.path.realpath(out)
    if os.path.dirname(real) == real:
        raise ConfigError(f"{out}: is the root of the filesystem; choose a folder for the run "
                          f"as --out")


def claim_run_dir(config: TrainConfig) -> RunLock:
    """Lock OUT for this run, then prepare it (`prepare_run_dir`)."""
    check_run_dir_path(Path(config.out))
    lock = RunLock(Path(config.out))
    try:
        prepare_run_dir(config)
    except BaseException:
        lock.release()
        raise
    return lock


def prepare_run_dir(config: TrainConfig) -> None:
    """Under the run's lock: the stale temp files of this tool's writes go; a new run never
    replaces an earlier one silently: OUT holding a checkpoint or a student needs --resume
    (continue it) or --overwrite (which deletes the run's files here, and only if this tool wrote
    them). A resumed run replaces its student at the end: that too must be one this tool saved."""
    out = Path(config.out)
    for entry in os.scandir(out):
        if STALE_TEMP.match(entry.name):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    held = [name for name in (CHECKPOINT_FILE, STUDENT_DIR) if os.path.lexists(out / name)]
    if not held:
        return
    if not (config.resume or config.overwrite):
        raise ConfigError(f"{out}: already holds a run ({' and '.join(held)}); pass --resume to "
                          f"continue it, --overwrite to replace it, or choose another --out")
    # --resume: load_checkpoint says what is wrong with a checkpoint it cannot continue.
    flag = "--overwrite deletes" if config.overwrite else "--resume replaces"
    for name in RUN_FILES if config.overwrite else (STUDENT_DIR,):
        if os.path.lexists(out / name) and (why := foreign(out / name)):
            raise ConfigError(f"{out / name}: {why}, not what a run of student_train wrote; "
                              f"{flag} only that: move it away or choose another --out")
    if config.overwrite:
        for name in (STUDENT_DIR, SHARDS_DIR, TENSORBOARD_DIR):
            if (out / name).exists():
                shutil.rmtree(out / name)
        for name in (CHECKPOINT_FILE, SUMMARY_FILE, METRICS_FILE, CONFIG_FILE):
            (out / name).unlink(missing_ok=True)
