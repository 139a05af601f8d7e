"""Generalized-mean (GeM) pooling: ((1/HW) * sum x^p)^(1/p) over the spatial grid, always in float32.

In float16, x^3 overflows above ~40 (post-ReLU conv5 activations of a trained ResNet reach that) and a mean
of cubes rounds to 0 below ~1e-8, where the 1/p power has an infinite gradient; float32 has room for both.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def gem(features: tf.Tensor, p: float, eps: float = 1e-6) -> tf.Tensor:
    """[B,H,W,C] (any float type) -> float32 [B,C]; p=1 is average pooling, p->inf max pooling."""
    clipped = tf.maximum(tf.cast(features, tf.float32), eps)
    return tf.pow(tf.reduce_mean(tf.pow(clipped, p), axis=[1, 2]), 1.0 / p)


class GeM(keras.layers.Layer):
    """GeM pooling with a fixed exponent p (3 in DELG); a float32 layer under any precision policy."""

    def __init__(self, p: float = 3.0, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        self.p = p

    def call(self, features):
        return gem(features, self.p)

    def get_config(self):
        return {**super().get_config(), "p": self.p}
