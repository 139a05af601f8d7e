"""Cosine classifier with the ArcFace additive angular margin (Deng et al.), as DELG trains its global head.

Two options of the 2020 recognition winners (3rd place): K sub-centers per class, the class's cosine being the
largest of its sub-centers' (sub-center ArcFace), and a margin per class that shrinks with the class's training
count, m_c = a * n_c^(-lambda) + b (dynamic margins).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf


class CosineClassifier(keras.layers.Layer):
    """cos(theta) between L2-normalized embeddings and L2-normalized class weights: [B,D] -> [B,classes].

    With subcenters K > 1 each class has K weight vectors (columns c*K .. c*K+K-1) and its cosine is their
    largest. A float32 layer under any precision policy: L2 normalisation in float16 turns a zero vector into
    NaN (its epsilon rounds to 0) and a sum of squares above 65504 into infinity."""

    def __init__(self, num_classes: int, subcenters: int = 1, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        self.num_classes, self.subcenters = num_classes, subcenters

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(int(input_shape[-1]), self.num_classes * self.subcenters),
            initializer="glorot_uniform",
        )

    def call(self, embeddings):
        weights = tf.nn.l2_normalize(self.kernel, axis=0)
        cosine = tf.matmul(tf.nn.l2_normalize(embeddings, axis=1), weights)
        if self.subcenters == 1:
            return cosine
        return tf.reduce_max(tf.reshape(cosine, [-1, self.num_classes, self.subcenters]), axis=2)


def arcface_logits(cosine: tf.Tensor, labels: tf.Tensor, margin, scale: float) -> tf.Tensor:
    """s*cos(theta+m) for the true class where theta <= pi-m, s*cos(theta) everywhere else. margin: one number,
    or one per example [B,1] (dynamic margins)."""
    cosine = tf.cast(cosine, tf.float32)
    theta = tf.acos(tf.clip_by_value(cosine, -1.0 + 1e-7, 1.0 - 1e-7))
    true_class = tf.one_hot(labels, tf.shape(cosine)[-1]) > 0.5
    with_margin = tf.logical_and(true_class, theta <= math.pi - margin)
    return scale * tf.where(with_margin, tf.cos(theta + margin), cosine)


def dynamic_margins(class_counts: list[int], a: float, power: float, b: float) -> np.ndarray:
    """The margin of each class, m_c = a * n_c^(-power) + b, from its number of training images n_c (at least 1)."""
    return (a * np.maximum(np.asarray(class_counts, np.float64), 1.0) ** -power + b).astype(np.float32)
