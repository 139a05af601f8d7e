"""Which tf.distribute strategy a run uses: auto | default | mirrored | multiworker | tpu."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import tensorflow as tf

from common.cli import UserError

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "default", "mirrored", "multiworker", "tpu")


def tpu_address() -> str | None:
    """The TPU this process can reach: a named one (TPU_NAME / Colab), 'local' on a TPU VM, else None."""
    if os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"):
        return os.environ.get("TPU_NAME") or f"grpc://{os.environ['COLAB_TPU_ADDR']}"
    return "local" if Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists() else None


def connect_tpu(address: str) -> tf.distribute.Strategy:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def mirrored() -> tf.distribute.Strategy:
    """Mirrored over every GPU; without GPUs, over every logical CPU device (2 in the tests)."""
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """auto: TPU when one is reachable, mirrored with more than one GPU, else the default strategy."""
    if name == "auto":
        if tpu_address():
            name = "tpu"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        strategy = mirrored()
    elif name == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # cluster from TF_CONFIG
    elif name == "tpu":
        address = tpu_address()
        if address is None:
            raise UserError("--strategy tpu: no TPU found (set TPU_NAME, or run on a TPU VM)")
        strategy = connect_tpu(address)
    else:
        raise UserError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    log.info("strategy %s with %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this worker writes checkpoints, logs and metrics (all but the chief of a multi-worker run)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict() or isinstance(strategy, tf.distribute.TPUStrategy):
        return True
    return resolver.task_type in ("chief", None) or (resolver.task_type == "worker" and resolver.task_id == 0
                                                     and "chief" not in resolver.cluster_spec().as_dict())
