"""Where the documents come from: files, globs, directories, a `datasets` dataset, or the stdlib.

`open_corpus` checks up front that every named path exists and that some file was found; the
documents themselves are then read lazily, in a deterministic order, by `Corpus.documents()`.
Files that are not UTF-8 are skipped with a warning and listed in `Corpus.skipped`.
`Corpus.fingerprint()` hashes the content, so that a build cannot resume on an edited corpus.

`Corpus.partitions()` cuts the corpus into fixed partitions, the units that build workers tokenize
(teacher_cache/pack.py): contiguous runs of the file list balanced by size, a big .jsonl split
between lines and a big .parquet between row groups; contiguous shards of a map-style dataset, the
dataset's own shards when streamed. They depend on the corpus alone, never on the worker count,
and `Corpus.partition_documents` of partitions 0, 1, ... in order is `Corpus.documents()`.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from itertools import pairwise
from pathlib import Path

from teacher_cache.dataclass_cli import option
from teacher_cache.errors import CorpusError
from teacher_cache.hub import hub_unreachable

TEXT_SUFFIXES = (".txt", ".py", ".md")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
CORPUS_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                        "__pycache__"}
PARQUET_BATCH_ROWS = 1024
# Automatic partitions hold at least PARTITION_BYTES of corpus (about 250k tokens: a capped build
# tokenizes little past its cap), and there are at most MAX_PARTITIONS (on bigger corpora they
# grow, so that each worker reads a bounded number of partition markers).
PARTITION_BYTES = 1 << 20
MAX_PARTITIONS = 4096


@dataclass
class CorpusConfig:
    paths: list[str] = option(
        [], "directories (recursive), globs or .txt/.py/.md/.jsonl/.json/.parquet files; default: "
            "the Python standard library's own .py files", flag="--corpus", metavar="PATH")
    dataset: str | None = option(None, "a `datasets.load_dataset` name (hub id, local path or "
                                       "builder) instead of --corpus (default: none)")
    split: str = option("train", "dataset split")
    streaming: bool = option(False, "stream the dataset")
    text_field: str = option("text", "field holding the text in .jsonl/.json/.parquet/dataset "
                                     "records")
    dataset_config: str | None = option(None, "the --dataset's configuration name (load_dataset's "
                                              "`name`; default: none)")
    data_files: list[str] = option([], "the --dataset's data files (load_dataset's `data_files`; "
                                       "default: all of it)", metavar="FILE")
    revision: str | None = option(None, "the --dataset's revision: a hub branch, tag or commit "
                                        "(default: the latest)")

    def __post_init__(self) -> None:
        if self.paths and self.dataset:
            raise CorpusError("pass either --corpus or --dataset, not both")
        if not self.dataset and (self.dataset_config or self.data_files or self.revision):
            raise CorpusError("--dataset-config, --data-files and --revision need --dataset")

    def dataset_options(self) -> dict[str, object]:
        """load_dataset's arguments besides the split and streaming: those that are set."""
        options = {"name": self.dataset_config, "data_files": self.data_files or None,
                   "revision": self.revision}
        return {key: value for key, value in options.items() if value is not None}


@dataclass(frozen=True)
class Piece:
    """A run of one file's documents: the whole file (`stop` None), or the lines of a big .jsonl
    that begin in bytes [start, stop), or the row groups [start, stop) of a big .parquet."""

    file: int  # index in Corpus.files
    start: int = 0
    stop: int | None = None
    size: int = 0  # bytes, to balance partitions


