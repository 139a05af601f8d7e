"""Backbone families, sub-center ArcFace with dynamic margins, global-only models: each trains, resumes exactly
after SIGTERM, exports, loads back and runs through the submission script."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from export.delg import EXPORT_INFO_FILE, cell_boxes, export_delg
from export.receptive_field import receptive_field
from local_eval.layout import solution_file
from local_eval.metrics import score_files
from local_eval.submission_script import load_submission
from tests import LIGHT as LIGHT_BASE
from tests.test_train_loop import checkpoint_values
from train import loop
from train.arcface import CosineClassifier, arcface_logits, dynamic_margins
from train.backbone import IMAGENET_MEAN, IMAGENET_STD, KERAS_BACKBONES, build_backbone
from train.config import BACKBONES, TrainConfig, get_config
from train.loop import train
from train.model import DelgModel

sub = load_submission()
# The smallest member of each family, and a global-only tiny model.
SMALLEST = {
    "efficientnetv2": {"backbone": "efficientnetv2-b0"},
    "efficientnet": {"backbone": "efficientnet-b0"},
    "convnext": {"backbone": "convnext-tiny"},
    "resnet152": {"backbone": "resnet152"},
    "global-only": {"global_only": True},
}
LIGHT = [*LIGHT_BASE, "--plan", "fixed"]
# The end-to-end cases' submission: global descriptors at most 128 px on a side, 10 queries reranked at depth 3.
FEW_RERANKED = ["--global-max-side", "128", "--rerank", "3", "--max-rerank-queries", "10"]
STEPS, LOG_EVERY = 20, 5  # each family trains STEPS steps; SIGTERM comes after the first LOG_EVERY


def test_every_backbone_flag_value_has_a_builder():
    assert sorted(BACKBONES) == sorted(["tiny", *KERAS_BACKBONES])


@pytest.mark.parametrize("backbone, conv3_blocks, conv4_blocks", [("resnet101", 4, 23), ("resnet152", 8, 36)])
def test_receptive_field_of_deeper_resnets_by_hand(backbone, conv3_blocks, conv4_blocks):
    # ResNet50 (4 conv3 blocks, 6 conv4 blocks) sees 291 px; each more block's 3x3 conv widens the field by
    # 2 cells of its stage's stride: 2*8 px in conv3, 2*16 px in conv4.
    field = receptive_field(build_backbone(TrainConfig(backbone=backbone, local_stride=16)).outputs[0])
    size = 291 + 16 * (conv3_blocks - 4) + 32 * (conv4_blocks - 6)
    assert (field.size, field.stride, field.padding) == (size, 16, (size - 1) / 2)


def with_visible_fields(backbone: keras.Model) -> keras.Model:
    """Zero the squeeze-and-excitation convolutions: each gate becomes a constant, and a cell then depends on the
    pixels its convolutions see only (the field receptive_field computes). Set ConvNeXt's layer scales (1e-6 at
    start) to 1, so that every block's change shows in float32."""
    for layer in backbone.layers:
        if layer.name.endswith("_se_reduce"):
            for weight in layer.weights:
                weight.assign(tf.zeros_like(weight))
        if type(layer).__name__ == "LayerScale":
            for weight in layer.weights:
                weight.assign(tf.ones_like(weight))
    return backbone


@pytest.mark.parametrize("backbone", ["efficientnetv2-b0", "efficientnet-b0", "convnext-tiny"])
def test_changed_cells_are_exactly_those_whose_box_holds_the_changed_pixel(backbone):
    net = with_visible_fields(build_backbone(TrainConfig(backbone=backbone, local_stride=16)))
    field = receptive_field(net.outputs[0])
    assert field.stride == 16
    size = 32 * math.ceil((field.size / 2 + 40) / 32)  # some cells' boxes miss a pixel near a corner
    image = np.random.default_rng(1).uniform(0, 255, (1, size, size, 3)).astype(np.float32)
    changed_image = image.copy()
    pixel = (9, 22)
    changed_image[0, pixel[0], pixel[1]] = 255 - image[0, pixel[0], pixel[1]]
    before, after = net(image)[0].numpy(), net(changed_image)[0].numpy()
    changed = (after != before).any(axis=-1)[0].reshape(-1)
    boxes = cell_boxes(field, before.shape[1], before.shape[2]).numpy()
    holds = (
        (boxes[:, 0] <= pixel[0]) & (pixel[0] <= boxes[:, 2]) & (boxes[:, 1] <= pixel[1]) & (pixel[1] <= boxes[:, 3])
    )
    assert 0 < holds.sum() < len(holds)
    np.testing.assert_array_equal(changed, holds)


