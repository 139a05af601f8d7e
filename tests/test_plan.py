"""The planned database pass on a real replay: a budget too small for the full settings steps down the ladder,
ends inside its limit with a scored submission and the plan written down; the probe; the tradeoff table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from local_eval.projection import costs, load_timing, projection_report, resolve_profile
from local_eval.projection import main as time_main
from local_eval.replay import replay
from local_eval.submission_script import load_submission
from local_eval.tradeoff import main as tradeoff_main
from local_eval.tradeoff import measured_stages
from tests import LIGHT

sub = load_submission()


def test_a_budget_too_small_for_the_full_settings_steps_down_and_ends_in_time(tiny_competition, tiny_model, tmp_path):
    # At --global-max-side 4096 every tiny image is fed at 1024 px or more (about 20x the cost at 768 px here).
    # Of the script's 90-second budget it keeps 15% free and plans 70% for reranking: the few seconds left for the
    # global pass after its start cannot fit that unless a machine is ~6x faster than ours. The replay's own limit
    # is an hour, so that a loaded machine's slow start cannot kill the run: the plan, not the clock, is checked.
    report = replay(
        tiny_competition,
        "recognition",
        tiny_model,
        tmp_path,
        1.0,
        [
            *LIGHT,
            "--global-max-side",
            "4096",
            "--global-batch",
            "4",
            "--probe-images",
            "8",
            "--global-xla",
            "off",
            "--rerank-reserve",
            "0.7",
            "--time-budget-h",
            "0.025",
        ],
    )
    assert report["status"] == "ok"
    assert 0 <= report["final"]["all"]["gap"] <= 1
    plan = report["timing"]["plan"]
    assert plan["mode"] == "auto" and plan["chosen"] != "as given"
    assert [rung["rung"] for rung in plan["rungs"]][0] == "as given" and not plan["rungs"][0]["fits"]
    recorded = json.loads((tmp_path / "work" / "settings.json").read_text())
    assert recorded["plan"]["chosen"] == plan["chosen"]
    chosen = plan["rungs"][-1]["global"]
    assert recorded["extraction"]["global_max_side"] == chosen["global_max_side"]


def test_plan_fixed_keeps_the_given_settings(tiny_competition, tiny_model, tmp_path):
    report = replay(
        tiny_competition, "retrieval", tiny_model, tmp_path, 1.0, [*LIGHT, "--plan", "fixed", "--rerank", "0"]
    )
    assert report["status"] == "ok" and report["timing"]["plan"]["mode"] == "fixed"
    assert report["timing"]["plan"]["global"]["global_max_side"] == sub.DELG_MAX_IMAGE_SIDE
    projected_at_own_size(report["timing"])


def test_a_run_told_it_has_less_ram_than_its_peak_plans_down_finishes_and_logs_the_cut(
    tiny_competition, tiny_model, tmp_path
):
    """Half a GB is less than the process itself holds here (TensorFlow and the model), so no plan can fit it: the
    plan cuts what it can (retrieval's DBA), says so, and the run still finishes with its submission."""
    report = replay(
        tiny_competition,
        "retrieval",
        tiny_model,
        tmp_path,
        1.0,
        [*LIGHT, "--plan", "fixed", "--rerank", "0", "--ram-gb", "0.5"],
    )
    assert report["status"] == "ok" and 0 <= report["final"]["all"]["map@100"] <= 1
    memory_plan = report["timing"]["memory"]["plan"]
    assert memory_plan["machine"] == "--ram-gb 0.5" and not memory_plan["fits"]
    assert memory_plan["cuts"][0].startswith("DBA off") and not report["timing"]["work"]["dba"]
    logged = (tmp_path / "script.log").read_text()
    assert "memory plan: DBA off" in logged and "DOES NOT FIT even after the cuts" in logged
    assert report["timing"]["memory"]["peak_rss_bytes"] > 0 and report["timing"]["memory"]["work_bytes"] > 0


def projected_at_own_size(timing: dict) -> None:
    """The cost model at the run's own size gives back what the run measured: each global pass's seconds, the
    peak memory within 1.5x of the peak RSS, WORK's disk within 1.5x of its size."""
    machine = {"gpus": 0, "cpus": timing["decode"]["threads"]}  # this machine, which measured
    own = resolve_profile("retrieval-2020", {"db": timing["work"]["db"], "test": timing["work"]["queries"], **machine})
    report = projection_report(timing, own, rerank=0)
    for name in costs.GLOBAL_PASSES:
        assert report["hours"][name] * 3600 == pytest.approx(timing["stages"][name]["seconds"], rel=0.01)
    measured_gb = timing["memory"]["peak_rss_bytes"] / 2**30
    assert measured_gb / 1.5 <= report["memory_gb"]["peak"] <= measured_gb * 1.5, (report["memory_gb"], measured_gb)
    work_gb = timing["memory"]["work_bytes"] / 2**30
    assert work_gb / 1.5 <= report["disk_gb"]["work"] <= work_gb * 1.5, (report["disk_gb"], work_gb)


def test_probe_times_every_stage_and_local_eval_time_projects_it(tiny_competition, tiny_model, tmp_path):
    data = tiny_competition / "landmark-recognition"
    work = tmp_path / "work"
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
                str(tmp_path / "submission.csv"),
                "--probe",
                "8",
                *LIGHT,
            ]
        )
        == 0
    )
    assert not (tmp_path / "submission.csv").exists()  # a probe leaves the submission alone
    timing = load_timing(work / "timing.json")
    assert all(timing["stages"][name]["items"] > 0 for name in sub.TIMING_STAGES)
    assert timing["plan"]["sizes"] == {"db": 240, "queries": 80, "nonlandmarks": 0, "train": 0}
    assert timing["plan"]["rerank"]["seconds_per_query"] > 0
    report = projection_report(timing, resolve_profile("recognition-2021", {}))
    assert report["total_hours"] > 0 and not report["unmeasured"]
    assert timing["rerank_depth"] == sub.Scoring().rerank  # projected at the depth the run would use
    assert report["hours"]["verification"] > 0
    assert not (work / "probe").exists()


