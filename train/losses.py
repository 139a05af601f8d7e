"""DELG's training loss: ArcFace CE + w_att * attention CE + w_rec * reconstruction MSE, per example.

A global-only model has the ArcFace term alone (the other two are reported as 0)."""

from __future__ import annotations

import tensorflow as tf

from train.arcface import arcface_logits
from train.config import TrainConfig


def delg_losses(
    outputs: dict[str, tf.Tensor], labels: tf.Tensor, cfg: TrainConfig, margins: tf.Tensor | None = None
) -> dict[str, tf.Tensor]:
    """Per-example losses [B] for each term and their weighted sum under 'total'. margins: the ArcFace margin of
    each class [classes] (dynamic margins), else cfg.arcface_margin for all."""
    margin = cfg.arcface_margin if margins is None else tf.gather(margins, labels)[:, None]
    logits = arcface_logits(outputs["cosine"], labels, margin, cfg.arcface_scale)
    arcface = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    if cfg.global_only:
        zero = tf.zeros_like(arcface)
        return {"total": arcface, "arcface": arcface, "attention": zero, "reconstruction": zero}
    attention = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, outputs["attention_logits"])
    error = tf.cast(outputs["reconstruction"], tf.float32) - tf.cast(outputs["conv4"], tf.float32)
    reconstruction = tf.reduce_mean(tf.square(error), axis=[1, 2, 3])
    total = arcface + cfg.attention_loss_weight * attention + cfg.reconstruction_loss_weight * reconstruction
    return {"total": total, "arcface": arcface, "attention": attention, "reconstruction": reconstruction}
