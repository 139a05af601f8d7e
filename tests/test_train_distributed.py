"""Distributed training on CPU: mirrored over two logical CPUs through checkpoint and resume, and two workers on
localhost (MultiWorkerMirroredStrategy) that survive a SIGTERM and a kill -9 of one worker.

The uninterrupted mirrored run is the reference of both: two workers of one replica each split every global
batch as two mirrored replicas do, so their weights agree.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.test_train_loop import checkpoint_values
from train.config import get_config
from train.loop import train
from train.run_files import CHECKPOINT_DIR, METRICS_FILE

REPO = Path(__file__).resolve().parents[1]
STEPS = 32
# How long a worker may take to start and reach a checkpoint, or to end: generous, for a busy 2-core machine (two
# TensorFlow processes start and trace there at once; 90 s was once too short at a load average of 7.5).
WORKER_WAIT_S = 300
FLAGS = {"image_size": 64, "batch_size": 8, "steps": STEPS, "warmup_steps": 4, "checkpoint_every": 4,
         "log_every": 4, "validate_every": 1000}


def config():
    return get_config("tiny", **FLAGS)


@pytest.fixture(scope="module")
def data_dir(tiny_competition):
    return tiny_competition / "landmark-recognition"


@pytest.fixture(scope="module")
def mirrored_reference(data_dir, tmp_path_factory):
    """A run of config() under MirroredStrategy over the two logical CPUs, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("mirrored") / "run"
    metrics = train(config(), data_dir=data_dir, run_dir=run_dir, strategy="mirrored")
    assert metrics["step"] == STEPS and metrics["replicas"] == 2 and metrics["strategy"] == "mirrored"
    return run_dir


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    expected, got = checkpoint_values(reference), checkpoint_values(run_dir)
    assert expected.keys() == got.keys() and any("optimizer" in name for name in got)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_mirrored_resumes_at_its_step_with_the_same_weights(data_dir, mirrored_reference, tmp_path):
    run_dir = tmp_path / "run"
    first = train(config(), data_dir=data_dir, run_dir=run_dir, strategy="mirrored", stop_after=6)
    assert first["step"] == 6 and tf.train.latest_checkpoint(str(run_dir / CHECKPOINT_DIR)).endswith("-6")
    second = train(config(), data_dir=data_dir, run_dir=run_dir, strategy="mirrored")
    assert second["step"] == STEPS and second["applied_steps"] == STEPS and second["skipped_steps"] == 0
    assert_same_weights(run_dir, mirrored_reference)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(data_dir: Path, run_dirs: list[Path]) -> list[subprocess.Popen]:
    """One `python -m train --strategy multiworker` process per run folder, on fresh localhost ports."""
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(len(run_dirs))]}
    flags = [arg for name, value in FLAGS.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    workers = []
    for index, run_dir in enumerate(run_dirs):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        command = [sys.executable, "-m", "train", "--data", str(data_dir), "--config", "tiny", "--out", str(run_dir),
                   "--strategy", "multiworker", *flags]
        workers.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True))
    return workers


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in (run_dir / CHECKPOINT_DIR).glob("ckpt-*.index"))


def wait_for_checkpoint_after(run_dir: Path, step: int, workers: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + WORKER_WAIT_S
    while not [s for s in checkpoint_steps(run_dir) if s > step]:
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers), \
            [w.communicate()[1][-3000:] for w in workers if w.poll() is not None]
        time.sleep(0.05)


def finish(workers: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    return [(w.wait(timeout=WORKER_WAIT_S), *w.communicate()) for w in workers]


def final_step(stdout: str) -> int:
    """The step in the `step N/M: ...` line that python -m train prints last."""
    return int(stdout.strip().splitlines()[-1].split("/")[0].removeprefix("step "))


def test_two_workers_survive_a_preempted_worker(data_dir, mirrored_reference, tmp_path):
    chief_dir = tmp_path / "chief"

    # 1. SIGTERM to worker 1 alone: the whole group stops after one step, with the chief's checkpoint of it.
    workers = start_workers(data_dir, [chief_dir, tmp_path / "worker1-a"])
    wait_for_checkpoint_after(chief_dir, 0, workers)
    workers[1].send_signal(signal.SIGTERM)
    (chief_rc, chief_out, chief_err), (worker_rc, worker_out, worker_err) = finish(workers)
    assert chief_rc == worker_rc == 128 + signal.SIGTERM, (chief_err[-3000:], worker_err[-3000:])
    stopped_at = final_step(chief_out)
    assert final_step(worker_out) == stopped_at < STEPS and checkpoint_steps(chief_dir)[-1] == stopped_at
    metrics = json.loads((chief_dir / METRICS_FILE).read_text())
    assert metrics["stopped_by"] == "SIGTERM" and metrics["strategy"] == "multiworker" and metrics["workers"] == 2
    assert not (chief_dir / "workertemp_1").exists() and not any((tmp_path / "worker1-a").glob("*/ckpt-*"))

    # 2. Both restart (worker 1 from an empty folder); worker 1 is killed outright mid-run: the chief ends with one
    # error line.
    workers = start_workers(data_dir, [chief_dir, tmp_path / "worker1-b"])
    wait_for_checkpoint_after(chief_dir, stopped_at, workers)
    workers[1].kill()
    (chief_rc, chief_out, chief_err), (worker_rc, _, _) = finish(workers)
    assert worker_rc == -signal.SIGKILL
    assert chief_rc == 2 and "error: worker 0: lost the group" in chief_err and "Traceback" not in chief_err, \
        chief_err[-3000:]
    killed_after = checkpoint_steps(chief_dir)[-1]
    assert stopped_at < killed_after < STEPS

    # 3. Both restart once more, worker 1 again from an empty folder: they resume at the chief's step and finish.
    workers = start_workers(data_dir, [chief_dir, tmp_path / "worker1-c"])
    (chief_rc, chief_out, chief_err), (worker_rc, worker_out, worker_err) = finish(workers)
    assert chief_rc == worker_rc == 0, (chief_err[-3000:], worker_err[-3000:])
    assert final_step(chief_out) == final_step(worker_out) == STEPS
    assert f"starts at the chief's step {killed_after}" in worker_err
    metrics = json.loads((chief_dir / METRICS_FILE).read_text())
    assert metrics["step"] == metrics["applied_steps"] == STEPS and metrics["stopped_by"] is None
    assert_same_weights(chief_dir, mirrored_reference)
