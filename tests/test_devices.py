"""The device code paths on a CPU: TensorFlow's kNN against numpy's, the batched float16 and XLA functions through the
script, the GPU branches ($KIT_GPU_PATHS=1), and several devices (logical CPU devices) giving one device's
predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from local_eval.submission_script import SCRIPT, load_submission, sibling
from tests import HANG_GUARD_S
from tests import LIGHT as LIGHT_BASE

sub = load_submission()
search = sibling("search")
savedmodel = sibling("savedmodel")
devices = sibling("devices")
LIGHT = [*LIGHT_BASE, "--rerank", "3", "--warmup-queries", "4", "--rerank-batch", "8"]


def unit_rows(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    return search.l2_normalize(rng.normal(size=(count, dim)).astype(np.float32))


@pytest.mark.parametrize(
    "nq, n_db, k, q_block, db_block", [(37, 500, 10, 16, 128), (5, 90, 100, 2, 64), (64, 1000, 1, 64, 1000)]
)
def test_knn_tensorflow_finds_the_neighbours_knn_numpy_finds(nq, n_db, k, q_block, db_block):
    rng = np.random.default_rng(nq + n_db)
    queries, database = unit_rows(rng, nq, 24), unit_rows(rng, n_db, 24)
    k_found = min(k, n_db)
    tf_scores, tf_rows = search.knn_tensorflow(queries, database, k_found, q_block=q_block, db_block=db_block)
    np_scores, np_rows = search.knn_numpy(queries, database, k_found, q_block=q_block, db_chunk=db_block)
    assert tf_rows.shape == np_rows.shape == (nq, k_found) and tf_rows.dtype == np.int64
    np.testing.assert_allclose(tf_scores, np_scores, atol=1e-5)
    # ties aside: a position whose score equals its neighbour's may hold either row
    close = np.isclose(np_scores[:, 1:], np_scores[:, :-1], atol=1e-6)
    tied = np.zeros(np_rows.shape, bool)
    tied[:, 1:] |= close
    tied[:, :-1] |= close
    assert not ((tf_rows != np_rows) & ~tied).any()
    assert np.all(np.diff(tf_scores, axis=1) <= 1e-6), "descending"


def test_knn_takes_tensorflow_with_kit_gpu_paths(monkeypatch):
    rng = np.random.default_rng(3)
    queries, database = unit_rows(rng, 20, 16), unit_rows(rng, 300, 16)
    calls = []
    monkeypatch.setattr(
        search,
        "knn_tensorflow",
        lambda *a, **kw: calls.append(kw) or search.knn_numpy(*a, q_block=kw["q_block"], db_chunk=kw["db_block"]),
    )
    monkeypatch.delenv(search.GPU_PATHS_ENV, raising=False)
    plain = search.knn(queries, database, 7)
    assert not calls and not search.gpu_present()
    monkeypatch.setenv(search.GPU_PATHS_ENV, "1")
    assert search.gpu_present()
    through_tf = search.knn(queries, database, 7)
    assert len(calls) == 1
    np.testing.assert_array_equal(plain[1], through_tf[1])


def run_script(data, model, work, *extra: str) -> tuple[pd.DataFrame, dict]:
    out = work.parent / f"{work.name}.csv"
    argv = [
        "--task",
        "recognition",
        "--data",
        str(data),
        "--model",
        str(model),
        "--out",
        str(out),
        "--work",
        str(work),
        *LIGHT,
        *extra,
    ]
    assert sub.main(argv) == 0
    return pd.read_csv(out, dtype=str, keep_default_na=False), json.loads((work / "timing.json").read_text())


def db_descriptors(work) -> np.ndarray:
    with np.load(work / "global" / "m0" / "train" / "chunk_000000.npz") as chunk:
        return chunk["descriptors"][chunk["ok"]].astype(np.float32)


def spy_global_batch(monkeypatch) -> list[tuple[str, bool, bool]]:
    """Record each batched global call: (precision, xla asked for, a batched function for it exists)."""
    calls, original = [], savedmodel.DelgSavedModel.global_batch

    def spied(self, images, global_scales, precision, xla=False):
        calls.append((precision, xla, (precision, xla) in self.batched))
        return original(self, images, global_scales, precision, xla)

    monkeypatch.setattr(savedmodel.DelgSavedModel, "global_batch", spied)
    return calls


def test_float16_and_xla_batched_functions_run_through_the_script(
    tiny_competition, tiny_float16_model, tmp_path, monkeypatch
):
    data = tiny_competition / "landmark-recognition"
    fixed = ["--plan", "fixed", "--rerank", "0"]
    calls = spy_global_batch(monkeypatch)
    _, timing32 = run_script(data, tiny_float16_model, tmp_path / "f32", *fixed, "--global-xla", "off")
    assert ("float32", False, True) in calls
    calls.clear()
    frame, timing16 = run_script(
        data, tiny_float16_model, tmp_path / "f16xla", *fixed, "--global-precision", "float16", "--global-xla", "on"
    )
    batches = [call for call in calls if call[0] == "float16"]  # the others: the model's load-time check (float32)
    assert batches and set(batches) == {("float16", True, True)}, "every batch through the XLA float16 function"
    assert timing16["stages"]["global_db"]["items"] == timing32["stages"]["global_db"]["items"] > 0
    float32, float16 = db_descriptors(tmp_path / "f32"), db_descriptors(tmp_path / "f16xla")
    assert float16.shape == float32.shape and np.isfinite(float16).all()
    assert (float16 * float32).sum(axis=1).min() >= 0.99
    assert np.abs(float16 - float32).max() > 1e-6, "float16 arithmetic, not the float32 function"
    assert frame["landmarks"].str.len().gt(0).all()


def test_the_gpu_branches_run_on_a_cpu_with_kit_gpu_paths(tiny_competition, tiny_model, tmp_path, monkeypatch):
    data = tiny_competition / "landmark-recognition"
    plain, _ = run_script(data, tiny_model, tmp_path / "plain", "--plan", "fixed")
    monkeypatch.setenv(search.GPU_PATHS_ENV, "1")
    tf_knn = []
    original = search.knn_tensorflow
    monkeypatch.setattr(search, "knn_tensorflow", lambda *a, **kw: tf_knn.append(1) or original(*a, **kw))
    gpu, _ = run_script(data, tiny_model, tmp_path / "gpu", "--plan", "fixed")
    assert tf_knn, "the kNN went through TensorFlow"
    assert gpu["id"].tolist() == plain["id"].tolist()
    split = lambda frame: frame["landmarks"].str.split(" ", expand=True)
    assert (split(gpu)[0] == split(plain)[0]).all()
    np.testing.assert_allclose(split(gpu)[1].astype(float), split(plain)[1].astype(float), atol=1e-4)
    # the plan's GPU branch: XLA timed beside the plain function (auto), as on a GPU
    work = tmp_path / "probe"
    assert (
        sub.main(
            [
                "--task",
                "recognition",
                "--data",
                str(data),
                "--model",
                str(tiny_model),
                "--work",
                str(work),
                "--out",
                str(tmp_path / "probe.csv"),
                "--probe",
                "8",
                "--global-batch",
                "4",
                *LIGHT,
            ]
        )
        == 0
    )
    xla = json.loads((work / "timing.json").read_text())["plan"]["rungs"][-1]["xla"]
    assert xla["seconds_per_image"] > 0 and isinstance(xla["used"], bool)


def test_two_devices_give_one_devices_predictions_and_share_the_work(tiny_competition, tiny_model, tmp_path):
    data = tiny_competition / "landmark-recognition"  # conftest splits the CPU into two logical devices
    one, timing_one = run_script(data, tiny_model, tmp_path / "one", "--plan", "fixed", "--devices", "1")
    two, timing_two = run_script(data, tiny_model, tmp_path / "two", "--plan", "fixed", "--devices", "2")
    pd.testing.assert_frame_equal(one, two)
    assert len(timing_one["devices"]) == 1 and timing_two["plan"]["devices"] == len(timing_two["devices"]) == 2
    stages = timing_two["stages"]
    done = {name: sum(items[name] for items in timing_two["devices"].values()) for name in devices.PASSES}
    assert (
        done
        == {
            "global": stages["global_db"]["items"] + stages["global_query"]["items"],
            "local": stages["local_features"]["items"],
        }
        and done["local"] > 0
    )
    assert all(min(items.values()) > 0 for items in timing_two["devices"].values()), "each device did some of both"


def test_kit_logical_devices_splits_the_cpu_in_a_fresh_process(tiny_competition, tiny_model, tmp_path):
    work = tmp_path / "work"
    data = tiny_competition / "landmark-retrieval"
    command = [
        sys.executable,
        str(SCRIPT),
        "--task",
        "retrieval",
        "--data",
        str(data),
        "--model",
        str(tiny_model),
        "--out",
        str(tmp_path / "submission.csv"),
        "--work",
        str(work),
        *LIGHT,
        "--plan",
        "fixed",
        "--rerank",
        "0",
    ]
    env = {**os.environ, devices.LOGICAL_DEVICES_ENV: "3"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stderr[-3000:]
    used = json.loads((work / "timing.json").read_text())["devices"]
    assert sorted(used) == [f"/device:CPU:{i}" for i in range(3)]
    assert sum(items["global"] for items in used.values()) > 0


@pytest.mark.parametrize("flag, says", [("5", "--devices 5: only 2 visible"), ("two", "--devices 'two': expected")])
def test_a_bad_devices_flag_is_one_error_line(tiny_competition, tiny_model, tmp_path, capsys, flag, says):
    argv = [
        "--task",
        "recognition",
        "--data",
        str(tiny_competition / "landmark-recognition"),
        "--model",
        str(tiny_model),
        "--out",
        str(tmp_path / "s.csv"),
        "--work",
        str(tmp_path / "work"),
        "--devices",
        flag,
    ]
    assert sub.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {says}")
