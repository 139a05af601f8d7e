"""Command-line plumbing: user errors exit 2 with one clear line, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

EXIT_USER_ERROR = 2
log = logging.getLogger(__name__)


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
    usage = "\n".join(
        [
            f"usage: python -m {prog} COMMAND [--help] ...",
            "",
            "commands:",
            *(f"  {name:<10} {text}" for name, (_, text) in commands.items()),
        ]
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] not in commands:
        print(
            f"error: unknown command {argv[0]!r}; choose one of {', '.join(commands)} (python -m {prog} --help)",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    module, function = commands[argv[0]][0].split(":")
    return run_main(getattr(importlib.import_module(module), function), argv[1:])


def check_at_least(flag: str, value: float, minimum: float) -> None:
    """A numeric flag below its minimum, NaN or infinite is a UserError naming the flag."""
    if not value >= minimum:
        raise UserError(f"{flag} must be at least {minimum}, got {value}")
    if not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}")


class KitArgumentParser(argparse.ArgumentParser):
    """The kit's parser: its own errors (a bad value, a missing or unknown flag) are a UserError, so they end as the
    single `error: ...` line with exit status 2 like every other bad input, with no usage block."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def check_positive(flag: str, value: float) -> None:
    """A numeric flag that is not a finite number above 0 is a UserError naming the flag."""
    if not (value > 0 and math.isfinite(value)):
        raise UserError(f"{flag} must be a finite number above 0, got {value}")


def check_input_folder(flag: str, path: Path) -> None:
    """The folder a flag names exists and is a folder."""
    if not Path(path).exists():
        raise UserError(f"{flag} {path}: no such folder")
    if not Path(path).is_dir():
        raise UserError(f"{flag} {path}: not a folder")


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


KIT_MARKER = ".written-by-kit"  # in every output folder the kit writes: only such a folder may be replaced
_MARKER_TEXT = "This folder was written by the landmark competition kit; --overwrite may replace it.\n"
_KIND_PREFIX = "kind: "  # the marker's line naming what the folder is: --overwrite replaces only the same kind


