"""The DELG SavedModel: contract, equivalence with the training model, keypoint geometry, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2

from common.gldv2 import image_path
from export import delg
from export.__main__ import main as export_main
from export.delg import (
    EXPORT_INFO_FILE,
    GLOBAL_BATCH,
    GLOBAL_BATCH_FLOAT16,
    GLOBAL_BATCH_OUTPUT,
    GLOBAL_BATCH_SIGNATURE,
    XLA_SUFFIX,
    cell_boxes,
    export_delg,
    save_delg,
)
from export.receptive_field import receptive_field
from tests import HANG_GUARD_S
from tests.delg_test_models import write_tf1_model, write_tf2_model
from train.backbone import build_backbone
from train.config import DELG_GLOBAL_SCALE_INDICES, DELG_IMAGE_SCALES, get_config
from train.model import DelgModel
from train.run_files import checkpoint_manager, make_checkpoint, save_config, save_label_map

LANDMARK_IDS = [7, 11, 13, 42]
GLOBAL_SCALES = [DELG_IMAGE_SCALES[i] for i in DELG_GLOBAL_SCALE_INDICES]
TINY_DIM = get_config("tiny").embedding_dim  # the global descriptor's size of the tiny runs here and in conftest


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
    outputs = signature(
        input_image=tf.constant(image, tf.uint8),
        input_scales=tf.constant(scales, tf.float32),
        input_max_feature_num=tf.constant(max_features, tf.int32),
        input_abs_thres=tf.constant(threshold, tf.float32),
        input_global_scales_ind=tf.constant(global_indices, tf.int32),
    )
    return {name: value.numpy() for name, value in outputs.items()}


# Backbone -> whether run_and_model's export XLA-compiles its batched function: the tiny ResNet's checks the
# compiled function; compiling the EfficientNetV2's (about a minute here) would check it again.
EXPORT_XLA = {"tiny": True, "efficientnetv2-b0": False}


@pytest.fixture(scope="module", params=list(EXPORT_XLA))
def run_and_model(tmp_path_factory, request):
    """An untrained run of the tiny config (on the tiny ResNet, or the smallest EfficientNetV2) exported (XLA as
    EXPORT_XLA says), and the export loaded."""
    root = tmp_path_factory.mktemp("export_delg")
    model = make_run_dir(root / "run", backbone=request.param)
    export_delg(root / "run", root / "delg", xla=EXPORT_XLA[request.param])
    return root, model, tf.saved_model.load(str(root / "delg"))


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("local_stride", [16, 32])
def test_receptive_field_of_keras_resnet50_conv4_is_delfs(local_stride):
    backbone = build_backbone(get_config("r50", local_stride=local_stride, backbone_weights="none"))
    field = receptive_field(backbone.outputs[0])
    # DELF's published numbers for ResNet50 at conv4: rf 291, padding 145, stride 16 (32 with block3_strides).
    assert (field.size, field.stride, field.padding) == (291, local_stride, 145)


@pytest.mark.parametrize("stride, pixel", [(16, (50, 37)), (32, (50, 37)), (32, (5, 120)), (32, (100, 64))])
def test_changed_cells_are_those_whose_box_holds_the_changed_pixel(stride, pixel):
    backbone = build_backbone(get_config("tiny", local_stride=stride))
    field = receptive_field(backbone.outputs[0])
    assert field.stride == stride
    image = np.random.default_rng(1).normal(size=(1, 128, 128, 3)).astype(np.float32)
    changed_image = image.copy()
    changed_image[0, pixel[0], pixel[1]] += 10.0
    before, after = backbone(image)[0].numpy(), backbone(changed_image)[0].numpy()
    changed = (np.abs(after - before).max(axis=-1) > 1e-5)[0].reshape(-1)
    boxes = cell_boxes(field, before.shape[1], before.shape[2]).numpy()
    holds = (
        (boxes[:, 0] <= pixel[0]) & (pixel[0] <= boxes[:, 2]) & (boxes[:, 1] <= pixel[1]) & (pixel[1] <= boxes[:, 3])
    )
    assert changed.any()
    assert not (changed & ~holds).any(), "a cell changed although its box does not hold the pixel"
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    nearest = np.argmin(np.abs(centres - pixel).sum(axis=1))
    assert changed[nearest]


def test_exported_global_descriptor_equals_training_model(run_and_model):
    _, model, loaded = run_and_model
    image = random_image(80, 112)
    out = extract(loaded.signatures["serving_default"], image, scales=(0.5, 1.0), global_indices=(1, 0))
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
        f = tf.saved_model.load({str(root / "delg")!r}).signatures["serving_default"]
        image = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)
        out = f(input_image=tf.constant(image), input_scales=tf.constant([0.5, 1.0, 1.4142]),
                input_max_feature_num=tf.constant(40), input_abs_thres=tf.constant(0.5),
                input_global_scales_ind=tf.constant([0, 2]))
        out = {{k: v.numpy().tolist() for k, v in out.items()}}
        out["project_modules"] = [m for m in ("train", "export", "common") if m in sys.modules]
        print(json.dumps(out))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["project_modules"] == []
    n = len(out["scores"])
    assert 0 < n <= 40
    assert np.shape(out["boxes"]) == (n, 4) and np.shape(out["features"]) == (n, 128)
    assert np.shape(out["global_descriptors"]) == (2, TINY_DIM)
    scores = np.array(out["scores"])[:, 0]
    assert (scores >= 0.5).all() and (np.diff(scores) <= 0).all()
    np.testing.assert_allclose(np.linalg.norm(out["features"], axis=1), 1.0, atol=1e-5)
    assert set(np.round(out["scales"], 3)) <= {round(1 / s, 3) for s in (0.5, 1.0, 1.4142)}


def test_too_small_scale_gives_no_local_features_but_a_global_descriptor(run_and_model):
    out = extract(
        run_and_model[2].signatures["serving_default"], random_image(40, 40), scales=(0.25, 1.0), global_indices=(0, 1)
    )
    assert len(out["scores"]) > 0
    assert (out["scales"] == 1.0).all()
    assert out["global_descriptors"].shape == (2, TINY_DIM)


def test_zero_max_features_extracts_global_only(run_and_model):
    out = extract(run_and_model[2].signatures["serving_default"], random_image(64, 64), max_features=0)
    assert out["features"].shape == (0, 128) and out["boxes"].shape == (0, 4)
    assert out["global_descriptors"].shape == (1, TINY_DIM)


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
    save_delg(averaging_model(), tmp_path / "delg", xla=False)
    signature = tf.saved_model.load(str(tmp_path / "delg")).signatures["serving_default"]
    image = np.zeros((160, 128, 3), np.uint8)
    centre = np.array([96, 64])
    image[centre[0] - 8 : centre[0] + 8, centre[1] - 8 : centre[1] + 8] = 255
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


# --- The batched global function (global_batch, global_batch_float16) ---


def per_image_descriptors(signature, images: np.ndarray, scales: list[float]) -> np.ndarray:
    """The script's per-image path: serving_default's rows at `scales`, each L2-normalized, summed, L2-normalized."""
    descriptors = []
    for image in images:
        rows = extract(signature, image, scales=scales, max_features=0, global_indices=range(len(scales)))[
            "global_descriptors"
        ]
        total = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).sum(axis=0)
        descriptors.append(total / np.linalg.norm(total))
    return np.stack(descriptors)


def batched_descriptors(signature, images: np.ndarray, scales: list[float]) -> np.ndarray:
    out = signature(input_images=tf.constant(images, tf.uint8), input_scales=tf.constant(scales, tf.float32))
    assert set(out) == {GLOBAL_BATCH_OUTPUT} and out[GLOBAL_BATCH_OUTPUT].dtype == tf.float32
    return out[GLOBAL_BATCH_OUTPUT].numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def image_batch(count: int, height: int, width: int) -> np.ndarray:
    """Images of one size that differ in content: noise at different seeds, and smooth ramps."""
    rows = np.linspace(0, 255, height)[:, None, None]
    cols = np.linspace(0, 255, width)[None, :, None]
    ramps = [np.broadcast_to(rows * (i % 2) + cols * (1 - i % 2), (height, width, 3)) for i in range(count // 2)]
    noise = [random_image(height, width, seed) for seed in range(count - len(ramps))]
    return np.stack([*ramps, *noise]).astype(np.uint8)


def landmark_images(competition: Path, count: int, height: int, width: int) -> np.ndarray:
    """One training image of each of `count` landmarks of the competition, resized to one size."""
    folder = competition / "landmark-recognition"
    train = pd.read_csv(folder / "train.csv", dtype={"id": str}).drop_duplicates("landmark_id").head(count)
    images = [
        Image.open(image_path(folder, "train", image_id)).convert("RGB").resize((width, height))
        for image_id in train["id"]
    ]
    return np.stack([np.asarray(image) for image in images])


def saved_functions(saved_model_dir: Path) -> tuple[list[str], list[str]]:
    """Names of the SavedModel's functions marked for XLA, and of those with a float16 convolution."""
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    functions = saved_model.meta_graphs[0].graph_def.library.function
    compiled = [f.signature.name for f in functions if f.attr["_XlaMustCompile"].b]
    half = [
        f.signature.name
        for f in functions
        if any(node.op == "Conv2D" and node.attr["T"].type == tf.float16.as_datatype_enum for node in f.node_def)
    ]
    return compiled, half


