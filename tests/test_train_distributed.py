"""Distributed training on CPU: mirrored over two logical CPUs through checkpoint and resume (two workers on
localhost are in test_train_multiworker).

The uninterrupted mirrored run (conftest's mirrored_reference, of config() here) is the reference of both: two
workers of one replica each split every global batch as two mirrored replicas do, so their weights agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from tests.test_train_loop import checkpoint_values
from train.config import TrainConfig, get_config
from train.loop import train
from train.run_files import CHECKPOINT_DIR

STEPS = 32
FLAGS = {
    "image_size": 64,
    "batch_size": 8,
    "steps": STEPS,
    "warmup_steps": 4,
    "checkpoint_every": 4,
    "log_every": 4,
    "validate_every": 1000,
}


def config() -> TrainConfig:
    """The config of every distributed run here and in test_train_multiworker."""
    return get_config("tiny", **FLAGS)


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    """run_dir's last checkpoint holds reference's values, the optimizer's included."""
    expected, got = checkpoint_values(reference), checkpoint_values(run_dir)
    assert expected.keys() == got.keys() and any("optimizer" in name for name in got)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_mirrored_resumes_at_its_step_with_the_same_weights(data_dir, mirrored_reference, tmp_path):
    run_dir = tmp_path / "run"
    first = train(config(), data_dir=data_dir, run_dir=run_dir, strategy="mirrored", stop_after=6)
    assert first["step"] == 6 and tf.train.latest_checkpoint(str(run_dir / CHECKPOINT_DIR)).endswith("-6")
    second = train(config(), data_dir=data_dir, run_dir=run_dir, strategy="mirrored")
    assert second["step"] == STEPS and second["applied_steps"] == STEPS and second["skipped_steps"] == 0
    assert_same_weights(run_dir, mirrored_reference)
