"""The Kaggle retrieval SavedModel: serving_default(input_image uint8 [H,W,3]) -> {'global_descriptor': [D]}.

The retrieval competitions (2020, 2021) take the model itself as the submission: a zip whose root holds
saved_model.pb and variables/. The server runs it on every query and index image, L2-distance kNN on
the descriptors, and scores mAP@100. Our descriptor is the sum of the per-scale descriptors at
RETRIEVAL_SCALES, L2-normalized, all inside the graph; with PCA whitening (the default of `export retrieval`,
fitted on the training images at those scales) each per-scale descriptor is whitened and L2-normalized first.
The server gets no database to fit it on, so it has to be inside.

An ensemble (several runs) is one SavedModel with the same contract: each run's descriptor (as above) is
L2-normalized, multiplied by its weight, and the weighted descriptors are concatenated and L2-normalized, as
submission/main.py combines `--model A --model B --model-weights ...`; D is the sum of the runs' dimensions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import tensorflow as tf

from common.cli import UserError, partial_dir
from export.delg import (
    GLOBAL_BATCH_OUTPUT,
    SAVE_OPTIONS,
    BatchedGlobal,
    fit_model_whitening,
    load_trained_model,
    serving_module,
)
from export.whitening import PcaWhitening, WhitenSettings
from train.config import RETRIEVAL_SCALES
from train.model import DelgModel

log = logging.getLogger(__name__)

# No official number was found for the 2020/2021 retrieval model zip; 500 MB leaves room for an R101 at
# 2048 dimensions (~180 MB) and is a sane upload. Raise it with --max-mb if the year's rules allow more.
DEFAULT_MAX_MB = 500.0


SIGNATURE = [tf.TensorSpec([None, None, 3], tf.uint8, name="input_image")]
OUTPUT = "global_descriptor"


def retrieval_serve(
    model: DelgModel, scales: tuple[float, ...] = RETRIEVAL_SCALES, whitening: PcaWhitening | None = None
):
    """input_image -> {'global_descriptor': sum of the per-scale descriptors at `scales`, L2-normalized}.

    The DELG export's global_batch on a batch of one, without XLA (the server's TensorFlow and device are unknown).
    """
    batched = BatchedGlobal(model, whitening=whitening)

    def serve(input_image):
        out = batched.serve(input_image[None], tf.constant(scales, tf.float32))
        return {OUTPUT: out[GLOBAL_BATCH_OUTPUT][0]}

    return serve


def ensemble_serve(members: Sequence[tf.Module], weights: Sequence[float]):
    """input_image -> {'global_descriptor': each member's descriptor L2-normalized, times its weight, concatenated,
    L2-normalized}: submission/main.py's combination of an ensemble's descriptors."""

    def serve(input_image):
        parts = [
            weight * tf.nn.l2_normalize(member.serve(input_image)[OUTPUT], axis=0)
            for member, weight in zip(members, weights, strict=True)
        ]
        return {OUTPUT: tf.nn.l2_normalize(tf.concat(parts, axis=0), axis=0)}

    return serve


def retrieval_member(run_dir: Path, dim: int | None, whiten: WhitenSettings | None) -> tf.Module:
    """One run's retrieval module (serve and the variables it reads), whitened with `whiten` when given."""
    model = load_trained_model(run_dir)
    fitted = fit_model_whitening(model, run_dir, whiten_to_dim(model, dim, whiten), RETRIEVAL_SCALES)
    pca = None if fitted is None else PcaWhitening(fitted.fit)
    member = serving_module(model, retrieval_serve(model, whitening=pca), SIGNATURE, pca)
    log.info("%s: %d-dimensional descriptor", run_dir, descriptor_dim(member))
    return member


def descriptor_dim(module: tf.Module) -> int:
    """D of a retrieval module's [D] output (traces its serve once)."""
    return int(module.serve.get_concrete_function().structured_outputs[OUTPUT].shape[0])


def retrieval_module(members: Sequence[tf.Module], weights: Sequence[float]) -> tf.Module:
    """The module to save: the one member as it is, or the members' weighted ensemble."""
    if len(members) == 1:
        return members[0]
    module = tf.Module()
    module.members = list(members)
    module.serve = tf.function(ensemble_serve(members, weights), input_signature=SIGNATURE)
    log.info(
        "ensemble of %d runs, weights %s: %d-dimensional descriptor",
        len(members),
        " ".join(f"{weight:g}" for weight in weights),
        descriptor_dim(module),
    )
    return module


def whiten_to_dim(model: DelgModel, dim: int | None, whiten: WhitenSettings | None) -> WhitenSettings | None:
    """The whitening settings that give a --dim descriptor: a smaller --dim is the PCA whitening's reduction;
    without whitening, or above the trained embedding_dim, a different --dim is refused rather than cut or padded."""
    trained = model.cfg.embedding_dim
    if dim is None or (whiten is None and dim == trained):
        return whiten
    if whiten is None or dim > trained:
        reduce = " or keep the PCA whitening (no --no-whiten), which can reduce it" if dim < trained else ""
        raise UserError(
            f"--dim {dim}: this run was trained with embedding_dim {trained}; truncating or "
            f"padding a descriptor would change its meaning, so train with "
            f"--embedding-dim {dim} instead{reduce} (or pass --dim {trained})"
        )
    if whiten.dim is not None and whiten.dim != dim:
        raise UserError(f"--dim {dim} and --whiten-dim {whiten.dim} disagree; give one of them")
    return dataclasses.replace(whiten, dim=dim)


def zip_saved_model(saved_model_dir: Path, zip_path: Path) -> None:
    """Zip a SavedModel folder with its files at the archive root, as the Kaggle server unpacks it."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(saved_model_dir.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(saved_model_dir).as_posix())


def export_retrieval(
    run_dirs: Sequence[Path],
    out_zip: Path,
    dim: int | None = None,
    max_mb: float = DEFAULT_MAX_MB,
    overwrite: bool = False,
    whiten: WhitenSettings | None = None,
    weights: Sequence[float] | None = None,
) -> float:
    """Write the retrieval SavedModel zip of one run, or of several runs' ensemble (`weights`: one per run, default
    all 1); returns its size in MB. Refuses a zip larger than max_mb. With `whiten`, PCA whitening fitted on each
    run's training images at RETRIEVAL_SCALES is inside the model."""
    out_zip = Path(out_zip)
    if out_zip.exists() and not overwrite:
        raise UserError(f"{out_zip} already exists; remove it or choose another output path")
    if dim is not None and len(run_dirs) > 1:
        raise UserError(
            f"--dim {dim} sets one run's descriptor size; an ensemble's is the sum of its runs': "
            f"reduce each run's with --whiten-dim instead"
        )
    weights = tuple(weights or (1.0,) * len(run_dirs))
    members = [retrieval_member(run_dir, dim, whiten) for run_dir in run_dirs]
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    with partial_dir(out_zip) as tmp:  # a killed export's folder is removed by the next one
        module = retrieval_module(members, weights)
        tf.saved_model.save(
            module, str(tmp / "model"), signatures={"serving_default": module.serve}, options=SAVE_OPTIONS
        )
        partial = tmp / "model.zip"
        zip_saved_model(tmp / "model", partial)
        size_mb = partial.stat().st_size / 2**20
        if size_mb > max_mb:
            raise UserError(f"{out_zip}: the zip would be {size_mb:.1f} MB, over the --max-mb limit of {max_mb} MB")
        os.replace(partial, out_zip)
    log.info("wrote %s (%.1f MB, limit %g MB)", out_zip, size_mb, max_mb)
    return size_mb
