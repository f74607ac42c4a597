"""The pack stage (teacher_cache/pack.py): the corpus tokenized once, split across the workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DOCUMENTS, TINY_MAX_TOKENS
from helpers import shard_bytes

from teacher_cache import open_cache
from teacher_cache import pack as pack_module
from teacher_cache.build import build_cache
from teacher_cache.corpus import CorpusConfig, open_corpus
from teacher_cache.finalize import finalize_cache
from teacher_cache.format import PACKED_DIR

PARTITION_BYTES = 128  # the records corpus below: a dozen partitions
RECORDS = [f"Record {i} is packed once{', then read' * (i % 3)}." for i in range(40)]


@pytest.fixture(scope="module")
def records_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short text and a .jsonl of 40 records after it (~560 tokens), which small partitions
    split."""
    root = tmp_path_factory.mktemp("records_corpus")
    (root / "intro.txt").write_text(DOCUMENTS["alpha.txt"], encoding="utf-8")
    (root / "records.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in RECORDS),
                                        encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def records_config(tiny_build_config, records_corpus: Path):
    """Factory: the whole records corpus (no --max-tokens) in small partitions, into `out`."""
    def make(out: Path, **overrides):
        settings = dict(corpus=CorpusConfig(paths=[str(records_corpus)]), max_tokens=None,
                        partition_bytes=PARTITION_BYTES)
        return tiny_build_config(out, **(settings | overrides))

    return make


@pytest.fixture(scope="module")
def records_cache(tmp_path_factory: pytest.TempPathFactory, records_config) -> Path:
    """The records corpus cached by one worker from one partition. Read it, never modify it."""
    out = tmp_path_factory.mktemp("records_cache") / "cache"
    build_cache(records_config(out, partition_bytes=None))
    return out


def stream_tokens(tokenizer, config: CorpusConfig) -> int:
    """Tokens of the corpus's stream, each document followed by EOS (the oracle)."""
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
               for text in open_corpus(config).documents())


def markers(out: Path) -> list[dict]:
    """The packed partitions' markers, by partition."""
    return sorted((json.loads(path.read_text()) for path in (out / PACKED_DIR).glob("*/*.json")),
                  key=lambda marker: marker["index"])


def test_each_worker_tokenizes_only_its_partitions_when_the_others_are_packed(
        tmp_path: Path, records_config, records_cache: Path, smollm2_tokenizer):
    out = tmp_path / "cache"
    packers = [build_cache(records_config(out, num_workers=3, worker_index=w, pack_only=True))
               for w in (1, 2)]
    builders = [build_cache(records_config(out, num_workers=3, worker_index=w)) for w in range(3)]
    packed = markers(out)
    assert len(packed) == builders[0].partitions > 6
    assert sum(m["tokens"] for m in packed) == stream_tokens(
        smollm2_tokenizer, records_config(out).corpus)
    for worker, summary in [(1, packers[0]), (2, packers[1]), (0, builders[0])]:
        assert summary.tokens_tokenized == sum(m["tokens"] for m in packed[worker::3])
        assert summary.partitions_tokenized == len(packed[worker::3])
    assert f"tokenized {builders[0].tokens_tokenized:,} tokens here" in builders[0].describe()
    assert builders[1].tokens_tokenized == builders[2].tokens_tokenized == 0

    finalize_cache(str(out))
    assert shard_bytes(out) == shard_bytes(records_cache)
    assert open_cache(out).manifest.corpus == open_cache(records_cache).manifest.corpus


def test_three_workers_in_turn_build_the_one_worker_cache(tmp_path: Path, tiny_cache: Path,
                                                          tiny_build_config):
    out = tmp_path / "cache"
    summaries = [build_cache(tiny_build_config(out, num_workers=3, worker_index=w,
                                               partition_bytes=64)) for w in range(3)]
    # The first packs what its shards and the corpus totals need; the others find it packed.
    assert summaries[0].tokens_tokenized >= TINY_MAX_TOKENS and summaries[0].partitions > 1
    assert summaries[1].tokens_tokenized == summaries[2].tokens_tokenized == 0
    manifest = finalize_cache(str(out))
    assert shard_bytes(out) == shard_bytes(tiny_cache)
    assert manifest.corpus == open_cache(tiny_cache).manifest.corpus


