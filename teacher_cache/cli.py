"""`python -m teacher_cache {build,finalize,score,synth,verify}`: the command line of build.py,
finalize.py, score.py, synth.py and verify.py."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from teacher_cache.build import DTYPE_HELP, BuildConfig, build_cache
from teacher_cache.dataclass_cli import add_fields, from_args
from teacher_cache.errors import CacheError, reports_user_errors
from teacher_cache.finalize import finalize_cache
from teacher_cache.format import MANIFEST_FILE
from teacher_cache.score import describe_score_stats, rescore_cache
from teacher_cache.storage import resolve
from teacher_cache.synth import write_synthetic_cache
from teacher_cache.teacher import DEFAULT_VOCAB_SIZE
from teacher_cache.verify import verify_cache


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m teacher_cache",
        description="Run a teacher once over a corpus and cache its next-token targets: tokens "
                    "sampled from it (default) or its top-k logprobs.")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser(
        "build", help="build (or resume) a cache",
        description="Build a cache, resuming any finished shards already in --out.")
    add_fields(build, BuildConfig)

    finalize = commands.add_parser(
        "finalize", help="check all shards of a multi-worker build and write the manifest")
    finalize.add_argument("--out", required=True, help="cache directory")

    score = commands.add_parser(
        "score", help="recompute the `score` column of a cache with a reference model")
    score.add_argument("--cache", required=True, help="cache directory")
    score.add_argument("--reference", required=True, metavar="MODEL",
                       help="reference model dir, .gguf or hub id sharing the teacher's tokenizer")
    score.add_argument("--batch-size", type=int, default=BuildConfig.batch_size,
                       help="sequences per reference forward (default: %(default)s)")
    score.add_argument("--dtype", default=BuildConfig.dtype,
                       help=f"reference {DTYPE_HELP} (default: %(default)s)")
    score.add_argument("--no-progress", action="store_true",
                       help="no progress bar (default: show one)")

    synth = commands.add_parser(
        "synth",
        help="write a synthetic cache of the real format with no teacher (a Markov chain's "
             "targets), to size storage, start-up and the data loader before paying for one")
    synth.add_argument("--tokens", type=int, required=True, help="tokens in the cache")
    synth.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                       help="vocabulary of the synthetic teacher (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0,
                       help="seed of the synthetic data (default: %(default)s)")
    add_fields(synth, BuildConfig, config_file=False,
               only=("out", "targets", "seq_len", "shard_rows", "progress"))

    verify = commands.add_parser(
        "verify", help="check every shard of a cache (size, sha256, rows); exit 1 if one is bad")
    verify.add_argument("--cache", required=True, help="cache directory")
    verify.add_argument("--repair", action="store_true",
                        help="drop bad shards and their markers and mark the cache incomplete, "
                             "so the same build command rebuilds only them (default: only "
                             "report them)")
    return parser


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "build":
        summary = build_cache(from_args(args))
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
    config = from_args(args, max_tokens=args.tokens)
    targets = config.target_spec()
    if resolve(config.out).exists(MANIFEST_FILE):
        raise CacheError(f"--out {config.out} already holds a cache; pick another directory")
    return write_synthetic_cache(config.out, sequences=args.tokens // config.seq_len,
                                 seq_len=config.seq_len, top_k=targets.k,
                                 vocab_size=args.vocab_size, rows_per_shard=config.rows_per_shard,
                                 seed=args.seed, kind=targets.kind, progress=config.progress)
