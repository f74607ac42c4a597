"""Curated mutation check (`make mutate`): one-line bugs in important logic, each applied alone to
a temporary copy of the repository, must make the tests named for it fail.

Each mutation names a file, the exact original text (it must occur exactly once), its replacement
and the tests that must catch it. The named tests first run unmutated (they must pass), then once
per mutation with PYTHONPATH pointing at the copy. It prints caught/survived per mutation and exits
non-zero if any survives, or if an original text is no longer found: the code moved, so that
mutation must be updated.

Why not mutmut or cosmic-ray: both generate mutants from their own fixed operator sets (swap an
operator, a constant, a keyword) over whole files and run the test suite, or whatever tests cover
the line, per mutant. Neither takes an arbitrary replacement text (`verify=False`, a dtype, a
marker check turned off), which is what these regressions are, and running all generated mutants
of these modules is far more work than a 2-core machine affords. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    original: str
    replacement: str
    tests: tuple[str, ...]


KERNEL_F64 = "tests/test_kernels_reference.py::test_float64_gradients_match_autograd_exactly"

MUTATIONS = [
    # --- caught before issue 13 ---
    Mutation("cache alignment: top-k of position t from the logits at t+1",
             "teacher_cache/backends/torch_backend.py",
             "torch.topk(logprobs, top_k, dim=-1)",
             "torch.topk(logprobs.roll(-1, 0), top_k, dim=-1)",
             ("tests/test_cache_build.py::"
              "test_topk_and_targets_equal_the_models_float32_log_softmax",)),
    Mutation("fkl: teacher not tempered", "kernels/divergences.py",
             "log_q = torch.log_softmax(teacher_logprobs / t, dim=-1)",
             "log_q = torch.log_softmax(teacher_logprobs, dim=-1)", (KERNEL_F64,)),
    Mutation("fkl: student logits not tempered", "kernels/divergences.py",
             "student = g_topk / t - lse_t[:, None]", "student = g_topk - lse_t[:, None]",
             (KERNEL_F64,)),
    Mutation("KD term scaled by T instead of T^2", "kernels/divergences.py",
             "loss = spec.ce_weight * ce + spec.kd_weight * t * t * kd",
             "loss = spec.ce_weight * ce + spec.kd_weight * t * kd", (KERNEL_F64,)),
    Mutation("resume position in steps instead of micro-batches", "student_train/train.py",
             "start_batch=self.step * config.grad_accum", "start_batch=self.step",
             ("tests/test_train_loop.py::test_resume_continues_exactly",)),
    Mutation("no per-epoch shard order", "student_train/data.py",
             "np.random.default_rng([seed, epoch]).permutation",
             "np.random.default_rng([seed, 0]).permutation",
             ("tests/test_data_stream.py::test_each_stream_reads_its_own_span_and_every_row_once_"
              "per_epoch",)),
    Mutation("MiniPLM score sign", "teacher_cache/score.py",
             "diff = teacher_target[:, :-1].astype(np.float64) - reference_target[:, :-1]",
             "diff = reference_target[:, :-1].astype(np.float64) - teacher_target[:, :-1]",
             ("tests/test_cache_score.py::test_sequence_scores_average_target_positions_only",)),
    Mutation("TeacherCache does not verify checksums (read_shard and read_scores)",
             "teacher_cache/reader.py",
             "return read_shard(self.location, self.shards[position], verify=self.verify)\n"
             "        except ShardMissing:",
             "return read_shard(self.location, self.shards[position], verify=False)\n"
             "        except ShardMissing:",
             ("tests/test_cache_reader.py", "tests/test_train_cli.py::test_corrupt_shard")),
    Mutation("format.read_shard does not verify checksums", "teacher_cache/format/shards.py",
             "if verify and (len(data) != info.bytes",
             "if False and (len(data) != info.bytes",
             ("tests/test_train_cli.py::test_corrupt_shard",)),
    # --- survived before issue 13 ---
    Mutation("reference: grad_W summed in the input dtype (bf16)", "kernels/reference.py",
             "LMHeadGradients(hidden, weight, math_dtype)",
             "LMHeadGradients(hidden, weight, hidden.dtype)",
             ("tests/test_kernels_precision.py::"
              "test_bfloat16_grad_weight_sums_many_chunks_in_float32",)),
    Mutation("Triton: grad_W summed in the input dtype (bf16)", "kernels/triton_autograd.py",
             "LMHeadGradients(hidden, weight, torch.float32)",
             "LMHeadGradients(hidden, weight, hidden.dtype)",
             ("tests/test_kernels_triton.py::"
              "test_bfloat16_grad_weight_is_summed_over_chunks_in_float32",)),
    Mutation("reference: all loss math in bf16", "kernels/reference.py",
             "math_dtype = torch.promote_types(hidden.dtype, torch.float32)",
             "math_dtype = hidden.dtype",
             ("tests/test_kernels_reference.py::test_bfloat16_close_to_float64",)),
    Mutation("student tail clamp ignored in fkl_tail/rkl", "kernels/divergences.py",
             "r = torch.where(student_unclamped, grad_rest / b_rest.exp(), "
             "torch.zeros_like(grad_rest))",
             "r = grad_rest / b_rest.exp()",
             ("tests/test_kernels_precision.py::test_clamped_student_rest_mass_has_no_gradient",)),
    Mutation("val_top1 against the teacher's k-th id", "student_train/evaluate.py",
             "argmax == topk_ids[rows, 0]", "argmax == topk_ids[rows, -1]",
             ("tests/test_evaluate.py",)),
    Mutation("val_kl computed as CE + KL", "student_train/evaluate.py",
             "return torch.tensor([ce * tokens, kl * tokens,",
             "return torch.tensor([ce * tokens, (ce + kl) * tokens,",
             ("tests/test_evaluate.py",)),
    Mutation("bf16 autocast forced off in training", "student_train/train.py",
             "dtype=torch.bfloat16,\n                                    enabled=self.bf16)",
             "dtype=torch.bfloat16,\n                                    enabled=False)",
             ("tests/test_train_loop.py::test_bf16_autocast_follows_the_float32_run",)),
    Mutation("--doc-mask not passed to the training forward", "student_train/train.py",
             "batch.topk_logprobs, batch.positions(self.doc_mask))",
             "batch.topk_logprobs, batch.positions(False))",
             ("tests/test_doc_mask.py::test_training_with_the_mask_changes_only_the_rows_with_"
              "boundaries",)),
    Mutation("FSDP evaluates without gathering the root's weights", "student_train/runtime.py",
             'register_fsdp_forward_method(objective, "evaluate")', "pass",
             ("tests/test_train_fsdp.py::test_activation_checkpointing_and_fsdp_on_one_process_"
              "are_the_plain_run",)),
    Mutation("rescore markers ignored (every shard recomputed on resume)",
             "teacher_cache/score.py",
             "if location.exists(journal, marker):", "if False:",
             ("tests/test_cache_score.py::test_rescore_resumes_after_a_crash",)),
]


def copy_repository(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files, as the working tree has them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, check=True, capture_output=True).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, str]:
    """('passed' | 'failed' | 'timeout' | 'error (pytest exit N)', the end of pytest's output)."""
    env = {**os.environ, "PYTHONPATH": str(copy)}
    command = [sys.executable, "-m", "pytest", "-q", "-x", *tests]
    try:
        result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    outcome = {0: "passed", 1: "failed"}.get(result.returncode,
                                             f"error (pytest exit {result.returncode})")
    return outcome, (result.stdout + result.stderr)[-3000:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the mutations whose name contains this text")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    args = parser.parse_args()
    mutations = [m for m in MUTATIONS if not args.only or args.only in m.name]
    if not mutations:
        print(f"no mutation's name contains {args.only!r}", file=sys.stderr)
        return 2

    missing = []
    for m in mutations:
        count = (REPO / m.path).read_text().count(m.original)
        if count != 1:
            missing.append(f"{m.name}: {m.path} holds its original text {count} times, not once "
                           f"(the code moved: update this mutation): {m.original!r}")
    if missing:
        print("\n".join(missing), file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        copy = Path(tmp)
        copy_repository(copy)
        # In file name order, as `make test` runs them (test_kernels_triton.py must be collected
        # before the modules that import transformers, and with it triton, at import time).
        all_tests = tuple(sorted({t for m in mutations for t in m.tests}))
        baseline, output = run_tests(copy, all_tests, args.timeout * 2)
        if baseline != "passed":
            print(f"{output}\nthe named tests do not pass unmutated ({baseline}); fix them first",
                  file=sys.stderr)
            return 1
        survived = 0
        for m in mutations:
            target = copy / m.path
            original = target.read_text()
            target.write_text(original.replace(m.original, m.replacement))
            start = time.monotonic()
            try:
                outcome, _ = run_tests(copy, m.tests, args.timeout)
            finally:
                target.write_text(original)
            # A failing test or a hang catches the mutant; anything else is not a verdict.
            verdict = {"failed": "caught", "timeout": "caught (timeout)",
                       "passed": "SURVIVED"}.get(outcome, outcome.upper())
            survived += not verdict.startswith("caught")
            print(f"{verdict:<16} {time.monotonic() - start:6.0f}s  {m.name}  [{m.path}]",
                  flush=True)
    print(f"{len(mutations) - survived}/{len(mutations)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
