"""Issue 29, the kit's commands: every bad flag, bad file or fault is one `error:` line with exit status 2, found
before any work, and nothing good is lost."""
from __future__ import annotations

import importlib

import pytest

from common.cli import run_main


def run_command(target: str, argv: list[str], capsys) -> tuple[int, str]:
    """run_main of "module:function" on argv: (exit status, stderr)."""
    module, function = target.split(":")
    code = run_main(getattr(importlib.import_module(module), function), argv)
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, *named: str) -> None:
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for text in named:
        assert text in err, err


@pytest.mark.parametrize("target, argv, named", [
    ("train.__main__:main", ["--steps", "abc", "--out", "o", "--data", "d"], "argument --steps: invalid int value"),
    ("local_eval.score:main", ["--task", "foo", "--solution", "s", "--submission", "t"], "argument --task"),
    ("local_eval.timing:main", ["--db", "1e30", "--log", "l", "--profile", "p"], "argument --db: invalid int"),
    ("local_eval.build:main", ["gldv2", "--gldv2", "g", "--test", "x", "--index", "3", "--out", "o"], "--test"),
    ("local_eval.build:main", ["nothing"], "invalid choice: 'nothing'"),
    ("local_eval.replay:main", ["--task", "recognition"], "the following arguments are required"),
    ("local_eval.tune:main_merge", ["--tables", "t", "--task", "retrieval", "--out", "o", "--bogus"],
     "unrecognized arguments: --bogus"),
    ("export.__main__:main_delg", ["--run", "r"], "required: --out"),
    ("local_eval.show:main_show_pair", ["a.jpg"], "required"),
])
def test_argparse_errors_are_one_error_line_without_usage(target, argv, named, capsys):
    code, err = run_command(target, argv, capsys)
    assert_one_error_line(code, err, named, "--help")
    assert "usage:" not in err


@pytest.mark.parametrize("target, argv, flag", [
    ("local_eval.tradeoff:main", ["--speedup", "nan"], "--speedup"),
    ("local_eval.tradeoff:main", ["--speedup", "inf"], "--speedup"),
    ("local_eval.tradeoff:main", ["--limit-h", "nan"], "--limit-h"),
    ("local_eval.tune:main", ["--limit-h", "inf"], "--limit-h"),
    ("train.tfrecords:main", ["--validation-fraction", "nan"], "--validation-fraction"),
])
def test_nan_and_infinite_numbers_are_refused_before_any_work(target, argv, flag, tmp_path, capsys):
    required = {"local_eval.tradeoff:main": ["--competition", str(tmp_path / "c"), "--task", "recognition",
                                             "--model", str(tmp_path / "m"), "--out", str(tmp_path / "out")],
                "local_eval.tune:main": ["--competition", str(tmp_path / "c"), "--task", "recognition",
                                         "--model", str(tmp_path / "m"), "--out", str(tmp_path / "out")],
                "train.tfrecords:main": ["--data", str(tmp_path), "--out", str(tmp_path / "out")]}[target]
    code, err = run_command(target, [*required, *argv], capsys)
    assert_one_error_line(code, err, flag)
    assert not (tmp_path / "out").exists()


def test_an_unknown_command_is_one_error_line(capsys):
    from common.cli import dispatch
    from local_eval.__main__ import COMMANDS
    assert dispatch("local_eval", COMMANDS, ["nosuch"]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(2, err, "unknown command 'nosuch'", "replay")


