"""The GLDv2 metrics: the official test fixtures' published values, and random data against plain loops."""

from __future__ import annotations

import random

import numpy as np
import pytest

from local_eval import metrics

# The inputs of the official GLDv2 metric tests (tensorflow/models, delf google_landmarks_dataset).
RECOGNITION_SOLUTION = {
    "0123456789abcdef": [0, 12],
    "0223456789abcdef": [100, 200, 300],
    "0323456789abcdef": [1],
    "0423456789abcdef": [],
    "0523456789abcdef": [],
}
RECOGNITION_PREDICTIONS = {
    "0223456789abcdef": (0, 0.01),
    "0323456789abcdef": (1, 10.0),
    "0423456789abcdef": (150, 15.0),
}
RETRIEVAL_SOLUTION = {
    "0123456789abcdef": ["fedcba9876543210", "fedcba9876543220"],
    "0223456789abcdef": ["fedcba9876543210"],
    "0323456789abcdef": ["fedcba9876543230", "fedcba9876543240", "fedcba9876543250"],
    "0423456789abcdef": ["fedcba9876543230"],
}
RETRIEVAL_PREDICTIONS = {
    "0223456789abcdef": ["fedcba9876543200", "fedcba9876543210"],
    "0323456789abcdef": ["fedcba9876543240"],
    "0423456789abcdef": ["fedcba9876543230", "fedcba9876543240"],
}


# Plain loops, one row at a time, as the official code reads.
def reference_gap(predictions, solution, ignore_non_gt_test_images=False):
    ranked = sorted(predictions.items(), key=lambda item: (-item[1][1], item[0], item[1][0]))
    total = correct = 0
    gap = 0.0
    for test_id, (landmark, _) in ranked:
        if ignore_non_gt_test_images and not solution[test_id]:
            continue
        total += 1
        if landmark in solution[test_id]:
            correct += 1
            gap += correct / total
    return gap / sum(1 for truth in solution.values() if truth)


def reference_top1(predictions, solution):
    with_truth = [test_id for test_id, truth in solution.items() if truth]
    hits = [
        test_id for test_id in with_truth if test_id in predictions and predictions[test_id][0] in solution[test_id]
    ]
    return len(hits) / len(with_truth)


def reference_retrieval(predictions, solution, max_predictions):
    """(mAP, mean precisions at 1..max_predictions, mean position, median position)."""
    aps, precisions, positions = [], [], []
    for query, relevant in solution.items():
        prediction = predictions.get(query, [])[:max_predictions]
        seen, correct, ap, row, first = set(), 0, 0.0, [], max_predictions + 1
        for rank in range(1, max_predictions + 1):
            if rank <= len(prediction):
                image = prediction[rank - 1]
                if image in relevant and first > max_predictions:
                    first = rank
                if image not in seen:
                    seen.add(image)
                    if image in relevant:
                        correct += 1
                        ap += correct / rank
            row.append(correct / rank)
        aps.append(ap / min(len(relevant), max_predictions))
        precisions.append(row)
        positions.append(first)
    return np.mean(aps), np.mean(precisions, axis=0), np.mean(positions), np.median(positions)


def test_official_recognition_fixture():
    assert metrics.global_average_precision(RECOGNITION_PREDICTIONS, RECOGNITION_SOLUTION) == pytest.approx(
        0.166667, abs=1e-6
    )
    assert metrics.global_average_precision(RECOGNITION_PREDICTIONS, RECOGNITION_SOLUTION, True) == pytest.approx(
        0.333333, abs=1e-6
    )
    assert metrics.top1_accuracy(RECOGNITION_PREDICTIONS, RECOGNITION_SOLUTION) == pytest.approx(0.333333, abs=1e-6)


