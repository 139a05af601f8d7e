"""DELG's local head: an autoencoder that gives the 128-d local descriptors and an attention that scores them."""

from __future__ import annotations

import keras
import tensorflow as tf


class Autoencoder(keras.layers.Layer):
    """1x1 conv down to the local descriptor, 1x1 conv + ReLU back up to the backbone's channels."""

    def __init__(self, local_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.local_dim = local_dim

    def build(self, input_shape):
        self.reduce = keras.layers.Conv2D(self.local_dim, 1, name="reduce")
        self.expand = keras.layers.Conv2D(int(input_shape[-1]), 1, activation="relu", name="expand")

    def call(self, features):
        """[B,H,W,C] -> (descriptors [B,H,W,local_dim], reconstruction [B,H,W,C])."""
        descriptors = self.reduce(features)
        return descriptors, self.expand(descriptors)


class Attention(keras.layers.Layer):
    """1x1 conv (hidden) -> batch norm -> ReLU -> 1x1 conv to one channel -> softplus: a score per location."""

    def __init__(self, hidden: int, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = keras.layers.Conv2D(hidden, 1, name="conv1")
        self.bn = keras.layers.BatchNormalization(name="bn")
        self.conv2 = keras.layers.Conv2D(1, 1, name="conv2")

    def call(self, features, training=False):
        hidden = tf.nn.relu(self.bn(self.conv1(features), training=training))
        return tf.nn.softplus(self.conv2(hidden))


def attention_pool(features: tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
    """Mean over locations of attention-weighted, channel-L2-normalized features: [B,H,W,C] -> float32 [B,C].

    In float32 whatever the inputs' type: float16 normalisation fails on zero and on large vectors."""
    normalized = tf.nn.l2_normalize(tf.cast(features, tf.float32), axis=-1)
    return tf.reduce_mean(tf.cast(scores, tf.float32) * normalized, axis=[1, 2])
