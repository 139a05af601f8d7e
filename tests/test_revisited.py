"""Revisited Oxford / Paris: revisitop's protocol metric on hand-computed cases, the synthetic dataset in its layout,
and `local_eval revisited` end to end with a tiny DELG model."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.cli import run_main
from local_eval.build import main as build_main
from local_eval.revisited import clear_stale
from local_eval.revisited import main as revisited_main
from local_eval.revisited_metric import (
    KAPPAS,
    average_precision,
    evaluate,
    positive_positions,
    precision_at,
    protocol_sets,
)
from local_eval.revisited_synthetic import build_revisited_synthetic
from local_eval.show import global_ranking
from local_eval.submission_script import load_submission
from tests.delg_test_models import write_tf2_model

sub = load_submission()
RERANK = 6
SCRIPT_FLAGS = [
    "--rerank",
    str(RERANK),
    "--scales",
    "0.7071",
    "1.0",
    "--global-scale-indices",
    "0",
    "1",
    "--max-features",
    "200",
    "--ransac-threshold-px",
    "4",
    "--workers",
    "0",
]


# ---------------------------------------------------------------------------------------------------------
# The metric, by hand


def test_ap_and_precision_without_ignored_images():
    ranking = np.array([0, 1, 2, 3, 4])
    positions = positive_positions(ranking, np.array([0, 2]), np.array([], np.int64))
    assert positions.tolist() == [0, 2]
    # trapezoids: (1 + 1)/2 at position 0, (1/2 + 2/3)/2 at position 2; each times the recall step 1/2
    assert average_precision(positions, 2) == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2)
    assert precision_at(positions, 1) == 1.0
    assert precision_at(positions, 5) == pytest.approx(2 / 3)  # cut at the last positive (3rd place), not at 5


def test_revisitop_precision_differs_from_plain_precision_at_k():
    positions = np.array([1, 3])  # positives 2nd and 4th
    assert average_precision(positions, 2) == pytest.approx(((0 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2)
    assert precision_at(positions, 1) == 0.0
    assert precision_at(positions, 5) == pytest.approx(2 / 4)  # plain precision@5 would be 2/5
    assert precision_at(positions, 10) == pytest.approx(2 / 4)


def test_junk_before_and_between_positives_is_taken_out():
    # ranking: junk 9, positive 5, negative 7, junk 3, positive 8, negative 1
    ranking = np.array([9, 5, 7, 3, 8, 1])
    positions = positive_positions(ranking, np.array([5, 8]), np.array([9, 3]))
    assert positions.tolist() == [0, 2]  # 1 - one junk above; 4 - two junk above
    assert average_precision(positions, 2) == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2)
    # a positive the ranking never reaches still counts in the recall step
    missing = positive_positions(ranking, np.array([5, 8, 42]), np.array([9, 3]))
    assert average_precision(missing, 3) == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 3)


def test_protocols_choose_positives_and_ignored():
    entry = {"easy": [1, 2], "hard": [3], "junk": [4]}
    as_lists = lambda protocol: [sorted(a.tolist()) for a in protocol_sets(entry, protocol)]
    assert as_lists("easy") == [[1, 2], [3, 4]]
    assert as_lists("medium") == [[1, 2, 3], [4]]
    assert as_lists("hard") == [[3], [1, 2, 4]]


def test_means_leave_out_queries_without_positives():
    gnd = [
        {"easy": [0], "hard": [1], "junk": [2]},
        {"easy": [1], "hard": [], "junk": []},
        {"easy": [], "hard": [], "junk": [0]},
    ]  # no positives anywhere: in no mean
    rankings = [np.array([3, 0, 2, 1]), np.array([1, 0, 2, 3]), np.array([0, 1, 2, 3])]
    report = evaluate(rankings, gnd)
    # query 0: easy  positive 0 at 1, ignored 2, 1 below it       -> AP 0.25, P@1 0, P@5 1/2
    #          medium positives 1 (3), 0 (1), ignored 2 (2)        -> positions [1, 2]: AP (0.25 + 7/12)/2
    #          hard  positive 1 at 3, ignored 2 and 0 above it     -> position 1: AP 0.25, P@5 1/2
    # query 1: easy and medium AP 1, P@k 1; no hard positive       -> left out of hard
    assert report["easy"]["map"] == pytest.approx((0.25 + 1) / 2)
    assert report["easy"]["mp@1"] == pytest.approx(0.5)
    assert report["easy"]["mp@5"] == pytest.approx((0.5 + 1) / 2)
    assert report["medium"]["map"] == pytest.approx(((0.25 + 7 / 12) / 2 + 1) / 2)
    assert report["medium"]["mp@5"] == pytest.approx((2 / 3 + 1) / 2)
    assert report["hard"]["map"] == pytest.approx(0.25)
    assert report["hard"]["mp@10"] == pytest.approx(0.5)


def test_a_protocol_with_no_positive_anywhere_has_no_mean():
    report = evaluate([np.array([0, 1])], [{"easy": [0], "hard": [], "junk": []}])
    assert report["hard"] == {"map": None, **{f"mp@{k}": None for k in KAPPAS}}
    assert report["easy"]["map"] == 1.0


# ---------------------------------------------------------------------------------------------------------
# The synthetic dataset and the command


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return build_revisited_synthetic(tmp_path_factory.mktemp("revisited") / "data", "roxford5k", "tiny", seed=0)


@pytest.fixture(scope="module")
def distractors(tmp_path_factory, dataset) -> Path:
    """A few extra database images: one in a subfolder (its name holds a slash), one corrupt."""
    folder = tmp_path_factory.mktemp("distractors")
    images = sorted((dataset / "roxford5k" / "jpg").glob("clutter_*.jpg"))[:2]
    shutil.copy(images[0], folder / "extra_a.jpg")
    (folder / "sub").mkdir()
    shutil.copy(images[1], folder / "sub" / "extra_b.jpg")
    (folder / "extra_c.jpg").write_bytes(images[0].read_bytes()[:200])
    return folder


@pytest.fixture(scope="module")
def result(tmp_path_factory, dataset, distractors) -> Path:
    model = write_tf2_model(tmp_path_factory.mktemp("revisited_model") / "tf2", batched=True)
    out = tmp_path_factory.mktemp("revisited_out") / "out"
    status = run_main(
        revisited_main,
        [
            "--data",
            str(dataset),
            "--dataset",
            "roxford5k",
            "--model",
            str(model),
            "--out",
            str(out),
            "--distractors",
            str(distractors),
            "--",
            *SCRIPT_FLAGS,
        ],
    )
    assert status == 0
    return out


def ground_truth(dataset: Path) -> dict:
    with open(dataset / "roxford5k" / "gnd_roxford5k.pkl", "rb") as file:
        return pickle.load(file)


def test_synthetic_layout_and_ground_truth(dataset):
    gnd = ground_truth(dataset)
    jpg = dataset / "roxford5k" / "jpg"
    assert {p.stem for p in jpg.glob("*.jpg")} == set(gnd["imlist"]) | set(gnd["qimlist"])
    assert len(gnd["gnd"]) == len(gnd["qimlist"]) == 4
    for name, entry in zip(gnd["qimlist"], gnd["gnd"], strict=True):
        landmark = name.split("_")[0]
        for kind in ("easy", "hard", "junk"):
            assert entry[kind] and all(
                gnd["imlist"][i] == f"{landmark}_{kind}{n}"
                for n, i in enumerate(sorted(entry[kind], key=lambda i: gnd["imlist"][i]))
            )
        width, height = Image.open(jpg / f"{name}.jpg").size
        x1, y1, x2, y2 = entry["bbx"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert (x2 - x1) * (y2 - y1) < 0.8 * width * height  # the landmark fills only part of the query


def test_build_command_is_deterministic(tmp_path, dataset):
    assert build_main(["revisited-synthetic", "--size", "tiny", "--out", str(tmp_path / "again")]) == 0
    for path in sorted((dataset / "roxford5k").rglob("*.*")):
        assert (tmp_path / "again" / path.relative_to(dataset)).read_bytes() == path.read_bytes()


def test_report_structure(result):
    report = json.loads((result / "report.json").read_text())
    for stage in ("global", "reranked"):
        assert set(report[stage]) == {"easy", "medium", "hard"}
        for scores in report[stage].values():
            assert set(scores) == {"map", "mp@1", "mp@5", "mp@10"}
            assert all(0.0 <= value <= 1.0 for value in scores.values())
    assert report["about"]["rerank"] == RERANK and report["about"]["distractors"] == 3
    assert report["about"]["unreadable"] == 1
    assert report["about"]["global_stage"]["whiten"] == "database"  # the script's defaults, recorded
    summary = (result / "summary.txt").read_text()
    assert "Medium" in summary and "Hard" in summary and "73.6" in summary


def ranks_as_indices(path: Path, names: list[str]) -> tuple[list[str], list[np.ndarray]]:
    frame = pd.read_csv(path, dtype=str)
    index = {name: i for i, name in enumerate(names)}
    return frame["query"].tolist(), [np.array([index[n] for n in row.split()]) for row in frame["ranked"]]


def test_ranks_list_every_image_and_reproduce_the_report(result, dataset):
    gnd = ground_truth(dataset)
    names = gnd["imlist"] + ["extra_a", "extra_c", "sub/extra_b"]
    report = json.loads((result / "report.json").read_text())
    rankings = {}
    for stage, file in (("global", "ranks_global.csv"), ("reranked", "ranks.csv")):
        queries, rankings[stage] = ranks_as_indices(result / file, names)
        assert queries == gnd["qimlist"]
        for ranking in rankings[stage]:
            assert sorted(ranking.tolist()) == list(range(len(names)))
            assert names[ranking[-1]] == "extra_c"  # the unreadable image: logged, ranked last
        assert evaluate(rankings[stage], gnd["gnd"]) == report[stage]
    for global_, reranked in zip(rankings["global"], rankings["reranked"], strict=True):
        assert sorted(reranked[:RERANK]) == sorted(global_[:RERANK])  # verification reorders the top only
        assert (reranked[RERANK:] == global_[RERANK:]).all()


def unit_rows(rng: np.random.Generator, n: int, dim: int = 8) -> np.ndarray:
    rows = rng.normal(size=(n, dim)).astype(np.float32) + 3  # off-centre, as collapsed descriptors are
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_the_ranking_goes_through_the_scripts_global_stage():
    """Whitening fitted on the readable database rows, then SuperGlobal, exactly as the script's functions do
    them; the unreadable row last."""
    rng = np.random.default_rng(0)
    queries, database = unit_rows(rng, 3), unit_rows(rng, 12)
    ok = np.ones(12, bool)
    ok[4] = False
    stage = sub.Global(whiten="database", superglobal_m=6, superglobal_k=2)
    ranking, scores = global_ranking(queries, database, ok, stage, block_mb=64)
    readable = np.flatnonzero(ok)
    whitening = sub.fit_whitening(database[readable], stage.whiten_shrinkage)
    db, q = sub.apply_whitening(database[readable].copy(), whitening), sub.apply_whitening(queries.copy(), whitening)
    cosines, rows = sub.knn(q, db, len(readable), 64)
    expected_scores, expected_rows = sub.superglobal_rerank(q, db, cosines, rows, 6, 2, stage.superglobal_beta)
    assert (ranking[:, :-1] == readable[expected_rows]).all() and (ranking[:, -1] == 4).all()
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)
    plain, _ = global_ranking(queries, database, ok, sub.Global(whiten="off"), block_mb=64)
    assert (plain[:, :-1] == readable[sub.knn(queries, database[readable], len(readable), 64)[1]]).all()
    assert (plain != ranking).any()  # the stage changed something


def test_queries_are_cropped_to_their_box(result, dataset):
    gnd = ground_truth(dataset)
    work = result / "work"
    for name, entry in zip(gnd["qimlist"], gnd["gnd"], strict=True):
        x1, y1, x2, y2 = (round(v) for v in entry["bbx"])
        crop = sub.decode_image(sub.image_path(work / "images", "query", name), 4096, 1)
        assert crop.shape[:2] == (y2 - y1, x2 - x1)
        full = np.asarray(Image.open(dataset / "roxford5k" / "jpg" / f"{name}.jpg").convert("RGB"))
        assert (crop == full[y1:y2, x1:x2]).all()
        assert sub.load_local(sub.local_path(work / "local", "query", name)).side == max(y2 - y1, x2 - x1)


def test_bad_ground_truth_is_one_error_line(tmp_path, dataset, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    gnd = ground_truth(dataset)
    gnd["gnd"][1]["bbx"] = [50, 10, 20, 40]
    with open(data / "roxford5k" / "gnd_roxford5k.pkl", "wb") as file:
        pickle.dump(gnd, file)
    status = run_main(
        revisited_main,
        ["--data", str(data), "--dataset", "roxford5k", "--model", str(tmp_path), "--out", str(tmp_path / "out")],
    )
    assert status == 2
    assert f"query '{gnd['qimlist'][1]}': bbx" in capsys.readouterr().err


def test_an_output_folder_of_other_files_is_refused(tmp_path, dataset, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    status = run_main(
        revisited_main, ["--data", str(dataset), "--dataset", "roxford5k", "--model", str(tmp_path), "--out", str(out)]
    )
    assert status == 2 and "was not written by this kit" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_caches_of_another_model_or_setting_are_cleared(tmp_path):
    (tmp_path / "global" / "db").mkdir(parents=True)
    clear_stale(tmp_path, {"model": "a"})
    assert (tmp_path / "global" / "db").is_dir()  # first run: nothing to compare with
    clear_stale(tmp_path, {"model": "a"})
    assert (tmp_path / "global" / "db").is_dir()  # same key: kept
    clear_stale(tmp_path, {"model": "b"})
    assert not (tmp_path / "global").exists()
    assert json.loads((tmp_path / "cache_key.json").read_text()) == {"model": "b"}
