"""Training data: a GLDv2 / Kaggle folder read into a table, and the tf.data pipelines DELG trains on.

The training stream is a pure function of (seed, position): epoch e visits the images in a permutation
seeded by (seed, e), and the augmentation of the element at stream position k is seeded by (seed, k).
A resumed run therefore continues the exact stream it was checkpointed in, from `start`.
Each element carries its position, so images dropped as unreadable show up as gaps and are counted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from common.cli import UserError
from common.gldv2 import ID_PATTERN, image_path, read_csv_strings
from train.config import TrainConfig

log = logging.getLogger(__name__)

TRAIN_CSV = "train.csv"
CLEAN_CSV = "train_clean.csv"
EPOCHS_FOREVER = 2**62
MIN_LANDMARKS = 2  # with one class, ArcFace and the attention loss are 0 and nothing learns
INTEGER = re.compile(r"-?\d+")  # a landmark_id as train.csv writes it


@dataclass(frozen=True)
class Examples:
    """Images and their contiguous class indices; landmark_ids[i] is the GLDv2 id of class i."""

    train: pd.DataFrame  # columns: id, path, label, weight (the image's weight in the loss)
    validation: pd.DataFrame  # same columns
    landmark_ids: list[int]


def read_train_csv(path: Path) -> pd.DataFrame:
    """train.csv (id,landmark_id or id,url,landmark_id) -> DataFrame id, landmark_id, checked row by row."""
    if not path.is_file():
        raise UserError(f"{path}: missing; expected a GLDv2/Kaggle folder with train.csv and train/")
    table = read_csv_strings(path)
    missing = {"id", "landmark_id"} - set(table.columns)
    if missing:
        raise UserError(f"{path}: missing columns {sorted(missing)}; expected id,landmark_id or id,url,landmark_id")
    for line, (image_id, text) in enumerate(zip(table["id"], table["landmark_id"], strict=True), start=2):
        if not ID_PATTERN.match(image_id):
            raise UserError(f"{path}, line {line}: id {image_id!r} is not 16 hex digits")
        if not is_int64(text):
            raise UserError(
                f"{path}, line {line}: id {image_id}: landmark_id {text!r} is not an integer "
                "(digits only, at most 2^63-1)"
            )
    if table["id"].duplicated().any():
        raise UserError(f"{path}: id {table['id'][table['id'].duplicated()].iloc[0]} appears more than once")
    return pd.DataFrame({"id": table["id"], "landmark_id": table["landmark_id"].astype(np.int64)})


def is_int64(text: str) -> bool:
    """Whether text is written as an integer (no exponent, no point, no inf) that a 64-bit label map holds."""
    return INTEGER.fullmatch(text) is not None and -(2**63) <= int(text) < 2**63


def keep_clean(table: pd.DataFrame, clean_csv: Path) -> pd.DataFrame:
    """Only the images listed in train_clean.csv (export's whitening fit reads the clean set)."""
    return weigh_by_clean_list(table, clean_csv, not_clean_weight=0.0)


def weigh_by_clean_list(table: pd.DataFrame, clean_csv: Path, not_clean_weight: float) -> pd.DataFrame:
    """The images listed in train_clean.csv (landmark_id,images with space-separated ids) weigh 1 in the loss, the
    others not_clean_weight; at 0 they are left out (the clean set alone)."""
    clean = read_csv_strings(clean_csv)
    if set(clean.columns) != {"landmark_id", "images"}:
        raise UserError(f"{clean_csv}: expected columns landmark_id,images")
    clean_ids = {image_id for images in clean["images"] for image_id in images.split()}
    is_clean = table["id"].isin(clean_ids)
    if not_clean_weight == 0:
        log.info("%s: keeping %d of %d train images", clean_csv, int(is_clean.sum()), len(table))
        return table[is_clean].reset_index(drop=True)
    log.info(
        "%s: %d of %d train images are clean; the others weigh %g in the loss",
        clean_csv,
        int(is_clean.sum()),
        len(table),
        not_clean_weight,
    )
    return table.assign(weight=np.where(is_clean, 1.0, not_clean_weight).astype(np.float32))


def drop_missing(table: pd.DataFrame, data_dir: Path) -> pd.DataFrame:
    """Add each image's path; rows whose file is missing are logged and dropped."""
    paths = [str(image_path(data_dir, "train", image_id)) for image_id in table["id"]]
    exists = np.array([Path(p).is_file() for p in paths], dtype=bool)
    if not exists.any():
        raise UserError(f"{data_dir / 'train'}: none of the {len(table)} images in {TRAIN_CSV} exist")
    if not exists.all():
        missing = table["id"][~exists]
        log.warning(
            "%d of %d train images are missing and skipped (first: %s)",
            len(missing),
            len(table),
            ", ".join(missing.iloc[:5]),
        )
    return table.assign(path=paths)[exists].reset_index(drop=True)


def split_by_image(table: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded random share of the images (at least one when fraction > 0) goes to validation."""
    count = 0 if fraction <= 0 else max(1, round(fraction * len(table)))
    if count >= len(table):
        raise UserError(f"validation_fraction {fraction} leaves no training images out of {len(table)}")
    order = np.random.default_rng(seed).permutation(len(table))
    return (
        table.iloc[np.sort(order[count:])].reset_index(drop=True),
        table.iloc[np.sort(order[:count])].reset_index(drop=True),
    )


def check_landmark_count(count: int, source: str) -> None:
    """Training needs at least MIN_LANDMARKS classes: with one, every loss is 0 and validation is trivially right."""
    if count < MIN_LANDMARKS:
        raise UserError(
            f"{source}: {count} landmark{'' if count == 1 else 's'} to train on; at least "
            f"{MIN_LANDMARKS} landmarks are needed (with one, every loss is 0 and nothing learns)"
        )


def read_examples(data_dir: Path, validation_fraction: float, seed: int, not_clean_weight: float = 0.0) -> Examples:
    """A GLDv2/Kaggle folder -> train/validation tables with contiguous labels and loss weights: with
    train_clean.csv, its images weigh 1 and the others not_clean_weight (left out at 0); without it, all weigh 1."""
    data_dir = Path(data_dir)
    table = read_train_csv(data_dir / TRAIN_CSV).assign(weight=np.float32(1.0))
    if (data_dir / CLEAN_CSV).is_file():
        table = weigh_by_clean_list(table, data_dir / CLEAN_CSV, not_clean_weight)
    elif not_clean_weight:
        log.warning(
            "--not-clean-weight %g: %s has no %s, so every image is clean and weighs 1",
            not_clean_weight,
            data_dir,
            CLEAN_CSV,
        )
    table = drop_missing(table, data_dir)
    landmark_ids = sorted(int(x) for x in table["landmark_id"].unique())
    index_of = {landmark_id: index for index, landmark_id in enumerate(landmark_ids)}
    table = table.assign(label=table["landmark_id"].map(index_of).astype(np.int64))
    train, validation = split_by_image(table[["id", "path", "label", "weight"]], validation_fraction, seed)
    check_landmark_count(train["label"].nunique(), f"{data_dir / TRAIN_CSV} (validation images set aside)")
    log.info(
        "%s: %d train and %d validation images of %d landmarks",
        data_dir,
        len(train),
        len(validation),
        len(landmark_ids),
    )
    return Examples(train, validation, landmark_ids)


# ---------------------------------------------------------------------------------------------------------
# Decoding and augmentation (one image at a time, inside tf.data)


def image_shape(encoded: tf.Tensor) -> tf.Tensor:
    """[height, width] of an encoded image, read from the JPEG header when it is one."""
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.extract_jpeg_shape(encoded)[:2],
        lambda: tf.shape(tf.io.decode_image(encoded, channels=3, expand_animations=False))[:2],
    )


def decode_window(encoded: tf.Tensor, offset: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Decode only the window [offset, offset+size) (JPEGs decode just that part): uint8 [h,w,3]."""
    window = tf.concat([offset, size], axis=0)

    def decode_other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([size, [3]], 0))

    return tf.cond(
        tf.io.is_jpeg(encoded), lambda: tf.io.decode_and_crop_jpeg(encoded, window, channels=3), decode_other
    )


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Any uint8 image -> uint8 [size,size,3] (aspect not kept, as DELG trains)."""
    resized = tf.image.resize(image, [size, size], antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def augment(encoded: tf.Tensor, seed: tf.Tensor, cfg: TrainConfig) -> tf.Tensor:
    """DELG's training view: a random crop of crop_min_area..100% of the area, resized, maybe flipped."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    offset, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([image_shape(encoded), [3]], 0),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=crop_seed,
        min_object_covered=0.0,
        aspect_ratio_range=cfg.crop_aspect_range,
        area_range=(cfg.crop_min_area, 1.0),
        max_attempts=20,
        use_image_if_no_bounding_boxes=True,
    )
    image = resize(decode_window(encoded, offset[:2], size[:2]), cfg.image_size)
    return tf.image.stateless_random_flip_left_right(image, flip_seed) if cfg.flip else image


