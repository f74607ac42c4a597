"""`make bench-scale`: how the cost of training start, of each consumer's reads and of the build
grows with the cache, on synthetic caches in the real format (sample:8, seq_len 512, the
builder's default shard of 131,072 tokens), measured side by side in one run.

Sections:
  start-up   open_cache + split_rows + the first training batch, in a fresh process each: seconds,
             peak memory above the imports, bytes read; a format-3 cache (row index) next to the
             same cache read as format 2 (no index: every shard read, as before the index)
  reads      bytes each consumer (rank x DataLoader worker) reads in one epoch, for W = 1, 2, 8, 32
             ranks and 1 and 4 workers, against the ideal 1 / (W x workers) of the cache; the
             stream's useful tokens/s per consumer
  mixing     how far apart two adjacent rows (pieces of one document) end up in the stream, and
             how often in the same 1024-row batch: the window shuffle next to a global shuffle and
             the former 256-row shuffle buffer
  build      corpus tokens each build worker tokenizes for W = 1, 4, 16, and the packer on one long
             document against many short ones (benchmarks/bench_scale_build.py)
Each growth is printed as an exponent b (cost ~ size^b, from the smallest and largest size) with
its extrapolation to a 10B-token cache and 64 ranks.

    python benchmarks/bench_scale.py [--sizes 1 4 16 64] [--out runs/bench_scale]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from student_train.data import (  # noqa: E402
    EpochRows,
    StreamLayout,
    TrainStream,
    decoded_row_bytes,
    split_rows,
    stream_plan,
    window_rows,
)
from student_train.selection import Selection  # noqa: E402
from teacher_cache.format import (  # noqa: E402
    MANIFEST_FILE,
    SHARD_DIR,
    Manifest,
    ShardInfo,
    Targets,
    shard_name,
    unscored,
)
from teacher_cache.index import publish_manifest  # noqa: E402
from teacher_cache.reader import open_cache  # noqa: E402
from teacher_cache.storage import Location, resolve  # noqa: E402
from teacher_cache.synth import write_synthetic_cache  # noqa: E402

SEQ_LEN, K, VOCAB = 512, 8, 49152
SHARD_ROWS = 131072 // SEQ_LEN
GLOBAL_BATCH = 64  # of the mixing section
RANK_BATCH = 8  # rows per rank and micro-batch in the reads section, whatever the ranks
TEN_BILLION, RANKS = 10**10, 64


def cache_path(out: Path, millions: int) -> Path:
    """A synthetic sample:8 cache of `millions` x 2^20 tokens, generated once."""
    path = out / f"cache-{millions}M"
    if not (path / MANIFEST_FILE).exists():
        write_synthetic_cache(path, sequences=millions * 2**20 // SEQ_LEN, seq_len=SEQ_LEN,
                              top_k=K, vocab_size=VOCAB, rows_per_shard=SHARD_ROWS,
                              kind="sample", progress=True)
    return path


def as_format_2(path: Path) -> Path:
    """The same shards under a manifest without the row index (how format-2 caches read)."""
    old = path.with_name(path.name + "-format2")
    old.mkdir(exist_ok=True)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest.pop("index")
    (old / MANIFEST_FILE).write_text(json.dumps(manifest | {"version": 2}))
    if not (old / SHARD_DIR).exists():
        (old / SHARD_DIR).symlink_to((path / SHARD_DIR).resolve())
    return old


def count_reads() -> list[int]:
    """Patch Location.read_bytes to record the size of every read; the list it appends to."""
    sizes: list[int] = []
    read_bytes = Location.read_bytes

    def counted(location, *parts):
        data = read_bytes(location, *parts)
        sizes.append(len(data))
        return data

    Location.read_bytes = counted
    return sizes


def first_batch(path: str) -> None:
    """Open the cache, split it, set up the stream and (if it has shard files) read one batch."""
    cache = open_cache(path)
    split = split_rows(cache, 0.05, Selection(), seed=0, val_max_rows=512)
    stream = TrainStream(path, split.train, global_batch=8, rank=0, world_size=1, seed=0,
                         shuffle_buffer="256MB")
    if Path(path, SHARD_DIR).exists():
        next(stream.batches(0, 1))


def index_only_cache(out: Path, tokens: int) -> Path:
    """A manifest and row index of a `tokens`-token cache without its shards: what start-up reads
    at a size this disk cannot hold."""
    path = out / f"index-only-{tokens // 10**9}B"
    if (path / MANIFEST_FILE).exists():
        return path
    rows = tokens // SEQ_LEN
    manifest = Manifest(seq_len=SEQ_LEN, top_k=K, vocab_size=VOCAB, teacher={}, tokenizer={},
                        corpus={}, rows_per_shard=SHARD_ROWS,
                        targets=Targets("sample", K).manifest_entry(), complete=True)
    manifest.shards = [ShardInfo(index=i, path=f"{SHARD_DIR}/{shard_name(i)}",
                                 rows=min(SHARD_ROWS, rows - start), tokens=0, sha256="0" * 64,
                                 bytes=0, first_seq_id=start, build="0" * 16)
                       for i, start in enumerate(range(0, rows, SHARD_ROWS))]
    manifest.totals = {"sequences": rows, "tokens": rows * SEQ_LEN, "bytes": 0}
    publish_manifest(resolve(str(path)), manifest, unscored(rows))
    return path


def startup_child(path: str, measure: str) -> None:
    """In a fresh process, from opening the cache to the first batch: seconds and bytes read, or
    (`memory`, traced, so timed apart) the peak of Python, numpy and Arrow allocations."""
    if measure == "memory":
        import pyarrow as pa

        tracemalloc.start()
        first_batch(path)
        peak = tracemalloc.get_traced_memory()[1] + pa.default_memory_pool().max_memory()
        print(json.dumps({"peak_mb": peak / 2**20}))
        return
    sizes = count_reads()
    started = time.perf_counter()
    first_batch(path)
    print(json.dumps({"seconds": time.perf_counter() - started, "bytes_read": sum(sizes)}))


def startup(path: Path) -> dict:
    result = {}
    for measure in ("time", "memory"):
        child = subprocess.run([sys.executable, __file__, "--child-startup", str(path),
                                "--measure", measure], check=True, capture_output=True, text=True)
        result |= json.loads(child.stdout.strip().splitlines()[-1])
    return result


def growth(sizes: list[float], values: list[float]) -> tuple[float, float]:
    """Exponent b of value ~ size^b (smallest to largest size) and the value at 10B tokens."""
    low, high = (max(v, 1e-9) for v in (values[0], values[-1]))
    b = math.log(high / low) / math.log(sizes[-1] / sizes[0])
    return b, high * (TEN_BILLION / sizes[-1]) ** b


def startup_section(out: Path, millions: list[int]) -> list[str]:
    rows, lines = {}, []
    for m in millions:
        path = cache_path(out, m)
        rows[m] = {"index": startup(path), "format 2": startup(as_format_2(path)),
                   "cache_bytes": open_cache(path).manifest.totals["bytes"]}
        print(f"start-up {m}M: {rows[m]}", flush=True)
    tokens = [m * 2**20 for m in millions]
    lines += ["| cache tokens | cache bytes | start-up s (index / format 2) | peak MB (index / "
              "format 2) | bytes read before step 1 (index / format 2) |",
              "|---|---|---|---|---|"]
    for m in millions:
        new, old = rows[m]["index"], rows[m]["format 2"]
        lines.append(f"| {m}M | {rows[m]['cache_bytes'] / 1e6:,.0f} MB | {new['seconds']:.2f} / "
                     f"{old['seconds']:.2f} | {new['peak_mb']:.0f} / {old['peak_mb']:.0f} | "
                     f"{new['bytes_read'] / 1e6:.1f} MB / {old['bytes_read'] / 1e6:.0f} MB |")
    for name, key, unit in (("start-up", "seconds", "s"), ("peak memory", "peak_mb", "MB"),
                            ("bytes read", "bytes_read", "bytes")):
        for kind in ("index", "format 2"):
            b, at_10b = growth(tokens, [rows[m][kind][key] for m in millions])
            lines.append(f"- {name} ({kind}): exponent {b:.2f}, at 10B tokens ~{at_10b:,.1f} "
                         f"{unit} per rank and restart")
    big = index_only_cache(out, TEN_BILLION)
    measured = startup(big)
    manifest_mb = (big / MANIFEST_FILE).stat().st_size / 1e6
    index_mb = sum(p.stat().st_size for p in big.glob("index-*")) / 1e6
    lines.append(f"- measured at 10B tokens (the manifest of {len(open_cache(big).shards):,} "
                 f"shards, {manifest_mb:.1f} MB, and the row index, {index_mb:.1f} MB, without "
                 f"the shards): start-up {measured['seconds']:.1f} s, peak "
                 f"{measured['peak_mb']:,.0f} MB, {measured['bytes_read'] / 1e6:.0f} MB read, "
                 f"the same on each of {RANKS} ranks")
    return lines


def consumer_reads(path: Path, world: int, workers: int) -> dict:
    """Bytes each consumer reads over one epoch of its streams, and its useful tokens/s."""
    cache = open_cache(path)
    split = split_rows(cache, 0.05, Selection(), seed=0, val_max_rows=512)
    global_batch = RANK_BATCH * world
    # Micro-batches of one consumer within the first epoch of its streams.
    per_epoch = len(split.train) // (global_batch * workers)
    sizes = count_reads()
    fractions, rates = [], []
    for rank in range(world):
        stream = TrainStream(str(path), split.train, global_batch=global_batch, rank=rank,
                             world_size=world, seed=0, shuffle_buffer="256MB", parts=world,
                             slots=workers)
        for worker in range(workers):
            before = len(sizes)
            batches = stream.batches(worker, workers)
            next(batches)  # opens the cache and plans the epoch: timed apart, a one-off
            started = time.perf_counter()
            tokens = sum(next(batches).num_tokens for _ in range(per_epoch - 1))
            rates.append(tokens / (time.perf_counter() - started))
            fractions.append(sum(sizes[before:]) / cache.manifest.totals["bytes"])
    shard = cache.manifest.totals["bytes"] / len(cache.shards)
    bound = 1.1 / (world * workers) + 2 * shard / cache.manifest.totals["bytes"]
    return {"max_fraction": max(fractions), "mean_fraction": float(np.mean(fractions)),
            "ideal": 1 / (world * workers), "bound": bound, "tokens_per_s": float(np.mean(rates))}


def reads_section(out: Path, millions: int) -> list[str]:
    path = cache_path(out, millions)
    lines = [f"On the {millions}M-token cache ({len(open_cache(path).shards)} shards), "
             f"{RANK_BATCH} rows per rank and micro-batch, one epoch per consumer:", "",
             "| ranks W | workers | read per consumer, max (mean) | ideal 1/(W x workers) | "
             "bound 1.1/(W x workers) + a shard at each end | useful tokens/s per consumer |",
             "|---|---|---|---|---|---|"]
    for world in (1, 2, 8, 32):
        for workers in (1, 4):
            r = consumer_reads(path, world, workers)
            print(f"reads W={world} workers={workers}: {r}", flush=True)
            ok = "" if r["max_fraction"] <= r["bound"] else " (over the bound)"
            lines.append(f"| {world} | {workers} | {r['max_fraction']:.4f} "
                         f"({r['mean_fraction']:.4f}){ok} | {r['ideal']:.4f} | "
                         f"{r['bound']:.4f} | {r['tokens_per_s']:,.0f} |")
    lines.append(f"- a consumer reads its span of the epoch and the shard it shares with each "
                 f"neighbouring span; at 10B tokens and {RANKS} ranks x 4 workers that is ~1/256 "
                 f"of the cache (~300 shards of 131,072 tokens) plus at most 2 shards per epoch, "
                 f"where every rank read the whole cache before; tokens/s exclude each "
                 f"consumer's first batch (opening the cache, planning the epoch)")
    return lines


def fake_shards(rows: int) -> list[ShardInfo]:
    return [ShardInfo(index=i, path=f"{SHARD_DIR}/s{i}", rows=min(SHARD_ROWS, rows - start),
                      tokens=0, sha256="", bytes=0, first_seq_id=start)
            for i, start in enumerate(range(0, rows, SHARD_ROWS))]


def reservoir_shuffle(incoming: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The former stream's shuffle buffer of `size` rows (emit a random slot, refill it)."""
    buffer, emitted = list(incoming[:size]), []
    for slot, row in zip(rng.integers(0, size, max(len(incoming) - size, 0)), incoming[size:],
                         strict=True):
        emitted.append(buffer[slot])
        buffer[slot] = row
    return np.concatenate([np.array(emitted, np.int64), rng.permutation(np.array(buffer))])


