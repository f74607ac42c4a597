"""Sampled teacher targets: on-disk bytes/token and decode time of candidate Arrow encodings.

Runs the teacher over packed tokens of the default corpus, samples K targets per position
(teacher_cache.sampling) for each K in --ks and also takes the current top-k, then writes one
shard-like Arrow IPC file per (encoding, compression) with the cache's other columns beside the
targets, and prints bytes/token and the time to decode the targets to dense [B, L, K] numpy
arrays (ids int64, logprobs float32). Also times the sampler (inverse CDF) against Gumbel-max
and the top-k path on the same logits.

    python benchmarks/bench_target_encoding.py [--tokens 16384] [--ks 4 8 12]
        [--targets runs/targets.npz]   # reuse the teacher's outputs of an earlier run
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from bench_cache import packed_ids
from teacher_args import add_teacher_arguments, teacher_path

from teacher_cache.backends.torch_backend import resolve_device, resolve_dtype
from teacher_cache.format import (
    RECORD_BATCH_ROWS,
    CacheBatch,
    counts_to_logprobs,
    decode_batch,
    encode_batch,
    unscored,
)
from teacher_cache.sampling import sample_targets, uniforms

SEED = 1234
COMPRESSIONS = (None, "lz4", "zstd")
DECODE_REPEATS = 5
GUMBEL_ROWS = 16  # Gumbel-max draws K * V hashes per position: timed on a few rows only


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """(best seconds of `repeats` calls, the last result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def gumbel_max(logits: torch.Tensor, seqs: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """Draws by Gumbel-max with the same counter hash: one uniform per (draw, vocabulary id)."""
    x = logits.float()
    draws = [(x - (-uniforms(SEED + j, seqs, pos, x.shape[1]).log()).log()).argmax(-1)
             for j in range(k)]
    return torch.stack(draws, -1)


@torch.inference_mode()
def teacher_targets(args: argparse.Namespace, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Top-k, target logprobs and sampled (ids, counts) per K, plus sampler timings [s]."""
    from transformers import AutoModelForCausalLM

    device = resolve_device("auto")
    dtype = resolve_dtype(args.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(teacher_path(args), dtype=dtype)
    model.to(device).eval()
    out: dict[str, list] = {"topk_ids": [], "topk_logprobs": [], "target_logprobs": []}
    times = {"forward": 0.0, "topk": 0.0, "gumbel_per_row": 0.0} | {
        f"sample_k{k}": 0.0 for k in args.ks}
    for k in args.ks:
        out[f"ids_k{k}"], out[f"counts_k{k}"] = [], []
    seq_len = ids.shape[1]
    positions = torch.arange(seq_len, device=device)
    for seq_id, row in enumerate(torch.from_numpy(ids.astype(np.int64)).to(device)):
        seconds, logits = timed(lambda row=row: model(input_ids=row[None], use_cache=False).logits)
        times["forward"] += seconds
        logits = logits[0]

        def top(logits=logits, row=row):
            logprobs = torch.log_softmax(logits.float(), -1)
            values, indices = logprobs.topk(args.top_k, -1)
            target = logprobs[:-1].gather(-1, row[1:, None])[:, 0]
            return values, indices, torch.cat([target, target.new_full((1,), float("nan"))])

        seconds, (values, indices, target) = timed(top)
        times["topk"] += seconds
        out["topk_ids"].append(indices.int().cpu().numpy())
        out["topk_logprobs"].append(values.cpu().numpy())
        out["target_logprobs"].append(target.cpu().numpy())
        seqs = torch.full((seq_len,), seq_id, device=device)
        for k in args.ks:
            seconds, (s_ids, s_counts) = timed(
                lambda k=k, logits=logits, seqs=seqs: sample_targets(
                    logits, SEED, seqs, positions, k, args.sample_temperature))
            times[f"sample_k{k}"] += seconds
            out[f"ids_k{k}"].append(s_ids.cpu().numpy())
            out[f"counts_k{k}"].append(s_counts.cpu().numpy())
        if seq_id == 0:
            seconds, _ = timed(lambda logits=logits, seqs=seqs: gumbel_max(
                logits[:GUMBEL_ROWS], seqs[:GUMBEL_ROWS], positions[:GUMBEL_ROWS], max(args.ks)))
            times["gumbel_per_row"] = seconds / GUMBEL_ROWS
    arrays = {name: np.stack(parts) for name, parts in out.items()}
    arrays["times"] = np.array([times[name] for name in sorted(times)])
    arrays["time_names"] = np.array(sorted(times))
    arrays["dtype"] = np.array(str(dtype))
    return arrays


# --- encodings: (name, columns of one shard's rows, decode(table) -> (ids [B, L, K], logprobs)) ---

def fixed_list(values: np.ndarray, arrow_type: pa.DataType) -> pa.FixedSizeListArray:
    b = values.shape[0]
    flat = pa.array(values.reshape(-1), type=arrow_type)
    return pa.FixedSizeListArray.from_arrays(flat, values.size // b)


def encode_fixed(ids: np.ndarray, counts: np.ndarray, id_type: pa.DataType) -> dict:
    return {"sample_ids": fixed_list(ids, id_type), "sample_counts": fixed_list(counts, pa.uint8())}


def decode_fixed(table: pa.Table, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    ids = table.column("sample_ids").combine_chunks().flatten().to_numpy()
    counts = table.column("sample_counts").combine_chunks().flatten().to_numpy()
    return ids.astype(np.int64).reshape(shape), counts_to_logprobs(counts, shape[2]).reshape(shape)


def encode_nested(ids: np.ndarray, counts: np.ndarray, id_type: pa.DataType) -> dict:
    """list<list<id>> per sequence: position t holds its distinct ids only."""
    used = counts > 0
    lengths = used.sum(-1)  # [B, L]
    inner = np.concatenate([[0], np.cumsum(lengths.reshape(-1))]).astype(np.int32)
    outer = np.arange(0, lengths.size + 1, lengths.shape[1], dtype=np.int32)

    def nested(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
        positions = pa.ListArray.from_arrays(pa.array(inner), pa.array(values[used],
                                                                       type=value_type))
        return pa.ListArray.from_arrays(pa.array(outer), positions)

    return {"sample_ids": nested(ids, id_type), "sample_counts": nested(counts, pa.uint8())}


def encode_flat(ids: np.ndarray, counts: np.ndarray, id_type: pa.DataType) -> dict:
    """list<id> of all distinct ids of a sequence, list<uint8> counts, uint8[L] ids per position."""
    used = counts > 0
    per_row = used.reshape(len(ids), -1).sum(-1)
    offsets = pa.array(np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32))
    return {
        "sample_ids": pa.ListArray.from_arrays(offsets, pa.array(ids[used], type=id_type)),
        "sample_counts": pa.ListArray.from_arrays(offsets, pa.array(counts[used], pa.uint8())),
        "sample_lengths": fixed_list(used.sum(-1).astype(np.uint8), pa.uint8()),
    }


def scatter_ragged(values: np.ndarray, lengths: np.ndarray, shape: tuple[int, int, int],
                   fill) -> np.ndarray:
    """Dense [B, L, K] from the concatenated used slots (lengths [B * L]), padded with fill."""
    dense = np.full((lengths.size, shape[2]), fill, dtype=values.dtype)
    dense[np.arange(shape[2]) < lengths[:, None]] = values
    return dense.reshape(shape)


def decode_ragged(values_column: str, lengths_of: Callable[[pa.Table], np.ndarray]):
    def decode(table: pa.Table, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        ids, counts = (_leaf(table.column(name).combine_chunks())
                       for name in (values_column, values_column.replace("ids", "counts")))
        lengths = lengths_of(table)
        return (scatter_ragged(ids.astype(np.int64), lengths, shape, 0),
                counts_to_logprobs(scatter_ragged(counts, lengths, shape, 0), shape[2]))
    return decode


def _leaf(array: pa.Array) -> np.ndarray:
    while pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type):
        array = array.flatten()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary.take(array.indices)
    return array.to_numpy(zero_copy_only=False)


def nested_lengths(table: pa.Table) -> np.ndarray:
    return np.diff(table.column("sample_ids").combine_chunks().flatten().offsets.to_numpy())


def flat_lengths(table: pa.Table) -> np.ndarray:
    return table.column("sample_lengths").combine_chunks().flatten().to_numpy().astype(np.int64)


def encode_dictionary(ids: np.ndarray, counts: np.ndarray, id_type: pa.DataType) -> dict:
    """As encode_flat, the ids dictionary-encoded per shard."""
    columns = encode_flat(ids, counts, id_type)
    column = columns["sample_ids"]
    columns["sample_ids"] = pa.ListArray.from_arrays(column.offsets,
                                                     column.values.dictionary_encode())
    return columns


ENCODINGS = {
    # name: (encode, id type, decode)
    "fixed int32 ids + uint8 counts": (encode_fixed, pa.int32(), decode_fixed),
    "fixed uint32 ids + uint8 counts": (encode_fixed, pa.uint32(), decode_fixed),
    "fixed uint16 ids + uint8 counts": (encode_fixed, pa.uint16(), decode_fixed),
    "list<list<int32>> + counts": (encode_nested, pa.int32(), decode_ragged("sample_ids",
                                                                             nested_lengths)),
    "flat list<int32> + counts + uint8 lengths": (
        encode_flat, pa.int32(), decode_ragged("sample_ids", flat_lengths)),
    "flat list<uint16> + counts + uint8 lengths": (
        encode_flat, pa.uint16(), decode_ragged("sample_ids", flat_lengths)),
    "flat dictionary<int32> ids + counts + lengths": (
        encode_dictionary, pa.int32(), decode_ragged("sample_ids", flat_lengths)),
}


def top_k_rows(input_ids: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray,
               target_logprobs: np.ndarray) -> CacheBatch:
    """Top-k cache rows of one document each, unscored."""
    b = len(input_ids)
    return CacheBatch(seq_ids=np.arange(b), input_ids=input_ids, topk_ids=topk_ids,
                      topk_logprobs=topk_logprobs, target_logprobs=target_logprobs,
                      score=unscored(b), doc_starts=[np.zeros(1, np.int32)] * b)


def common_columns(arrays: dict[str, np.ndarray], input_ids: np.ndarray) -> pa.RecordBatch:
    """The cache's columns besides the targets (seq_id, input_ids, doc_starts, target, score)."""
    b, seq_len = input_ids.shape
    batch = encode_batch(top_k_rows(input_ids, np.zeros((b, seq_len, 1), np.int32),
                                    np.zeros((b, seq_len, 1), np.float16),
                                    arrays["target_logprobs"]))
    return batch.drop_columns(["topk_ids", "topk_logprobs"])


def serialize(table: pa.Table, compression: str | None) -> bytes:
    """As teacher_cache.format.serialize_shard, with a choice of compression."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=RECORD_BATCH_ROWS)
    return sink.getvalue().to_pybytes()


def read(data: bytes) -> pa.Table:
    return pa.ipc.open_file(pa.BufferReader(data)).read_all()


def measure(label: str, table: pa.Table, tokens: int, decode: Callable[[pa.Table], object],
            check: Callable[[object], None]) -> None:
    for compression in COMPRESSIONS:
        data = serialize(table, compression)
        seconds, decoded = timed(lambda data=data: decode(read(data)), DECODE_REPEATS)
        check(decoded)
        print(f"  {label:<46}{compression or 'none':>6}{len(data) / tokens:>10.1f}"
              f"{tokens / seconds / 1e6:>14.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_teacher_arguments(parser)
    parser.set_defaults(tokens=16384)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 12])
    parser.add_argument("--sample-temperature", type=float, default=1.0)
    parser.add_argument("--targets", type=Path,
                        help="an .npz of the teacher's outputs: loaded if present, else written")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    ids = packed_ids(AutoTokenizer.from_pretrained(teacher_path(args)), args.tokens, args.seq_len)
    if args.targets and args.targets.is_file():
        arrays = dict(np.load(args.targets))
    else:
        arrays = teacher_targets(args, ids)
        if args.targets:
            args.targets.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.targets, **arrays)
    b, seq_len = ids.shape
    tokens = ids.size
    common = common_columns(arrays, ids)

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cpus, "
          f"python {platform.python_version()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), pyarrow {pa.__version__}, numpy {np.__version__}")
    print(f"teacher: {os.path.basename(teacher_path(args))} ({arrays['dtype']}), {tokens:,} tokens "
          f"({b} x {seq_len}), sample temperature {args.sample_temperature}, seed {SEED}")
    times = dict(zip(arrays["time_names"].tolist(), arrays["times"].tolist(), strict=True))
    print(f"teacher-side seconds per 1k tokens (device {resolve_device('auto')}):")
    print(f"  forward {1e3 * times['forward'] / tokens:.3f}, log_softmax+top-{args.top_k}+target "
          f"{1e3 * times['topk'] / tokens:.3f}, " + ", ".join(
              f"sample K={k} {1e3 * times[f'sample_k{k}'] / tokens:.3f}" for k in args.ks)
          + f", Gumbel-max K={max(args.ks)} {1e3 * times['gumbel_per_row']:.3f}")

    print(f"{'':2}{'encoding':<46}{'codec':>6}{'bytes/tok':>10}{'decode Mtok/s':>14}")
    top_batch = encode_batch(top_k_rows(ids, arrays["topk_ids"], arrays["topk_logprobs"],
                                        arrays["target_logprobs"]))
    print(f"top-{args.top_k} (the current format, all columns):")
    measure(f"fixed int32 ids + float16 logprobs, k={args.top_k}", pa.Table.from_batches(
        [top_batch]), tokens, lambda t: decode_batch(t, seq_len, args.top_k), lambda _: None)
    print("the other columns alone (seq_id, input_ids, doc_starts, target_logprobs, score):")
    measure("common columns", pa.Table.from_batches([common]), tokens, lambda t: t.num_rows,
            lambda _: None)

    for k in args.ks:
        s_ids, s_counts = arrays[f"ids_k{k}"], arrays[f"counts_k{k}"]
        distinct = (s_counts > 0).sum(-1)[:, :-1]  # position L - 1 has no target
        print(f"sampled K={k}: {distinct.mean():.2f} distinct ids per position "
              f"(max {distinct.max()}); all columns:")
        want = (s_ids.astype(np.int64), counts_to_logprobs(s_counts, k))

        def check(decoded, want=want) -> None:
            assert all(np.array_equal(d, w) for d, w in zip(decoded, want, strict=True))

        for label, (encode, id_type, decode) in ENCODINGS.items():
            columns = encode(s_ids, s_counts, id_type)
            table = pa.Table.from_batches([common]).append_column(
                "sample_ids", columns.pop("sample_ids"))
            for name, column in columns.items():
                table = table.append_column(name, column)
            measure(label, table, tokens,
                    lambda t, decode=decode, k=k: decode(t, (b, seq_len, k)), check)


if __name__ == "__main__":
    main()