def export_info(saved_model_dir: Path) -> dict:
    return json.loads((Path(saved_model_dir) / "assets" / EXPORT_INFO_FILE).read_text())


@pytest.fixture(scope="module")
def float16_export(tiny_float16_model):
    """The trained tiny run exported with --float16 (conftest's, whitened) and loaded back."""
    return tiny_float16_model, tf.saved_model.load(str(tiny_float16_model))


def test_batched_signatures_follow_the_contract(run_and_model, float16_export):
    root, model, loaded_plain = run_and_model
    expected_inputs = {spec.name: (spec.shape.as_list(), spec.dtype) for spec in GLOBAL_BATCH_SIGNATURE}
    plain = [GLOBAL_BATCH, GLOBAL_BATCH + XLA_SUFFIX]
    half = [GLOBAL_BATCH_FLOAT16, GLOBAL_BATCH_FLOAT16 + XLA_SUFFIX]
    plain_exported = plain if EXPORT_XLA[model.cfg.backbone] else [GLOBAL_BATCH]
    for (out, loaded), names in (((root / "delg", loaded_plain), plain_exported), (float16_export, plain + half)):
        assert sorted(loaded.signatures) == sorted(["serving_default", *names])
        for name in names:
            _, inputs = loaded.signatures[name].structured_input_signature
            assert {key: (spec.shape.as_list(), spec.dtype) for key, spec in inputs.items()} == expected_inputs
            outputs = loaded.signatures[name].structured_outputs
            assert {key: (spec.shape.as_list(), spec.dtype) for key, spec in outputs.items()} == {
                GLOBAL_BATCH_OUTPUT: ([None, TINY_DIM], tf.float32)
            }
        info = export_info(out)
        assert sorted(info["functions"]) == sorted(loaded.signatures)
        assert [info["functions"][name]["xla"] for name in names] == [n.endswith(XLA_SUFFIX) for n in names]
        assert info["xla_errors"] == {}, "XLA runs on this CPU"
        assert [info["functions"][name]["float16"] for name in names] == [n in half for n in names]
        assert (info["global_dim"], info["local_dim"]) == (TINY_DIM, 128)
        assert info["local_stride"] == delg.DelgExtractor(model).field.stride
        compiled, float16_functions = saved_functions(out)
        assert len(compiled) == sum(name.endswith(XLA_SUFFIX) for name in names)
        assert len(float16_functions) == len(set(names) & set(half))


