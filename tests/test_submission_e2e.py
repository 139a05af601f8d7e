"""End-to-end runs of submission/main.py on a tiny Kaggle-layout competition with tiny DELG models.

The model and data folders come from fixtures (`delg_model_dir`, `competition`): swap in conftest's
`tiny_model` / `tiny_competition` to run the same checks on the real exported model and synthetic data.
With $KIT_SCRIPT_PYTHON set (`make kaggle-check`: .venv-kaggle's Python, Kaggle's image's versions), the script
runs with that interpreter while the models and data come from this one; the tests that call or patch the
script inside this process are skipped then.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.gldv2 import image_path
from export.delg import EXPORT_INFO_FILE
from local_eval.submission_script import SCRIPT, SCRIPT_PYTHON_ENV, load_submission, sibling
from tests import HANG_GUARD_S
from tests.delg_test_models import write_tf1_model, write_tf2_model

sub = load_submission()
store = sibling("store")
SCRIPT_PYTHON = os.environ.get(SCRIPT_PYTHON_ENV)  # when set, the interpreter that runs the script
in_this_process = pytest.mark.skipif(
    bool(SCRIPT_PYTHON), reason=f"calls or patches the script in this process, not with ${SCRIPT_PYTHON_ENV}"
)
VERSIONS_PROBE = (
    "import importlib.metadata as m, json, sys; print(json.dumps({'python': sys.version.split()[0], "
    "**{name: m.version(name) for name in ('tensorflow', 'numpy', 'pandas', 'scikit-learn', "
    "'pydegensac')}}))"
)
LANDMARKS = 4
FAST = [
    "--scales",
    "0.5",
    "1.0",
    "--global-scale-indices",
    "0",
    "1",
    "--max-features",
    "300",
    "--warmup-queries",
    "2",
    "--rerank-batch",
    "3",
    "--ransac-threshold-px",
    "4",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_models")
    return {"tf2": write_tf2_model(root / "tf2"), "tf1": write_tf1_model(root / "tf1")}


@pytest.fixture(scope="module")
def delg_model_dir(models):
    return models["tf2"]


def scene(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = np.kron(rng.integers(0, 256, (size // 8, size // 8, 3)), np.ones((8, 8, 1)))
    return np.clip(blocks + rng.normal(0, 20, blocks.shape), 0, 255).astype(np.uint8)


def save(path, array: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format=fmt, quality=95)
    path.write_bytes(buffer.getvalue())


def odd_images(root, split: str, rng) -> dict[str, bool]:
    """Corrupt and unusual test images; value: whether the image is readable."""
    image = scene(99)
    writers = {
        "zero_byte": (False, lambda p: p.write_bytes(b"")),
        "truncated": (False, lambda p: (save(p, image), p.write_bytes(p.read_bytes()[:300]))),
        "missing": (False, lambda p: None),
        "gray": (True, lambda p: save(p, image[..., 0], "PNG")),
        "cmyk": (True, lambda p: save(p, image, "JPEG", "CMYK")),
        "rgba": (True, lambda p: save(p, image, "PNG", "RGBA")),
        "one_pixel": (True, lambda p: save(p, image[:1, :1])),
        "strip": (True, lambda p: save(p, np.tile(image[:3], (1, 8, 1)))),
    }
    readable = {}
    for ok, write in writers.values():
        image_id = rng.bytes(8).hex()
        path = image_path(root, split, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        readable[image_id] = ok
    return readable


def build_competition(root) -> dict:
    """Both tasks: LANDMARKS scenes x 2 database images; a shifted view of each scene and odd images as tests."""
    rng = np.random.default_rng(0)
    truth = {"views": {}, "odd": {}}
    db = [
        (rng.bytes(8).hex(), lm, scene(lm) if copy == 0 else np.roll(scene(lm), 4, axis=0))
        for lm in range(LANDMARKS)
        for copy in range(2)
    ]
    views = {rng.bytes(8).hex(): lm for lm in range(LANDMARKS)}
    for task, split, column in [("recognition", "train", "landmarks"), ("retrieval", "index", "images")]:
        folder = root / f"landmark-{task}"
        for image_id, _, pixels in db:
            save(image_path(folder, split, image_id), pixels)
        for image_id, lm in views.items():
            save(image_path(folder, "test", image_id), np.ascontiguousarray(scene(lm)[8:, 8:]), "PNG")
        odd = odd_images(folder, "test", np.random.default_rng(1))
        test_ids = list(views) + list(odd)
        pd.DataFrame({"id": test_ids, column: ""}).to_csv(folder / "sample_submission.csv", index=False)
        truth["odd"] = odd
    pd.DataFrame({"id": [i for i, _, _ in db], "landmark_id": [lm for _, lm, _ in db]}).to_csv(
        root / "landmark-recognition" / "train.csv", index=False
    )
    truth["views"] = views
    truth["db_landmark"] = {i: lm for i, lm, _ in db}
    return truth


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    root = tmp_path_factory.mktemp("competition")
    return root, build_competition(root)


def run_main(argv: list[str]) -> tuple[int, str]:
    """The script's exit status and its error output: run in this process, or with $KIT_SCRIPT_PYTHON."""
    if SCRIPT_PYTHON:
        result = subprocess.run(
            [SCRIPT_PYTHON, str(SCRIPT), *argv], capture_output=True, text=True, timeout=HANG_GUARD_S
        )
        return result.returncode, result.stderr
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        status = sub.main(argv)
    return status, errors.getvalue()


