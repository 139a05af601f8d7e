"""Backbones that map pixels to the local head's map (stride 16) and the global head's map (the last one).

Families: the tiny ResNet, Keras's ResNets (50, 101, 152), EfficientNet (B0-B7), EfficientNetV2 (B0-B3, S, M,
L) and ConvNeXt (tiny, small, base, large). Each family normalises pixels its own way, inside the model:
the ResNets as DELG does, (x - 128) / 128 (model.normalize_pixels); the others through the Keras application's
own preprocessing layers, which take pixels in [0, 255].
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from common.cli import UserError
from train.config import LAST_MAP_STRIDE, TrainConfig, flag_name

A = keras.applications
# ImageNet statistics of pixels in [0, 1] that Keras's EfficientNet (B0-B7) normalises its input with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Family:
    """How to build each member of a backbone family and where its stride-16 map is."""

    constructors: dict[str, Callable[..., keras.Model]]
    stride16_reader: Callable[[keras.Model], str]  # the layer that reads the stride-16 map (the last stride-16 block)
    own_preprocessing: bool  # True: pixels in [0, 255] enter the network, which normalises them itself
    # True: its stride-2 convolutions are valid-padded and leave no cell of the last map for an input below
    # LAST_MAP_STRIDE pixels a side (Keras's EfficientNet B0-B7 and ConvNeXt); GeM over no cells is NaN.
    needs_one_cell: bool = False


FAMILIES = {
    "resnet": Family(
        {"resnet50": A.ResNet50, "resnet101": A.ResNet101, "resnet152": A.ResNet152},
        lambda net: "conv5_block1_1_conv",
        own_preprocessing=False,
    ),
    "efficientnet": Family(
        {f"efficientnet-b{i}": getattr(A, f"EfficientNetB{i}") for i in range(8)},
        lambda net: "block6a_expand_conv",
        own_preprocessing=True,
        needs_one_cell=True,
    ),
    "efficientnetv2": Family(
        {
            f"efficientnetv2-{v}": getattr(A, f"EfficientNetV2{v.upper()}")
            for v in ("b0", "b1", "b2", "b3", "s", "m", "l")
        },
        lambda net: "block6a_expand_conv",
        own_preprocessing=True,
    ),
    "convnext": Family(
        {f"convnext-{v}": getattr(A, f"ConvNeXt{v.title()}") for v in ("tiny", "small", "base", "large")},
        lambda net: f"{net.name}_downsampling_block_2",
        own_preprocessing=True,
        needs_one_cell=True,
    ),
}
KERAS_BACKBONES = {name: family for family in FAMILIES.values() for name in family.constructors}


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


def _keras_backbone(name: str, weights: str) -> keras.Model:
    """The Keras application without its classifier, built without weights (so that the graph is the same
    whatever the weights: Keras's EfficientNet adds a layer when it loads ImageNet's), then given them."""
    constructor = KERAS_BACKBONES[name].constructors[name]
    net = constructor(include_top=False, weights=None, input_shape=(None, None, 3))
    if weights != "none":
        with weights_refused_in_one_line(name, weights):
            loaded = constructor(include_top=False, weights=weights, input_shape=(None, None, 3))
        net.set_weights(loaded.get_weights())
    _preprocessing_in_float32(net)
    if name.startswith("efficientnet-"):
        _set_imagenet_normalization(net)
    return net


# How Keras's get_file fails when it cannot download (no internet): "URL fetch failure on ORIGIN: CODE -- REASON".
FETCH_FAILURE = re.compile(r"URL fetch failure on (\S+): (.*)")
# What loading a weight file that does not fit the network raises (OSError: not an HDF5 file).
WEIGHT_FILE_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError)


def keras_models_dir() -> Path:
    """Where Keras caches the weight files it downloads: $KERAS_HOME/models, else ~/.keras/models."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


