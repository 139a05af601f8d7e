"""The training loop: it learns, it resumes exactly, mirrored equals default, SIGTERM checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

from common.cli import UserError, run_main
from tests import HANG_GUARD_S
from train import loop, run_files
from train.__main__ import main
from train.config import get_config
from train.data import folder_data, training_stream
from train.loop import Trainer, train
from train.run_files import CHECKPOINT_DIR, CONFIG_FILE, load_config, load_label_map, save_label_map
from train.strategy import make_strategy

REPO = Path(__file__).resolve().parents[1]


def small_config(**overrides):
    fields = {
        "image_size": 48,
        "batch_size": 8,
        "steps": 6,
        "warmup_steps": 2,
        "log_every": 2,
        "checkpoint_every": 3,
        "validate_every": 100,
        **overrides,
    }
    return get_config("tiny", **fields)


def test_loss_falls_within_a_few_dozen_steps(data_dir):
    cfg = small_config(image_size=64, batch_size=16, steps=60, warmup_steps=5, learning_rate=0.05)
    data = folder_data(data_dir, cfg)
    trainer = Trainer(cfg, len(data.landmark_ids), tf.distribute.get_strategy())
    iterator = iter(training_stream(data.epoch_source, data.train_count, cfg))
    mean_losses = []
    for _ in range(6):
        for _ in range(10):
            trainer.train_step(iterator)
        sums = trainer.take_sums()
        mean_losses.append(sums["total"] / sums["images"])
    assert mean_losses[-1] < 0.8 * mean_losses[0], mean_losses


def test_a_run_writes_its_files(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    cfg = load_config(tiny_run)
    assert metrics["step"] == cfg.steps and metrics["stopped_by"] is None
    assert metrics["strategy"] == "auto" and metrics["strategy_used"] == "default"
    assert metrics["applied_steps"] == cfg.steps and metrics["skipped_steps"] == 0  # float32: nothing skipped
    assert len(load_label_map(tiny_run)) == metrics["classes"]
    assert 0.0 <= metrics["validation_accuracy"] <= 1.0 and metrics["images_per_second"] > 0
    assert tf.train.latest_checkpoint(str(tiny_run / CHECKPOINT_DIR)).endswith(f"-{cfg.steps}")
    assert logged_steps(tiny_run / "logs" / "train", "loss_total")[-1] == cfg.steps  # written out and closed
    assert logged_steps(tiny_run / "logs" / "validation", "accuracy")[-1] == cfg.steps


def logged_steps(log_dir: Path, tag: str) -> list[int]:
    """The steps at which tag was written to the TensorBoard event files in log_dir."""
    records = tf.data.TFRecordDataset([str(f) for f in sorted(log_dir.glob("events.out.tfevents.*"))])
    events = [event_pb2.Event.FromString(record.numpy()) for record in records]
    return [event.step for event in events if any(value.tag == tag for value in event.summary.value)]


def checkpoint_values(run_dir: Path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run_dir / CHECKPOINT_DIR))
    dtypes = reader.get_variable_to_dtype_map()
    return {
        name: reader.get_tensor(name)
        for name, dtype in dtypes.items()
        if (dtype.is_floating or dtype.is_integer) and not name.startswith("save_counter")
    }


@pytest.fixture(scope="module")
def stopped_once(data_dir, tmp_path_factory) -> Path:
    """A run of small_config() stopped after 2 steps, trained once for the module."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    train(small_config(), data_dir=data_dir, run_dir=run_dir, strategy="default", stop_after=2)
    return run_dir


@pytest.fixture
def stopped_run(stopped_once, tmp_path):
    """A copy of the stopped run (this test's to change), and its config."""
    shutil.copytree(stopped_once, tmp_path / "run")
    return tmp_path / "run", small_config()