@pytest.mark.parametrize("size", [(72, 100), (57, 41)])
def test_batched_descriptors_equal_the_per_image_path(float16_export, tiny_competition, size):
    _, loaded = float16_export
    images = landmark_images(tiny_competition, 4, *size)
    batched = batched_descriptors(loaded.signatures[GLOBAL_BATCH], images, GLOBAL_SCALES)
    per_image = per_image_descriptors(loaded.signatures["serving_default"], images, GLOBAL_SCALES)
    assert batched.shape == (4, TINY_DIM)
    assert cosines(batched, per_image).min() >= 0.999
    np.testing.assert_allclose(batched, per_image, atol=1e-4)
    assert cosines(batched[:1], batched[1:]).max() < 0.999, "the images' descriptors differ from each other"


def test_float16_descriptors_agree_with_float32(float16_export, tiny_competition):
    _, loaded = float16_export
    images = landmark_images(tiny_competition, 4, 80, 64)
    float32 = batched_descriptors(loaded.signatures[GLOBAL_BATCH], images, GLOBAL_SCALES)
    float16 = batched_descriptors(loaded.signatures[GLOBAL_BATCH_FLOAT16], images, GLOBAL_SCALES)
    assert np.isfinite(float16).all()
    np.testing.assert_allclose(np.linalg.norm(float16, axis=1), 1.0, atol=1e-5)
    assert cosines(float16, float32).min() >= 0.99
    assert np.abs(float16 - float32).max() > 1e-6, "float16 compute rounds differently from float32"


def test_float16_shares_the_float32_weights(tiny_model, float16_export):
    def weights_bytes(out: Path) -> int:
        return sum(path.stat().st_size for path in (out / "variables").glob("variables.data-*"))

    # The same run exported without float16 or whitening, plus the whitening's float32 mean and projection.
    float32_only = weights_bytes(tiny_model) + 4 * (TINY_DIM + TINY_DIM * TINY_DIM)
    assert float32_only <= weights_bytes(float16_export[0]) < 1.01 * float32_only


