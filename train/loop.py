"""The DELG training loop: a custom tf.distribute loop that checkpoints, resumes exactly and logs.

One step: each replica computes the per-example DELG losses, averages them over the GLOBAL batch,
and takes gradients; the gradients are clipped by the global norm of their all-replica sum and
applied by SGD with momentum under a warm-up + linear-decay schedule. The checkpoint holds the
model, the optimizer's state, the step and the position in the (deterministic) data stream.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2
from tqdm import tqdm

from common.cli import atomic_write_text
from train import run_files
from train.config import TrainConfig
from train.data import TrainingData, folder_data, training_stream, validation_stream
from train.losses import delg_losses
from train.model import DelgModel
from train.strategy import is_chief, make_strategy
from train.tfrecords import tfrecord_data

log = logging.getLogger(__name__)

LOSS_NAMES = ("total", "arcface", "attention", "reconstruction")
SUMMED = (*LOSS_NAMES, "correct", "images")  # per-interval sums kept on the device side
# What tensorboard's scalar summary writes; spelled out so that logging works without the tensorboard package.
SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR)


class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Rises linearly to `peak` over `warmup_steps`, then falls linearly to 0 at `total_steps`."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int):
        self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, total_steps

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = self.peak * (step + 1.0) / max(1, self.warmup_steps)
        decay = self.peak * (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps)
        return tf.maximum(0.0, tf.where(step < self.warmup_steps, warmup, decay))

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


@contextmanager
def precision_policy(cfg: TrainConfig) -> Iterator[str]:
    """mixed_float16 on GPUs, mixed_bfloat16 elsewhere, when cfg.mixed_precision; restored afterwards."""
    previous = keras.mixed_precision.global_policy()
    if cfg.mixed_precision:
        gpu = bool(tf.config.list_logical_devices("GPU"))
        keras.mixed_precision.set_global_policy("mixed_float16" if gpu else "mixed_bfloat16")
    try:
        yield keras.mixed_precision.global_policy().name
    finally:
        keras.mixed_precision.set_global_policy(previous)


def clip_across_replicas(grads: list[tf.Tensor], clip_norm: tf.Tensor) -> list[tf.Tensor]:
    """Scale this replica's gradients so that their sum over replicas has global norm <= clip_norm."""
    context = tf.distribute.get_replica_context()
    total = context.all_reduce(tf.distribute.ReduceOp.SUM, grads) if context.num_replicas_in_sync > 1 else grads
    scale = tf.minimum(1.0, clip_norm / tf.linalg.global_norm(total))
    return [g * scale for g in grads]


