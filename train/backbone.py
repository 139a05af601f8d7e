"""Backbones that map normalized pixels to the conv4 (local head) and conv5 (global head) feature maps."""
from __future__ import annotations

import re

import keras

from train.config import TrainConfig

KERAS_RESNETS = {"resnet50": keras.applications.ResNet50, "resnet101": keras.applications.ResNet101}
CONV4_OUTPUT = re.compile(r"^conv4_block\d+_out$")
CONV5_OUTPUT = re.compile(r"^conv5_block\d+_out$")


def _bottleneck(x, filters: int, stride: int, name: str):
    """ResNet v1 bottleneck as Keras builds it: stride on the first 1x1 conv, projection shortcut."""
    shortcut = keras.layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
    shortcut = keras.layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_0_bn")(shortcut)
    x = keras.layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_1_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = keras.layers.Conv2D(filters, 3, padding="same", name=f"{name}_2_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_2_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = keras.layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_3_bn")(x)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def tiny_resnet(widths: tuple[int, ...]) -> keras.Model:
    """A ResNet of the same shape as ResNet50 (stem, 4 bottleneck stages) with one narrow block per stage."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
    x = keras.layers.Conv2D(widths[0], 7, strides=2, name="conv1_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=1.001e-5, name="conv1_bn")(x)
    x = keras.layers.Activation("relu", name="conv1_relu")(x)
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, (filters, stride) in enumerate(zip(widths, (1, 2, 2, 2), strict=True), start=2):
        x = _bottleneck(x, filters, stride, name=f"conv{stage}_block1")
    return keras.Model(inputs, x, name="tiny_resnet")


def _keras_resnet(name: str, weights: str) -> keras.Model:
    weights_arg = None if weights == "none" else weights
    return KERAS_RESNETS[name](include_top=False, weights=weights_arg, input_shape=(None, None, 3))


def _last_layer_matching(model: keras.Model, pattern: re.Pattern) -> keras.layers.Layer:
    return [layer for layer in model.layers if pattern.match(layer.name)][-1]


def build_backbone(cfg: TrainConfig) -> keras.Model:
    """Normalized image [B,H,W,3] -> (local head's map, conv5 map), for the tiny ResNet or a Keras ResNet.

    The local head's map is conv4 (stride 16), or at local_stride 32 conv4 sub-sampled by 2 as DELF's
    block3_strides does. conv5 is the same either way: its first block reads conv4 through 1x1 convolutions
    of stride 2, which see exactly the sub-sampled cells.
    """
    if cfg.backbone == "tiny":
        net = tiny_resnet(cfg.tiny_widths)
    elif cfg.backbone in KERAS_RESNETS:
        net = _keras_resnet(cfg.backbone, cfg.backbone_weights)
    else:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose tiny, {', '.join(KERAS_RESNETS)}")
    conv4 = _last_layer_matching(net, CONV4_OUTPUT).output
    conv5 = _last_layer_matching(net, CONV5_OUTPUT).output
    if cfg.local_stride == 32:
        conv4 = keras.layers.MaxPooling2D(1, strides=2, name="conv4_subsample")(conv4)
    elif cfg.local_stride != 16:
        raise ValueError(f"local_stride {cfg.local_stride}: choose 16 or 32")
    return keras.Model(net.input, [conv4, conv5], name="backbone")
