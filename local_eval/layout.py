"""The layout of a local competition, written down once: the Kaggle input folders, the hidden solutions,
the build record. Both builders write it (write_csvs), replay and the demo read it."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from common.cli import UserError

TASK_FOLDERS = {"recognition": "landmark-recognition", "retrieval": "landmark-retrieval"}
SOLUTIONS = "solutions"  # never visible to the submission script
SOLUTION_FILES = {"recognition": "recognition_solution.csv", "retrieval": "retrieval_solution.csv"}
BUILD_INFO = "build_info.json"


def task_folder(competition: Path, task: str) -> Path:
    return Path(competition) / TASK_FOLDERS[task]


def solution_file(competition: Path, task: str) -> Path:
    return Path(competition) / SOLUTIONS / SOLUTION_FILES[task]


def write_csvs(root: Path, train: pd.DataFrame, test: pd.DataFrame, queries: pd.DataFrame) -> None:
    """train.csv (id,landmark_id), both sample submissions, both solutions, from
    train, test (id,landmarks,Usage) and retrieval queries (id,images,Usage) frames."""
    (root / SOLUTIONS).mkdir(exist_ok=True)
    recognition, retrieval = task_folder(root, "recognition"), task_folder(root, "retrieval")
    train[["id", "landmark_id"]].to_csv(recognition / "train.csv", index=False)
    test.assign(landmarks="")[["id", "landmarks"]].to_csv(recognition / "sample_submission.csv", index=False)
    queries.assign(images="")[["id", "images"]].to_csv(retrieval / "sample_submission.csv", index=False)
    test[["id", "landmarks", "Usage"]].to_csv(solution_file(root, "recognition"), index=False)
    queries[["id", "images", "Usage"]].to_csv(solution_file(root, "retrieval"), index=False)


def write_build_info(root: Path, info: dict) -> None:
    (root / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")


def read_build_info(out: Path) -> dict | None:
    """The parameters an existing output was built with, or None when it holds no build of this kit."""
    try:
        return json.loads((out / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None


def check_existing(out: Path, info: dict, overwrite: bool) -> bool:
    """True when `out` already holds this very build; a different competition there is a UserError."""
    if not out.exists() or overwrite:
        return False
    existing = read_build_info(out)
    if existing == info:
        return True
    if existing is None:
        raise UserError(f"{out} already exists and holds no competition built by this kit; "
                        "remove it or choose another output path")
    raise UserError(f"{out} already holds a different competition ({json.dumps(existing)}); "
                    "pass --overwrite or choose another output path")
