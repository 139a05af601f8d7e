"""The DELG training loop: a custom tf.distribute loop that checkpoints, resumes exactly and logs.

One step: each replica computes the per-example DELG losses, averages them over the GLOBAL batch,
and takes gradients of the loss times the loss scale; the gradients are clipped by the global norm of
their all-replica sum and applied by SGD with momentum under a warm-up + linear-decay schedule, unless
they are not finite: then the step is skipped (and counted). The checkpoint holds the model, the
optimizer's state, the step and the position in the (deterministic) data stream.

Multi-worker runs follow TensorFlow's conventions: the chief (worker 0) restores and writes the run
folder, the other workers save into temporary folders; at start every worker takes the chief's state,
and a stop signal on any worker stops the whole group after the same step, with the chief's checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import signal
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2
from tqdm import tqdm

from common.cli import UserError, atomic_write_text
from train import run_files
from train.arcface import dynamic_margins
from train.config import TrainConfig, check_config, flag_name
from train.data import TrainingData, folder_data, training_stream, validation_stream
from train.init_from import init_from_run
from train.losses import delg_losses
from train.model import DelgModel
from train.precision import keras_policy, precision_policy
from train.strategy import is_chief, make_strategy, strategy_name, worker_count, worker_id
from train.tfrecords import tfrecord_data
from train.validate import BestCheckpoint, CompetitionValidator

log = logging.getLogger(__name__)

LOSS_NAMES = ("total", "arcface", "attention", "reconstruction")
SUMMED = (*LOSS_NAMES, "correct", "images", "skipped")  # per-interval sums kept on the device side
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # either one checkpoints and stops the whole group
SKIP_WINDOW = 50  # this many steps in a row with non-finite gradients end the run: nothing is being learned
NEVER = 2**31 - 1  # dynamic_growth_steps of a loss scale that stays put
# What a collective raises on the survivors when a worker of the group dies (a preempted VM, kill -9).
PEER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
    tf.errors.DeadlineExceededError,
)
# What tensorboard's scalar summary writes; spelled out so that logging works without the tensorboard package.
SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"), data_class=summary_pb2.DATA_CLASS_SCALAR
)


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


def make_optimizer(cfg: TrainConfig, schedule) -> keras.optimizers.LossScaleOptimizer:
    """SGD with momentum inside Keras's LossScaleOptimizer, whatever the precision: it skips every step whose
    gradients are not finite, so no NaN ever reaches the weights. float16 scales the loss dynamically (from
    2^15, halved at each skipped step, doubled after 2000 clean ones); float32 and bfloat16 have the range to
    need no scaling and keep a scale of 1 (halved only by a skipped step: exact, powers of two)."""
    sgd = keras.optimizers.SGD(schedule, momentum=cfg.momentum)
    if cfg.precision == "float16":
        return keras.optimizers.LossScaleOptimizer(sgd)
    return keras.optimizers.LossScaleOptimizer(sgd, initial_scale=1.0, dynamic_growth_steps=NEVER)


def sum_over_replicas(values: list[tf.Tensor]) -> list[tf.Tensor]:
    """In a replica context: the sum of `values` over every replica of every worker."""
    context = tf.distribute.get_replica_context()
    return context.all_reduce(tf.distribute.ReduceOp.SUM, values) if context.num_replicas_in_sync > 1 else values


def clip_across_replicas(grads: list[tf.Tensor], clip_norm: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor]:
    """Scale this replica's gradients so that their sum over replicas has global norm <= clip_norm; also whether
    that sum is finite. When it is not, every replica's gradients become NaN, so that the loss-scale optimizer
    of every replica (it looks at its own) skips the step alike."""
    norm = tf.linalg.global_norm(sum_over_replicas(grads))
    finite = tf.math.is_finite(norm)
    scale = tf.where(finite, tf.minimum(1.0, clip_norm / norm), float("nan"))
    return [g * scale for g in grads], finite


def model_and_optimizer_variables(model: keras.Model, optimizer) -> list[tf.Variable]:
    """The TensorFlow variables under the model's and the optimizer's Keras variables."""
    return [v.value if isinstance(v, keras.Variable) else v for v in [*model.variables, *optimizer.variables]]


class Trainer:
    """Model, optimizer and the compiled steps of one run, under one strategy."""

    def __init__(
        self,
        cfg: TrainConfig,
        num_classes: int,
        strategy: tf.distribute.Strategy,
        class_counts: list[int] | None = None,
    ):
        self.cfg, self.strategy = cfg, strategy
        self.margins = class_margins(cfg, class_counts)
        keras.utils.set_random_seed(cfg.seed)
        with strategy.scope(), precision_policy(cfg.precision):
            self.model = DelgModel(cfg, num_classes)
            self.model(tf.zeros([1, cfg.image_size, cfg.image_size, 3]))
            self.schedule = WarmupLinearDecay(cfg.learning_rate, cfg.warmup_steps, cfg.steps)
            self.optimizer = make_optimizer(cfg, self.schedule)
            self.optimizer.build(self.model.trainable_variables)  # inside the scope, or Mirrored fails
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.data_position = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_position")
        self.sums = {name: tf.Variable(0.0, trainable=False, name=f"sum_{name}") for name in SUMMED}
        self.checkpoint = run_files.make_checkpoint(self.model, self.optimizer, self.step, self.data_position)
        if cfg.xla:
            self._scaled_gradients = tf.function(self._scaled_gradients, jit_compile=True)
        self.train_step = tf.function(self._train_step)
        self.validation_step = tf.function(self._validation_step)

    @property
    def applied_steps(self) -> int:
        """Steps whose update reached the weights (the inner optimizer counts only those)."""
        return int(self.optimizer.iterations.numpy())

    @property
    def loss_scale(self) -> float:
        return float(self.optimizer.dynamic_scale.numpy())

    def variables(self) -> list[tf.Variable]:
        """Everything the checkpoint holds: model, optimizer, step and stream position."""
        return [*model_and_optimizer_variables(self.model, self.optimizer), self.step, self.data_position]

    def _scaled_gradients(self, batch: dict[str, tf.Tensor]):
        """Forward and backward pass of one replica (the part --xla compiles): outputs, per-example losses and
        the gradients of the loss-scaled mean loss over the global batch."""
        with tf.GradientTape() as tape:
            outputs = self.model(batch["image"], training=True)
            losses = delg_losses(outputs, batch["label"], self.cfg, self.margins)
            weights = batch.get("weight")  # --not-clean-weight (a batch without weights weighs 1); logged: unweighted
            weighted = losses["total"] if weights is None else losses["total"] * weights
            loss = tf.nn.compute_average_loss(weighted, global_batch_size=self.cfg.batch_size)
            scaled_loss = self.optimizer.scale_loss(loss)
        return outputs, losses, tape.gradient(scaled_loss, self.model.trainable_variables)

    def _replica_step(self, batch: dict[str, tf.Tensor], stop_request: tf.Tensor):
        outputs, losses, grads = self._scaled_gradients(batch)
        grads, finite = clip_across_replicas(grads, self.cfg.clip_norm * self.optimizer.dynamic_scale)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables, strict=True))
        sums = {name: tf.reduce_sum(losses[name]) for name in LOSS_NAMES}
        sums["correct"] = count_correct(outputs["cosine"], batch["label"])
        sums["images"] = tf.cast(tf.size(batch["label"]), tf.float32)
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        sums["skipped"] = (1.0 - tf.cast(finite, tf.float32)) / replicas  # sums to 1 over replicas
        stop_agreed = sum_over_replicas([tf.identity(stop_request)])[0]  # identity: a value of this replica
        return sums, tf.reduce_max(batch["position"], keepdims=True), stop_agreed

    def _train_step(self, iterator, stop_request: tf.Tensor | None = None) -> tf.Tensor:
        """One step on the next global batch; interval sums and stream position updated in place.

        stop_request flags the stop signals this worker received (StopSignals.request()). Returns, the same on
        every worker: the flags summed over the group, then 1.0 if this step was skipped (else 0.0)."""
        if stop_request is None:
            stop_request = tf.zeros([len(STOP_SIGNALS)])
        sums, last_position, stop_agreed = self.strategy.run(self._replica_step, args=(next(iterator), stop_request))
        for name, value in sums.items():
            self.sums[name].assign_add(self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None))
        self.data_position.assign(tf.reduce_max(self.strategy.gather(last_position, axis=0)) + 1)
        self.step.assign_add(1)
        skipped = self.strategy.reduce(tf.distribute.ReduceOp.SUM, sums["skipped"], axis=None)
        stop_agreed = self.strategy.experimental_local_results(stop_agreed)[0]
        return tf.concat([stop_agreed, [tf.round(skipped)]], axis=0)

    def _validation_step(self, batch: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        def replica(batch):
            outputs = self.model(batch["image"], training=False)
            return count_correct(outputs["cosine"], batch["label"]), tf.cast(tf.size(batch["label"]), tf.float32)

        correct, count = self.strategy.run(replica, args=(batch,))
        return (
            self.strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None),
            self.strategy.reduce(tf.distribute.ReduceOp.SUM, count, axis=None),
        )

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


def class_margins(cfg: TrainConfig, class_counts: list[int] | None) -> tf.Tensor | None:
    """Each class's ArcFace margin under --dynamic-margin (None without it: cfg.arcface_margin for all)."""
    if not cfg.dynamic_margin:
        return None
    flag = flag_name("dynamic_margin")
    if class_counts is None:
        raise UserError(
            f"{flag}: the data does not say how many images each class has; "
            "write the TFRecord shards again with this kit's `python -m train.tfrecords`"
        )
    margins = dynamic_margins(class_counts, *cfg.dynamic_margin)
    if margins.min() < 0 or margins.max() >= math.pi / 2:
        raise UserError(
            f"{flag} {','.join(map(str, cfg.dynamic_margin))}: the margins range from "
            f"{margins.min():.3f} to {margins.max():.3f} on this data; each must be in [0, pi/2)"
        )
    log.info("dynamic ArcFace margins from %.3f to %.3f", margins.min(), margins.max())
    return tf.constant(margins)


