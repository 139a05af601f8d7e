"""Retrieval through the labelled train set, for submission/main.py's global stage: label transfer ("bridged"
similarity) and the index-side hubness correction.

- Label transfer: each query and each index image gets a landmark distribution from its top-k train neighbours,
  the vote recognition uses (the neighbours' clamped cosines summed per landmark, here normalized to sum 1);
  a candidate's score becomes cos(q, i) + w * sum_l p_q(l) p_i(l). Retrieval 2021's 5th place reported its
  "bridged" test -> train -> index distances, 2nd place reranked by landmark labels.
- Hubness: cos(q, i) - lambda * the index image's mean cosine to its k nearest index images (itself left out):
  an image close to many others rises in every list, whether it shows the query's landmark or not.

The train set's descriptors come from the run's own global pass over --train-data, or from a file written
beforehand by `python -m export train-descriptors` (--train-descriptors); the file records the fingerprint of the
model it came from, and a file of another model is refused.

Shipped beside main.py (which imports it from its own folder).
"""

from __future__ import annotations

import hashlib
import logging
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from costs import Sizes, Work, bridge_products
from search import knn
from settings_cli import InputError
from store import ImageSet, global_settings, image_path, load_global, timed_global

if TYPE_CHECKING:  # the types of the files beside it, for the annotations only
    from budget import Timing
    from devices import Replicas
    from files import Inputs
    from settings import Extraction, Global, Settings

log = logging.getLogger("submission")

FINGERPRINT_FILES = ("saved_model.pb", "variables/variables.index")  # the graph, and every tensor's checksum
TRAIN_FILE_KEYS = ("descriptors", "labels", "ids", "model_fingerprint", "global_settings")
QUERY_BLOCK = 4096  # queries whose candidates' label similarities are computed at once
STOP_BLOCK = 65_536  # rows searched between two looks at the deadline


def model_fingerprint(model_dir: Path) -> str:
    """sha256 of a SavedModel's graph and variable index (which holds a checksum of every tensor): two exports
    with the same fingerprint give the same descriptors."""
    digest = hashlib.sha256()
    for name in FINGERPRINT_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class TrainSet(NamedTuple):
    """Global descriptors (unit rows) of labelled train images and their landmark ids."""

    descriptors: np.ndarray  # [n, D] float32
    labels: np.ndarray  # [n] int64


def train_file_labels(settings: Settings) -> np.ndarray | None:
    """The labels of --train-descriptors' file, checked against the run's model and global settings before anything
    is written (None without it); its descriptors stay on disk until the plans have run (load_train_descriptors)."""
    run = settings.run
    if run.train_descriptors is None:
        return None
    fingerprint, given = model_fingerprint(run.model[0]), global_settings(settings.extraction)
    return read_train_descriptors(run.train_descriptors, fingerprint, given, descriptors=False).labels


def load_train_descriptors(settings: Settings, given: Extraction, timing: Timing) -> TrainSet | None:
    """--train-descriptors' train set for the planned settings; the seconds it took are the global_train stage's.
    None without the file, or when the plan lowered the global settings from the `given` ones the file was checked
    against (the descriptors would no longer compare)."""
    run = settings.run
    if run.train_descriptors is None:
        return None
    if global_settings(given) != global_settings(settings.extraction):
        log.warning(
            "the plan lowered the global settings to %s: --train-descriptors was written with %s, so label transfer "
            "is off (write the file with these settings, or run with --plan fixed)",
            global_settings(settings.extraction),
            global_settings(given),
        )
        return None
    began = time.monotonic()
    train = read_train_descriptors(run.train_descriptors, model_fingerprint(run.model[0]))
    timing.add("global_train", len(train.labels), time.monotonic() - began)
    log.info("train set of %d images read from %s", len(train.labels), run.train_descriptors)
    return train


def write_train_descriptors(path: Path, train: TrainSet, ids: list[str], fingerprint: str, settings: dict) -> None:
    """The file --train-descriptors reads: the descriptors, labels and ids, the model's fingerprint and the global
    extraction settings they were made with."""
    with open(path, "wb") as out:
        np.savez(
            out,
            descriptors=train.descriptors.astype(np.float32),
            labels=train.labels.astype(np.int64),
            ids=np.array(ids, dtype=str),
            model_fingerprint=np.array(fingerprint),
            global_settings=np.array(repr(sorted(settings.items()))),
        )


