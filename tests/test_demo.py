"""`make demo`'s pipeline at `tiny` size: build, train, export, replay both tasks, project, summarize; then reuse."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_demo(out: Path, steps: int = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "local_eval", "demo", "--out", str(out), "--size", "tiny",
                           "--train-steps", str(steps)], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_demo_runs_end_to_end_and_reuses_its_steps(tmp_path):
    first = run_demo(tmp_path / "demo")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "DEMO SUMMARY" in first.stdout and "verdict (speedup x1)" in first.stdout
    for task, metric in (("recognition", "gap"), ("retrieval", "map@100")):
        report = json.loads((tmp_path / "demo" / f"replay-{task}" / "report.json").read_text())
        assert report["status"] == "ok"
        for name in ("global_only", "final"):
            assert 0.0 <= report[name]["all"][metric] <= 1.0
    assert (tmp_path / "demo" / "summary.txt").read_text().strip() in first.stdout
    second = run_demo(tmp_path / "demo")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already trained" in second.stderr and "replaying" not in second.stderr
    longer = run_demo(tmp_path / "demo", steps=32)  # more training: the export and the replays are redone
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resumed" in longer.stderr and longer.stderr.count("replaying") == 2
