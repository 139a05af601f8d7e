"""submission/'s import graph: settings.py at the bottom, nothing imports the notebook (main.py), no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

SUBMISSION = Path(__file__).resolve().parents[1] / "submission"


def imports() -> dict[str, set[str]]:
    """Each file of submission/ -> the files of submission/ it imports (type-checking imports included)."""
    files = {path.stem: path for path in SUBMISSION.glob("*.py")}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        found = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        found |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        graph[name] = found & set(files)
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for other in sorted(graph[node]):
            if state.get(other) == "open":
                return [*path[path.index(other) :], other] if other in path else [node, other]
            if other not in state and (found := visit(other, [*path, other])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_file_of_submission_imports_the_notebook():
    graph = imports()
    assert "settings" in graph and not graph["settings"] - {"settings_cli", "costs"}
    assert [name for name, deps in graph.items() if "main" in deps] == []


def test_submissions_import_graph_has_no_cycle():
    assert cycle(imports()) is None


def test_the_cycle_check_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
