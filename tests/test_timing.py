"""The projection arithmetic of `local_eval time`, on a hand-made timing log."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from local_eval.timing import Profile, max_rerank_depth, projection_report

ROOT = Path(__file__).resolve().parents[1]
# 100 db images in 50 s, 10 queries in 5 s, knn 0.1 s for 10 x 100, 40 local extractions in 8 s,
# 30 verified pairs in 3 s.
LOG = {"task": "recognition", "rerank_depth": 3, "stages": {
    "global_db": {"items": 100, "seconds": 50.0},
    "global_query": {"items": 10, "seconds": 5.0},
    "knn": {"items": 10 * 100, "seconds": 0.1},  # items: queries x database rows searched
    "local_features": {"items": 40, "seconds": 8.0},
    "verification": {"items": 30, "seconds": 3.0},
}}
PROFILE = Profile("recognition", db=36_000, test=3_600, limit_h=30.1)


def test_projection_per_stage_hours():
    hours = projection_report(LOG, PROFILE)["hours"]
    assert hours["global_db"] == pytest.approx(36_000 * 0.5 / 3600)  # 5 h
    assert hours["global_query"] == pytest.approx(3_600 * 0.5 / 3600)  # 0.5 h
    assert hours["knn"] == pytest.approx(3_600 * 36_000 * (0.1 / 1000) / 3600)  # 3.6 h
    assert hours["local_features"] == pytest.approx(3_600 * 4 * 0.2 / 3600)  # query + 3 candidates: 0.8 h
    assert hours["verification"] == pytest.approx(3_600 * 3 * 0.1 / 3600)  # 0.3 h


def test_speedup_scales_network_stages_only():
    slow, fast = projection_report(LOG, PROFILE), projection_report(LOG, PROFILE, speedup=4.0)
    assert fast["hours"]["global_db"] == pytest.approx(slow["hours"]["global_db"] / 4)
    assert fast["hours"]["verification"] == pytest.approx(slow["hours"]["verification"])


def test_verdict_and_the_largest_depth_that_fits():
    report = projection_report(LOG, PROFILE, margin=0.1)
    assert report["total_hours"] == pytest.approx(5 + 0.5 + 3.6 + 0.8 + 0.3)
    assert report["fits"]
    # room: 27.09 h - 9.1 h fixed - 0.2 h query features = 17.79 h; a candidate costs 3600*(0.2+0.1) s = 0.3 h
    assert max_rerank_depth(LOG, PROFILE, speedup=1.0, margin=0.1) == 59
    assert not projection_report(LOG, PROFILE, rerank=60)["fits"]
    assert projection_report(LOG, PROFILE, rerank=59)["fits"]


def test_stage_without_work_is_reported_unmeasured():
    log = json.loads(json.dumps(LOG))
    log["stages"]["verification"]["items"] = 0
    report = projection_report(log, PROFILE)
    assert report["unmeasured"] == ["verification"]
    assert report["max_rerank_depth"] is None


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "local_eval", "time", *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_cli_prints_verdict_with_speedup(tmp_path):
    path = tmp_path / "timing.json"
    path.write_text(json.dumps(LOG))
    result = run_cli("--log", str(path), "--profile", "recognition-2021", "--speedup", "20")
    assert result.returncode == 0, result.stderr
    assert "verdict (speedup x20)" in result.stdout
    as_json = json.loads(run_cli("--log", str(path), "--profile", "recognition-2021", "--json").stdout)
    assert as_json["profile"]["limit_h"] == 12.0


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    result = run_cli("--log", str(tmp_path / "missing.json"), "--profile", "recognition-2020")
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "missing.json" in result.stderr
    assert run_cli("--log", str(tmp_path / "x"), "--profile", "nope").returncode == 2
