"""Where a cache lives: local paths and fsspec URLs behind one pyarrow filesystem.

Writes are atomic: on a local disk through a temp file, fsync and rename (so a kill at any moment
leaves either the old file or the new one); on object stores a single PUT is already atomic.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

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
        return "/".join([self.root.rstrip("/"), *parts])

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
        target = self.path(*parts)
        if not self.is_local:
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        directory = os.path.dirname(target)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-",
                                   suffix="-" + os.path.basename(target))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def resolve(uri: str | os.PathLike) -> Location:
    """A local path, or any URL that pyarrow or fsspec understands (s3://, gs://, memory://...)."""
    uri = os.fspath(uri)
    if "://" not in uri or uri.startswith("file://"):
        path = os.path.abspath(uri.removeprefix("file://"))
        return Location(pafs.LocalFileSystem(), path, path)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception:  # not a filesystem pyarrow knows natively: go through fsspec
        import fsspec

        try:
            fsspec_fs, path = fsspec.core.url_to_fs(uri)
        except (ValueError, ImportError) as e:  # an unknown protocol, or its package is missing
            raise CacheError(f"{uri}: cannot open this location ({e})") from e
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
    return Location(fs, path, uri)
