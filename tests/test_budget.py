"""submission/budget.py, the one cost model and the plan: units of work per stage, depths that fit, the plan that
charges its own probing, says which part of a projection is which, and says when the machine is busy."""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest

from local_eval.submission_script import load_submission, sibling

sub = load_submission()
budget = sibling("budget")
costs = sibling("costs")


def test_stage_units_follow_the_global_stage():
    sizes = costs.Sizes(db=1000, queries=10, nonlandmarks=50)
    plain = costs.stage_units(sizes, depth=3)
    assert plain == {
        "global_db": 1050,
        "global_query": 10,
        "global_train": 0,
        "knn": 10 * 1050,
        "global_rerank": 0,
        "bridge": 0,
        "local_features": 10 * (1 + 3),
        "verification": 30,
    }
    full = costs.stage_units(sizes, 3, costs.Work(suppression=True, dba=True, qe=True, superglobal=True))
    # alpha-QE searches the whole database a second time: query x database products, not a per-query cost
    assert full["knn"] == 10 * 1050 + 1000 * 50 + 1000 * 1000 + 10 * 1000 and full["global_rerank"] == 10
    assert costs.stage_units(sizes, 0)["local_features"] == 0


def test_an_older_log_with_one_global_rerank_flag_counts_both_qe_and_superglobal():
    work = costs.Work.from_record({"nonlandmarks": 5, "suppression": True, "dba": False, "global_rerank": True})
    assert work.qe and work.superglobal and work.suppression and not work.dba
    assert costs.Work.from_record(work.record()) == work


def test_the_script_plans_with_the_cost_models_one_margin():
    assert sub.Budget().safety_margin == costs.SAFETY_MARGIN


def test_a_small_runs_knn_is_projected_from_the_timed_product():
    log = {
        "stages": {"knn": {"items": 1000, "seconds": 1.0}},  # 1 ms a product: mostly overhead
        "timed_products": {"knn": {"items": 4_194_304, "seconds": 4.194304}},
    }  # 1 us a product
    assert costs.log_rates(log)["knn"] == pytest.approx(1e-6)
    big = {**log, "stages": {"knn": {"items": 10**8, "seconds": 50.0}}}  # a run larger than the timed shape
    assert costs.log_rates(big)["knn"] == pytest.approx(5e-7)


def test_a_pass_is_paced_by_the_slower_of_decoding_and_the_network():
    assert costs.pass_pace(0.010, 0.080, cpus=4) == (0.020, "decode")
    assert costs.pass_pace(0.030, 0.080, cpus=4) == (0.030, "network")
    assert costs.pass_pace(0.030, None, cpus=4) == (0.030, "network")


def test_memory_grows_with_the_database_and_dba_holds_a_copy():
    work = costs.Work(dims=(512,), dba=True)
    small = costs.memory_bytes(costs.Sizes(1_000_000, 100_000, 0), work, 10)
    large = costs.memory_bytes(costs.Sizes(2_000_000, 100_000, 0), work, 10)
    assert large["global_stage"] > 1.7 * small["global_stage"]  # the database and its DBA copy dominate
    no_dba = costs.memory_bytes(costs.Sizes(1_000_000, 100_000, 0), costs.Work(dims=(512,)), 10)
    assert small["global_stage"] - no_dba["global_stage"] == 1_000_000 * 512 * 4
    ensemble = costs.memory_bytes(costs.Sizes(1_000_000, 100_000, 0), costs.Work(dims=(512, 512)), 10)
    assert ensemble["global_pass"] > 4 * small["global_pass"] / 2


def test_projected_seconds_are_none_only_where_work_is_due_and_unmeasured():
    units = costs.stage_units(costs.Sizes(100, 10, 0), depth=2)
    seconds = costs.project_seconds({"global_db": 0.5, "global_query": 0.5, "knn": 1e-6}, units)
    assert seconds["global_db"] == 50 and seconds["global_rerank"] == 0.0
    assert seconds["local_features"] is None and seconds["verification"] is None


