"""Exported DELG SavedModel: its cost over the bare network, and batched global extraction vs one image per call.

Part 1, at 512 px, one scale. Global-only: the SavedModel with input_max_feature_num 0 (local head skipped) vs
features + global head called directly in Keras; global+local: up to 1000 local features vs both heads. The
direct call is timed eagerly and inside a tf.function; the 10% rule is checked against the faster.

Part 2, at 512x384 and 1024x768 with DELG's 3 global scales: images/s of the per-image path (serving_default,
max_feature_num 0, one call per image, as for Google's TF1 models) vs global_batch and global_batch_float16 at
batch 8 and 32 (fewer where that takes too long here), each with and without XLA. Untrained weights; speed
only (tests check that the descriptors agree).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from export.delg import GLOBAL_BATCH, GLOBAL_BATCH_FLOAT16, GLOBAL_BATCH_OUTPUT, XLA_SUFFIX, save_delg
from train.config import DELG_GLOBAL_SCALE_INDICES, DELG_IMAGE_SCALES, DELG_MAX_FEATURE_NUM, get_config
from train.model import DelgModel

IMAGE_SIDE = 512
IMAGES = {"tiny": 10, "r50": 3}  # timed calls per round (after one warm-up call)
ROUNDS = 3  # the best of these timed rounds counts (the cores are shared, so single rounds are noisy)
MAX_SLOWDOWN = 1.10  # the exported model may be at most 10% slower than the direct call
# Part 2: image sizes (height, width); per (config, width): batch sizes, images on the per-image path, timed
# rounds. What fits in minutes on 2 cores (r50 at 1024x768: tens of seconds per batch; batch 8 takes ~8 GB).
BATCH_SIZES = ((384, 512), (768, 1024))
PLAN = {
    ("tiny", 512): ((8, 32), 8, 3),
    ("tiny", 1024): ((8,), 8, 3),
    ("r50", 512): ((8,), 2, 2),
    ("r50", 1024): ((4,), 2, 1),
}
GLOBAL_SCALES = [DELG_IMAGE_SCALES[i] for i in DELG_GLOBAL_SCALE_INDICES]


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
            out = signature(
                input_image=tf.constant(image),
                input_scales=tf.constant([1.0]),
                input_max_feature_num=tf.constant(max_features),
                input_abs_thres=tf.constant(0.0),
                input_global_scales_ind=tf.constant([0]),
            )
            return {name: value.numpy() for name, value in out.items()}

        return run

    return call(0), call(DELG_MAX_FEATURE_NUM)


def bench_config(name: str) -> list[tuple[str, float, float, float]]:
    model = DelgModel(get_config(name, backbone_weights="none"), num_classes=10)
    model(tf.zeros([1, 64, 64, 3]))
    image = np.random.default_rng(0).integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        save_delg(model, Path(tmp) / "delg")
        signature = tf.saved_model.load(str(Path(tmp) / "delg")).signatures["serving_default"]
        rows = []
        calls = zip(
            ("global-only", "global+local"),
            direct_calls(model, compiled=False),
            direct_calls(model, compiled=True),
            exported_calls(signature),
            strict=True,
        )
        for task, *peers in calls:
            rows.append((task, *(images_per_second(call, image, IMAGES[name]) for call in peers)))
    return rows


def interleaved_rates(peers: dict[str, tuple[object, int]], rounds: int) -> dict[str, float]:
    """Images/s of each peer (label -> (call, images per call)), best of `rounds`, after one warm-up call each
    (tracing, XLA compilation). The peers take turns in each round, so a change in the machine's load
    falls on all of them alike."""
    for call, _ in peers.values():
        call()
    best = dict.fromkeys(peers, float("inf"))
    for _ in range(rounds):
        for label, (call, _) in peers.items():
            start = time.perf_counter()
            call()
            best[label] = min(best[label], time.perf_counter() - start)
    return {label: images / best[label] for label, (_, images) in peers.items()}


def per_image_call(signature, images: np.ndarray):
    """The per-image path: serving_default on each image, its rows normalized and summed as the script does."""

    def run():
        for image in images:
            rows = signature(
                input_image=tf.constant(image),
                input_scales=tf.constant(GLOBAL_SCALES),
                input_max_feature_num=tf.constant(0),
                input_abs_thres=tf.constant(0.0),
                input_global_scales_ind=tf.range(len(GLOBAL_SCALES)),
            )["global_descriptors"].numpy()
            total = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).sum(axis=0)
            total / np.linalg.norm(total)

    return run


def batched_call(signature, images: np.ndarray):
    images, scales = tf.constant(images), tf.constant(GLOBAL_SCALES)
    return lambda: signature(input_images=images, input_scales=scales)[GLOBAL_BATCH_OUTPUT].numpy()


def bench_batched(name: str) -> None:
    """Prints, for one config and each size, images/s of each path and its ratio to the per-image path."""
    model = DelgModel(get_config(name, backbone_weights="none"), num_classes=10)
    model(tf.zeros([1, 64, 64, 3]))
    with tempfile.TemporaryDirectory() as tmp:
        save_delg(model, Path(tmp) / "delg", float16=True, xla=True)  # each batched function plain and compiled
        signatures = tf.saved_model.load(str(Path(tmp) / "delg")).signatures
        for height, width in BATCH_SIZES:
            batches, count, rounds = PLAN[name, width]
            images = np.random.default_rng(0).integers(0, 256, (max(batches), height, width, 3), np.uint8)
            peers = {
                "per-image serving_default": (per_image_call(signatures["serving_default"], images[:count]), count)
            }
            for function in (GLOBAL_BATCH, GLOBAL_BATCH_FLOAT16):
                for batch in batches:
                    for suffix in (XLA_SUFFIX, ""):
                        label = f"{function} b{batch}{' XLA' if suffix else ''}"
                        peers[label] = (batched_call(signatures[function + suffix], images[:batch]), batch)
            rates = interleaved_rates(peers, rounds)
            per_image = rates["per-image serving_default"]
            for label, rate in rates.items():
                size = f"{width}x{height}"
                print(f"{name:<6} {size:<9} {label:<31} {rate:>8.2f} {rate / per_image:>6.2f}", flush=True)


def load_average() -> str:
    return " / ".join(f"{load:.1f}" for load in os.getloadavg()) + " (1 / 5 / 15 min)"


def main() -> None:
    print(f"{'config':<6} {'extraction':<13} {'eager img/s':>11} {'tf.function':>11} {'exported':>8} {'ratio':>6}")
    for name in IMAGES:
        for task, eager, compiled, exported in bench_config(name):
            fastest = max(eager, compiled)
            verdict = "ok" if fastest / exported <= MAX_SLOWDOWN else "SLOWER than allowed"
            print(
                f"{name:<6} {task:<13} {eager:>11.2f} {compiled:>11.2f} {exported:>8.2f} "
                f"{exported / fastest:>6.2f}  {verdict}"
            )
    print(f"\nload average before: {load_average()} (2 cores: above 2 the figures are noisy)")
    print(f"global descriptors, scales {' '.join(map(str, GLOBAL_SCALES))}: images/s and ratio to one image per call")
    print(f"{'config':<6} {'size':<9} {'path':<31} {'img/s':>8} {'ratio':>6}")
    for name in ("tiny", "r50"):
        bench_batched(name)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
