"""Retrieval through the labelled train set (submission/bridge.py): label transfer and hubness on hand-computed
cases, `export train-descriptors` writing the file the script reads (and the script refusing one of another model),
and the cost model, the plan and `local_eval time` counting the train set's pass and the extra products."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from export.__main__ import main_train_descriptors
from local_eval.projection import format_report, load_timing, projection_report, resolve_profile
from local_eval.submission_script import load_submission, sibling

sub = load_submission()
bridge = sibling("bridge")
costs = sibling("costs")


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_label_votes_normalize_the_clamped_cosines():
    votes = bridge.label_votes(
        np.array([[0.6, 0.2, -0.1], [-0.2, -0.3, -0.4]]), np.array([[0, 1, 2]] * 2), np.array([5, 6, 5])
    )
    assert votes.labels.tolist() == [[5, 6, 5], [5, 6, 5]]
    assert votes.weights[0] == pytest.approx([0.75, 0.25, 0.0])
    assert votes.weights[1].tolist() == [0, 0, 0]  # no positive cosine: no vote


def test_label_similarity_is_the_inner_product_of_the_distributions():
    queries = bridge.LabelVotes(np.array([[1, 2]]), np.array([[0.5, 0.5]], np.float32))
    db = bridge.LabelVotes(
        np.array([[1, 1], [2, 3], [4, 5]]), np.array([[0.6, 0.4], [0.8, 0.2], [0.5, 0.5]], np.float32)
    )
    similarity = bridge.label_similarity(queries, db, np.array([[0, 1, 2]]))
    # p_q = {1: .5, 2: .5}; db 0: {1: 1.0} -> .5; db 1: {2: .8, 3: .2} -> .4; db 2 shares nothing
    assert similarity[0] == pytest.approx([0.5, 0.4, 0.0])


def test_hubness_is_the_mean_cosine_to_the_nearest_others():
    db = unit([[1, 0], [1, 1], [0, 1], [-1, 0]])
    found = bridge.hubness(db, 2, 64)
    c = np.sqrt(0.5)
    assert found == pytest.approx([(c + 0) / 2, (c + c) / 2, (c + 0) / 2, (0 - c) / 2], abs=1e-6)
    assert bridge.hubness(db[:1], 2, 64).tolist() == [0.0]


def test_reranked_adds_the_label_term_and_subtracts_hubness():
    cosines, rows = np.array([[0.9, 0.8, 0.7]]), np.array([[0, 1, 2]])
    weights = bridge.BridgeScores(label_weight=0.5, hubness_weight=1.0)
    scores, order = bridge.reranked(cosines, rows, np.array([[0.0, 0.0, 0.6]]), np.array([0.2, 0.0, 0.0]), weights)
    assert order.tolist() == [[2, 1, 0]]  # 0.7 + 0.3 = 1.0; 0.8; 0.9 - 0.2 = 0.7
    assert scores[0] == pytest.approx([1.0, 0.8, 0.7])
    unchanged = bridge.reranked(cosines, rows, None, None, weights)
    assert unchanged[1].tolist() == rows.tolist()


def test_blocks_searched_give_the_whole_knn_and_a_deadline_stops_between_them(monkeypatch):
    monkeypatch.setattr(bridge, "STOP_BLOCK", 3)
    rows = unit(np.random.default_rng(0).normal(size=(8, 4)))
    whole = bridge.knn(rows, rows, 2, 64)
    blocked = bridge.blocked_knn(rows, rows, 2, 64, stop=lambda: False)
    assert all(np.array_equal(a, b) for a, b in zip(whole, blocked, strict=True))
    asked = []
    assert bridge.blocked_knn(rows, rows, 2, 64, stop=lambda: asked.append(1) or len(asked) > 2) is None
    assert len(asked) == 3  # two blocks searched, the third not


def test_a_bridge_past_the_deadline_keeps_the_global_order_and_says_so(caplog):
    """Label transfer and hubness cut by the deadline: the candidates keep their order, cut to k, and the log
    names each part."""
    stage = SimpleNamespace(bridge_weight=0.5, bridge_k=2, bridge_m=3, hubness_weight=0.5, hubness_k=2)
    settings = SimpleNamespace(global_stage=stage, run=SimpleNamespace(knn_block_mb=64, task="retrieval"))
    timing = SimpleNamespace(past_deadline=lambda: True, add=lambda *args: None)
    db = unit([[1, 0], [1, 1], [0, 1]])
    train = bridge.TrainSet(db.copy(), np.array([1, 2, 3]))
    cosines, rows = np.array([[0.9, 0.5, 0.1]], np.float32), np.array([[2, 0, 1]])
    with caplog.at_level(logging.WARNING, logger="submission"):
        found = bridge.bridge_rerank(db[:1], db, (cosines, rows), train, settings, timing, k=2)
    assert found[1].tolist() == [[2, 0]] and found[0][0] == pytest.approx([0.9, 0.5])
    assert "label transfer cut by the deadline" in caplog.text and "hubness cut by the deadline" in caplog.text


def test_the_cost_model_counts_the_train_pass_and_the_bridge_products():
    sizes = costs.Sizes(db=1000, queries=10, nonlandmarks=0, train=500)
    units = costs.stage_units(sizes, 0, costs.Work(bridge=True, train_pass=True, hubness=True))
    assert units["global_train"] == 500 and units["bridge"] == (10 + 1000) * 500 + 1000 * 1000
    assert costs.stage_units(sizes, 0)["global_train"] == 0 and costs.stage_units(sizes, 0)["bridge"] == 0
    off, on = (costs.memory_bytes(sizes, costs.Work(dims=(64,), bridge=b), 0) for b in (False, True))
    assert on["global_stage"] - off["global_stage"] == 500 * 64 * 4  # the train set held beside the rest


def script(data, model, work, *flags: str) -> list[str]:
    return [
        "--task",
        "retrieval",
        "--data",
        str(data),
        "--model",
        str(model),
        "--work",
        str(work),
        "--out",
        str(work.parent / f"{work.name}.csv"),
        "--rerank",
        "0",
        "--plan",
        "fixed",
        *flags,
    ]


@pytest.fixture(scope="module")
def train_file(tiny_competition, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bridge") / "train.npz"
    main_train_descriptors(
        ["--model", str(tiny_model), "--data", str(tiny_competition / "landmark-recognition"), "--out", str(out)]
    )
    return out


def test_export_writes_the_train_set_the_script_reads_and_the_time_projects(
    tiny_competition, tiny_model, train_file, tmp_path
):
    train_csv = (tiny_competition / "landmark-recognition" / "train.csv").read_text().splitlines()
    with np.load(train_file) as found:
        assert found["descriptors"].shape[0] == len(found["labels"]) == len(train_csv) - 1
        assert str(found["model_fingerprint"]) == bridge.model_fingerprint(tiny_model)
    data, work = tiny_competition / "landmark-retrieval", tmp_path / "work"
    flags = ["--train-descriptors", str(train_file), "--bridge-weight", "0.5", "--hubness-weight", "0.2"]
    assert sub.main(script(data, tiny_model, work, *flags)) == 0
    timing = load_timing(work / "timing.json")
    assert timing["stages"]["global_train"]["items"] == len(train_csv) - 1
    index = len(list((data / "index").rglob("*.jpg")))
    queries = len(sub.read_test_ids(data))
    assert timing["stages"]["bridge"]["items"] == (queries + index) * (len(train_csv) - 1) + index * index
    assert timing["work"]["bridge"] and timing["work"]["hubness"] and not timing["work"]["train_pass"]
    report = projection_report(timing, resolve_profile("retrieval-2021", {}))
    assert report["hours"]["global_train"] > 0 and report["hours"]["bridge"] > 0
    printed = format_report(report)
    assert "train 1,580,470 (label transfer)" in printed and "  bridge " in printed and "  global_train " in printed
    assert len((tmp_path / "work.csv").read_text().splitlines()) == queries + 1


def test_a_machine_too_small_for_the_train_set_turns_label_transfer_off_after_dba_and_finishes(
    tiny_competition, tiny_model, train_file, tmp_path, caplog
):
    """Half a GB is less than the process holds: the memory plan cuts DBA, then label transfer (whose descriptors
    are then never read), logs both, and the run ends with its submission."""
    data, work = tiny_competition / "landmark-retrieval", tmp_path / "work"
    flags = ["--train-descriptors", str(train_file), "--bridge-weight", "0.5", "--ram-gb", "0.5"]
    with caplog.at_level(logging.WARNING, logger="submission"):
        assert sub.main(script(data, tiny_model, work, *flags)) == 0
    timing = load_timing(work / "timing.json")
    cuts = timing["memory"]["plan"]["cuts"]
    assert cuts[0].startswith("DBA off") and cuts[1].startswith("label transfer off")
    assert not timing["work"]["bridge"] and timing["stages"]["global_train"]["items"] == 0
    assert "memory plan: label transfer off" in caplog.text
    assert len((tmp_path / "work.csv").read_text().splitlines()) == len(sub.read_test_ids(data)) + 1


def test_the_train_pass_of_train_data_is_timed_and_cached(tiny_competition, tiny_model, tmp_path):
    data, work = tiny_competition / "landmark-retrieval", tmp_path / "work"
    train = tiny_competition / "landmark-recognition"
    assert sub.main(script(data, tiny_model, work, "--train-data", str(train), "--bridge-weight", "0.5")) == 0
    timing = json.loads((work / "timing.json").read_text())
    assert timing["stages"]["global_train"]["items"] == len((train / "train.csv").read_text().splitlines()) - 1
    assert timing["work"]["train_pass"] and any((work / "global" / "m0" / "train_set").iterdir())


def test_a_train_file_of_another_model_is_refused_with_one_line(
    tiny_competition, tiny_float16_model, train_file, tmp_path, capsys
):
    data, work = tiny_competition / "landmark-retrieval", tmp_path / "work"
    flags = ["--train-descriptors", str(train_file), "--bridge-weight", "0.5"]
    assert sub.main(script(data, tiny_float16_model, work, *flags)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and str(train_file) in errors[0]
    assert "another model" in errors[0] and not (tmp_path / "work.csv").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--task", "recognition"], "--train-data is for --task retrieval"),
        (["--train-descriptors", "x.npz"], "--train-data and --train-descriptors together"),
    ],
)
def test_a_train_set_needs_retrieval_and_one_source(tiny_competition, tiny_model, tmp_path, capsys, flags, message):
    data, work = tiny_competition / "landmark-retrieval", tmp_path / "work"
    argv = script(data, tiny_model, work, "--train-data", str(tiny_competition / "landmark-recognition"), *flags)
    assert sub.main(argv) == 2
    assert message in capsys.readouterr().err


def test_tune_sweeps_label_transfer_and_hubness_on_the_cached_descriptors(
    tiny_competition, tiny_model, train_file, tmp_path
):
    from local_eval.tune import main as tune_main

    grid = tmp_path / "grid.json"
    grid.write_text(
        json.dumps(
            {
                "bridge_weight": [0.0, 0.5],
                "bridge_k": [3],
                "hubness_weight": [0.0, 0.25],
                "match_max_distance": [1.1],
                "mutual": [True],
                "ransac_threshold": [0.02],
                "ransac_iterations": [300],
                "ransac_confidence": [1.0],
                "min_matches": [4],
                "rerank": [0, 1],
            }
        )
    )
    out = tmp_path / "tune"
    argv = ["--competition", str(tiny_competition), "--task", "retrieval", "--model", str(tiny_model)]
    argv += ["--out", str(out), "--grid", str(grid), "--workers", "1", "--", "--train-descriptors", str(train_file)]
    assert tune_main(argv) == 0
    table = pd.read_csv(out / "global.csv")
    pairs = sorted(zip(table["bridge_weight"], table["hubness_weight"], strict=True))
    assert pairs == [(w, h) for w in (0, 0.2, 0.5) for h in (0, 0.25)]  # the grid's and the defaults (0.2, 0.25)
    assert table["all"].between(0, 1).all()
    assert {"bridge_weight", "hubness_weight"} <= set(json.loads((out / "tuned.json").read_text())["global_stage"])