def count_correct(cosine: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(cosine, axis=-1), labels), tf.float32))


class StopSignals:
    """Turns SIGTERM/SIGINT into a request to stop at the next step boundary (main thread only)."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def request(self) -> tf.Tensor:
        """One flag per STOP_SIGNALS entry: 1.0 for the signal received here, if any."""
        return tf.constant([float(self.received == sig.name) for sig in STOP_SIGNALS])

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agreed_signal(flags) -> str | None:
    """The name of the first STOP_SIGNALS entry that some worker received (flags summed over the group)."""
    return next((sig.name for sig, flag in zip(STOP_SIGNALS, flags, strict=True) if flag > 0), None)


def group_sum(strategy: tf.distribute.Strategy, values: list[tf.Tensor], chief_only: bool = False) -> list:
    """The sum of `values` over every worker of the group (each worker passes its own); with chief_only, only
    the chief's first replica contributes, which hands every worker the chief's values."""

    def replica():
        context = tf.distribute.get_replica_context()
        first = tf.equal(context.replica_id_in_sync_group, 0)
        mine = [tf.where(first, v, tf.zeros_like(v)) if chief_only else tf.identity(v) for v in values]
        summed = [None] * len(mine)
        for dtype in {v.dtype for v in mine}:  # one all-reduce per type: it packs its tensors together
            indices = [i for i, v in enumerate(mine) if v.dtype == dtype]
            for i, value in zip(
                indices, context.all_reduce(tf.distribute.ReduceOp.SUM, [mine[i] for i in indices]), strict=True
            ):
                summed[i] = value
        return summed

    summed = tf.function(lambda: strategy.run(replica))()
    return [strategy.experimental_local_results(value)[0] for value in summed]


def join_the_chief(trainer: Trainer, cfg: TrainConfig, landmark_ids: list[int]) -> None:
    """Multi-worker start: check that every worker runs the chief's config on the chief's classes, then give
    every worker the chief's weights, optimizer state, step and stream position (what it restored, or its
    fresh initialisation): the group starts at one step whatever each worker's own folder held."""
    strategy = trainer.strategy
    mine = tf.constant(
        [
            zlib.crc32(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()),
            zlib.crc32(json.dumps(landmark_ids).encode()),
        ],
        tf.int64,
    )
    chiefs = group_sum(strategy, [mine], chief_only=True)[0]
    differing = group_sum(strategy, [tf.cast(tf.reduce_any(mine != chiefs), tf.int64)])[0]
    if int(differing) > 0:
        what = "this worker's" if bool(tf.reduce_any(mine != chiefs)) else "another worker's"
        raise UserError(
            f"worker {worker_id(strategy)}: {what} config or training classes differ from the chief's; "
            "start every worker with the same command and data"
        )
    variables = trainer.variables()
    for variable, value in zip(variables, group_sum(strategy, variables, chief_only=True), strict=True):
        variable.assign(value)
    log.info("worker %d starts at the chief's step %d", worker_id(strategy), int(trainer.step))


