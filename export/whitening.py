"""PCA whitening of the global descriptors, fitted at export time on training images and baked into the SavedModel.

The fit (numpy, float64) takes the per-scale global descriptors of a deterministic sample of the run's training
images: their mean, the principal axes of their covariance (eigenvalues λ, largest first), and per axis the scale
1/sqrt(λ + shrinkage · mean(λ)); optionally only the top `dim` axes are kept. Applied in the graph (PcaWhitening),
a descriptor x becomes L2-normalize((x - mean) · projection), with projection = axes · scales.

Shrinkage is a fraction of the mean eigenvalue and must be > 0: with fewer descriptors than dimensions (a tiny
training set) the trailing eigenvalues are ~0, and the shrinkage is what keeps their scale finite; those axes
then carry only what the training sample never varied, damped to the shrinkage's level.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image
from tqdm import tqdm

from common.cli import UserError
from common.gldv2 import image_path
from train.config import DELG_MAX_IMAGE_SIDE
from train.data import CLEAN_CSV, TRAIN_CSV, keep_clean, read_train_csv
from train.run_files import DATA_FILE, load_data_source

log = logging.getLogger(__name__)

DEFAULT_IMAGES = 5000  # training images the fit extracts (a seeded sample; all of them when fewer)
DEFAULT_SHRINKAGE = 0.1  # added to every eigenvalue, as a fraction of their mean
SAMPLE_SEED = 0  # the training sample is the same for every export of a run
COSINE_PAIRS = 10_000  # random image pairs of the sanity figure (mean cosine before / after)
NULL_AXIS = 1e-6  # an eigenvalue below this fraction of the largest is an axis the sample does not vary along


@dataclass(frozen=True)
class WhitenSettings:
    """How export fits the whitening (the --whiten-* flags)."""

    images: int = DEFAULT_IMAGES
    shrinkage: float = DEFAULT_SHRINKAGE
    dim: int | None = None  # keep the top dim axes; None keeps them all
    data: Path | None = None  # the training data folder; None: the one the run recorded


@dataclass(frozen=True)
class PcaFit:
    """mean [D] and projection [D, dim] (principal axes, each divided by sqrt(eigenvalue + shrinkage))."""

    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray  # [D], largest first, clipped at 0
    floor: float  # shrinkage · mean eigenvalue, added to each

    @property
    def dim(self) -> int:
        return self.projection.shape[1]


@dataclass(frozen=True)
class FittedWhitening:
    """A fit and what assets/export_info.json records about it."""

    fit: PcaFit
    info: dict


def fit_pca_whitening(descriptors: np.ndarray, shrinkage: float = DEFAULT_SHRINKAGE, dim: int | None = None) -> PcaFit:
    """The whitening of descriptors [N, D]; dim (default D) keeps the axes of the largest eigenvalues."""
    x = np.asarray(descriptors, np.float64)
    count, width = x.shape
    dim = width if dim is None else dim
    if not 1 <= dim <= width:
        raise ValueError(f"dim {dim}: must be in 1..{width}")
    if not (shrinkage > 0 and math.isfinite(shrinkage)):
        raise ValueError(f"shrinkage {shrinkage}: must be a finite number > 0")
    mean = x.mean(axis=0)
    centred = x - mean
    covariance = centred.T @ centred / max(1, count - 1)
    eigenvalues, axes = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, axes = np.clip(eigenvalues[order], 0.0, None), axes[:, order]
    axes *= np.where(axes[np.abs(axes).argmax(axis=0), np.arange(width)] < 0, -1.0, 1.0)  # a reproducible sign
    floor = shrinkage * eigenvalues.mean()
    if floor <= 0:
        raise ValueError(f"the {count} descriptors are all equal: nothing to whiten")
    projection = axes[:, :dim] / np.sqrt(eigenvalues[:dim] + floor)
    return PcaFit(mean.astype(np.float32), projection.astype(np.float32), eigenvalues, float(floor))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def whiten(descriptors: np.ndarray, fit: PcaFit) -> np.ndarray:
    """numpy's twin of PcaWhitening: L2-normalize((x - mean) · projection) over the last axis."""
    return l2_normalize((np.asarray(descriptors, np.float32) - fit.mean) @ fit.projection)


class PcaWhitening(tf.Module):
    """The fit as float32 variables saved with the model; calling it whitens [..., D] -> [..., dim], L2-normalized."""

    def __init__(self, fit: PcaFit):
        super().__init__(name="pca_whitening")
        self.mean = tf.Variable(fit.mean, trainable=False, name="mean")
        self.projection = tf.Variable(fit.projection, trainable=False, name="projection")
        self.dim = fit.dim

    def __call__(self, descriptors: tf.Tensor) -> tf.Tensor:
        centred = tf.cast(descriptors, tf.float32) - self.mean
        return tf.nn.l2_normalize(tf.tensordot(centred, self.projection, axes=1), axis=-1)


# --- The training sample ---


def training_folder(run_dir: Path, override: Path | None) -> Path:
    """--whiten-data when given, else the training data folder the run recorded; one-line errors otherwise."""
    if override is not None:
        return Path(override)
    source = load_data_source(run_dir)
    hint = "pass --whiten-data DIR (the folder holding train.csv and train/) or --no-whiten"
    if source is None:
        raise UserError(f"{run_dir}: the run does not record its training data ({DATA_FILE}); {hint}")
    if "data" not in source:
        raise UserError(
            f"{run_dir / DATA_FILE}: the run trained from TFRecords ({source.get('tfrecords')}), which "
            f"the whitening fit does not read; {hint}"
        )
    folder = Path(source["data"])
    if not (folder / TRAIN_CSV).is_file():
        raise UserError(f"{run_dir / DATA_FILE}: the run's training data {folder / TRAIN_CSV} is missing; {hint}")
    return folder


