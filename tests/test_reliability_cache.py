"""Faults and bad input on the build side (docs/reliability.md): concurrent builds into one --out,
a corpus edited before a resume, --overwrite of a foreign directory, settings the teacher cannot
honour, file modes, and a disk that fills up in the middle of a shard."""

from __future__ import annotations

import errno
import http.server
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

import teacher_cache.build as build_module
import teacher_cache.storage as storage_module
from teacher_cache.build import build_cache, claim_build
from teacher_cache.cli import main
from teacher_cache.corpus import CorpusConfig, open_corpus
from teacher_cache.errors import CacheError
from teacher_cache.finalize import finalize_cache
from teacher_cache.format import BUILD_FILE, MANIFEST_FILE, BuildRecord, Manifest
from teacher_cache.reader import open_cache
from teacher_cache.storage import Location, atomic_output, resolve
from tests.conftest import TINY_MAX_TOKENS, TINY_SEQ_LEN, TINY_SHARD_ROWS, TINY_TOP_K


def build_argv(out: Path, teacher: Path, corpus: Path, *extra: str) -> list[str]:
    """`python -m teacher_cache build` arguments equal to the tiny_build_config fixture's."""
    return ["build", "--out", str(out), "--teacher", str(teacher), "--corpus", str(corpus),
            "--seq-len", str(TINY_SEQ_LEN), "--top-k", str(TINY_TOP_K),
            "--shard-rows", str(TINY_SHARD_ROWS), "--max-tokens", str(TINY_MAX_TOKENS),
            "--batch-size", "4", "--dtype", "fp32", "--no-progress", *extra]


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def build_record(teacher_sha: str) -> BuildRecord:
    manifest = Manifest(seq_len=8, top_k=2, vocab_size=16, teacher={"weights_sha256": teacher_sha},
                        tokenizer={"sha256": "t"}, corpus={"description": "c"}, rows_per_shard=4)
    identity = manifest.build_identity() | {"corpus.fingerprint": "f"}
    return BuildRecord(identity, manifest, None)


def claimed_teacher(location: Location) -> str:
    return json.loads(location.read_bytes(BUILD_FILE))["identity"]["teacher.weights_sha256"]


# --- 1. two builds into one --out ---

def test_a_build_that_checked_before_another_claimed_is_refused(tmp_path: Path, monkeypatch):
    location = resolve(tmp_path / "cache")
    claim_build(location, build_record("A"))
    # B looked for build.json just before A created it: a check-then-write claim would replace A's.
    real_exists = Location.exists
    monkeypatch.setattr(Location, "exists", lambda self, *parts: parts != (BUILD_FILE,)
                        and real_exists(self, *parts))
    with pytest.raises(CacheError, match="holds a different build"):
        claim_build(location, build_record("B"))
    assert claimed_teacher(location) == "A"