class Trainer:
    """Model, optimizer and the compiled steps of one run, under one strategy."""

    def __init__(self, cfg: TrainConfig, num_classes: int, strategy: tf.distribute.Strategy):
        self.cfg, self.strategy = cfg, strategy
        keras.utils.set_random_seed(cfg.seed)
        with strategy.scope():
            self.model = DelgModel(cfg, num_classes)
            self.model(tf.zeros([1, cfg.image_size, cfg.image_size, 3]))
            self.schedule = WarmupLinearDecay(cfg.learning_rate, cfg.warmup_steps, cfg.steps)
            self.optimizer = keras.optimizers.SGD(self.schedule, momentum=cfg.momentum)
            if keras.mixed_precision.global_policy().name == "mixed_float16":
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(self.model.trainable_variables)  # inside the scope, or Mirrored fails
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.data_position = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_position")
        self.sums = {name: tf.Variable(0.0, trainable=False, name=f"sum_{name}") for name in SUMMED}
        self.checkpoint = run_files.make_checkpoint(self.model, self.optimizer, self.step, self.data_position)
        self._replica_step = tf.function(self._replica_step, jit_compile=cfg.xla)
        self.train_step = tf.function(self._train_step)
        self.validation_step = tf.function(self._validation_step)

    def _replica_step(self, batch: dict[str, tf.Tensor]) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            outputs = self.model(batch["image"], training=True)
            losses = delg_losses(outputs, batch["label"], self.cfg)
            loss = tf.nn.compute_average_loss(losses["total"], global_batch_size=self.cfg.batch_size)
            scaled_loss = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled_loss, variables)
        loss_scale = getattr(self.optimizer, "dynamic_scale", 1.0)
        self.optimizer.apply_gradients(zip(clip_across_replicas(grads, self.cfg.clip_norm * loss_scale),
                                           variables, strict=True))
        sums = {name: tf.reduce_sum(losses[name]) for name in LOSS_NAMES}
        sums["correct"] = count_correct(outputs["cosine"], batch["label"])
        sums["images"] = tf.cast(tf.size(batch["label"]), tf.float32)
        return sums, tf.reduce_max(batch["position"], keepdims=True)

    def _train_step(self, iterator) -> None:
        """One optimizer step on the next global batch; interval sums and stream position updated in place."""
        sums, last_position = self.strategy.run(self._replica_step, args=(next(iterator),))
        for name, value in sums.items():
            self.sums[name].assign_add(self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None))
        self.data_position.assign(tf.reduce_max(self.strategy.gather(last_position, axis=0)) + 1)
        self.step.assign_add(1)

    def _validation_step(self, batch: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        def replica(batch):
            outputs = self.model(batch["image"], training=False)
            return count_correct(outputs["cosine"], batch["label"]), tf.cast(tf.size(batch["label"]), tf.float32)

        correct, count = self.strategy.run(replica, args=(batch,))
        return (self.strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None),
                self.strategy.reduce(tf.distribute.ReduceOp.SUM, count, axis=None))

    def take_sums(self) -> dict[str, float]:
        """The interval sums so far, then reset to zero."""
        values = {name: float(var.numpy()) for name, var in self.sums.items()}
        for var in self.sums.values():
            var.assign(0.0)
        return values

    def validate(self, batches: tf.data.Dataset) -> tuple[float, int]:
        """Top-1 accuracy of the cosine classifier (no margin) and the number of images it saw."""
        correct = count = 0.0
        for batch in self.strategy.experimental_distribute_dataset(batches):
            batch_correct, batch_count = self.validation_step(batch)
            correct, count = correct + float(batch_correct), count + float(batch_count)
        return correct / max(count, 1.0), int(count)


def count_correct(cosine: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(cosine, axis=-1), labels), tf.float32))


