"""Training speed: images/s of the tiny and r50 configs, and achieved FLOP/s beside a plain matmul; the tiny
config's speed in each --precision and --local-stride, as ratios to float32 at stride 16.

FLOPs of a forward pass come from TensorFlow's profiler (float_operation on the traced graph, a
multiply-add counted as 2); a training step is counted as 3x the forward pass (backward ~ 2x forward).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import tensorflow as tf

from train.config import TrainConfig, get_config
from train.data import folder_data, training_stream
from train.loop import Trainer
from train.model import DelgModel

MATMUL_SIDE = 2048


def matmul_flops_per_second(repeats: int = 10) -> float:
    a = tf.random.normal([MATMUL_SIDE, MATMUL_SIDE])
    matmul = tf.function(lambda x: tf.matmul(x, x))
    matmul(a).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        result = matmul(a)
    result.numpy()
    return repeats * 2 * MATMUL_SIDE**3 / (time.perf_counter() - start)


def forward_flops(model: DelgModel, shape: list[int]) -> float:
    """Profiler FLOP count of one forward pass on a batch of `shape`."""
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec(shape))
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return float(tf.compat.v1.profiler.profile(concrete.graph, options=options).total_float_ops)


def forward_flops_per_second(cfg: TrainConfig, batch: int, repeats: int) -> tuple[float, float]:
    """(FLOP/s, images/s) of inference on the backbone + heads at cfg.image_size."""
    model = DelgModel(cfg, 1000)
    shape = [batch, cfg.image_size, cfg.image_size, 3]
    forward = tf.function(lambda x: model(x, training=False)["embedding"])
    images = tf.random.uniform(shape, 0, 255)
    forward(images).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        out = forward(images)
    out.numpy()
    seconds = (time.perf_counter() - start) / repeats
    return forward_flops(model, shape) / seconds, batch / seconds


def training_images_per_second(cfg: TrainConfig, data_dir: Path, steps: int, warmup: int = 3) -> tuple[float, float]:
    """(images/s, FLOP/s) of full training steps, data pipeline included, after `warmup` steps."""
    data = folder_data(data_dir, cfg)
    trainer = Trainer(cfg, len(data.landmark_ids), tf.distribute.get_strategy())
    iterator = iter(training_stream(data.epoch_source, data.train_count, cfg))
    for _ in range(warmup):
        trainer.train_step(iterator)
    trainer.take_sums()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(iterator)
    images = trainer.take_sums()["images"]  # reading the sums waits for the last step
    seconds = time.perf_counter() - start
    flops = 3 * forward_flops(trainer.model, [cfg.batch_size, cfg.image_size, cfg.image_size, 3]) * steps
    return images / seconds, flops / seconds


def network_images_per_second(peers: dict[str, TrainConfig], num_classes: int, steps: int = 12) -> dict[str, float]:
    """images/s of each config's training steps on one batch held in memory (the network alone, no decoding).

    The peers run in turn, then again in the reverse order, and their times add up, so that a drift in the
    machine's load falls on all of them alike. Each is measured right after it is built: a trainer built after
    others runs markedly faster on this CPU than they do, whatever its config."""
    seconds = dict.fromkeys(peers, 0.0)
    for order in (list(peers), list(reversed(peers))):
        for name in order:
            cfg = peers[name]
            trainer = Trainer(cfg, num_classes, tf.distribute.get_strategy())
            images = tf.random.uniform([cfg.batch_size, cfg.image_size, cfg.image_size, 3], 0, 255, seed=1)
            batch = {
                "image": images,
                "label": tf.random.uniform([cfg.batch_size], 0, num_classes, tf.int64, seed=2),
                "position": tf.range(cfg.batch_size, dtype=tf.int64),
            }
            iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
            for _ in range(3):  # tracing and warm-up
                trainer.train_step(iterator).numpy()
            start = time.perf_counter()
            for _ in range(steps):
                outcome = trainer.train_step(iterator)
            outcome.numpy()  # waits for the last step
            seconds[name] += time.perf_counter() - start
    return {name: 2 * steps * peers[name].batch_size / seconds[name] for name in peers}


def main() -> None:
    from local_eval.synthetic import build_synthetic

    logging.getLogger().setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = build_synthetic(Path(tmp) / "tiny", size="tiny", seed=0) / "landmark-recognition"
        matmul = matmul_flops_per_second()
        print(f"float32 matmul {MATMUL_SIDE}^3: {matmul / 1e9:.1f} GFLOP/s")
        runs = [
            ("tiny", get_config("tiny", image_size=96, batch_size=32), 20),
            ("tiny", get_config("tiny", image_size=128, batch_size=32), 15),
            ("r50", get_config("r50", image_size=128, batch_size=8, backbone_weights="none"), 4),
        ]
        for name, cfg, steps in runs:
            images_per_second, flops = training_images_per_second(cfg, data_dir, steps)
            print(
                f"train {name} {cfg.image_size}px batch {cfg.batch_size}: {images_per_second:.1f} images/s, "
                f"{flops / 1e9:.1f} GFLOP/s = {flops / matmul:.0%} of matmul"
            )
        base = get_config("tiny", image_size=96, batch_size=32, local_stride=16)
        peers = {
            "float32, stride 16": base,
            "float16": dataclasses.replace(base, precision="float16"),
            "bfloat16": dataclasses.replace(base, precision="bfloat16"),
            "float32, stride 32": dataclasses.replace(base, local_stride=32),
        }
        speeds = network_images_per_second(peers, num_classes=150)
        reference = speeds["float32, stride 16"]
        print(
            "train tiny 96px batch 32, network alone, by --precision / --local-stride (a CPU gains nothing from "
            "float16; GPUs do): "
            + ", ".join(f"{name} {speed:.1f} images/s ({speed / reference:.2f}x)" for name, speed in speeds.items())
        )
        cfg = get_config("r50", image_size=224, backbone_weights="none")
        flops, images_per_second = forward_flops_per_second(cfg, batch=4, repeats=3)
        print(
            f"forward r50 224px batch 4: {images_per_second:.1f} images/s, {flops / 1e9:.1f} GFLOP/s "
            f"= {flops / matmul:.0%} of matmul (target >= 60%)"
        )
