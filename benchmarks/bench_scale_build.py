"""The builder at scale: how much of the corpus each worker tokenizes, and the packer's cost on one
long document against many short ones.

  builder  W = 1, 4, 16 pack-only workers (`BuildConfig(pack_only=True)`: the pack stage, no
           teacher) over a synthetic corpus of ~6 MB (text files and a .jsonl that partitions
           split), each into a fresh cache: the most corpus tokens one worker tokenized, as a share
           of the corpus, against 1.1 / W (before the pack stage every worker tokenized it all)
  packer   CPU seconds of the packer before it was made linear (the tests' oracle) and of today's,
           on one document of 4M tokens and on 2,000 documents of 2,000 tokens (seq_len 512),
           the best of 3 runs (the old one on the long document: 1 run, about a minute)

`benchmarks/bench_scale.py` prints `report_lines()`; run alone, this prints the same tables:

    python benchmarks/bench_scale_build.py [--corpus-mb 6] [--no-old-long]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import make_tiny_llama  # noqa: E402  the tests' tiny teacher: real tokenizer
from test_cache_packing import OldPacker  # noqa: E402  the packer before it was linear

from teacher_cache.build import BuildConfig, build_cache  # noqa: E402
from teacher_cache.corpus import CorpusConfig  # noqa: E402
from teacher_cache.packing import Packer  # noqa: E402

WORKERS = (1, 4, 16)
PARTITIONS = 256  # of the synthetic corpus: 16 per worker at W = 16
SEQ_LEN = 512  # of the packer section; the builder's packing does not depend on it (the tiny
# teacher's context is 256)
WORDS = ("the of and to in is that for it as with was on be by at this from or an are not have "
         "which but all were when we there can more if will one def return class self import "
         "value index token teacher student cache shard partition worker corpus").split()


def synthetic_corpus(root: Path, megabytes: float, seed: int = 0) -> Path:
    """Text files of 1-8 KB of random words, and a .jsonl of short records a fifth of the size."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    corpus, budget = root / "corpus", int(megabytes * 1e6)
    corpus.mkdir()

    def text(size: int) -> str:
        return " ".join(words[rng.integers(0, len(words), size // 5)])

    written, index = 0, 0
    while written < budget * 4 // 5:
        body = text(int(rng.integers(1_000, 8_000)))
        (corpus / f"doc-{index:05d}.txt").write_text(body, encoding="utf-8")
        written, index = written + len(body), index + 1
    with open(corpus / "records.jsonl", "w", encoding="utf-8") as f:
        while written < budget:
            line = json.dumps({"text": text(int(rng.integers(100, 600)))}) + "\n"
            f.write(line)
            written += len(line)
    return corpus


def tiny_teacher(root: Path) -> Path:
    from transformers import AutoTokenizer

    from teacher_cache.teacher import default_teacher_gguf

    gguf = default_teacher_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return make_tiny_llama(root / "teacher", tokenizer, seed=0)


def builder_rows(corpus_mb: float = 6.0, workers: tuple[int, ...] = WORKERS) -> list[dict]:
    """Per W (the first: 1): corpus tokens, the most and the least one worker tokenized, and
    the total of all workers (the corpus again: every partition packed once)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus, teacher = synthetic_corpus(root, corpus_mb), tiny_teacher(root)
        size = sum(p.stat().st_size for p in corpus.iterdir())
        for count in workers:
            summaries = [build_cache(BuildConfig(
                out=str(root / f"cache-{count}"), teacher=str(teacher),
                corpus=CorpusConfig(paths=[str(corpus)]), seq_len=256,
                partition_bytes=-(-size // PARTITIONS), num_workers=count, worker_index=w,
                pack_only=True, progress=False)) for w in range(count)]
            tokens = [s.tokens_tokenized for s in summaries]
            corpus_tokens = rows[0]["total_tokens"] if rows else sum(tokens)  # by one worker
            rows.append({"workers": count, "partitions": summaries[0].partitions,
                         "corpus_mb": size / 1e6, "corpus_tokens": corpus_tokens,
                         "total_tokens": sum(tokens),
                         "max_worker_tokens": max(tokens), "min_worker_tokens": min(tokens),
                         "max_share": max(tokens) / corpus_tokens, "bound": 1.1 / count,
                         "max_worker_s": max(s.wall_s for s in summaries)})
    return rows


def packer_rows(old_long: bool = True, repeats: int = 3) -> list[dict]:
    """CPU seconds of the old and the new packer on one 4M-token document and on 2,000 documents
    of 2,000 tokens, the best of `repeats` runs (the old packer on the long document: one run of
    about a minute on 2 cores, none with old_long=False)."""
    cases = {"1 document of 4,194,304 tokens": [list(range(1 << 22))],
             "2,000 documents of 2,000 tokens": [list(range(i, i + 2_000)) for i in range(2_000)]}
    rows = []
    for case, documents in cases.items():
        for name, packer in (("old", OldPacker), ("new", Packer)):
            runs = repeats
            if name == "old" and len(documents) == 1:
                runs = 1 if old_long else 0
            times = []
            for _ in range(runs):
                started = time.process_time()
                sequences = sum(1 for _ in packer(documents, SEQ_LEN))
                times.append(time.process_time() - started)
            if times:
                tokens = sum(map(len, documents))
                rows.append({"packer": name, "case": case, "tokens": tokens,
                             "sequences": sequences, "cpu_s": min(times),
                             "mtokens_per_s": tokens / min(times) / 1e6})
    return rows


def report_lines(corpus_mb: float = 6.0, old_long: bool = True) -> list[str]:
    lines = ["Corpus tokens each pack-only worker tokenized (before: every worker, all of them):",
             "", "| W | partitions | corpus | all workers | most by one worker | least | "
             "share (bound 1.1/W) | slowest worker |", "|---|---|---|---|---|---|---|---|"]
    for r in builder_rows(corpus_mb):
        lines.append(f"| {r['workers']} | {r['partitions']} | {r['corpus_mb']:.1f} MB, "
                     f"{r['corpus_tokens']:,} tokens | {r['total_tokens']:,} | "
                     f"{r['max_worker_tokens']:,} | "
                     f"{r['min_worker_tokens']:,} | {r['max_share']:.3f} ({r['bound']:.3f}) | "
                     f"{r['max_worker_s']:.1f} s |")
    lines += ["", f"Packer, CPU seconds (seq_len {SEQ_LEN}):", "",
              "| packer | documents | CPU s | M tokens/s |", "|---|---|---|---|"]
    packers = packer_rows(old_long)
    for r in packers:
        lines.append(f"| {r['packer']} | {r['case']} | {r['cpu_s']:.2f} | "
                     f"{r['mtokens_per_s']:.2f} |")
    new = [r["cpu_s"] / r["tokens"] for r in packers if r["packer"] == "new"]
    lines += ["", f"new packer, per token, one long document / many short ones: "
                  f"{new[0] / new[1]:.2f}x"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=float, default=6.0)
    parser.add_argument("--no-old-long", action="store_true",
                        help="skip the old packer on the 4M-token document (~1 min)")
    args = parser.parse_args()
    print(f"# bench_scale_build ({platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores, {time.strftime('%Y-%m-%d')})\n")
    print("\n".join(report_lines(args.corpus_mb, not args.no_old_long)))


if __name__ == "__main__":
    main()
