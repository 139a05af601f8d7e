"""Replay: the script runs as the server would, its result is scored exactly as `local_eval score` scores it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.cli import run_main
from local_eval import replay as replay_command
from local_eval.metrics import TASK_METRIC
from local_eval.replay import format_report, replay
from local_eval.score import main as score_main
from local_eval.submission_script import script_python
from tests import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def score_cli(task: str, solution: Path, submission: Path, capsys) -> dict:
    """What `python -m local_eval score --json` prints (its main, run here: test_score_cli runs the command)."""
    capsys.readouterr()
    argv = ["--task", task, "--solution", str(solution), "--submission", str(submission), "--json"]
    assert run_main(score_main, argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "task, flags",
    [
        ("recognition", []),  # the script's defaults
        (
            "retrieval",
            ["--scales", "0.5", "1.0", "--global-scale-indices", "0", "1", "--max-features", "200", "--rerank", "10"],
        ),
    ],
)
def test_replay_report_equals_score_command(tmp_path, tiny_competition, tiny_model, task, flags, capsys):
    report = replay(tiny_competition, task, tiny_model, tmp_path / "report", 0.2, flags)
    assert report["status"] == "ok", report.get("log_tail")
    on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
    assert on_disk["final"] == report["final"]
    metric = TASK_METRIC[task]
    for scores in (report["final"], report["global_only"]):
        for subset in ("public", "private", "all"):  # the interval beside each score; the rest as `score` gives it
            low, high = scores[subset].pop(f"{metric}_interval")
            assert 0 <= low <= high <= 1
            assert f"{subset} {scores[subset][metric]:.4f} [{low:.4f}-{high:.4f}]" in format_report(task, on_disk)
    solution = tiny_competition / "solutions" / f"{task}_solution.csv"
    assert report["final"] == score_cli(task, solution, tmp_path / "report" / "submission.csv", capsys)
    global_only = tmp_path / "report" / "work" / "submission_global_only.csv"
    assert report["global_only"] == score_cli(task, solution, global_only, capsys)
    assert {"global_db", "global_query", "knn"} <= set(report["timing"]["stages"])
    assert report["python"] == shutil.which(script_python())  # $KIT_SCRIPT_PYTHON or this interpreter
    assert f"run by {report['python']}: python " in format_report(task, report)


def test_overrunning_script_is_stopped_and_reported(tmp_path, tiny_competition, tiny_model):
    stale = tmp_path / "report" / "submission.csv"  # left by an earlier run: must not be scored as this one's
    stale.parent.mkdir()
    stale.write_text((tiny_competition / "landmark-recognition" / "sample_submission.csv").read_text())
    report = replay(tiny_competition, "recognition", tiny_model, tmp_path / "report", limit_h=1.0 / 3600)
    assert report["status"] == "timeout"
    assert report["final"] is None and not stale.exists()  # killed before TensorFlow even loaded
    assert "log_tail" in report
    assert json.loads((tmp_path / "report" / "report.json").read_text())["status"] == "timeout"


def test_missing_competition_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "local_eval",
            "replay",
            "--competition",
            str(tmp_path / "nope"),
            "--task",
            "retrieval",
            "--model",
            str(tmp_path),
            "--out",
            str(tmp_path / "r"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "nope" in result.stderr


@pytest.mark.parametrize("limit", ["0", "-1", "nan", "inf"])
def test_a_limit_that_is_no_positive_number_is_a_flag_error(tmp_path, capsys, limit):
    argv = [
        "--competition",
        str(tmp_path),
        "--task",
        "recognition",
        "--model",
        str(tmp_path),
        "--out",
        str(tmp_path / "r"),
        "--limit-h",
        limit,
    ]
    assert run_main(replay_command.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --limit-h must be a finite number above 0") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


QUICK = [
    "--plan",
    "fixed",
    "--scales",
    "1.0",
    "--global-scale-indices",
    "0",
    "--global-max-side",
    "64",
    "--max-image-side",
    "96",
]  # to reranking, and its workers, soon


def script_processes(*markers: str) -> list[int]:
    """Live processes of the submission script whose command line holds every marker (its forked workers
    included)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and all(m.encode() in (entry / "cmdline").read_bytes() for m in markers):
                found.append(int(entry.name))
        except OSError:  # ended meanwhile
            continue
    return found


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize(
    "command, how, processes",
    [
        ("replay", signal.SIGKILL, 3),  # during reranking: the script and its 2 workers
        ("replay", signal.SIGTERM, 1),
        ("tune", signal.SIGKILL, 1),  # tune replays the script first
    ],
)
def test_a_killed_replay_takes_its_script_down(tmp_path, tiny_competition, tiny_model, command, how, processes):
    out = tmp_path / "out"
    # replay and tune write OUT whole: the script runs in a partial folder beside OUT, named .out.<pid>.*.partial
    # (tune's replay in one beside OUT/run, inside tune's)
    markers = (str(tmp_path / ".out."), ".partial/submission.csv")
    argv = [
        sys.executable,
        "-m",
        "local_eval",
        command,
        "--competition",
        str(tiny_competition),
        "--task",
        "recognition",
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        "--",
        "--workers",
        "2",
        *QUICK,
    ]
    parent = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        caught = wait_until(lambda: len(script_processes(*markers)) >= processes or parent.poll() is not None, 600)
        assert caught and parent.poll() is None, "the script ended before it could be caught"
        os.kill(parent.pid, how)
        assert parent.wait(timeout=HANG_GUARD_S) != 0
    finally:
        parent.kill()
    assert wait_until(lambda: not script_processes(*markers), 30), script_processes(*markers)


def test_python_that_cannot_run_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "local_eval",
            "replay",
            "--competition",
            str(tmp_path),
            "--task",
            "retrieval",
            "--model",
            str(tmp_path),
            "--out",
            str(tmp_path / "r"),
            "--python",
            str(missing),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --python {missing}: not an executable file or command on PATH"
    assert not (tmp_path / "r").exists()
