"""DELG's training loss: ArcFace CE + w_att * attention CE + w_rec * reconstruction MSE, per example."""
from __future__ import annotations

import tensorflow as tf

from train.arcface import arcface_logits
from train.config import TrainConfig


def delg_losses(outputs: dict[str, tf.Tensor], labels: tf.Tensor, cfg: TrainConfig) -> dict[str, tf.Tensor]:
    """Per-example losses [B] for each term and their weighted sum under 'total'."""
    logits = arcface_logits(outputs["cosine"], labels, cfg.arcface_margin, cfg.arcface_scale)
    arcface = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    attention = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, outputs["attention_logits"])
    error = tf.cast(outputs["reconstruction"], tf.float32) - tf.cast(outputs["conv4"], tf.float32)
    reconstruction = tf.reduce_mean(tf.square(error), axis=[1, 2, 3])
    total = (arcface + cfg.attention_loss_weight * attention
             + cfg.reconstruction_loss_weight * reconstruction)
    return {"total": total, "arcface": arcface, "attention": attention, "reconstruction": reconstruction}