@contextmanager
def weights_refused_in_one_line(backbone: str, weights: str) -> Iterator[None]:
    """Loading weights into a backbone: a failed ImageNet download, or a file that does not fit (in whole or in
    part), is one UserError naming the file (for ImageNet: the file Keras looks for, where to put it, and how to
    train from scratch)."""
    flag = f"{flag_name('backbone_weights')} {weights}"
    refused = f"give weights saved from the {backbone} backbone, or --backbone-weights none to train from scratch"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    except WEIGHT_FILE_ERRORS as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{flag}: cannot load it into the {backbone} backbone ({reason}); {refused}") from None
    except Exception as err:  # Keras's get_file raises a bare Exception when the download fails
        fetch = FETCH_FAILURE.match(str(err))
        if fetch is None:
            raise
        origin, reason = fetch.groups()
        file = keras_models_dir() / origin.rsplit("/", 1)[-1]
        raise UserError(
            f"{flag}: cannot download {origin} ({reason.strip()}); without internet, put that file "
            f"at {file} (Keras looks for it there), or pass --backbone-weights none to train "
            "from scratch"
        ) from None
    skipped = [str(w.message) for w in caught if "saving" in w.filename]  # Keras loaded only part of the file
    if skipped:
        raise UserError(
            f"{flag}: only part of it fits the {backbone} backbone ({skipped[0].splitlines()[0]}); {refused}"
        )


def _preprocessing_in_float32(net: keras.Model) -> None:
    """The application's pixel normalisation computes in float32 under any precision policy (pixels come in
    as float32; the first convolution casts to the policy's type)."""
    for layer in net.layers:
        if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
            layer.dtype_policy = keras.DTypePolicy("float32")
        if isinstance(layer, keras.layers.Normalization):
            layer.mean, layer.variance = (keras.ops.cast(v, "float32") for v in (layer.mean, layer.variance))


def _set_imagenet_normalization(net: keras.Model) -> None:
    """Keras's EfficientNet (B0-B7) keeps its input statistics as weights: ImageNet's after loading its file
    (with the standard deviation where the variance belongs, which Keras fixes with an extra layer), identity
    without. Written here as (x/255 - mean) / std, whatever the weights, so every run normalises alike."""
    normalization = next(layer for layer in net.layers if isinstance(layer, keras.layers.Normalization))
    mean, variance, count = normalization.get_weights()
    normalization.set_weights(
        [np.reshape(IMAGENET_MEAN, mean.shape), np.reshape(IMAGENET_STD, variance.shape) ** 2, count]
    )
    normalization.finalize_state()  # the layer computes with tensors made from its weights


def load_tiny_weights(net: keras.Model, weights: str) -> None:
    """The tiny ResNet has no ImageNet weights: a file saved from a tiny ResNet of the same widths is loaded,
    anything else refused (never ignored)."""
    if weights == "imagenet":
        raise UserError(
            f"{flag_name('backbone_weights')} imagenet: there are no ImageNet weights for the tiny "
            "backbone; give a .h5 file saved from a tiny backbone, or none"
        )
    if weights != "none":
        with weights_refused_in_one_line("tiny", weights):
            net.load_weights(weights)


def own_preprocessing(backbone: str) -> bool:
    """Whether the backbone takes pixels in [0, 255] and normalises them itself (else (x - 128) / 128 first)."""
    return backbone in KERAS_BACKBONES and KERAS_BACKBONES[backbone].own_preprocessing


def min_input_side(backbone: str) -> int:
    """The fewest pixels a side of an input that leaves the backbone's last map a cell (1: any input does)."""
    needs_one_cell = backbone in KERAS_BACKBONES and KERAS_BACKBONES[backbone].needs_one_cell
    return LAST_MAP_STRIDE if needs_one_cell else 1


def build_backbone(cfg: TrainConfig) -> keras.Model:
    """Image [B,H,W,3] -> (local head's map, global head's map).

    The local head's map is the stride-16 map that the first stride-32 block reads (conv4 for the ResNets),
    or at local_stride 32 that map sub-sampled by 2 as DELF's block3_strides does. The global head's map is
    the network's last (stride 32). Pixels enter as own_preprocessing(cfg.backbone) says.
    """
    if cfg.backbone == "tiny":
        net = tiny_resnet(cfg.tiny_widths)
        load_tiny_weights(net, cfg.backbone_weights)
        reader = "conv5_block1_1_conv"
    elif cfg.backbone in KERAS_BACKBONES:
        net = _keras_backbone(cfg.backbone, cfg.backbone_weights)
        reader = KERAS_BACKBONES[cfg.backbone].stride16_reader(net)
    else:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose tiny, {', '.join(KERAS_BACKBONES)}")
    stride16 = net.get_layer(reader).input
    if cfg.local_stride == 32:
        stride16 = keras.layers.MaxPooling2D(1, strides=2, name="conv4_subsample")(stride16)
    elif cfg.local_stride != 16:
        raise ValueError(f"local_stride {cfg.local_stride}: choose 16 or 32")
    return keras.Model(net.input, [stride16, net.output], name="backbone")