def script_versions() -> dict[str, str]:
    """The versions of Python and of the script's packages where the script runs, as its interpreter reports them."""
    probe = subprocess.run(
        [SCRIPT_PYTHON or sys.executable, "-c", VERSIONS_PROBE], capture_output=True, text=True, check=True
    )
    return json.loads(probe.stdout)


def run_script(task: str, data, model, tmp_path, *extra: str) -> tuple[pd.DataFrame, dict]:
    out, work = tmp_path / "submission.csv", tmp_path / "work"
    argv = [
        "--task",
        task,
        "--data",
        str(data),
        "--model",
        str(model),
        "--out",
        str(out),
        "--work",
        str(work),
        *FAST,
        *extra,
    ]
    status, errors = run_main(argv)
    assert status == 0, errors[-3000:]
    timing = json.loads((work / "timing.json").read_text())
    return pd.read_csv(out, dtype=str, keep_default_na=False), timing


def assert_complete(frame: pd.DataFrame, data, column: str) -> None:
    expected = pd.read_csv(data / "sample_submission.csv", dtype=str)["id"].tolist()
    assert frame.columns.tolist() == ["id", column]
    assert frame["id"].tolist() == expected


def test_recognition_end_to_end(competition, delg_model_dir, tmp_path, monkeypatch):
    root, truth = competition
    data = root / "landmark-recognition"
    pools = []
    start_pool = concurrent.futures.ProcessPoolExecutor.__init__

    def counted_start(pool, *args, **kwargs):
        pools.append(pool)
        start_pool(pool, *args, **kwargs)

    monkeypatch.setattr(concurrent.futures.ProcessPoolExecutor, "__init__", counted_start)
    frame, timing = run_script("recognition", data, delg_model_dir, tmp_path, "--workers", "2", "--rerank", "3")
    if not SCRIPT_PYTHON:
        assert len(pools) == 1  # one verification pool for every batch (counted in this process only)
    assert_complete(frame, data, "landmarks")
    predictions = dict(zip(frame["id"], frame["landmarks"], strict=True))
    for image_id, landmark in truth["views"].items():
        predicted, score = predictions[image_id].split()
        assert int(predicted) == landmark and float(score) > 0
    for image_id, readable in truth["odd"].items():
        assert (predictions[image_id] != "") == readable, image_id
    assert set(timing["stages"]) == set(sub.TIMING_STAGES)
    assert timing["stages"]["global_db"]["items"] == 2 * LANDMARKS
    assert timing["stages"]["verification"]["items"] > 0 and timing["rerank_depth"] == 3
    assert timing["stages"]["knn"]["items"] == len(frame) * 2 * LANDMARKS  # queries x database rows searched
    assert (tmp_path / "work" / "submission_global_only.csv").is_file()
    pairs = pd.read_csv(tmp_path / "work" / "verified_pairs.csv")
    assert len(pairs) == timing["stages"]["verification"]["items"]
    assert pairs.columns.tolist() == ["id", "rank", "candidate", "cosine", "inliers"]
    versions = script_versions()
    assert timing["versions"] == versions
    assert json.loads((tmp_path / "work" / "settings.json").read_text())["versions"] == versions


