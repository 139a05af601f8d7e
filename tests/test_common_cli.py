"""The shared output helpers: folders and files appear whole or not at all."""
from __future__ import annotations

import pytest

from common.cli import UserError, atomic_output_dir, atomic_write_text


def test_output_dir_appears_whole_and_is_not_private(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("1")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "1"
    assert (tmp_path / "out").stat().st_mode & 0o055  # group/other may read, as any folder the user makes


def test_overwrite_replaces_and_leaves_no_leftovers(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_the_old_output_untouched(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "kept.txt").write_text("kept")
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("export failed")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["kept.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_output_or_a_file_in_the_way_is_a_user_error(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists"), atomic_output_dir(tmp_path / "out"):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"), atomic_output_dir(tmp_path / "file", overwrite=True):
        pass


def test_atomic_write_text_replaces_the_file(tmp_path):
    atomic_write_text(tmp_path / "sub" / "f.txt", "one")
    atomic_write_text(tmp_path / "sub" / "f.txt", "two")
    assert (tmp_path / "sub" / "f.txt").read_text() == "two"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["f.txt"]
    assert (tmp_path / "sub" / "f.txt").stat().st_mode & 0o044  # readable by others, like any file
