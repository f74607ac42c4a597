"""Sampled vs top-k teacher targets: student quality and cache cost per target kind (issue 11).

    python benchmarks/bench_targets.py [--targets topk:64 sample:8 sample:4] [--tokens 1048576]
        [--seq-len 512] [--student xs] [--set KEY=VALUE ...] [--steps 100] [--batch-size 8]
        [--seeds 0 1] [--heldout-package numpy] [--heldout-tokens 32768] [--out runs/bench-targets]

One cache per target kind is built by the real builder from the default corpus (same corpus, seed
and seq_len, so the packed sequences are identical across caches: checked), then the same student
preset trains for the same steps and tokens with CE only (kd_weight 0, on the first cache) and with
KD on each cache, once per seed. Reported per run: CE on the cache's held-out split (the same rows
in every cache: checked) and CE on a text set outside the corpus, the .py sources of an installed
package (sorted file list, first --heldout-tokens tokens, packed and scored by the teacher like the
cache); the teacher's CE on both is the reference line. Per target kind: bytes/token and build
tokens/s, decode and training-stream tokens/s of the reader. Finished caches and runs under --out
are reused, unfinished ones resume; results.json holds everything.

Fresh caches of every kind are built together with one teacher forward pass (`SharedForward`: the
builders run in threads and the first to ask for a batch computes its logits, which are a function
of the input ids, for all of them), so three kinds cost about one teacher pass. Build tokens/s per
kind then comes from separate small builds of --speed-tokens tokens each.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from bench_train import describe_machine, reader_throughput
from transformers import LlamaForCausalLM

from student_train.config import TrainConfig
from student_train.data import eval_batches, split_rows
from student_train.evaluate import evaluate
from student_train.run_dir import STUDENT_DIR
from student_train.selection import Selection
from student_train.train import train
from teacher_cache.backends import torch_backend
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.corpus import CorpusConfig, package_sources
from teacher_cache.errors import CacheError
from teacher_cache.format import Manifest
from teacher_cache.reader import TeacherCache, open_cache


def build_config(out: Path, targets: str, corpus: CorpusConfig, tokens: int, args) -> BuildConfig:
    return BuildConfig(out=str(out), teacher=args.teacher, corpus=corpus, max_tokens=tokens,
                       seq_len=args.seq_len, targets=targets, seed=args.cache_seed, progress=False)


def cached(out: Path, targets: str, corpus: CorpusConfig, tokens: int, args) -> TeacherCache:
    """The finished cache in `out`, built (or its build resumed) first if needed."""
    try:
        return open_cache(out)
    except CacheError:
        pass
    print(f"== build {out} ({targets}) ==", flush=True)
    build_cache(build_config(out, targets, corpus, tokens, args))
    return open_cache(out)


class SharedForward:
    """One teacher forward per distinct batch of input ids for `users` builders running in
    threads over the same packed sequences in the same order: the first to ask computes the
    logits, the others reuse them, and a batch is dropped once every builder has taken it. At most
    `ahead` batches are held (each [B, L, V] float32), so the leader waits for the others."""

    def __init__(self, users: int, ahead: int = 2):
        self.users, self.ahead = users, ahead
        self.held: dict[bytes, list] = {}
        self.ready = threading.Condition()

    def logits(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        key = repr(tuple(input_ids.shape)).encode() + input_ids.cpu().numpy().tobytes()
        with self.ready:
            while key not in self.held and len(self.held) >= self.ahead:
                self.ready.wait()
            if key not in self.held:
                self.held[key] = [model(input_ids=input_ids, use_cache=False).logits, self.users]
            entry = self.held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self.held[key]
                self.ready.notify_all()
            return entry[0]

    def leave(self) -> None:
        """A builder stopped and will take no more batches: the held ones are recomputed for the
        others if they still need them."""
        with self.ready:
            self.users -= 1
            self.held.clear()
            self.ready.notify_all()


def build_together(configs: list[BuildConfig]) -> None:
    """`build_cache` for each config (fresh caches of the same corpus, seq_len and batch size), in
    threads sharing one teacher forward per batch."""
    shared = SharedForward(len(configs))
    create = torch_backend.create

    loading = threading.Lock()  # transformers' model loading is not thread-safe

    def sharing(config):
        with loading:
            backend = create(config)
        model = backend.model
        backend.model = lambda **kw: SimpleNamespace(logits=shared.logits(model, kw["input_ids"]))
        return backend

    errors = []

    def run(config: BuildConfig) -> None:
        try:
            build_cache(config)
        except BaseException as e:  # reported below, after every thread has stopped
            errors.append(e)
            shared.leave()

    torch_backend.create = sharing
    try:
        threads = [threading.Thread(target=run, args=(c,)) for c in configs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        torch_backend.create = create
    if errors:
        raise errors[0]


def build_speed(out: Path, targets: str, tokens: int, args) -> float:
    """Teacher tokens/s of one kind alone, from a small build of its own."""
    return cached(out, targets, CorpusConfig(), tokens, args).manifest.build["tokens_per_s"]


def teacher_ce(cache: TeacherCache, seq_ids: np.ndarray) -> float:
    """The teacher's CE (nats/token) on the true next token over the rows `seq_ids`."""
    wanted = set(seq_ids.tolist())
    total, count = 0.0, 0
    for batch in cache.iter_batches():
        rows = [i for i, s in enumerate(batch.seq_ids.tolist()) if s in wanted]
        logprobs = batch.target_logprobs[rows, :-1].astype(np.float64)
        total -= logprobs.sum()
        count += logprobs.size
    return total / count


