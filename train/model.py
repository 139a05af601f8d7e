"""DELG: one backbone pass feeds a global head (GeM, whitening, ArcFace) and a local head (autoencoder, attention).

With global_only the local head is left out: the model is a backbone, GeM, whitening and ArcFace."""

from __future__ import annotations

import keras
import tensorflow as tf

from train.arcface import CosineClassifier
from train.backbone import build_backbone, min_input_side, own_preprocessing
from train.config import PIXEL_MEAN, PIXEL_SCALE, TrainConfig
from train.local_head import Attention, Autoencoder, attention_pool
from train.pooling import GeM


def extend_to(images: tf.Tensor, side: int) -> tf.Tensor:
    """[B,H,W,C] -> [B,max(H,side),max(W,side),C], repeating the last row and column (as is, when large enough)."""
    if side <= 1 or all(size is not None and size >= side for size in images.shape[1:3]):
        return images
    shape = tf.shape(images)
    rows = tf.minimum(tf.range(tf.maximum(shape[1], side)), shape[1] - 1)
    cols = tf.minimum(tf.range(tf.maximum(shape[2], side)), shape[2] - 1)
    return tf.gather(tf.gather(images, rows, axis=1), cols, axis=2)


def normalize_pixels(images: tf.Tensor) -> tf.Tensor:
    """Pixels in [0,255] (any dtype) -> (x - 128) / 128, as DELG feeds its network."""
    return (tf.cast(images, tf.float32) - PIXEL_MEAN) / PIXEL_SCALE


class DelgModel(keras.Model):
    """The whole DELG network. `call` returns every tensor the losses need; export uses the parts.

    Under a float16 or bfloat16 policy (train.precision.precision_policy) the backbone and the local head's
    convolutions compute in that type; GeM, whitening, L2 normalisation and both classifiers compute in
    float32, and the global descriptor, local descriptors and attention scores come out as float32.
    """

    def __init__(self, cfg: TrainConfig, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbone = build_backbone(cfg)
        self.gem = GeM(cfg.gem_p, name="gem")
        self.whitening = keras.layers.Dense(cfg.embedding_dim, name="whitening", dtype="float32")
        self.cosine_classifier = CosineClassifier(num_classes, cfg.subcenters, name="arcface")
        if cfg.global_only:
            return
        self.autoencoder = Autoencoder(cfg.local_dim, name="autoencoder")
        self.attention = Attention(cfg.attention_hidden, name="attention")
        self.attention_classifier = keras.layers.Dense(num_classes, name="attention_classifier", dtype="float32")

    def features(self, images: tf.Tensor, training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """Pixels in [0,255] -> (conv4 map, conv5 map): the one backbone pass both heads read. The pixels are
        normalised as the backbone's family does it (build_backbone), after an image too small for a conv5 cell
        is extended to min_input_side by repeating its last row and column."""
        images = extend_to(images, min_input_side(self.cfg.backbone))
        if own_preprocessing(self.cfg.backbone):
            return self.backbone(tf.cast(images, tf.float32), training=training)
        return self.backbone(normalize_pixels(images), training=training)

    def global_descriptor(self, conv5: tf.Tensor) -> tf.Tensor:
        """GeM-pooled conv5, whitened, L2-normalized, in float32: [B,h,w,C5] -> [B,embedding_dim]."""
        return tf.nn.l2_normalize(self.whitening(self.gem(conv5)), axis=1)

    def local_head(self, conv4: tf.Tensor, training: bool = False) -> dict[str, tf.Tensor]:
        """Descriptors and attention scores (float32), and the reconstruction, on the local head's map (conv4,
        sub-sampled at local_stride 32); no gradient flows into the backbone."""
        conv4 = tf.stop_gradient(conv4)
        descriptors, reconstruction = self.autoencoder(conv4)
        scores = self.attention(reconstruction, training=training)
        return {
            "conv4": conv4,
            "descriptors": tf.cast(descriptors, tf.float32),
            "reconstruction": reconstruction,
            "attention": tf.cast(scores, tf.float32),
        }

    def call(self, images, training=False):
        conv4, conv5 = self.features(images, training=training)
        embedding = self.global_descriptor(conv5)
        if self.cfg.global_only:
            return {"embedding": embedding, "cosine": self.cosine_classifier(embedding)}
        local = self.local_head(conv4, training=training)
        pooled = attention_pool(local["reconstruction"], local["attention"])
        return {
            "embedding": embedding,
            "cosine": self.cosine_classifier(embedding),
            "attention_logits": self.attention_classifier(pooled),
            **local,
        }