def test_of_builds_claiming_together_exactly_one_wins(tmp_path: Path):
    location = resolve(tmp_path / "cache")
    start, outcomes = threading.Barrier(8), []

    def claim(name: str) -> None:
        start.wait()
        try:
            claim_build(location, build_record(name))
            outcomes.append(name)
        except CacheError:
            pass

    threads = [threading.Thread(target=claim, args=(f"T{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 1 and claimed_teacher(location) == outcomes[0]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [BUILD_FILE]


def test_finalize_refuses_shards_another_build_wrote(tmp_path: Path, tiny_cache: Path):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    # Another build (another teacher) took the directory over after these shards were written.
    record = json.loads((out / BUILD_FILE).read_text())
    record["identity"]["teacher.weights_sha256"] = "0" * 64
    (out / BUILD_FILE).write_text(json.dumps(record))
    with pytest.raises(CacheError, match=r"4 shards were written by another build .*"
                                         r"shards/shard-000000\.arrow"):
        finalize_cache(str(out))


DAMAGED_BUILD_RECORDS = {
    "not JSON": ("{", r"build\.json: not valid JSON"),
    "a field missing": ('{"identity": {}, "reference": null}', r"build\.json: .*missing manifest"),
    "a field mistyped": ('{"identity": [], "manifest": {}, "reference": null}',
                         r"build\.json: build record field identity = \[\] is not of type dict"),
}


@pytest.mark.parametrize("damage", DAMAGED_BUILD_RECORDS)
def test_finalize_with_a_damaged_build_record_is_one_line(damage: str, tmp_path: Path,
                                                          tiny_cache: Path, capsys):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    text, message = DAMAGED_BUILD_RECORDS[damage]
    (out / BUILD_FILE).write_text(text)
    assert main(["finalize", "--out", str(out)]) == 2
    assert re.search(message, one_error_line(capsys))


def test_score_with_a_damaged_build_record_is_one_line(tmp_path: Path, tiny_cache: Path,
                                                       tiny_reference_dir: Path, capsys):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    argv = ["score", "--cache", str(out), "--reference", str(tiny_reference_dir), "--dtype",
            "fp32", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    # Scored by this reference already: score asks build.json whether the build scored it.
    (out / BUILD_FILE).write_text('{"identity": {}, "manifest": {}, "reference": 7}')
    assert main(argv) == 2
    assert re.search(r"build\.json: build record field reference = 7 is not of type dict",
                     one_error_line(capsys))


def test_finalize_with_a_damaged_worker_report_is_one_line(tmp_path: Path, tiny_cache: Path,
                                                           capsys):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    report = out / "workers" / "worker-0-of-1.json"
    report.write_text(json.dumps(json.loads(report.read_text()) | {"sequences": "14"}))
    assert main(["finalize", "--out", str(out)]) == 2
    assert re.search(r"workers/worker-0-of-1\.json: worker report field sequences = '14' is not "
                     r"of type int; delete it and rerun that worker", one_error_line(capsys))


# --- 3. corpus edited between a kill and the rerun ---

def test_a_resume_on_edited_corpus_content_is_refused(tmp_path: Path, tiny_corpus_dir: Path,
                                                      tiny_build_config, monkeypatch):
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus_dir, corpus)
    config = tiny_build_config(tmp_path / "cache", corpus=CorpusConfig(paths=[str(corpus)]))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "write_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        build_cache(config)
    monkeypatch.undo()
    text = (corpus / "alpha.txt").read_text()
    (corpus / "alpha.txt").write_text(text.replace("lazy", "busy"))  # same size, same path
    with pytest.raises(CacheError, match="other corpus content.*changed since.*--overwrite"):
        build_cache(config)


def test_the_corpus_fingerprint_follows_content_not_location(tmp_path: Path,
                                                            tiny_corpus_dir: Path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_corpus_dir, copy)

    def fingerprint(root: Path) -> str:
        return open_corpus(CorpusConfig(paths=[str(root)])).fingerprint()

    assert fingerprint(copy) == fingerprint(tiny_corpus_dir)
    (copy / "delta.txt").write_text("Short Document.\n")
    assert fingerprint(copy) != fingerprint(tiny_corpus_dir)


# --- 7. --overwrite deletes only a cache of this tool, after validation ---

def test_overwrite_refuses_a_directory_this_tool_did_not_create(tmp_path: Path,
                                                                tiny_build_config):
    project = tmp_path / "proj"
    for name in ("shards/data.bin", "workers/notes.txt"):
        (project / name).parent.mkdir(parents=True)
        (project / name).write_text("someone else's")
    with pytest.raises(CacheError, match=rf"--overwrite refused: {project} holds shards, workers"):
        build_cache(tiny_build_config(project, overwrite=True))
    assert (project / "shards/data.bin").is_file() and (project / "workers/notes.txt").is_file()


def truncated_copy(source: Path, target: Path, keep: int) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes()[:keep])
    return target


def corrupt_teacher(tmp_path: Path, teacher: Path) -> Path:
    """A copy of `teacher` whose model.safetensors lost its second half."""
    copy = tmp_path / "corrupt-teacher"
    shutil.copytree(teacher, copy)
    weights = copy / "model.safetensors"
    truncated_copy(weights, weights, weights.stat().st_size // 2)
    return copy


def record_file(tmp_path: Path, line: str) -> Path:
    path = tmp_path / "records" / "data.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text(line + "\n", encoding="utf-8")
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("bad", ["top_k", "text_field", "teacher_weights"])
def test_overwrite_with_bad_input_deletes_nothing(bad: str, tmp_path: Path, tiny_cache: Path,
                                                  tiny_teacher_dir: Path, tiny_build_config):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    overrides, message = {
        "top_k": ({"top_k": 10**6}, "topk:1000000: K is more than the teacher.s vocabulary"),
        "text_field": ({"corpus": CorpusConfig(paths=[str(record_file(
            tmp_path, '{"content": "def f(): pass"}'))])}, r"data\.jsonl:1: no field 'text'"),
        "teacher_weights": ({"teacher": str(corrupt_teacher(tmp_path, tiny_teacher_dir))},
                            "model.safetensors: corrupt safetensors file"),
    }[bad]
    with pytest.raises(CacheError, match=message):
        build_cache(tiny_build_config(out, overwrite=True, **overrides))
    assert tree(out) == tree(tiny_cache), "the old cache must stay whole and usable"
    assert open_cache(out).manifest.shards == open_cache(tiny_cache).manifest.shards


# --- 9, 10. settings the teacher or the filesystem cannot honour: one line, exit 2 ---

def test_top_k_above_the_vocabulary_is_one_line_and_claims_nothing(
        tmp_path: Path, tiny_teacher_dir: Path, tiny_corpus_dir: Path, capsys):
    out = tmp_path / "cache"
    argv = build_argv(out, tiny_teacher_dir, tiny_corpus_dir)
    argv[argv.index("--top-k") + 1] = "1000000"
    assert main(argv) == 2
    assert "topk:1000000: K is more than the teacher's vocabulary" in one_error_line(capsys)
    assert not out.exists(), "a claim would block the corrected rerun"


def test_seq_len_above_the_teachers_context_is_refused(tmp_path: Path, tiny_teacher_dir: Path,
                                                       tiny_corpus_dir: Path, capsys):
    argv = build_argv(tmp_path / "cache", tiny_teacher_dir, tiny_corpus_dir)
    argv[argv.index("--seq-len") + 1] = "512"
    argv[argv.index("--max-tokens") + 1] = str(4 * 512)
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "--seq-len 512 is longer than teacher" in line and "max_position_embeddings 256" in line
    assert not (tmp_path / "cache").exists()


def test_a_bad_record_past_the_first_is_found_when_packed_and_clears_the_whole_cache(
        tmp_path: Path, tiny_cache: Path, tiny_build_config):
    """The limit of the checks (docs/reliability.md): only first records are read up front."""
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    corpus = record_file(tmp_path, '{"text": "fine"}\n{"content": "not fine"}')
    with pytest.raises(CacheError, match=r"data\.jsonl:2: no field 'text'"):
        build_cache(tiny_build_config(out, overwrite=True, corpus=CorpusConfig([str(corpus)])))
    assert not [p.name for p in out.iterdir() if p.name.startswith(("index-", MANIFEST_FILE))]


def test_a_capped_build_tokenizes_a_huge_one_line_document_only_as_far_as_the_cap(
        tmp_path: Path, tiny_build_config, monkeypatch):
    import teacher_cache.packing as packing_module

    chunk = 4096
    monkeypatch.setattr(packing_module, "TOKENIZE_CHUNK_CHARS", chunk)
    text = "token soup " * 40_000  # 440,000 characters on one line
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "big.txt").write_text(text, encoding="utf-8")
    real_load, tokenized = build_module._load_tokenizer, []

    class Counting:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __call__(self, batch, **kwargs):
            tokenized.append(sum(map(len, batch)))
            return self.tokenizer(batch, **kwargs)

        def __getattr__(self, name: str):
            return getattr(self.tokenizer, name)

    monkeypatch.setattr(build_module, "_load_tokenizer", lambda t: Counting(real_load(t)))
    out = tmp_path / "cache"
    build_cache(tiny_build_config(out, corpus=CorpusConfig([str(tmp_path / "corpus")]),
                                  max_tokens=2 * TINY_SEQ_LEN))
    assert sum(tokenized) < 2 * chunk, "the text past the cap was tokenized"
    tokenizer = real_load(build_module.resolve_teacher(tiny_build_config(out).teacher))
    expected = [i for ids, _ in packing_module.tokenize_documents(
        tokenizer, [text], tokenizer.eos_token_id) for i in ids][:2 * TINY_SEQ_LEN]
    cache = open_cache(out)
    assert cache.read_shard(0).input_ids.ravel().tolist() == expected


def non_causal_teacher(tmp_path: Path, teacher: Path) -> Path:
    copy = tmp_path / "t5-teacher"
    shutil.copytree(teacher, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"model_type": "t5",
                                                           "architectures": ["T5Model"]}))
    return copy