@dataclass(frozen=True)
class Partition:
    """One fixed part of a corpus: the documents of `pieces` (files), or contiguous shard `index`
    of `count` (a `datasets` dataset)."""

    index: int
    count: int  # partitions of the corpus
    size: int  # bytes (a streamed dataset's shard: 1), to balance and estimate token counts
    pieces: tuple[Piece, ...] = ()

    def key(self) -> list:
        """Where its documents come from, as JSON (the same on every host)."""
        return [[piece.file, piece.start, piece.stop] for piece in self.pieces]


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
        (name, split, text field) identifies. A dataset's configuration name, data files and
        revision, when set, are hashed first: another revision is another corpus."""
        files = self.files
        digest = hashlib.sha256()
        if self.config.dataset:
            if options := self.config.dataset_options():
                digest.update(json.dumps(options, sort_keys=True).encode() + b"\n")
            local = Path(self.config.dataset)
            files = (sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir()
                     else [local] if local.is_file() else [])
            if not files and not options:
                return None
        for path in files:
            content = hashlib.sha256()
            with open(path, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    content.update(block)
            digest.update(f"{path.stat().st_size} {content.hexdigest()}\n".encode())
        return digest.hexdigest()

    def documents(self) -> Iterator[str]:
        if self.config.dataset:
            yield from self._dataset_documents()
            return
        for index in range(len(self.files)):
            yield from self._piece_documents(Piece(index), self.skipped)

    def check_first_documents(self) -> None:
        """Read the first document of every file (of a dataset: its first record), so that a
        wrong --text-field, a malformed first line or an unreadable parquet fails before a build
        deletes or claims anything. Text files are not read: nothing in them can fail (a file
        that is not UTF-8 is skipped with a warning when it is packed)."""
        if self.config.dataset:
            next(self._dataset_documents(), None)
            return
        for path in self.files:
            next(_first_documents(path, self.config.text_field), None)

    def partitions(self, target_bytes: int | None = None) -> list[Partition]:
        """The corpus in partitions of about `target_bytes` (default: PARTITION_BYTES, more when
        the corpus exceeds MAX_PARTITIONS of those), in corpus order."""
        if self.config.dataset:
            return self._dataset_partitions(target_bytes)
        sizes = [path.stat().st_size for path in self.files]
        count = partition_count(sum(sizes), target_bytes)
        limit = max(1, -(-sum(sizes) // count))
        return _group([piece for index, size in enumerate(sizes)
                       for piece in self._pieces(index, size, limit)], count)

    def partition_documents(self, partition: Partition, skipped: list[str]) -> Iterator[str]:
        """The documents of one partition; files it skips (not UTF-8) are added to `skipped`."""
        if self.config.dataset:
            yield from self._dataset_documents(partition)
            return
        for piece in partition.pieces:
            yield from self._piece_documents(piece, skipped)

    def _pieces(self, index: int, size: int, limit: int) -> list[Piece]:
        path = self.files[index]
        if size > limit and path.suffix == ".jsonl":
            count = -(-size // limit)
            bounds = [size * k // count for k in range(count + 1)]
            return [Piece(index, a, b, b - a) for a, b in pairwise(bounds)]
        if size > limit and path.suffix == ".parquet":
            metadata = _open_parquet(path).metadata
            groups = [sum(metadata.row_group(g).column(c).total_compressed_size
                          for c in range(metadata.num_columns))
                      for g in range(metadata.num_row_groups)]
            pieces, start, filled = [], 0, 0
            for group, group_size in enumerate(groups):
                filled += group_size
                if filled >= limit or group == len(groups) - 1:
                    pieces.append(Piece(index, start, group + 1, filled))
                    start, filled = group + 1, 0
            if len(pieces) > 1:
                return pieces
        return [Piece(index, size=size)]

    def _piece_documents(self, piece: Piece, skipped: list[str]) -> Iterator[str]:
        path = self.files[piece.file]
        if path.suffix == ".parquet":
            groups = None if piece.stop is None else range(piece.start, piece.stop)
            yield from _parquet_documents(path, self.config.text_field, groups)
            return
        where, begin = str(path), 0
        try:
            if piece.stop is None:
                text = path.read_text(encoding="utf-8")
            else:
                begin, data = _line_range(path, piece.start, piece.stop)
                where = f"{path} bytes {begin}-{begin + len(data)}"
                text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            warnings.warn(f"{where}: not UTF-8 ({e.reason} at byte {begin + e.start}); skipped",
                          stacklevel=2)
            skipped.append(where)
            return
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text, self.config.text_field, begin)
        elif path.suffix == ".json":
            yield from _json_documents(path, text, self.config.text_field)
        else:
            yield text

    @cached_property
    def _dataset(self):
        return _load_dataset(self.config)

    def _dataset_partitions(self, target_bytes: int | None) -> list[Partition]:
        data = self._dataset
        if self.config.streaming:  # its shards are its files: it splits no finer
            count = min(data.num_shards, MAX_PARTITIONS)
            return [Partition(index, count, 1) for index in range(count)]
        rows, size = len(data), data.data.nbytes
        count = max(1, min(partition_count(size, target_bytes), rows))
        return [Partition(index, count, size * len(_shard_rows(rows, count, index)) // max(rows, 1))
                for index in range(count)]

    def _dataset_documents(self, partition: Partition | None = None) -> Iterator[str]:
        data, where, first = self._dataset, f"dataset {self.config.dataset}", 0
        if partition is not None:
            data = data.shard(num_shards=partition.count, index=partition.index, contiguous=True)
            if self.config.streaming:
                where += f" shard {partition.index} of {partition.count}"
            else:
                first = _shard_rows(len(self._dataset), partition.count, partition.index).start
        for index, record in enumerate(data, start=first):
            yield _text_of(record, self.config.text_field, f"{where} row {index}")


def open_corpus(config: CorpusConfig) -> Corpus:
    if config.dataset:
        options = "".join(f":{key}={','.join(value) if isinstance(value, list) else value}"
                          for key, value in config.dataset_options().items())
        return Corpus(f"dataset:{config.dataset}:{config.split}:{config.text_field}{options}", [],
                      config)
    if not config.paths:
        root = Path(sysconfig.get_paths()["stdlib"])
        version = ".".join(map(str, sys.version_info[:3]))
        return Corpus(f"python-stdlib-{version}", stdlib_files(root), config)
    files = _distinct_files(path for spec in config.paths for path in _expand(spec))
    if not files:
        raise CorpusError(f"corpus {' '.join(config.paths)}: no {'/'.join(CORPUS_SUFFIXES)} "
                         f"files found; point --corpus at a directory, file or glob with documents")
    return Corpus(f"files:{' '.join(config.paths)}:{config.text_field}", files, config)


def partition_count(total_bytes: int, target_bytes: int | None) -> int:
    """How many partitions of about `target_bytes` (None: automatic) a corpus of `total_bytes`
    gets."""
    if target_bytes is not None:
        return max(1, -(-total_bytes // target_bytes))
    return min(MAX_PARTITIONS, max(1, -(-total_bytes // PARTITION_BYTES)))


def _group(pieces: list[Piece], count: int) -> list[Partition]:
    """Consecutive pieces in at most `count` partitions: one closes once the pieces so far reach
    its share of the total size (a piece bigger than a share closes one early, never splits)."""
    total = sum(piece.size for piece in pieces)
    groups: list[list[Piece]] = [[]]
    filled, bound = 0, 1
    for position, piece in enumerate(pieces):
        groups[-1].append(piece)
        filled += piece.size
        if total and filled * count >= bound * total and position < len(pieces) - 1:
            groups.append([])
            bound = filled * count // total + 1
    return [Partition(index, len(groups), sum(p.size for p in group), tuple(group))
            for index, group in enumerate(groups)]


def _shard_rows(rows: int, count: int, index: int) -> range:
    """The rows of `Dataset.shard(count, index, contiguous=True)`, as `datasets` cuts them."""
    size, extra = divmod(rows, count)
    start = size * index + min(index, extra)
    return range(start, start + size + (index < extra))


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


def _distinct_files(paths: Iterable[Path]) -> list[Path]:
    """Each file once, at the first path that reaches it: a glob through a symlink loop (`dir/self
    -> ../dir`) or a file named twice would otherwise be read many times. Says how many it
    dropped."""
    files, seen, dropped = [], set(), 0
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            dropped += 1
        else:
            seen.add(real)
            files.append(path)
    if dropped:
        print(f"corpus: dropped {dropped:,} duplicate paths of files already in it (symlinks or "
              f"a file named twice); {len(files):,} distinct files", file=sys.stderr)
    return files


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
    problem = _text_problem(record, text_field)
    if problem:
        raise CorpusError(f"{where}: {problem}")
    return record[text_field]


def _text_problem(record: object, text_field: str) -> str | None:
    """What keeps `record[text_field]` from being a document's text, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object with a {text_field!r} field, got {type(record).__name__}"
    if text_field not in record:
        return (f"no field {text_field!r}; fields here: {', '.join(map(str, record)) or '(none)'}; "
                f"pass --text-field")
    if not isinstance(record[text_field], str):
        return f"field {text_field!r} is {type(record[text_field]).__name__}, not a string"
    return None