def sample_training_images(data_dir: Path, count: int) -> list[Path]:
    """Paths of `count` training images (train_clean.csv's when present) in a seeded random sample, file order."""
    if not (data_dir / TRAIN_CSV).is_file():
        raise UserError(f"--whiten-data {data_dir}: no {TRAIN_CSV} in it")
    table = read_train_csv(data_dir / TRAIN_CSV)
    if (data_dir / CLEAN_CSV).is_file():
        table = keep_clean(table, data_dir / CLEAN_CSV)
    if table.empty:
        raise UserError(f"{data_dir / TRAIN_CSV}: no training images to fit the whitening on")
    chosen = np.sort(np.random.default_rng(SAMPLE_SEED).permutation(len(table))[:count])
    return [image_path(data_dir, "train", image_id) for image_id in table["id"].iloc[chosen]]


def read_image(path: Path, max_side: int = DELG_MAX_IMAGE_SIDE) -> np.ndarray | None:
    """RGB uint8 [H,W,3] with the longer side capped at max_side, as the notebook feeds it; None when unreadable."""
    try:
        with Image.open(path) as image:
            factor = min(1.0, max_side / max(image.size))
            size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
            if factor < 1:
                image.draft("RGB", size)
            image = image.convert("RGB")
            return np.asarray(image if image.size == size else image.resize(size, Image.BILINEAR))
    except Exception as err:  # noqa: BLE001 - an unreadable image is skipped, never fatal
        log.warning("whitening: skipping unreadable image %s: %s", path, (str(err).splitlines() or ["?"])[0][:200])
        return None


def per_scale_descriptors(rows_of: Callable[[np.ndarray], np.ndarray], paths: list[Path]) -> np.ndarray:
    """rows_of(image) ([G, D] per-scale descriptors) for each readable image: [n, G, D]."""
    rows = []
    for path in tqdm(paths, desc="whitening: training images", unit="img", mininterval=2):
        image = read_image(path)
        if image is not None:
            rows.append(rows_of(image))
    if not rows:
        raise UserError(f"none of the {len(paths)} sampled training images could be read (first: {paths[0]})")
    return np.stack(rows).astype(np.float32)


# --- The fit and its record ---


def image_descriptors(rows: np.ndarray) -> np.ndarray:
    """Per-scale rows [n, G, D] -> the contract's image descriptor: rows L2-normalized, summed, L2-normalized."""
    return l2_normalize(l2_normalize(rows).sum(axis=1))


def mean_pair_cosine(descriptors: np.ndarray, pairs: int = COSINE_PAIRS) -> float:
    """Mean cosine between seeded random pairs of distinct rows of L2-normalized descriptors [n, D]."""
    count = len(descriptors)
    if count < 2:
        return float("nan")
    rng = np.random.default_rng(SAMPLE_SEED)
    first = rng.integers(0, count, pairs)
    second = (first + rng.integers(1, count, pairs)) % count
    return float((descriptors[first] * descriptors[second]).sum(axis=1).mean())


def fit_on_rows(rows: np.ndarray, settings: WhitenSettings) -> FittedWhitening:
    """The whitening of per-scale rows [n, G, D] and its record (dims, null axes, the sanity cosines)."""
    images, scales, width = rows.shape
    fit = fit_pca_whitening(rows.reshape(-1, width), settings.shrinkage, settings.dim)
    null_axes = int((fit.eigenvalues[: fit.dim] < NULL_AXIS * fit.eigenvalues[0]).sum())
    if null_axes:
        log.warning(
            "whitening: %d of the %d kept axes do not vary over the %d training descriptors; the "
            "shrinkage alone scales them (fit on more images, or keep fewer axes with --whiten-dim)",
            null_axes,
            fit.dim,
            images * scales,
        )
    before = mean_pair_cosine(image_descriptors(rows))
    after = mean_pair_cosine(image_descriptors(whiten(rows, fit)))
    info = {
        "applied": True,
        "images": images,
        "descriptors": images * scales,
        "shrinkage": settings.shrinkage,
        "input_dim": width,
        "dim": fit.dim,
        "null_axes": null_axes,
        "mean_pair_cosine_before": round(before, 4),
        "mean_pair_cosine_after": round(after, 4),
    }
    log.info(
        "whitening: %d images, %d -> %d dims, mean cosine between random pairs %.3f -> %.3f",
        images,
        width,
        fit.dim,
        before,
        after,
    )
    return FittedWhitening(fit, info)


def fit_whitening(
    run_dir: Path, settings: WhitenSettings, rows_of: Callable[[np.ndarray], np.ndarray], scales: tuple[float, ...]
) -> FittedWhitening:
    """Fit on the per-scale descriptors (rows_of, at `scales`) of a sample of the run's training images."""
    data_dir = training_folder(run_dir, settings.data)
    paths = sample_training_images(data_dir, settings.images)
    rows = per_scale_descriptors(rows_of, paths)
    fitted = fit_on_rows(rows, settings)
    info = {**fitted.info, "images_sampled": len(paths), "scales": list(scales), "data": str(data_dir)}
    return FittedWhitening(fitted.fit, info)


NOT_WHITENED = {"applied": False}
