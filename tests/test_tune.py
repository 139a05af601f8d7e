"""`local_eval tune` on the tiny competition: one extraction run, the sweeps, the chosen settings, and a replay
with them that scores what tune said it would."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from local_eval.replay import replay
from local_eval.submission_script import load_submission
from local_eval.tune import choose
from local_eval.tune import main as tune_main

sub = load_submission()
FAST = ["--scales", "0.5", "1.0", "--global-scale-indices", "0", "1", "--max-features", "200", "--workers", "0"]
GRID = {"match_max_distance": [0.9], "mutual": [True, False], "ransac_threshold": [0.01, 0.04],
        "ransac_iterations": [1000, 300], "ransac_confidence": [1.0], "min_matches": [4],
        "rerank": [0, 2, 4], "top_k": [1, 3], "max_inlier_score": [10],
        "nonlandmark_penalty": [0.0, 1.0], "calibrate": [True]}


@pytest.fixture(scope="module")
def tuned(tiny_competition, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "recognition"
    grid = out.parent / "grid.json"
    grid.write_text(json.dumps(GRID))
    assert tune_main(["--competition", str(tiny_competition), "--task", "recognition", "--model", str(tiny_model),
                      "--out", str(out), "--grid", str(grid), "--workers", "2", "--", *FAST]) == 0
    return out


def test_every_combination_is_scored_once(tuned):
    table = pd.read_csv(tuned / "table.csv")
    scoring = 3 * 2 * 2  # depth x top-k x penalty
    assert len(table) == 2 * 2 * scoring + scoring  # stage 1: mutual x threshold; stage 2: 300 iterations at the best
    stage_two = table[table["ransac_iterations"] == 300]
    best = choose(table[table["ransac_iterations"] == 1000])
    assert (stage_two[["mutual", "ransac_threshold"]] == best[["mutual", "ransac_threshold"]]).all().all()
    keys = ["mutual", "ransac_threshold", "ransac_iterations", "rerank", "top_k", "nonlandmark_penalty"]
    assert not table.duplicated(keys).any()
    assert table["public"].between(0, 1).all() and table["private"].between(0, 1).all()
    assert (table.loc[table["rerank"] == 0, "seconds_per_query"] == 0).all()
    assert (table.loc[table["rerank"] == 4, "seconds_per_query"] > 0).all()
    with Image.open(tuned / "depth.png") as picture:
        assert picture.width > 400


def test_tuned_json_holds_the_best_public_row_and_the_script_reads_it(tuned):
    table = pd.read_csv(tuned / "table.csv")
    tuned_json = json.loads((tuned / "tuned.json").read_text())
    assert tuned_json["about"]["public"] == pytest.approx(table["public"].max())
    settings = sub.parse_settings(["--task", "recognition", "--data", ".", "--model", ".",
                                   "--settings", str(tuned / "tuned.json")])
    assert settings.scoring.rerank == tuned_json["scoring"]["rerank"]
    assert settings.verification.ransac_threshold == tuned_json["verification"]["ransac_threshold"]
    assert settings.extraction.scales == (0.5, 1.0)  # the extraction run's settings travel with the choice


def test_a_replay_with_the_tuned_settings_scores_what_tune_chose(tuned, tiny_competition, tiny_model, tmp_path):
    tuned_json = json.loads((tuned / "tuned.json").read_text())
    report = replay(tiny_competition, "recognition", tiny_model, tmp_path / "replay", 1.0,
                    ["--settings", str(tuned / "tuned.json"), "--workers", "0"])
    assert report["status"] == "ok"
    for subset in ("public", "private", "all"):
        assert report["final"][subset]["gap"] == pytest.approx(tuned_json["about"][subset], abs=1e-9)


def test_a_bad_grid_is_one_line(tmp_path, tiny_competition, tiny_model, capsys):
    from common.cli import run_main

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"ransac_thresholds": [0.01]}))
    assert run_main(tune_main, ["--competition", str(tiny_competition), "--task", "recognition", "--model",
                                str(tiny_model), "--out", str(tmp_path / "out"), "--grid", str(grid)]) == 2
    assert "'ransac_thresholds' is not a tunable setting" in capsys.readouterr().err