def test_retrieval_end_to_end_with_a_tf1_model(competition, models, tmp_path):
    root, truth = competition
    data = root / "landmark-retrieval"
    frame, timing = run_script("retrieval", data, models["tf1"], tmp_path, "--workers", "0")
    assert_complete(frame, data, "images")
    results = dict(zip(frame["id"], frame["images"], strict=True))
    for image_id, landmark in truth["views"].items():
        ranked = results[image_id].split()
        assert len(ranked) == 2 * LANDMARKS and len(set(ranked)) == len(ranked)
        assert {truth["db_landmark"][i] for i in ranked[:2]} == {landmark}
    for image_id, readable in truth["odd"].items():
        assert (results[image_id] != "") == readable, image_id
    assert timing["stages"]["verification"]["items"] > 0


def test_budget_too_small_for_reranking_gives_the_global_only_file(competition, delg_model_dir, tmp_path):
    data = competition[0] / "landmark-recognition"
    frame, timing = run_script("recognition", data, delg_model_dir, tmp_path, "--time-budget-h", "1e-9")
    assert_complete(frame, data, "landmarks")
    global_only = (tmp_path / "work" / "submission_global_only.csv").read_text()
    assert (tmp_path / "submission.csv").read_text() == global_only
    assert timing["stages"]["verification"]["items"] == 0 and timing["rerank_depth"] == 0


def settings_for(task: str, data, model, work, *extra: str):
    return sub.parse_settings(
        ["--task", task, "--data", str(data), "--model", str(model), "--work", str(work), *FAST, *extra]
    )


@in_this_process
def test_reranking_puts_the_verified_view_first(competition, delg_model_dir, tmp_path):
    """A query whose global ranking is wrong: RANSAC inliers move the true match above the impostor."""
    root, truth = competition
    data = root / "landmark-retrieval"
    db_ids = sorted(truth["db_landmark"])
    query_id = next(iter(truth["views"]))
    settings = settings_for("retrieval", data, delg_model_dir, tmp_path)
    model = sub.DelgSavedModel(delg_model_dir, settings.extraction)
    true_match = next(i for i in db_ids if truth["db_landmark"][i] == truth["views"][query_id])
    impostor = next(i for i in db_ids if truth["db_landmark"][i] != truth["views"][query_id])
    neighbours = np.array([[db_ids.index(impostor), db_ids.index(true_match)]])  # impostor first
    timing = sub.Timing(tmp_path / "timing.json", "retrieval", settings.budget)
    inputs = sub.Inputs([query_id], "index", db_ids, np.zeros(0, np.int64))
    inliers = sub.verify_queries(
        model, settings, timing, inputs, neighbours, [0], max_depth=2, on_progress=lambda *_: None
    )
    assert inliers[0, 1] > inliers[0, 0]
    rows = sub.retrieval_rows(np.array([[0.9, 0.8]]), neighbours, inliers, db_ids, np.array([True]))
    assert rows[0].split() == [true_match, impostor]


class Interrupting:
    """Wraps a DelgSavedModel; raises KeyboardInterrupt on the given global call, as a killed kernel would stop."""

    def __init__(self, model, stop_at: int):
        self.model, self.calls, self.stop_at = model, 0, stop_at
        self.global_dim, self.batched, self.parallel = model.global_dim, model.batched, model.parallel

    def device_copy(self, stage: str, count: int):
        return contextlib.nullcontext(self)

    def global_batch(self, images, scales, precision, xla=False):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.model.global_batch(images, scales, precision, xla)


