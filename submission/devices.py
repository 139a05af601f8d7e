"""The devices of submission/main.py's global and local passes: every visible GPU (on a CPU, the logical devices
$KIT_LOGICAL_DEVICES splits it into), one copy of each model per device, each call on whichever copy is free, so
one stream of batches runs on each device.

Shipped beside main.py (which imports it from its own folder).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import tensorflow as tf
from settings_cli import InputError

if TYPE_CHECKING:  # savedmodel.py's type, for the annotations only
    from savedmodel import DelgSavedModel

log = logging.getLogger("submission")

LOGICAL_DEVICES_ENV = "KIT_LOGICAL_DEVICES"  # N: a machine without a GPU runs on N logical CPU devices
PASSES = ("global", "local")  # what each device's items are counted for


def positive_count(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) >= 1 else None


def split_cpu() -> None:
    """$KIT_LOGICAL_DEVICES=N without a GPU: the CPU as N logical devices. It must run before anything sets
    TensorFlow's devices up; when something already has, the devices stay as they are (said in the log)."""
    value = os.environ.get(LOGICAL_DEVICES_ENV)
    if not value or tf.config.list_physical_devices("GPU"):
        return
    count = positive_count(value)
    if count is None:
        raise InputError(f"${LOGICAL_DEVICES_ENV}={value!r}: expected a count of devices, 1 or more")
    try:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError:  # TensorFlow's devices were set up before (this script imported by a program using them)
        log.warning(
            "$%s=%d: TensorFlow's devices are already set up; running on the %d CPU devices there are",
            LOGICAL_DEVICES_ENV,
            count,
            len(tf.config.list_logical_devices("CPU")),
        )


def chosen_devices(flag: str) -> list[str]:
    """The devices --devices N|all names: the first N (or all) GPUs when there are any, else of the CPU devices."""
    visible = [d.name for d in tf.config.list_logical_devices("GPU")] or [
        d.name for d in tf.config.list_logical_devices("CPU")
    ]
    if flag == "all":
        return visible
    count = positive_count(flag)
    if count is None:
        raise InputError(f"--devices {flag!r}: expected a count of devices (1 or more) or all")
    if count > len(visible):
        raise InputError(f"--devices {count}: only {len(visible)} visible ({', '.join(visible)})")
    return visible[:count]


class Replicas:
    """One model loaded once per device and called as one: device_copy() lends whichever copy is free, on its
    device, so up to `parallel` calls run at once. items: per device, the images of each pass it did."""

    def __init__(self, load: Callable[[], DelgSavedModel], devices: list[str], items: dict[str, dict[str, int]]):
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        copies = []
        for device in devices:
            with tf.device(device):  # the model's variables live on its device
                copies.append((device, load()))
            self.free.put(copies[-1])
            items.setdefault(device, dict.fromkeys(PASSES, 0))
        first = copies[0][1]
        self.global_dim, self.batched, self.has_local = first.global_dim, first.batched, first.has_local
        self.parallel, self.items = len(copies), items

    @contextlib.contextmanager
    def device_copy(self, stage: str, count: int) -> Iterator[DelgSavedModel]:
        """A free copy of the model, its calls on its device; count items of `stage` for that device when done."""
        device, model = self.free.get()
        try:
            with tf.device(device):
                yield model
            self.items[device][stage] += count
        finally:
            self.free.put((device, model))


class Models(NamedTuple):
    """The global models (one, or an ensemble) and the one whose local features verify, each loaded once per
    device; devices: per device, the images of each pass it did."""

    global_models: list[Replicas]
    weights: tuple[float, ...]
    local: Replicas
    devices: dict[str, dict[str, int]]

    def has(self, precision: str, xla: bool) -> bool:
        return all((precision, xla) in model.batched for model in self.global_models)
