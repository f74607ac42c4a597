"""Where a cache lives: local paths and fsspec URLs behind one pyarrow filesystem.

Writes are atomic (`atomic_output`): on a local disk through a temp file, fsync and rename (so a
kill at any moment leaves either the old file or the new one); on object stores a single PUT is
already atomic. Files get the mode the umask gives, like any file a user creates. A write that
fails for want of space or permission is a CacheError naming the file.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs

from teacher_cache.errors import CacheError


@dataclass(frozen=True)
class Location:
    """A directory on some filesystem: `fs` plus the root path inside it."""

    fs: pafs.FileSystem
    root: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        """The full path of PARTS under the root; refuses any that would leave it."""
        return "/".join([self.root.rstrip("/"), *(confined(part) for part in parts)])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def list(self, *parts: str) -> list[str]:
        """Base names of the files directly under a sub-directory (empty if it does not exist)."""
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.File)

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def delete(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.delete_file(self.path(*parts))

    def write_bytes_atomic(self, data: bytes, *parts: str) -> None:
        with atomic_output(self.path(*parts), self.fs) as f:
            f.write(data)

    def create_exclusive(self, data: bytes, *parts: str) -> bool:
        """Write a new file whole, or return False if it already exists. Race-free on a local
        disk (a hard link of the finished temp file fails if the name exists); elsewhere a check
        then a PUT, which two processes can both pass (object stores have no portable exclusive
        create)."""
        try:
            with atomic_output(self.path(*parts), self.fs, exclusive=True) as f:
                f.write(data)
        except FileExistsError:
            return False
        return True


# Write failures a user fixes (room, quota, permissions), reported as one line naming the file.
USER_FIXABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                       errno.EPERM, errno.ENOTDIR}


def confined(relative: str) -> str:
    """RELATIVE if it names something inside a directory: not absolute, no `..`, `.` or empty
    segments (a cache may be copied or moved, and a manifest must not reach outside it)."""
    segments = relative.replace("\\", "/").split("/")
    if relative.startswith(("/", "~")) or ":" in segments[0] or any(
            s in ("", ".", "..") for s in segments):
        raise CacheError(f"{relative!r}: not a path inside the cache directory (absolute, or "
                         f"with '..', '.' or empty parts)")
    return relative


@contextmanager
def atomic_output(target: str | os.PathLike, fs: pafs.FileSystem | None = None,
                  exclusive: bool = False) -> Iterator[BinaryIO]:
    """A binary file whose bytes replace TARGET (a local path, or a path inside `fs`) only once
    the block exits without an error; the one way this project writes a file. `exclusive`:
    FileExistsError, and nothing written, if TARGET exists.

    Local: a temp file beside TARGET, fsync, rename (a hard link if exclusive), fsync of the
    directory. Other filesystems: the bytes are buffered and written in one PUT, so an error in
    the block writes nothing."""
    target = os.fspath(target)
    if fs is not None and not isinstance(fs, pafs.LocalFileSystem):
        buffer = io.BytesIO()
        yield buffer
        if exclusive and fs.get_file_info(target).type != pafs.FileType.NotFound:
            raise FileExistsError(errno.EEXIST, "file exists", target)
        with fs.open_output_stream(target) as f:
            f.write(buffer.getvalue())
        return
    directory = os.path.dirname(os.path.abspath(target))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = _create_temp(directory, os.path.basename(target))
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, target)
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
        tmp = None
        fsync_directory(directory)
    except OSError as e:
        if e.errno in USER_FIXABLE_ERRNOS:
            raise CacheError(f"cannot write {target}: {os.strerror(e.errno)} (the file is "
                             f"unchanged); make room or fix the permissions, then rerun") from e
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_json(target: str | os.PathLike, value: object) -> None:
    """`value` as indented JSON, atomically (`atomic_output`)."""
    with atomic_output(target) as f:
        f.write((json.dumps(value, indent=2) + "\n").encode())


# The temp files of atomic_output: `.tmp-<12 hex>-NAME` beside NAME.
TEMP_NAME = re.compile(r"\.tmp-[0-9a-f]{12}-.")
# A temp file is written from start to rename in one go (a shard, a marker: seconds), so its
# modification time is never older than that while its writer lives; one untouched this long
# belongs to a killed writer, on this host or on another that shares the directory.
STALE_TEMP_S = 3600


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """A new empty file beside `name`, created with mode 0666 so that the umask decides the final
    file's mode (mkstemp would make it 0600)."""
    while True:
        path = os.path.join(directory, f".tmp-{secrets.token_hex(6)}-{name}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def remove_stale_temps(location: Location) -> int:
    """Delete the temp files of atomic_output under a local directory (its subdirectories
    included, symbolic links not followed) that no write has touched for STALE_TEMP_S: those of
    writers killed mid-write. A live writer's temp file is younger and stays. Returns how many
    went; object stores have none (a write is one PUT)."""
    if not location.is_local:
        return 0
    removed, now = 0, time.time()
    for directory, _, names in os.walk(location.root):
        for name in names:
            path = os.path.join(directory, name)
            if TEMP_NAME.match(name) and now - os.lstat(path).st_mtime > STALE_TEMP_S:
                with suppress(FileNotFoundError):  # another build removed it first
                    os.unlink(path)
                    removed += 1
    return removed


def replace_directory(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the local directory SOURCE to TARGET durably: the files directly in it are on disk
    before the rename, and the rename is on disk when this returns."""
    for entry in os.scandir(source):
        if entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as f:
                os.fsync(f.fileno())
    fsync_directory(source)
    os.replace(source, target)
    fsync_directory(os.path.dirname(os.path.abspath(target)))


def fsync_directory(path: str | os.PathLike) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def refuse_writable_by_others(location: Location, *names: str) -> None:
    """CacheError if the local directory or one of `names` in it (those that exist) can be written
    by users other than its owner and group: any of them could replace a manifest and its
    checksums along with the shards (docs/reliability.md, "Sharing a cache")."""
    if not location.is_local:
        return
    for path in [location.root, *(location.path(n) for n in names)]:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            continue
        if mode & stat.S_IWOTH:
            raise CacheError(f"{path} is writable by every user (mode {stat.filemode(mode)}): "
                             f"anyone could replace the cache's files and their checksums; "
                             f"`chmod -R o-w {location.root}` to read it")


def resolve(uri: str | os.PathLike) -> Location:
    """A local path, or any URL that pyarrow or fsspec understands (s3://, gs://, memory://...)."""
    uri = os.fspath(uri)
    if "://" not in uri or uri.startswith("file://"):
        path = os.path.abspath(uri.removeprefix("file://"))
        return Location(pafs.LocalFileSystem(), path, path)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid:  # not a filesystem pyarrow knows natively: go through fsspec
        import fsspec

        try:
            fsspec_fs, path = fsspec.core.url_to_fs(uri)
        except (ValueError, ImportError) as e:  # an unknown protocol, or its package is missing
            raise CacheError(f"{uri}: cannot open this location ({e})") from e
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
    except OSError as e:  # pyarrow's own (s3://, gs://): e.g. the bucket's region is unreachable
        raise CacheError(f"{uri}: cannot open this location ({e})") from e
    location = Location(fs, path, uri)
    _check_reachable(location)
    return location


def _check_reachable(location: Location) -> None:
    """CacheError, one line, unless the store answers and an S3 location's bucket exists: the
    first of the many calls a build or a reader makes would otherwise fail deep inside them."""
    try:
        location.fs.get_file_info(location.root)
        bucket = location.root.split("/")[0]
        missing = (isinstance(location.fs, pafs.S3FileSystem)
                   and location.fs.get_file_info(bucket).type == pafs.FileType.NotFound)
    except OSError as e:
        raise CacheError(f"{location.uri}: cannot reach this location ({e}); check the endpoint "
                         f"(AWS_ENDPOINT_URL, or ?endpoint_override= in the URL), the network "
                         f"and the credentials") from e
    if missing:
        raise CacheError(f"{location.uri}: bucket {bucket!r} does not exist; create it first")