def scan(cache: TeacherCache) -> tuple[str, dict[str, float]]:
    """A hash of every row's seq_id and input ids in seq_id order, and what the targets hold per
    position: the teacher mass they cover (top-k; 1 for samples) and how many distinct ids."""
    rows, mass, distinct, positions = {}, 0.0, 0, 0
    for batch in cache.iter_batches():
        for seq_id, ids in zip(batch.seq_ids.tolist(), batch.input_ids, strict=True):
            rows[seq_id] = ids.tobytes()
        logprobs = batch.topk_logprobs[:, :-1].astype(np.float64)
        mass += np.exp(logprobs).sum()
        distinct += int(np.isfinite(logprobs).sum())
        positions += logprobs.shape[0] * logprobs.shape[1]
    digest = hashlib.sha256()
    for seq_id in sorted(rows):
        digest.update(seq_id.to_bytes(8, "little") + rows[seq_id])
    return digest.hexdigest(), {"teacher_mass": mass / positions, "ids_per_position":
                                distinct / positions}


def kind_stats(cache: TeacherCache, targets: dict[str, float], build_tokens_per_s: float,
               batch_size: int) -> dict[str, Any]:
    manifest: Manifest = cache.manifest
    decode, stream = reader_throughput(str(cache.location.uri), batch_size)
    return {"bytes_per_token": manifest.totals["bytes"] / manifest.totals["tokens"],
            "build_tokens_per_s": build_tokens_per_s,
            "build_dtype": manifest.teacher.get("dtype"),
            "decode_tokens_per_s": decode, "stream_tokens_per_s": stream, **targets}


def heldout_ce(run_dir: Path, text: TeacherCache) -> float:
    student = LlamaForCausalLM.from_pretrained(run_dir / STUDENT_DIR)
    seq_ids, _ = text.read_scores()
    return evaluate(student, eval_batches(text, seq_ids, 8), torch.device("cpu")).ce


