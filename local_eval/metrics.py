"""The GLDv2 metrics, computed as the official Google Landmarks code does, on plain dicts.

Recognition: `predictions` maps test id -> (landmark_id, score); `solution` maps test id -> ground-truth
landmark ids (empty for a non-landmark image). Retrieval: `predictions` maps test id -> index ids in rank
order; `solution` maps test id -> relevant index ids. A metric with nothing to divide by (no landmark
image, no query) is NaN; `score_*` report it as None so the JSON stays valid. `bootstrap_interval` gives a score's
spread over the queries: the 2.5-97.5% quantiles of the metric over resamples of the queries with replacement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from local_eval.kaggle_csv import read_solution, read_submission

MAX_PREDICTIONS = 100
PRECISION_RANKS = (1, 5, 10, 50, 100)
SUBSETS = ("public", "private")
REPORTED_SUBSETS = (*SUBSETS, "all")  # what every report shows: the two leaderboards and their union
TASK_METRIC = {"recognition": "gap", "retrieval": "map@100"}  # the leaderboard metric of each task
METRIC_NAME = {"gap": "GAP", "map@100": "mAP@100"}
BOOTSTRAP_RESAMPLES = 1000  # resamples of the queries behind a score's interval
BOOTSTRAP_SEED = 0  # fixed: the same submission always gets the same interval
INTERVAL_PERCENTILES = (2.5, 97.5)

RecognitionPredictions = Mapping[str, tuple[int, float]]
RetrievalPredictions = Mapping[str, list[str]]


def global_average_precision(
    predictions: RecognitionPredictions, solution: Mapping[str, list[int]], ignore_non_gt_test_images: bool = False
) -> float:
    """GAP: predictions ranked by score desc, then id asc; precision summed at each correct one.

    Predictions on non-landmark images count as wrong unless `ignore_non_gt_test_images`; the sum is
    divided by the number of test images that have ground truth, predicted or not.
    """
    _check_known(predictions, solution)
    num_positives = sum(1 for truth in solution.values() if truth)
    if ignore_non_gt_test_images:
        predictions = {test_id: p for test_id, p in predictions.items() if solution[test_id]}
    if num_positives == 0:
        return math.nan
    if not predictions:
        return 0.0
    ids = np.array(list(predictions))
    scores = np.fromiter((score for _, score in predictions.values()), float, len(ids))
    correct = np.fromiter(
        (landmark in solution[test_id] for test_id, (landmark, _) in predictions.items()), bool, len(ids)
    )
    # One prediction per id, so the official third key (class asc) never decides.
    return _ranked_gap(correct[np.lexsort((ids, -scores))], num_positives)


def _ranked_gap(correct: np.ndarray, num_positives: int) -> float:
    """GAP of predictions already in rank order: the precision at each correct one, summed, over the positives."""
    ranks = np.flatnonzero(correct) + 1
    return float(np.sum(np.arange(1, len(ranks) + 1) / ranks) / num_positives)


def top1_accuracy(predictions: RecognitionPredictions, solution: Mapping[str, list[int]]) -> float:
    """Share of test images with ground truth whose predicted landmark is one of theirs."""
    truths = [(test_id, truth) for test_id, truth in solution.items() if truth]
    if not truths:
        return math.nan
    correct = sum(1 for test_id, truth in truths if test_id in predictions and predictions[test_id][0] in truth)
    return correct / len(truths)


def mean_average_precision(
    predictions: RetrievalPredictions, solution: Mapping[str, list[str]], max_predictions: int = MAX_PREDICTIONS
) -> float:
    """mAP@max_predictions over every query of `solution` (a missing query scores 0)."""
    return _mean_average_precision(_hit_matrix(predictions, solution, max_predictions), solution)


def mean_precisions(
    predictions: RetrievalPredictions, solution: Mapping[str, list[str]], max_predictions: int = MAX_PREDICTIONS
) -> np.ndarray:
    """Mean precision@k for k = 1..max_predictions over every query of `solution`."""
    return _mean_precisions(_hit_matrix(predictions, solution, max_predictions))


def mean_median_position(
    predictions: RetrievalPredictions, solution: Mapping[str, list[str]], max_predictions: int = MAX_PREDICTIONS
) -> tuple[float, float]:
    """Mean and median rank of the first relevant image (max_predictions + 1 when none)."""
    return _mean_median_position(_hit_matrix(predictions, solution, max_predictions))


def score_recognition(
    solution: Mapping[str, Mapping[str, list[int]]], predictions: RecognitionPredictions
) -> dict[str, dict]:
    """GAP, landmarks-only GAP, top-1 and row count for 'public', 'private' and 'all'."""

    def scores(truth: Mapping[str, list[int]]) -> dict:
        subset_predictions = {test_id: predictions[test_id] for test_id in truth if test_id in predictions}
        return _json_safe(
            {
                "gap": global_average_precision(subset_predictions, truth),
                "gap_landmarks_only": global_average_precision(subset_predictions, truth, True),
                "top1": top1_accuracy(subset_predictions, truth),
                "n": len(truth),
            }
        )

    return {name: scores(truth) for name, truth in subsets_with_all(solution).items()}


def score_retrieval(
    solution: Mapping[str, Mapping[str, list[str]]], predictions: RetrievalPredictions
) -> dict[str, dict]:
    """mAP@100, precision@{1,5,10,50,100}, first-hit position and row count per subset and 'all'."""

    def scores(truth: Mapping[str, list[str]]) -> dict:
        hits = _hit_matrix({q: predictions[q] for q in truth if q in predictions}, truth, MAX_PREDICTIONS)
        precisions = _mean_precisions(hits)
        mean_position, median_position = _mean_median_position(hits)
        return _json_safe(
            {
                "map@100": _mean_average_precision(hits, truth),
                **{f"precision@{k}": precisions[k - 1] for k in PRECISION_RANKS},
                "mean_position": mean_position,
                "median_position": median_position,
                "n": len(truth),
            }
        )

    return {name: scores(truth) for name, truth in subsets_with_all(solution).items()}


def score_files(task: str, solution_path: str | Path, submission_path: str | Path, interval: bool = False) -> dict:
    """Read and validate both files, then score: {"task", "public", "private", "all"}; with interval, each subset
    also holds "<metric>_interval", the bootstrap interval of the task's metric over its queries."""
    solution = read_solution(solution_path, task)
    predictions = read_submission(submission_path, task, solution)
    score = score_recognition if task == "recognition" else score_retrieval
    scores = {"task": task, **score(solution.subsets, predictions)}
    if interval:
        for name, truth in subsets_with_all(solution.subsets).items():
            subset_predictions = {test_id: predictions[test_id] for test_id in truth if test_id in predictions}
            scores[name][f"{TASK_METRIC[task]}_interval"] = bootstrap_interval(task, subset_predictions, truth)
    return scores


