"""Exact top-100 cosine search, 10,000 queries over a 200,000 x 512 index: the submission's blocked
kNN beside faiss IndexFlatIP (when installed), scikit-learn brute force and the bare matrix multiply of
the same size (the limit: no top-k at all). Peers run in this process on the same data; results must agree."""

from __future__ import annotations

import time

import numpy as np
from sklearn.neighbors import NearestNeighbors

from local_eval.submission_script import load_submission

QUERIES, INDEX, DIM, K = 10_000, 200_000, 512, 100


def normalized(rows: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((rows, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(fn):
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began


def bare_multiply(queries: np.ndarray, index: np.ndarray, q_block: int, db_block: int) -> None:
    """Every query x index product, by blocks into one reused buffer, and nothing else."""
    out = np.empty((q_block, db_block), np.float32)
    for start in range(0, len(queries), q_block):
        block = queries[start : start + q_block]
        for db_start in range(0, len(index), db_block):
            part = index[db_start : db_start + db_block]
            np.matmul(block, part.T, out=out[: len(block), : len(part)])


def faiss_search(queries: np.ndarray, index: np.ndarray):
    try:
        import faiss
    except ImportError:
        return None
    flat = faiss.IndexFlatIP(DIM)
    flat.add(index)
    return flat.search(queries, K)[1]


def sklearn_search(queries: np.ndarray, index: np.ndarray) -> np.ndarray:
    return (
        NearestNeighbors(n_neighbors=K, algorithm="brute", metric="cosine")
        .fit(index)
        .kneighbors(queries, return_distance=False)
    )


def agreement(ours: np.ndarray, other: np.ndarray) -> float:
    """Share of queries whose top-K id sets are equal (ties at the K-th place aside)."""
    return float(np.mean([set(a) == set(b) for a, b in zip(ours, other, strict=True)]))


def main() -> None:
    sub = load_submission()
    rng = np.random.default_rng(0)
    queries, index = normalized(QUERIES, rng), normalized(INDEX, rng)
    print(f"top-{K} of {QUERIES:,} queries over {INDEX:,} x {DIM}", flush=True)
    _, whole_rows_s = timed(lambda: bare_multiply(queries, index, 1000, INDEX))
    _, chunked_s = timed(lambda: bare_multiply(queries, index, sub.KNN_Q_BLOCK, sub.KNN_DB_CHUNK))
    bare_s = min(whole_rows_s, chunked_s)
    print(f"bare multiply        {whole_rows_s:7.1f} s  (1000 queries x whole index at a time)", flush=True)
    blocks = f"{sub.KNN_Q_BLOCK} x {sub.KNN_DB_CHUNK}"
    print(f"bare multiply        {chunked_s:7.1f} s  ({blocks} blocks, as ours)", flush=True)
    (_, ours), ours_s = timed(lambda: sub.knn(queries, index, K))
    print(
        f"ours (submission)    {ours_s:7.1f} s  {ours_s / bare_s:.2f}x the faster bare multiply (target <= 1.3x)",
        flush=True,
    )
    found, faiss_s = timed(lambda: faiss_search(queries, index))
    if found is None:
        print("faiss not installed: skipped")
    else:
        print(
            f"faiss IndexFlatIP    {faiss_s:7.1f} s  ours is {faiss_s / ours_s:.2f}x faster; "
            f"same top-{K}: {agreement(ours, found):.1%}"
        )
    found, sklearn_s = timed(lambda: sklearn_search(queries, index))
    print(
        f"scikit-learn brute   {sklearn_s:7.1f} s  ours is {sklearn_s / ours_s:.2f}x faster; "
        f"same top-{K}: {agreement(ours, found):.1%}"
    )


if __name__ == "__main__":
    main()
