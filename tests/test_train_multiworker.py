"""Two workers on localhost (MultiWorkerMirroredStrategy) that survive a SIGTERM and a kill -9 of one worker, and
end with the weights of the uninterrupted mirrored run (test_train_distributed's config, conftest's reference)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests import HANG_GUARD_S
from tests.test_train_distributed import FLAGS, STEPS, assert_same_weights
from train.run_files import CHECKPOINT_DIR, METRICS_FILE

REPO = Path(__file__).resolve().parents[1]
# How long a worker may take to start and reach a checkpoint, or to end: a hang guard only (two TensorFlow processes
# start and trace at once on a busy 2-core machine; 90 s was once too short at a load average of 7.5).
WORKER_WAIT_S = HANG_GUARD_S


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
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        }
        command = [
            sys.executable,
            "-m",
            "train",
            "--data",
            str(data_dir),
            "--config",
            "tiny",
            "--out",
            str(run_dir),
            "--strategy",
            "multiworker",
            *flags,
        ]
        workers.append(
            subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return workers


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in (run_dir / CHECKPOINT_DIR).glob("ckpt-*.index"))


def wait_for_checkpoint_after(run_dir: Path, step: int, workers: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + WORKER_WAIT_S
    while not [s for s in checkpoint_steps(run_dir) if s > step]:
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers), [
            w.communicate()[1][-3000:] for w in workers if w.poll() is not None
        ]
        time.sleep(0.05)


def finish(workers: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    return [(w.wait(timeout=WORKER_WAIT_S), *w.communicate()) for w in workers]


def final_step(stdout: str) -> int:
    """The step in the `step N/M: ...` line that python -m train prints last."""
    return int(stdout.strip().splitlines()[-1].split("/")[0].removeprefix("step "))


def test_two_workers_survive_a_preempted_worker(data_dir, tmp_path, request):
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
    assert chief_rc == 2 and "error: worker 0: lost the group" in chief_err and "Traceback" not in chief_err, chief_err[
        -3000:
    ]
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
    # asked for last: another xdist worker may be training it meanwhile, beside these subprocesses
    assert_same_weights(chief_dir, request.getfixturevalue("mirrored_reference"))