def truncated_gguf(tmp_path: Path, teacher: Path) -> Path:
    from teacher_cache.teacher import default_teacher_gguf

    return truncated_copy(default_teacher_gguf(), tmp_path / "truncated.gguf", 3 << 20)


@pytest.mark.parametrize("make_teacher, message", [
    (truncated_gguf, "truncated.gguf: not a readable GGUF file"),
    (non_causal_teacher, "model type 't5' is not a causal language model"),
    (corrupt_teacher, "model.safetensors: corrupt safetensors file"),
])
def test_a_broken_teacher_is_one_line_and_claims_nothing(
        make_teacher, message: str, tmp_path: Path, tiny_teacher_dir: Path,
        tiny_corpus_dir: Path, capsys):
    out = tmp_path / "cache"
    teacher = make_teacher(tmp_path, tiny_teacher_dir)
    assert main(build_argv(out, teacher, tiny_corpus_dir)) == 2
    assert message in one_error_line(capsys)
    assert not out.exists(), "a claim would block the corrected rerun"
    assert main(build_argv(out, tiny_teacher_dir, tiny_corpus_dir)) == 0


def test_a_corpus_record_without_the_text_field_claims_nothing(
        tmp_path: Path, tiny_teacher_dir: Path, capsys):
    out = tmp_path / "cache"
    corpus = record_file(tmp_path, json.dumps({"content": "def f(x):\n    return x\n" * 40}))
    argv = build_argv(out, tiny_teacher_dir, corpus)
    argv[argv.index("--max-tokens") + 1] = str(2 * TINY_SEQ_LEN)
    assert main(argv) == 2
    assert "data.jsonl:1: no field 'text'; fields here: content" in one_error_line(capsys)
    assert not out.exists(), "a claim would refuse the corrected command"
    assert main([*argv, "--text-field", "content"]) == 0