@pytest.mark.parametrize(
    "backbone, scale, offset",
    [
        ("efficientnet-b0", 1 / (255 * np.array(IMAGENET_STD)), -np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD)),
        ("efficientnetv2-b0", 1 / (255 * np.array(IMAGENET_STD)), -np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD)),
        ("efficientnetv2-s", np.full(3, 1 / 128), np.full(3, -1.0)),
        ("convnext-tiny", 1 / (255 * np.array(IMAGENET_STD)), -np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD)),
    ],
)
def test_pixels_are_normalised_once_as_the_family_does(backbone, scale, offset):
    net = build_backbone(TrainConfig(backbone=backbone))
    first_conv = next(layer for layer in net.layers if isinstance(layer, (keras.layers.Conv2D, keras.Sequential)))
    conv_input = first_conv.input
    while conv_input._keras_history[0].__class__.__name__ == "ZeroPadding2D":
        conv_input = conv_input._keras_history[0].input
    pixels = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3)).astype(np.float32)
    got = keras.Model(net.input, conv_input)(pixels).numpy()
    np.testing.assert_allclose(got, pixels * scale + offset, atol=1e-4)


@pytest.mark.parametrize("backbone", ["efficientnet-b0", "convnext-tiny"])
def test_an_image_below_one_conv5_cell_is_extended_by_its_last_row_and_column(backbone):
    # These families' valid-padded stride-2 convolutions leave no conv5 cell below 32 px a side: GeM over no
    # cells made the global descriptor NaN.
    model = DelgModel(TrainConfig(backbone=backbone, embedding_dim=8, global_only=True), num_classes=2)
    image = np.random.default_rng(0).integers(0, 256, (1, 20, 24, 3)).astype(np.float32)
    extended = np.pad(image, [(0, 0), (0, 12), (0, 8), (0, 0)], mode="edge")
    traced = tf.function(model.features, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    expected = model.features(tf.constant(extended))[1].numpy()
    for conv5 in (model.features(tf.constant(image))[1], traced(tf.constant(image))[1]):
        np.testing.assert_allclose(conv5.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert expected.shape[1:3] == (1, 1) and np.isfinite(model.global_descriptor(expected).numpy()).all()


def test_backbone_weights_from_a_file(tmp_path):
    source = build_backbone(TrainConfig(backbone="efficientnetv2-b0"))
    keras_net = keras.applications.EfficientNetV2B0(include_top=False, weights=None, input_shape=(None, None, 3))
    keras_net.save_weights(tmp_path / "b0.weights.h5")
    loaded = build_backbone(TrainConfig(backbone="efficientnetv2-b0", backbone_weights=str(tmp_path / "b0.weights.h5")))
    expected = {w.path: w.numpy() for w in keras_net.weights}
    for weight in loaded.weights:
        np.testing.assert_array_equal(weight.numpy(), expected[weight.path], err_msg=weight.path)
    assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(source.weights, loaded.weights, strict=True))


def test_sub_center_arcface_with_dynamic_margins_by_hand():
    # 2 classes x 2 sub-centers in 2-d; the embedding (1, 0) is at 0 degrees from class 0's second sub-center
    # and at 60 degrees from class 1's first.
    classifier = CosineClassifier(num_classes=2, subcenters=2)
    classifier.build((None, 2))
    half = math.sqrt(3) / 2
    classifier.kernel.assign(np.array([[0.0, 2.0, 0.5, -1.0], [1.0, 0.0, half, 0.0]], np.float32))
    cosine = classifier(tf.constant([[1.0, 0.0], [0.0, 3.0]])).numpy()
    np.testing.assert_allclose(cosine, [[1.0, 0.5], [1.0, half]], atol=1e-6)
    # classes with 16 and 1 training images: margins 0.4 * 16^-0.25 + 0.05 = 0.25 and 0.4 + 0.05 = 0.45
    margins = dynamic_margins([16, 1], 0.4, 0.25, 0.05)
    np.testing.assert_allclose(margins, [0.25, 0.45], atol=1e-7)
    labels = tf.constant([1, 1])
    logits = arcface_logits(cosine, labels, tf.gather(margins, labels)[:, None], scale=10.0).numpy()
    expected = [[10.0, 10 * math.cos(math.radians(60) + 0.45)], [10.0, 10 * math.cos(math.radians(30) + 0.45)]]
    np.testing.assert_allclose(logits, expected, atol=1e-5)


@dataclass(frozen=True)
class FamilyRun:
    """One family's end-to-end trainings and export, which its three checks share."""

    cfg: TrainConfig
    straight: dict  # metrics of the uninterrupted run
    stopped: dict  # of the run stopped by SIGTERM
    resumed: dict  # of the same run resumed
    straight_dir: Path
    run_dir: Path  # the stopped and resumed run
    model: Path  # the straight run's DELG export


def sigterm_after_first_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next training sends itself a real SIGTERM right after it logs its first interval (once)."""
    real_log = loop.log_interval

    def log_then_sigterm(*args, **kwargs):
        summary = real_log(*args, **kwargs)
        monkeypatch.setattr(loop, "log_interval", real_log)
        os.kill(os.getpid(), signal.SIGTERM)
        return summary

    monkeypatch.setattr(loop, "log_interval", log_then_sigterm)


# Each case trains three times (straight, stopped, resumed): minutes for the Keras families on 2 cores, so those
# are marked slow and run by `make test-backbones`, not `make test`.
FAMILY_CASES = [
    pytest.param(overrides, id=name, marks=[] if name == "global-only" else [pytest.mark.slow])
    for name, overrides in SMALLEST.items()
]


@pytest.fixture(scope="module", params=FAMILY_CASES)
def family(request, tiny_competition, tmp_path_factory) -> FamilyRun:
    """Three trainings of STEPS steps at 64 px: straight, stopped by SIGTERM after the first log interval, resumed;
    and the export of the straight run. The straight run and its export run in a process of their own, beside
    the other two trainings: tracing a Keras backbone keeps one core busy for tens of seconds."""
    data = tiny_competition / "landmark-recognition"
    out = tmp_path_factory.mktemp("family")
    cfg = get_config(
        "tiny",
        steps=STEPS,
        image_size=64,
        batch_size=4,
        warmup_steps=2,
        checkpoint_every=STEPS,
        log_every=LOG_EVERY,
        validate_every=STEPS,
        validation_fraction=0.0,
        **request.param,
    )
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        straight = pool.submit(train, cfg, data_dir=data, run_dir=out / "straight", strategy="default")
        export = pool.submit(export_delg, out / "straight", out / "delg", xla=False)
        with pytest.MonkeyPatch.context() as monkeypatch:
            sigterm_after_first_log(monkeypatch)
            stopped = train(cfg, data_dir=data, run_dir=out / "run", strategy="default")
        resumed = train(cfg, data_dir=data, run_dir=out / "run", strategy="default")
        return FamilyRun(cfg, straight.result(), stopped, resumed, out / "straight", out / "run", export.result())


def test_a_family_resumes_exactly_after_sigterm(family):
    cfg = family.cfg
    assert (family.stopped["stopped_by"], family.stopped["step"]) == ("SIGTERM", LOG_EVERY + 1)
    assert family.resumed["step"] == family.straight["step"] == STEPS
    assert family.resumed["global_only"] == cfg.global_only
    expected, got = checkpoint_values(family.straight_dir), checkpoint_values(family.run_dir)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_family_exports_and_the_export_loads_back(family):
    cfg = family.cfg
    assert json.loads((family.model / "assets" / EXPORT_INFO_FILE).read_text())["global_only"] == cfg.global_only
    serving = tf.saved_model.load(str(family.model)).signatures["serving_default"]
    # 128 x 112 px: 8 x 7 stride-16 cells at scale 1 and 4 x 4 at 0.5, more than the 50 features asked for
    image = np.random.default_rng(0).integers(0, 256, (128, 112, 3), dtype=np.uint8)
    out = serving(
        input_image=tf.constant(image),
        input_scales=tf.constant([0.5, 1.0]),
        input_max_feature_num=tf.constant(50),
        input_abs_thres=tf.constant(0.0),
        input_global_scales_ind=tf.constant([0, 1]),
    )
    assert out["global_descriptors"].shape == (2, cfg.embedding_dim)
    assert np.isfinite(out["global_descriptors"].numpy()).all()
    assert out["features"].shape[0] == (0 if cfg.global_only else 50)


def test_a_family_export_runs_through_the_submission_script(family, tiny_competition, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = tiny_competition / "landmark-recognition"
    submission = tmp_path / "submission.csv"
    assert (
        sub.main(
            [
                "--task",
                "recognition",
                "--data",
                str(data),
                "--model",
                str(family.model),
                "--work",
                str(tmp_path / "work"),
                "--out",
                str(submission),
                *LIGHT,
                *FEW_RERANKED,
            ]
        )
        == 0
    )
    scores = score_files("recognition", solution_file(tiny_competition, "recognition"), submission)
    assert 0 <= scores["all"]["gap"] <= 1
    assert caplog.text.count("is a global-only model") == int(family.cfg.global_only)
    assert ("reranked" in caplog.text) != family.cfg.global_only
