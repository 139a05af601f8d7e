"""Cosine classifier with the ArcFace additive angular margin (Deng et al.), as DELG trains its global head."""
from __future__ import annotations

import math

import keras
import tensorflow as tf


class CosineClassifier(keras.layers.Layer):
    """cos(theta) between L2-normalized embeddings and L2-normalized class weights: [B,D] -> [B,classes].

    A float32 layer under any precision policy: L2 normalisation in float16 turns a zero vector into NaN
    (its epsilon rounds to 0) and a sum of squares above 65504 into infinity."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        self.num_classes = num_classes

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(int(input_shape[-1]), self.num_classes),
                                      initializer="glorot_uniform")

    def call(self, embeddings):
        weights = tf.nn.l2_normalize(self.kernel, axis=0)
        return tf.matmul(tf.nn.l2_normalize(embeddings, axis=1), weights)


def arcface_logits(cosine: tf.Tensor, labels: tf.Tensor, margin: float, scale: float) -> tf.Tensor:
    """s*cos(theta+m) for the true class where theta <= pi-m, s*cos(theta) everywhere else."""
    cosine = tf.cast(cosine, tf.float32)
    theta = tf.acos(tf.clip_by_value(cosine, -1.0 + 1e-7, 1.0 - 1e-7))
    true_class = tf.one_hot(labels, tf.shape(cosine)[-1]) > 0.5
    with_margin = tf.logical_and(true_class, theta <= math.pi - margin)
    return scale * tf.where(with_margin, tf.cos(theta + margin), cosine)
