"""The shared output helpers: folders and files appear whole or not at all, and only the kit's own are replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import KIT_MARKER, UserError, atomic_output_dir, atomic_write_text, check_output_parent

ROOT = Path(__file__).resolve().parents[1]


def write_output(out: Path, name: str, overwrite: bool = False) -> None:
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / name).write_text(name)


def test_output_dir_appears_whole_marked_and_is_not_private(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("1")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "1"
    assert (tmp_path / "out" / KIT_MARKER).is_file()
    assert (tmp_path / "out").stat().st_mode & 0o055  # group/other may read, as any folder the user makes


def test_overwrite_replaces_and_leaves_no_leftovers(tmp_path):
    write_output(tmp_path / "out", "old.txt")
    write_output(tmp_path / "out", "new.txt", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [KIT_MARKER, "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_the_old_output_untouched(tmp_path):
    write_output(tmp_path / "out", "kept.txt")
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("export failed")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [KIT_MARKER, "kept.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_output_names_overwrite_and_a_file_in_the_way_is_refused(tmp_path):
    write_output(tmp_path / "out", "a.txt")
    with pytest.raises(UserError, match="already exists; pass --overwrite"), atomic_output_dir(tmp_path / "out"):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"), atomic_output_dir(tmp_path / "file", overwrite=True):
        pass


def test_overwrite_never_replaces_a_folder_the_kit_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(UserError, match=f"{mine} already exists and was not written by this kit"):
            write_output(mine, "a.txt", overwrite=overwrite)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_output(empty, "a.txt", overwrite=True)  # an empty folder loses nothing
    assert (empty / "a.txt").is_file()


@pytest.mark.parametrize("out", ["file/sub", "file/sub/deeper", "/proc/kit-test-out"])
def test_an_output_under_a_file_or_in_proc_is_one_user_error(tmp_path, out):
    (tmp_path / "file").write_text("x")
    path = tmp_path / out
    with pytest.raises(UserError, match="is a file, not a folder|cannot write in"):
        write_output(path, "a.txt")
    with pytest.raises(UserError):
        check_output_parent(path / "model.zip")
    assert (tmp_path / "file").read_text() == "x"


def start_writer(out: Path) -> tuple[subprocess.Popen, Path]:
    """A process that is writing `out` (its partial folder exists) and waits to be killed."""
    code = (
        "import sys, time\nfrom common.cli import atomic_output_dir\n"
        "with atomic_output_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'half.txt').write_text('half')\n    print(tmp, flush=True)\n    time.sleep(600)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    partial = Path(writer.stdout.readline().strip())
    assert partial.is_dir() and partial.parent == out.parent and partial.name.endswith(".partial")
    return writer, partial


def test_a_killed_run_leaves_a_partial_that_the_next_run_removes_but_never_a_live_ones(tmp_path):
    out = tmp_path / "model"
    writer, partial = start_writer(out)
    try:
        write_output(tmp_path / "model.v2", "other.txt")  # another output beside it leaves it alone
        assert partial.is_dir()
        write_output(out, "first.txt")  # the writer is alive: its partial stays
        assert partial.is_dir()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert partial.is_dir(), "SIGKILL left it behind"
    write_output(out, "second.txt", overwrite=True)
    assert not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.v2"]


def test_an_output_set_aside_by_a_killed_run_is_put_back(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    write_output(tmp_path / "out", "previous.txt")
    os.replace(tmp_path / "out", tmp_path / f".out.{pid}.old")  # killed between its two renames
    (tmp_path / f".out.{pid}.abcd1234.partial").mkdir()
    (tmp_path / ".out.legacy12.partial").mkdir()  # named before partials carried a process id
    with pytest.raises(UserError, match="pass --overwrite"):
        write_output(tmp_path / "out", "next.txt")  # refused before it writes anything: out is back
    assert (tmp_path / "out" / "previous.txt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_write_text_replaces_the_file(tmp_path):
    atomic_write_text(tmp_path / "sub" / "f.txt", "one")
    atomic_write_text(tmp_path / "sub" / "f.txt", "two")
    assert (tmp_path / "sub" / "f.txt").read_text() == "two"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["f.txt"]
    assert (tmp_path / "sub" / "f.txt").stat().st_mode & 0o044  # readable by others, like any file
