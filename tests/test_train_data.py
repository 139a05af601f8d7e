"""The GLDv2 folder reader, the tf.data stream (deterministic, resumable, skips bad images) and TFRecords."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from common.cli import UserError
from common.gldv2 import image_path
from train.config import get_config
from train.data import EpochSource, folder_data, read_examples, training_stream, validation_stream
from train.run_files import load_label_map
from train.tfrecords import tfrecord_data, write_tfrecords

LANDMARKS = (907, 13, 55, 2001)  # deliberately not contiguous and not sorted
PER_LANDMARK = 4
CORRUPT, TRUNCATED, MISSING = "c0c0c0c0c0c0c0c0", "d0d0d0d0d0d0d0d0", "e0e0e0e0e0e0e0e0"


def jpeg_bytes(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    image = Image.new("RGB", size, colour)
    image.paste((255 - colour[0], 40, 200), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def write_image(root, image_id: str, data: bytes) -> None:
    path = image_path(root, "train", image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def mini_folder(tmp_path_factory):
    """A GLDv2-layout folder: 16 good JPEGs, one corrupt, one truncated, one listed but missing."""
    root = tmp_path_factory.mktemp("mini")
    rows = []
    for k, landmark_id in enumerate(LANDMARKS):
        for j in range(PER_LANDMARK):
            image_id = f"{k:x}{j:x}" + "a" * 14
            write_image(root, image_id, jpeg_bytes((60 * k, 30 * j, 90), (48 + 8 * j, 40)))
            rows.append((image_id, landmark_id))
    good = jpeg_bytes((10, 20, 30), (48, 48))
    write_image(root, CORRUPT, good[:200] + bytes(range(256)) * 4)
    write_image(root, TRUNCATED, good[: len(good) // 3])
    rows += [(CORRUPT, LANDMARKS[0]), (TRUNCATED, LANDMARKS[1]), (MISSING, LANDMARKS[2])]
    pd.DataFrame(rows, columns=["id", "landmark_id"]).to_csv(root / "train.csv", index=False)
    return root


def test_labels_are_contiguous_and_the_map_gives_landmark_ids(mini_folder):
    examples = read_examples(mini_folder, validation_fraction=0.2, seed=0)
    assert examples.landmark_ids == sorted(LANDMARKS)
    table = pd.concat([examples.train, examples.validation])
    truth = pd.read_csv(mini_folder / "train.csv", dtype={"id": str}).set_index("id")["landmark_id"]
    for image_id, label in zip(table["id"], table["label"], strict=True):
        assert examples.landmark_ids[label] == truth[image_id]


def test_split_is_by_image_and_drops_missing_files(mini_folder):
    examples = read_examples(mini_folder, validation_fraction=0.2, seed=0)
    train_ids, validation_ids = set(examples.train["id"]), set(examples.validation["id"])
    assert not train_ids & validation_ids
    assert len(train_ids | validation_ids) == len(LANDMARKS) * PER_LANDMARK + 2  # all but MISSING
    assert MISSING not in train_ids | validation_ids
    assert len(validation_ids) == round(0.2 * 18)


def test_train_clean_csv_restricts_the_images(mini_folder, tmp_path):
    import shutil

    shutil.copytree(mini_folder, tmp_path / "data")
    clean = pd.DataFrame({"landmark_id": [13], "images": ["1" + "0" + "a" * 14 + " " + "11" + "a" * 14]})
    clean.to_csv(tmp_path / "data" / "train_clean.csv", index=False)
    examples = read_examples(tmp_path / "data", validation_fraction=0.0, seed=0)
    assert sorted(examples.train["id"]) == ["10" + "a" * 14, "11" + "a" * 14]


def test_malformed_train_csv_names_the_line(tmp_path):
    (tmp_path / "train.csv").write_text("id,landmark_id\n" + "a" * 16 + ",3\nnot-an-id,4\n")
    with pytest.raises(UserError, match="line 3"):
        read_examples(tmp_path, 0.1, 0)


def take_positions(dataset, batches: int) -> list[int]:
    return [int(p) for batch in dataset.take(batches) for p in batch["position"]]


def test_unreadable_images_are_skipped_and_show_as_gaps(mini_folder):
    cfg = get_config("tiny", image_size=32, batch_size=6, validation_fraction=0.0)
    data = folder_data(mini_folder, cfg)
    assert data.train_count == 18  # the corrupt and the truncated file are listed; only decoding fails
    batches = list(training_stream(data.epoch_source, data.train_count, cfg).take(5))  # 30 images, > 1 epoch
    positions = np.concatenate([b["position"].numpy() for b in batches])
    assert all(b["image"].shape == (6, 32, 32, 3) and b["image"].dtype == tf.uint8 for b in batches)
    assert np.all(np.diff(positions) > 0)
    assert np.sum(positions < 18) == 16  # epoch 0: all 18 positions passed, the 2 bad images skipped
    assert positions[-1] + 1 - len(positions) >= 2  # the count the loop reports as skipped


def test_stream_is_deterministic_and_resumes_at_a_position(mini_folder):
    cfg = get_config("tiny", image_size=32, batch_size=4, validation_fraction=0.0)
    data = folder_data(mini_folder, cfg)
    whole = list(training_stream(data.epoch_source, data.train_count, cfg).take(8))
    start = int(whole[3]["position"][-1]) + 1
    resumed = list(training_stream(data.epoch_source, data.train_count, cfg, start=start).take(4))
    for a, b in zip(whole[4:], resumed, strict=True):
        np.testing.assert_array_equal(a["position"], b["position"])
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_a_resumed_stream_loads_no_item_before_its_start():
    cfg = get_config("tiny", image_size=32, batch_size=4)
    epoch_size, start, loaded = 20, 17, []
    image = tf.constant(jpeg_bytes((90, 60, 30), (40, 40)))

    def load(item):  # items are their own stream positions here; record each one loaded
        recorded = tf.py_function(lambda x: loaded.append(int(x)) or x, [item], tf.int64)
        return image, recorded * 0

    def items(epoch):
        return tf.data.Dataset.range(epoch * epoch_size, (epoch + 1) * epoch_size)

    batch = next(iter(training_stream(EpochSource(items, load), epoch_size, cfg, start=start)))
    assert list(batch["position"].numpy()) == list(range(start, start + 4))
    assert loaded and min(loaded) >= start


def test_tfrecords_round_trip(mini_folder, tmp_path):
    cfg = get_config("tiny", image_size=32, batch_size=4)
    info = write_tfrecords(mini_folder, tmp_path / "shards", shards=3, validation_fraction=0.2, seed=0)
    assert load_label_map(tmp_path / "shards") == sorted(LANDMARKS)
    data = tfrecord_data(tmp_path / "shards", cfg)
    assert (data.train_count, data.validation_count) == (info["train"], info["validation"]) == (14, 4)
    source = data.epoch_source
    labels = [int(label) for _, label in source.items(tf.constant(0, tf.int64)).map(source.load)]
    assert sorted(labels) == sorted(read_examples(mini_folder, 0.2, 0).train["label"])
    validation = list(validation_stream(data.validation_files(), cfg))
    assert sum(len(b["label"]) for b in validation) <= 4
    whole = images_by_position(training_stream(data.epoch_source, data.train_count, cfg).take(8))
    resumed = images_by_position(training_stream(data.epoch_source, data.train_count, cfg, start=16).take(2))
    assert resumed and min(resumed) >= 16  # into epoch 2, which the whole stream also reached
    for position, image in resumed.items():
        np.testing.assert_array_equal(image, whole[position])


def images_by_position(batches) -> dict[int, np.ndarray]:
    return {int(p): image for batch in batches for p, image in zip(batch["position"], batch["image"].numpy(),
                                                                    strict=True)}