def read_train_descriptors(
    path: Path, fingerprint: str, settings: dict | None = None, descriptors: bool = True
) -> TrainSet:
    """The train set of a --train-descriptors file, checked against the run's model and global settings (unless
    None); a file of another model or settings, or not such a file, is an InputError naming it. descriptors=False
    reads the labels only (the descriptors' array is then [n, 0])."""
    try:
        with np.load(path, allow_pickle=False) as found:
            missing = [key for key in TRAIN_FILE_KEYS if key not in found.files]
            if missing:
                raise InputError(
                    f"--train-descriptors {path}: not a file of `python -m export train-descriptors` "
                    f"(no {missing[0]!r})"
                )
            wanted = TRAIN_FILE_KEYS if descriptors else TRAIN_FILE_KEYS[1:]
            content = {key: found[key] for key in wanted}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"--train-descriptors {path}: cannot read it as a .npz file ({err})") from None
    if str(content["model_fingerprint"]) != fingerprint:
        raise InputError(
            f"--train-descriptors {path} was written from another model (fingerprint "
            f"{str(content['model_fingerprint'])[:12]}, this --model's is {fingerprint[:12]}): write it again with "
            "`python -m export train-descriptors --model` of this model"
        )
    if settings is not None and str(content["global_settings"]) != repr(sorted(settings.items())):
        raise InputError(
            f"--train-descriptors {path} was written with other global settings ({content['global_settings']}): "
            "write it again with this run's --global-scale-indices / --global-max-side / --global-precision"
        )
    labels = content["labels"].astype(np.int64)
    rows = content["descriptors"].astype(np.float32) if descriptors else np.zeros((len(labels), 0), np.float32)
    if rows.ndim != 2 or len(labels) != len(rows):
        raise InputError(f"--train-descriptors {path}: descriptors and labels do not match ({rows.shape})")
    return TrainSet(rows, labels)


def train_pass(model: Replicas, cache: Path, inputs: Inputs, settings: Settings, timing: Timing) -> list:
    """--train-data's global pass with one model, cached in cache/train_set: [(descriptors, ok)], or [] without
    --train-data or with label transfer off."""
    run = settings.run
    if not inputs.train_ids or not settings.global_stage.bridge_weight:
        return []
    paths = [image_path(run.train_data, "train", i) for i in inputs.train_ids]
    train = ImageSet(inputs.train_ids, paths, cache / "train_set")
    cut = timed_global(model, train, settings.extraction, run, timing, "global_train", stop=timing.past_deadline)
    return [load_global(train.cache, train.ids, run.chunk_size, model.global_dim, allow_missing=cut)]


# Label transfer
class LabelVotes(NamedTuple):
    """Each image's landmark distribution as its top-k train neighbours' labels and weights (summing to 1; a
    landmark seen twice sums its two weights)."""

    labels: np.ndarray  # [n, k] int64
    weights: np.ndarray  # [n, k] float32


def label_votes(cosines: np.ndarray, rows: np.ndarray, train_labels: np.ndarray) -> LabelVotes:
    """The distribution from each image's train neighbours (cosines [n, k] descending, rows [n, k]): clamped
    cosines, normalized; an image with no positive cosine gets weight 0 everywhere."""
    weights = np.maximum(cosines, 0).astype(np.float32)
    total = weights.sum(axis=1, keepdims=True)
    return LabelVotes(train_labels[rows], np.where(total > 0, weights / np.maximum(total, 1e-12), 0))


def label_similarity(queries: LabelVotes, db: LabelVotes, candidates: np.ndarray) -> np.ndarray:
    """sum_l p_q(l) p_i(l) of every query and its candidates (database rows [nq, K]): [nq, K]."""
    out = np.zeros(candidates.shape, np.float32)
    for start in range(0, len(candidates), QUERY_BLOCK):
        rows = slice(start, start + QUERY_BLOCK)
        q_labels, q_weights = queries.labels[rows], queries.weights[rows]  # [b, k]
        c_labels, c_weights = db.labels[candidates[rows]], db.weights[candidates[rows]]  # [b, K, k]
        same = q_labels[:, None, :, None] == c_labels[:, :, None, :]  # [b, K, k, k]
        out[rows] = np.einsum("bKac,ba,bKc->bK", same, q_weights, c_weights, optimize=True)
    return out


