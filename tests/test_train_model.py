"""DELG's heads on the tiny backbone: shapes and strides, GeM, ArcFace, float16 numerics, the local stride."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from export.receptive_field import receptive_field
from train.arcface import arcface_logits
from train.backbone import build_backbone
from train.config import get_config
from train.local_head import attention_pool
from train.model import DelgModel
from train.pooling import gem
from train.precision import precision_policy

NUM_CLASSES = 7


@pytest.fixture(scope="module")
def model_and_outputs():
    cfg = get_config("tiny", image_size=96)
    model = DelgModel(cfg, NUM_CLASSES)
    images = tf.random.uniform([2, 96, 128, 3], 0, 255, seed=1)
    return cfg, model, model(images, training=False)


def test_backbone_maps_have_resnet_strides_and_channels(model_and_outputs):
    cfg, model, outputs = model_and_outputs
    conv4, conv5 = model.features(tf.zeros([1, 96, 128, 3]))
    assert conv4.shape == (1, 96 // 16, 128 // 16, 4 * cfg.tiny_widths[2])
    assert conv5.shape == (1, 96 // 32, 128 // 32, 4 * cfg.tiny_widths[3])


def test_every_head_has_its_shape(model_and_outputs):
    cfg, model, outputs = model_and_outputs
    grid = (2, 96 // 16, 128 // 16)
    assert outputs["embedding"].shape == (2, cfg.embedding_dim)
    np.testing.assert_allclose(tf.norm(outputs["embedding"], axis=1), 1.0, rtol=1e-5)
    assert outputs["cosine"].shape == (2, NUM_CLASSES)
    assert np.all(np.abs(outputs["cosine"]) <= 1.0 + 1e-5)
    assert outputs["attention_logits"].shape == (2, NUM_CLASSES)
    assert outputs["descriptors"].shape == (*grid, cfg.local_dim)
    assert outputs["reconstruction"].shape == outputs["conv4"].shape == (*grid, 4 * cfg.tiny_widths[2])
    assert outputs["attention"].shape == (*grid, 1)
    assert np.all(outputs["attention"] >= 0)  # softplus


def test_local_head_sends_no_gradient_into_the_backbone(model_and_outputs):
    cfg, model, _ = model_and_outputs
    images = tf.random.uniform([2, 64, 64, 3], 0, 255, seed=2)
    with tf.GradientTape() as tape:
        outputs = model(images, training=True)
        local_loss = tf.reduce_sum(outputs["attention_logits"]) + tf.reduce_sum(outputs["reconstruction"])
    grads = tape.gradient(local_loss, model.backbone.trainable_variables)
    assert all(g is None for g in grads)


def test_gem_with_p1_is_average_pooling():
    features = tf.random.uniform([3, 5, 4, 6], 0.0, 2.0, seed=3)
    np.testing.assert_allclose(gem(features, 1.0), tf.reduce_mean(features, axis=[1, 2]), rtol=1e-5)


def test_gem_grows_towards_max_pooling_with_p():
    features = tf.random.uniform([2, 4, 4, 3], 0.0, 1.0, seed=4)
    p3, p50 = gem(features, 3.0), gem(features, 50.0)
    assert np.all(p3 > tf.reduce_mean(features, axis=[1, 2]))
    np.testing.assert_allclose(p50, tf.reduce_max(features, axis=[1, 2]), rtol=0.1)


def test_arcface_adds_the_margin_to_the_true_class_only():
    margin, scale = 0.1, 45.25
    cosine = np.array([[0.3, -0.2, 0.9], [0.5, -0.999, 0.1]], np.float32)
    labels = np.array([2, 1])  # the second true class has theta > pi - m: no margin there
    logits = arcface_logits(tf.constant(cosine), tf.constant(labels), margin, scale).numpy()
    expected = scale * cosine.copy()
    expected[0, 2] = scale * math.cos(math.acos(0.9) + margin)
    np.testing.assert_allclose(logits, expected, rtol=1e-5)


# --- float16 -----------------------------------------------------------------------------------------------


def activations_up_to(top: float, shape=(2, 3, 3, 256), seed: int = 5) -> np.ndarray:
    """Post-ReLU-like float16 activations: a quarter exactly 0, the rest up to `top`."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0, top, shape) * (rng.uniform(size=shape) > 0.25)
    return values.astype(np.float16)