def bootstrap_interval(
    task: str,
    predictions: RecognitionPredictions | RetrievalPredictions,
    solution: Mapping[str, list],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> list[float] | None:
    """[low, high]: the 2.5 and 97.5% quantiles of the task's metric over `resamples` draws of the solution's queries
    with replacement (a fixed seed), each query keeping its prediction; how far the score would move on another
    sample of queries of the same kind. None when no draw has the metric defined."""
    if not solution:
        return None
    draws = np.random.default_rng(seed).integers(0, len(solution), (resamples, len(solution)))
    counts = np.stack([np.bincount(draw, minlength=len(solution)) for draw in draws])  # [resamples, queries]
    resampled = _resampled_gap if task == "recognition" else _resampled_map
    values = resampled(predictions, solution, counts)
    values = values[~np.isnan(values)]
    return [float(q) for q in np.percentile(values, INTERVAL_PERCENTILES)] if len(values) else None


def _resampled_gap(
    predictions: RecognitionPredictions, solution: Mapping[str, list[int]], counts: np.ndarray
) -> np.ndarray:
    """GAP of each resample, given each query's count in it: the predictions in rank order once, each repeated as
    often as its query was drawn (a repeat ties with itself, so the order is the official one)."""
    _check_known(predictions, solution)
    queries = list(solution)
    positives = counts @ np.array([bool(solution[q]) for q in queries], float)
    predicted = [k for k, q in enumerate(queries) if q in predictions]
    ids = np.array([queries[k] for k in predicted])
    scores = np.array([predictions[queries[k]][1] for k in predicted], float)
    correct = np.array([predictions[queries[k]][0] in solution[queries[k]] for k in predicted], bool)
    order = np.lexsort((ids, -scores))
    ranked_correct, ranked_counts = correct[order], counts[:, np.array(predicted, int)[order]]
    return np.array(
        [
            _ranked_gap(np.repeat(ranked_correct, row), total) if total else math.nan
            for row, total in zip(ranked_counts, positives, strict=True)
        ]
    )


def _resampled_map(
    predictions: RetrievalPredictions, solution: Mapping[str, list[str]], counts: np.ndarray
) -> np.ndarray:
    """mAP@100 of each resample: the mean of the drawn queries' average precisions."""
    average_precisions = _average_precisions(_hit_matrix(predictions, solution, MAX_PREDICTIONS), solution)
    return counts @ average_precisions / counts.sum(axis=1)


def subsets_with_all(solution: Mapping[str, Mapping[str, list]]) -> dict[str, Mapping[str, list]]:
    """The named subsets plus 'all', their union."""
    subsets = {name: solution[name] for name in SUBSETS}
    subsets["all"] = {test_id: truth for name in SUBSETS for test_id, truth in solution[name].items()}
    return subsets


def _check_known(predictions: Mapping[str, object], solution: Mapping[str, list]) -> None:
    unknown = next((test_id for test_id in predictions if test_id not in solution), None)
    if unknown is not None:
        raise ValueError(f"test image {unknown} is not part of the solution")


def _hit_matrix(
    predictions: RetrievalPredictions, solution: Mapping[str, list[str]], max_predictions: int
) -> np.ndarray:
    """hits[q, i]: the query's i-th prediction is relevant and its first occurrence (a repeat scores 0)."""
    _check_known(predictions, solution)
    hits = np.zeros((len(solution), max_predictions), bool)
    for row, (query, relevant) in enumerate(solution.items()):
        if query in predictions:
            hits[row, :] = _first_relevant_occurrences(predictions[query], set(relevant), max_predictions)
    return hits


def _first_relevant_occurrences(prediction: list[str], relevant: set[str], max_predictions: int) -> list[bool]:
    seen: set[str] = set()
    flags = [False] * max_predictions
    for rank, image in enumerate(prediction[:max_predictions]):
        flags[rank] = image in relevant and image not in seen
        seen.add(image)
    return flags


def _mean_average_precision(hits: np.ndarray, solution: Mapping[str, list[str]]) -> float:
    if not len(hits):
        return math.nan
    return float(np.mean(_average_precisions(hits, solution)))


def _average_precisions(hits: np.ndarray, solution: Mapping[str, list[str]]) -> np.ndarray:
    """Each query's average precision at hits.shape[1]."""
    ranks = np.arange(1, hits.shape[1] + 1)
    precision_at_hits = np.where(hits, np.cumsum(hits, axis=1) / ranks, 0.0)
    num_expected = np.minimum([len(relevant) for relevant in solution.values()], hits.shape[1])
    return precision_at_hits.sum(axis=1) / num_expected


def _mean_precisions(hits: np.ndarray) -> np.ndarray:
    if not len(hits):
        return np.full(hits.shape[1], math.nan)
    return np.mean(np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1), axis=0)


def _mean_median_position(hits: np.ndarray) -> tuple[float, float]:
    if not len(hits):
        return math.nan, math.nan
    positions = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, hits.shape[1] + 1)
    return float(np.mean(positions)), float(np.median(positions))


def _json_safe(scores: dict) -> dict:
    """Plain Python numbers, NaN as None."""
    return {
        key: value if isinstance(value, int) else None if math.isnan(value) else float(value)
        for key, value in scores.items()
    }