class CheckpointWriter:
    """Checkpoints as TensorFlow's multi-worker convention has them: every worker saves, at the same steps;
    the chief into RUN_DIR/checkpoints (kept, resumed from), the others into a temporary folder deleted at once."""

    def __init__(self, trainer: Trainer, run_dir: Path):
        self.checkpoint = trainer.checkpoint
        self.worker = worker_id(trainer.strategy)
        self.manager = run_files.checkpoint_manager(self.checkpoint, run_dir) if self.worker == 0 else None
        self.temporary = run_dir / f"workertemp_{self.worker}"
        latest = self.manager.latest_checkpoint if self.manager else None
        self.last_step = int(trainer.step) if latest and latest.endswith(f"-{int(trainer.step)}") else None

    def save(self, step: int) -> None:
        """Checkpoint `step`; a write that fails (a full disk) is one UserError, with what it left removed and the
        newest complete checkpoint kept."""
        try:
            if self.manager is not None:
                self.manager.save(checkpoint_number=step)
            else:
                self.checkpoint.write(str(self.temporary / run_files.CHECKPOINT_DIR / f"ckpt-{step}"))
                shutil.rmtree(self.temporary, ignore_errors=True)
        except (tf.errors.OpError, OSError) as err:
            raise self.failed_save(step, err) from None
        self.last_step = step

    def failed_save(self, step: int, err: Exception) -> UserError:
        """Remove what a failed save of `step` left (TensorFlow's ckpt-STEP_temp folder, a partial ckpt-STEP) and
        say which checkpoint a rerun resumes from."""
        if self.manager is None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            kept = "the chief's checkpoints"
        else:
            folder = Path(self.manager.directory)
            latest = tf.train.latest_checkpoint(str(folder))
            for leftover in folder.glob(f"ckpt-{step}_temp*"):
                shutil.rmtree(leftover, ignore_errors=True)
            if latest is None or Path(latest).name != f"ckpt-{step}":
                for partial in folder.glob(f"ckpt-{step}.*"):
                    partial.unlink(missing_ok=True)
            kept = f"the newest complete checkpoint, {latest}," if latest else "no earlier checkpoint"
        reason = first_line(err) if isinstance(err, tf.errors.OpError) else str(err)
        return UserError(
            f"cannot write the checkpoint of step {step} ({reason}); {kept} is kept: free some space "
            "and rerun the same command to resume"
        )


