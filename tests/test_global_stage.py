"""The global stage and the scoring of submission/main.py against hand-computed cases: whitening, alpha-QE, DBA,
SuperGlobal, non-landmark suppression, the verified and global scorings and their calibration onto one scale."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from local_eval.submission_script import load_submission

sub = load_submission()


def candidates(cosines, neighbours, ok=None, query_nl=None, db_nl=None) -> object:
    cosines, neighbours = np.asarray(cosines, float), np.asarray(neighbours)
    nq = len(cosines)
    return sub.Candidates(
        cosines,
        neighbours,
        np.ones(nq, bool) if ok is None else np.asarray(ok),
        np.zeros((nq, 0)) if query_nl is None else np.asarray(query_nl, float),
        np.zeros((neighbours.max() + 1, 0)) if db_nl is None else np.asarray(db_nl, float),
    )


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_verified_scoring_sums_per_landmark_and_penalizes_nonlandmarks():
    found = candidates(
        [[0.9, 0.5, 0.45], [0.9, 0.5, 0.45]], [[0, 1, 2], [0, 1, 2]], query_nl=[[0.1, 0.0, 0.0], [0.48, 0.0, 0.0]]
    )  # query 1: one non-landmark in its top 3
    labels = np.array([7, 8, 8])
    inliers = np.array([[20, 0, -1], [0, 0, 0]])
    scoring = sub.Scoring(top_k=3, max_inlier_score=20, nonlandmark_penalty=1.0, calibrate=False)
    landmarks, confidences = sub.verified_predictions(found, inliers, labels, scoring)
    assert landmarks.tolist() == [7, 8]
    assert confidences[0] == pytest.approx(1.9)  # 0.9 + min(20, 20) / 20 beats 0.5 + 0.45
    assert confidences[1] == pytest.approx(0.95 * (1 - 1 / 3))  # 0.5 + 0.45 beats 0.9; 1 of 3 is non-landmark
    unreadable = candidates(found.cosines, found.neighbours, ok=[True, False])
    assert np.isnan(sub.verified_predictions(unreadable, inliers, labels, scoring)[1][1])


def test_a_landmark_tie_goes_to_the_better_ranked_candidate():
    stage = sub.Global(global_top_k=2, suppression=False)
    landmarks, _ = sub.global_predictions(candidates([[0.5, 0.5]], [[1, 0]]), np.array([4, 9]), stage)
    assert landmarks.tolist() == [9]


def test_suppression_subtracts_the_database_and_query_nonlandmark_cosines():
    # two candidates of landmark 3 (database rows 0, 1), one of landmark 5 (row 2)
    db_nl = [[0.5, 0.3, 0.1], [0.2, 0.2, 0.2], [0.0, 0.0, 0.0]]
    found = candidates([[0.8, 0.7, 1.2]], [[0, 1, 2]], query_nl=[[0.6, 0.4, 0.2]], db_nl=db_nl)
    stage = sub.Global(global_top_k=3, db_nonlandmark_k=2, query_nonlandmark_k=3, query_nonlandmark_weight=0.5)
    landmarks, confidences = sub.global_predictions(found, np.array([3, 3, 5]), stage)
    # landmark 3: (0.8 - 0.4) + (0.7 - 0.2) = 0.9; landmark 5: clamp(1.2) - 0 = 1.0; minus 0.5 x 0.4
    assert landmarks.tolist() == [5]
    assert confidences[0] == pytest.approx(1.0 - 0.5 * 0.4)
    plain = sub.global_predictions(found, np.array([3, 3, 5]), dataclasses.replace(stage, suppression=False))
    assert plain[0].tolist() == [3] and plain[1][0] == pytest.approx(1.5)  # 0.8 + 0.7 beats 1.2


def test_the_global_scoring_reads_the_top_k_by_cosine_whatever_depth_was_searched():
    """Suppression may not pull a candidate past the top global_top_k into the vote: a query's global-only
    prediction is the same in a --rerank 0 run (top_k searched) and a --rerank 20 one."""
    db_nl = [[0.6], [0.0], [0.0]]  # row 0 looks like a non-landmark; row 2, ranked third, does not
    stage = sub.Global(global_top_k=1, db_nonlandmark_k=1, query_nonlandmark_weight=0.0)
    labels = np.array([3, 4, 5])
    deep = candidates([[0.9, 0.5, 0.45]], [[0, 1, 2]], query_nl=[[0.1]], db_nl=db_nl)
    shallow = candidates([[0.9]], [[0]], query_nl=[[0.1]], db_nl=db_nl)
    for found in (deep, shallow):
        landmarks, confidences = sub.global_predictions(found, labels, stage)
        assert landmarks.tolist() == [3] and confidences[0] == pytest.approx(0.9 - 0.6)


def test_unverified_queries_keep_the_global_scoring_calibrated_onto_the_verified_scale():
    rng = np.random.default_rng(0)
    nq = 60
    cosines = np.sort(rng.uniform(0.2, 0.9, (nq, 3)), axis=1)[:, ::-1]
    neighbours = np.tile(np.arange(3), (nq, 1))
    labels = np.array([1, 1, 2])
    found = candidates(cosines, neighbours)
    inliers = np.full((nq, 3), -1)
    inliers[:40] = 30  # the first 40 verified: every candidate shows many inliers
    stage, scoring = sub.Global(global_top_k=1, suppression=False), sub.Scoring(top_k=1, max_inlier_score=20)
    _, global_conf = sub.global_predictions(found, labels, stage)
    landmarks, confidences = sub.recognition_predictions(found, inliers, labels, stage, scoring)
    assert landmarks.tolist() == [1] * nq
    assert confidences[:40] == pytest.approx(cosines[:40, 0] + 1)  # verified: cosine + a full local score
    # unverified: a line of their global confidence onto the verified scale (here exactly cos + 1), order kept
    assert confidences[40:] == pytest.approx(global_conf[40:] + 1, abs=1e-6)
    raw = sub.recognition_predictions(found, inliers, labels, stage, dataclasses.replace(scoring, calibrate=False))
    assert raw[1][40:] == pytest.approx(global_conf[40:])
    none_verified = sub.recognition_predictions(found, np.full((nq, 3), -1), labels, stage, scoring)
    assert none_verified[1] == pytest.approx(global_conf)


def test_calibration_gives_unverified_candidates_the_local_score_of_their_cosine():
    rng = np.random.default_rng(0)
    verified_cos = rng.uniform(0, 1, 200)
    verified_local = (verified_cos > 0.5).astype(float)  # high cosines earn inliers, low ones none
    expected = sub.expected_local_scores(verified_cos, verified_local, np.array([0.1, 0.9]))
    assert expected[0] < 0.1 and expected[1] > 0.9
    assert (sub.expected_local_scores(verified_cos[:5], verified_local[:5], np.array([0.9])) == 0).all()


def test_whitening_makes_the_covariance_the_identity():
    rng = np.random.default_rng(1)
    rows = unit(rng.normal(size=(4000, 8)) * np.array([5, 3, 2, 1, 1, 0.5, 0.2, 0.1]) + 10)
    whitening = sub.fit_whitening(rows, shrinkage=0.0)
    projected = (rows - whitening.mean) @ whitening.projection
    assert np.cov(projected.T, bias=True) == pytest.approx(np.eye(8), abs=1e-3)
    whitened = sub.apply_whitening(rows.copy(), whitening)
    assert np.linalg.norm(whitened, axis=1) == pytest.approx(np.ones(len(rows)), abs=1e-5)
    # a collapsed set (all cosines near 1) is spread out again
    assert (rows[:100] @ rows[100:200].T).mean() > 0.8 > 0.1 > abs((whitened[:100] @ whitened[100:200].T).mean())


def test_alpha_query_expansion_adds_the_weighted_top_n_to_the_query():
    queries, database = unit([[1, 0, 0]]), unit([[1, 1, 0], [0, 0, 1], [1, 0, 1]])
    cosines, neighbours = sub.knn(queries, database, 3)
    expanded = sub.query_expansion(queries, database, cosines, neighbours, n=2, alpha=3.0)
    c = 1 / np.sqrt(2)
    expected = queries[0] + c**3 * database[0] + c**3 * database[2]  # the top 2 (both at cos 0.707)
    assert expanded[0] == pytest.approx(expected / np.linalg.norm(expected), abs=1e-6)


def test_database_augmentation_includes_each_row_itself():
    database = unit([[1, 0], [1, 1], [0, 1]])
    augmented, done = sub.database_augmentation(database, n=2, alpha=1.0, block_mb=1, stop=lambda: False)
    assert done == 3
    expected = database[0] + (1 / np.sqrt(2)) * database[1]  # itself (cos 1) and its nearest other row
    assert augmented[0] == pytest.approx(expected / np.linalg.norm(expected), abs=1e-6)
    _, none_done = sub.database_augmentation(database, n=2, alpha=1.0, block_mb=1, stop=lambda: True)
    assert none_done == 0


def superglobal_by_hand(query, database, order, m, k, beta):
    """The SuperGlobal refinement written out for one query, candidate by candidate."""
    top = database[order[:m]]
    refined = []
    for i in range(m):
        sims = [(float(top[i] @ top[j]), j) for j in range(m) if j != i]
        nearest = sorted(sims, reverse=True)[:k]
        weights = [beta * max(s, 0) for s, _ in nearest]
        refined.append(
            (top[i] + sum(w * top[j] for w, (_, j) in zip(weights, nearest, strict=True))) / (1 + sum(weights))
        )
    refined = np.array(refined)
    s1 = refined @ query
    refined_query = refined[np.argsort(-s1)[: k + 1]].max(axis=0)
    score = (s1 + refined @ refined_query) / 2
    new = np.argsort(-score, kind="stable")
    return score[new], order[:m][new]


def test_superglobal_follows_its_formulas():
    rng = np.random.default_rng(3)
    queries, database = unit(rng.normal(size=(3, 16))), unit(rng.normal(size=(30, 16)))
    cosines, neighbours = sub.knn(queries, database, 20)
    scores, reordered = sub.superglobal_rerank(queries, database, cosines, neighbours, m=12, k=4, beta=0.15)
    for q in range(3):
        want_scores, want_order = superglobal_by_hand(queries[q], database, neighbours[q], 12, 4, 0.15)
        assert scores[q, :12] == pytest.approx(want_scores, abs=1e-5)
        assert reordered[q, :12].tolist() == want_order.tolist()
        assert reordered[q, 12:].tolist() == neighbours[q, 12:].tolist()  # past m: as they were
