"""DELG defaults, written down once. Every other module (and every CLI flag) reads them from here."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.cli import UserError

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
# Every backbone's last map (the global head's) has stride 32: one of its cells spans this many pixels a side.
LAST_MAP_STRIDE = 32

# --backbone: the tiny ResNet, and the Keras applications of four families (train/backbone.py builds them).
BACKBONES = (
    "tiny",
    "resnet50",
    "resnet101",
    "resnet152",
    *(f"efficientnet-b{i}" for i in range(8)),
    *(f"efficientnetv2-{v}" for v in ("b0", "b1", "b2", "b3", "s", "m", "l")),
    *(f"convnext-{v}" for v in ("tiny", "small", "base", "large")),
)
# --precision: the type the network computes in; variables and the optimizer stay float32 (Keras mixed policies).
PRECISIONS = ("float32", "float16", "bfloat16")
# --local-stride: input pixels between the local head's cells. 16 reads conv4 as it is; 32 sub-samples it by 2
# (every other cell), as DELF's block3_strides does, for 4x fewer local features per image.
LOCAL_STRIDES = (16, 32)


@dataclass
class TrainConfig:
    """One training run. Every field is also a command-line flag (--field-name)."""

    # model
    backbone: str = "resnet50"  # one of BACKBONES
    backbone_weights: str = "none"  # none | imagenet (Keras's download, cached in ~/.keras/models) | PATH.h5
    tiny_widths: tuple[int, ...] = (16, 32, 64, 128)  # channels of the tiny ResNet's 4 stages (x4 out)
    embedding_dim: int = 512  # the paper uses 2048; Kaggle-era solutions 512
    gem_p: float = 3.0
    arcface_margin: float = 0.1
    arcface_scale: float = 45.25
    subcenters: int = 1  # K > 1: sub-center ArcFace, K weight vectors per class, its cosine their largest
    # (a, lambda, b): each class's margin is a * n^-lambda + b, n its training images, instead of arcface_margin
    dynamic_margin: tuple[float, ...] = ()
    global_only: bool = False  # no local head (attention, autoencoder) and no local loss: one global descriptor
    attention_hidden: int = 512
    local_dim: int = 128
    local_stride: int = 32  # one of LOCAL_STRIDES; 32 is DELF's (block3_strides), which DELG's thresholds assume
    # loss = arcface CE + attention_loss_weight * attention CE + reconstruction_loss_weight * MSE
    attention_loss_weight: float = 1.0
    reconstruction_loss_weight: float = 10.0
    # a run folder whose newest checkpoint gives the starting weights (train/init_from.py); "" starts afresh
    init_from: str = ""
    # data
    # images outside the data folder's train_clean.csv weigh this much in the loss (clean ones 1); 0 leaves them out
    not_clean_weight: float = 0.0
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
    precision: str = "float32"  # one of PRECISIONS
    xla: bool = False
    seed: int = 0
    # bookkeeping
    checkpoint_every: int = 1000
    validate_every: int = 1000
    # a local competition (`local_eval build`): every validate_every steps its global-only GAP / mAP@100 is scored,
    # and the best-scoring weights are kept in RUN/best (train/validate.py)
    validate_on: str = ""
    validate_task: str = "recognition"  # recognition (GAP) | retrieval (mAP@100)
    log_every: int = 50


# tiny keeps the stride-16 local head: on the demo competition (96 px training) it reranks far better than
# stride 32 (docs/training-options.md); r50 / r101 keep DELF's stride 32. Its 128-d descriptor and crops of at least 30%
# of the image raised the global-only scores of both tasks on five seeds (docs/global-stage.md).
CONFIGS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(
        backbone="tiny",
        embedding_dim=128,
        attention_hidden=64,
        image_size=96,
        local_stride=16,
        crop_min_area=0.3,
        batch_size=32,
        steps=300,
        learning_rate=0.1,
        warmup_steps=30,
        checkpoint_every=100,
        validate_every=100,
        log_every=10,
    ),
    # DELG and every 2020-2021 winner started from ImageNet weights: so does every named Keras backbone.
    "r50": TrainConfig(backbone="resnet50", backbone_weights="imagenet"),
    "r101": TrainConfig(backbone="resnet101", backbone_weights="imagenet"),
    # The backbones of the 2020-2021 winners' ensembles (docs/training-options.md), at DELG's other defaults.
    "r152": TrainConfig(backbone="resnet152", backbone_weights="imagenet"),
    "effb5": TrainConfig(backbone="efficientnet-b5", backbone_weights="imagenet"),
    "effb7": TrainConfig(backbone="efficientnet-b7", backbone_weights="imagenet"),
    "effv2s": TrainConfig(backbone="efficientnetv2-s", backbone_weights="imagenet"),
    "effv2m": TrainConfig(backbone="efficientnetv2-m", backbone_weights="imagenet"),
    "convnext-t": TrainConfig(backbone="convnext-tiny", backbone_weights="imagenet"),
    "convnext-b": TrainConfig(backbone="convnext-base", backbone_weights="imagenet"),
}


def get_config(name: str, **overrides) -> TrainConfig:
    """A named config with some fields replaced."""
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; choose one of {', '.join(CONFIGS)}")
    return dataclasses.replace(CONFIGS[name], **overrides)


def _number(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """check, for finite numbers only (NaN and infinity fail every rule)."""
    return lambda value: isinstance(value, (int, float)) and math.isfinite(value) and check(value)


def _weights_ok(value: str) -> bool:
    return value in ("none", "imagenet") or (value.endswith(".h5") and Path(value).is_file())


# What each field accepts: (test, the rule in words). check_config applies them; fields not listed are free.
FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "backbone": (lambda v: v in BACKBONES, f"one of {', '.join(BACKBONES)}"),
    "backbone_weights": (_weights_ok, "none, imagenet or an existing .h5 file"),
    "init_from": (
        lambda v: v == "" or (Path(v) / "config.json").is_file(),
        "a training run folder (with its config.json), or empty",
    ),
    "tiny_widths": (lambda v: len(v) == 4 and all(w >= 1 for w in v), "4 channel counts, each at least 1"),
    "embedding_dim": (_number(lambda v: v >= 1), "at least 1"),
    "gem_p": (_number(lambda v: v > 0), "greater than 0"),
    "arcface_margin": (_number(lambda v: 0 <= v < math.pi / 2), "in [0, pi/2)"),
    "arcface_scale": (_number(lambda v: v > 0), "greater than 0"),
    "subcenters": (_number(lambda v: v >= 1), "at least 1"),
    "dynamic_margin": (
        lambda v: (
            len(v) in (0, 3) and all(map(_number(lambda x: x >= 0), v[:2])) and all(map(_number(lambda x: True), v))
        ),
        "three numbers A,LAMBDA,B (margin A * n^-LAMBDA + B), A and LAMBDA 0 or more, or none",
    ),
    "attention_hidden": (_number(lambda v: v >= 1), "at least 1"),
    "local_dim": (_number(lambda v: v >= 1), "at least 1"),
    "local_stride": (lambda v: v in LOCAL_STRIDES, f"one of {', '.join(map(str, LOCAL_STRIDES))}"),
    "attention_loss_weight": (_number(lambda v: v >= 0), "0 or more"),
    "reconstruction_loss_weight": (_number(lambda v: v >= 0), "0 or more"),
    "not_clean_weight": (_number(lambda v: v >= 0), "0 or more"),
    "image_size": (
        _number(lambda v: v >= LAST_MAP_STRIDE),
        f"at least {LAST_MAP_STRIDE} (one cell of the stride-{LAST_MAP_STRIDE} conv5 map)",
    ),
    "crop_min_area": (_number(lambda v: 0 < v <= 1), "in (0, 1]"),
    "crop_aspect_range": (
        lambda v: len(v) == 2 and all(map(_number(lambda x: x > 0), v)) and v[0] <= v[1],
        "two ratios 0 < MIN <= MAX",
    ),
    "validation_fraction": (_number(lambda v: 0 <= v < 1), "in [0, 1)"),
    "batch_size": (_number(lambda v: v >= 1), "at least 1"),
    "steps": (_number(lambda v: v >= 1), "at least 1"),
    "learning_rate": (_number(lambda v: v > 0), "greater than 0"),
    "warmup_steps": (_number(lambda v: v >= 0), "0 or more"),
    "momentum": (_number(lambda v: 0 <= v < 1), "in [0, 1)"),
    "clip_norm": (_number(lambda v: v > 0), "greater than 0"),
    "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "seed": (_number(lambda v: 0 <= v < 2**31), "in [0, 2^31)"),
    "checkpoint_every": (_number(lambda v: v >= 1), "at least 1"),
    "validate_every": (_number(lambda v: v >= 1), "at least 1"),
    "validate_on": (lambda v: v == "" or Path(v).is_dir(), "a competition folder written by local_eval build"),
    "validate_task": (lambda v: v in ("recognition", "retrieval"), "recognition or retrieval"),
    "log_every": (_number(lambda v: v >= 1), "at least 1"),
}


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def check_config(cfg: TrainConfig) -> None:
    """A UserError naming the first flag whose value is out of its range or of the wrong kind."""
    for field in dataclasses.fields(TrainConfig):
        value = getattr(cfg, field.name)
        kind = str(field.type)
        element = kind.removeprefix("tuple[").split(",")[0].rstrip("]")
        if kind.startswith("tuple[") and not (isinstance(value, tuple) and all(_is_a(v, element) for v in value)):
            raise UserError(f"{flag_name(field.name)} {value!r}: expected {element} values")
        if not kind.startswith("tuple[") and not _is_a(value, kind):
            raise UserError(f"{flag_name(field.name)} {value!r}: expected {kind}")
        test, rule = FIELD_RULES.get(field.name, (lambda v: True, ""))
        if not test(value):
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
            raise UserError(f"{flag_name(field.name)} {shown}: must be {rule}")
    if cfg.init_from and cfg.backbone_weights != "none":
        raise UserError(
            f"{flag_name('init_from')} {cfg.init_from} and {flag_name('backbone_weights')} "
            f"{cfg.backbone_weights} both give the starting weights; choose one"
        )


def _is_a(value: Any, kind: str) -> bool:
    """Whether value is of the annotated kind (an int passes for float; a bool passes only for bool)."""
    if kind == "bool" or isinstance(value, bool):
        return kind == "bool" and isinstance(value, bool)
    return {"int": isinstance(value, int), "float": isinstance(value, (int, float)), "str": isinstance(value, str)}[
        kind
    ]