def plain_view(encoded: tf.Tensor, cfg: TrainConfig) -> tf.Tensor:
    """The validation view: the whole image resized."""
    return resize(tf.io.decode_image(encoded, channels=3, expand_animations=False), cfg.image_size)


# ---------------------------------------------------------------------------------------------------------
# Pipelines


@dataclass(frozen=True)
class EpochSource:
    """The training images, epoch by epoch, in two parts so that a resumed stream skips without reading.

    items(epoch) is a dataset of cheap references (a path, a serialized record), shuffled for that epoch;
    load(item) reads or parses one into (encoded image bytes, label) or (bytes, label, loss weight); without a
    weight the image weighs 1. training_stream applies load after
    skipping to its start, so the items before it are never read.
    """

    items: Callable[[tf.Tensor], tf.data.Dataset]
    load: Callable[[Any], tuple[tf.Tensor, tf.Tensor]]


def read_image_file(path_and_label: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """(path, label) -> (the file's bytes, label)."""
    path, label = path_and_label
    return tf.io.read_file(path), label


def read_weighted_image_file(item: tuple[tf.Tensor, tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, ...]:
    """(path, label, weight) -> (the file's bytes, label, weight)."""
    path, label, weight = item
    return tf.io.read_file(path), label, weight


def folder_epoch_source(
    paths: list[str], labels: list[int], seed: int, weights: list[float] | None = None
) -> EpochSource:
    """Epoch e lists the (path, label, loss weight) triples in a permutation seeded by (seed, e)."""
    paths_t, labels_t = tf.constant(paths), tf.constant(labels, tf.int64)
    weights_t = tf.constant(np.ones(len(paths)) if weights is None else weights, tf.float32)

    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(tf.range(len(paths)), seed=tf.stack([seed, e]))
        return tf.data.Dataset.from_tensor_slices(tuple(tf.gather(t, order) for t in (paths_t, labels_t, weights_t)))

    return EpochSource(items=epoch, load=read_weighted_image_file)


def training_stream(source: EpochSource, epoch_size: int, cfg: TrainConfig, start: int = 0) -> tf.data.Dataset:
    """Endless batches {'image' uint8, 'label', 'weight', 'position'} from stream position `start` on.

    Unreadable images are dropped (never an error); they show as gaps in 'position'.
    """
    first_epoch = start // epoch_size
    epochs = tf.data.Dataset.range(first_epoch, EPOCHS_FOREVER).flat_map(source.items)
    positions = tf.data.Dataset.range(first_epoch * epoch_size, 2**62)
    stream = tf.data.Dataset.zip(positions, epochs).skip(start - first_epoch * epoch_size)

    def example(position, item):
        encoded, label, *weight = source.load(item)
        image = augment(encoded, tf.stack([tf.cast(cfg.seed, tf.int64), position]), cfg)
        weight = weight[0] if weight else tf.constant(1.0)
        return {"image": image, "label": label, "weight": weight, "position": position}

    return finish(
        stream.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True),
        cfg.batch_size,
        drop_remainder=True,
    )


def validation_stream(encoded_and_labels: tf.data.Dataset, cfg: TrainConfig) -> tf.data.Dataset:
    """Finite batches {'image', 'label'} of the plain validation views; unreadable images dropped."""

    def example(encoded, label):
        return {"image": plain_view(encoded, cfg), "label": label}

    return finish(
        encoded_and_labels.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True),
        cfg.batch_size,
        drop_remainder=False,
    )


