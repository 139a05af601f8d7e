"""Shared fixtures: one tiny competition, one tiny training run and two tiny exported models per session (the
plain export, and one with the float16 functions and a PCA whitening).

TensorFlow is split into two logical CPU devices here, before anything initializes its devices,
so the strategy tests can run MirroredStrategy on a CPU-only machine.
"""
from __future__ import annotations

import pytest
import tensorflow as tf

WHITEN_IMAGES = 24  # training images the whitened export's PCA is fitted on (the tiny competition has more)

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


@pytest.fixture(scope="session")
def tiny_competition(tmp_path_factory):
    """The `tiny` synthetic competition (GLDv2/Kaggle layout), built once per session."""
    from local_eval.synthetic import build_synthetic

    return build_synthetic(tmp_path_factory.mktemp("competition") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_competition):
    """A run folder of the tiny config trained briefly on the tiny competition."""
    from train.config import get_config
    from train.loop import train

    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    cfg = get_config("tiny", steps=40, image_size=64, batch_size=16, checkpoint_every=20, validate_every=20)
    train(cfg, data_dir=tiny_competition / "landmark-recognition", run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_run):
    """The tiny run exported as a DELG SavedModel folder."""
    from export.delg import export_delg

    out = tmp_path_factory.mktemp("model") / "delg"
    export_delg(tiny_run, out)
    return out


@pytest.fixture(scope="session")
def tiny_float16_model(tmp_path_factory, tiny_run):
    """The tiny run exported through the command line with --float16 and a whitening fitted on WHITEN_IMAGES."""
    from export.__main__ import main as export_main

    out = tmp_path_factory.mktemp("model_float16") / "delg"
    assert export_main(["delg", "--run", str(tiny_run), "--out", str(out), "--float16", "--whiten-images",
                        str(WHITEN_IMAGES)]) == 0
    return out