def format_tables(report: dict[str, Any]) -> str:
    kinds = report["kinds"]
    lines = [f"{'targets':<12}{'bytes/token':>12}{'build tok/s':>13}{'decode tok/s':>14}"
             f"{'stream tok/s':>14}{'ids/pos':>9}{'mass':>7}", "-" * 81]
    for name, k in kinds.items():
        build = k["build_tokens_per_s"] or 0
        lines.append(f"{name:<12}{k['bytes_per_token']:>12.1f}{build:>13,.0f}"
                     f"{k['decode_tokens_per_s']:>14,.0f}{k['stream_tokens_per_s']:>14,.0f}"
                     f"{k['ids_per_position']:>9.2f}{k['teacher_mass']:>7.3f}")
    if report["shared_build"]:
        shared = report["shared_build"]
        tokens = report["args"]["tokens"]
        lines.append(f"built together with one teacher pass: {', '.join(shared['kinds'])}, "
                     f"{shared['seconds']:.0f} s ({tokens / shared['seconds']:,.0f} tokens/s per "
                     f"cache); build tok/s above: each kind alone, "
                     f"{report['args']['speed_tokens']:,} tokens")
    lines += ["", f"{'run':<18}{'KD on':<12}{'seed':>5}{'tokens':>10}{'val CE':>9}"
                  f"{'held-out CE':>13}{'train tok/s':>13}", "-" * 80]
    for r in report["runs"]:
        lines.append(f"{r['run']:<18}{r['targets'] or '-':<12}{r['seed']:>5}{r['tokens_seen']:>10,}"
                     f"{r['val_ce']:>9.4f}{r['heldout_ce']:>13.4f}{r['tokens_per_s'] or 0:>13,.0f}")
    teacher = report["teacher"]
    lines.append(f"{'teacher':<18}{'':<12}{'':>5}{'':>10}{teacher['val_ce']:>9.4f}"
                 f"{teacher['heldout_ce']:>13.4f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["topk:64", "sample:8", "sample:4"])
    parser.add_argument("--tokens", type=int, default=1_048_576, help="tokens per cache")
    parser.add_argument("--speed-tokens", type=int, default=16384,
                        help="tokens of the separate build that times each kind alone")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--teacher", help="default: the default teacher (SmolLM2-135M-Instruct)")
    parser.add_argument("--cache-seed", type=int, default=0, help="seed of the sampled draws")
    parser.add_argument("--student", default="xs", help="student preset of every run")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a preset field (repeatable)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every run")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--heldout-package", default="numpy",
                        help="installed package whose .py sources are the held-out text")
    parser.add_argument("--heldout-tokens", type=int, default=32768)
    parser.add_argument("--out", default="runs/bench-targets", help="caches, runs, results.json")
    args = parser.parse_args()

    out = Path(args.out)
    started = time.perf_counter()
    machine = io.StringIO()
    with contextlib.redirect_stdout(machine):
        describe_machine()
    print(machine.getvalue(), end="")
    files = [str(p) for p in package_sources(args.heldout_package)]
    text = cached(out / f"heldout-{args.heldout_package}", "topk:1", CorpusConfig(paths=files),
                  args.heldout_tokens, args)
    paths = {t: out / f"cache-{t.replace(':', '-')}" for t in args.targets}
    fresh = [t for t, path in paths.items() if not path.exists()]
    shared = None
    if len(fresh) > 1:
        print(f"== build {', '.join(fresh)} together, one teacher pass ==", flush=True)
        start = time.perf_counter()
        build_together([build_config(paths[t], t, CorpusConfig(), args.tokens, args)
                        for t in fresh])
        shared = {"kinds": fresh, "seconds": time.perf_counter() - start}
    caches = {t: cached(paths[t], t, CorpusConfig(), args.tokens, args) for t in args.targets}
    speeds = {t: build_speed(out / f"speed-{t.replace(':', '-')}", t, args.speed_tokens, args)
              for t in args.targets}
    first = caches[args.targets[0]]
    print(f"corpus: {first.manifest.corpus['description']}, {first.manifest.totals['tokens']:,} "
          f"tokens x seq_len {args.seq_len}; held-out text: {args.heldout_package} .py sources, "
          f"{len(files)} files, first {text.manifest.totals['tokens']:,} tokens")

    scans = {t: scan(c) for t, c in caches.items()}
    digests = {t: digest for t, (digest, _) in scans.items()}
    assert len(set(digests.values())) == 1, f"caches hold different sequences: {digests}"
    base = TrainConfig(cache="", out="", student=args.student, overrides=dict(
        o.split("=", 1) for o in args.overrides), max_steps=args.steps,
        batch_size=args.batch_size, eval_every=0, checkpoint_every=max(args.steps // 4, 1),
        resume=True)
    vals = {t: split_rows(c, base.val_fraction, Selection(), 0).val for t, c in caches.items()}
    val = vals[args.targets[0]]
    assert all(np.array_equal(v, val) for v in vals.values()), "held-out splits differ"
    print(f"packed sequences identical in every cache; held-out split: {len(val)} sequences")

    kinds = {t: kind_stats(c, scans[t][1], speeds[t], args.batch_size) for t, c in caches.items()}
    all_text = text.read_scores()[0]
    teacher = {"val_ce": teacher_ce(first, val), "heldout_ce": teacher_ce(text, all_text)}

    plan = [("ce", args.targets[0], 0.0)] + [(t.replace(":", "-"), t, 1.0) for t in args.targets]
    runs = []
    for seed in args.seeds:
        for name, targets, kd_weight in plan:
            run_dir = out / f"{name}-seed{seed}"
            print(f"== {run_dir.name} ==", flush=True)
            summary = train(replace(base, cache=str(caches[targets].location.uri),
                                    out=str(run_dir), kd_weight=kd_weight, seed=seed))
            runs.append({"run": run_dir.name, "targets": targets if kd_weight else None,
                         **summary, "heldout_ce": heldout_ce(run_dir, text)})

    report = {"machine": machine.getvalue().strip(), "args": vars(args),
              "heldout_text": {"package": args.heldout_package, "files": len(files),
                               "tokens": text.manifest.totals["tokens"]},
              "held_out_split_sequences": len(val), "teacher": teacher, "kinds": kinds,
              "shared_build": shared,
              "runs": runs, "seconds": time.perf_counter() - started}
    print()
    print(format_tables(report))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{len(runs)} runs, {report['seconds'] / 60:.1f} min; results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