@pytest.mark.parametrize("where", ["file", "file/sub"])
def test_an_out_that_is_a_file_is_one_line(where: str, tmp_path: Path, tiny_teacher_dir: Path,
                                           tiny_corpus_dir: Path, capsys):
    (tmp_path / "file").write_text("not a directory")
    assert main(build_argv(tmp_path / where, tiny_teacher_dir, tiny_corpus_dir)) == 2
    assert f"{tmp_path / 'file'} is a file, not a directory" in one_error_line(capsys)


class NoBuckets(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that holds no bucket: every request is answered 404 NoSuchBucket."""

    def _no_such_bucket(self) -> None:
        body = b"" if self.command == "HEAD" else (
            b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>NoSuchBucket</Code>"
            b"<Message>The specified bucket does not exist</Message></Error>")
        self.send_response(404)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET = do_PUT = do_POST = do_DELETE = _no_such_bucket

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def s3_credentials(monkeypatch):
    """Fake credentials, so that pyarrow's S3 client asks no instance metadata service."""
    for name, value in [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_EC2_METADATA_DISABLED", "true"), ("AWS_REGION", "us-east-1")]:
        monkeypatch.setenv(name, value)


def test_a_missing_s3_bucket_is_one_line(tmp_path: Path, tiny_teacher_dir: Path,
                                         tiny_corpus_dir: Path, s3_credentials, monkeypatch,
                                         capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoBuckets)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
        assert main(build_argv("s3://nobucket/cache", tiny_teacher_dir, tiny_corpus_dir)) == 2
    finally:
        server.shutdown()
    assert "s3://nobucket/cache: bucket 'nobucket' does not exist" in one_error_line(capsys)


def test_an_unreachable_s3_endpoint_is_one_line(s3_credentials, capsys):
    url = "s3://bucket/cache?endpoint_override=127.0.0.1:9&scheme=http"  # nothing listens on 9
    assert main(["verify", "--cache", url]) == 2
    line = one_error_line(capsys)
    assert f"{url}: cannot reach this location" in line and "Could not connect" in line


@pytest.mark.parametrize("flag", ["--dataset", "--teacher"])
def test_a_hub_name_with_no_hub_to_reach_fails_at_once(flag: str, tmp_path: Path,
                                                        tiny_teacher_dir: Path,
                                                        tiny_corpus_dir: Path, monkeypatch,
                                                        capsys):
    import datasets
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    loads = []  # each would retry the hub for half a minute before failing
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: loads.append(a))
    argv = build_argv(tmp_path / "cache", tiny_teacher_dir, tiny_corpus_dir)
    replaced = argv.index("--corpus" if flag == "--dataset" else flag)
    argv[replaced:replaced + 2] = [flag, "nobody/no-such-name"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "nobody/no-such-name: not a local path, and the hub http://127.0.0.1:9 does not " \
           "answer" in line and "HF_HUB_OFFLINE=1" in line
    assert loads == [] and not (tmp_path / "cache").exists()


def test_a_write_refused_by_the_filesystem_names_the_file(tmp_path: Path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(storage_module, "_create_temp", read_only)
    with pytest.raises(CacheError, match=rf"cannot write {tmp_path / 'x.json'}: Permission denied"):
        resolve(tmp_path).write_bytes_atomic(b"{}", "x.json")


# --- 11. file modes follow the umask ---

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_get_the_mode_the_umask_gives(umask: int, mode: int, tmp_path: Path):
    previous = os.umask(umask)
    try:
        with atomic_output(tmp_path / "a.json") as f:
            f.write(b"{}")
        assert resolve(tmp_path).create_exclusive(b"{}", "b.json")
    finally:
        os.umask(previous)
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("a.json", "b.json")] == [mode, mode]


def test_a_build_removes_only_stale_temp_files_of_this_tool(tmp_path: Path, tiny_cache: Path,
                                                            tiny_build_config, capsys):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    names = {"killed": "shards/.tmp-0123456789ab-shard-000001.arrow",  # a kill, 2 hours ago
             "root": ".tmp-ba9876543210-manifest.json",
             "live": "shards/.tmp-00000000ffff-shard-000002.arrow",  # a writer at work now
             "foreign": "shards/.tmp-notours.arrow", "plain": "notes.txt"}
    for key, name in names.items():
        (out / name).write_bytes(b"partial")
        if key != "live":
            old = time.time() - 2 * storage_module.STALE_TEMP_S
            os.utime(out / name, (old, old))
    build_cache(tiny_build_config(out))
    assert sorted(k for k, name in names.items() if (out / name).exists()) == [
        "foreign", "live", "plain"]
    assert "removed 2 temp files of killed writes" in capsys.readouterr().err
    assert open_cache(out).manifest.shards == open_cache(tiny_cache).manifest.shards


# --- 14. out of disk space in the middle of a shard ---

class FillsUp:
    """A file whose first write stores half of its bytes, then fails as a full disk does."""

    def __init__(self, file):
        self.file = file

    def write(self, data: bytes) -> int:
        self.file.write(data[:len(data) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self) -> FillsUp:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def test_a_full_disk_mid_shard_lists_nothing_partial_and_a_rerun_continues(
        tmp_path: Path, tiny_cache: Path, tiny_teacher_dir: Path, tiny_corpus_dir: Path,
        monkeypatch, capsys):
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        file = real_fdopen(fd, *args, **kwargs)
        full = os.readlink(f"/proc/self/fd/{fd}").endswith("shard-000001.arrow")
        return FillsUp(file) if full else file

    monkeypatch.setattr(storage_module.os, "fdopen", fdopen)
    out = tmp_path / "cache"
    argv = build_argv(out, tiny_teacher_dir, tiny_corpus_dir)
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert f"cannot write {out / 'shards' / 'shard-000001.arrow'}: No space left on device" in line
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "shard-000000.arrow", "shard-000000.json"], "a partial or temp file was left"
    assert not (out / MANIFEST_FILE).exists()

    monkeypatch.undo()
    assert main(argv) == 0
    assert open_cache(out).manifest.shards == open_cache(tiny_cache).manifest.shards
