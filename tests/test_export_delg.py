"""The DELG SavedModel: contract, equivalence with the training model, keypoint geometry, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from export.__main__ import main as export_main
from export.delg import cell_boxes, export_delg, save_delg
from export.receptive_field import receptive_field
from train.backbone import build_backbone
from train.config import get_config
from train.model import DelgModel
from train.run_files import checkpoint_manager, make_checkpoint, save_config, save_label_map

LANDMARK_IDS = [7, 11, 13, 42]


def make_run_dir(run_dir: Path, **overrides) -> DelgModel:
    """A run folder (config, label map, one checkpoint) of an untrained tiny model; returns the model."""
    cfg = get_config("tiny", image_size=64, **overrides)
    model = DelgModel(cfg, num_classes=len(LANDMARK_IDS))
    model(tf.zeros([1, 64, 64, 3]))
    save_config(run_dir, cfg)
    save_label_map(run_dir, LANDMARK_IDS)
    checkpoint_manager(make_checkpoint(model), run_dir).save()
    return model


def extract(signature, image, scales=(1.0,), max_features=100, threshold=0.0, global_indices=(0,)):
    outputs = signature(input_image=tf.constant(image, tf.uint8), input_scales=tf.constant(scales, tf.float32),
                        input_max_feature_num=tf.constant(max_features, tf.int32),
                        input_abs_thres=tf.constant(threshold, tf.float32),
                        input_global_scales_ind=tf.constant(global_indices, tf.int32))
    return {name: value.numpy() for name, value in outputs.items()}


@pytest.fixture(scope="module")
def run_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_delg")
    model = make_run_dir(root / "run")
    export_delg(root / "run", root / "delg")
    return root, model, tf.saved_model.load(str(root / "delg")).signatures["serving_default"]


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_receptive_field_of_keras_resnet50_conv4_is_delfs():
    field = receptive_field(build_backbone(get_config("r50")).outputs[0])
    # DELF's published numbers for ResNet50 at conv4: rf 291, stride 16, padding 145.
    assert (field.size, field.stride, field.padding) == (291, 16, 145)


def test_changed_cells_are_those_whose_box_holds_the_changed_pixel():
    backbone = build_backbone(get_config("tiny"))
    field = receptive_field(backbone.outputs[0])
    image = np.random.default_rng(1).normal(size=(1, 96, 96, 3)).astype(np.float32)
    pixel = (50, 37)
    changed_image = image.copy()
    changed_image[0, pixel[0], pixel[1]] += 10.0
    before, after = backbone(image)[0].numpy(), backbone(changed_image)[0].numpy()
    changed = (np.abs(after - before).max(axis=-1) > 1e-5)[0].reshape(-1)
    boxes = cell_boxes(field, before.shape[1], before.shape[2]).numpy()
    holds = ((boxes[:, 0] <= pixel[0]) & (pixel[0] <= boxes[:, 2]) &
             (boxes[:, 1] <= pixel[1]) & (pixel[1] <= boxes[:, 3]))
    assert changed.any()
    assert not (changed & ~holds).any(), "a cell changed although its box does not hold the pixel"
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    nearest = np.argmin(np.abs(centres - pixel).sum(axis=1))
    assert changed[nearest]


def test_exported_global_descriptor_equals_training_model(run_and_model):
    _, model, signature = run_and_model
    image = random_image(80, 112)
    out = extract(signature, image, scales=(0.5, 1.0), global_indices=(1, 0))
    for row, size in ((0, (80, 112)), (1, (40, 56))):
        resized = tf.image.resize(image[None].astype(np.float32), size)
        expected = model(resized)["embedding"].numpy()[0]
        got = out["global_descriptors"][row]
        np.testing.assert_allclose(got / np.linalg.norm(got), expected, atol=1e-4)


def test_label_map_travels_in_assets(run_and_model):
    root, _, _ = run_and_model
    assert (root / "delg" / "assets" / "label_map.csv").read_text() == (root / "run" / "label_map.csv").read_text()


def test_loads_and_runs_in_a_process_that_imports_only_tensorflow(run_and_model):
    root, _, _ = run_and_model
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import tensorflow as tf
        f = tf.saved_model.load({str(root / 'delg')!r}).signatures["serving_default"]
        image = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)
        out = f(input_image=tf.constant(image), input_scales=tf.constant([0.5, 1.0, 1.4142]),
                input_max_feature_num=tf.constant(40), input_abs_thres=tf.constant(0.5),
                input_global_scales_ind=tf.constant([0, 2]))
        out = {{k: v.numpy().tolist() for k, v in out.items()}}
        out["project_modules"] = [m for m in ("train", "export", "common") if m in sys.modules]
        print(json.dumps(out))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["project_modules"] == []
    n = len(out["scores"])
    assert 0 < n <= 40
    assert np.shape(out["boxes"]) == (n, 4) and np.shape(out["features"]) == (n, 128)
    assert np.shape(out["global_descriptors"]) == (2, 64)
    scores = np.array(out["scores"])[:, 0]
    assert (scores >= 0.5).all() and (np.diff(scores) <= 0).all()
    np.testing.assert_allclose(np.linalg.norm(out["features"], axis=1), 1.0, atol=1e-5)
    assert set(np.round(out["scales"], 3)) <= {round(1 / s, 3) for s in (0.5, 1.0, 1.4142)}


def test_too_small_scale_gives_no_local_features_but_a_global_descriptor(run_and_model):
    _, _, signature = run_and_model
    out = extract(signature, random_image(40, 40), scales=(0.25, 1.0), global_indices=(0, 1))
    assert len(out["scores"]) > 0
    assert (out["scales"] == 1.0).all()
    assert out["global_descriptors"].shape == (2, 64)


def test_zero_max_features_extracts_global_only(run_and_model):
    _, _, signature = run_and_model
    out = extract(signature, random_image(64, 64), max_features=0)
    assert out["features"].shape == (0, 128) and out["boxes"].shape == (0, 4)
    assert out["global_descriptors"].shape == (1, 64)


def averaging_model() -> DelgModel:
    """A tiny DELG whose every kernel averages (1/fan-in) and whose normalizations are identities.

    Its attention then grows with the brightness a cell sees, weighted towards the centre of its
    receptive field: on a black image the strongest cells are the ones centred on a white patch.
    """
    model = DelgModel(get_config("tiny"), num_classes=2)
    model(tf.zeros([1, 64, 64, 3]))
    values = {"bias": 0.0, "beta": 0.0, "moving_mean": 0.0, "gamma": 1.0, "moving_variance": 1.0}
    for variable in model.weights:
        if variable.name == "kernel":
            variable.assign(np.full(variable.shape, 1.0 / np.prod(variable.shape[:-1]), np.float32))
        else:
            variable.assign(np.full(variable.shape, values[variable.name], np.float32))
    return model


def test_strongest_keypoints_land_on_a_bright_patch(tmp_path):
    save_delg(averaging_model(), tmp_path / "delg")
    signature = tf.saved_model.load(str(tmp_path / "delg")).signatures["serving_default"]
    image = np.zeros((160, 128, 3), np.uint8)
    centre = np.array([96, 64])
    image[centre[0] - 8:centre[0] + 8, centre[1] - 8:centre[1] + 8] = 255
    scales = (0.5, 1.0)
    out = extract(signature, image, scales=scales, max_features=1000)
    keypoints = (out["boxes"][:, :2] + out["boxes"][:, 2:]) / 2
    for scale in scales:
        at_scale = np.flatnonzero(np.isclose(out["scales"], 1 / scale))
        strongest = at_scale[np.argmax(out["scores"][at_scale, 0])]
        assert np.abs(keypoints[strongest] - centre).max() < 16 / scale / 2, (scale, keypoints[strongest])
        box = out["boxes"][strongest]
        np.testing.assert_allclose(box[2:] - box[:2], (67 - 1) / scale)  # the tiny ResNet's field, rescaled


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    make_run_dir(tmp_path / "run")
    for path in (tmp_path / "run" / "checkpoints").iterdir():
        path.unlink()
    assert export_main(["delg", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no checkpoint" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("change", [{"embedding_dim": 32}, {"tiny_widths": (8, 16, 32, 64)}])
def test_checkpoint_not_matching_config_is_a_one_line_error(tmp_path, capsys, change):
    make_run_dir(tmp_path / "run")
    save_config(tmp_path / "run", get_config("tiny", image_size=64, **change))
    assert export_main(["delg", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "does not match" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "something was left half-written"


def test_existing_output_is_refused_and_left_alone(run_and_model, capsys):
    root, _, _ = run_and_model
    before = sorted(p.name for p in (root / "delg").iterdir())
    assert export_main(["delg", "--run", str(root / "run"), "--out", str(root / "delg")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in (root / "delg").iterdir()) == before
