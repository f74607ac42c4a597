from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teacher_cache.corpus import CorpusConfig, open_corpus
from teacher_cache.errors import CacheError


def read_all(config: CorpusConfig) -> list[str]:
    return list(open_corpus(config).documents())


@pytest.fixture
def mixed_dir(tmp_path: Path) -> Path:
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("plain text", encoding="utf-8")
    (tmp_path / "b" / "c.jsonl").write_text(
        f'{json.dumps({"text": "line one", "id": 1})}\n\n{json.dumps({"text": "line two"})}\n',
        encoding="utf-8")
    (tmp_path / "b" / "d.json").write_text(json.dumps([{"text": "json one"}, {"text": "json two"}]),
                                           encoding="utf-8")
    pq.write_table(pa.table({"text": ["parquet one", None, "parquet two"]}),
                   tmp_path / "e.parquet")
    (tmp_path / "f.py").write_text("x = 1\n", encoding="utf-8")
    (tmp_path / "g.md").write_text("# title\n", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("a,b\n", encoding="utf-8")
    return tmp_path


def test_default_corpus_is_the_stdlib_without_tests():
    corpus = open_corpus(CorpusConfig())
    assert corpus.description.startswith("python-stdlib-")
    root = Path(corpus.files[0]).parent
    relative = [f.relative_to(root).as_posix() for f in corpus.files]
    assert relative == sorted(relative)
    assert "json/__init__.py" in relative
    assert all(f.suffix == ".py" for f in corpus.files)
    excluded = {"test", "tests", "idle_test", "site-packages"}
    assert not any(excluded & set(Path(r).parts[:-1]) for r in relative)


def test_directory_reads_every_supported_file_recursively_in_path_order(mixed_dir: Path):
    documents = read_all(CorpusConfig(paths=[str(mixed_dir)]))
    assert documents == ["plain text", "line one", "line two", "json one", "json two",
                         "parquet one", "parquet two", "x = 1\n", "# title\n"]


def test_glob_and_single_files(mixed_dir: Path):
    assert read_all(CorpusConfig(paths=[str(mixed_dir / "**" / "*.json*")])) == [
        "line one", "line two", "json one", "json two"]
    assert read_all(CorpusConfig(paths=[str(mixed_dir / "a.txt")])) == ["plain text"]


def test_text_field_selects_another_field(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n", encoding="utf-8")
    assert read_all(CorpusConfig(paths=[str(path)], text_field="content")) == ["hello"]


def test_missing_path_is_a_clear_error(tmp_path: Path):
    with pytest.raises(CacheError, match=r"nope\.txt: no such file or directory"):
        open_corpus(CorpusConfig(paths=[str(tmp_path / "nope.txt")]))


def test_empty_corpus_is_a_clear_error(tmp_path: Path):
    (tmp_path / "notes.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(CacheError, match="no .* files found"):
        open_corpus(CorpusConfig(paths=[str(tmp_path)]))


def test_non_utf8_file_is_skipped_with_a_warning(tmp_path: Path):
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    corpus = open_corpus(CorpusConfig(paths=[str(tmp_path)]))
    with pytest.warns(UserWarning, match=r"latin\.txt: not UTF-8"):
        assert list(corpus.documents()) == ["fine"]
    assert corpus.skipped == [str(tmp_path / "latin.txt")]


def test_unknown_text_field_names_file_line_and_existing_fields(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"body": "b", "id": 2}) + "\n",
                    encoding="utf-8")
    with pytest.raises(CacheError, match=r"data\.jsonl:2: no field 'text'; fields here: body, id"):
        read_all(CorpusConfig(paths=[str(path)]))


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(CacheError, match=r"data\.jsonl:2: malformed JSON line"):
        read_all(CorpusConfig(paths=[str(path)]))


def test_corrupt_parquet_names_the_file(tmp_path: Path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(CacheError, match=r"broken\.parquet: not a readable parquet file"):
        read_all(CorpusConfig(paths=[str(path)]))


def test_parquet_without_the_text_column_lists_its_columns(tmp_path: Path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), path)
    with pytest.raises(CacheError, match=r"data\.parquet: no column 'text'; columns: body, id"):
        read_all(CorpusConfig(paths=[str(path)]))


def test_datasets_local_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(3)), encoding="utf-8")
    assert read_all(CorpusConfig(dataset=str(data))) == ["row 0", "row 1", "row 2"]
    assert read_all(CorpusConfig(dataset=str(data / "train.jsonl"), streaming=True)) == [
        "row 0", "row 1", "row 2"]
    with pytest.raises(CacheError, match="row 0: no field 'body'; fields here: text"):
        read_all(CorpusConfig(dataset=str(data), text_field="body"))


def documents_by_partition(config: CorpusConfig, target_bytes: int | None) -> list[list[str]]:
    corpus = open_corpus(config)
    return [list(corpus.partition_documents(p, corpus.skipped))
            for p in corpus.partitions(target_bytes)]