def first_line(err: tf.errors.OpError) -> str:
    """The first line of a TensorFlow error that says what happened (not where)."""
    lines = [line.strip() for line in err.message.splitlines()]
    useful = [line for line in lines if line and not line.startswith(("Graph execution error", "Detected at node"))]
    return useful[0] if useful else err.message.strip()


def resolve_data(cfg: TrainConfig, data_dir: Path | None, tfrecords: Path | None) -> TrainingData:
    if tfrecords and cfg.not_clean_weight:
        raise UserError(
            f"{flag_name('not_clean_weight')} {cfg.not_clean_weight:g}: TFRecord shards hold no clean "
            "list (they were written from the clean images alone); train from --data"
        )
    return tfrecord_data(tfrecords, cfg) if tfrecords else folder_data(data_dir, cfg)


def check_flags_fit(cfg: TrainConfig, strategy: tf.distribute.Strategy) -> None:
    """One-line errors for settings the strategy or the device cannot run."""
    name, replicas = strategy_name(strategy), strategy.num_replicas_in_sync
    if cfg.batch_size % replicas:
        raise UserError(
            f"--batch-size {cfg.batch_size}: not a multiple of the {replicas} replicas of "
            f"--strategy {name}; each replica takes an equal share of the global batch"
        )
    if cfg.precision == "float16" and name == "tpu":
        raise UserError("--precision float16: TPUs compute in bfloat16; use --precision bfloat16")


