"""Command-line plumbing: user errors exit 2 with one clear line, never a traceback."""
from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed row, a wrong flag. Printed, not traced."""


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command's main(); a UserError becomes 'error: ...' on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # TensorFlow's internal INFO lines
    try:
        return main(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str]) -> int:
    """`python -m PROG COMMAND ...`: commands maps each name to ("module:function", one-line help). The
    module is imported only when its command runs, and the function runs under run_main."""
    usage = "\n".join([f"usage: python -m {prog} COMMAND [--help] ...", "", "commands:",
                        *(f"  {name:<10} {text}" for name, (_, text) in commands.items())])
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] not in commands:
        print(f"error: unknown command {argv[0]!r}\n\n{usage}", file=sys.stderr)
        return EXIT_USER_ERROR
    module, function = commands[argv[0]][0].split(":")
    return run_main(getattr(importlib.import_module(module), function), argv[1:])


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary file beside path, then rename it over path: path is whole or untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` by renames, on failure it is removed.

    With overwrite, an existing `out` is first renamed aside and deleted only once the new one is in place."""
    out = Path(out)
    _check_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        _check_output_free(out, overwrite)  # something may have appeared there meanwhile
        old = out.with_name(f".{out.name}.old") if out.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_output_free(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; remove it or choose another output path")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
