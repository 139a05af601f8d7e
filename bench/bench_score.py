"""Scoring speed at real competition size, parsing included, beside plain per-row loops in the same run.

Recognition: 120,000 test rows (about 2% landmarks, as in GLDv2). Retrieval: 1,129 queries x 100 ids.
Parsing and the kit's metrics (together what `score` does) are timed apart; the plain loops are the
reference loops of tests/test_metrics.py (one prediction at a time, as the official code does), run on the
same parsed files. Target: parsing + metrics under 3 s for each task.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from local_eval.kaggle_csv import Solution, read_solution, read_submission
from local_eval.metrics import score_recognition, score_retrieval, subsets_with_all
from tests.test_metrics import reference_gap, reference_retrieval, reference_top1

RECOGNITION_ROWS = 120_000
RETRIEVAL_QUERIES = 1_129
INDEX_SIZE = 100_000
LANDMARK_SHARE = 0.02
T = TypeVar("T")


def hex_ids(rng: np.random.Generator, n: int) -> list[str]:
    return [f"{value:016x}" for value in rng.choice(2**62, size=n, replace=False)]


def usages(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(["Public", "Private"], size=n, p=[1 / 3, 2 / 3])


def write_recognition(folder: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    ids = hex_ids(rng, RECOGNITION_ROWS)
    truths = np.where(rng.random(RECOGNITION_ROWS) < LANDMARK_SHARE, rng.integers(0, 200_000, RECOGNITION_ROWS), -1)
    guesses = np.where(rng.random(RECOGNITION_ROWS) < 0.5, truths, rng.integers(0, 200_000, RECOGNITION_ROWS))
    scores = rng.random(RECOGNITION_ROWS).round(4)  # rounded, so that ties occur
    solution = [f"{i},{t if t >= 0 else ''},{u}" for i, t, u in zip(ids, truths, usages(rng, len(ids)), strict=True)]
    submission = [f"{i},{g} {s}" for i, g, s in zip(ids, guesses, scores, strict=True)]
    return write(folder / "recognition_solution.csv", "id,landmarks,Usage", solution), write(
        folder / "recognition_submission.csv", "id,landmarks", submission
    )


def write_retrieval(folder: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    ids, index = hex_ids(rng, RETRIEVAL_QUERIES), np.array(hex_ids(rng, INDEX_SIZE))
    solution, submission = [], []
    for query, usage in zip(ids, usages(rng, len(ids)), strict=True):
        relevant = rng.choice(index, size=int(rng.integers(1, 200)), replace=False)
        found = rng.choice(relevant, size=min(len(relevant), int(rng.integers(0, 30))), replace=False)
        ranked = np.concatenate([found, rng.choice(index, size=100 - len(found))])
        rng.shuffle(ranked)
        solution.append(f"{query},{' '.join(relevant)},{usage}")
        submission.append(f"{query},{' '.join(ranked)}")
    return write(folder / "retrieval_solution.csv", "id,images,Usage", solution), write(
        folder / "retrieval_submission.csv", "id,images", submission
    )


def write(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def plain_recognition(solution: Solution, predictions: dict) -> None:
    for truth in subsets_with_all(solution.subsets).values():
        subset_predictions = {i: p for i, p in predictions.items() if i in truth}
        reference_gap(subset_predictions, truth)
        reference_gap(subset_predictions, truth, ignore_non_gt_test_images=True)
        reference_top1(subset_predictions, truth)


def plain_retrieval(solution: Solution, predictions: dict) -> None:
    for truth in subsets_with_all(solution.subsets).values():
        reference_retrieval({q: p for q, p in predictions.items() if q in truth}, truth, 100)


def timed(run: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def bench(name: str, task: str, files: tuple[Path, Path], plain_loop: Callable[[Solution, dict], None]) -> None:
    """Time parsing, the kit's metrics and the plain loops on the same parsed files; print one line."""

    def parse() -> tuple[Solution, dict]:
        solution = read_solution(files[0], task)
        return solution, read_submission(files[1], task, solution)

    (solution, predictions), parse_seconds = timed(parse)
    score = score_recognition if task == "recognition" else score_retrieval
    _, kit_seconds = timed(lambda: score(solution.subsets, predictions))
    _, plain_seconds = timed(lambda: plain_loop(solution, predictions))
    total = parse_seconds + kit_seconds
    print(
        f"{name:<26} parse {parse_seconds:5.2f} s + metrics {kit_seconds:5.2f} s = {total:5.2f} s "
        f"({'under' if total < 3 else 'OVER'} the 3 s target); plain-loop metrics {plain_seconds:5.2f} s "
        f"= {plain_seconds / kit_seconds:.1f}x the kit's",
        flush=True,
    )


def main() -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        bench(
            f"recognition {RECOGNITION_ROWS:,} rows",
            "recognition",
            write_recognition(Path(tmp), rng),
            plain_recognition,
        )
        bench(f"retrieval {RETRIEVAL_QUERIES:,} x 100", "retrieval", write_retrieval(Path(tmp), rng), plain_retrieval)


if __name__ == "__main__":
    main()
