"""`python -m export`'s flags: one error line for each bad one, --overwrite only over the kit's own outputs, and
what a killed export leaves is cleared by the next one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.cli import KIT_MARKER, run_main
from export.__main__ import main_bundle, main_delg, main_retrieval

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ["--kaggle-user", "someone"]


@pytest.mark.parametrize(
    "main, flags, named",
    [
        (main_delg, ["--run", "{file}", "--out", "{tmp}/m"], "--run {file}: not a folder"),
        (main_delg, ["--run", "{tmp}/none", "--out", "{tmp}/m"], "--run {tmp}/none: no such folder"),
        (main_delg, ["--run", "{run}", "--out", "{file}/model"], "{file} is a file, not a folder"),
        (main_delg, ["--run", "{run}", "--out", "/proc/kit-test-model"], "cannot write in /proc"),
        (main_delg, ["--run", "{run}", "--out", "{mine}", "--overwrite"], "{mine} already exists and was not written"),
        (main_delg, ["--run", "{run}", "--out", "{kits}"], "{kits} already exists; pass --overwrite"),
        (main_retrieval, ["--run", "{run}", "--out", "{tmp}/m.zip", "--dim", "0"], "--dim must be at least 1"),
        (main_retrieval, ["--run", "{run}", "--out", "{tmp}/m.zip", "--max-mb", "-1"], "--max-mb must be a finite"),
        (
            main_retrieval,
            ["--run", "{run}", "--out", "{file}", "--overwrite"],
            "--out {file} exists and is no SavedModel",
        ),
        (main_retrieval, ["--run", "{run}", "--out", "{file}"], "pass --overwrite"),
        (main_retrieval, ["--run", "{run}", "--out", "{mine}"], "--out {mine}: a folder"),
        (main_bundle, ["--run", "{run}", "--out", "{tmp}/b", *BUNDLE, "--time-budget-h", "nan"], "--time-budget-h"),
        (main_bundle, ["--run", "{run}", "--out", "{tmp}/b", "--kaggle-user", 'me"; rm'], "--kaggle-user"),
        (main_bundle, ["--run", "{run}", "--out", "{tmp}/b", *BUNDLE, "--competition", "a/b"], "--competition 'a/b'"),
        (
            main_retrieval,
            ["--run", "{run}", "--run", "{mine}", "--out", "{tmp}/m.zip", "--model-weights", "1"],
            "--model-weights gives 1 weights for 2 --run",
        ),
        (
            main_bundle,
            ["--run", "{run}", "--run", "{mine}", "--out", "{tmp}/b", *BUNDLE, "--model-weights", "1", "2", "3"],
            "--model-weights gives 3 weights for 2 --run",
        ),
        (
            main_retrieval,
            ["--run", "{run}", "--run", "{mine}", "--out", "{tmp}/m.zip", "--model-weights", "1", "0"],
            "--model-weights must be a finite number above 0",
        ),
        (main_bundle, ["--run", "{run}", "--run", "{run}", "--out", "{tmp}/b", *BUNDLE], "--run {run} is given twice"),
        (
            main_retrieval,
            ["--run", "{run}", "--run", "{mine}", "--out", "{tmp}/m.zip", "--dim", "32"],
            "--dim 32 sets one run's descriptor size",
        ),
    ],
)
def test_bad_flags_are_one_error_line_and_touch_nothing(tmp_path, capsys, main, flags, named):
    paths = {
        "tmp": tmp_path,
        "file": tmp_path / "file",
        "run": tmp_path / "run",
        "mine": tmp_path / "mine",
        "kits": tmp_path / "kits",
    }
    paths["file"].write_text("x")
    for folder in ("run", "mine", "kits"):
        paths[folder].mkdir()
    (paths["mine"] / "notes.txt").write_text("mine")
    (paths["kits"] / KIT_MARKER).write_text("")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert run_main(main, [f.format(**paths) for f in flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named.format(**paths) in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (paths["file"]).read_text() == "x" and (paths["mine"] / "notes.txt").read_text() == "mine"


def test_a_killed_export_leaves_a_partial_that_the_next_export_removes(tiny_run, tmp_path):
    """Exports without the whitening's fit and XLA's check (tests/test_whitening.py, tests/test_export_delg.py):
    neither is what this is about."""
    out = tmp_path / "model"
    flags = ["--run", str(tiny_run), "--out", str(out), "--no-whiten", "--no-xla"]
    export = subprocess.Popen(
        [sys.executable, "-m", "export", "delg", *flags], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".model.*.partial")) and export.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(export.pid, signal.SIGKILL)
    export.wait()
    partials = list(tmp_path.glob(f".model.{export.pid}.*.partial"))
    assert partials and not out.exists(), "the export was not caught while writing"
    assert run_main(main_delg, flags) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (out / "saved_model.pb").is_file() and (out / KIT_MARKER).is_file()
    assert run_main(main_delg, [*flags, "--overwrite"]) == 0  # the kit's: replaced