def test_capped_workers_pack_about_the_cap_and_fill_in_what_their_estimate_missed(
        tmp_path: Path, records_config, smollm2_tokenizer):
    out = tmp_path / "cache"
    for worker in range(3):
        build_cache(records_config(out, max_tokens=TINY_MAX_TOKENS, num_workers=3,
                                   worker_index=worker, pack_only=True))
    packed = sum(m["tokens"] for m in markers(out))
    assert TINY_MAX_TOKENS <= packed < stream_tokens(smollm2_tokenizer,
                                                     records_config(out).corpus)
    for worker in range(3):
        build_cache(records_config(out, max_tokens=TINY_MAX_TOKENS, num_workers=3,
                                   worker_index=worker))
    manifest = finalize_cache(str(out))
    single = tmp_path / "single"
    build_cache(records_config(single, max_tokens=TINY_MAX_TOKENS, partition_bytes=None))
    assert shard_bytes(out) == shard_bytes(single)
    assert manifest.corpus == open_cache(single).manifest.corpus


def test_a_killed_pack_stage_loses_at_most_the_partition_in_flight(
        tmp_path: Path, records_config, records_cache: Path, monkeypatch, smollm2_tokenizer):
    real_encode, encoded = pack_module.encode_partition, []

    def killed_on_the_third(part):
        if len(encoded) == 2:
            raise KeyboardInterrupt
        encoded.append(real_encode(part))
        return encoded[-1]

    monkeypatch.setattr(pack_module, "encode_partition", killed_on_the_third)
    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_cache(records_config(out))
    monkeypatch.undo()
    first_two = markers(out)
    assert [m["index"] for m in first_two] == [0, 1]

    resumed = build_cache(records_config(out))
    assert resumed.partitions_tokenized == resumed.partitions - 2
    assert resumed.tokens_tokenized == stream_tokens(
        smollm2_tokenizer, records_config(out).corpus) - sum(m["tokens"] for m in first_two)
    assert shard_bytes(out) == shard_bytes(records_cache)


def test_a_capped_build_packs_what_the_cap_needs_and_drops_the_tokens_once_complete(
        tmp_path: Path, records_config):
    out = tmp_path / "cache"
    first = build_cache(records_config(out, max_tokens=TINY_MAX_TOKENS))
    packed = [m["tokens"] for m in markers(out)]
    assert sum(packed[:-1]) < TINY_MAX_TOKENS <= sum(packed)
    assert first.tokens_tokenized == sum(packed) and first.partitions_tokenized == len(packed)
    assert len(packed) < first.partitions
    assert not list((out / PACKED_DIR).rglob("*.arrow")), "the token files outlived the manifest"
    complete = shard_bytes(out)

    again = build_cache(records_config(out, max_tokens=TINY_MAX_TOKENS))
    assert (again.tokens_tokenized, again.shards_built) == (0, 0)
    # A shard lost after completion (as `verify --repair` drops one): only its partitions again.
    for suffix in (".json", ".arrow"):
        (out / "shards" / f"shard-000002{suffix}").unlink()
    rebuilt = build_cache(records_config(out, max_tokens=TINY_MAX_TOKENS))
    assert rebuilt.shards_built == 1 and 0 < rebuilt.tokens_tokenized < first.tokens_tokenized
    assert shard_bytes(out) == complete


def test_a_damaged_packed_file_is_packed_again(tmp_path: Path, records_config,
                                               records_cache: Path):
    out = tmp_path / "cache"
    build_cache(records_config(out, pack_only=True))
    damaged = sorted((out / PACKED_DIR).rglob("part-00003.arrow"))[0]
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"\0" * 8)
    with pytest.warns(UserWarning, match=r"part-00003\.arrow: checksum mismatch"):
        summary = build_cache(records_config(out))
    assert summary.tokens_tokenized == markers(out)[3]["tokens"]
    assert shard_bytes(out) == shard_bytes(records_cache)


def test_a_streamed_dataset_splits_across_workers_by_its_shards(
        tmp_path: Path, tiny_build_config, smollm2_tokenizer, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    data = tmp_path / "data"
    data.mkdir()
    texts = [*DOCUMENTS.values(), *RECORDS]
    for shard in range(3):
        (data / f"train-{shard}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in texts[shard::3]), encoding="utf-8")

    def config(out: Path, **overrides):
        settings = dict(corpus=CorpusConfig(dataset=str(data), streaming=True), max_tokens=None)
        return tiny_build_config(out, **(settings | overrides))

    out = tmp_path / "cache"
    for worker in (1, 2):
        build_cache(config(out, num_workers=3, worker_index=worker, pack_only=True))
    first = build_cache(config(out, num_workers=3, worker_index=0))
    assert (first.partitions, first.partitions_tokenized) == (3, 1)
    assert first.tokens_tokenized == sum(
        len(smollm2_tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts[0::3])
    for worker in (1, 2):
        build_cache(config(out, num_workers=3, worker_index=worker))
    finalize_cache(str(out))
    mapped = tmp_path / "mapped"  # the same rows, not streamed, by one worker
    build_cache(config(mapped, corpus=CorpusConfig(dataset=str(data))))
    assert shard_bytes(out) == shard_bytes(mapped)