def test_the_depth_that_fits():
    # 100 s for 10 queries: 10 s each = 1 s for the query's features + depth x (1 s features + 0.5 s pair)
    assert costs.depth_that_fits(100, 10, per_image=1.0, per_pair=0.5) == pytest.approx(6.0)
    assert budget.deepest_rerank(100, 10, 1.0, 0.5, max_depth=20) == 6
    assert budget.deepest_rerank(100, 10, 1.0, 0.5, max_depth=4) == 4
    assert budget.deepest_rerank(3, 1000, 1.0, 0.5, max_depth=20) == 1  # one more query fits at depth 1
    assert budget.deepest_rerank(2, 1000, 1.0, 0.5, max_depth=20) == 0
    assert costs.rerank_seconds_per_query(1.0, 0.5, 6) == pytest.approx(10.0)


def plan_inputs(tmp_path, limit_h: float):
    timing = budget.Timing(
        tmp_path / "timing.json",
        "recognition",
        sub.Budget(time_budget_h=limit_h, safety_margin=0),
        started=time.monotonic(),
    )  # not pytest's start: the suite may have run for minutes
    rungs = budget.ladder(sub.Extraction(global_xla="off"), has_float16=False)
    units = lambda depth: costs.stage_units(costs.Sizes(100, 10, 0), depth)
    return timing, rungs, units


def test_the_plan_charges_its_own_probing(tmp_path):
    """Each rung would fit the time left before it is timed; timing it uses the room, so none fits after."""
    timing, rungs, units = plan_inputs(tmp_path, limit_h=1 / 3600)  # one second

    def slow(extraction, limit_s):
        time.sleep(0.4)
        return 0.0, 0.0

    _, plan = budget.plan_extraction(rungs, slow, units, knn_rate=0.0, reserve_s=0.7, timing=timing, limit_s=1)
    assert not plan["fits"] and plan["chosen"] == rungs[-1][0]
    assert not any(rung["fits"] for rung in plan["rungs"])


def test_the_plan_names_each_part_and_warns_when_timings_disagree(tmp_path, caplog):
    timing, rungs, units = plan_inputs(tmp_path, limit_h=10)
    busy = lambda extraction, limit_s: (0.01, 0.6)  # its two halves 60% apart
    with caplog.at_level(logging.INFO, logger="submission"):
        _, plan = budget.plan_extraction(rungs, busy, units, knn_rate=1e-6, reserve_s=3600, timing=timing, limit_s=1)
    assert plan["fits"] and plan["projection_h"]["rerank_reserve"] == pytest.approx(1.0)
    assert "global_db 0.00 h + global_query 0.00 h + knn 0.00 h + rerank_reserve 1.00 h = 1.00 h" in caplog.text
    assert "differ by 60%" in caplog.text and "load average" in caplog.text and "load_average" in plan


def test_xla_is_timed_only_on_a_gpu():
    extraction = sub.Extraction(global_xla="auto")
    untouchable = lambda extraction, limit_s: pytest.fail("no XLA timing on a CPU")
    chosen, measured = budget.choose_xla(
        extraction, has_xla=True, gpu=False, measure=untouchable, limit_s=1, chosen={"seconds_per_image": 1.0}
    )
    assert chosen.global_xla == "off" and measured is None
    faster = lambda extraction, limit_s: (0.5, 0.0)
    record = {"seconds_per_image": 1.0}
    chosen, measured = budget.choose_xla(extraction, True, True, faster, 1, record)
    assert chosen.global_xla == "on" and measured["used"] and record["seconds_per_image"] == 0.5
    assert dataclasses.replace(chosen, global_xla="off") == dataclasses.replace(extraction, global_xla="off")


def test_the_database_stop_rule_reserves_the_train_sets_pass_only_when_it_runs_here(tmp_path):
    """--train-data's images are still to extract after the database: the rule stops earlier for them; a train set
    read from a file (train_pass off) costs no pass."""
    timing, _, _ = plan_inputs(tmp_path, limit_h=100 / 3600)  # 100 s
    later = costs.Sizes(db=0, queries=10, nonlandmarks=0, train=200)
    searched = costs.Sizes(db=100, queries=10, nonlandmarks=0)

    def rule(train_pass: bool):
        timing.work = {"train_pass": train_pass}
        return budget.database_stop_rule(timing, later, searched, knn_rate=0.0)

    done, seconds = 10, 3.0  # 0.3 s per image: 10 queries 3 s; with 200 train images 63 s
    assert not rule(False)(done, seconds)
    timing.deadline = time.monotonic() + 30  # 30 s left: the queries fit, the train set's pass does not
    assert not rule(False)(done, seconds) and rule(True)(done, seconds)
