"""Every command in README.md's and docs/*.md's code blocks runs as written: each `python -m MODULE [COMMAND ...]`
(and `python submission/main.py`) exists and its parser knows every --flag the docs give it, each `make TARGET` is
a Makefile target, and no link leaves the repository. Only --help runs: no training, nothing built."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from tests import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SUBMISSION_SCRIPT = "submission/main.py"
# The bundle's kernel.py (export/bundle.py's LAUNCHER) runs main.py with its own command-line arguments appended.
SCRIPTS_RUNNING_MAIN = ("kernel.py",)
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}
FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)  # indented in lists too
SUBCOMMAND = re.compile(r"[a-z][a-z0-9-]*")
RUNS_SOMETHING = re.compile(r"\bpython|^\s*make\b")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


class Command(NamedTuple):
    """One documented invocation: what runs (a module or a script), its subcommands, the flags it is given and
    the flags after a lone `--`, which the kit passes on to submission/main.py."""

    doc: str
    program: tuple[str, ...]
    flags: tuple[str, ...]
    script_flags: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.doc}: {' '.join(self.program)}"


def code_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def shell_lines(block: str) -> list[list[str]]:
    """The block's simple commands as token lists: continuation lines joined, comments dropped, split at ; && |
    and the like (a | inside [...] is the docs' 'one of', not a pipe)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        if not RUNS_SOMETHING.search(line):
            continue  # printed output, whose apostrophes are no shell quotes
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        depth = 0
        for token in lexer:
            depth += token.startswith("[") - token.endswith("]")
            if token in SEPARATORS and not (token == "|" and depth > 0):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [tokens for tokens in commands if tokens]


def is_python(token: str) -> bool:
    return token in ("python", "python3") or token.endswith("/python")


def long_flags(tokens: list[str]) -> tuple[str, ...]:
    """The --flags among tokens ([--flag] and --flag=value forms included)."""
    stripped = (token.strip("[]").split("=")[0] for token in tokens)
    return tuple(token for token in stripped if token.startswith("--") and len(token) > 2)


def parse_command(doc: str, tokens: list[str]) -> Command | None:
    """The Command in a token list that runs Python, or None when it runs something else."""
    start = next((i for i, token in enumerate(tokens) if is_python(token)), None)
    if start is None or start + 1 >= len(tokens):
        return None
    if tokens[start + 1] == "-m":
        program, rest = [tokens[start + 2]], tokens[start + 3 :]
        while rest and SUBCOMMAND.fullmatch(rest[0]):
            program.append(rest.pop(0))
    else:
        script = tokens[start + 1]
        program = [SUBMISSION_SCRIPT if Path(script).name in SCRIPTS_RUNNING_MAIN else script]
        rest = tokens[start + 2 :]
    bare = [token.strip("[]") for token in rest]
    split = bare.index("--") if "--" in bare else len(rest)
    return Command(doc, tuple(program), long_flags(rest[:split]), long_flags(rest[split + 1 :]))


def make_targets(tokens: list[str]) -> list[str]:
    return [token for token in tokens[1:] if not token.startswith("-")] if tokens[0] == "make" else []


def documented_commands() -> list[Command]:
    commands = []
    for path in DOC_FILES:
        for block in code_blocks(path.read_text()):
            for tokens in shell_lines(block):
                command = parse_command(path.relative_to(ROOT).as_posix(), tokens)
                if command is not None:
                    commands.append(command)
    return commands


def documented_make_targets() -> set[str]:
    return {
        target
        for path in DOC_FILES
        for block in code_blocks(path.read_text())
        for tokens in shell_lines(block)
        for target in make_targets(tokens)
    }


COMMANDS = documented_commands()


# Runs `python -m MODULE ... --help` (or `python SCRIPT --help`) for each program given as JSON, in one process
# (runpy does what -m does), so TensorFlow is imported once; prints {program: [exit status, stdout, stderr]}.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys
results = {}
for program in json.loads(sys.argv[1]):
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            sys.argv = [program[0], *program[1:], "--help"]
            if program[0].endswith(".py"):
                runpy.run_path(program[0], run_name="__main__")
            else:
                runpy.run_module(program[0], run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        except Exception as error:
            status, err = 1, io.StringIO(repr(error))
    results[" ".join(program)] = [status, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def help_texts() -> dict[tuple[str, ...], str]:
    """--help of every documented program (and of submission/main.py, which takes what follows `--`), each run once;
    an AssertionError naming every program whose --help does not exit 0. The script runs last: it puts its own
    folder first on sys.path, as it does on Kaggle."""
    programs = sorted(
        {command.program for command in COMMANDS} | {(SUBMISSION_SCRIPT,)},
        key=lambda program: (program[0].endswith(".py"), program),
    )
    result = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, json.dumps(programs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.splitlines()[-1])
    failed = {name: err[-1000:] for name, (status, _, err) in results.items() if status != 0}
    assert not failed, f"--help did not exit 0: {failed}"
    return {program: results[" ".join(program)][1] for program in programs}


def unknown_flags(flags: tuple[str, ...], text: str) -> list[str]:
    return [flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]


def test_the_extraction_reads_continuations_comments_loops_and_script_flags():
    block = (
        "for s in 1 2; do\n"
        "  python -m local_eval replay --competition c$s --task recognition \\\n"
        "      --model m [--limit-h 2 | --overwrite] [-- --rerank 0 --settings=t.json]  # a comment --not-a-flag\n"
        "done\n"
        "TF_CONFIG='{\"a\": [1]}' .venv/bin/python submission/main.py --probe 30; make demo test\n"
    )
    commands = [parse_command("x.md", tokens) for tokens in shell_lines(block)]
    commands = [command for command in commands if command is not None]
    assert commands == [
        Command(
            "x.md",
            ("local_eval", "replay"),
            ("--competition", "--task", "--model", "--limit-h", "--overwrite"),
            ("--rerank", "--settings"),
        ),
        Command("x.md", (SUBMISSION_SCRIPT,), ("--probe",), ()),
    ]
    assert [target for tokens in shell_lines(block) for target in make_targets(tokens)] == ["demo", "test"]
    assert code_blocks("1. Build:\n   ```bash\n   make demo\n   ```\ntext\n") == ["   make demo\n"]
    assert unknown_flags(("--rerank", "--rerank-reserve", "--nope"), "  --rerank-reserve S\n") == ["--rerank", "--nope"]


def test_the_docs_hold_the_loop_commands():
    programs = {command.program for command in COMMANDS}
    for program in [
        ("local_eval", "build", "synthetic"),
        ("train",),
        ("export", "delg"),
        (SUBMISSION_SCRIPT,),
        ("local_eval", "replay"),
        ("local_eval", "tune"),
    ]:
        assert program in programs, f"no documented command runs {' '.join(program)}"
    assert {"demo", "test", "lint", "bench"} <= documented_make_targets()


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_a_documented_command_parses(command: Command, help_texts):
    missing = unknown_flags(command.flags, help_texts[command.program])
    assert not missing, f"{command}: {' '.join(command.program)} --help knows none of {missing}"
    missing = unknown_flags(command.script_flags, help_texts[(SUBMISSION_SCRIPT,)])
    assert not missing, f"{command}: flags after `--` go to {SUBMISSION_SCRIPT}, whose --help knows none of {missing}"


def test_documented_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    missing = [
        target
        for target in sorted(documented_make_targets())
        if not re.search(rf"^{re.escape(target)}:", makefile, re.MULTILINE)
    ]
    assert not missing, f"make targets the docs name but the Makefile lacks: {missing}"


def test_readme_is_a_short_guide_and_no_link_leaves_the_repository():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
    for path in DOC_FILES:
        for target in MARKDOWN_LINK.findall(path.read_text()):
            if "://" in target or target.startswith("#"):
                continue
            resolved = (path.parent / target.split("#")[0]).resolve()
            assert resolved.is_relative_to(ROOT), f"{path.name} links outside the repository: {target}"