class StopSignals:
    """Turns SIGTERM/SIGINT into a request to stop at the next step boundary (main thread only)."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resolve_data(cfg: TrainConfig, data_dir: Path | None, tfrecords: Path | None) -> TrainingData:
    return tfrecord_data(tfrecords, cfg) if tfrecords else folder_data(data_dir, cfg)


def checkpoint_folder(run_dir: Path, strategy: tf.distribute.Strategy) -> Path:
    """The chief saves into the run; other workers (which must save too) into a private folder."""
    if is_chief(strategy):
        return run_dir
    return run_dir / f".worker-{strategy.cluster_resolver.task_id}"


def train(cfg: TrainConfig, data_dir: Path | None, run_dir: Path, strategy: str | tf.distribute.Strategy = "auto",
          resume: bool = True, tfrecords: Path | None = None, stop_after: int | None = None) -> dict:
    """Train DELG into run_dir (config.json, label_map.csv, checkpoints/, logs/, metrics.json); returns the metrics.

    With resume, a checkpoint in run_dir is continued from its step, provided the run's config (fields in
    run_files.RESUMABLE_FIELDS aside) and label map match; config.json and label_map.csv are written only
    once the checkpoint is restored. stop_after ends this call after that many steps with a checkpoint,
    as a SIGTERM would (for tests and time-sliced jobs).
    """
    run_dir = Path(run_dir)
    strategy = make_strategy(strategy) if isinstance(strategy, str) else strategy
    data = resolve_data(cfg, data_dir, tfrecords)
    chief = is_chief(strategy)
    folder = checkpoint_folder(run_dir, strategy)
    resuming = resume and tf.train.latest_checkpoint(str(folder / run_files.CHECKPOINT_DIR)) is not None
    if resuming:
        run_files.check_resumable(run_dir, cfg, data.landmark_ids)
    with precision_policy(cfg) as policy:
        trainer = Trainer(cfg, len(data.landmark_ids), strategy)
        manager = run_files.checkpoint_manager(trainer.checkpoint, folder)
        if resuming:
            run_files.restore_checkpoint(trainer.checkpoint, manager.latest_checkpoint,
                                         "cannot resume from this checkpoint",
                                         "; train with --no-resume or into another run folder")
            log.info("resumed %s at step %d", manager.latest_checkpoint, int(trainer.step))
        finished = run_dir / run_files.METRICS_FILE
        if int(trainer.step) >= cfg.steps and finished.is_file():
            log.info("%s is already trained to step %d; its metrics are in %s", run_dir, cfg.steps, finished)
            return json.loads(finished.read_text())
        if chief:
            run_files.save_config(run_dir, cfg)
            run_files.save_label_map(run_dir, data.landmark_ids)
        result = run_steps(trainer, data, manager, run_dir / "logs" if chief else None, stop_after)
    metrics = {**result, "backbone": cfg.backbone, "strategy": type(strategy).__name__,
               "replicas": strategy.num_replicas_in_sync, "precision": policy, "classes": len(data.landmark_ids),
               "train_images": data.train_count, "validation_images": data.validation_count}
    if chief:
        atomic_write_text(run_dir / run_files.METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    return metrics


def write_scalars(writer, step: int, values: dict[str, float]) -> None:
    with writer.as_default(step=step):
        for name, value in values.items():
            tf.summary.write(name, tf.constant(value, tf.float32), metadata=SCALAR_METADATA)


def summary_writer(logs: Path | None, name: str):
    return tf.summary.create_file_writer(str(logs / name)) if logs else tf.summary.create_noop_writer()


def run_steps(trainer: Trainer, data: TrainingData, manager: tf.train.CheckpointManager, logs: Path | None,
              stop_after: int | None) -> dict:
    """Steps from the checkpointed one to cfg.steps, logging, validating and checkpointing on the way."""
    cfg, strategy = trainer.cfg, trainer.strategy
    first_step = step = int(trainer.step)
    first_position = int(trainer.data_position)
    stream = training_stream(data.epoch_source, data.train_count, cfg, start=first_position)
    iterator = iter(strategy.experimental_distribute_dataset(stream))
    last_interval, images_delivered, validation_accuracy = {}, 0.0, None
    started = interval_start = time.perf_counter()
    with (closing(summary_writer(logs, "train")) as train_writer,
          closing(summary_writer(logs, "validation")) as validation_writer,
          StopSignals() as signals, tqdm(total=cfg.steps, initial=step, desc="train", unit="step") as bar):
        while step < cfg.steps and not signals.received and (stop_after is None or step - first_step < stop_after):
            trainer.train_step(iterator)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                last_interval, images = log_interval(trainer, step, time.perf_counter() - interval_start,
                                                     train_writer, bar)
                images_delivered += images
                interval_start = time.perf_counter()
            if step % cfg.validate_every == 0 or step == cfg.steps:
                validation_accuracy = validate(trainer, data, step, validation_writer)
            if step % cfg.checkpoint_every == 0:
                manager.save(checkpoint_number=step)
    if manager.latest_checkpoint is None or not manager.latest_checkpoint.endswith(f"-{step}"):
        manager.save(checkpoint_number=step)
    if signals.received:
        log.warning("%s received: checkpointed step %d and stopped", signals.received, step)
    images_delivered += trainer.take_sums()["images"]
    return {"step": step, "steps": cfg.steps, "stopped_by": signals.received,
            "seconds": round(time.perf_counter() - started, 2),
            "skipped_images": int(trainer.data_position) - first_position - int(images_delivered),
            "validation_accuracy": validation_accuracy, **last_interval}


def log_interval(trainer: Trainer, step: int, seconds: float, writer, bar: tqdm) -> tuple[dict, float]:
    """Mean losses, accuracy, learning rate and images/s since the last call, to TensorBoard and the bar."""
    sums = trainer.take_sums()
    images = max(sums["images"], 1.0)
    summary = {f"loss_{name}": sums[name] / images for name in LOSS_NAMES}
    summary["train_accuracy"] = sums["correct"] / images
    summary["learning_rate"] = float(trainer.schedule(step - 1))
    summary["images_per_second"] = sums["images"] / max(seconds, 1e-9)
    write_scalars(writer, step, summary)
    bar.set_postfix(loss=f"{summary['loss_total']:.3f}", img_s=f"{summary['images_per_second']:.0f}")
    return summary, sums["images"]


def validate(trainer: Trainer, data: TrainingData, step: int, writer) -> float | None:
    """Validation accuracy, logged and written to TensorBoard; None without validation images."""
    if data.validation_count == 0:
        return None
    accuracy, count = trainer.validate(validation_stream(data.validation_files(), trainer.cfg))
    write_scalars(writer, step, {"accuracy": accuracy})
    log.info("step %d: validation accuracy %.4f on %d images", step, accuracy, count)
    return accuracy
