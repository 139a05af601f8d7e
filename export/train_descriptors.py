"""`python -m export train-descriptors`: the global descriptors and landmark ids of a labelled train set, written
once for submission/main.py's --train-descriptors (retrieval's label transfer), so the notebook need not pass over
the train set itself. The file records the fingerprint of the model it came from and the global settings it was
extracted with; the notebook refuses a file of another model.
"""

from __future__ import annotations

import dataclasses
import logging
import zipfile
from pathlib import Path

import numpy as np

from common.cli import UserError, atomic_write, partial_dir
from common.kit import load_submission, sibling

log = logging.getLogger("export")


def check_npz_out(out: Path, overwrite: bool) -> None:
    """--out: a new file, or with --overwrite a train-descriptors file this command wrote."""
    if out.is_dir():
        raise UserError(f"--out {out}: a folder; give the path of the .npz file to write")
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it or choose another path")
    try:
        with np.load(out, allow_pickle=False) as found:
            ours = "model_fingerprint" in found.files
    except (OSError, ValueError, zipfile.BadZipFile):
        ours = False
    if not ours:
        raise UserError(
            f"--out {out} exists and is no train-descriptors file of this kit; --overwrite replaces only "
            "the kit's own outputs: choose another path"
        )


def export_train_descriptors(model: Path, data: Path, out: Path, settings_file: Path | None = None) -> str:
    """Extract the global descriptors of DATA's train.csv images with the notebook's own global pass (its
    extraction settings, or a settings file's) and write them with their labels to OUT; returns a summary."""
    script = load_submission()
    bridge = sibling("bridge")
    with partial_dir(out) as scratch:
        argv = ["--task", "retrieval", "--data", str(data), "--model", str(model), "--work", str(scratch)]
        settings = script.parse_settings(argv + (["--settings", str(settings_file)] if settings_file else []))
        extraction = settings.extraction
        if extraction.global_xla == "auto":  # as the notebook's fixed plan takes it
            extraction = dataclasses.replace(extraction, global_xla="off")
        ids, labels = script.read_train_labels(data)
        if not ids:
            raise UserError(f"{data / 'train.csv'} lists no images")
        model_ = script.load_models(settings.run, extraction).global_models[0]
        paths = [script.image_path(data, "train", i) for i in ids]
        script.extract_global(model_, ids, paths, scratch / "train", extraction, settings.run)
        descriptors, ok = script.load_global(scratch / "train", ids, settings.run.chunk_size, model_.global_dim)
        kept = np.flatnonzero(ok)
        train = bridge.TrainSet(descriptors[kept], labels[kept])
        fingerprint = bridge.model_fingerprint(model)
        global_settings = sibling("store").global_settings(extraction)
        atomic_write(
            out,
            lambda tmp: bridge.write_train_descriptors(
                tmp, train, [ids[i] for i in kept], fingerprint, global_settings
            ),
        )
    return (
        f"{out}: {len(kept)} of {len(ids)} train images ({len(np.unique(train.labels))} landmarks), "
        f"{descriptors.shape[1]}-d, model {model} (fingerprint {fingerprint[:12]})"
    )
