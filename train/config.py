"""DELG defaults, written down once. Every other module (and every CLI flag) reads them from here."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# --- Extraction defaults of the DELG paper. The DELG SavedModel takes them as inputs; submission/main.py keeps
# a copy (it imports nothing of the kit) that tests/test_submission.py checks against these.
DELG_IMAGE_SCALES: tuple[float, ...] = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
DELG_GLOBAL_SCALE_INDICES: tuple[int, ...] = (3, 4, 5)
DELG_MAX_IMAGE_SIDE = 1024
DELG_MAX_FEATURE_NUM = 1000
DELG_ATTENTION_ABS_THRESHOLD = 0.0  # keep every location; max_feature_num does the selection
# The Kaggle retrieval contract sums the descriptors of these scales inside the graph.
RETRIEVAL_SCALES: tuple[float, ...] = (0.7071, 1.0, 1.4142)
# Pixels enter the network as (x - 128) / 128, inside the graph.
PIXEL_MEAN = 128.0
PIXEL_SCALE = 128.0


@dataclass
class TrainConfig:
    """One training run. Every field is also a command-line flag (--field-name)."""

    # model
    backbone: str = "resnet50"  # tiny | resnet50 | resnet101
    backbone_weights: str = "none"  # none | imagenet | PATH.h5
    tiny_widths: tuple[int, ...] = (16, 32, 64, 128)  # channels of the tiny ResNet's 4 stages (x4 out)
    embedding_dim: int = 512  # the paper uses 2048; Kaggle-era solutions 512
    gem_p: float = 3.0
    arcface_margin: float = 0.1
    arcface_scale: float = 45.25
    attention_hidden: int = 512
    local_dim: int = 128
    # loss = arcface CE + attention_loss_weight * attention CE + reconstruction_loss_weight * MSE
    attention_loss_weight: float = 1.0
    reconstruction_loss_weight: float = 10.0
    # data
    image_size: int = 512
    crop_min_area: float = 0.1
    crop_aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    validation_fraction: float = 0.05
    # optimisation
    batch_size: int = 32  # global, over all replicas
    steps: int = 100_000
    learning_rate: float = 0.01
    warmup_steps: int = 1000
    momentum: float = 0.9
    clip_norm: float = 10.0
    mixed_precision: bool = False
    xla: bool = False
    seed: int = 0
    # bookkeeping
    checkpoint_every: int = 1000
    validate_every: int = 1000
    log_every: int = 50


CONFIGS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(backbone="tiny", embedding_dim=64, attention_hidden=64, image_size=96,
                        batch_size=32, steps=300, learning_rate=0.1, warmup_steps=30,
                        checkpoint_every=100, validate_every=100, log_every=10),
    "r50": TrainConfig(backbone="resnet50"),
    "r101": TrainConfig(backbone="resnet101"),
}


def get_config(name: str, **overrides) -> TrainConfig:
    """A named config with some fields replaced."""
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; choose one of {', '.join(CONFIGS)}")
    return dataclasses.replace(CONFIGS[name], **overrides)