def test_tradeoff_scores_each_rung_at_each_depth(tiny_competition, tiny_model, tmp_path, capsys):
    """Given a longer side of 768 the ladder has three rungs (the model has no float16): as given, 1 global scale,
    max side 512; --rungs 2 replays the first two."""
    assert (
        tradeoff_main(
            [
                "--competition",
                str(tiny_competition),
                "--task",
                "retrieval",
                "--model",
                str(tiny_model),
                "--out",
                str(tmp_path),
                "--depths",
                "0",
                "3",
                "--speedup",
                "50",
                "--rungs",
                "2",
                "--",
                *LIGHT,
                "--global-max-side",
                "768",
            ]
        )
        == 0
    )
    table = pd.read_csv(tmp_path / "tradeoff.csv")
    rungs = table["rung"].unique().tolist()
    assert rungs == ["as given", "1 global scale"] and len(table) == 2 * len(rungs)
    limit_h = resolve_profile("retrieval-2020", {}).limit_h
    assert (table["hours"] > 0).all()  # whether a row fits depends on this machine's load: it must agree
    assert (table["fits"] == (table["hours"] <= limit_h * (1 - costs.SAFETY_MARGIN))).all()
    settings = table.drop_duplicates("rung").set_index("rung")
    assert settings.loc["1 global scale", "global_scales"] == "1.0"
    assert settings.loc["as given", "global_scales"] == "0.5 1.0"
    deeper = table[table["rerank"] == 3]["hours"].to_numpy()
    assert (deeper > table[table["rerank"] == 0]["hours"].to_numpy()).all()
    assert (tmp_path / "tradeoff.png").is_file() and "best that fits" in capsys.readouterr().out
    for row in table.itertuples():  # `local_eval time` on the rung's log, at the same depth, gives its hours
        logged = load_timing(row.log)
        assert logged["work"]["qe"] and logged["work"]["dba"]  # retrieval's defaults: the run's flags are kept
        assert (
            time_main(
                [
                    "--log",
                    row.log,
                    "--profile",
                    "retrieval-2020",
                    "--rerank",
                    str(row.rerank),
                    "--speedup",
                    "50",
                    "--json",
                ]
            )
            == 0
        )
        printed = json.loads(capsys.readouterr().out)
        assert printed["total_hours"] == pytest.approx(row.hours, rel=0.01)


