"""`python -m student_train.pretrain`: several students, a baseline, a table and a plot."""

from __future__ import annotations

import json

from student_train.pretrain import main
from student_train.synthetic import write_synthetic_cache

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