def test_float16_overflows_where_gem_and_normalisation_must_not():
    # What the float32 islands guard against: a cube above 40 and a sum of squares above 65504 in float16.
    assert not np.isfinite(tf.pow(tf.constant(41.0, tf.float16), 3.0))
    assert not np.isfinite(tf.reduce_sum(tf.square(tf.fill([256], tf.constant(100.0, tf.float16)))))


@pytest.mark.parametrize("top", [1e-3, 1.0, 100.0])
def test_gem_in_float16_is_finite_with_finite_gradients_and_equals_float32(top):
    features = tf.constant(activations_up_to(top))
    with tf.GradientTape() as tape:
        tape.watch(features)
        pooled = gem(features, 3.0)
        total = tf.reduce_sum(pooled)
    grads = tape.gradient(total, features)
    assert pooled.dtype == tf.float32 and np.all(np.isfinite(pooled)) and np.all(np.isfinite(grads.numpy()))
    np.testing.assert_allclose(pooled, gem(tf.cast(features, tf.float32), 3.0), rtol=1e-5)
    zeros = tf.zeros([1, 2, 2, 4], tf.float16)  # a map the ReLU zeroed: the 1/p power's gradient must stay finite
    with tf.GradientTape() as tape:
        tape.watch(zeros)
        total = tf.reduce_sum(gem(zeros, 3.0))
    assert np.all(np.isfinite(tape.gradient(total, zeros).numpy()))


def test_attention_pool_in_float16_handles_zero_and_large_vectors():
    features = activations_up_to(100.0)
    features[0, 0, 0, :] = 0  # a zero vector: float16's l2_normalize makes it NaN
    scores = np.full(features.shape[:3] + (1,), 2.0, np.float16)
    pooled = attention_pool(tf.constant(features), tf.constant(scores))
    expected = attention_pool(tf.constant(features, tf.float32), tf.constant(scores, tf.float32))
    assert pooled.dtype == tf.float32 and np.all(np.isfinite(pooled))
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-7)


def test_float16_model_gives_float32_heads_close_to_the_float32_model():
    cfg = get_config("tiny", image_size=64)
    images = tf.random.uniform([3, 64, 80, 3], 0, 255, seed=7)
    reference = DelgModel(cfg, NUM_CLASSES)
    expected = reference(images)
    with precision_policy("float16") as policy:
        model = DelgModel(cfg, NUM_CLASSES)
        model(images)
    assert policy == "mixed_float16" and keras.mixed_precision.global_policy().name == "float32"  # restored
    model.set_weights(reference.get_weights())  # variables stay float32: a float32 checkpoint restores as is
    conv4, conv5 = model.features(images)
    assert conv5.dtype == tf.float16
    outputs = model(images)
    for name in ("embedding", "cosine", "attention_logits", "descriptors", "attention"):
        assert outputs[name].dtype == tf.float32 and np.all(np.isfinite(outputs[name])), name
    cosine = tf.reduce_sum(outputs["embedding"] * expected["embedding"], axis=1)
    assert np.all(cosine >= 0.99), cosine.numpy()
    np.testing.assert_allclose(tf.norm(model.global_descriptor(conv5), axis=1), 1.0, rtol=1e-5)


# --- local stride ------------------------------------------------------------------------------------------


def test_local_stride_32_subsamples_conv4_and_leaves_conv5_alone():
    images = tf.random.uniform([1, 96, 128, 3], -1, 1, seed=8)
    keras.utils.set_random_seed(3)
    stride16 = build_backbone(get_config("tiny", local_stride=16))
    stride32 = build_backbone(get_config("tiny", local_stride=32))
    stride32.set_weights(stride16.get_weights())  # the sub-sampling layer has no weights
    (conv4, conv5), (local, conv5_32) = stride16(images), stride32(images)
    assert local.shape[1:3] == conv5.shape[1:3] == (96 // 32, 128 // 32)
    np.testing.assert_array_equal(local, conv4[:, ::2, ::2])
    np.testing.assert_array_equal(conv5_32, conv5)
    field16, field32 = receptive_field(stride16.outputs[0]), receptive_field(stride32.outputs[0])
    assert (field32.size, field32.stride, field32.start) == (field16.size, 32, field16.start)


def test_resnet50_local_stride_32_has_delfs_block3_strides_field():
    field = receptive_field(build_backbone(get_config("r50", local_stride=32, backbone_weights="none")).outputs[0])
    assert (field.size, field.stride, field.padding) == (291, 32, 145)
