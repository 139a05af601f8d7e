"""Exported DELG SavedModel vs the same network called directly in Keras: images/s at 512 px, one scale.

Global-only: the SavedModel with input_max_feature_num 0 (local head skipped) vs features + global head.
Global+local: up to 1000 local features vs features + both heads. Untrained weights; speed only.
The direct call is timed eagerly and inside a tf.function; the 10% rule is checked against the faster.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from export.delg import save_delg
from train.config import DELG_MAX_FEATURE_NUM, get_config
from train.model import DelgModel

IMAGE_SIDE = 512
IMAGES = {"tiny": 10, "r50": 3}  # timed calls per round (after one warm-up call)
ROUNDS = 3  # the best of these timed rounds counts (the cores are shared, so single rounds are noisy)
MAX_SLOWDOWN = 1.10  # the exported model may be at most 10% slower than the direct call


def images_per_second(call, image: np.ndarray, count: int) -> float:
    call(image)
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(count):
            call(image)
        best = min(best, time.perf_counter() - start)
    return count / best


def direct_calls(model: DelgModel, compiled: bool):
    """The network called in Keras: one pass, global head, and optionally the local head."""

    def global_only(images):
        _, conv5 = model.features(images)
        return model.global_descriptor(conv5)

    def global_and_local(images):
        conv4, conv5 = model.features(images)
        head = model.local_head(conv4)
        return model.global_descriptor(conv5), head["descriptors"], head["attention"]

    def on_one_image(extract):
        extract = tf.function(extract) if compiled else extract
        return lambda image: tf.nest.map_structure(np.asarray, extract(tf.constant(image[None])))

    return [on_one_image(global_only), on_one_image(global_and_local)]


def exported_calls(signature):
    def call(max_features):
        def run(image):
            out = signature(input_image=tf.constant(image), input_scales=tf.constant([1.0]),
                            input_max_feature_num=tf.constant(max_features), input_abs_thres=tf.constant(0.0),
                            input_global_scales_ind=tf.constant([0]))
            return {name: value.numpy() for name, value in out.items()}

        return run

    return call(0), call(DELG_MAX_FEATURE_NUM)


def bench_config(name: str) -> list[tuple[str, float, float, float]]:
    model = DelgModel(get_config(name), num_classes=10)
    model(tf.zeros([1, 64, 64, 3]))
    image = np.random.default_rng(0).integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        save_delg(model, Path(tmp) / "delg")
        signature = tf.saved_model.load(str(Path(tmp) / "delg")).signatures["serving_default"]
        rows = []
        calls = zip(("global-only", "global+local"), direct_calls(model, compiled=False),
                    direct_calls(model, compiled=True), exported_calls(signature), strict=True)
        for task, *peers in calls:
            rows.append((task, *(images_per_second(call, image, IMAGES[name]) for call in peers)))
    return rows


def main() -> None:
    print(f"{'config':<6} {'extraction':<13} {'eager img/s':>11} {'tf.function':>11} {'exported':>8} {'ratio':>6}")
    for name in IMAGES:
        for task, eager, compiled, exported in bench_config(name):
            fastest = max(eager, compiled)
            verdict = "ok" if fastest / exported <= MAX_SLOWDOWN else "SLOWER than allowed"
            print(f"{name:<6} {task:<13} {eager:>11.2f} {compiled:>11.2f} {exported:>8.2f} "
                  f"{exported / fastest:>6.2f}  {verdict}")


if __name__ == "__main__":
    main()
