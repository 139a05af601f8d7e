"""Tiny SavedModels with the DELG contract (as export/delg.py writes it), for tests of the submission script.

The network is one random 8x8 stride-4 convolution: its responses are the local descriptors, their norms
the attention scores, and the mean of their ReLU the global descriptor of each scale. Crude, but the
features are real image features at real locations, so two copies of one image match with many inliers.
The same graph is written two ways: a TF2 module with a `serving_default` signature (what our exporter
writes; with batched=True also its `global_batch` signature) and a TF1 SavedModel built from named
placeholders (what Google's released DELG models are, with no batched function).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from export.delg import GLOBAL_BATCH, GLOBAL_BATCH_OUTPUT, GLOBAL_BATCH_SIGNATURE

LOCAL_DIM = 128
STRIDE = 4
KERNEL_SIZE = 8


def _random_kernel(seed: int) -> tf.Tensor:
    rng = np.random.default_rng(seed)
    return tf.constant(rng.normal(0, 0.1, (KERNEL_SIZE, KERNEL_SIZE, 3, LOCAL_DIM)).astype(np.float32))


def _one_scale(pixels: tf.Tensor, scale: tf.Tensor, kernel: tf.Tensor):
    """Descriptors [n,128], keypoint centres [n,2] in original pixels, scores [n] of one image scale."""
    size = tf.cast(tf.shape(pixels)[:2], tf.float32)
    new_size = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), KERNEL_SIZE)
    resized = tf.image.resize(pixels[None], new_size)
    responses = tf.nn.conv2d(resized, kernel, strides=STRIDE, padding="VALID")[0]
    rows, cols = tf.shape(responses)[0], tf.shape(responses)[1]
    grid = tf.stack(tf.meshgrid(tf.range(rows), tf.range(cols), indexing="ij"), axis=-1)
    centres = tf.cast(tf.reshape(grid, [-1, 2]) * STRIDE, tf.float32) + KERNEL_SIZE / 2
    centres = centres * size / tf.cast(new_size, tf.float32)
    descriptors = tf.reshape(responses, [-1, LOCAL_DIM])
    return descriptors, centres, tf.norm(descriptors, axis=1)


def delg_forward(kernel: tf.Tensor):
    """A tf.function computing the five DELG outputs from the five DELG inputs."""

    @tf.function
    def forward(input_image, input_scales, input_max_feature_num, input_abs_thres, input_global_scales_ind):
        pixels = (tf.cast(input_image, tf.float32) - 128.0) / 128.0
        descs = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False)
        centres = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False)
        scores = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False)
        scales = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False)
        globals_ = tf.TensorArray(tf.float32, size=tf.shape(input_scales)[0])
        for i in tf.range(tf.shape(input_scales)[0]):
            d, c, s = _one_scale(pixels, input_scales[i], kernel)
            descs = descs.write(i, d)
            centres = centres.write(i, c)
            scores = scores.write(i, s)
            scales = scales.write(i, tf.fill(tf.shape(s), input_scales[i]))
            globals_ = globals_.write(i, tf.reduce_mean(tf.nn.relu(d), axis=0))
        all_scores = scores.concat()
        keep = tf.where(all_scores >= input_abs_thres)[:, 0]
        top = tf.math.top_k(tf.gather(all_scores, keep), tf.minimum(input_max_feature_num, tf.size(keep))).indices
        chosen = tf.gather(keep, top)
        half = tf.fill([tf.size(chosen), 2], KERNEL_SIZE / 2.0)
        centre = tf.gather(centres.concat(), chosen)
        return {
            "boxes": tf.concat([centre - half, centre + half], axis=1),
            "features": tf.gather(descs.concat(), chosen),
            "scales": tf.gather(scales.concat(), chosen),
            "scores": tf.gather(all_scores, chosen)[:, None],
            "global_descriptors": tf.gather(globals_.stack(), input_global_scales_ind),
        }

    return forward


INPUT_SPECS = {
    "input_image": tf.TensorSpec([None, None, 3], tf.uint8),
    "input_scales": tf.TensorSpec([None], tf.float32),
    "input_max_feature_num": tf.TensorSpec([], tf.int32),
    "input_abs_thres": tf.TensorSpec([], tf.float32),
    "input_global_scales_ind": tf.TensorSpec([None], tf.int32),
}


def global_batch_forward(forward):
    """The `global_batch` contract on top of `forward`: per image, its per-scale rows L2-normalized, summed,
    L2-normalized (what export.delg's global_batch computes in one pass over the batch)."""

    def one_image(image, scales):
        rows = forward(
            input_image=image,
            input_scales=scales,
            input_max_feature_num=tf.constant(0),
            input_abs_thres=tf.constant(0.0),
            input_global_scales_ind=tf.range(tf.size(scales)),
        )["global_descriptors"]
        return tf.nn.l2_normalize(tf.reduce_sum(tf.nn.l2_normalize(rows, axis=1), axis=0), axis=0)

    @tf.function
    def global_batch(input_images, input_scales):
        descriptors = tf.map_fn(
            lambda image: one_image(image, input_scales), input_images, fn_output_signature=tf.float32
        )
        return {GLOBAL_BATCH_OUTPUT: descriptors}

    return global_batch


def write_tf2_model(out: str | Path, seed: int = 0, batched: bool = False) -> Path:
    """A TF2 SavedModel whose serving_default follows the DELG contract (and with batched, global_batch too)."""
    module = tf.Module()
    forward = delg_forward(_random_kernel(seed))
    module.serve = tf.function(lambda **kw: forward(**kw)).get_concrete_function(**INPUT_SPECS)
    signatures = {"serving_default": module.serve}
    if batched:
        module.serve_batch = global_batch_forward(forward).get_concrete_function(*GLOBAL_BATCH_SIGNATURE)
        signatures[GLOBAL_BATCH] = module.serve_batch
    tf.saved_model.save(module, str(out), signatures=signatures)
    return Path(out)


def write_tf1_model(out: str | Path, seed: int = 0) -> Path:
    """A TF1-format SavedModel with the DELG tensor names and no signature (used through .prune)."""
    graph = tf.Graph()
    with graph.as_default():
        inputs = {
            name: tf.compat.v1.placeholder(spec.dtype, spec.shape, name=name) for name, spec in INPUT_SPECS.items()
        }
        outputs = delg_forward(_random_kernel(seed))(**inputs)
        for name, tensor in outputs.items():
            tf.identity(tensor, name=name)
        with tf.compat.v1.Session(graph=graph) as session:
            builder = tf.compat.v1.saved_model.Builder(str(out))
            builder.add_meta_graph_and_variables(session, [tf.compat.v1.saved_model.tag_constants.SERVING])
            builder.save()
    return Path(out)