def _first_documents(path: Path, text_field: str) -> Iterator[str]:
    """The documents of a record file from its start: of a .jsonl, those of its first non-empty
    line only (the rest is not read)."""
    if path.suffix == ".parquet":
        return _parquet_documents(path, text_field)
    if path.suffix == ".json":
        return _json_documents(path, path.read_text(encoding="utf-8", errors="replace"),
                               text_field)
    if path.suffix == ".jsonl":
        with open(path, "rb") as stream:
            line = next((line for line in stream if line.strip()), b"")
        return _jsonl_documents(path, line.decode("utf-8", errors="replace"), text_field)
    return iter(())


def _jsonl_documents(path: Path, text: str, text_field: str, begin: int = 0) -> Iterator[str]:
    """The records of a .jsonl's lines; `begin`: the byte where `text` starts in the file (error
    messages count the lines before it only when they are written)."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{_lines_before(path, begin) + number}: malformed JSON line "
                              f"({e.msg} at column {e.colno})") from e
        if problem := _text_problem(record, text_field):
            raise CorpusError(f"{path}:{_lines_before(path, begin) + number}: {problem}")
        yield record[text_field]


def _lines_before(path: Path, offset: int) -> int:
    """Newlines in the first `offset` bytes of a file (only for error messages: it reads them)."""
    if offset == 0:
        return 0
    count = 0
    with open(path, "rb") as stream:
        while offset > 0 and (block := stream.read(min(offset, 1 << 20))):
            count += block.count(b"\n")
            offset -= len(block)
    return count


def _line_range(path: Path, start: int, stop: int) -> tuple[int, bytes]:
    """(where they begin, the bytes) of the lines of a file that begin in bytes [start, stop)."""
    with open(path, "rb") as stream:
        begin, end = _line_start(stream, start), _line_start(stream, stop)
        stream.seek(begin)
        return begin, stream.read(end - begin)


def _line_start(stream, offset: int) -> int:
    """The first offset at or after `offset` where a line begins (or the end of the file)."""
    if offset == 0:
        return 0
    stream.seek(offset - 1)
    while block := stream.read(1 << 16):
        newline = block.find(b"\n")
        if newline >= 0:
            return stream.tell() - len(block) + newline + 1
    return stream.tell()


def _json_documents(path: Path, text: str, text_field: str) -> Iterator[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
    records = data if isinstance(data, list) else [data]
    for index, record in enumerate(records):
        yield _text_of(record, text_field, f"{path}[{index}]")


def _open_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from e


def _parquet_documents(path: Path, text_field: str,
                       row_groups: range | None = None) -> Iterator[str]:
    import pyarrow as pa

    reader = _open_parquet(path)
    columns = reader.schema_arrow.names
    if text_field not in columns:
        raise CorpusError(f"{path}: no column {text_field!r}; columns: {', '.join(columns)}; "
                         f"pass --text-field")
    try:
        for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=row_groups,
                                         columns=[text_field]):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{path}: corrupt parquet data ({e})") from e


def _load_dataset(config: CorpusConfig):
    import datasets

    name = config.dataset
    if not os.path.exists(name) and (problem := hub_unreachable()):
        raise CorpusError(f"dataset {name}: not a local path, and {problem}")
    try:
        if os.path.isfile(name):  # one local data file: let its suffix pick the builder
            builder = {".jsonl": "json", ".txt": "text"}.get(Path(name).suffix,
                                                             Path(name).suffix.lstrip("."))
            return datasets.load_dataset(builder, data_files=name, split=config.split,
                                         streaming=config.streaming)
        return datasets.load_dataset(name, split=config.split, streaming=config.streaming,
                                     **config.dataset_options())
    except Exception as e:  # datasets raises many unrelated types; the user needs one line
        raise CorpusError(f"dataset {name} (split {config.split}): cannot load it ({e})") from e