def test_float16_pooling_survives_activations_beyond_float16_cubes(tmp_path):
    model = DelgModel(get_config("tiny"), num_classes=2)
    model(tf.zeros([1, 64, 64, 3]))
    images = image_batch(2, 64, 96)

    def conv5_max() -> float:
        return float(tf.reduce_max(model.features(tf.constant(images, tf.float32))[1]))

    # conv5 = relu(bn(shortcut) + bn(residual)): scaling both batch norms scales conv5; its largest value
    # becomes 500, whose cube (1.25e8) overflows float16 (max 65504) while 500 itself does not.
    factor = 500.0 / conv5_max()
    for layer in model.backbone.layers:
        if layer.name in ("conv5_block1_0_bn", "conv5_block1_3_bn"):
            layer.gamma.assign(layer.gamma * factor)
            layer.beta.assign(layer.beta * factor)
    assert 400 < conv5_max() < 600
    save_delg(model, tmp_path / "delg", float16=True, xla=False)
    loaded = tf.saved_model.load(str(tmp_path / "delg"))
    float16 = batched_descriptors(loaded.signatures[GLOBAL_BATCH_FLOAT16], images, GLOBAL_SCALES)
    float32 = batched_descriptors(loaded.signatures[GLOBAL_BATCH], images, GLOBAL_SCALES)
    assert np.isfinite(float16).all() and cosines(float16, float32).min() >= 0.99


def test_a_function_failing_under_xla_is_left_out(tmp_path, monkeypatch, caplog):
    make_run_dir(tmp_path / "run")
    real_check = delg.failing_functions
    checks = []
    compiled_name = GLOBAL_BATCH + XLA_SUFFIX

    def xla_fails_once(saved_model_dir, names):
        checks.append(saved_functions(saved_model_dir)[0])
        return (
            {compiled_name: "Detected unsupported operations when trying to compile"}
            if len(checks) == 1
            else real_check(saved_model_dir, names)
        )

    monkeypatch.setattr(delg, "failing_functions", xla_fails_once)
    export_delg(tmp_path / "run", tmp_path / "delg")
    assert [len(compiled) for compiled in checks] == [1, 0], "compiled at first, saved again without it"
    info = export_info(tmp_path / "delg")
    assert compiled_name not in info["functions"]
    assert info["functions"][GLOBAL_BATCH] == {"float16": False, "xla": False}
    assert info["xla_errors"] == {compiled_name: "Detected unsupported operations when trying to compile"}
    assert saved_functions(tmp_path / "delg")[0] == []
    assert "XLA fails on this machine" in caplog.text
    loaded = tf.saved_model.load(str(tmp_path / "delg"))
    images = image_batch(2, 64, 64)
    assert (
        cosines(
            batched_descriptors(loaded.signatures[GLOBAL_BATCH], images, GLOBAL_SCALES),
            per_image_descriptors(loaded.signatures["serving_default"], images, GLOBAL_SCALES),
        ).min()
        >= 0.999
    )


def test_no_xla_flag_compiles_nothing(tmp_path):
    make_run_dir(tmp_path / "run")
    assert (
        export_main(
            ["delg", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "delg"), "--no-xla", "--no-whiten"]
        )
        == 0
    )
    assert [f["xla"] for f in export_info(tmp_path / "delg")["functions"].values()] == [False, False]
    assert export_info(tmp_path / "delg")["whitening"] == {"applied": False}
    assert list(export_info(tmp_path / "delg")["functions"]) == ["serving_default", GLOBAL_BATCH]
    assert saved_functions(tmp_path / "delg")[0] == []


def test_older_exports_without_global_batch_still_load(tmp_path):
    """Google's TF1 models and earlier exports have no global_batch: the script's cue to use serving_default."""
    tf1 = tf.saved_model.load(str(write_tf1_model(tmp_path / "tf1")))
    assert GLOBAL_BATCH not in tf1.signatures
    feeds = [
        "input_image:0",
        "input_scales:0",
        "input_max_feature_num:0",
        "input_abs_thres:0",
        "input_global_scales_ind:0",
    ]
    prune = tf1.prune(feeds, ["global_descriptors:0"])
    rows = prune(
        tf.constant(random_image(64, 64)),
        tf.constant(GLOBAL_SCALES),
        tf.constant(0),
        tf.constant(0.0),
        tf.constant([0, 1, 2]),
    )[0]
    assert rows.shape == (3, 128)
    older = tf.saved_model.load(str(write_tf2_model(tmp_path / "tf2")))
    assert list(older.signatures) == ["serving_default"]
    batched = tf.saved_model.load(str(write_tf2_model(tmp_path / "tf2-batched", batched=True)))
    images = image_batch(3, 48, 40)
    assert (
        cosines(
            batched_descriptors(batched.signatures[GLOBAL_BATCH], images, GLOBAL_SCALES),
            per_image_descriptors(batched.signatures["serving_default"], images, GLOBAL_SCALES),
        ).min()
        >= 0.999
    )
