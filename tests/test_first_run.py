"""What a new user meets first: the teacher's dtype, the help texts, the plot, the score summary."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from student_train.presets import PRESETS, describe_presets, llama_config, parameter_count
from student_train.pretrain import ce_axis_limits, draw_curves, teacher_val_ce
from teacher_cache import open_cache
from teacher_cache.backends.torch_backend import resolve_dtype
from teacher_cache.cli import build_parser
from teacher_cache.errors import TeacherError
from teacher_cache.format import score_stats
from teacher_cache.score import describe_score_stats
from teacher_cache.synth import write_synthetic_cache
from teacher_cache.teacher import choose_dtype, resolve_teacher

# --- --dtype auto ---------------------------------------------------------------------------


@pytest.fixture
def cpu_flags(monkeypatch):
    """Set what the CPU reports: cpu_flags(amx=..., avx512_bf16=...)."""
    def set_flags(*, amx: bool, avx512_bf16: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    return set_flags


@pytest.mark.parametrize(("amx", "avx512_bf16", "expected"), [
    (False, True, "float32"),  # the EPYC of the report: bf16 without AMX was the slower one
    (False, False, "float32"),
    (True, True, "bfloat16"),
    (True, False, "bfloat16"),
])
def test_auto_dtype_on_cpu_follows_amx(cpu_flags, amx, avx512_bf16, expected):
    cpu_flags(amx=amx, avx512_bf16=avx512_bf16)
    choice = choose_dtype("auto", "cpu")
    assert choice.dtype == expected
    assert "AMX" in choice.reason
    assert resolve_dtype("auto", torch.device("cpu")) == getattr(torch, expected)


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_on_cuda_follows_native_bf16(monkeypatch, cpu_flags, bf16, expected):
    cpu_flags(amx=not bf16, avx512_bf16=True)  # the CPU has no say for a GPU teacher
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert choose_dtype("auto", "cuda").dtype == expected


def test_an_explicit_dtype_is_kept_and_an_unknown_one_refused(cpu_flags):
    cpu_flags(amx=False, avx512_bf16=False)
    assert choose_dtype("bf16", "cpu").dtype == "bfloat16"
    assert choose_dtype("fp32", "cuda").reason == "--dtype fp32 was requested"
    with pytest.raises(TeacherError, match="unknown dtype 'int8'; choose auto or one of"):
        choose_dtype("int8", "cpu")


def test_manifest_records_the_dtype_and_why(cpu_flags, monkeypatch, tiny_teacher_dir: Path,
                                            tiny_build_config, tmp_path: Path):
    cpu_flags(amx=False, avx512_bf16=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    teacher = resolve_teacher(str(tiny_teacher_dir))
    assert "no AMX" in teacher.manifest_entry("auto", "torch")["dtype_reason"]

    from teacher_cache.build import build_cache

    build_cache(tiny_build_config(tmp_path / "cache", dtype="auto", max_tokens=64))
    recorded = open_cache(tmp_path / "cache").manifest.teacher
    assert recorded["dtype"] == "float32"
    assert recorded["dtype_reason"].startswith("--dtype auto chose float32: the CPU has no AMX")


def test_a_manifest_without_dtype_reason_still_loads(tiny_cache: Path, tmp_path: Path):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["teacher"].pop("dtype_reason", None)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert open_cache(copy).manifest.teacher["dtype"] == "float32"


# --- --help ---------------------------------------------------------------------------------


def subcommand(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def test_build_help_shows_each_default_once_and_only_real_ones():
    text = subcommand("build").format_help()
    for noise in ("(default: None)", "(default: [])", "(default: False)"):
        assert noise not in text
    assert "default: all (default" not in text and "default: all" in text
    out_help = text.split("--out OUT")[1].split("--corpus")[0]
    assert "default" not in out_help  # required
    for shown in ("(default: 512)", "(default: 131,072 tokens' worth, 256 at --seq-len 512)",
                  "(default: auto)", "(default: torch)",
                  "(default: 0)"):  # --worker-index 0 is a real default, not an empty one
        assert shown in " ".join(text.split())


def test_every_option_of_every_command_has_help():
    for name in ("build", "finalize", "score"):
        for action in subcommand(name)._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


def test_presets_are_listed_with_parameter_counts():
    from student_train.__main__ import build_parser as train_parser

    assert "xs (3.3M), s (7.3M)" in describe_presets()
    assert "xs (3.3M)" in " ".join(train_parser().format_help().split())


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_match_the_built_model(name: str):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(PRESETS[name], 49152, 64))
    assert parameter_count(PRESETS[name], 49152) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("module, argv", [("student_train", ["--help"]),
                                          ("teacher_cache", ["build", "--help"])])
def test_help_imports_neither_torch_nor_transformers(module: str, argv: list[str]):
    script = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = [{module!r}, *{argv!r}]
        try:
            runpy.run_module({module!r}, run_name="__main__")
        except SystemExit:
            pass
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "transformers"}})
        print("heavy:", heavy, file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert f"usage: python -m {module}" in result.stdout
    assert "heavy: []" in result.stderr


# --- the plot -------------------------------------------------------------------------------

TOKENS = [0, 1000, 2000, 3000]
CURVES = {"xs": (TOKENS, [10.8, 6.8, 6.3, 6.0]), "xs-ce": (TOKENS, [10.8, 6.9, 6.5, 6.2])}


def test_axis_starts_near_the_curves_not_at_the_untrained_start():
    low, high = ce_axis_limits([ce for _, ce in CURVES.values()], teacher_ce=None)
    assert 5.7 < low < 6.0 and 6.9 < high < 7.2


def test_a_near_teacher_joins_the_axis_a_far_one_does_not():
    curves = [ce for _, ce in CURVES.values()]
    assert ce_axis_limits(curves, teacher_ce=5.5)[0] < 5.5
    assert ce_axis_limits(curves, teacher_ce=2.4)[0] > 5.7


@pytest.mark.parametrize("teacher_ce", [5.5, 2.4])
def test_the_plot_draws_the_teacher_line_and_notes_the_start(teacher_ce: float):
    import matplotlib.pyplot as plt

    fig = draw_curves(CURVES, teacher_ce)
    try:
        top = fig.axes[0]
        assert top.get_ylim()[1] < 7.2
        assert any("10.80 (above)" in t.get_text() for t in top.texts)
        lines = [line for ax in fig.axes for line in ax.get_lines()
                 if line.get_label().startswith("teacher")]
        assert len(lines) == 1 and list(lines[0].get_ydata()) == [teacher_ce, teacher_ce]
        low, high = lines[0].axes.get_ylim()
        assert low < teacher_ce < high
        assert len(fig.axes) == (2 if teacher_ce == 2.4 else 1)  # far: its own panel below
    finally:
        plt.close(fig)


@pytest.mark.parametrize("max_rows", [None, 3])
def test_teacher_ce_is_over_the_evaluators_held_out_rows(tmp_path: Path, max_rows):
    from student_train.data import split_rows
    from student_train.selection import Selection

    write_synthetic_cache(tmp_path / "cache", sequences=40, seq_len=8, top_k=2, vocab_size=64,
                          rows_per_shard=8)
    cache = open_cache(tmp_path / "cache")
    val = split_rows(cache, 0.3, Selection.parse("none"), seed=0, val_max_rows=max_rows).val
    held_out = np.concatenate([b.target_logprobs[np.isin(b.seq_ids, val), :-1]
                               for b in cache.iter_batches()])
    assert 0 < len(val) < 40 and (max_rows is None or len(val) == max_rows)
    assert teacher_val_ce(str(tmp_path / "cache"), 0.3, max_rows) == pytest.approx(
        -held_out.mean())


# --- the score summary ----------------------------------------------------------------------


def test_score_summary_is_readable_not_a_dict():
    text = describe_score_stats(score_stats(np.linspace(-1, 3, 101, dtype=np.float32)))
    assert "{" not in text and "'" not in text
    assert "101 sequences" in text and "mean 1.000" in text and "min -1.000" in text
    assert "quantiles 10/20/30/40/50/60/70/80/90%: -0.60" in text
    assert describe_score_stats(score_stats(np.full(3, np.nan, np.float32))) == (
        "score: no sequence was scored")