@contextmanager
def atomic_output_dir(
    out: str | Path, overwrite: bool = False, marker: str = KIT_MARKER, kind: str | None = None
) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` by renames, on failure it is removed.

    The folder gets the file `marker` (unless the caller wrote it) saying the kit wrote it, and which `kind` of
    output it is; with overwrite, only an existing `out` holding it (or empty) is replaced, and only by the same
    kind, renamed aside and deleted once the new one is in place.
    Temporary names hold the process id, so a later run removes what a killed run left."""
    out = Path(os.path.abspath(out))
    check_output_dir(out, overwrite, marker, kind)
    with partial_dir(out) as tmp:
        yield tmp
        mark_output_dir(tmp, marker, kind)
        check_output_dir(out, overwrite, marker, kind)  # something may have appeared there meanwhile
        swap_in(tmp, out)


def mark_output_dir(folder: Path, marker: str = KIT_MARKER, kind: str | None = None) -> None:
    """Write the marker saying the kit wrote `folder` and which kind of output it is (unless the caller wrote one),
    and give the folder ordinary permissions (mkdtemp makes it private)."""
    if not (folder / marker).exists():
        (folder / marker).write_text(_MARKER_TEXT + (f"{_KIND_PREFIX}{kind}\n" if kind else ""))
    os.chmod(folder, 0o777 & ~_umask())


def swap_in(new: Path, out: Path) -> None:
    """Put the folder `new` at `out` by renames: the old `out` is set aside, then deleted once `new` is in place."""
    old = out.with_name(f".{out.name}.{os.getpid()}.old") if out.exists() else None
    if old is not None:
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        _remove(old)


@contextmanager
def partial_dir(out: str | Path) -> Iterator[Path]:
    """A temporary folder `.NAME.PID.XXXXXXXX.partial` beside `out` to build it in, removed when done; a later run
    removes it if this process is killed (and this one first removes what killed runs left)."""
    out = Path(os.path.abspath(out))
    remove_stale_partials(out)
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.", suffix=".partial"))
    except OSError as err:
        raise UserError(f"{out}: cannot write in {out.parent} ({err.strerror})") from None
    try:
        yield tmp
    finally:
        if tmp.exists():
            _remove(tmp)


def check_output_dir(out: Path, overwrite: bool, marker: str = KIT_MARKER, kind: str | None = None) -> None:
    """Refuse an output folder that cannot be written or may not be replaced (not the kit's, or another kind of
    output than `kind`), with one line naming it (after clearing what killed runs left beside it)."""
    out = Path(os.path.abspath(out))
    check_output_parent(out)
    remove_stale_partials(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another output path")
    if not _written_by_kit(out, marker):
        raise UserError(
            f"{out} already exists and was not written by this kit (it holds no {marker}); "
            "--overwrite replaces only the kit's own outputs: choose another output path"
        )
    existing = marker_kind(out, marker)
    if kind and existing and existing != kind:
        raise UserError(
            f"{out} holds a {existing} written by this kit, not a {kind}; --overwrite replaces only an "
            "output of the same kind: choose another output path"
        )
    if not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it or choose another output path")


def _written_by_kit(folder: Path, marker: str) -> bool:
    """The folder holds the kit's marker, or nothing at all (replacing it loses nothing)."""
    try:
        return (folder / marker).is_file() or not any(folder.iterdir())
    except OSError:
        return False


def marker_kind(folder: Path, marker: str = KIT_MARKER) -> str | None:
    """The kind of output the kit's marker in `folder` records (None: no marker, or one written before kinds)."""
    try:
        lines = (folder / marker).read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((line.removeprefix(_KIND_PREFIX) for line in lines if line.startswith(_KIND_PREFIX)), None)


def check_not_an_input(
    out_flag: str, out: str | Path, inputs: list[tuple[str, str | Path | None]], replaces_out: bool = True
) -> None:
    """Refuse an output that is one of the command's inputs or lies inside an input folder, and, for a command that
    replaces OUT as a whole, a folder holding an input: one line naming both. `inputs` are (flag, path) pairs."""
    out_path = Path(os.path.realpath(out))
    for flag, path in inputs:
        if path is None:
            continue
        given = Path(os.path.realpath(path))
        if out_path == given:
            raise UserError(
                f"{out_flag} {out} is also {flag}: writing it would destroy an input; choose another output path"
            )
        if given in out_path.parents:
            raise UserError(
                f"{out_flag} {out} is inside {flag} {path}: the kit never writes into its inputs; "
                "choose an output path outside it"
            )
        if replaces_out and out_path in given.parents:
            raise UserError(
                f"{out_flag} {out} holds {flag} {path}: replacing it would destroy an input; choose another output path"
            )


def check_output_parent(out: Path) -> None:
    """The folders above an output path exist or can be made, and the innermost one takes new files."""
    out = Path(os.path.abspath(out))
    existing = next(p for p in [*out.parents, out] if p.exists())  # out itself only when it is /
    if not existing.is_dir():
        raise UserError(f"{out}: {existing} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as err:
        raise UserError(f"{out}: cannot write in {out.parent} ({err.strerror})") from None


def check_writable_folder(flag: str, folder: Path) -> None:
    """A folder a command writes into (made when missing): it, or the folder it would be made in, takes new files;
    checked before any work."""
    folder = Path(os.path.abspath(folder))
    if not folder.exists():
        check_output_parent(folder)
        return
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: exists and is not a folder; choose another output path")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"{flag} {folder}: cannot write in it ({err.strerror})") from None


def remove_stale_partials(out: Path) -> None:
    """Remove what killed runs writing `out` left beside it: `.NAME.PID.*.partial` folders whose process is gone
    (and nameless older ones); a `.NAME.PID.old` (the previous output set aside) is put back when `out` is missing."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:(\d+)\.)?(?:[a-z0-9_]{{8}}\.partial|old)")
    for sibling in out.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match is None or (match[1] is not None and _process_alive(int(match[1]))):
            continue
        if sibling.name.endswith(".old") and not out.exists():
            log.warning("putting back %s, set aside by a run that was killed, as %s", sibling, out)
            os.replace(sibling, out)
        else:
            log.info("removing %s, left by a run that was killed", sibling)
            _remove(sibling)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
