"""--backbone-weights: ImageNet by default for every named Keras config; offline, a weight file that does not fit,
or ImageNet on the tiny backbone, is one `error:` line; a tiny backbone's own file is loaded, never ignored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from common.cli import run_main
from tests import HANG_GUARD_S
from train.__main__ import main
from train.backbone import build_backbone, tiny_resnet
from train.config import CONFIGS, TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = run_main(main, args)
    return code, capsys.readouterr().err


def test_every_named_keras_config_starts_from_imagenet():
    for name, cfg in CONFIGS.items():
        assert cfg.backbone_weights == ("none" if name == "tiny" else "imagenet"), name


def test_help_text_names_each_configs_weights():
    help_text = subprocess.run(
        [sys.executable, "-m", "train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=True,
    ).stdout
    flat = " ".join(help_text.split())
    for name in ("r50", "r101", "effv2s", "convnext-t", "convnext-b"):
        assert f"{name}: imagenet" in flat, name
    assert "tiny: none" in flat


def test_imagenet_offline_is_one_error_line_naming_the_file(data_dir, tmp_path):
    # An unreachable proxy keeps the test offline even on a machine with internet.
    env = {
        **os.environ,
        "KERAS_HOME": str(tmp_path / "keras"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--data",
            str(data_dir),
            "--config",
            "r50",
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "1",
            "--batch-size",
            "2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    expected = tmp_path / "keras" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"put that file at {expected}" in errors[0] and "--backbone-weights none" in errors[0], errors[0]
    assert not (tmp_path / "run" / "config.json").exists()


def test_imagenet_on_the_tiny_backbone_is_refused(data_dir, tmp_path, capsys):
    code, err = run_cli(
        ["--data", str(data_dir), "--out", str(tmp_path / "run"), "--backbone-weights", "imagenet"], capsys
    )
    assert (
        code == 2
        and err.startswith("error: --backbone-weights imagenet: there are no ImageNet weights for the tiny backbone")
        and err.count("\n") == 1
    ), err
    assert not (tmp_path / "run").exists()


def test_a_fake_or_misfitting_weight_file_is_one_error_line(data_dir, tmp_path, capsys):
    (tmp_path / "fake.h5").write_text("not an HDF5 file")
    tiny_resnet((8, 8, 8, 8)).save_weights(tmp_path / "narrow.weights.h5")
    for file in (tmp_path / "fake.h5", tmp_path / "narrow.weights.h5"):
        code, err = run_cli(
            ["--data", str(data_dir), "--out", str(tmp_path / "run"), "--backbone-weights", str(file), "--steps", "1"],
            capsys,
        )
        assert (
            code == 2
            and err.startswith(f"error: --backbone-weights {file}: cannot load it into the tiny backbone")
            and err.count("\n") == 1
        ), err
        assert not (tmp_path / "run" / "config.json").exists()


def test_a_tiny_backbones_own_file_is_used_and_recorded(data_dir, tmp_path):
    widths = CONFIGS["tiny"].tiny_widths
    saved = tiny_resnet(widths)
    saved.save_weights(tmp_path / "tiny.weights.h5")
    loaded = build_backbone(
        TrainConfig(backbone="tiny", tiny_widths=widths, backbone_weights=str(tmp_path / "tiny.weights.h5"))
    )
    fresh = build_backbone(TrainConfig(backbone="tiny", tiny_widths=widths))
    expected = {w.path: w.numpy() for w in saved.weights}
    for weight in loaded.weights:
        np.testing.assert_array_equal(weight.numpy(), expected[weight.path], err_msg=weight.path)
    assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(fresh.weights, loaded.weights, strict=True))
    run = tmp_path / "run"
    assert (
        run_main(
            main,
            [
                "--data",
                str(data_dir),
                "--out",
                str(run),
                "--backbone-weights",
                str(tmp_path / "tiny.weights.h5"),
                "--steps",
                "1",
                "--batch-size",
                "4",
                "--image-size",
                "64",
            ],
        )
        == 0
    )
    assert json.loads((run / "config.json").read_text())["backbone_weights"] == str(tmp_path / "tiny.weights.h5")