@in_this_process
def test_interrupted_extraction_resumes_from_the_cache(competition, delg_model_dir, tmp_path):
    data = competition[0] / "landmark-recognition"
    ids, _ = sub.read_train_labels(data)
    paths = [image_path(data, "train", i) for i in ids]
    settings = settings_for(
        "recognition", data, delg_model_dir, tmp_path, "--chunk-size", "3", "--cache-float16", "--global-batch", "1"
    )
    model = sub.DelgSavedModel(delg_model_dir, settings.extraction)
    cache, extract = tmp_path / "global" / "train", sub.extract_global
    with pytest.raises(KeyboardInterrupt):
        extract(Interrupting(model, stop_at=5), ids, paths, cache, settings.extraction, settings.run)
    assert extract(model, ids, paths, cache, settings.extraction, settings.run) == (len(ids) - 3, False)  # chunk 0 kept
    assert extract(model, ids, paths, cache, settings.extraction, settings.run) == (0, False)
    descriptors, ok = sub.load_global(cache, ids, chunk_size=3)
    assert ok.all() and descriptors.shape == (len(ids), model.global_dim)
    image = store.decode_for_global(paths[4], settings.extraction.global_max_side)
    np.testing.assert_allclose(
        descriptors[4], model.global_descriptor(image, settings.extraction.global_scales()), atol=1e-3
    )


@in_this_process
def test_a_deadline_during_the_database_pass_keeps_what_was_done(competition, delg_model_dir, tmp_path):
    data = competition[0] / "landmark-recognition"
    ids, _ = sub.read_train_labels(data)
    paths = [image_path(data, "train", i) for i in ids]
    settings = settings_for("recognition", data, delg_model_dir, tmp_path, "--chunk-size", "3", "--global-batch", "1")
    model = sub.DelgSavedModel(delg_model_dir, settings.extraction)
    cache = tmp_path / "global"
    done, stopped = sub.extract_global(
        model, ids, paths, cache, settings.extraction, settings.run, stop=lambda count, seconds: count >= 4
    )
    assert (done, stopped) == (4, True)
    with pytest.raises(sub.InputError, match="chunk 2 is missing"):
        sub.load_global(cache, ids, 3)
    _, ok = sub.load_global(cache, ids, 3, allow_missing=True)
    assert ok.tolist() == [True] * 4 + [False] * (len(ids) - 4)
    assert sub.extract_global(model, ids, paths, cache, settings.extraction, settings.run) == (len(ids) - 3, False)


def test_shards_merge_into_one_cache(competition, delg_model_dir, tmp_path):
    data = competition[0] / "landmark-recognition"
    chunks = tmp_path / "work" / "global" / "m0" / "train"
    for shard, chunk_count in [("0/2", 2), ("1/2", 3)]:  # 8 images in chunks of 3: shard 0 has 0 and 2
        argv = [
            "--task",
            "recognition",
            "--data",
            str(data),
            "--model",
            str(delg_model_dir),
            "--work",
            str(tmp_path / "work"),
            "--chunk-size",
            "3",
            "--shard",
            shard,
            *FAST,
        ]
        status, errors = run_main(argv)
        assert status == 0, errors[-3000:]
        assert len(list(chunks.glob("chunk_*.npz"))) == chunk_count
    assert not (tmp_path / "work" / "submission_global_only.csv").exists()
    _, timing = run_script("recognition", data, delg_model_dir, tmp_path, "--chunk-size", "3")
    assert timing["stages"]["global_db"]["items"] == 0  # everything came from the shards' cache


def test_missing_sample_submission_is_a_clear_error(tmp_path, delg_model_dir):
    argv = ["--task", "retrieval", "--data", str(tmp_path), "--model", str(delg_model_dir)]
    status, errors = run_main(argv)
    assert status == 2 and "sample_submission.csv" in errors.strip().splitlines()[-1]


