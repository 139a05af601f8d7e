"""Generalized-mean (GeM) pooling: ((1/HW) * sum x^p)^(1/p) over the spatial grid."""
from __future__ import annotations

import keras
import tensorflow as tf


def gem(features: tf.Tensor, p: float, eps: float = 1e-6) -> tf.Tensor:
    """[B,H,W,C] -> [B,C]; p=1 is average pooling, p->inf max pooling."""
    clipped = tf.maximum(features, eps)
    return tf.pow(tf.reduce_mean(tf.pow(clipped, p), axis=[1, 2]), 1.0 / p)


class GeM(keras.layers.Layer):
    """GeM pooling with a fixed exponent p (3 in DELG)."""

    def __init__(self, p: float = 3.0, **kwargs):
        super().__init__(**kwargs)
        self.p = p

    def call(self, features):
        return gem(features, self.p)

    def get_config(self):
        return {**super().get_config(), "p": self.p}
