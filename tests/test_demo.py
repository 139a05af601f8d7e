"""`make demo`'s pipeline (`python -m demo`) at `tiny` size: build, train, export, replay both tasks, project,
summarize; then reuse. And the house order: local_eval stands below training, the demo above everything."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from local_eval.layout import nonlandmark_folder

ROOT = Path(__file__).resolve().parents[1]


def run_demo(out: Path, steps: int = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "demo", "--out", str(out), "--size", "tiny",
                           "--train-steps", str(steps)], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_demo_runs_end_to_end_and_reuses_its_steps(tmp_path):
    first = run_demo(tmp_path / "demo")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "DEMO SUMMARY" in first.stdout and "verdict (speedup x1)" in first.stdout
    assert "recognition tradeoff" in first.stdout and "best that fits" in first.stdout
    tradeoff = (tmp_path / "demo" / "tradeoff" / "tradeoff.csv").read_text().splitlines()
    assert tradeoff[1].startswith("as given,") and len(tradeoff) > 3
    for task, metric in (("recognition", "gap"), ("retrieval", "map@100")):
        report = json.loads((tmp_path / "demo" / f"replay-{task}" / "report.json").read_text())
        assert report["status"] == "ok"
        for name in ("global_only", "final"):
            assert 0.0 <= report[name]["all"][metric] <= 1.0
    assert (tmp_path / "demo" / "summary.txt").read_text().strip() in first.stdout
    follow_the_summary(first.stdout, tmp_path / "demo")
    assert any(nonlandmark_folder(tmp_path / "demo" / "competition").iterdir())
    second = run_demo(tmp_path / "demo")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already holds this competition" in second.stderr
    assert "already trained" in second.stderr and "replaying" not in second.stderr
    longer = run_demo(tmp_path / "demo", steps=32)  # more training: the export and the replays are redone
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resumed" in longer.stderr and longer.stderr.count("replaying") > 2  # both tasks and the tradeoff


def follow_the_summary(summary: str, out: Path) -> None:
    """The files the summary says to open exist, and the commands it says come next run and write what the next
    one reads (the probe's timing.json)."""
    opened = summary.split("\nopen:\n")[1].split("\nnext:")[0].splitlines()
    assert [line.split()[0] for line in opened] == [str(out / "show-recognition" / "index.html"),
                                                    str(out / "tradeoff" / "tradeoff.png")]
    assert "<img" in (out / "show-recognition" / "index.html").read_text()
    with Image.open(out / "tradeoff" / "tradeoff.png") as picture:
        assert picture.width > 400
    commands = [line.split() for line in summary.split("\nnext:")[1].splitlines()[1:3]]
    for command in commands:
        assert command[0] == "python"
        result = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "probe" / "timing.json").is_file() and "verdict (speedup x20)" in result.stdout


def test_bad_demo_flag_is_one_error_line(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "demo", "--out", str(tmp_path / "demo"), "--train-steps", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
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
