"""`make demo`'s pipeline (`python -m demo`) at `tiny` size: build, train, export, replay both tasks, project,
summarize; then reuse. And the house order: local_eval stands below training, the demo above everything.

The pipeline runs in this process (`python -m demo` itself runs below, on a bad flag) with lighter script flags:
what it checks is the demo's plumbing; the script's default flags are replayed in test_replay."""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from common.cli import run_main
from demo.__main__ import DEMO
from demo.__main__ import main as demo_main
from local_eval.layout import nonlandmark_folder
from tests import HANG_GUARD_S
from tests.conftest import WHITEN_IMAGES

ROOT = Path(__file__).resolve().parents[1]
# Two scales, 200 features, global buckets of 512 px at most (the tradeoff's ladder: as given, 1 global scale);
# recognition reranks 5 (the script's default: 20), retrieval 10 (the demo's: 30).
LIGHT = [
    "--scales",
    "0.5",
    "1.0",
    "--global-scale-indices",
    "0",
    "1",
    "--max-features",
    "200",
    "--global-max-side",
    "512",
]


@pytest.fixture
def light_demo(monkeypatch, caplog) -> None:
    """The demo's settings made light (script flags, tradeoff depths, probe and report sizes, the whitening's fit on
    WHITEN_IMAGES); INFO logs caught."""
    script_args = {"recognition": [*LIGHT, "--rerank", "5"], "retrieval": [*LIGHT, "--rerank", "10"]}
    monkeypatch.setitem(DEMO, "script_args", script_args)
    monkeypatch.setitem(DEMO, "tradeoff_depths", [0, 3])
    monkeypatch.setitem(DEMO, "probe_images", 8)
    monkeypatch.setitem(DEMO, "show_queries", 4)
    monkeypatch.setitem(DEMO, "whiten_images", WHITEN_IMAGES)
    caplog.set_level(logging.INFO)


def run_demo(out: Path, capsys, caplog, steps: int) -> tuple[str, str]:
    """The demo's printed summary and its log."""
    caplog.clear()
    status = run_main(demo_main, ["--out", str(out), "--size", "tiny", "--train-steps", str(steps)])
    printed = capsys.readouterr()
    assert status == 0, printed.err[-3000:]
    return printed.out, caplog.text


def test_demo_runs_end_to_end_and_reuses_its_steps(tmp_path, tiny_competition, light_demo, capsys, caplog):
    out = tmp_path / "demo"
    shutil.copytree(tiny_competition, out / "competition")  # the session's build of the same size and seed: kept
    printed, _ = run_demo(out, capsys, caplog, steps=10)
    assert "DEMO SUMMARY" in printed and "verdict (speedup x1)" in printed
    assert "(95% bootstrap interval over the queries)" in printed
    assert "recognition tradeoff" in printed and "best that fits" in printed
    tradeoff = (out / "tradeoff" / "tradeoff.csv").read_text().splitlines()
    assert tradeoff[1].startswith("as given,") and len(tradeoff) > 3
    for task, metric in (("recognition", "gap"), ("retrieval", "map@100")):
        report = json.loads((out / f"replay-{task}" / "report.json").read_text())
        assert report["status"] == "ok"
        for name in ("global_only", "final"):
            assert 0.0 <= report[name]["all"][metric] <= 1.0
    assert (out / "summary.txt").read_text().strip() in printed
    recognition_stages = next(line for line in printed.splitlines() if "seconds per stage" in line)
    assert "global_db" in recognition_stages and "bridge" not in recognition_stages  # only the stages that ran
    follow_the_summary(printed, out)
    assert any(nonlandmark_folder(out / "competition").iterdir())
    _, logged = run_demo(out, capsys, caplog, steps=10)
    assert "already holds this competition" in logged
    assert "already trained" in logged and "replaying" not in logged


class FileClock:
    """Stamps each file it is given 10 s after the previous one: mtimes that order writes without sleeping."""

    def __init__(self) -> None:
        self.now = time.time()

    def stamp(self, path: Path, text: str | None = None) -> None:
        if text is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.now += 10
        os.utime(path, (self.now, self.now))


