"""The shape the team keeps the code in: no function takes more than MAX_ARGUMENTS arguments (a small parameter
object instead)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("bench", "common", "demo", "export", "local_eval", "submission", "tests", "train")
MAX_ARGUMENTS = 8  # self and cls not counted


def argument_count(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    arguments = function.args
    names = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
    return len([a for a in names if a.arg not in ("self", "cls")])


def long_signatures(source: str) -> list[str]:
    """'name (N)' of each function in the source with more than MAX_ARGUMENTS arguments."""
    return [
        f"{node.name} ({argument_count(node)})"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and argument_count(node) > MAX_ARGUMENTS
    ]


def test_no_function_takes_more_than_eight_arguments():
    found = {
        str(path.relative_to(ROOT)): long
        for folder in FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (long := long_signatures(path.read_text()))
    }
    assert found == {}


def test_the_check_counts_every_kind_of_argument_but_self():
    source = "class A:\n    def f(self, a, /, b, *, c, d, e, f, g, h, i): pass\n    def g(self, a, b): pass\n"
    assert long_signatures(source) == ["f (9)"]