def train(
    cfg: TrainConfig,
    data_dir: Path | None,
    run_dir: Path,
    strategy: str | tf.distribute.Strategy = "auto",
    resume: bool = True,
    tfrecords: Path | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train DELG into run_dir (config.json, label_map.csv, checkpoints/, logs/, metrics.json); returns the metrics.

    With resume, a checkpoint in run_dir is continued from its step, provided the run's config (fields in
    run_files.RESUMABLE_FIELDS aside) and label map match; config.json and label_map.csv are written only
    once the checkpoint is restored. stop_after ends this call after that many steps with a checkpoint,
    as a SIGTERM would (for tests and time-sliced jobs). With --strategy multiworker, the chief (worker 0)
    restores and every other worker starts from the chief's state.
    """
    check_config(cfg)
    if cfg.init_from:  # config.json records where the run started, wherever it is run from
        cfg = dataclasses.replace(cfg, init_from=str(Path(cfg.init_from).resolve()))
    run_dir = Path(run_dir)
    run_files.check_run_folder(run_dir)
    chosen = strategy if isinstance(strategy, str) else strategy_name(strategy)
    strategy = make_strategy(strategy) if isinstance(strategy, str) else strategy
    check_flags_fit(cfg, strategy)
    data = resolve_data(cfg, data_dir, tfrecords)
    trainer = Trainer(cfg, len(data.landmark_ids), strategy, data.class_counts)
    chief, finished = is_chief(strategy), run_dir / run_files.METRICS_FILE
    best = competition_validation(cfg, trainer, run_dir) if chief else None
    with lost_peers_reported(strategy):
        restore_or_join(trainer, run_dir, resume, data.landmark_ids)
        if int(trainer.step) >= cfg.steps and finished.is_file():
            log.info("%s is already trained to step %d; its metrics are in %s", run_dir, cfg.steps, finished)
            return json.loads(finished.read_text())
        if chief:
            run_files.save_config(run_dir, cfg)
            run_files.save_label_map(run_dir, data.landmark_ids)
            run_files.save_data_source(run_dir, data_dir, tfrecords)
        result = run_steps(
            trainer, data, CheckpointWriter(trainer, run_dir), run_dir / "logs" if chief else None, stop_after, best
        )
    metrics = {**result, **run_description(cfg, chosen, strategy, data)}
    if chief:
        atomic_write_text(finished, json.dumps(metrics, indent=2) + "\n")
    return metrics


@contextmanager
def lost_peers_reported(strategy: tf.distribute.Strategy) -> Iterator[None]:
    """In a multi-worker group, a collective that fails because a worker died becomes one UserError line."""
    try:
        yield
    except PEER_ERRORS as err:
        if worker_count(strategy) == 1:
            raise
        raise UserError(
            f"worker {worker_id(strategy)}: lost the group ({type(err).__name__}: {first_line(err)}); "
            f"restart every worker with the same command: they resume together from the chief's "
            f"newest checkpoint"
        ) from None


def restore_or_join(trainer: Trainer, run_dir: Path, resume: bool, landmark_ids: list[int]) -> None:
    """The chief restores run_dir's newest checkpoint (with resume, when there is one, after checking that the
    run's config and label map allow it), or else starts from --init-from's run when given; in a multi-worker
    group every worker then takes the chief's state."""
    prefix = tf.train.latest_checkpoint(str(run_dir / run_files.CHECKPOINT_DIR))
    saved = sorted((run_dir / run_files.CHECKPOINT_DIR).glob("ckpt-*.index"))
    if is_chief(trainer.strategy) and resume and prefix is None and saved:  # TensorFlow ignores it with a warning
        raise UserError(
            f"{run_dir / run_files.CHECKPOINT_DIR / 'checkpoint'}: missing or unreadable, yet "
            f"{len(saved)} checkpoints lie beside it; train with --no-resume or into another run folder"
        )
    if is_chief(trainer.strategy) and resume and prefix is not None:
        run_files.check_resumable(run_dir, trainer.cfg, landmark_ids)
        checkpoint = trainer.checkpoint
        if run_files.has_plain_optimizer(prefix):  # an older kit's run: its SGD state goes into the inner optimizer
            checkpoint = run_files.make_checkpoint(
                trainer.model, trainer.optimizer.inner_optimizer, trainer.step, trainer.data_position
            )
        run_files.restore_checkpoint(
            checkpoint,
            prefix,
            "cannot resume from this checkpoint",
            "; train with --no-resume or into another run folder",
        )
        log.info("resumed %s at step %d", prefix, int(trainer.step))
    elif is_chief(trainer.strategy) and trainer.cfg.init_from:
        init_from_run(trainer.model, Path(trainer.cfg.init_from), landmark_ids)
    if worker_count(trainer.strategy) > 1:
        join_the_chief(trainer, trainer.cfg, landmark_ids)


