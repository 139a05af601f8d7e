"""The GLDv2 folder reader, the tf.data stream (deterministic, resumable, skips bad images) and TFRecords."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from common.cli import UserError
from common.gldv2 import image_path
from tests import HANG_GUARD_S
from train.config import get_config
from train.data import EpochSource, folder_data, read_examples, training_stream, validation_stream
from train.run_files import load_label_map
from train.tfrecords import tfrecord_data, write_tfrecords

LANDMARKS = (907, 13, 55, 2001)  # deliberately not contiguous and not sorted
PER_LANDMARK = 4
ROOT = Path(__file__).resolve().parents[1]
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
    shutil.copytree(mini_folder, tmp_path / "data")
    clean = pd.DataFrame(
        {"landmark_id": [13, 55], "images": ["1" + "0" + "a" * 14 + " " + "11" + "a" * 14, "2" + "0" + "a" * 14]}
    )
    clean.to_csv(tmp_path / "data" / "train_clean.csv", index=False)
    examples = read_examples(tmp_path / "data", validation_fraction=0.0, seed=0)
    assert sorted(examples.train["id"]) == ["10" + "a" * 14, "11" + "a" * 14, "20" + "a" * 14]


def test_not_clean_images_weigh_not_clean_weight_or_are_left_out(mini_folder, tmp_path):
    shutil.copytree(mini_folder, tmp_path / "data")
    clean = ["10" + "a" * 14, "11" + "a" * 14, "20" + "a" * 14]
    pd.DataFrame({"landmark_id": [13, 55], "images": [" ".join(clean[:2]), clean[2]]}).to_csv(
        tmp_path / "data" / "train_clean.csv", index=False
    )
    weighed = read_examples(tmp_path / "data", validation_fraction=0.0, seed=0, not_clean_weight=0.5).train
    assert len(weighed) == len(LANDMARKS) * PER_LANDMARK + 2  # the missing image aside
    assert dict(zip(weighed["id"], weighed["weight"], strict=True)) == {
        image_id: 1.0 if image_id in clean else 0.5 for image_id in weighed["id"]
    }
    assert sorted(read_examples(tmp_path / "data", 0.0, 0, not_clean_weight=0.0).train["id"]) == clean
    assert set(read_examples(mini_folder, 0.0, 0, not_clean_weight=0.5).train["weight"]) == {1.0}  # no clean list
    stream = folder_data(
        tmp_path / "data",
        get_config("tiny", image_size=32, batch_size=4, validation_fraction=0.0, not_clean_weight=0.25),
    )
    batches = training_stream(stream.epoch_source, stream.train_count, get_config("tiny", image_size=32, batch_size=4))
    labels_by_weight = {float(w) for batch in batches.take(6) for w in batch["weight"]}
    assert labels_by_weight == {1.0, 0.25}


def test_malformed_train_csv_names_the_line(tmp_path):
    (tmp_path / "train.csv").write_text("id,landmark_id\n" + "a" * 16 + ",3\nnot-an-id,4\n")
    with pytest.raises(UserError, match="line 3"):
        read_examples(tmp_path, 0.1, 0)


GOOD_ROW = "a" * 16 + ",3\n"


@pytest.mark.parametrize("landmark_id", ["1e30", "inf", "-inf", "nan", "3.5", "3.0", "9223372036854775808", "0x1f"])
def test_a_landmark_id_that_is_no_int64_names_file_line_and_id(tmp_path, landmark_id, capsys):
    from common.cli import run_main
    from train.__main__ import main

    (tmp_path / "train.csv").write_text("id,landmark_id\n" + GOOD_ROW + "b" * 16 + f",{landmark_id}\n")
    expected = (
        f"{tmp_path / 'train.csv'}, line 3: id {'b' * 16}: landmark_id {landmark_id!r} is not an integer "
        "(digits only, at most 2^63-1)"
    )
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        read_examples(tmp_path, 0.0, 0)
    out = tmp_path.parent / f"{tmp_path.name}-run"  # outside --data: the kit never writes into its inputs
    assert run_main(main, ["--data", str(tmp_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"


def test_the_largest_int64_landmark_id_keeps_its_value(tmp_path):
    (tmp_path / "train.csv").write_text("id,landmark_id\n" + GOOD_ROW + "b" * 16 + ",9223372036854775807\n")
    for image_id in ("a" * 16, "b" * 16):
        image_path(tmp_path, "train", image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(image_path(tmp_path, "train", image_id))
    assert read_examples(tmp_path, 0.0, 0).landmark_ids == [3, 2**63 - 1]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"id,landmark_id\n" + GOOD_ROW.encode() + b"b" * 16 + b",4,9\n", "line 3: 3 fields where the header has 2"),
        (b"id,landmark_id\n\n" + GOOD_ROW.encode() + b"c" * 16 + b",4,\n", "line 4: 3 fields where the header has 2"),
        (b"id,landmark_id\n" + GOOD_ROW.encode() + b"b" * 16 + b"\n", "line 3: id b{16}: landmark_id '' is not"),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "line 1: byte 0x89 is not UTF-8 text"),
        (
            b"id,landmark_id\n" + GOOD_ROW.encode() + "bbbbbbbbbbbbbbb\u00e9,4\n".encode("latin-1"),
            "line 3: byte 0xe9 is not UTF-8",
        ),
        (b"id,landmark_id\n" + GOOD_ROW.encode() + b"\0" * 64, "line 3: a NUL byte"),
        (b"", "empty; it needs at least a header line"),
        (b'id,landmark_id\n"' + GOOD_ROW.encode(), "not a readable CSV file"),
    ],
)
def test_a_ragged_or_binary_train_csv_is_one_error_naming_file_and_line(tmp_path, content, expected):
    (tmp_path / "train.csv").write_bytes(content)
    with pytest.raises(UserError, match=f"^{tmp_path / 'train.csv'}(, line \\d+)?: ") as caught:
        read_examples(tmp_path, 0.1, 0)
    assert re.search(expected, str(caught.value)), str(caught.value)
    assert "\n" not in str(caught.value)


def test_train_clean_csv_is_read_as_carefully(mini_folder, tmp_path):
    shutil.copytree(mini_folder, tmp_path / "data")
    (tmp_path / "data" / "train_clean.csv").write_text("landmark_id,images\n13,a b\n55,c,d\n")
    with pytest.raises(UserError, match="train_clean.csv, line 3: 3 fields where the header has 2"):
        read_examples(tmp_path / "data", 0.1, 0)


def one_landmark_folder(root, images: int = 5, other: int | None = None):
    """A folder of `images` images of landmark 7 (and one image of landmark `other`, when given)."""
    rows = [(f"{j:02x}" + "b" * 14, 7) for j in range(images)]
    rows += [("ff" + "b" * 14, other)] if other is not None else []
    for k, (image_id, _) in enumerate(rows):
        write_image(root, image_id, jpeg_bytes((40 * k % 255, 90, 20), (40, 40)))
    pd.DataFrame(rows, columns=["id", "landmark_id"]).to_csv(root / "train.csv", index=False)
    return root


def test_one_landmark_is_refused_before_training(tmp_path):
    one_landmark_folder(tmp_path)
    with pytest.raises(UserError, match="1 landmark to train on; at least 2 landmarks are needed"):
        read_examples(tmp_path, 0.2, 0)


def test_a_second_landmark_only_in_validation_is_not_enough(tmp_path):
    one_landmark_folder(tmp_path, images=4, other=8)  # 5 images; validation takes one, by seed
    refused = 0
    for seed in range(12):
        try:
            examples = read_examples(tmp_path, 0.2, seed)
        except UserError as err:
            assert "validation images set aside" in str(err) and "1 landmark to train on" in str(err)
            refused += 1
        else:
            assert set(examples.train["label"]) == {0, 1}
    assert 0 < refused < 12  # refused exactly when landmark 8's only image went to validation


def test_shards_of_one_landmark_are_refused(mini_folder, tmp_path):
    write_tfrecords(mini_folder, tmp_path / "shards", shards=1, validation_fraction=0.2, seed=0)
    (tmp_path / "shards" / "label_map.csv").write_text("index,landmark_id\n0,13\n")
    with pytest.raises(UserError, match="1 landmark to train on"):
        tfrecord_data(tmp_path / "shards", get_config("tiny"))
    for broken in (b"\x89PNG\r\n" + bytes(range(256)), b"index,landmark_id\n0,13,5\n", b"index,landmark_id\n0,x\n"):
        (tmp_path / "shards" / "label_map.csv").write_bytes(broken)
        with pytest.raises(UserError, match=f"^{tmp_path / 'shards' / 'label_map.csv'}"):
            tfrecord_data(tmp_path / "shards", get_config("tiny"))


def test_train_on_one_landmark_exits_2_with_one_line(tmp_path):
    one_landmark_folder(tmp_path / "data")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.splitlines()[-1]] and "at least 2 landmarks are needed" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "checkpoints").exists()


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
    return {
        int(p): image for batch in batches for p, image in zip(batch["position"], batch["image"].numpy(), strict=True)
    }