def finish(examples: tf.data.Dataset, batch_size: int, drop_remainder: bool) -> tf.data.Dataset:
    """Drop unreadable examples (logged by tf.data), batch, prefetch.

    Under a multi-worker strategy each worker takes its share of every global batch (tf.data's DATA sharding),
    as the replicas of one machine do: every worker walks the same stream, so its positions stay common."""
    examples = examples.ignore_errors(log_warning=True)
    batches = examples.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return batches.with_options(options)


def folder_validation_files(table: pd.DataFrame) -> tf.data.Dataset:
    files = tf.data.Dataset.from_tensor_slices((list(table["path"]), np.asarray(table["label"], np.int64)))
    return files.map(lambda path, label: read_image_file((path, label)))


@dataclass(frozen=True)
class TrainingData:
    """What the loop needs from a data source, whether a GLDv2 folder or TFRecord shards."""

    landmark_ids: list[int]
    train_count: int
    validation_count: int
    epoch_source: EpochSource
    validation_files: Callable[[], tf.data.Dataset]  # -> (encoded bytes, label), in a fixed order
    class_counts: list[int] | None = None  # training images of each class (dynamic margins); None: not known


def folder_data(data_dir: Path, cfg: TrainConfig) -> TrainingData:
    """TrainingData read straight from a GLDv2/Kaggle folder."""
    examples = read_examples(data_dir, cfg.validation_fraction, cfg.seed, cfg.not_clean_weight)
    train = examples.train
    return TrainingData(
        landmark_ids=examples.landmark_ids,
        train_count=len(train),
        validation_count=len(examples.validation),
        epoch_source=folder_epoch_source(list(train["path"]), list(train["label"]), cfg.seed, list(train["weight"])),
        validation_files=lambda: folder_validation_files(examples.validation),
        class_counts=class_counts(examples.train["label"], len(examples.landmark_ids)),
    )


def class_counts(labels, num_classes: int) -> list[int]:
    """The number of images of each class index 0..num_classes-1."""
    return np.bincount(np.asarray(labels, np.int64), minlength=num_classes).tolist()
