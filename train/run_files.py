"""What a run folder holds, written down once: config, label map, checkpoints. Export reads it back."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import tensorflow as tf

from common.cli import UserError, atomic_write_text, check_writable_folder
from common.gldv2 import read_csv_strings
from train.config import TrainConfig, check_config
from train.precision import legacy_mixed_precision

CONFIG_FILE = "config.json"
LABEL_MAP_FILE = "label_map.csv"  # columns index,landmark_id: contiguous class index -> GLDv2 landmark id
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
DATA_FILE = "data.json"  # where the run's training data lives: {"data": DIR} or {"tfrecords": DIR}, absolute
# Config fields a resumed run may change: how long it trains and how often it logs, validates and checkpoints.
# Every other field shapes the model, the optimizer or the data stream the checkpoint belongs to.
RESUMABLE_FIELDS = frozenset(
    {"steps", "checkpoint_every", "validate_every", "log_every", "validate_on", "validate_task"}
)
# Fields that config.json files written before them lack, and the value those runs had.
FIELDS_ADDED_LATER = {
    "local_stride": 16,
    "init_from": "",
    "not_clean_weight": 0.0,
    "validate_on": "",
    "validate_task": "recognition",
}


def check_run_folder(run_dir: Path) -> None:
    """A UserError when run_dir, or a folder above it, exists as something other than a folder, or when run_dir
    (or, before it exists, the folder it would be made in) takes no new files."""
    for path in (Path(run_dir), *Path(run_dir).parents):
        if path.exists() and not path.is_dir():
            what = "the run folder" if path == Path(run_dir) else f"a folder of {run_dir}"
            raise UserError(f"{path} is a file, but it would be {what}; choose another --out")
    check_writable_folder("--out", Path(run_dir))


def read_json(path: Path) -> object:
    """A run file's JSON; a file that is not JSON is a UserError naming it."""
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise UserError(f"{path}: not a readable JSON file ({err}); is it a run folder the kit wrote?") from None


