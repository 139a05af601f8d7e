"""The Revisited Oxford and Paris protocols (Radenović et al., CVPR 2018), as revisitop's evaluation computes them.

Each query's ground truth lists database indices as `easy`, `hard` and `junk`; a protocol makes some of them the
positives and ignores others:
  easy:   positives easy,        ignored junk + hard
  medium: positives easy + hard, ignored junk
  hard:   positives hard,        ignored junk + easy
Ignored images are taken out of the ranking: a positive's position counts only the images above it that are not
ignored. With P the query's positives and r_j the 0-based position of its j-th positive (j from 0):
  AP = (1/P) x sum_j (precision before it + precision at it) / 2, the trapezoid rule over the precision-recall
       curve, where precision before = j / r_j (1 at r_j = 0) and precision at = (j + 1) / (r_j + 1);
  P@k = (positives at 1-based positions <= m) / m with m = min(k, position of the last positive): not plain
        precision at k, a query whose positives all rank above k is not charged for having fewer than k.
mAP and mP@k average over the queries that have positives under the protocol; the others are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # name -> (positive lists, ignored lists)
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
KAPPAS = (1, 5, 10)  # the k of mP@k


def protocol_sets(query_gnd: dict, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, ignored): database indices of one query under a protocol."""
    positive_keys, ignored_keys = PROTOCOLS[protocol]
    join = lambda keys: np.concatenate([np.asarray(query_gnd[key], np.int64).reshape(-1) for key in keys])
    return join(positive_keys), join(ignored_keys)


def positive_positions(ranking: np.ndarray, positives: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """Sorted 0-based positions of the positives in `ranking` (database indices, best first), each lowered by
    the ignored images ranked above it."""
    found = np.flatnonzero(np.isin(ranking, positives))
    ignored_at = np.flatnonzero(np.isin(ranking, ignored))
    return found - np.searchsorted(ignored_at, found, side="left")


def average_precision(positions: np.ndarray, n_positives: int) -> float:
    """Trapezoid-rule AP from the positives' positions (after ignoring) and the number of positives."""
    if n_positives == 0:
        raise ValueError("average precision needs at least one positive")
    nth = np.arange(len(positions), dtype=np.float64)
    rank = np.asarray(positions, np.float64)
    before = np.divide(nth, rank, out=np.ones_like(rank), where=rank > 0)
    at = (nth + 1) / (rank + 1)
    return float(((before + at) / 2).sum() / n_positives)


def precision_at(positions: np.ndarray, k: int) -> float:
    """revisitop's P@k: the share of positives within the first min(k, last positive's position) places."""
    if len(positions) == 0:
        return 0.0
    one_based = np.asarray(positions) + 1
    cutoff = min(int(one_based.max()), k)
    return float(np.count_nonzero(one_based <= cutoff) / cutoff)


def query_scores(ranking: np.ndarray, query_gnd: dict, protocol: str) -> dict[str, float] | None:
    """{"ap", "p@1", "p@5", "p@10"} of one query, or None when it has no positives under the protocol."""
    positives, ignored = protocol_sets(query_gnd, protocol)
    if len(positives) == 0:
        return None
    positions = positive_positions(ranking, positives, ignored)
    return {
        "ap": average_precision(positions, len(positives)),
        **{f"p@{k}": precision_at(positions, k) for k in KAPPAS},
    }


def evaluate(rankings: Sequence[np.ndarray], gnd: Sequence[dict]) -> dict[str, dict[str, float | None]]:
    """{protocol: {"map", "mp@1", "mp@5", "mp@10"}} as fractions, over the queries with positives under each
    protocol (None when no query has any). rankings[q] holds database indices, best first."""
    if len(rankings) != len(gnd):
        raise ValueError(f"{len(rankings)} rankings for {len(gnd)} queries")
    report = {}
    for protocol in PROTOCOLS:
        scored = [s for s in (query_scores(r, g, protocol) for r, g in zip(rankings, gnd, strict=True)) if s]
        report[protocol] = {"map": _mean(scored, "ap"), **{f"mp@{k}": _mean(scored, f"p@{k}") for k in KAPPAS}}
    return report


def _mean(scored: list[dict[str, float]], key: str) -> float | None:
    return float(np.mean([s[key] for s in scored])) if scored else None


def scored_queries(gnd: Sequence[dict]) -> dict[str, int]:
    """How many queries each protocol's means average over (those with at least one positive)."""
    return {protocol: sum(len(protocol_sets(g, protocol)[0]) > 0 for g in gnd) for protocol in PROTOCOLS}
