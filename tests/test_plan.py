"""The planned database pass on a real replay: a budget too small for the full settings steps down the ladder,
ends inside its limit with a scored submission and the plan written down; the probe; the tradeoff table."""
from __future__ import annotations

import json

import pandas as pd

from local_eval.replay import replay
from local_eval.submission_script import load_submission
from local_eval.timing import load_timing, projection_report, resolve_profile
from local_eval.tradeoff import main as tradeoff_main

sub = load_submission()
LIGHT = ["--scales", "0.5", "1.0", "--global-scale-indices", "0", "1", "--max-features", "200", "--workers", "0"]


def test_a_budget_too_small_for_the_full_settings_steps_down_and_ends_in_time(tiny_competition, tiny_model, tmp_path):
    # At --global-max-side 4096 every tiny image is fed at 1024 px or more: far too slow for a 54-second limit.
    report = replay(tiny_competition, "recognition", tiny_model, tmp_path, 0.015,
                    [*LIGHT, "--global-max-side", "4096", "--global-batch", "4", "--probe-images", "8"])
    assert report["status"] == "ok" and report["seconds"] < 54
    assert 0 <= report["final"]["all"]["gap"] <= 1
    plan = report["timing"]["plan"]
    assert plan["mode"] == "auto" and plan["chosen"] != "as given"
    assert [rung["rung"] for rung in plan["rungs"]][0] == "as given" and not plan["rungs"][0]["fits"]
    recorded = json.loads((tmp_path / "work" / "settings.json").read_text())
    assert recorded["plan"]["chosen"] == plan["chosen"]
    chosen = plan["rungs"][-1]["global"]
    assert recorded["extraction"]["global_max_side"] == chosen["global_max_side"]


def test_plan_fixed_keeps_the_given_settings(tiny_competition, tiny_model, tmp_path):
    report = replay(tiny_competition, "retrieval", tiny_model, tmp_path, 1.0,
                    [*LIGHT, "--plan", "fixed", "--rerank", "0"])
    assert report["status"] == "ok" and report["timing"]["plan"]["mode"] == "fixed"
    assert report["timing"]["plan"]["global"]["global_max_side"] == sub.DELG_MAX_IMAGE_SIDE


def test_probe_times_every_stage_and_local_eval_time_projects_it(tiny_competition, tiny_model, tmp_path):
    data = tiny_competition / "landmark-recognition"
    work = tmp_path / "work"
    assert sub.main(["--task", "recognition", "--data", str(data), "--model", str(tiny_model), "--work", str(work),
                     "--out", str(tmp_path / "submission.csv"), "--probe", "8", *LIGHT]) == 0
    assert not (tmp_path / "submission.csv").exists()  # a probe leaves the submission alone
    timing = load_timing(work / "timing.json")
    assert all(timing["stages"][name]["items"] > 0 for name in sub.TIMING_STAGES)
    assert timing["plan"]["sizes"] == {"db": 240, "queries": 80, "nonlandmarks": 0}
    assert timing["plan"]["rerank"]["seconds_per_query"] > 0
    report = projection_report(timing, resolve_profile("recognition-2021", {}))
    assert report["total_hours"] > 0 and not report["unmeasured"]
    assert not (work / "probe").exists()


def test_tradeoff_scores_each_rung_at_each_depth(tiny_competition, tiny_model, tmp_path, capsys):
    assert tradeoff_main(["--competition", str(tiny_competition), "--task", "retrieval", "--model", str(tiny_model),
                          "--out", str(tmp_path), "--depths", "0", "3", "--speedup", "50", "--", *LIGHT]) == 0
    table = pd.read_csv(tmp_path / "tradeoff.csv")
    rungs = table["rung"].unique().tolist()
    assert rungs[0] == "as given" and "1 global scale" in rungs and len(table) == 2 * len(rungs)
    as_given = table[(table["rung"] == "as given") & (table["rerank"] == 0)].iloc[0]
    one_scale = table[(table["rung"] == "1 global scale") & (table["rerank"] == 0)].iloc[0]
    assert one_scale["projected_h"] < as_given["projected_h"]
    deeper = table[table["rerank"] == 3]["projected_h"].to_numpy()
    assert (deeper > table[table["rerank"] == 0]["projected_h"].to_numpy()).all()
    assert (tmp_path / "tradeoff.png").is_file() and "best that fits" in capsys.readouterr().out