def test_official_retrieval_fixture():
    assert metrics.mean_average_precision(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION) == pytest.approx(
        0.458333, abs=1e-6
    )
    assert metrics.mean_average_precision(
        RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION, max_predictions=1
    ) == pytest.approx(0.5)
    np.testing.assert_allclose(
        metrics.mean_precisions(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION, max_predictions=2), [0.5, 0.375]
    )
    assert metrics.mean_median_position(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION) == pytest.approx((26.25, 1.5))
    assert metrics.mean_median_position(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION, max_predictions=1) == pytest.approx(
        (1.5, 1.5)
    )


def test_ties_break_by_id_ascending():
    solution = {"b": [1], "a": [2]}
    # Same score: 'a' (wrong) ranks first, so the correct 'b' sits at rank 2.
    predictions = {"b": (1, 0.5), "a": (7, 0.5)}
    assert metrics.global_average_precision(predictions, solution) == pytest.approx(0.5 / 2)


def test_repeated_retrieval_id_keeps_its_position():
    solution = {"q": ["x", "y"]}
    assert metrics.mean_average_precision({"q": ["x", "x", "y"]}, solution) == pytest.approx((1 + 2 / 3) / 2)


def test_prediction_for_unknown_id_is_rejected():
    with pytest.raises(ValueError, match="zzz"):
        metrics.global_average_precision({"zzz": (1, 1.0)}, RECOGNITION_SOLUTION)
    with pytest.raises(ValueError, match="zzz"):
        metrics.mean_average_precision({"zzz": ["a"]}, RETRIEVAL_SOLUTION)


def random_recognition(rng: random.Random, n: int):
    solution = {f"{i:016x}": rng.sample(range(8), rng.choice([0, 0, 1, 2])) for i in rng.sample(range(10 * n), n)}
    predictions = {
        test_id: (rng.randrange(8), rng.choice([0.1, 0.2, 0.5, rng.random()]))
        for test_id in solution
        if rng.random() < 0.8
    }
    return predictions, solution


def random_retrieval(rng: random.Random, n: int, index_size: int = 40):
    solution = {f"q{i}": rng.sample(range(index_size), rng.randint(1, 12)) for i in range(n)}
    solution = {q: [f"i{image}" for image in relevant] for q, relevant in solution.items()}
    predictions = {
        q: [f"i{rng.randrange(index_size)}" for _ in range(rng.randint(0, 30))] for q in solution if rng.random() < 0.85
    }
    return predictions, solution


@pytest.mark.parametrize("seed", range(20))
def test_recognition_matches_plain_loop(seed):
    predictions, solution = random_recognition(random.Random(seed), 60)
    if not any(solution.values()):
        pytest.skip("no landmark image drawn")
    for ignore in (False, True):
        assert metrics.global_average_precision(predictions, solution, ignore) == pytest.approx(
            reference_gap(predictions, solution, ignore)
        )
    assert metrics.top1_accuracy(predictions, solution) == pytest.approx(reference_top1(predictions, solution))


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("max_predictions", [1, 7, 100])
def test_retrieval_matches_plain_loop(seed, max_predictions):
    predictions, solution = random_retrieval(random.Random(seed), 25)
    expected_map, expected_precisions, expected_mean, expected_median = reference_retrieval(
        predictions, solution, max_predictions
    )
    assert metrics.mean_average_precision(predictions, solution, max_predictions) == pytest.approx(expected_map)
    np.testing.assert_allclose(metrics.mean_precisions(predictions, solution, max_predictions), expected_precisions)
    assert metrics.mean_median_position(predictions, solution, max_predictions) == pytest.approx(
        (expected_mean, expected_median)
    )


def test_score_recognition_splits_subsets_and_all():
    predictions, truth = random_recognition(random.Random(1), 80)
    ids = list(truth)
    solution = {"public": {i: truth[i] for i in ids[:30]}, "private": {i: truth[i] for i in ids[30:]}}
    scores = metrics.score_recognition(solution, predictions)
    for name, subset in [*solution.items(), ("all", truth)]:
        subset_predictions = {i: p for i, p in predictions.items() if i in subset}
        assert scores[name]["n"] == len(subset)
        assert scores[name]["gap"] == pytest.approx(reference_gap(subset_predictions, subset))
        assert scores[name]["gap_landmarks_only"] == pytest.approx(reference_gap(subset_predictions, subset, True))
        assert scores[name]["top1"] == pytest.approx(reference_top1(subset_predictions, subset))


