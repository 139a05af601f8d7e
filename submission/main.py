"""Landmark recognition / retrieval submission: DELG global kNN, then local reranking inside a time budget.

One self-contained file to paste into a Kaggle notebook or run as a script:

    python main.py --task recognition --data ../input/landmark-recognition-2021 \
        --model ../input/delg-model --out submission.csv

It reads top to bottom: 1. settings, 2. inputs, 3. global descriptors, 4. nearest neighbours,
5. local features and verification, 6. scoring, 7. time budget, 8. main. Only numpy, pandas,
tensorflow, pydegensac, scikit-learn, tqdm and the standard library are used.

Files it leaves: --out (all-empty at once, then global-only, then the reranked result every
--write-every-s seconds and at the end), WORK/submission_global_only.csv, WORK/timing.json (items and seconds
per stage), WORK/verified_pairs.csv (id, rank, candidate, cosine, inliers of every verified pair, appended
batch by batch), and its caches: WORK/global/<split>/chunk_*.npz (resumable) and WORK/local/<split>/<id>.npz,
both deleted when WORK/cache_key.json (the model files and extraction settings) no longer matches.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pydegensac
import tensorflow as tf
from threadpoolctl import threadpool_limits  # installed with scikit-learn
from tqdm import tqdm

log = logging.getLogger("submission")

# %% 1. Settings
# DELG extraction defaults (a copy of train/config.py: this file imports nothing from the kit).
DELG_IMAGE_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
DELG_GLOBAL_SCALE_INDICES = (3, 4, 5)
DELG_MAX_IMAGE_SIDE = 1024
DELG_MAX_FEATURE_NUM = 1000
DELG_ATTENTION_ABS_THRESHOLD = 0.0
# Host-baseline reranking defaults (Kaggle landmark recognition 2020 DELG baseline).
TOP_K = 3
RECOGNITION_RERANK = 3
MAX_INLIER_SCORE = 20
RANSAC_PX_THRESHOLD = 20.0
RANSAC_ITERATIONS = 1000
RANSAC_CONFIDENCE = 1.0
MATCH_MAX_DISTANCE = 0.9
MIN_MATCHES = 5  # the baseline scores 4 or fewer putative matches as zero inliers
# Retrieval: DELG reranks the top 100 of the 100 submitted ids.
RETRIEVAL_SIZE = 100
RETRIEVAL_RERANK = 100
KNN_DB_CHUNK = 8192  # database rows per numpy multiply (measured best with KNN_Q_BLOCK on 2 cores)
KNN_Q_BLOCK = 512  # queries per numpy multiply

IMAGE_SPLITS = {"recognition": ("train", "test"), "retrieval": ("index", "test")}
TIMING_STAGES = ("global_db", "global_query", "knn", "local_features", "verification")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(IMAGE_SPLITS), help="which competition")
    p.add_argument("--data", required=True, type=Path,
                   help="competition folder: train.csv, train/, test/, sample_submission.csv (recognition) "
                        "or index/, test/, sample_submission.csv (retrieval)")
    p.add_argument("--model", required=True, type=Path,
                   help="DELG SavedModel folder: our TF2 export or Google's released TF1 model")
    p.add_argument("--out", type=Path, default=Path("submission.csv"), help="submission file to write")
    p.add_argument("--work", type=Path, default=Path("work/submission"),
                   help="cache and log folder (global descriptors, local features, timing.json)")
    p.add_argument("--time-budget-h", type=float, default=9.0, help="wall-clock hours the whole run may take")
    p.add_argument("--safety-margin", type=float, default=0.15,
                   help="fraction of the budget kept free when planning the rerank depth")
    p.add_argument("--warmup-queries", type=positive_int, default=20,
                   help="queries reranked first to measure local extraction and verification rates")
    p.add_argument("--rerank-batch", type=positive_int, default=500,
                   help="queries reranked between two re-plannings of the depth")
    p.add_argument("--write-every-s", type=float, default=300.0,
                   help="seconds between two rewrites of --out while reranking (it is always written at the end)")
    p.add_argument("--top-k", type=int, default=TOP_K,
                   help="recognition: neighbours whose scores are summed per landmark")
    p.add_argument("--rerank", type=int, default=None,
                   help=f"candidates verified per query (default {RECOGNITION_RERANK} for recognition, "
                        f"{RETRIEVAL_RERANK} for retrieval); the time budget may lower it; 0 = global only")
    p.add_argument("--max-inlier-score", type=int, default=MAX_INLIER_SCORE,
                   help="recognition: C in the candidate score min(inliers, C)/C + cosine")
    p.add_argument("--nonlandmark-dir", type=Path, default=None,
                   help="optional folder of images known to show no landmark: a test image whose nearest "
                        "neighbours are mostly among them gets a lower recognition confidence")
    p.add_argument("--nonlandmark-penalty", type=float, default=1.0,
                   help="confidence is multiplied by 1 - penalty * (non-landmark share of the top-k)")
    p.add_argument("--scales", type=float, nargs="+", default=list(DELG_IMAGE_SCALES),
                   help="image scales fed to the model")
    p.add_argument("--global-scale-indices", type=int, nargs="+", default=list(DELG_GLOBAL_SCALE_INDICES),
                   help="indices into --scales whose global descriptors are summed")
    p.add_argument("--max-image-side", type=int, default=DELG_MAX_IMAGE_SIDE,
                   help="longer image side is downscaled to this many pixels")
    p.add_argument("--min-image-side", type=int, default=32,
                   help="a shorter side below this is padded up to it (1-pixel and extreme-aspect images)")
    p.add_argument("--max-features", type=int, default=DELG_MAX_FEATURE_NUM,
                   help="local features kept per image, by attention score")
    p.add_argument("--attention-threshold", type=float, default=DELG_ATTENTION_ABS_THRESHOLD,
                   help="minimum attention score of a local feature")
    p.add_argument("--match-max-distance", type=float, default=MATCH_MAX_DISTANCE,
                   help="largest L2 distance between normalized local descriptors of a putative match")
    p.add_argument("--no-mutual", dest="mutual", action="store_false",
                   help="keep one-way nearest neighbours instead of mutual ones (the host baseline's way)")
    p.add_argument("--min-matches", type=int, default=MIN_MATCHES,
                   help="pairs with fewer putative matches score zero inliers")
    p.add_argument("--ransac-threshold", type=float, default=RANSAC_PX_THRESHOLD,
                   help="pydegensac reprojection threshold in pixels")
    p.add_argument("--ransac-iterations", type=int, default=RANSAC_ITERATIONS,
                   help="pydegensac maximum iterations")
    p.add_argument("--ransac-confidence", type=float, default=RANSAC_CONFIDENCE,
                   help="pydegensac confidence (1.0 runs every iteration)")
    p.add_argument("--ransac-seed", type=int, default=0, help="pydegensac seed (-1: random)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes verifying pairs; 0 or 1 verifies in this process")
    p.add_argument("--decode-threads", type=int, default=4, help="threads decoding images ahead of the model")
    p.add_argument("--prefetch", type=int, default=32, help="images decoded ahead of the model")
    p.add_argument("--chunk-size", type=positive_int, default=10_000, help="images per cached global-descriptor chunk")
    p.add_argument("--float16", action="store_true", help="store cached global descriptors as float16")
    p.add_argument("--local-cache-gb", type=float, default=10.0,
                   help="disk kept for cached local features; the oldest go first (Kaggle's output disk is ~20 GB)")
    p.add_argument("--knn-block-mb", type=int, default=512,
                   help="memory for one block of the query x database similarity matrix")
    p.add_argument("--shard", default="0/1",
                   help="i/n: extract only the i-th of n slices of the train/index descriptors, then stop; "
                        "merge the shards' WORK/global folders and run again with 0/1")
    return p


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


class InputError(Exception):
    """A problem with the inputs: printed as one line, exit status 2."""


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like i/n, got {text!r}") from None
    if not 0 <= index < count:
        raise InputError(f"--shard {text}: need 0 <= i < n")
    return index, count


# %% 2. Inputs
def read_table(path: Path, **options) -> pd.DataFrame:
    """A CSV file (a header line and zero or more rows); a clear error when missing or without a header."""
    if not path.is_file():
        raise InputError(f"{path} not found")
    try:
        return pd.read_csv(path, **options)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path} is empty: it needs at least a header line") from None


def read_test_ids(data: Path) -> list[str]:
    """Test ids come from sample_submission.csv, so the output has exactly the rows the server expects."""
    path = data / "sample_submission.csv"
    frame = read_table(path, dtype=str)
    if "id" not in frame.columns:
        raise InputError(f"{path} has no 'id' column")
    return frame["id"].tolist()


def read_train_labels(data: Path) -> tuple[list[str], np.ndarray]:
    path = data / "train.csv"
    frame = read_table(path, dtype={"id": str})
    missing = {"id", "landmark_id"} - set(frame.columns)
    if missing:
        raise InputError(f"{path} lacks columns {sorted(missing)}")
    return frame["id"].tolist(), frame["landmark_id"].to_numpy(np.int64)


def list_image_ids(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise InputError(f"{folder} not found")
    return sorted(p.stem for p in folder.rglob("*.jpg"))


def image_path(data: Path, split: str, image_id: str) -> Path:
    """Image 'abcdef…' of a split lives at split/a/b/c/abcdef….jpg."""
    return data / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def decode_image(path: Path, max_side: int, min_side: int) -> np.ndarray | None:
    """RGB uint8 [H,W,3], longer side capped, shorter side padded; None (logged) when unreadable."""
    try:
        contents = path.read_bytes()
        if not contents:
            raise ValueError("empty file")
        image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    except Exception as err:  # noqa: BLE001 - any unreadable image is skipped, never fatal
        log.warning("skipping unreadable image %s: %s", path, str(err).splitlines()[0][:200])
        return None
    height, width = int(image.shape[0]), int(image.shape[1])
    if max(height, width) > max_side:
        factor = max_side / max(height, width)
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        image = tf.cast(tf.round(tf.image.resize(image, size, antialias=True)), tf.uint8)
    pad_rows, pad_cols = max(0, min_side - int(image.shape[0])), max(0, min_side - int(image.shape[1]))
    return np.pad(image.numpy(), [(0, pad_rows), (0, pad_cols), (0, 0)], mode="edge")


def prefetched(load: Callable, items: Iterable, threads: int, depth: int) -> Iterator:
    """load(item) for each item, in order, computed by `threads` threads up to `depth` items ahead."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(load, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary file beside path, then rename it over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# %% 3. Global descriptors
