"""The type the network computes in (--precision), as a Keras dtype policy.

float16 and bfloat16 are Keras's mixed policies: variables, the optimizer and the numerically delicate
parts of DELG (GeM pooling, whitening, L2 normalisation, the classifiers and the losses) stay float32,
the convolutions compute in the smaller type. float16 also needs loss scaling (train.loop does it);
bfloat16 has float32's range and needs none.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import keras
import tensorflow as tf

from train.config import PRECISIONS


def keras_policy(precision: str) -> str:
    """--precision -> the Keras dtype policy name: float32, mixed_float16 or mixed_bfloat16."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision if precision == "float32" else f"mixed_{precision}"


@contextmanager
def precision_policy(precision: str) -> Iterator[str]:
    """Keras layers built inside compute in `precision` (float32 | float16 | bfloat16); yields the policy name.

    `with precision_policy("float16"): model = DelgModel(cfg, n)` builds a float16 DELG whose variables are
    float32, so any checkpoint restores into it. The previous global policy comes back on exit.
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(keras_policy(precision))
    try:
        yield keras_policy(precision)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def legacy_mixed_precision() -> str:
    """What the retired --mixed-precision switch meant: float16 on a GPU, bfloat16 elsewhere."""
    return "float16" if tf.config.list_physical_devices("GPU") else "bfloat16"
