"""DELG: one backbone pass feeds a global head (GeM, whitening, ArcFace) and a local head (autoencoder, attention)."""
from __future__ import annotations

import keras
import tensorflow as tf

from train.arcface import CosineClassifier
from train.backbone import build_backbone
from train.config import PIXEL_MEAN, PIXEL_SCALE, TrainConfig
from train.local_head import Attention, Autoencoder, attention_pool
from train.pooling import GeM


def normalize_pixels(images: tf.Tensor) -> tf.Tensor:
    """Pixels in [0,255] (any dtype) -> (x - 128) / 128, as DELG feeds its network."""
    return (tf.cast(images, tf.float32) - PIXEL_MEAN) / PIXEL_SCALE


class DelgModel(keras.Model):
    """The whole DELG network. `call` returns every tensor the losses need; export uses the parts."""

    def __init__(self, cfg: TrainConfig, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbone = build_backbone(cfg)
        self.gem = GeM(cfg.gem_p, name="gem")
        self.whitening = keras.layers.Dense(cfg.embedding_dim, name="whitening")
        self.cosine_classifier = CosineClassifier(num_classes, name="arcface")
        self.autoencoder = Autoencoder(cfg.local_dim, name="autoencoder")
        self.attention = Attention(cfg.attention_hidden, name="attention")
        self.attention_classifier = keras.layers.Dense(num_classes, name="attention_classifier")

    def features(self, images: tf.Tensor, training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """Pixels in [0,255] -> (conv4 map, conv5 map): the one backbone pass both heads read."""
        return self.backbone(normalize_pixels(images), training=training)

    def global_descriptor(self, conv5: tf.Tensor) -> tf.Tensor:
        """GeM-pooled conv5, whitened, L2-normalized: [B,h,w,C5] -> [B,embedding_dim]."""
        pooled = tf.cast(self.gem(conv5), tf.float32)
        return tf.nn.l2_normalize(tf.cast(self.whitening(pooled), tf.float32), axis=1)

    def local_head(self, conv4: tf.Tensor, training: bool = False) -> dict[str, tf.Tensor]:
        """Descriptors, reconstruction and attention scores on conv4; no gradient flows into the backbone."""
        conv4 = tf.stop_gradient(conv4)
        descriptors, reconstruction = self.autoencoder(conv4)
        scores = self.attention(reconstruction, training=training)
        return {"conv4": conv4, "descriptors": descriptors, "reconstruction": reconstruction,
                "attention": scores}

    def call(self, images, training=False):
        conv4, conv5 = self.features(images, training=training)
        embedding = self.global_descriptor(conv5)
        local = self.local_head(conv4, training=training)
        pooled = attention_pool(local["reconstruction"], local["attention"])
        return {
            "embedding": embedding,
            "cosine": tf.cast(self.cosine_classifier(embedding), tf.float32),
            "attention_logits": tf.cast(self.attention_classifier(pooled), tf.float32),
            **local,
        }
