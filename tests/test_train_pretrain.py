"""`python -m student_train.pretrain`: several students, a baseline, a table and a plot."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from student_train.heldout import load_heldout_text, text_ce
from student_train.presets import LEARNING_RATES
from student_train.pretrain import comparisons, format_comparison, main
from student_train.run_dir import STUDENT_DIR
from teacher_cache import open_cache
from teacher_cache.synth import write_synthetic_cache

TINY = ["--set", "hidden_size=32", "--set", "num_hidden_layers=1", "--set",
        "num_attention_heads=2", "--set", "num_key_value_heads=2", "--set", "intermediate_size=64"]


def test_trains_each_student_and_its_baseline_then_reports(tmp_path, capsys):
    write_synthetic_cache(tmp_path / "cache", sequences=24, seq_len=8, top_k=2, vocab_size=64,
                          rows_per_shard=8)
    out = tmp_path / "pretrain"
    code = main(["--cache", str(tmp_path / "cache"), "--students", "xs s", "--out", str(out),
                 "--max-steps", "4", "--eval-every", "2", "--baseline", *TINY])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in results] == ["xs", "s", "xs-ce", "s-ce"]
    assert [r["kd_weight"] for r in results] == [1.0, 1.0, 0.0, 0.0]
    assert all(r["tokens_seen"] == 4 * 2 * 8 for r in results)
    assert (out / "val_ce.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    for run in ("xs-ce", "val CE", "top-1", "tokens/s"):
        assert run in table


def test_unknown_student_is_a_clear_error(tmp_path, capsys):
    write_synthetic_cache(tmp_path / "cache", sequences=8, seq_len=8, top_k=2, vocab_size=64,
                          rows_per_shard=8)
    code = main(["--cache", str(tmp_path / "cache"), "--students", "xs huge",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "--students" in capsys.readouterr().err


def test_a_cache_without_held_out_sequences_is_one_line(tmp_path, capsys):
    write_synthetic_cache(tmp_path / "cache", sequences=8, seq_len=8, top_k=2, vocab_size=64,
                          rows_per_shard=8)
    code = main(["--cache", str(tmp_path / "cache"), "--students", "xs", "--out",
                 str(tmp_path / "out"), "--max-steps", "1", "--val-fraction", "0", *TINY])
    assert code == 2
    err = capsys.readouterr().err  # the trainer's warning and progress, then the error
    assert "Traceback" not in err and "no held-out sequences, which the comparison needs" in \
        err.strip().splitlines()[-1], err


def test_baseline_subset_and_outside_text_comparison(tiny_cache, tmp_path, capsys):
    out = tmp_path / "pretrain"
    code = main(["--cache", str(tiny_cache), "--students", "xs s", "--out", str(out),
                 "--max-steps", "2", "--eval-every", "0", "--baseline", "xs",
                 "--heldout-package", "json", "--heldout-tokens", "64", *TINY])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in results] == ["xs", "s", "xs-ce"]
    assert [r["lr"] for r in results] == [LEARNING_RATES[s] for s in ("xs", "s", "xs")]
    text = load_heldout_text(open_cache(tiny_cache), "json", 64)
    for r in results:  # recomputed from the saved students
        student = LlamaForCausalLM.from_pretrained(out / r["run"] / STUDENT_DIR)
        assert r["heldout_ce"] == pytest.approx(text_ce(student, text, torch.device("cpu")),
                                                rel=1e-6)
    printed = capsys.readouterr().out
    assert "text CE" in printed
    assert "s vs xs (larger student, CE + KD)" in printed
    runs_compared = [line.split()[0] for line in printed.splitlines() if "CE only " in line]
    assert runs_compared == ["xs"]
    assert "outside text: json .py sources" in printed


def test_a_family_with_a_pruned_student_compares_it_with_its_shape_from_random_init(
        tiny_cache, tmp_path, capsys):
    out = tmp_path / "pretrain"
    code = main(["--cache", str(tiny_cache), "--students", "xs prune:layers=1", "--out", str(out),
                 "--max-steps", "2", "--eval-every", "0", "--random-init",
                 "--heldout-package", "json", "--heldout-tokens", "64", *TINY])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["run"], r["init"]) for r in results] == [
        ("xs", "random"), ("prune-layers1", "pruned"), ("prune-layers1-random", "random")]
    assert results[1]["parameters"] == results[2]["parameters"]
    assert results[1]["lr"] < results[2]["lr"]  # a pruned student's default rate is lower
    printed = capsys.readouterr().out
    table = printed.split("held-out comparison")[0]
    assert "prune-layers1-random  random" in table and "prune-layers1         pruned" in table
    twin = next(line for line in printed.splitlines()
                if "pruned from the teacher vs the same shape from random init" in line)
    assert twin.split()[0] == "prune-layers1" and ("better by" in twin or "WORSE by" in twin)
    card = (out / "prune-layers1" / STUDENT_DIR / "README.md").read_text()
    assert "CE on json .py sources" in card and f"{results[1]['heldout_ce']:.3f}" in card


def result(run: str, parameters: int, kd_weight: float, val_ce: float, heldout_ce: float) -> dict:
    return {"run": run, "parameters": parameters, "kd_weight": kd_weight, "val_ce": val_ce,
            "heldout_ce": heldout_ce}


def test_comparison_pairs_sizes_and_baselines_and_says_which_won():
    results = [result("s", 7, 1.0, 5.9, 7.2), result("xs", 3, 1.0, 6.0, 7.1),
               result("m", 50, 1.0, 5.5, 6.5), result("xs-ce", 3, 0.0, 6.1, 7.0)]
    pairs = [(what, better["run"], other["run"]) for what, better, other in comparisons(results)]
    assert pairs == [("s vs xs (larger student, CE + KD)", "s", "xs"),
                     ("m vs s (larger student, CE + KD)", "m", "s"),
                     ("xs CE + KD vs CE only", "xs", "xs-ce")]
    lines = format_comparison(results, 2.2, "some text").splitlines()
    s_vs_xs = next(line for line in lines if line.lstrip().startswith("s vs xs"))
    assert "5.900 vs 6.000  better by 0.100" in s_vs_xs
    assert "7.200 vs 7.100  WORSE by 0.100" in s_vs_xs
    kd_vs_ce = next(line for line in lines if "CE only" in line)
    assert "6.000 vs 6.100  better by 0.100" in kd_vs_ce
    assert "7.100 vs 7.000  WORSE by 0.100" in kd_vs_ce
    assert any("teacher on the validation rows: 2.200" in line for line in lines)
    without_text = format_comparison([r | {"heldout_ce": None} for r in results], None, None)
    assert "outside text" not in without_text and "WORSE" not in without_text
    no_rows = format_comparison([r | {"val_ce": float("nan")} for r in results], None, None)
    assert "n/a (no rows)" in no_rows and "better by" not in no_rows


def test_baseline_of_a_student_not_trained_is_a_clear_error(cli_cache_dir, tmp_path, capsys):
    code = main(["--cache", str(cli_cache_dir), "--students", "xs s", "--baseline", "m",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "--baseline 'm': m is not among --students xs s" in capsys.readouterr().err


def test_an_explicit_lr_applies_to_every_student(cli_cache_dir, tmp_path):
    out = tmp_path / "pretrain"
    assert main(["--cache", str(cli_cache_dir), "--students", "xs s", "--out", str(out),
                 "--max-steps", "1", "--lr", "0.02", *TINY]) == 0
    assert [r["lr"] for r in json.loads((out / "results.json").read_text())] == [0.02, 0.02]


def test_unknown_heldout_package_fails_before_training(cli_cache_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--cache", str(cli_cache_dir), "--students", "xs", "--out", str(out),
                 "--heldout-package", "no_such_package_here"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an installed package" in err
    assert not out.exists()