@pytest.fixture
def big_records(tmp_path: Path) -> Path:
    """A .jsonl of 300 records (blank lines and CRLF among them) and a .parquet of 30 row groups,
    beside a text file: the two that a small partition size splits."""
    lines = [json.dumps({"text": f"record {i} " + "x" * (i % 37)}) for i in range(300)]
    (tmp_path / "a.jsonl").write_text("".join(
        line + ("\r\n" if i % 11 == 0 else "\n\n" if i % 7 == 0 else "\n")
        for i, line in enumerate(lines)), encoding="utf-8")
    (tmp_path / "b.txt").write_text("between", encoding="utf-8")
    pq.write_table(pa.table({"text": [None if i % 9 == 0 else f"row {i}" for i in range(600)]}),
                   tmp_path / "c.parquet", row_group_size=20)
    return tmp_path


@pytest.mark.parametrize("target_bytes", [1, 100, 700, 4096, None])
def test_partitions_in_order_are_the_corpus(big_records: Path, target_bytes: int | None):
    config = CorpusConfig(paths=[str(big_records)])
    parts = documents_by_partition(config, target_bytes)
    assert [d for part in parts for d in part] == read_all(config)
    if target_bytes == 100:  # the big files were split: many partitions, each with documents
        assert len(parts) > 50 and sum(1 for part in parts if part) > 50


def test_partitions_are_balanced_by_size(big_records: Path):
    corpus = open_corpus(CorpusConfig(paths=[str(big_records)]))
    sizes = [p.size for p in corpus.partitions(700)]
    total = sum(f.stat().st_size for f in corpus.files)
    assert total / 1400 < len(sizes) <= -(-total // 700)
    assert max(sizes) < 1400


def test_an_error_in_a_split_jsonl_names_its_line_in_the_file(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(40))
                    + "{broken\n", encoding="utf-8")
    config = CorpusConfig(paths=[str(path)])
    with pytest.raises(CacheError, match=r"data\.jsonl:41: malformed JSON line"):
        documents_by_partition(config, 64)


def test_a_non_utf8_piece_of_a_split_jsonl_is_skipped_alone(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    rows = [f"row {i}" for i in range(40)]
    lines = [json.dumps({"text": row}).encode() + b"\n" for row in rows]
    path.write_bytes(b"".join(lines[:20]) + b'{"text": "caf\xe9"}\n' + b"".join(lines[20:]))
    corpus = open_corpus(CorpusConfig(paths=[str(path)]))
    partitions = corpus.partitions(64)
    with pytest.warns(UserWarning, match=r"data\.jsonl bytes \d+-\d+: not UTF-8"):
        documents = [d for p in partitions for d in corpus.partition_documents(p, corpus.skipped)]
    assert len(corpus.skipped) == 1 and corpus.skipped[0].startswith(f"{path} bytes ")
    # Missing: one run of lines around the bad one (between rows 19 and 20), those of its piece.
    missing = [i for i, row in enumerate(rows) if row not in documents]
    assert documents == [row for row in rows if row in documents]
    assert missing == list(range(missing[0], missing[-1] + 1))
    assert missing[0] <= 20 <= missing[-1] + 1 and len(missing) < 20


def test_dataset_partitions_are_its_shards_in_order(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    data = tmp_path / "data"
    data.mkdir()
    for shard in range(3):
        (data / f"train-{shard}.jsonl").write_text("".join(
            json.dumps({"text": f"file {shard} row {i}"}) + "\n" for i in range(5)),
            encoding="utf-8")
    streamed = CorpusConfig(dataset=str(data), streaming=True)
    parts = documents_by_partition(streamed, None)
    assert parts == [[f"file {s} row {i}" for i in range(5)] for s in range(3)]
    mapped = CorpusConfig(dataset=str(data))
    parts = documents_by_partition(mapped, 40)
    assert len(parts) > 3 and [d for part in parts for d in part] == read_all(mapped)
    corpus = open_corpus(CorpusConfig(dataset=str(data), text_field="body"))
    third = corpus.partitions(40)[2]
    with pytest.raises(CacheError, match=rf"row {len(parts[0]) + len(parts[1])}: no field 'body'"):
        list(corpus.partition_documents(third, []))


def test_a_glob_through_a_symlink_loop_takes_each_file_once(tmp_path: Path, capsys):
    root = tmp_path / "dir"
    root.mkdir()
    (root / "a.py").write_text("x = 1\n")
    (root / "self").symlink_to("../dir")
    corpus = open_corpus(CorpusConfig(paths=[f"{root}/**/*.py", str(root / "a.py")]))
    assert corpus.files == [root / "a.py"]
    assert list(corpus.documents()) == ["x = 1\n"]
    dropped = int(capsys.readouterr().err.split("dropped ")[1].split()[0].replace(",", ""))
    assert dropped >= 2, "the loop's copies and the file named twice"
