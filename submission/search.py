"""Exact nearest neighbours of submission/main.py: top-k inner products of unit rows in blocks of bounded
memory, TensorFlow on a GPU and numpy on a CPU.

Shipped beside main.py (which imports it from its own folder).
"""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf
from costs import TIMED_PRODUCT, knn_blocks
from tqdm import tqdm

TIMED_K = 100  # neighbours of the timing run (the retrieval submission's depth)
GPU_PATHS_ENV = "KIT_GPU_PATHS"  # "1": take the GPU code paths on a CPU too (TensorFlow kNN, the XLA timing), for CI


def gpu_present() -> bool:
    """A GPU is visible, or $KIT_GPU_PATHS=1 asks for the GPU code paths on whatever device there is."""
    return bool(tf.config.list_physical_devices("GPU")) or os.environ.get(GPU_PATHS_ENV) == "1"


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn(queries: np.ndarray, database: np.ndarray, k: int, block_mb: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products (cosines of normalized rows) in blocks of bounded memory, never the full
    query x database matrix. Returns (scores [nq,k] descending, indices [nq,k]); TensorFlow on a GPU (or with
    $KIT_GPU_PATHS=1), else numpy."""
    k = min(k, len(database))
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    gpu = gpu_present()
    q_block, db_block = knn_blocks(len(database), k, block_mb, gpu)
    if gpu:
        return knn_tensorflow(queries, database, k, q_block=q_block, db_block=db_block)
    return knn_numpy(queries, database, k, q_block=q_block, db_chunk=db_block)


def knn_tensorflow(queries: np.ndarray, database: np.ndarray, k: int, q_block: int, db_block: int):
    """GPU kNN: blocked matmul + top_k, merging the blocks' top-k."""
    db_parts = [tf.constant(database[s : s + db_block], tf.float32) for s in range(0, len(database), db_block)]
    scores, indices = [], []
    for start in tqdm(range(0, len(queries), q_block), desc="knn", unit="block", leave=False):
        block = tf.constant(queries[start : start + q_block], tf.float32)
        best_s = best_i = None
        for part_index, part in enumerate(db_parts):
            s, i = tf.math.top_k(tf.matmul(block, part, transpose_b=True), min(k, part.shape[0]))
            i = i + part_index * db_block
            if best_s is not None:
                s, order = tf.math.top_k(tf.concat([best_s, s], axis=1), k)
                i = tf.gather(tf.concat([best_i, i], axis=1), order, batch_dims=1)
            best_s, best_i = s, i
        scores.append(best_s.numpy())
        indices.append(best_i.numpy().astype(np.int64))
    return np.concatenate(scores), np.concatenate(indices)


def knn_numpy(queries: np.ndarray, database: np.ndarray, k: int, q_block: int, db_chunk: int):
    """CPU kNN near the speed of the bare multiply: after the first database chunk only scores above each
    query's current k-th best are looked at, and those are few. Score and mask buffers are reused."""
    queries, database = np.asarray(queries, np.float32), np.asarray(database, np.float32)  # no copy if float32
    db_chunk = max(k, db_chunk)
    scores_buffer = np.empty((min(q_block, len(queries)), db_chunk), np.float32)
    mask_buffer = np.empty(scores_buffer.shape, bool)
    scores, indices = [], []
    for start in tqdm(range(0, len(queries), q_block), desc="knn", unit="block", leave=False):
        block = queries[start : start + q_block]
        best_s = best_i = None
        for chunk_start in range(0, len(database), db_chunk):
            part = database[chunk_start : chunk_start + db_chunk]
            chunk = np.matmul(block, part.T, out=scores_buffer[: len(block), : len(part)])
            if best_s is None:
                best_i = np.argpartition(chunk, len(part) - k, axis=1)[:, len(part) - k :]
                best_s = np.take_along_axis(chunk, best_i, 1)
            else:
                mask = np.greater(chunk, best_s.min(axis=1, keepdims=True), out=mask_buffer[: len(block), : len(part)])
                best_s, best_i = merge_candidates(best_s, best_i, chunk, np.flatnonzero(mask), chunk_start, k)
        order = np.lexsort((best_i, -best_s), axis=1)  # score descending, then index ascending
        scores.append(np.take_along_axis(best_s, order, 1))
        indices.append(np.take_along_axis(best_i, order, 1).astype(np.int64))
    return np.concatenate(scores), np.concatenate(indices)


def merge_candidates(
    best_s: np.ndarray, best_i: np.ndarray, chunk: np.ndarray, flat: np.ndarray, offset: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top-k of its current best and its candidates (flat positions into the chunk)."""
    if len(flat) == 0:
        return best_s, best_i
    rows, cols = np.divmod(flat, chunk.shape[1])
    counts = np.bincount(rows, minlength=len(chunk))
    slots = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
    cand_s = np.full((len(chunk), counts.max()), -np.inf, np.float32)
    cand_i = np.zeros((len(chunk), counts.max()), best_i.dtype)
    cand_s[rows, slots], cand_i[rows, slots] = chunk[rows, cols], cols + offset
    all_s, all_i = np.concatenate([best_s, cand_s], 1), np.concatenate([best_i, cand_i], 1)
    keep = np.argpartition(all_s, all_s.shape[1] - k, axis=1)[:, all_s.shape[1] - k :]
    return np.take_along_axis(all_s, keep, 1), np.take_along_axis(all_i, keep, 1)


def knn_seconds_per_item(dim: int, block_mb: int) -> float:
    """Measured seconds per query x database row of knn on random data the size of one block (for planning)."""
    rng = np.random.default_rng(0)
    queries = l2_normalize(rng.normal(size=(TIMED_PRODUCT[0], dim)).astype(np.float32))
    database = l2_normalize(rng.normal(size=(TIMED_PRODUCT[1], dim)).astype(np.float32))
    began = time.monotonic()
    knn(queries, database, TIMED_K, block_mb)
    return (time.monotonic() - began) / (len(queries) * len(database))
