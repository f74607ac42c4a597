"""Every command line reports a user error as one line on stderr with exit code 2, and lets any
other exception (a bug) through with its traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from student_train import __main__ as train_cli
from student_train import pretrain
from teacher_cache import cli as cache_cli
from teacher_cache.backends.torch_backend import resolve_dtype
from teacher_cache.errors import (
    CacheError,
    ConfigError,
    TeacherError,
    UserError,
    reports_user_errors,
)

USER_ERRORS = {
    "cache build": (cache_cli.main, ["build", "--out", "{tmp}/cache", "--corpus", "{tmp}",
                                     "--dataset", "wikitext"],
                    "pass either --corpus or --dataset, not both"),
    "cache finalize": (cache_cli.main, ["finalize", "--out", "nosuch-protocol://bucket/cache"],
                       "nosuch-protocol://bucket/cache: cannot open this location"),
    "train": (train_cli.main, ["--cache", "{tmp}/nowhere", "--out", "{tmp}/out"],
              "nowhere: no manifest.json"),
    "pretrain": (pretrain.main, ["--cache", "{tmp}/nowhere", "--students", "xs huge", "--out",
                                 "{tmp}/out"], "--students 'xs huge': choose from"),
}


@pytest.mark.parametrize("name", USER_ERRORS)
def test_each_main_reports_a_user_error_as_one_line_and_exit_2(name, tmp_path: Path, capsys):
    main, argv, expected = USER_ERRORS[name]
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


def _bug(*args, **kwargs):
    raise ValueError("a bug, not the user's input")


@pytest.mark.parametrize("main, target, argv", [
    (cache_cli.main, "teacher_cache.cli.finalize_cache", ["finalize", "--out", "{tmp}"]),
    (train_cli.main, "student_train.train.train", ["--cache", "{tmp}", "--out", "{tmp}/out"]),
    (pretrain.main, "student_train.train.train", ["--cache", "{tmp}", "--students", "xs",
                                                  "--out", "{tmp}/out"]),
], ids=["cache", "train", "pretrain"])
def test_a_bug_keeps_its_traceback(main, target, argv, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(target, _bug)
    with pytest.raises(ValueError, match="a bug"):
        main([arg.format(tmp=tmp_path) for arg in argv])


def test_a_multi_line_message_becomes_one_line(capsys):
    @reports_user_errors
    def main() -> int:
        raise CacheError("first line\n   second line\n")

    assert main() == 2
    assert capsys.readouterr().err == "error: first line second line\n"


def test_user_errors_of_both_packages_share_one_base():
    assert issubclass(CacheError, UserError) and issubclass(ConfigError, UserError)
    with pytest.raises(TeacherError, match="unknown dtype 'fp7'"):
        resolve_dtype("fp7", torch.device("cpu"))
