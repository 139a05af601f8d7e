"""The notebook on Kaggle's image: with $KIT_SCRIPT_PYTHON (`make kaggle-check` sets it to .venv-kaggle's Python,
which has requirements-kaggle.txt's versions), a replay of each task gives the pinned stack's predictions for a
model the pinned stack exported."""

from __future__ import annotations

import os
import sys

import pandas as pd
import pytest

from export.delg import EXPORT_INFO_FILE
from local_eval.replay import replay
from local_eval.submission_script import SCRIPT_PYTHON_ENV, sibling

CONFIDENCE_TOLERANCE = 1e-5
OTHER_PYTHON = os.environ.get(SCRIPT_PYTHON_ENV)
SUBMISSIONS = ("submission.csv", "work/submission_global_only.csv")
# Tiny and independent of the two runs' speeds: no plan (it follows measured rates), few features and candidates.
REPLAY_FLAGS = ["--plan", "fixed", "--max-features", "300", "--rerank", "5"]


def test_the_script_reads_the_export_info_where_export_writes_it():
    assert sibling("savedmodel").EXPORT_INFO_PATH == ("assets", EXPORT_INFO_FILE)


def read_rows(path) -> dict[str, list[str]]:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return dict(zip(frame["id"], frame.iloc[:, 1].str.split(), strict=True))


def assert_same_predictions(task: str, pinned: dict[str, list[str]], other: dict[str, list[str]]) -> None:
    """Same ids in the same order; recognition: same landmark, confidence within the tolerance; retrieval: same
    index ids in the same order."""
    assert list(other) == list(pinned)
    for image_id, expected in pinned.items():
        got = other[image_id]
        if task == "retrieval" or not expected:
            assert got == expected, image_id
        else:
            assert got[0] == expected[0], image_id
            assert float(got[1]) == pytest.approx(float(expected[1]), abs=CONFIDENCE_TOLERANCE), image_id


@pytest.mark.skipif(not OTHER_PYTHON, reason=f"set ${SCRIPT_PYTHON_ENV} to another interpreter (make kaggle-check)")
@pytest.mark.parametrize("task", ["recognition", "retrieval"])
def test_other_interpreter_gives_the_pinned_predictions(tmp_path, tiny_competition, tiny_model, task):
    reports = {
        name: replay(
            tiny_competition, task, tiny_model, tmp_path / name, limit_h=1.0, extra_args=REPLAY_FLAGS, python=python
        )
        for name, python in [("pinned", sys.executable), ("other", OTHER_PYTHON)]
    }
    for report in reports.values():
        assert report["status"] == "ok", report.get("log_tail")
    versions = {name: report["timing"]["versions"] for name, report in reports.items()}
    assert versions["other"] != versions["pinned"]  # two stacks really ran
    for name in SUBMISSIONS:
        pinned, other = (read_rows(tmp_path / run / name) for run in ("pinned", "other"))
        assert any(rows for rows in pinned.values())  # something to compare
        assert_same_predictions(task, pinned, other)
