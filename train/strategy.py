"""Which tf.distribute strategy a run uses (auto | default | mirrored | multiworker | tpu), and who is the chief."""

from __future__ import annotations

import functools
import json
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


@functools.cache
def mirrored() -> tf.distribute.Strategy:
    """Mirrored over every GPU; without GPUs, over every logical CPU device (2 in the tests).

    One per process: two MirroredStrategy objects number their collective operations alike, and when both
    have run, TensorFlow mixes up the two ("Shape mismatch in the collective instance")."""
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def resolve_strategy(name: str) -> str:
    """The concrete strategy `name` stands for: auto is tpu when one is reachable, mirrored with more than
    one GPU, else default."""
    if name not in STRATEGIES:
        raise UserError(f"--strategy {name}: choose one of {', '.join(STRATEGIES)}")
    if name != "auto":
        return name
    if tpu_address():
        return "tpu"
    return "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"


def check_tf_config() -> None:
    """--strategy multiworker reads the cluster from TF_CONFIG: it must be there and name this worker's task."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise UserError(
            "--strategy multiworker: TF_CONFIG is not set; it lists the cluster's workers and this "
            'worker\'s task, e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}'
        )
    try:
        config = json.loads(text)
        workers = config["cluster"][config["task"]["type"]]
        index = int(config["task"]["index"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"--strategy multiworker: TF_CONFIG is not a cluster and task ({err!r})") from None
    if not 0 <= index < len(workers):
        raise UserError(
            f"--strategy multiworker: TF_CONFIG task index {index} is not one of the "
            f"{len(workers)} {config['task']['type']} addresses"
        )


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The strategy of resolve_strategy(name), connected and ready."""
    name = resolve_strategy(name)
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        strategy = mirrored()
    elif name == "multiworker":
        check_tf_config()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        address = tpu_address()
        if address is None:
            raise UserError("--strategy tpu: no TPU found (set TPU_NAME, or run on a TPU VM)")
        strategy = connect_tpu(address)
    log.info("strategy %s with %d replica(s)", name, strategy.num_replicas_in_sync)
    return strategy


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """The STRATEGIES name of a strategy object (metrics.json records it, not TensorFlow's class name)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "multiworker"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "mirrored"
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    return "default"


def worker_count(strategy: tf.distribute.Strategy) -> int:
    """How many worker processes train together (1 for every strategy but multiworker over a cluster)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    spec = strategy.cluster_resolver.cluster_spec().as_dict()
    return max(1, sum(len(spec.get(job, [])) for job in ("chief", "worker")))


def worker_id(strategy: tf.distribute.Strategy) -> int:
    """This worker's index in the group: 0 on the chief."""
    if worker_count(strategy) == 1:
        return 0
    resolver = strategy.cluster_resolver
    offset = 1 if "chief" in resolver.cluster_spec().as_dict() and resolver.task_type == "worker" else 0
    return offset + (resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this worker writes checkpoints, logs and metrics (all but the chief of a multi-worker run)."""
    return worker_id(strategy) == 0