def test_a_rung_that_found_features_cached_is_projected_from_the_run_that_extracted_them():
    stage = lambda items, seconds: {"items": items, "seconds": seconds}
    extracted = {
        "stages": {
            "global_db": stage(300, 30.0),
            "global_query": stage(80, 8.0),
            "local_features": stage(290, 29.0),
            "verification": stage(800, 4.0),
        }
    }
    cached_rung = {
        "stages": {
            "global_db": stage(0, 0.0),
            "global_query": stage(0, 0.0),
            "local_features": stage(3, 9.0),
            "verification": stage(800, 4.2),
        }
    }
    other_rung = {"stages": {**cached_rung["stages"], "global_db": stage(300, 12.0)}}
    assert measured_stages(cached_rung, extracted)["global_db"] == stage(300, 30.0)
    assert measured_stages(cached_rung, extracted)["local_features"] == stage(290, 29.0)  # not 3 s per feature
    assert measured_stages(other_rung, extracted)["global_db"] == stage(300, 12.0)
    assert measured_stages(other_rung, extracted)["verification"] == stage(800, 4.2)  # its own, as complete


def test_a_run_cut_after_half_its_queries_verifies_the_most_confident_half(tiny_competition, tiny_model, tmp_path):
    report = replay(
        tiny_competition,
        "recognition",
        tiny_model,
        tmp_path,
        1.0,
        [*LIGHT, "--max-rerank-queries", "40", "--rerank", "4"],
    )
    assert report["status"] == "ok" and report["timing"]["stages"]["verification"]["items"] == 40 * 4
    pairs = pd.read_csv(tmp_path / "work" / "verified_pairs.csv", dtype={"id": str})
    global_only = pd.read_csv(tmp_path / "work" / "submission_global_only.csv", dtype=str, keep_default_na=False)
    confidence = global_only.set_index("id")["landmarks"].str.split().str[1].astype(float)
    verified = set(pairs["id"])
    assert len(verified) == 40
    assert confidence[list(verified)].min() >= confidence.drop(list(verified)).max()


def gap_of(landmarks, confidences, truth) -> float:
    from local_eval.metrics import global_average_precision

    predictions = {str(q): (int(lm), float(c)) for q, (lm, c) in enumerate(zip(landmarks, confidences, strict=True))}
    return global_average_precision(predictions, {str(q): t for q, t in enumerate(truth)})


def test_cut_after_half_the_queries_scores_at_least_global_only():
    """A recognition test set where verification separates right from wrong candidates: reranking only the most
    confident half, with calibrated confidences, keeps GAP at or above global-only (and below a full rerank)."""
    rng = np.random.default_rng(0)
    queries, depth, landmarks = 400, 10, 50
    truth = [[int(t)] if rng.random() < 0.5 else [] for t in rng.integers(0, landmarks, queries)]
    labels = rng.integers(0, landmarks, queries * depth)
    neighbours = np.arange(queries * depth).reshape(queries, depth)
    right = rng.random((queries, depth)) < 0.4
    for q, t in enumerate(truth):
        labels[neighbours[q][right[q]]] = t[0] if t else landmarks + 1
        right[q] &= bool(t)
    cosines = -np.sort(-np.clip(rng.normal(0.55, 0.12, (queries, depth)) + 0.08 * right, 0, 1), axis=1)
    inliers = np.where(right, rng.integers(15, 60, right.shape), rng.integers(0, 8, right.shape))
    scoring, stage, ok = sub.Scoring(top_k=3, max_inlier_score=20), sub.Global(global_top_k=3), np.ones(queries, bool)
    found = sub.Candidates(cosines, neighbours, ok, np.zeros((queries, 0)), np.zeros((queries * depth, 0)))
    score = lambda inl: gap_of(*sub.recognition_predictions(found, inl, labels, stage, scoring), truth)
    unverified = np.full_like(inliers, -1)
    global_only = score(unverified)
    _, confidence = sub.recognition_predictions(found, unverified, labels, stage, scoring)
    half = np.array(sub.rerank_order(confidence, ok)[: queries // 2])
    cut = unverified.copy()
    cut[half] = inliers[half]
    assert score(inliers) > score(cut) >= global_only