def blocked_knn(queries: np.ndarray, database: np.ndarray, k: int, block_mb: int, stop: Callable[[], bool]):
    """knn in blocks of STOP_BLOCK query rows, stop() asked before each: (cosines, rows), or None when it stopped."""
    parts = []
    for start in range(0, len(queries), STOP_BLOCK):
        if stop():
            return None
        parts.append(knn(queries[start : start + STOP_BLOCK], database, k, block_mb))
    k = min(k, len(database))
    empty = (np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
    return tuple(np.concatenate(part) for part in zip(*parts, strict=True)) if parts else empty


def train_votes(descriptors: np.ndarray, train: TrainSet, k: int, block_mb: int, stop: Callable[[], bool]):
    """label_votes of these rows from their k nearest train images (None when stop() cut the search)."""
    found = blocked_knn(descriptors, train.descriptors, k, block_mb, stop)
    return None if found is None else label_votes(*found, train.labels)


# Hubness
def hubness(db: np.ndarray, k: int, block_mb: int, stop: Callable[[], bool] = lambda: False) -> np.ndarray | None:
    """Each database row's mean cosine to its k nearest other rows (0 for a database of one row; None when stop()
    cut the search)."""
    if len(db) < 2:
        return np.zeros(len(db), np.float32)
    found = blocked_knn(db, db, min(k + 1, len(db)), block_mb, stop)
    if found is None:
        return None
    cosines, rows = found
    itself = rows == np.arange(len(db))[:, None]
    others = np.where(itself, 0, cosines)
    # each row's k best others: its own entry is dropped where found, else the (k+1)-th
    counted = np.where(itself.any(axis=1), others.sum(axis=1), others[:, :-1].sum(axis=1))
    return (counted / max(1, rows.shape[1] - 1)).astype(np.float32)


# The reranking
class BridgeScores(NamedTuple):
    """What the reranking adds to each candidate's cosine."""

    label_weight: float  # w
    hubness_weight: float  # lambda


def reranked(
    cosines: np.ndarray,
    rows: np.ndarray,
    similarity: np.ndarray | None,
    db_hubness: np.ndarray | None,
    weights: BridgeScores,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates reordered by cos + w * label similarity - lambda * hubness (the parts given), that score
    theirs; ties keep the global order."""
    score = cosines.astype(np.float32).copy()
    if similarity is not None:
        score += weights.label_weight * similarity
    if db_hubness is not None:
        score -= weights.hubness_weight * db_hubness[rows]
    order = np.argsort(-score, axis=1, kind="stable")
    return np.take_along_axis(score, order, 1), np.take_along_axis(rows, order, 1)


def bridge_depth(stage: Global, task: str) -> int:
    """Candidates searched per query for label transfer and hubness to rescore (0 when both are off)."""
    on = task == "retrieval" and (stage.bridge_weight > 0 or stage.hubness_weight > 0)
    return stage.bridge_m if on else 0


def bridge_rerank(
    queries: np.ndarray,
    db: np.ndarray,
    candidates: tuple[np.ndarray, np.ndarray],
    train: TrainSet | None,
    settings: Settings,
    timing: Timing,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates (cosines, database rows) rescored by label transfer (with a train set) and hubness, as the
    settings ask, and cut to the first k; the products are the bridge stage's. A part the deadline cuts is left
    out (logged), so the run goes on to its submission."""
    stage, block_mb, stop = settings.global_stage, settings.run.knn_block_mb, timing.past_deadline
    cosines, rows = candidates
    if not bridge_depth(stage, settings.run.task):
        return cosines[:, :k], rows[:, :k]
    began = time.monotonic()
    bridging = bool(stage.bridge_weight) and train is not None and len(train.labels) > 0
    if stage.bridge_weight and not bridging:
        log.info("label transfer off: no train set (give --train-data or --train-descriptors)")
    similarity = hub = None
    if bridging:
        votes = [train_votes(x, train, stage.bridge_k, block_mb, stop) for x in (queries, db)]
        similarity = None if None in votes else label_similarity(*votes, rows)
    if stage.hubness_weight:
        hub = hubness(db, stage.hubness_k, block_mb, stop)
    for part, cut in (
        ("label transfer", bridging and similarity is None),
        ("hubness", stage.hubness_weight and hub is None),
    ):
        if cut:
            log.warning("%s cut by the deadline: the candidates keep their order without it", part)
    cosines, rows = reranked(cosines, rows, similarity, hub, BridgeScores(stage.bridge_weight, stage.hubness_weight))
    work = Work(bridge=similarity is not None, hubness=hub is not None)
    sizes = Sizes(len(db), len(queries), 0, len(train.labels) if similarity is not None else 0)
    timing.add("bridge", bridge_products(sizes, work), time.monotonic() - began)
    return cosines[:, :k], rows[:, :k]