def model_of_a_later_tensorflow(model_dir, exported_with: str | None):
    """A tiny model whose graph uses an op this TensorFlow lacks (as a TF 2.21 export does on TF 2.9)."""
    from tensorflow.core.protobuf import saved_model_pb2

    write_tf2_model(model_dir)
    saved = saved_model_pb2.SavedModel.FromString((model_dir / "saved_model.pb").read_bytes())
    for function in saved.meta_graphs[0].graph_def.library.function:
        for node in function.node_def:
            if node.op == "Conv2D":
                node.op = "OpOfALaterTensorFlow"
    (model_dir / "saved_model.pb").write_bytes(saved.SerializeToString())
    if exported_with is not None:
        (model_dir / "assets").mkdir(exist_ok=True)
        (model_dir / "assets" / EXPORT_INFO_FILE).write_text(json.dumps({"versions": {"tensorflow": exported_with}}))
    return model_dir


@pytest.mark.parametrize(
    "exported_with, named", [("9.1.0", "TensorFlow 9.1.0"), (None, "an unrecorded TensorFlow (no version in assets/")]
)
def test_a_model_this_tensorflow_cannot_load_ends_with_one_error_line(competition, tmp_path, exported_with, named):
    model = model_of_a_later_tensorflow(tmp_path / "model", exported_with)
    argv = [
        "--task",
        "retrieval",
        "--data",
        str(competition[0] / "landmark-retrieval"),
        "--model",
        str(model),
        "--out",
        str(tmp_path / "submission.csv"),
        "--work",
        str(tmp_path / "work"),
    ]
    status, errors = run_main(argv)
    running = script_versions()["tensorflow"]
    last = errors.strip().splitlines()[-1]
    assert status == 2 and "Traceback" not in errors
    assert last.startswith(
        f"error: --model {model}: TensorFlow {running} cannot load it (Op type not registered 'OpOfALaterTensorFlow'"
    )
    assert f"it was exported with {named}" in last
    oldest = sibling("savedmodel").OLDEST_LOADING_TF
    assert last.endswith(f"TensorFlow {oldest} or newer is known to load the kit's exports")


def test_synthetic_competition_both_tasks(tiny_competition, delg_model_dir, tmp_path):
    """The kit's own synthetic competition (conftest's `tiny_competition`) runs through both tasks."""
    for task, column in [("recognition", "landmarks"), ("retrieval", "images")]:
        data = tiny_competition / f"landmark-{task}"
        frame, _ = run_script(task, data, delg_model_dir, tmp_path / task, "--rerank", "2")
        assert_complete(frame, data, column)


def stage_items(timing: dict) -> dict[str, int]:
    return {name: stage["items"] for name, stage in timing["stages"].items()}


def test_changed_settings_or_model_clear_the_caches(competition, models, tmp_path):
    data = competition[0] / "landmark-recognition"
    run = lambda model, *extra: stage_items(
        run_script("recognition", data, model, tmp_path, "--workers", "0", *extra)[1]
    )
    first = run(models["tf2"])
    assert first["global_db"] > 0 and first["local_features"] > 0
    unchanged = run(models["tf2"])
    assert unchanged["global_db"] == unchanged["global_query"] == unchanged["local_features"] == 0
    fewer_features = run(models["tf2"], "--max-features", "200")  # local settings: global descriptors stay
    assert fewer_features["global_db"] == 0 and fewer_features["local_features"] > 0
    smaller = run(models["tf2"], "--max-features", "200", "--global-max-side", "512")  # global settings only
    assert smaller["global_db"] == first["global_db"] and smaller["local_features"] == 0
    other_model = run(models["tf1"], "--max-features", "200")
    assert other_model["global_query"] == first["global_query"] and other_model["local_features"] > 0


@in_this_process
def test_chunk_check_reads_only_the_ids(competition, delg_model_dir, tmp_path):
    """A cached chunk whose descriptors cannot be read without pickle still counts as cached: only its ids and the
    stamps of its images (size, modification time) are read."""
    data = competition[0] / "landmark-recognition"
    ids, _ = sub.read_train_labels(data)
    paths = [image_path(data, "train", i) for i in ids]
    settings = settings_for("recognition", data, delg_model_dir, tmp_path, "--chunk-size", "3")
    model = sub.DelgSavedModel(delg_model_dir, settings.extraction)
    cache = tmp_path / "global"
    sub.extract_global(model, ids, paths, cache, settings.extraction, settings.run)
    np.savez(
        store.chunk_path(cache, 0),
        ids=np.array(ids[:3]),
        descriptors=np.array([None]),
        ok=np.ones(3, bool),
        complete=True,
        stamps=store.image_stamps(paths[:3]),
    )
    assert sub.extract_global(model, ids, paths, cache, settings.extraction, settings.run) == (0, False)


