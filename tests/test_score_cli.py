"""`python -m local_eval score` end to end: JSON shape, the table, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from local_eval import metrics
from tests import HANG_GUARD_S
from tests.test_metrics import (
    RECOGNITION_PREDICTIONS,
    RECOGNITION_SOLUTION,
    RETRIEVAL_PREDICTIONS,
    RETRIEVAL_SOLUTION,
)

REPO = Path(__file__).resolve().parents[1]
RECOGNITION_KEYS = {"gap", "gap_landmarks_only", "top1", "n"}
RETRIEVAL_KEYS = {
    "map@100",
    "precision@1",
    "precision@5",
    "precision@10",
    "precision@50",
    "precision@100",
    "mean_position",
    "median_position",
    "n",
}
PUBLIC_IDS = {"0123456789abcdef", "0223456789abcdef", "0423456789abcdef"}


def score(task: str, solution: Path, submission: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "local_eval",
        "score",
        "--task",
        task,
        "--solution",
        str(solution),
        "--submission",
        str(submission),
        *flags,
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def usage(test_id: str) -> str:
    return "Public" if test_id in PUBLIC_IDS else "Private"


@pytest.fixture
def recognition_files(tmp_path):
    solution = write(
        tmp_path / "solution.csv",
        ["id,landmarks,Usage"]
        + [f"{i},{' '.join(map(str, truth))},{usage(i)}" for i, truth in RECOGNITION_SOLUTION.items()]
        + ["0623456789abcdef,,Ignored"],
    )
    submission = write(
        tmp_path / "submission.csv",
        ["id,landmarks"]
        + [f"{i},{landmark} {score}" for i, (landmark, score) in RECOGNITION_PREDICTIONS.items()]
        + ["0623456789abcdef,5 0.9", "0123456789abcdef,"],
    )
    return solution, submission


@pytest.fixture
def retrieval_files(tmp_path):
    solution = write(
        tmp_path / "solution.csv",
        ["id,images,Usage"]
        + [f"{i},{' '.join(truth)},{usage(i)}" for i, truth in RETRIEVAL_SOLUTION.items()]
        + ["0623456789abcdef,None,Ignored"],
    )
    submission = write(
        tmp_path / "submission.csv",
        ["id,images"] + [f"{i},{' '.join(images)}" for i, images in RETRIEVAL_PREDICTIONS.items()],
    )
    return solution, submission


def test_recognition_json(recognition_files):
    result = score("recognition", *recognition_files, "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["task"] == "recognition"
    assert {name: set(values) for name, values in scores.items() if name != "task"} == {
        name: RECOGNITION_KEYS for name in ("public", "private", "all")
    }
    assert scores["all"]["gap"] == pytest.approx(0.166667, abs=1e-6)
    assert scores["all"]["gap_landmarks_only"] == pytest.approx(0.333333, abs=1e-6)
    assert scores["all"]["top1"] == pytest.approx(0.333333, abs=1e-6)
    assert [scores[name]["n"] for name in ("public", "private", "all")] == [3, 2, 5]
    public = {i: truth for i, truth in RECOGNITION_SOLUTION.items() if i in PUBLIC_IDS}
    public_predictions = {i: p for i, p in RECOGNITION_PREDICTIONS.items() if i in PUBLIC_IDS}
    assert scores["public"]["gap"] == pytest.approx(metrics.global_average_precision(public_predictions, public))


def test_retrieval_json(retrieval_files):
    result = score("retrieval", *retrieval_files, "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["task"] == "retrieval"
    assert all(set(scores[name]) == RETRIEVAL_KEYS for name in ("public", "private", "all"))
    assert scores["all"]["map@100"] == pytest.approx(0.458333, abs=1e-6)
    assert scores["all"]["precision@1"] == pytest.approx(0.5)
    assert (scores["all"]["mean_position"], scores["all"]["median_position"]) == pytest.approx((26.25, 1.5))


def test_table_without_json(retrieval_files):
    result = score("retrieval", *retrieval_files)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.strip().splitlines()
    assert header.split() == ["retrieval", "public", "private", "all"]
    assert {row.split()[0] for row in rows} == RETRIEVAL_KEYS


def test_trailing_spaces_and_blank_lines_are_tolerated(recognition_files, tmp_path):
    solution, submission = recognition_files
    lines = submission.read_text().splitlines()
    loose = write(tmp_path / "loose.csv", ["", lines[0] + " "] + [line + "  " for line in lines[1:]] + ["", ""])
    expected = json.loads(score("recognition", solution, submission, "--json").stdout)
    result = score("recognition", solution, loose, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected


GOOD_ID = "0223456789abcdef"
GOOD = {
    "solution": ["id,landmarks,Usage", f"{GOOD_ID},100,Public"],
    "submission": ["id,landmarks", f"{GOOD_ID},100 0.5"],
}
# (what is wrong, the file it is in, that file's lines, the line the error names, words the error must hold)
BAD_RECOGNITION_INPUTS = [
    (
        "repeated id",
        "submission",
        ["id,landmarks", f"{GOOD_ID},0 0.5", f"{GOOD_ID},1 0.5"],
        3,
        [GOOD_ID, "repeated (first on line 2)"],
    ),
    (
        "unknown id",
        "submission",
        ["id,landmarks", "ffffffffffffffff,0 0.5"],
        2,
        ["ffffffffffffffff", "not in the solution"],
    ),
    ("one token", "submission", ["id,landmarks", f"{GOOD_ID},7"], 2, [GOOD_ID, "found 1 token"]),
    ("three tokens", "submission", ["id,landmarks", f"{GOOD_ID},7 0.5 1"], 2, [GOOD_ID, "found 3 token"]),
    ("text score", "submission", ["id,landmarks", f"{GOOD_ID},7 high"], 2, [GOOD_ID, "'high' is not a number"]),
    ("nan score", "submission", ["id,landmarks", f"{GOOD_ID},7 nan"], 2, [GOOD_ID, "'nan' is not finite"]),
    ("inf score", "submission", ["id,landmarks", f"{GOOD_ID},7 -inf"], 2, [GOOD_ID, "'-inf' is not finite"]),
    ("float landmark", "submission", ["id,landmarks", f"{GOOD_ID},7.5 0.5"], 2, [GOOD_ID, "'7.5' is not an integer"]),
    ("renamed column", "submission", ["id,landmark", f"{GOOD_ID},7 0.5"], 1, ["missing column(s) landmarks"]),
    ("missing column", "submission", ["id", GOOD_ID], 1, ["missing column(s) landmarks"]),
    ("extra field", "submission", ["id,landmarks", f"{GOOD_ID},7,0.5"], 2, ["expected 2 fields"]),
    (
        "unknown Usage",
        "solution",
        ["id,landmarks,Usage", f"{GOOD_ID},1,Secret"],
        2,
        [GOOD_ID, "unknown Usage 'Secret'"],
    ),
    (
        "text landmark",
        "solution",
        ["id,landmarks,Usage", f"{GOOD_ID},x1,Public"],
        2,
        [GOOD_ID, "'x1' is not an integer"],
    ),
    (
        "repeated solution id",
        "solution",
        ["id,landmarks,Usage", f"{GOOD_ID},1,Public", f"{GOOD_ID},2,Private"],
        3,
        [GOOD_ID, "repeated"],
    ),
    ("missing Usage", "solution", ["id,landmarks", f"{GOOD_ID},1"], 1, ["missing column(s) Usage"]),
]


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one 'error: ...' line of a run that must fail with exit status 2 and no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize("case", BAD_RECOGNITION_INPUTS, ids=[case[0] for case in BAD_RECOGNITION_INPUTS])
def test_bad_recognition_input(case, tmp_path):
    _, bad_file, lines, line, words = case
    files = {name: write(tmp_path / f"{name}.csv", lines if name == bad_file else good) for name, good in GOOD.items()}
    message = error_line(score("recognition", files["solution"], files["submission"]))
    assert f"{files[bad_file]}:{line}:" in message
    for word in words:
        assert word in message


def test_bad_retrieval_prediction_count_is_not_an_error_but_unknown_id_is(retrieval_files, tmp_path):
    solution, _ = retrieval_files
    long_list = write(tmp_path / "long.csv", ["id,images", f"{GOOD_ID},{' '.join(['x'] * 150)}"])
    assert score("retrieval", solution, long_list).returncode == 0
    unknown = write(tmp_path / "unknown.csv", ["id,images", "eeeeeeeeeeeeeeee,fedcba9876543210"])
    message = error_line(score("retrieval", solution, unknown))
    assert f"{unknown}:2" in message and "eeeeeeeeeeeeeeee" in message


@pytest.mark.parametrize("missing", ["solution", "submission"])
def test_missing_file(missing, recognition_files, tmp_path):
    files = dict(zip(["solution", "submission"], recognition_files, strict=True))
    files[missing] = tmp_path / "nowhere.csv"
    message = error_line(score("recognition", files["solution"], files["submission"]))
    assert "nowhere.csv" in message and "No such file" in message