def mixing(order: np.ndarray) -> tuple[float, float]:
    """Median distance in the stream of rows i and i + 1, and the share of such pairs that fall in
    the same 1024-row batch."""
    position = np.empty(len(order), np.int64)
    position[order] = np.arange(len(order))
    a, b = position[:-1], position[1:]
    return float(np.median(np.abs(a - b))), float(np.mean(a // 1024 == b // 1024))


def mixing_section(rows: int = 200_000) -> list[str]:
    manifest = Manifest(seq_len=SEQ_LEN, top_k=K, vocab_size=VOCAB, teacher={}, tokenizer={},
                        corpus={}, rows_per_shard=SHARD_ROWS)
    window = window_rows("256MB", decoded_row_bytes(manifest))
    epoch_rows = EpochRows(fake_shards(rows), np.arange(rows))
    rng = np.random.default_rng(0)
    shard_ordered = epoch_rows.span(epoch_rows.shard_order(0, 0), 0, rows)
    orders = {f"window shuffle, 256MB = {window:,} rows (this version, one stream)":
              stream_plan(epoch_rows, StreamLayout(1, 1, GLOBAL_BATCH), 0, 0, 0, window),
              "256-row shuffle buffer after the shard shuffle (before)":
              reservoir_shuffle(shard_ordered, 256, rng),
              "global shuffle": rng.permutation(rows)}
    lines = [f"{rows:,} rows of {SEQ_LEN} tokens in shards of {SHARD_ROWS} rows:", "",
             "| shuffle | median distance of adjacent rows | adjacent rows in one 1024-row batch |",
             "|---|---|---|"]
    for name, order in orders.items():
        median, same = mixing(order)
        lines.append(f"| {name} | {median:,.0f} | {same:.1%} |")
    return lines


def build_section() -> list[str]:
    import bench_scale_build

    return bench_scale_build.report_lines()


def machine() -> str:
    import pyarrow
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, torch {torch.__version__}, pyarrow "
            f"{pyarrow.__version__}, {time.strftime('%Y-%m-%d')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="cache sizes in millions (2^20) of tokens")
    parser.add_argument("--reads-size", type=int, default=64,
                        help="cache of the reads section, in millions of tokens")
    parser.add_argument("--out", default="runs/bench_scale")
    parser.add_argument("--sections", nargs="+", default=["startup", "reads", "mixing", "build"])
    parser.add_argument("--child-startup", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_startup:
        startup_child(args.child_startup, args.measure)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = {"startup": ("Start-up to the first training batch",
                            lambda: startup_section(out, args.sizes)),
                "reads": ("Bytes read per consumer per epoch",
                          lambda: reads_section(out, args.reads_size)),
                "mixing": ("Mixing", mixing_section),
                "build": ("Builder and packer", build_section)}
    report = [f"# bench-scale ({machine()})", ""]
    for name in args.sections:
        title, run = sections[name]
        started = time.perf_counter()
        try:
            body = run()
        except Exception as e:  # a section that fails is reported, the others still run
            body = [f"failed: {type(e).__name__}: {e}"]
        report += [f"## {title} ({time.perf_counter() - started:.0f} s)", "", *body, ""]
        print("\n".join(report[-len(body) - 3:]), flush=True)
    (out / "report.md").write_text("\n".join(report) + "\n")
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