def test_a_stopped_run_resumes_at_its_step_with_the_same_weights(stopped_run, data_dir, tmp_path):
    run_dir, cfg = stopped_run
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == 2
    straight = train(cfg, data_dir=data_dir, run_dir=tmp_path / "straight", strategy="default")
    second = train(cfg, data_dir=data_dir, run_dir=run_dir, strategy="default")
    assert second["step"] == straight["step"] == cfg.steps
    expected, got = checkpoint_values(tmp_path / "straight"), checkpoint_values(run_dir)
    assert expected.keys() == got.keys() and any("optimizer" in name for name in got)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    again = train(cfg, data_dir=data_dir, run_dir=run_dir, strategy="default")
    assert again == second  # a finished run is not trained again and keeps its metrics
    longer = dataclasses.replace(cfg, steps=cfg.steps + 2, log_every=1, checkpoint_every=1)
    assert train(longer, data_dir=data_dir, run_dir=run_dir, strategy="default")["step"] == longer.steps
    assert load_config(run_dir) == longer


def test_a_checkpoint_of_an_older_kit_restores_its_plain_sgd_state(stopped_run, data_dir):
    run_dir, cfg = stopped_run
    landmark_ids = load_label_map(run_dir)
    prefix = tf.train.latest_checkpoint(str(run_dir / CHECKPOINT_DIR))
    saved = Trainer(cfg, len(landmark_ids), tf.distribute.get_strategy())
    saved.checkpoint.restore(prefix).assert_existing_objects_matched()
    old = tf.train.Checkpoint(
        model=saved.model, optimizer=saved.optimizer.inner_optimizer, step=saved.step, data_position=saved.data_position
    )  # SGD at the top, as the kit saved it before
    assert run_files.checkpoint_manager(old, run_dir).save(checkpoint_number=2) == prefix
    assert run_files.has_plain_optimizer(prefix)
    resumed = Trainer(cfg, len(landmark_ids), tf.distribute.get_strategy())
    loop.restore_or_join(resumed, run_dir, resume=True, landmark_ids=landmark_ids)
    assert int(resumed.step) == 2 and resumed.applied_steps == 2
    momentum = [v for v in resumed.optimizer.inner_optimizer.variables if "momentum" in v.path]
    assert momentum and any(np.any(v.numpy() != 0) for v in momentum)

    def restored(trainer):  # what the older checkpoint held (the loss-scale optimizer's own counters excepted)
        inner = trainer.optimizer.inner_optimizer
        return [*loop.model_and_optimizer_variables(trainer.model, inner), trainer.step, trainer.data_position]

    for a, b in zip(restored(saved), restored(resumed), strict=True):
        np.testing.assert_array_equal(b.numpy(), a.numpy())


def test_resuming_with_another_config_is_refused_and_leaves_the_run_as_it_was(stopped_run, data_dir):
    run_dir, cfg = stopped_run
    saved = (run_dir / CONFIG_FILE).read_text()
    other = dataclasses.replace(cfg, embedding_dim=cfg.embedding_dim // 2, steps=cfg.steps + 1)
    with pytest.raises(
        UserError,
        match=rf"config\.json.*embedding_dim {cfg.embedding_dim} -> {other.embedding_dim}"
        r"\); only",
    ):  # steps may change, so it is not named
        train(other, data_dir=data_dir, run_dir=run_dir, strategy="default")
    assert (run_dir / CONFIG_FILE).read_text() == saved


def test_resuming_on_other_landmarks_is_refused(stopped_run, data_dir):
    run_dir, cfg = stopped_run
    landmark_ids = load_label_map(run_dir)
    save_label_map(run_dir, [landmark_ids[1], landmark_ids[0], *landmark_ids[2:]])  # as if --data had changed
    with pytest.raises(UserError, match=r"label_map\.csv.*class 0 is landmark"):
        train(cfg, data_dir=data_dir, run_dir=run_dir, strategy="default")


def test_an_unreadable_checkpoint_is_a_user_error(stopped_run, data_dir):
    run_dir, cfg = stopped_run
    for shard in (run_dir / CHECKPOINT_DIR).glob("ckpt-2.data-*"):
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match=r"ckpt-2: cannot resume from this checkpoint: [^\n]+$"):
        train(cfg, data_dir=data_dir, run_dir=run_dir, strategy="default")


def doubled_batch(cfg, num_classes: int) -> tf.data.Dataset:
    """One global batch made of the same half twice, so per-replica batch norm sees the global statistics."""
    half = cfg.batch_size // 2
    images = tf.random.uniform([half, cfg.image_size, cfg.image_size, 3], 0, 255, seed=5)
    labels = tf.random.uniform([half], 0, num_classes, dtype=tf.int64, seed=6)
    batch = {
        "image": tf.concat([images, images], 0),
        "label": tf.concat([labels, labels], 0),
        "position": tf.range(cfg.batch_size, dtype=tf.int64),
    }
    return tf.data.Dataset.from_tensors(batch).repeat()


