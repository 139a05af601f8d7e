"""Verified pairs per second on one core: the submission's vectorized matching + pydegensac against the
host baseline's way (cKDTree query within distance 0.9, then pydegensac) on the same descriptor pairs,
with the same RANSAC settings, so the inlier counts must be equal."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pydegensac
from scipy.spatial import cKDTree
from threadpoolctl import threadpool_limits

from local_eval.submission_script import load_submission

FEATURES, DIM, PAIRS = 1000, 128, 60
SHARED = 300  # features of a matching pair that see the same scene points


VOCABULARY = 2048  # descriptors cluster around common patterns, so unrelated images still give matches


def normalized(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


CENTRES = normalized(np.random.default_rng(1).standard_normal((VOCABULARY, DIM)))


def descriptors(rows: int, rng: np.random.Generator) -> np.ndarray:
    return normalized(CENTRES[rng.integers(0, VOCABULARY, rows)] + rng.normal(0, 0.05, (rows, DIM)))


def image_pair(matching: bool, rng: np.random.Generator):
    """(kp_a, desc_a, kp_b, desc_b): a matching pair shares SHARED points under a homography, with noise."""
    kp_a, desc_a = rng.uniform(0, 1024, (FEATURES, 2)).astype(np.float32), descriptors(FEATURES, rng)
    kp_b, desc_b = rng.uniform(0, 1024, (FEATURES, 2)).astype(np.float32), descriptors(FEATURES, rng)
    if matching:
        homography = np.array([[0.9, 0.1, 30], [-0.05, 1.1, -20], [1e-4, 0, 1]])
        projected = np.c_[kp_a[:SHARED], np.ones(SHARED)] @ homography.T
        kp_b[:SHARED] = projected[:, :2] / projected[:, 2:] + rng.normal(0, 1.0, (SHARED, 2))
        desc_b[:SHARED] = normalized(desc_a[:SHARED] + rng.normal(0, 0.03, (SHARED, DIM)))
    return kp_a, desc_a, kp_b, desc_b


def baseline_inliers(kp_a, desc_a, kp_b, desc_b, settings) -> int:
    """The host baseline's way: nearest neighbour by k-d tree within the distance bound, then RANSAC."""
    _, nearest = cKDTree(desc_b).query(desc_a, distance_upper_bound=settings.match_max_distance)
    found = np.flatnonzero(nearest < len(desc_b))
    if len(found) < settings.min_matches:
        return 0
    _, mask = pydegensac.findHomography(
        kp_a[found].astype(np.float64),
        kp_b[nearest[found]].astype(np.float64),
        px_th=settings.ransac_threshold_px,
        conf=settings.ransac_confidence,
        max_iters=settings.ransac_iterations,
        seed=settings.ransac_seed,
    )
    return int(np.count_nonzero(mask))


def rate(fn, pairs) -> tuple[list[int], float]:
    """Inlier counts and pairs per second on one core (one BLAS thread, as in the submission's workers)."""
    began = time.perf_counter()
    with threadpool_limits(1):
        counts = [fn(*pair) for pair in pairs]
    return counts, len(pairs) / (time.perf_counter() - began)


def main() -> None:
    sub = load_submission()
    rng = np.random.default_rng(0)
    pairs = [image_pair(i % 2 == 0, rng) for i in range(PAIRS)]
    settings = sub.Verification()  # the script's defaults, at the threshold they mean for a 1024 px image
    settings = dataclasses.replace(settings, ransac_threshold_px=sub.pixel_threshold(settings, 1024, 1024))
    one_way = dataclasses.replace(settings, mutual=False)
    print(
        f"{PAIRS} pairs of {FEATURES} x {DIM} features, half matching; RANSAC {settings.ransac_threshold_px} px, "
        f"{settings.ransac_iterations} iterations, confidence {settings.ransac_confidence}",
        flush=True,
    )
    features = lambda kp_a, desc_a, kp_b, desc_b: (
        sub.LocalFeatures(kp_a, desc_a, 1024),
        sub.LocalFeatures(kp_b, desc_b, 1024),
    )
    host, host_rate = rate(lambda *p: baseline_inliers(*p, one_way), pairs)
    print(f"host baseline (cKDTree + pydegensac) {host_rate:7.1f} pairs/s", flush=True)
    ours, ours_rate = rate(lambda *p: sub.count_inliers(*features(*p), one_way), pairs)
    equal = sum(a == b for a, b in zip(ours, host, strict=True))
    print(
        f"ours, one-way matches               {ours_rate:7.1f} pairs/s  {ours_rate / host_rate:.1f}x "
        f"(target >= 5x); equal inlier counts on {equal}/{PAIRS} pairs",
        flush=True,
    )
    mutual, mutual_rate = rate(lambda *p: sub.count_inliers(*features(*p), settings), pairs)
    print(
        f"ours, mutual matches (the default)  {mutual_rate:7.1f} pairs/s  {mutual_rate / host_rate:.1f}x; "
        f"mean inliers matching {np.mean(mutual[::2]):.0f}, non-matching {np.mean(mutual[1::2]):.1f}"
    )


if __name__ == "__main__":
    main()