def save_config(run_dir: Path, cfg: TrainConfig) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_FILE, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def load_config(run_dir: Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing; is {run_dir} a training run folder?")
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise UserError(f"{path}: expected a JSON object of config fields, got {type(saved).__name__}")
    fields = {**FIELDS_ADDED_LATER, **upgrade_legacy_fields(saved)}
    known = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise UserError(f"{path}: unknown fields {unknown}")
    tuples = {name: tuple(value) for name, value in fields.items() if isinstance(value, list)}
    cfg = TrainConfig(**{**fields, **tuples})
    started_from = {"backbone_weights": "none"} if isinstance(cfg.backbone_weights, str) else {}
    try:  # the weights a run started from are in its checkpoints now: that file need not exist any more
        check_config(dataclasses.replace(cfg, **started_from))
    except UserError as err:  # it names the flag: say the value came from this file
        raise UserError(f"{path}: {err}") from None
    return cfg


def upgrade_legacy_fields(fields: dict) -> dict:
    """Replace fields of older config.json files by their successors (mixed_precision -> precision)."""
    if "mixed_precision" in fields:
        fields = dict(fields)
        fields["precision"] = legacy_mixed_precision() if fields.pop("mixed_precision") else "float32"
    return fields


def save_data_source(run_dir: Path, data_dir: Path | None, tfrecords: Path | None) -> None:
    """Record the training data folder (or TFRecord folder) the run reads, for export's whitening fit."""
    source = {"tfrecords": str(Path(tfrecords).resolve())} if tfrecords else {"data": str(Path(data_dir).resolve())}
    atomic_write_text(Path(run_dir) / DATA_FILE, json.dumps(source, indent=2) + "\n")


def load_data_source(run_dir: Path) -> dict[str, str] | None:
    """What save_data_source wrote, or None for a run trained before the kit recorded it."""
    path = Path(run_dir) / DATA_FILE
    return read_json(path) if path.is_file() else None


def save_label_map(run_dir: Path, landmark_ids: list[int]) -> None:
    """landmark_ids[i] is the GLDv2 landmark id of class index i."""
    frame = pd.DataFrame({"index": range(len(landmark_ids)), "landmark_id": landmark_ids})
    atomic_write_text(Path(run_dir) / LABEL_MAP_FILE, frame.to_csv(index=False))


def load_label_map(run_dir: Path) -> list[int]:
    path = Path(run_dir) / LABEL_MAP_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing; is {run_dir} a training run folder?")
    frame = read_csv_strings(path)
    expected = UserError(f"{path}: expected columns index,landmark_id with index 0..N-1 and integer landmark ids")
    if list(frame.columns) != ["index", "landmark_id"] or list(frame["index"]) != [str(i) for i in range(len(frame))]:
        raise expected
    if not frame["landmark_id"].str.fullmatch(r"-?\d+").all():
        raise expected
    return [int(x) for x in frame["landmark_id"]]


def check_resumable(run_dir: Path, cfg: TrainConfig, landmark_ids: list[int]) -> None:
    """A UserError when run_dir's saved config (RESUMABLE_FIELDS aside) or label map differs from the new one."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_FILE).is_file():
        saved, new = dataclasses.asdict(load_config(run_dir)), dataclasses.asdict(cfg)
        differing = [name for name in new if name not in RESUMABLE_FIELDS and saved[name] != new[name]]
        if differing:
            changes = ", ".join(f"{name} {saved[name]!r} -> {new[name]!r}" for name in differing)
            raise UserError(
                f"{run_dir / CONFIG_FILE}: cannot resume with a different config ({changes}); "
                f"only {', '.join(sorted(RESUMABLE_FIELDS))} may change; use another run folder"
            )
    if (run_dir / LABEL_MAP_FILE).is_file():
        saved_ids = load_label_map(run_dir)
        if saved_ids != list(landmark_ids):
            raise UserError(
                f"{run_dir / LABEL_MAP_FILE}: cannot resume on different data "
                f"({label_map_difference(saved_ids, list(landmark_ids))}); use another run folder"
            )


def label_map_difference(saved: list[int], new: list[int]) -> str:
    """One phrase on how two label maps differ (they are known to differ)."""
    if len(saved) != len(new):
        return f"{len(saved)} classes in the run, {len(new)} in the data"
    index = next(i for i, (a, b) in enumerate(zip(saved, new, strict=True)) if a != b)
    return f"class {index} is landmark {saved[index]} in the run, {new[index]} in the data"


def make_checkpoint(
    model: tf.keras.Model, optimizer=None, step: tf.Variable | None = None, data_position: tf.Variable | None = None
) -> tf.train.Checkpoint:
    """The checkpoint's object graph: model, and for training also optimizer, step, data-stream position and, for
    a model with dropout (EfficientNet's blocks), the states of its random generators, which Keras does not
    checkpoint with the model: without them a resumed run would drop other units than an uninterrupted one."""
    random_states = random_generator_states(model) if optimizer is not None else []
    parts = {
        "model": model,
        "optimizer": optimizer,
        "step": step,
        "data_position": data_position,
        "random_states": random_states or None,
    }
    return tf.train.Checkpoint(**{name: part for name, part in parts.items() if part is not None})


def random_generator_states(model: tf.keras.Model) -> list[tf.Variable]:
    """The state variables of the model's Keras random seed generators (dropout, stochastic depth)."""
    return [v.value for v in model.variables if v.path.endswith("seed_generator_state")]


def checkpoint_manager(checkpoint: tf.train.Checkpoint, run_dir: Path, keep: int = 3):
    return tf.train.CheckpointManager(checkpoint, str(Path(run_dir) / CHECKPOINT_DIR), max_to_keep=keep)


def has_plain_optimizer(prefix: str) -> bool:
    """Whether a training checkpoint holds its optimizer bare, as the kit saved it before every run's SGD went
    inside a LossScaleOptimizer (whose state sits under optimizer/inner_optimizer/). An unreadable checkpoint (a
    garbage ckpt-N.index) is a UserError naming it."""
    try:
        names = [name for name, _ in tf.train.list_variables(prefix)]
    except CHECKPOINT_ERRORS as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"{prefix}: not a readable checkpoint ({reason}); train with --no-resume or into another run folder"
        ) from None
    return any(name.startswith("optimizer/") for name in names) and not any(
        name.startswith("optimizer/inner_optimizer/") for name in names
    )


# What reading a checkpoint that does not fit the model raises (IndexError: a truncated file).
CHECKPOINT_ERRORS = (AssertionError, IndexError, ValueError, tf.errors.OpError)


def restore_checkpoint(checkpoint: tf.train.Checkpoint, prefix: str, problem: str, hint: str = ""):
    """Restore prefix into checkpoint with every object of it matched; returns the load status. Any failure is
    the one-line UserError 'PREFIX: PROBLEM: first line of the reason' followed by hint."""
    try:
        status = checkpoint.restore(prefix)
        status.assert_existing_objects_matched()
        return status
    except CHECKPOINT_ERRORS as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{prefix}: {problem}: {reason}{hint}") from None


def latest_checkpoint(run_dir: Path) -> str:
    """Path prefix of the newest checkpoint in run_dir; a UserError when there is none."""
    prefix = tf.train.latest_checkpoint(str(Path(run_dir) / CHECKPOINT_DIR))
    if prefix is None:
        raise UserError(f"{run_dir}: no checkpoint in {Path(run_dir) / CHECKPOINT_DIR}")
    return prefix
