"""DELG's heads on the tiny backbone: shapes and strides, GeM, ArcFace."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from train.arcface import arcface_logits
from train.config import get_config
from train.model import DelgModel
from train.pooling import gem

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
