"""Shared fixtures: one tiny competition, one tiny training run and two tiny exported models per session (the
plain export, and one with the float16 functions and a PCA whitening). Under pytest-xdist (`make test`) the workers
share them: the first to need one builds it, the others wait for it and read it.

TensorFlow is split into two logical CPU devices here, before anything initializes its devices,
so the strategy tests can run MirroredStrategy on a CPU-only machine.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import tensorflow as tf

WHITEN_IMAGES = 24  # training images the whitened export's PCA is fitted on (the tiny competition has more)
# The longest test files, in this order before all others: under `--dist loadfile` with --no-loadscope-reorder
# (pyproject's addopts) xdist hands out files in collection order, so the short ones fill in beside these and no
# long file is left to run alone at the end.
LONGEST_FIRST = (
    "test_demo.py",
    "test_train_multiworker.py",
    "test_train_loop.py",
    "test_train_distributed.py",
    "test_replay.py",
    "test_backbones.py",
    "test_tune.py",
    "test_export_delg.py",
    "test_plan.py",
)

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of LONGEST_FIRST first, in its order; the others after them, as collected."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """name's folder, built by build(folder) once per test run: under pytest-xdist in the run's shared temporary
    folder, by whichever worker comes first (the others wait on a lock), otherwise in this session's own."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name) / name
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent / "shared"  # the run's folder, above each worker's own
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker whose build failed left
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_competition(tmp_path_factory):
    """The `tiny` synthetic competition (GLDv2/Kaggle layout)."""
    from local_eval.synthetic import build_synthetic

    return built_once(tmp_path_factory, "competition", lambda out: build_synthetic(out, size="tiny", seed=0))


@pytest.fixture(scope="session")
def data_dir(tiny_competition) -> Path:
    """The tiny competition's recognition training data (train.csv, train/)."""
    return tiny_competition / "landmark-recognition"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir):
    """A run folder of the tiny config trained briefly on the tiny competition."""
    from train.config import get_config
    from train.loop import train

    cfg = get_config("tiny", steps=40, image_size=64, batch_size=16, checkpoint_every=20, validate_every=20)
    return built_once(tmp_path_factory, "run", lambda run_dir: train(cfg, data_dir=data_dir, run_dir=run_dir))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_run):
    """The tiny run exported as a DELG SavedModel folder."""
    from export.delg import export_delg

    return built_once(tmp_path_factory, "model", lambda out: export_delg(tiny_run, out))


@pytest.fixture(scope="session")
def tiny_float16_model(tmp_path_factory, tiny_run):
    """The tiny run exported through the command line with --float16 and a whitening fitted on WHITEN_IMAGES."""
    from export.__main__ import main as export_main

    def export(out: Path) -> None:
        argv = ["delg", "--run", str(tiny_run), "--out", str(out), "--float16", "--whiten-images", str(WHITEN_IMAGES)]
        assert export_main(argv) == 0

    return built_once(tmp_path_factory, "model_float16", export)


@pytest.fixture(scope="session")
def mirrored_reference(tmp_path_factory, data_dir):
    """A run of test_train_distributed's config() under MirroredStrategy over the two logical CPUs, uninterrupted."""
    from tests.test_train_distributed import STEPS, config
    from train.loop import train

    def build(run_dir: Path) -> None:
        metrics = train(config(), data_dir=data_dir, run_dir=run_dir, strategy="mirrored")
        assert metrics["step"] == STEPS and metrics["replicas"] == 2 and metrics["strategy"] == "mirrored"

    return built_once(tmp_path_factory, "mirrored", build)