@in_this_process
def test_a_crash_during_extraction_leaves_out_alone_and_a_complete_empty_submission_in_work(
    competition, delg_model_dir, tmp_path, monkeypatch
):
    data = competition[0] / "landmark-retrieval"
    (tmp_path / "submission.csv").write_text("id,images\nabc123,def456\n")  # an earlier run's good result

    def crash(*_, **__):
        raise RuntimeError("killed during extraction")

    monkeypatch.setattr(store, "extract_global", crash)  # the passes after the plan
    with pytest.raises(RuntimeError, match="killed"):
        run_script("retrieval", data, delg_model_dir, tmp_path)
    assert (tmp_path / "submission.csv").read_text() == "id,images\nabc123,def456\n"
    frame = pd.read_csv(tmp_path / "work" / "submission_latest.csv", dtype=str, keep_default_na=False)
    assert_complete(frame, data, "images")
    assert (frame["images"] == "").all()


@in_this_process
def test_submission_rewrites_wait_for_write_every_s(competition, delg_model_dir, tmp_path, monkeypatch):
    data = competition[0] / "landmark-recognition"
    writes = []
    write = sub.write_submission
    monkeypatch.setattr(sub, "write_submission", lambda *a: (writes.append(a[3]), write(*a))[1])
    for every_s in ["300", "0"]:
        writes.clear()
        frame, timing = run_script(
            "recognition", data, delg_model_dir, tmp_path / every_s, "--workers", "0", "--write-every-s", every_s
        )
        pairs = pd.read_csv(tmp_path / every_s / "work" / "verified_pairs.csv", dtype={"id": str})
        assert len(pairs) == timing["stages"]["verification"]["items"] > 0
        assert not pairs.duplicated(["id", "rank"]).any()
        assert writes[-1] == frame["landmarks"].tolist()  # the final rows are always written
        # all-empty and global-only (WORK), final (--out); with 0 s also one after every batch (FAST makes several)
        if every_s == "300":
            assert len(writes) == 3
        else:
            assert len(writes) > 4


def test_an_ensemble_caches_each_model_and_concatenates_their_descriptors(competition, models, tmp_path):
    data = competition[0] / "landmark-recognition"
    frame, timing = run_script(
        "recognition",
        data,
        models["tf2"],
        tmp_path,
        "--model",
        str(models["tf1"]),
        "--model-weights",
        "1",
        "0.5",
        "--local-model",
        str(models["tf1"]),
        "--qe-n",
        "2",
        "--superglobal-m",
        "4",
        "--superglobal-k",
        "2",
    )
    assert_complete(frame, data, "landmarks")
    work = tmp_path / "work"
    for m in ("m0", "m1"):
        assert list((work / "global" / m / "train").glob("chunk_*.npz"))
    single = sub.load_global(work / "global" / "m0" / "test", frame["id"].tolist(), 10_000)[0]
    settings = sub.read_settings_record(work)
    assert [p.name for p in settings.run.model] == ["tf2", "tf1"]
    assert json.loads((work / "settings.json").read_text())["run"]["model_weights"] == [1.0, 0.5]
    assert timing["stages"]["global_rerank"]["items"] == len(frame)  # SuperGlobal, timed (alpha-QE: kNN products)
    assert single.shape[1] * 2 == sum(sub.DelgSavedModel(m, settings.extraction).global_dim for m in settings.run.model)


@in_this_process
def test_model_weights_must_match_the_models(competition, models, capsys):
    data = competition[0] / "landmark-recognition"
    argv = ["--task", "recognition", "--data", str(data), "--model", str(models["tf2"]), "--model-weights", "1", "2"]
    assert sub.main(argv) == 2
    assert "--model-weights gives 2 weights for 1 --model" in capsys.readouterr().err