def one_step(strategy: tf.distribute.Strategy, cfg) -> tuple[float, list[np.ndarray]]:
    trainer = Trainer(cfg, 10, strategy)
    iterator = iter(strategy.experimental_distribute_dataset(doubled_batch(cfg, 10)))
    trainer.train_step(iterator)
    sums = trainer.take_sums()
    return sums["total"] / sums["images"], [v.numpy() for v in trainer.model.trainable_variables]


def test_mirrored_over_two_cpus_with_xla_takes_the_same_step_as_default():
    """--xla compiles only each replica's forward and backward pass: the all-reduce, clipping and update it checks
    here are the ones a mirrored run without XLA takes (test_train_distributed runs that one through resuming)."""
    # clipping active: checks the global norm; a narrow net at 32 px keeps the XLA compilation short
    cfg = small_config(learning_rate=0.05, warmup_steps=0, clip_norm=1.0, image_size=32, tiny_widths=(4, 8, 8, 16))
    mirrored = make_strategy("mirrored")
    assert mirrored.num_replicas_in_sync == 2
    default_loss, default_weights = one_step(tf.distribute.get_strategy(), cfg)
    mirrored_loss, mirrored_weights = one_step(mirrored, dataclasses.replace(cfg, xla=True))
    assert mirrored_loss == pytest.approx(default_loss, rel=1e-4)
    for a, b in zip(default_weights, mirrored_weights, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)


def test_sigterm_checkpoints_and_the_run_continues(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "train",
        "--data",
        str(data_dir),
        "--config",
        "tiny",
        "--out",
        str(run_dir),
        "--steps",
        "2000",
        "--image-size",
        "48",
        "--batch-size",
        "8",
        "--checkpoint-every",
        "5",
        "--validate-every",
        "100000",
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    deadline = time.monotonic() + HANG_GUARD_S  # the first checkpoint, however slow a loaded machine is to reach it
    while (
        not list((run_dir / CHECKPOINT_DIR).glob("ckpt-*.index"))
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=HANG_GUARD_S)[0].decode()
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped_by"] == "SIGTERM" and 5 <= metrics["step"] < 2000
    assert tf.train.latest_checkpoint(str(run_dir / CHECKPOINT_DIR)).endswith(f"-{metrics['step']}")
    resumed = train(load_config(run_dir), data_dir=data_dir, run_dir=run_dir, strategy="default", stop_after=2)
    assert resumed["step"] == metrics["step"] + 2


def test_float16_training_applies_its_steps_and_says_so(data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [
        "--data",
        str(data_dir),
        "--config",
        "tiny",
        "--out",
        str(run_dir),
        "--precision",
        "float16",
        "--steps",
        "16",
        "--image-size",
        "64",
        "--batch-size",
        "8",
        "--log-every",
        "4",
        "--validate-every",
        "100",
    ]
    assert run_main(main, argv) == 0, capsys.readouterr().err[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["precision"] == "float16" and metrics["keras_policy"] == "mixed_float16"
    assert metrics["applied_steps"] + metrics["skipped_steps"] == metrics["step"] == 16
    assert metrics["applied_steps"] > 8 and np.isfinite(metrics["loss_total"]) and metrics["loss_scale"] > 1
    assert logged_steps(run_dir / "logs" / "train", "interval_skipped_steps") == [4, 8, 12, 16]
    first = checkpoint_values(run_dir)
    assert all(np.all(np.isfinite(value)) for value in first.values())


def test_a_run_that_skips_every_step_ends_with_one_error_line(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "SKIP_WINDOW", 5)
    cfg = small_config(steps=40, learning_rate=1e30, warmup_steps=0, checkpoint_every=100)  # diverges at once
    with pytest.raises(UserError, match=r"^steps \d+-\d+: every one had non-finite gradients and was skipped"):
        train(cfg, data_dir=data_dir, run_dir=tmp_path / "run", strategy="default")
    assert not (tmp_path / "run" / "metrics.json").exists()