def test_score_retrieval_splits_subsets_and_all():
    predictions, truth = random_retrieval(random.Random(2), 40)
    ids = list(truth)
    solution = {"public": {i: truth[i] for i in ids[:15]}, "private": {i: truth[i] for i in ids[15:]}}
    scores = metrics.score_retrieval(solution, predictions)
    for name, subset in [*solution.items(), ("all", truth)]:
        expected_map, precisions, mean_position, median_position = reference_retrieval(predictions, subset, 100)
        assert scores[name]["n"] == len(subset)
        assert scores[name]["map@100"] == pytest.approx(expected_map)
        for k in (1, 5, 10, 50, 100):
            assert scores[name][f"precision@{k}"] == pytest.approx(precisions[k - 1])
        assert (scores[name]["mean_position"], scores[name]["median_position"]) == pytest.approx(
            (mean_position, median_position)
        )


def test_empty_subset_scores_none():
    scores = metrics.score_retrieval({"public": {}, "private": RETRIEVAL_SOLUTION}, RETRIEVAL_PREDICTIONS)
    assert scores["public"]["n"] == 0
    assert all(value is None for key, value in scores["public"].items() if key != "n")
    assert scores["all"]["map@100"] == pytest.approx(0.458333, abs=1e-6)
    scores = metrics.score_recognition({"public": {"a": []}, "private": {}}, {"a": (1, 0.5)})
    assert scores["public"]["gap"] is None and scores["public"]["top1"] is None


def noisy_recognition(queries: int, seed: int = 0) -> tuple[dict, dict]:
    """(predictions, solution) of `queries` test images: 70% landmarks, right 60% of the time, random scores."""
    rng = np.random.default_rng(seed)
    solution = {f"t{k:05d}": [int(rng.integers(10))] if rng.random() < 0.7 else [] for k in range(queries)}
    predictions = {
        q: (truth[0] if truth and rng.random() < 0.6 else 99, float(rng.random())) for q, truth in solution.items()
    }
    return predictions, solution


def noisy_retrieval(queries: int, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    solution = {f"q{k:05d}": [f"i{j}" for j in rng.choice(50, 3, replace=False)] for k in range(queries)}
    predictions = {q: [f"i{j}" for j in rng.permutation(50)[:20]] for q in solution}
    return predictions, solution


@pytest.mark.parametrize(
    ("task", "data", "metric"),
    [
        ("recognition", noisy_recognition, metrics.global_average_precision),
        ("retrieval", noisy_retrieval, metrics.mean_average_precision),
    ],
)
def test_the_bootstrap_interval_holds_the_score_and_narrows_with_more_queries(task, data, metric):
    widths = []
    for queries in (60, 600):
        predictions, solution = data(queries)
        low, high = metrics.bootstrap_interval(task, predictions, solution)
        assert low < metric(predictions, solution) < high
        assert metrics.bootstrap_interval(task, predictions, solution) == [low, high]  # a fixed seed
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ten times the queries: about a third of the width


def test_a_bootstrap_of_one_draw_of_each_query_is_the_score_itself():
    for data, resampled, metric in (
        (noisy_recognition, metrics._resampled_gap, metrics.global_average_precision),
        (noisy_retrieval, metrics._resampled_map, metrics.mean_average_precision),
    ):
        predictions, solution = data(40, seed=3)
        del predictions[next(iter(predictions))]  # a query with no prediction still counts
        once = np.ones((1, len(solution)), int)
        assert resampled(predictions, solution, once)[0] == pytest.approx(metric(predictions, solution))


def test_the_interval_is_none_without_a_landmark_image():
    assert metrics.bootstrap_interval("recognition", {"a": (1, 0.5)}, {"a": []}) is None
