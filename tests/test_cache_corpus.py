from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teacher_cache.corpus import CorpusConfig, open_corpus
from teacher_cache.format import CacheError


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
