"""The layout of a local competition, written down once: the Kaggle input folders, the hidden solutions,
the distractor images, the build record. Both builders write it (write_csvs), replay and the demo read it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from common.cli import UserError, check_output_dir, remove_stale_partials

TASK_FOLDERS = {"recognition": "landmark-recognition", "retrieval": "landmark-retrieval"}
SOLUTIONS = "solutions"  # never visible to the submission script
SOLUTION_FILES = {"recognition": "recognition_solution.csv", "retrieval": "retrieval_solution.csv"}
NONLANDMARK = "nonlandmark"  # images known to show no landmark, for the script's --nonlandmark-dir
BUILD_INFO = "build_info.json"  # the build's parameters; also the mark that the kit wrote the folder


def task_folder(competition: Path, task: str) -> Path:
    return Path(competition) / TASK_FOLDERS[task]


def solution_file(competition: Path, task: str) -> Path:
    return Path(competition) / SOLUTIONS / SOLUTION_FILES[task]


def nonlandmark_folder(competition: Path) -> Path:
    """The distractor set: images of no landmark, none of them in test; beside the task folders, so the
    submission script sees it only when it is passed as --nonlandmark-dir."""
    return Path(competition) / NONLANDMARK


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
    """True when `out` already holds this very build (kept as it is, the partials of killed builds beside it
    removed); another build there needs --overwrite.
    A folder that is no build of this kit is refused by common.cli.check_output_dir, with or without it."""
    existing = read_build_info(out)
    if existing == info:
        remove_stale_partials(Path(os.path.abspath(out)))  # what an earlier, killed build left beside it
        return True
    if existing is not None and not overwrite:
        raise UserError(
            f"{out} already holds a different competition ({json.dumps(existing)}); "
            "pass --overwrite to replace it or choose another output path"
        )
    check_output_dir(out, overwrite, marker=BUILD_INFO)
    return False
