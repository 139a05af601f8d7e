"""Sharded TFRecords of a GLDv2 folder (the form TPU training reads), and reading them back.

`python -m train.tfrecords --data DIR --out DIR --shards N` writes train-XXXXX-of-YYYYY.tfrecord and
validation-XXXXX-of-YYYYY.tfrecord (image bytes as stored, contiguous label, GLDv2 ids), the label map
and info.json with the counts. The train/validation split is fixed here, at writing time.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from common.cli import KitArgumentParser, UserError, atomic_output_dir, atomic_write_text, check_not_an_input, run_main
from train.config import TrainConfig
from train.data import EpochSource, TrainingData, check_landmark_count, class_counts, read_examples
from train.run_files import load_label_map, save_label_map

log = logging.getLogger(__name__)

INFO_FILE = "info.json"
FEATURES = {
    "image/id": tf.io.FixedLenFeature([], tf.string),
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),  # contiguous index, see label_map.csv
    "image/class/landmark_id": tf.io.FixedLenFeature([], tf.int64),
}


def shard_name(split: str, shard: int, shards: int) -> str:
    return f"{split}-{shard:05d}-of-{shards:05d}.tfrecord"


def encode_example(image_id: str, encoded: bytes, label: int, landmark_id: int) -> bytes:
    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    values = {
        "image/id": image_id.encode(),
        "image/encoded": encoded,
        "image/class/label": label,
        "image/class/landmark_id": landmark_id,
    }
    return tf.train.Example(
        features=tf.train.Features(feature={name: feature(value) for name, value in values.items()})
    ).SerializeToString()


def write_split(table: pd.DataFrame, landmark_ids: list[int], out: Path, split: str, shards: int) -> None:
    """Image i goes to shard i mod shards; files are copied byte for byte (no re-encoding)."""
    writers = [tf.io.TFRecordWriter(str(out / shard_name(split, s, shards))) for s in range(shards)]
    try:
        rows = zip(table["id"], table["path"], table["label"], strict=True)
        for i, (image_id, path, label) in enumerate(tqdm(rows, total=len(table), desc=f"{split} shards")):
            record = encode_example(image_id, Path(path).read_bytes(), int(label), landmark_ids[label])
            writers[i % shards].write(record)
    finally:
        for writer in writers:
            writer.close()


def write_tfrecords(data_dir: Path, out: Path, shards: int, validation_fraction: float, seed: int) -> dict:
    """The whole folder as TFRecord shards in `out` (written atomically); returns info.json's content."""
    if shards < 1:
        raise UserError(f"--shards must be at least 1, got {shards}")
    if not 0 <= validation_fraction < 1:  # NaN too
        raise UserError(f"--validation-fraction must be in [0, 1), got {validation_fraction}")
    examples = read_examples(data_dir, validation_fraction, seed)
    validation_shards = max(1, math.ceil(shards * len(examples.validation) / max(1, len(examples.train))))
    info = {
        "train": len(examples.train),
        "validation": len(examples.validation),
        "train_shards": shards,
        "validation_shards": validation_shards,
        "validation_fraction": validation_fraction,
        "seed": seed,
        "class_counts": class_counts(examples.train["label"], len(examples.landmark_ids)),
    }
    with atomic_output_dir(out) as tmp:
        write_split(examples.train, examples.landmark_ids, tmp, "train", shards)
        write_split(examples.validation, examples.landmark_ids, tmp, "validation", validation_shards)
        save_label_map(tmp, examples.landmark_ids)
        atomic_write_text(tmp / INFO_FILE, json.dumps(info, indent=2) + "\n")
    return info


def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A serialized example -> (encoded image bytes, contiguous label)."""
    parsed = tf.io.parse_single_example(record, FEATURES)
    return parsed["image/encoded"], parsed["image/class/label"]


def shard_files(folder: Path, split: str, count: int) -> list[str]:
    files = [str(folder / shard_name(split, s, count)) for s in range(count)]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise UserError(f"{missing[0]}: missing shard ({len(missing)} of {count} missing)")
    return files


def tfrecord_epoch_source(files: list[str], seed: int, shuffle_buffer: int) -> EpochSource:
    """Epoch e reads the shards' serialized records in an order seeded by (seed, e), interleaved, through a
    shuffle buffer (seed); a record is parsed only when the stream loads it."""
    files_t = tf.constant(files)

    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(tf.range(len(files)), seed=tf.stack([seed, e]))
        records = tf.data.Dataset.from_tensor_slices(tf.gather(files_t, order)).interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(16, len(files)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=False)

    return EpochSource(items=epoch, load=parse)


def tfrecord_data(folder: Path, cfg: TrainConfig, shuffle_buffer: int = 10_000) -> TrainingData:
    """TrainingData read from shards written by write_tfrecords (its split, not cfg's, applies)."""
    folder = Path(folder)
    if not (folder / INFO_FILE).is_file():
        raise UserError(f"{folder / INFO_FILE}: missing; write shards with `python -m train.tfrecords`")
    info = json.loads((folder / INFO_FILE).read_text())
    train_files = shard_files(folder, "train", info["train_shards"])
    validation_files = shard_files(folder, "validation", info["validation_shards"])
    landmark_ids = load_label_map(folder)
    check_landmark_count(len(landmark_ids), str(folder))
    return TrainingData(
        landmark_ids=landmark_ids,
        train_count=info["train"],
        validation_count=info["validation"],
        epoch_source=tfrecord_epoch_source(train_files, cfg.seed, shuffle_buffer),
        validation_files=lambda: tf.data.TFRecordDataset(validation_files).map(parse),
        class_counts=info.get("class_counts"),
    )  # shards written before it lack it


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = KitArgumentParser(prog="python -m train.tfrecords", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="GLDv2/Kaggle folder with train.csv and train/")
    parser.add_argument("--out", type=Path, required=True, help="folder to create for the shards")
    parser.add_argument("--shards", type=int, default=16, help="number of train shards (default 16)")
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=defaults.validation_fraction,
        help=f"share of images held out for validation (default {defaults.validation_fraction})",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the split (default 0)")
    args = parser.parse_args(argv)
    check_not_an_input("--out", args.out, [("--data", args.data)])
    info = write_tfrecords(args.data, args.out, args.shards, args.validation_fraction, args.seed)
    print(f"wrote {info['train']} train and {info['validation']} validation images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