DELG_INPUTS = ("input_image", "input_scales", "input_max_feature_num", "input_abs_thres",
               "input_global_scales_ind")
DELG_OUTPUTS = ("boxes", "features", "scales", "scores", "global_descriptors")


class DelgModel:
    """Calls a DELG SavedModel: TF2 serving_default, or a TF1 export through .prune() on tensor names."""

    def __init__(self, model_dir: Path, scales: list[float], global_scale_indices: list[int],
                 max_features: int, attention_threshold: float):
        if not (model_dir / "saved_model.pb").is_file():
            raise InputError(f"{model_dir} is not a SavedModel folder (no saved_model.pb)")
        self.model = tf.saved_model.load(str(model_dir))
        self.scales = tf.constant(scales, tf.float32)
        self.global_indices = tf.constant(global_scale_indices, tf.int32)
        self.max_features = max_features
        self.threshold = tf.constant(attention_threshold, tf.float32)
        self.global_scales = tf.gather(self.scales, self.global_indices)
        self.all_global = tf.range(len(global_scale_indices), dtype=tf.int32)
        signature = self.model.signatures.get("serving_default") if hasattr(self.model, "signatures") else None
        if signature is not None and set(DELG_INPUTS) <= set(signature.structured_input_signature[1]):
            self.kind, self.function = "tf2", signature
        else:
            self.kind, self.function = "tf1", self._prune()
        self.global_dim = int(self.global_descriptor(np.full((64, 64, 3), 128, np.uint8)).shape[0])
        log.info("loaded %s DELG model from %s (global dimension %d)", self.kind, model_dir, self.global_dim)

    def _prune(self):
        feeds = [name for name in DELG_INPUTS if self._has_tensor(name)]
        self.tf1_feeds = feeds
        return self.model.prune([f"{name}:0" for name in feeds], [f"{name}:0" for name in DELG_OUTPUTS])

    def _has_tensor(self, name: str) -> bool:
        try:
            self.model.graph.get_operation_by_name(name)
            return True
        except (KeyError, AttributeError):
            return False

    def __call__(self, image: np.ndarray, max_features: int, scales: tf.Tensor | None = None,
                 global_indices: tf.Tensor | None = None) -> dict[str, np.ndarray]:
        inputs = {"input_image": tf.constant(image),
                  "input_scales": self.scales if scales is None else scales,
                  "input_max_feature_num": tf.constant(max_features, tf.int32),
                  "input_abs_thres": self.threshold,
                  "input_global_scales_ind": self.global_indices if global_indices is None else global_indices}
        if self.kind == "tf2":
            outputs = self.function(**inputs)
        else:
            outputs = dict(zip(DELG_OUTPUTS, self.function(*[inputs[name] for name in self.tf1_feeds]),
                                   strict=True))
        return {name: value.numpy() for name, value in outputs.items()}

    def global_descriptor(self, image: np.ndarray) -> np.ndarray:
        """L2-normalize each scale's descriptor, sum them, L2-normalize (as DELG does)."""
        # Only the global scales go through the network, and no local features are selected.
        per_scale = np.atleast_2d(self(image, max_features=0, scales=self.global_scales,
                                       global_indices=self.all_global)["global_descriptors"]).astype(np.float32)
        return l2_normalize(l2_normalize(per_scale).sum(axis=0))

    def local_features(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints [N,2] (box centres, y x) and L2-normalized descriptors [N,128]."""
        outputs = self(image, self.max_features)
        boxes = outputs["boxes"].reshape(-1, 4)
        keypoints = (boxes[:, :2] + boxes[:, 2:]) / 2
        return keypoints.astype(np.float32), l2_normalize(outputs["features"].astype(np.float32))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def safe_global(model: DelgModel, image: np.ndarray | None, what: str) -> np.ndarray | None:
    """The model's global descriptor, or None (logged) when the image is unreadable or the model fails."""
    if image is None:
        return None
    try:
        return model.global_descriptor(image)
    except Exception as err:  # noqa: BLE001 - one bad image must not end the run
        log.warning("global extraction failed for %s: %s", what, str(err).splitlines()[0][:200])
        return None


def chunk_path(cache: Path, index: int) -> Path:
    return cache / f"chunk_{index:06d}.npz"


def read_chunk(cache: Path, index: int, ids: list[str], fields: tuple[str, ...]) -> list[np.ndarray] | None:
    """The named arrays of a cached chunk (only its ids are read for no fields), or None when the chunk is
    missing, unreadable or for other ids."""
    try:
        with np.load(chunk_path(cache, index)) as chunk:
            if chunk["ids"].tolist() == ids:
                return [chunk[field] for field in fields]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass
    return None


def extract_global(model: DelgModel, ids: list[str], paths: list[Path], cache: Path,
                   args: argparse.Namespace, shard: tuple[int, int] = (0, 1)) -> int:
    """Extract and cache, chunk by chunk, every missing global descriptor of this shard; returns the count."""
    size = args.chunk_size
    chunks = [c for c in range(math.ceil(len(ids) / size)) if c % shard[1] == shard[0]]
    todo = [c for c in chunks if read_chunk(cache, c, ids[c * size:(c + 1) * size], ()) is None]
    if len(todo) < len(chunks):
        log.info("%s: %d of %d chunks already cached", cache.name, len(chunks) - len(todo), len(chunks))
    rows = [i for c in todo for i in range(c * size, min(len(ids), (c + 1) * size))]
    load = lambda i: decode_image(paths[i], args.max_image_side, args.min_image_side)
    images = prefetched(load, rows, args.decode_threads, args.prefetch)
    dtype = np.float16 if args.float16 else np.float32
    with tqdm(total=len(rows), desc=f"global {cache.name}", unit="img") as bar:
        for c in todo:
            chunk_ids = ids[c * size:(c + 1) * size]
            descriptors = np.zeros((len(chunk_ids), model.global_dim), dtype)
            ok = np.zeros(len(chunk_ids), bool)
            for j, image_id in enumerate(chunk_ids):
                descriptor = safe_global(model, next(images), image_id)
                if descriptor is not None:
                    descriptors[j], ok[j] = descriptor, True
                bar.update()
            atomic_save(chunk_path(cache, c), lambda tmp, d=descriptors, o=ok, i=chunk_ids:
                        np.savez(tmp, ids=np.array(i), descriptors=d, ok=o))
    return len(rows)


def load_global(cache: Path, ids: list[str], chunk_size: int, dim: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All cached descriptors [n,D] float32 and their ok mask, in the order of ids, filled chunk by chunk into
    one array (D comes from the cache; dim is the width of the empty result when there are no ids)."""
    descriptors, ok = np.zeros((0, dim), np.float32), np.zeros(len(ids), bool)
    for c in range(math.ceil(len(ids) / chunk_size)):
        rows = slice(c * chunk_size, (c + 1) * chunk_size)
        part = read_chunk(cache, c, ids[rows], ("descriptors", "ok"))
        if part is None:
            raise InputError(f"{cache}: descriptor chunk {c} is missing (run every --shard first)")
        if c == 0:
            descriptors = np.empty((len(ids), part[0].shape[1]), np.float32)
        descriptors[rows], ok[rows] = part  # float16 chunks are converted in place
    return descriptors, ok


def compact_valid(descriptors: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the ok rows, their row numbers): the rows move to the front in place, so no second full-size copy."""
    rows = np.flatnonzero(ok)
    for start in range(0, len(rows), KNN_DB_CHUNK):  # a row only moves up, past rows already moved
        part = rows[start:start + KNN_DB_CHUNK]
        descriptors[start:start + len(part)] = descriptors[part]
    return descriptors[:len(rows)], rows


# %% 4. Nearest neighbours
def knn(queries: np.ndarray, database: np.ndarray, k: int, block_mb: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products (cosines of normalized rows) in blocks of bounded memory, never the full
    query x database matrix. Returns (scores [nq,k] descending, indices [nq,k]); TensorFlow on a GPU, else numpy."""
    k = min(k, len(database))
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    if tf.config.list_physical_devices("GPU"):
        db_block = min(len(database), max(k, block_mb * 2**20 // 4 // 1024))
        return knn_tensorflow(queries, database, k, q_block=max(1, block_mb * 2**20 // 4 // db_block),
                              db_block=db_block)
    db_chunk = max(k, KNN_DB_CHUNK)
    q_block = max(1, min(KNN_Q_BLOCK, block_mb * 2**20 // 4 // db_chunk))
    return knn_numpy(queries, database, k, q_block=q_block, db_chunk=db_chunk)


def knn_tensorflow(queries: np.ndarray, database: np.ndarray, k: int, q_block: int, db_block: int):
    """GPU kNN: blocked matmul + top_k, merging the blocks' top-k."""
    db_parts = [tf.constant(database[s:s + db_block], tf.float32) for s in range(0, len(database), db_block)]
    scores, indices = [], []
    for start in tqdm(range(0, len(queries), q_block), desc="knn", unit="block", leave=False):
        block = tf.constant(queries[start:start + q_block], tf.float32)
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
        block = queries[start:start + q_block]
        best_s = best_i = None
        for chunk_start in range(0, len(database), db_chunk):
            part = database[chunk_start:chunk_start + db_chunk]
            chunk = np.matmul(block, part.T, out=scores_buffer[:len(block), :len(part)])
            if best_s is None:
                best_i = np.argpartition(chunk, len(part) - k, axis=1)[:, len(part) - k:]
                best_s = np.take_along_axis(chunk, best_i, 1)
            else:
                mask = np.greater(chunk, best_s.min(axis=1, keepdims=True), out=mask_buffer[:len(block), :len(part)])
                best_s, best_i = merge_candidates(best_s, best_i, chunk, np.flatnonzero(mask), chunk_start, k)
        order = np.lexsort((best_i, -best_s), axis=1)  # score descending, then index ascending
        scores.append(np.take_along_axis(best_s, order, 1))
        indices.append(np.take_along_axis(best_i, order, 1).astype(np.int64))
    return np.concatenate(scores), np.concatenate(indices)


def merge_candidates(best_s: np.ndarray, best_i: np.ndarray, chunk: np.ndarray, flat: np.ndarray, offset: int,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
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
    keep = np.argpartition(all_s, all_s.shape[1] - k, axis=1)[:, all_s.shape[1] - k:]
    return np.take_along_axis(all_s, keep, 1), np.take_along_axis(all_i, keep, 1)


# %% 5. Local features and verification
def local_path(cache: Path, split: str, image_id: str) -> Path:
    return cache / split / f"{image_id}.npz"


def trim_local_cache(cache: Path, max_gb: float) -> int:
    """Delete the oldest cached local features until the cache holds at most max_gb; the count deleted.

    At full size the features of every reranked image would not fit on a notebook's disk (~250 KB each)."""
    files = sorted(((f.stat().st_mtime, f.stat().st_size, f) for f in cache.rglob("*.npz")), reverse=True)
    total, deleted = 0, 0
    for _, size, path in files:  # newest first: keep while there is room
        total += size
        if total > max_gb * 2**30:
            path.unlink(missing_ok=True)
            deleted += 1
    return deleted


def extract_local(model: DelgModel, data: Path, images: list[tuple[str, str]], cache: Path,
                  args: argparse.Namespace) -> int:
    """Cache local features of every (split, id) not cached yet (unreadable: zero features); the count."""
    todo = [(split, i) for split, i in dict.fromkeys(images) if not local_path(cache, split, i).is_file()]
    load = lambda item: decode_image(image_path(data, *item), args.max_image_side, args.min_image_side)
    decoded = prefetched(load, todo, args.decode_threads, args.prefetch)
    for (split, image_id), image in zip(todo, tqdm(decoded, total=len(todo), desc="local", unit="img"), strict=True):
        keypoints, descriptors = np.zeros((0, 2), np.float32), np.zeros((0, 0), np.float16)
        if image is not None:
            try:
                keypoints, descriptors = model.local_features(image)
            except Exception as err:  # noqa: BLE001 - one bad image must not end the run
                log.warning("local extraction failed for %s: %s", image_id, str(err).splitlines()[0][:200])
        atomic_save(local_path(cache, split, image_id), lambda tmp, k=keypoints, d=descriptors:
                    np.savez(tmp, keypoints=k, descriptors=d.astype(np.float16)))
    return len(todo)


def putative_matches(desc_a: np.ndarray, desc_b: np.ndarray, max_distance: float,
                     mutual: bool) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (a, b): b is a's nearest neighbour within max_distance (and, if mutual, vice versa)."""
    similarity = desc_a @ desc_b.T  # normalized rows: distance^2 = 2 - 2 * similarity
    nearest_b = similarity.argmax(axis=1)
    rows = np.arange(len(desc_a))
    keep = np.flatnonzero(similarity[rows, nearest_b] >= 1 - max_distance ** 2 / 2)
    if mutual:  # only the kept candidates' own nearest neighbours are needed (a column argmax is slow)
        keep = keep[(desc_b[nearest_b[keep]] @ desc_a.T).argmax(axis=1) == keep]
    return keep, nearest_b[keep]


def ransac_matches(kp_a: np.ndarray, desc_a: np.ndarray, kp_b: np.ndarray, desc_b: np.ndarray,
                   settings: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Putative matches (indices a, b) and their RANSAC homography inlier mask; no inliers when there are
    too few matches or RANSAC fails."""
    if len(desc_a) == 0 or len(desc_b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    a, b = putative_matches(desc_a, desc_b, settings["max_distance"], settings["mutual"])
    if len(a) < max(4, settings["min_matches"]):
        return a, b, np.zeros(len(a), bool)
    try:
        _, mask = pydegensac.findHomography(kp_a[a].astype(np.float64), kp_b[b].astype(np.float64),
                                            px_th=settings["threshold"], conf=settings["confidence"],
                                            max_iters=settings["iterations"], seed=settings["seed"])
    except Exception:  # noqa: BLE001 - a RANSAC failure scores zero, never ends the run
        mask = None
    return a, b, np.zeros(len(a), bool) if mask is None else np.asarray(mask, bool).reshape(len(a))


def count_inliers(kp_a: np.ndarray, desc_a: np.ndarray, kp_b: np.ndarray, desc_b: np.ndarray,
                  settings: dict) -> int:
    """RANSAC homography inliers of the putative matches; 0 when too few matches or RANSAC fails."""
    return int(np.count_nonzero(ransac_matches(kp_a, desc_a, kp_b, desc_b, settings)[2]))


def load_local(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as features:
        return features["keypoints"], features["descriptors"].astype(np.float32)


_WORKER_SETTINGS: dict = {}


def _init_worker(settings: dict) -> None:
    """One BLAS thread per worker: small matrix products run several times slower on busy shared cores."""
    _WORKER_SETTINGS.update(settings)
    threadpool_limits(1)


def verify_query(task: tuple[Path, list[Path]]) -> list[int]:
    """Inliers between one query and each of its candidates, from their cached local features."""
    query = load_local(task[0])
    return [count_inliers(*query, *load_local(path), _WORKER_SETTINGS) for path in task[1]]


@contextlib.contextmanager
def verification_pool(settings: dict, workers: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """Worker processes for verify_query, started once for the whole rerank; None: verify in this process."""
    if workers <= 1:
        _WORKER_SETTINGS.update(settings)
        yield None
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _init_worker, (settings,)) as pool:
        yield pool


def verify_all(tasks: list[tuple[Path, list[Path]]], pool: multiprocessing.pool.Pool | None) -> list[list[int]]:
    """verify_query over all tasks, in the pool's processes or (no pool) in this one."""
    progress = lambda results: list(tqdm(results, total=len(tasks), desc="verify", unit="query", leave=False))
    if pool is None:
        with threadpool_limits(1):
            return progress(map(verify_query, tasks))
    return progress(pool.imap(verify_query, tasks, chunksize=4))


def ransac_settings(args: argparse.Namespace) -> dict:
    return {"max_distance": args.match_max_distance, "mutual": args.mutual, "min_matches": args.min_matches,
            "threshold": args.ransac_threshold, "confidence": args.ransac_confidence,
            "iterations": args.ransac_iterations, "seed": args.ransac_seed}


# %% 6. Scoring
def recognition_rows(cosines: np.ndarray, neighbours: np.ndarray, inliers: np.ndarray, labels: np.ndarray,
                     top_k: int, max_inlier_score: int, nonlandmark_share: np.ndarray,
                     penalty: float, query_ok: np.ndarray) -> list[str]:
    """'landmark score' per query: min(inliers, C)/C + cosine summed per landmark over the best top_k.

    Unverified candidates (inliers < 0) score their cosine alone; unreadable queries predict nothing."""
    local = np.where(inliers >= 0, np.minimum(inliers, max_inlier_score) / max_inlier_score, 0.0)
    scores = cosines + local
    rows = []
    for q in range(len(scores)):
        if not query_ok[q] or neighbours.shape[1] == 0:
            rows.append("")
            continue
        best = np.argsort(-scores[q], kind="stable")[:top_k]
        totals: dict[int, float] = {}
        for j in best:
            label = int(labels[neighbours[q, j]])
            totals[label] = totals.get(label, 0.0) + float(scores[q, j])
        landmark = max(totals, key=totals.get)
        confidence = totals[landmark] * max(0.0, 1.0 - penalty * nonlandmark_share[q])
        rows.append(f"{landmark} {confidence:.6f}")
    return rows


def retrieval_rows(cosines: np.ndarray, neighbours: np.ndarray, inliers: np.ndarray, db_ids: list[str],
                   query_ok: np.ndarray) -> list[str]:
    """Index ids by cosine, the verified prefix reordered by (inliers, cosine) as DELG does."""
    rows = []
    for q in range(len(cosines)):
        if not query_ok[q]:
            rows.append("")
            continue
        verified = int(np.count_nonzero(inliers[q] >= 0))
        head = sorted(range(verified), key=lambda j: (-inliers[q, j], -cosines[q, j]))
        order = head + list(range(verified, neighbours.shape[1]))
        rows.append(" ".join(db_ids[neighbours[q, j]] for j in order))
    return rows


def nonlandmark_shares(query_cos: np.ndarray, nonlandmark_cos: np.ndarray, top_k: int) -> np.ndarray:
    """Per query, the share of non-landmark images among its top_k neighbours of both sets."""
    if nonlandmark_cos.shape[1] == 0:
        return np.zeros(len(query_cos))
    both = np.concatenate([query_cos[:, :top_k], nonlandmark_cos[:, :top_k]], axis=1)
    is_nonlandmark = np.concatenate([np.zeros_like(query_cos[:, :top_k]),
                                     np.ones_like(nonlandmark_cos[:, :top_k])], axis=1)
    best = np.argsort(-both, axis=1, kind="stable")[:, :top_k]
    return np.take_along_axis(is_nonlandmark, best, axis=1).mean(axis=1)


def write_submission(path: Path, task: str, test_ids: list[str], rows: list[str]) -> None:
    column = "landmarks" if task == "recognition" else "images"
    frame = pd.DataFrame({"id": test_ids, column: rows})
    atomic_save(path, lambda tmp: frame.to_csv(tmp, index=False))


PAIR_COLUMNS = ["id", "rank", "candidate", "cosine", "inliers"]


def start_verified_pairs(path: Path) -> None:
    """A fresh verified_pairs.csv holding only its header; append_verified_pairs adds each batch."""
    atomic_save(path, lambda tmp: pd.DataFrame(columns=PAIR_COLUMNS).to_csv(tmp, index=False))


def append_verified_pairs(path: Path, query_ids: list[str], db_ids: list[str], neighbours: np.ndarray,
                          cosines: np.ndarray, inliers: np.ndarray) -> None:
    """The verified (query, candidate) pairs of these queries with rank, cosine and inliers (debugging, pictures)."""
    queries, ranks = np.nonzero(inliers >= 0)
    frame = pd.DataFrame({"id": [query_ids[q] for q in queries], "rank": ranks + 1,
                          "candidate": [db_ids[j] for j in neighbours[queries, ranks]],
                          "cosine": np.round(cosines[queries, ranks], 6), "inliers": inliers[queries, ranks]})
    frame.to_csv(path, mode="a", header=False, index=False)


# %% 7. Time budget
class Timing:
    """Items and seconds per stage, against a deadline; saved as WORK/timing.json after every change."""

    def __init__(self, path: Path, task: str, budget_h: float, safety_margin: float):
        self.path, self.task, self.budget_h = path, task, budget_h
        self.start = time.monotonic()
        self.deadline = self.start + budget_h * 3600 * (1 - safety_margin)
        self.stages = {name: {"items": 0, "seconds": 0.0} for name in TIMING_STAGES}
        self.rerank_depth = 0

    def add(self, stage: str, items: int, seconds: float) -> None:
        self.stages[stage]["items"] += int(items)
        self.stages[stage]["seconds"] += float(seconds)
        self.save()

    def rate(self, stage: str) -> float | None:
        """Seconds per item measured so far, or None before any item."""
        stage_log = self.stages[stage]
        return stage_log["seconds"] / stage_log["items"] if stage_log["items"] else None

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        record = {"task": self.task, "budget_h": self.budget_h, "rerank_depth": self.rerank_depth,
                  "stages": self.stages, "total_seconds": time.monotonic() - self.start}
        atomic_save(self.path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))


def plan_depth(timing: Timing, queries_left: int, max_depth: int, new_image_share: float) -> int:
    """Deepest rerank (<= max_depth) whose projected cost for the remaining queries fits the time left."""
    per_image, per_pair = timing.rate("local_features"), timing.rate("verification")
    if per_image is None or per_pair is None:
        return max_depth  # the warm-up batch measures the rates
    per_query = timing.time_left() / max(1, queries_left)
    depth = (per_query - per_image) / (per_image * new_image_share + per_pair)
    return int(max(0, min(max_depth, math.floor(depth))))


# %% 8. Main
def rerank(model: DelgModel, data: Path, args: argparse.Namespace, timing: Timing, test_ids: list[str],
           db_split: str, db_ids: list[str], neighbours: np.ndarray, query_ok: np.ndarray,
           max_depth: int, on_progress: Callable[[np.ndarray, list[int]], None]) -> np.ndarray:
    """Inliers [nq, candidates] (-1: not verified), batch after batch while the budget allows;
    on_progress(inliers, batch) after each batch."""
    inliers = np.full(neighbours.shape, -1, np.int64)
    order = [q for q in range(len(test_ids)) if query_ok[q]]
    start, new_image_share = 0, 1.0
    with verification_pool(ransac_settings(args), args.workers) as pool:
        while start < len(order) and max_depth > 0:
            depth = plan_depth(timing, len(order) - start, max_depth, new_image_share)
            if depth == 0 or timing.time_left() <= 0:
                log.info("time budget reached: %d of %d queries keep their global ranking", len(order) - start,
                         len(order))
                break
            batch = order[start:start + (args.warmup_queries if start == 0 else args.rerank_batch)]
            candidates = [[db_ids[j] for j in neighbours[q, :depth]] for q in batch]
            counts, new_image_share = verify_batch(model, data, args, timing, pool, [test_ids[q] for q in batch],
                                                   db_split, candidates)
            for q, query_counts in zip(batch, counts, strict=True):
                inliers[q, :len(query_counts)] = query_counts
            timing.rerank_depth = max(timing.rerank_depth, depth)
            start += len(batch)
            log.info("reranked %d of %d queries at depth %d", start, len(order), depth)
            on_progress(inliers, batch)
    timing.save()
    return inliers


def verify_batch(model: DelgModel, data: Path, args: argparse.Namespace, timing: Timing,
                 pool: multiprocessing.pool.Pool | None, query_ids: list[str], db_split: str,
                 candidates: list[list[str]]) -> tuple[list[list[int]], float]:
    """Inliers of each query with each of its candidates, and the share of candidate images whose local
    features had to be extracted (the rest were cached)."""
    cache = args.work / "local"
    wanted = [("test", q) for q in query_ids] + [(db_split, c) for cs in candidates for c in cs]
    began = time.monotonic()
    extracted = extract_local(model, data, wanted, cache, args)
    timing.add("local_features", extracted, time.monotonic() - began)
    tasks = [(local_path(cache, "test", q), [local_path(cache, db_split, c) for c in cs])
             for q, cs in zip(query_ids, candidates, strict=True)]
    began = time.monotonic()
    counts = verify_all(tasks, pool)
    timing.add("verification", sum(len(cs) for cs in candidates), time.monotonic() - began)
    trim_local_cache(cache, args.local_cache_gb)
    return counts, max(0.0, extracted - len(query_ids)) / max(1, len(wanted) - len(query_ids))


def timed_global(model, ids, paths, cache, args, timing, stage, shard=(0, 1)) -> int:
    began = time.monotonic()
    count = extract_global(model, ids, paths, cache, args, shard)
    timing.add(stage, count, time.monotonic() - began)
    return count


def cache_key(args: argparse.Namespace) -> dict:
    """What the cached features depend on: the model's files and every extraction setting."""
    model = args.model.resolve()
    files = {name: [(model / name).stat().st_size, (model / name).stat().st_mtime_ns]
             for name in ("saved_model.pb", "variables/variables.index") if (model / name).is_file()}
    settings = {name: getattr(args, name) for name in ("scales", "global_scale_indices", "max_image_side",
                                                       "min_image_side", "max_features", "attention_threshold",
                                                       "float16")}
    return json.loads(json.dumps({"model": str(model), "files": files, "settings": settings}))


def clear_stale_caches(work: Path, key: dict) -> None:
    """Delete WORK/global and WORK/local when WORK/cache_key.json was written for another model or settings."""
    path = work / "cache_key.json"
    try:
        stale = path.is_file() and json.loads(path.read_text()) != key
    except ValueError:
        stale = True
    if stale:
        log.warning("model or extraction settings changed since %s: deleting the cached features", path)
        for folder in ("global", "local"):
            shutil.rmtree(work / folder, ignore_errors=True)
    atomic_save(path, lambda tmp: tmp.write_text(json.dumps(key, indent=1)))


def run(args: argparse.Namespace) -> None:
    shard = parse_shard(args.shard)
    db_split, query_split = IMAGE_SPLITS[args.task]
    args.work.mkdir(parents=True, exist_ok=True)
    timing = Timing(args.work / "timing.json", args.task, args.time_budget_h, args.safety_margin)
    test_ids = read_test_ids(args.data)
    if shard == (0, 1):  # a valid file from the start, whatever stops the run later
        write_submission(args.out, args.task, test_ids, [""] * len(test_ids))
    if args.task == "recognition":
        db_ids, labels = read_train_labels(args.data)
    else:
        db_ids, labels = list_image_ids(args.data / "index"), np.zeros(0, np.int64)
    model = DelgModel(args.model, args.scales, args.global_scale_indices, args.max_features,
                      args.attention_threshold)
    clear_stale_caches(args.work, cache_key(args))
    db_cache = args.work / "global" / db_split
    db_paths = [image_path(args.data, db_split, i) for i in db_ids]
    timed_global(model, db_ids, db_paths, db_cache, args, timing, "global_db", shard)
    if shard != (0, 1):
        log.info("shard %d/%d extracted into %s", *shard, db_cache)
        return
    db_desc, valid_db = compact_valid(*load_global(db_cache, db_ids, args.chunk_size, model.global_dim))
    query_cache = args.work / "global" / query_split
    query_paths = [image_path(args.data, query_split, i) for i in test_ids]
    timed_global(model, test_ids, query_paths, query_cache, args, timing, "global_query")
    query_desc, query_ok = load_global(query_cache, test_ids, args.chunk_size, model.global_dim)
    nonlandmark_desc = global_nonlandmarks(model, args, timing)

    began = time.monotonic()
    depth = args.rerank if args.rerank is not None else (
        RECOGNITION_RERANK if args.task == "recognition" else RETRIEVAL_RERANK)
    k = RETRIEVAL_SIZE if args.task == "retrieval" else max(args.top_k, depth)
    cosines, found = knn(query_desc, db_desc, k, args.knn_block_mb)
    neighbours = valid_db[found]
    nonlandmark_cos, _ = knn(query_desc, nonlandmark_desc, args.top_k, args.knn_block_mb)
    timing.add("knn", len(query_desc) * (len(db_desc) + len(nonlandmark_desc)), time.monotonic() - began)
    shares = nonlandmark_shares(cosines, nonlandmark_cos, args.top_k)

    def rows_for(inliers: np.ndarray) -> list[str]:
        if args.task == "recognition":
            return recognition_rows(cosines, neighbours, inliers, labels, args.top_k, args.max_inlier_score,
                                    shares, args.nonlandmark_penalty, query_ok)
        return retrieval_rows(cosines, neighbours, inliers, db_ids, query_ok)

    write_submission(args.out, args.task, test_ids, rows_for(np.full(neighbours.shape, -1)))
    shutil.copyfile(args.out, args.work / "submission_global_only.csv")
    log.info("global-only submission written to %s", args.out)
    pairs_path, last_write = args.work / "verified_pairs.csv", time.monotonic()
    start_verified_pairs(pairs_path)

    def on_progress(inliers: np.ndarray, batch: list[int]) -> None:
        nonlocal last_write
        append_verified_pairs(pairs_path, [test_ids[q] for q in batch], db_ids, neighbours[batch], cosines[batch],
                              inliers[batch])
        if time.monotonic() - last_write >= args.write_every_s:
            write_submission(args.out, args.task, test_ids, rows_for(inliers))
            last_write = time.monotonic()

    inliers = rerank(model, args.data, args, timing, test_ids, db_split, db_ids, neighbours, query_ok,
                     min(depth, neighbours.shape[1]), on_progress)
    write_submission(args.out, args.task, test_ids, rows_for(inliers))
    log.info("submission written to %s; timings in %s", args.out, timing.path)


def global_nonlandmarks(model: DelgModel, args: argparse.Namespace, timing: Timing) -> np.ndarray:
    """Global descriptors of the readable --nonlandmark-dir images (none without the flag)."""
    if args.nonlandmark_dir is None:
        return np.zeros((0, model.global_dim), np.float32)
    if not args.nonlandmark_dir.is_dir():
        raise InputError(f"--nonlandmark-dir {args.nonlandmark_dir} is not a folder")
    paths = sorted(p for p in args.nonlandmark_dir.rglob("*") if p.is_file())
    ids = [str(p.relative_to(args.nonlandmark_dir)) for p in paths]
    cache = args.work / "global" / "nonlandmark"
    timed_global(model, ids, paths, cache, args, timing, "global_db")
    return compact_valid(*load_global(cache, ids, args.chunk_size, model.global_dim))[0]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
