"""Where the documents come from: files, globs, directories, a `datasets` dataset, or the stdlib.

`open_corpus` checks up front that every named path exists and that some file was found; the
documents themselves are then read lazily, in a deterministic order, by `Corpus.documents()`.
Files that are not UTF-8 are skipped with a warning and listed in `Corpus.skipped`.
`Corpus.fingerprint()` hashes the content, so that a build cannot resume on an edited corpus.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from teacher_cache.errors import CorpusError

TEXT_SUFFIXES = (".txt", ".py", ".md")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
CORPUS_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                        "__pycache__"}
PARQUET_BATCH_ROWS = 1024


@dataclass
class CorpusConfig:
    paths: list[str] = field(default_factory=list)  # files, directories or globs; empty = stdlib
    dataset: str | None = None  # a `datasets.load_dataset` name: hub id, local path or builder
    split: str = "train"
    streaming: bool = False
    text_field: str = "text"


@dataclass
class Corpus:
    description: str  # stable text naming the source, part of the cache's build identity
    files: list[Path]  # empty for a `datasets` dataset
    config: CorpusConfig
    skipped: list[str] = field(default_factory=list)

    def fingerprint(self) -> str | None:
        """sha256 over every file's size and sha256, in packing order: what the packed text
        depends on, and not where the files lie (workers on other hosts agree). The stdlib's ~700
        files take well under a second. A `datasets` dataset: the same over its local data file
        or directory; None for a hub dataset (streamed or not), which only its description
        (name, split, text field) identifies."""
        files = self.files
        if self.config.dataset:
            local = Path(self.config.dataset)
            files = (sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir()
                     else [local] if local.is_file() else [])
            if not files:
                return None
        digest = hashlib.sha256()
        for path in files:
            content = hashlib.sha256()
            with open(path, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    content.update(block)
            digest.update(f"{path.stat().st_size} {content.hexdigest()}\n".encode())
        return digest.hexdigest()

    def documents(self) -> Iterator[str]:
        if self.config.dataset:
            yield from _dataset_documents(self.config)
            return
        for path in self.files:
            yield from self._file_documents(path)

    def _file_documents(self, path: Path) -> Iterator[str]:
        if path.suffix == ".parquet":
            yield from _parquet_documents(path, self.config.text_field)
            return
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            warnings.warn(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); skipped",
                          stacklevel=2)
            self.skipped.append(str(path))
            return
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text, self.config.text_field)
        elif path.suffix == ".json":
            yield from _json_documents(path, text, self.config.text_field)
        else:
            yield text


def open_corpus(config: CorpusConfig) -> Corpus:
    if config.dataset:
        return Corpus(f"dataset:{config.dataset}:{config.split}:{config.text_field}", [], config)
    if not config.paths:
        root = Path(sysconfig.get_paths()["stdlib"])
        version = ".".join(map(str, sys.version_info[:3]))
        return Corpus(f"python-stdlib-{version}", stdlib_files(root), config)
    files: list[Path] = []
    for spec in config.paths:
        files.extend(_expand(spec))
    if not files:
        raise CorpusError(f"corpus {' '.join(config.paths)}: no {'/'.join(CORPUS_SUFFIXES)} "
                         f"files found; point --corpus at a directory, file or glob with documents")
    return Corpus(f"files:{' '.join(config.paths)}:{config.text_field}", files, config)


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's own .py files, tests and third-party packages excluded."""
    found = []
    for directory, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]
        found.extend(Path(directory) / n for n in names if n.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def package_sources(package: str) -> list[Path]:
    """An installed package's .py files outside test directories, sorted by path inside it: a
    text set outside the default (stdlib) corpus for held-out evaluation."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"--heldout-package {package}: not an installed package; name one that "
                          f"`python -c 'import {package}'` finds (e.g. numpy)")
    root = Path(next(iter(spec.submodule_search_locations)))
    files = [p for p in root.rglob("*.py")
             if not STDLIB_EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _expand(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted((p for p in path.rglob("*") if p.suffix in CORPUS_SUFFIXES and p.is_file()),
                      key=lambda p: p.relative_to(path).as_posix())
    if path.is_file():
        if path.suffix not in CORPUS_SUFFIXES:
            raise CorpusError(f"corpus {spec}: unsupported file type {path.suffix!r}; expected one "
                             f"of {' '.join(CORPUS_SUFFIXES)}")
        return [path]
    if glob.has_magic(spec):
        return [Path(p) for p in sorted(glob.glob(os.path.expanduser(spec), recursive=True))
                if Path(p).suffix in CORPUS_SUFFIXES and Path(p).is_file()]
    raise CorpusError(f"corpus {spec}: no such file or directory")


def _text_of(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object with a {text_field!r} field, "
                         f"got {type(record).__name__}")
    if text_field not in record:
        raise CorpusError(f"{where}: no field {text_field!r}; fields here: "
                         f"{', '.join(map(str, record)) or '(none)'}; pass --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _jsonl_documents(path: Path, text: str, text_field: str) -> Iterator[str]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{number}: malformed JSON line ({e.msg} at column {e.colno})"
                             ) from e
        yield _text_of(record, text_field, f"{path}:{number}")


def _json_documents(path: Path, text: str, text_field: str) -> Iterator[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
    records = data if isinstance(data, list) else [data]
    for index, record in enumerate(records):
        yield _text_of(record, text_field, f"{path}[{index}]")


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from e
    columns = reader.schema_arrow.names
    if text_field not in columns:
        raise CorpusError(f"{path}: no column {text_field!r}; columns: {', '.join(columns)}; "
                         f"pass --text-field")
    try:
        for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{path}: corrupt parquet data ({e})") from e


def _dataset_documents(config: CorpusConfig) -> Iterator[str]:
    import datasets

    name = config.dataset
    try:
        if name and os.path.isfile(name):  # one local data file: let its suffix pick the builder
            builder = {".jsonl": "json", ".txt": "text"}.get(Path(name).suffix,
                                                             Path(name).suffix.lstrip("."))
            data = datasets.load_dataset(builder, data_files=name, split=config.split,
                                         streaming=config.streaming)
        else:
            data = datasets.load_dataset(name, split=config.split, streaming=config.streaming)
    except Exception as e:  # datasets raises many unrelated types; the user needs one line
        raise CorpusError(f"dataset {name} (split {config.split}): cannot load it ({e})") from e
    for index, record in enumerate(data):
        yield _text_of(record, config.text_field, f"dataset {name} row {index}")