def test_a_later_checkpoint_redoes_the_export_and_every_step_after_it(tmp_path, monkeypatch):
    """The demo's reuse rule step by step (the real steps run above): each output is redone when what it was made
    from is newer, and only then. The steps' work is recorded instead of done."""
    import tensorflow as tf

    import demo.__main__ as demo
    import export.delg
    import local_eval.show
    import local_eval.tradeoff
    from train.run_files import CHECKPOINT_DIR

    clock, done = FileClock(), []
    report = json.dumps({"status": "ok"})
    monkeypatch.setattr(
        export.delg,
        "export_delg",
        lambda run, model, **_: (done.append("export"), clock.stamp(model / "saved_model.pb", "")),
    )
    monkeypatch.setattr(
        demo,
        "replay",
        lambda competition, task, model, folder, *_: (
            done.append(task),
            clock.stamp(folder / "report.json", report),
            json.loads(report),
        )[-1],
    )
    monkeypatch.setattr(
        local_eval.show,
        "main_show",
        lambda argv: (done.append("show"), clock.stamp(Path(argv[argv.index("--out") + 1]) / "index.html", "")),
    )
    monkeypatch.setattr(local_eval.tradeoff, "tradeoff", lambda *_, **__: done.append("tradeoff"))
    monkeypatch.setattr(
        local_eval.tradeoff,
        "write_outputs",
        lambda table, task, profile, note, folder: (clock.stamp(folder / "tradeoff.txt", "table"), "table")[-1],
    )
    checkpoints = tf.train.CheckpointManager(
        tf.train.Checkpoint(v=tf.Variable(1.0)), str(tmp_path / "run" / CHECKPOINT_DIR), max_to_keep=None
    )

    def steps_after_training() -> list[str]:
        done.clear()
        model = demo.export_step(tmp_path, tmp_path / "run")
        for task in ("recognition", "retrieval"):
            demo.replay_step(tmp_path, tmp_path / "competition", model, task)
        demo.show_step(tmp_path, tmp_path / "competition", model)
        demo.tradeoff_step(tmp_path, tmp_path / "competition", model)
        return list(done)

    everything = ["export", "recognition", "retrieval", "show", "tradeoff"]
    clock.stamp(Path(checkpoints.save() + ".index"))
    assert steps_after_training() == everything
    assert steps_after_training() == []
    clock.stamp(Path(checkpoints.save() + ".index"))  # more training
    assert steps_after_training() == everything
    clock.stamp(tmp_path / "replay-recognition" / "report.json")  # a newer recognition replay: its report is redone
    assert steps_after_training() == ["show"]


def follow_the_summary(summary: str, out: Path) -> None:
    """The files the summary says to open exist, and the commands it says come next run and write what the next
    one reads (the probe's timing.json)."""
    opened = summary.split("\nopen:\n")[1].split("\nnext:")[0].splitlines()
    assert [line.split()[0] for line in opened] == [
        str(out / "show-recognition" / "index.html"),
        str(out / "tradeoff" / "tradeoff.png"),
    ]
    assert "<img" in (out / "show-recognition" / "index.html").read_text()
    with Image.open(out / "tradeoff" / "tradeoff.png") as picture:
        assert picture.width > 400
    commands = [line.split() for line in summary.split("\nnext:")[1].splitlines()[1:3]]
    for command in commands:
        assert command[0] == "python"
        result = subprocess.run(
            [sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "probe" / "timing.json").is_file() and "verdict (speedup x20)" in result.stdout


def test_bad_demo_flag_is_one_error_line(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "demo", "--out", str(tmp_path / "demo"), "--train-steps", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert bad.returncode == 2 and bad.stderr == "error: --train-steps must be at least 1, got 0\n"
    assert not (tmp_path / "demo").exists()


def imported_packages(folder: Path) -> set[str]:
    """The top-level packages that the modules of a folder import, lazily or not."""
    names: set[str] = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names


def test_local_eval_imports_neither_training_nor_export_nor_the_demo():
    assert not imported_packages(ROOT / "local_eval") & {"train", "export", "demo"}
    assert {"train", "export", "local_eval"} <= imported_packages(ROOT / "demo")