def run_description(cfg: TrainConfig, chosen: str, strategy: tf.distribute.Strategy, data: TrainingData) -> dict:
    """What metrics.json records beside the results: model, strategy (as the user chose it), precision, data."""
    return {
        "backbone": cfg.backbone,
        "strategy": chosen,
        "strategy_used": strategy_name(strategy),
        "workers": worker_count(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "precision": cfg.precision,
        "keras_policy": keras_policy(cfg.precision),
        "local_stride": cfg.local_stride,
        "global_only": cfg.global_only,
        "init_from": cfg.init_from,
        "classes": len(data.landmark_ids),
        "train_images": data.train_count,
        "validation_images": data.validation_count,
    }


def write_scalars(writer, step: int, values: dict[str, float]) -> None:
    with writer.as_default(step=step):
        for name, value in values.items():
            tf.summary.write(name, tf.constant(value, tf.float32), metadata=SCALAR_METADATA)


def summary_writer(logs: Path | None, name: str):
    return tf.summary.create_file_writer(str(logs / name)) if logs else tf.summary.create_noop_writer()


def all_skipped_error(trainer: Trainer, step: int) -> UserError:
    cfg = trainer.cfg
    return UserError(
        f"steps {step - SKIP_WINDOW + 1}-{step}: every one had non-finite gradients and was skipped "
        f"(--precision {cfg.precision}, loss scale {trainer.loss_scale:g}); training is not "
        f"progressing: lower --learning-rate ({cfg.learning_rate:g}) or use --precision float32; "
        f"the last checkpoint was kept"
    )


def competition_validation(cfg: TrainConfig, trainer: Trainer, run_dir: Path) -> BestCheckpoint | None:
    """--validate-on's scorer and best-checkpoint keeper (None without the flag)."""
    if not cfg.validate_on:
        return None
    validator = CompetitionValidator(Path(cfg.validate_on), cfg.validate_task, cfg.image_size, cfg.batch_size)
    return BestCheckpoint(validator, run_dir, trainer.model)


def run_steps(
    trainer: Trainer,
    data: TrainingData,
    saver: CheckpointWriter,
    logs: Path | None,
    stop_after: int | None,
    best: BestCheckpoint | None = None,
) -> dict:
    """Steps from the checkpointed one to cfg.steps, logging, validating and checkpointing on the way.

    A stop signal on any worker stops every worker after the same step, with a checkpoint. SKIP_WINDOW steps
    in a row with non-finite gradients end the run with a UserError."""
    cfg, strategy = trainer.cfg, trainer.strategy
    first_step = step = int(trainer.step)
    first_position, first_applied = int(trainer.data_position), trainer.applied_steps
    stream = training_stream(data.epoch_source, data.train_count, cfg, start=first_position)
    iterator = iter(strategy.experimental_distribute_dataset(stream))
    last_interval, images_delivered, validation_accuracy = {}, 0.0, None
    stopped_by, skipped_in_a_row, interval_applied = None, 0, first_applied
    started = interval_start = time.perf_counter()
    with (
        closing(summary_writer(logs, "train")) as train_writer,
        closing(summary_writer(logs, "validation")) as validation_writer,
        StopSignals() as signals,
        tqdm(total=cfg.steps, initial=step, desc="train", unit="step") as bar,
    ):
        while step < cfg.steps and stopped_by is None and (stop_after is None or step - first_step < stop_after):
            outcome = trainer.train_step(iterator, signals.request()).numpy()
            step += 1
            bar.update(1)
            stopped_by = agreed_signal(outcome[:-1])
            skipped_in_a_row = skipped_in_a_row + 1 if outcome[-1] > 0 else 0
            if skipped_in_a_row >= SKIP_WINDOW:
                raise all_skipped_error(trainer, step)
            if step % cfg.log_every == 0 or step == cfg.steps:
                last_interval, images = log_interval(
                    trainer,
                    step,
                    time.perf_counter() - interval_start,
                    trainer.applied_steps - interval_applied,
                    train_writer,
                    bar,
                )
                images_delivered += images
                interval_start, interval_applied = time.perf_counter(), trainer.applied_steps
            if step % cfg.validate_every == 0 or step == cfg.steps:
                validation_accuracy = validate(trainer, data, step, validation_writer)
                if best is not None:
                    write_scalars(validation_writer, step, {f"competition_{best.metric}": best.record(step)})
            if step % cfg.checkpoint_every == 0:
                saver.save(step)
    if saver.last_step != step:
        saver.save(step)
    if stopped_by:
        log.warning("%s received: checkpointed step %d and stopped", stopped_by, step)
    images_delivered += trainer.take_sums()["images"]
    applied = trainer.applied_steps
    return {
        "step": step,
        "steps": cfg.steps,
        "stopped_by": stopped_by,
        "applied_steps": applied,
        "skipped_steps": step - applied,
        "skipped_steps_this_call": (step - first_step) - (applied - first_applied),
        "loss_scale": trainer.loss_scale,
        "seconds": round(time.perf_counter() - started, 2),
        "skipped_images": int(trainer.data_position) - first_position - int(images_delivered),
        "validation_accuracy": validation_accuracy,
        **last_interval,
        **({"competition_validation": best.summary()} if best is not None else {}),
    }


def log_interval(trainer: Trainer, step: int, seconds: float, applied: int, writer, bar: tqdm) -> tuple[dict, float]:
    """Mean losses, accuracy, learning rate, images/s and applied / skipped steps since the last call, to
    TensorBoard and the bar; a warning when steps were skipped."""
    sums = trainer.take_sums()
    images = max(sums["images"], 1.0)
    summary = {f"loss_{name}": sums[name] / images for name in LOSS_NAMES}
    summary["train_accuracy"] = sums["correct"] / images
    summary["learning_rate"] = float(trainer.schedule(max(trainer.applied_steps - 1, 0)))
    summary["images_per_second"] = sums["images"] / max(seconds, 1e-9)
    summary["interval_applied_steps"] = applied
    summary["interval_skipped_steps"] = round(sums["skipped"])
    summary["loss_scale"] = trainer.loss_scale
    write_scalars(writer, step, summary)
    bar.set_postfix(
        loss=f"{summary['loss_total']:.3f}",
        img_s=f"{summary['images_per_second']:.0f}",
        skipped=summary["interval_skipped_steps"],
    )
    if summary["interval_skipped_steps"]:
        log.warning(
            "step %d: %d of the last %d steps skipped (non-finite gradients); loss scale now %g",
            step,
            summary["interval_skipped_steps"],
            summary["interval_skipped_steps"] + applied,
            trainer.loss_scale,
        )
    return summary, sums["images"]


def validate(trainer: Trainer, data: TrainingData, step: int, writer) -> float | None:
    """Validation accuracy, logged and written to TensorBoard; None without validation images."""
    if data.validation_count == 0:
        return None
    accuracy, count = trainer.validate(validation_stream(data.validation_files(), trainer.cfg))
    write_scalars(writer, step, {"accuracy": accuracy})
    log.info("step %d: validation accuracy %.4f on %d images", step, accuracy, count)
    return accuracy
