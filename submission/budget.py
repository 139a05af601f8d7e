"""Time budget of submission/main.py: the one cost model of a run, its timing log, the plan of the database pass
and the depth of reranking.

Shipped beside main.py (which imports it from its own folder). It measures nothing itself: main.py hands it
rates (seconds per unit of work) and callables that time a setting, and it decides. The kit's projections
(`local_eval time`, `tradeoff`, `tune`) use the same functions through main.py's KIT_API, so a stage's cost is
written down once, here.

Units of work: global_db / global_query: images; knn: query x database products (the suppression's database x
non-landmark products and DBA's database x database products included); global_rerank: queries;
local_features: images; verification: (query, candidate) pairs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from store import extract_global, global_settings, image_path, save_json

if TYPE_CHECKING:  # main.py's types, for the annotations only
    from main import Budget, Extraction, Inputs, Models, Run, Settings

log = logging.getLogger("submission")

TIMING_STAGES = ("global_db", "global_query", "knn", "global_rerank", "local_features", "verification")
PROBE_SHARE = 0.01  # of the budget, at most, for timing one setting of the ladder (per pass)
PLAN_SHARE = 0.1  # of the time left, at most, for timing the ladder; then the cheapest rung, untimed
LOAD_SPREAD = 0.25  # two timings of one setting further apart than this share: the machine is busy, say so


class Sizes(NamedTuple):
    """Image counts of a run, for projections."""

    db: int
    queries: int
    nonlandmarks: int


def stage_units(sizes: Sizes, depth: int, new_image_share: float = 1.0, suppression: bool = False,
                dba: bool = False, global_rerank: bool = False) -> dict[str, float]:
    """The work of each stage of a whole run at these sizes, verifying `depth` candidates per query of which
    `new_image_share` need their local features extracted (an upper bound at 1: candidates repeat)."""
    products = sizes.queries * (sizes.db + sizes.nonlandmarks)
    products += sizes.db * sizes.nonlandmarks if suppression else 0
    products += sizes.db * sizes.db if dba else 0
    return {"global_db": sizes.db + sizes.nonlandmarks, "global_query": sizes.queries, "knn": products,
            "global_rerank": sizes.queries if global_rerank else 0,
            "local_features": sizes.queries * (1 + depth * new_image_share) if depth else 0,
            "verification": sizes.queries * depth}


def project_seconds(rates: dict[str, float | None], units: dict[str, float]) -> dict[str, float | None]:
    """Seconds per stage: units x rate; None where work is due but the rate was never measured."""
    return {name: (0.0 if not units.get(name) else None if rates.get(name) is None else rates[name] * units[name])
            for name in TIMING_STAGES}


def rerank_seconds_per_query(per_image: float, per_pair: float, depth: int, new_image_share: float = 1.0) -> float:
    """Local features of the query and its new candidates, and the verification of `depth` pairs."""
    return per_image * (1 + depth * new_image_share) + per_pair * depth if depth else 0.0


def depth_that_fits(seconds: float, queries: int, per_image: float, per_pair: float,
                    new_image_share: float = 1.0) -> float:
    """The rerank depth at which `queries` queries take `seconds` (fractional; below 1 when not even depth 1 fits
    them all, below 0 when not even their own local features do)."""
    per_candidate = per_image * new_image_share + per_pair
    if per_candidate <= 0:
        return math.inf
    return (seconds / max(1, queries) - per_image) / per_candidate


def deepest_rerank(seconds_left: float, queries: int, per_image: float, per_pair: float, max_depth: int,
                   new_image_share: float = 1.0) -> int:
    """The deepest rerank (<= max_depth) that fits `queries` queries into seconds_left; at least 1 while one
    more query fits at depth 1, else 0."""
    if queries <= 0 or seconds_left < per_image + per_image * new_image_share + per_pair:
        return 0
    depth = depth_that_fits(seconds_left, queries, per_image, per_pair, new_image_share)
    return int(max(1, min(max_depth, math.floor(depth))))


def process_age() -> float:
    """Seconds since this process started (Linux's /proc; 0 elsewhere): the server's clock runs from the notebook's
    start, so importing TensorFlow and loading the model are charged to the budget too."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def load_average() -> str:
    with_load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return " ".join(f"{value:.2f}" for value in with_load)


class Timing:
    """Items and seconds per stage, against a deadline; saved as WORK/timing.json after every change."""

    def __init__(self, path: Path, task: str, budget: Budget, versions: dict | None = None,
                 started: float | None = None):
        """started: the clock's zero (time.monotonic()); by default this process's start, as on the server."""
        self.path, self.task, self.budget_h, self.versions = path, task, budget.time_budget_h, versions or {}
        self.start = time.monotonic() - process_age() if started is None else started
        self.deadline = self.start + budget.time_budget_h * 3600 * (1 - budget.safety_margin)
        self.stages = {name: {"items": 0, "seconds": 0.0} for name in TIMING_STAGES}
        self.rerank_depth = 0
        self.plan: dict = {}
        self.work: dict = {}  # what stage_units needs beyond the sizes: nonlandmarks, suppression, dba
        self.devices: dict = {}  # per device, the images of the global and the local pass it did

    def add(self, stage: str, items: int, seconds: float) -> None:
        self.stages[stage]["items"] += int(items)
        self.stages[stage]["seconds"] += float(seconds)
        self.save()

    def rate(self, stage: str) -> float | None:
        """Seconds per item measured so far, or None before any item."""
        stage_log = self.stages[stage]
        return stage_log["seconds"] / stage_log["items"] if stage_log["items"] else None

    def rates(self) -> dict[str, float | None]:
        return {name: self.rate(name) for name in TIMING_STAGES}

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def past_deadline(self, *_) -> bool:
        """A stop rule for any loop: true once the deadline has passed."""
        return self.time_left() <= 0

    def save(self) -> None:
        record = {"task": self.task, "budget_h": self.budget_h, "rerank_depth": self.rerank_depth,
                  "stages": self.stages, "total_seconds": time.monotonic() - self.start, "plan": self.plan,
                  "work": self.work, "devices": self.devices, "versions": self.versions}
        save_json(self.path, record)


# The database pass's ladder: each rung cheaper than the one before.
def ladder(extraction, has_float16: bool) -> list[tuple[str, object]]:
    """The given global settings, then cheaper ones, each step keeping the previous: float16 (when the model
    has it), one global scale (the one nearest 1), longer side 768, then 512."""
    rungs = [("as given", extraction)]
    step = lambda name, **change: rungs.append((name, dataclasses.replace(rungs[-1][1], **change)))
    if has_float16 and extraction.global_precision != "float16":
        step("float16", global_precision="float16")
    if len(extraction.global_scale_indices) > 1:
        nearest = min(extraction.global_scale_indices, key=lambda i: abs(math.log(extraction.scales[i])))
        step("1 global scale", global_scale_indices=(nearest,))
    for side in (768, 512):
        if side < rungs[-1][1].global_max_side:
            step(f"max side {side}", global_max_side=side)
    return rungs


Measure = Callable[[object, float], tuple[float, float]]  # (extraction, limit s) -> (s per image, spread)


def plan_extraction(rungs: list[tuple[str, object]], measure: Measure, units: Callable[[int], dict],
                    knn_rate: float, reserve_s: float, timing: Timing, limit_s: float) -> tuple[object, dict]:
    """The first rung whose projected run (global passes, kNN and the rerank reserve) fits the time left after
    its own timing; the cheapest when none does. Planning itself may use PLAN_SHARE of the time left when it
    starts: past that, the cheapest rung is taken untimed, at the cheapest rate measured (an upper bound for it).
    Returns the rung and the plan's record."""
    tried, chosen, planning_s = [], None, PLAN_SHARE * timing.time_left()
    began = time.monotonic()
    for index, (name, extraction) in enumerate(rungs):
        over = bool(tried) and time.monotonic() - began > planning_s
        if over and index < len(rungs) - 1:
            continue  # no time to time it: on to the cheapest
        rate, spread = (min(t["seconds_per_image"] for t in tried), 0.0) if over else measure(extraction, limit_s)
        seconds = project_seconds({"global_db": rate, "global_query": rate, "knn": knn_rate}, units(0))
        parts = {**{k: v for k, v in seconds.items() if v}, "rerank_reserve": reserve_s}
        fits = sum(parts.values()) <= timing.time_left()
        tried.append({"rung": name, "seconds_per_image": rate, "spread": spread, "timed": not over,
                      "projected_h": {k: v / 3600 for k, v in parts.items()}, "fits": fits,
                      "global": global_settings(extraction)})
        untimed = " (untimed: planning's time is up)" if over else ""
        log.info("plan: %-14s %.4f s/image%s: %s of %.2f h left: %s", name, rate, untimed, hours_text(parts),
                 timing.time_left() / 3600, "fits" if fits else "does not fit")
        warn_spread(name, spread)
        chosen = (extraction, tried[-1])
        if fits:
            break
    extraction, record = chosen
    plan = {"mode": "auto", "chosen": record["rung"], "fits": record["fits"], "rungs": tried,
            "seconds_per_image": record["seconds_per_image"], "knn_seconds_per_item": knn_rate,
            "projection_h": record["projected_h"], "planning_s": time.monotonic() - began,
            "load_average": load_average()}
    verb = "fits" if record["fits"] else "DOES NOT FIT even so (the database pass will stop at its deadline)"
    log.info("plan: global pass at '%s' (%s): %s; %s (load average %s)", record["rung"],
             json.dumps(record["global"]), hours_text(record["projected_h"], 1), verb, plan["load_average"])
    return extraction, plan


def hours_text(parts: dict[str, float], scale: float = 1 / 3600) -> str:
    """'global_db 0.01 h + knn 0.00 h + rerank_reserve 1.80 h = 1.81 h' (parts in seconds, or hours at scale 1)."""
    named = " + ".join(f"{name} {value * scale:.2f} h" for name, value in parts.items())
    return f"{named} = {sum(parts.values()) * scale:.2f} h"


def warn_spread(name: str, spread: float) -> None:
    if spread > LOAD_SPREAD:
        log.warning("plan: two timings of '%s' differ by %.0f%%: the machine is busy (load average %s), so the "
                    "projection is uncertain", name, 100 * spread, load_average())


def choose_xla(extraction, has_xla: bool, gpu: bool, measure: Measure, limit_s: float,
               chosen: dict) -> tuple[object, dict | None]:
    """--global-xla auto: on a GPU, time the XLA-compiled function too and keep the faster (XLA removes per-layer
    overhead there; on a CPU it is slower and its compilation alone can take much of a small budget, so it is
    not tried). The setting and what was measured."""
    if extraction.global_xla != "auto":
        return extraction, None
    plain = dataclasses.replace(extraction, global_xla="off")
    if not (has_xla and gpu):
        return plain, None
    compiled = dataclasses.replace(extraction, global_xla="on")
    rate, _ = measure(compiled, limit_s)
    faster = rate < chosen["seconds_per_image"]
    log.info("plan: XLA-compiled %.4f s/image against %.4f without: %s", rate, chosen["seconds_per_image"],
             "XLA" if faster else "no XLA")
    if faster:
        chosen["seconds_per_image"] = rate
    return (compiled if faster else plain), {"seconds_per_image": rate, "used": faster}


def database_stop_rule(timing: Timing, sizes: Sizes, knn_rate: float) -> Callable[[int, float], bool]:
    """Stop the database pass when the queries' descriptors and the kNN, at the rate measured so far, would no
    longer fit before the deadline."""
    def stop(done: int, seconds: float) -> bool:
        per_image = seconds / done if done else 0.0
        return timing.time_left() < sizes.queries * per_image + sizes.queries * sizes.db * knn_rate
    return stop


def plan_depth(timing: Timing, queries_left: int, max_depth: int, new_image_share: float) -> int:
    """Deepest rerank (<= max_depth) whose projected cost for the remaining queries fits the time left; at
    least 1 while one more query fits. Breadth first: measured on local competitions, at a fixed cost more
    queries at depth 1-3 beat fewer at depth 10-20 (docs/defaults-and-tuning.md), and the queries come most
    confident first."""
    per_image, per_pair = timing.rate("local_features"), timing.rate("verification")
    if per_image is None or per_pair is None:
        return max_depth  # the warm-up batch measures the rates
    return deepest_rerank(timing.time_left(), queries_left, per_image, per_pair, max_depth, new_image_share)


def project_rerank(timing: Timing, queries: int, depth: int, reserve_s: float) -> None:
    """Add to the plan how many queries at `depth` the rerank reserve buys at the measured rates."""
    per_query = rerank_seconds_per_query(timing.rate("local_features") or 0.0, timing.rate("verification") or 0.0,
                                         depth)
    timing.plan["rerank"] = {"depth": depth, "seconds_per_query": per_query, "queries": queries,
                             "queries_in_reserve": int(reserve_s / per_query) if per_query else None}
    timing.save()


# The plan of a run, measured with main.py's models on this run's images.
def time_global(models: Models, paths: list[Path], extraction: Extraction, run: Run, scratch: Path,
                limit_s: float) -> tuple[float, float]:
    """(seconds per image of the global pass of every model, decoding included; how far the two halves of the
    timing differ, as a share). A first untimed pass compiles every size the images need. A pass that takes
    more than limit_s stops there, and its rate so far (compilation included: pessimistic) is the answer."""
    probe_run = dataclasses.replace(run, chunk_size=max(1, len(paths)))

    def rate_of(model, first: int, end: int) -> tuple[float, bool]:
        shutil.rmtree(scratch, ignore_errors=True)
        began = time.monotonic()
        ids = [f"probe{i:06d}" for i in range(first, end)]
        finished, stopped = extract_global(model, ids, paths[first:end], scratch, extraction, probe_run,
                                           stop=lambda done, seconds: seconds > limit_s)
        return (time.monotonic() - began) / max(1, finished), stopped

    total, halves = 0.0, [0.0, 0.0]
    for model in models.global_models:
        rate, stopped = rate_of(model, 0, len(paths))  # compiles every size the images need
        parts = [rate, rate] if stopped or len(paths) < 2 else [rate_of(model, 0, len(paths) // 2)[0],
                                                                 rate_of(model, len(paths) // 2, len(paths))[0]]
        halves = [h + p for h, p in zip(halves, parts, strict=True)]
        total += rate if stopped or len(paths) < 2 else sum(parts) / 2
    shutil.rmtree(scratch, ignore_errors=True)
    return total, abs(halves[0] - halves[1]) / max(min(halves), 1e-12)


def work_flags(settings: Settings, sizes: Sizes) -> dict:
    """What a run's work depends on beyond its sizes (recorded in timing.json as "work", for projections)."""
    stage = settings.global_stage
    suppression = stage.suppression and sizes.nonlandmarks > 0 and settings.run.task == "recognition"
    return {"nonlandmarks": sizes.nonlandmarks, "suppression": bool(suppression), "dba": stage.dba_n > 0,
            "global_rerank": bool(stage.qe_n or stage.superglobal_m)}


def run_units(settings: Settings, sizes: Sizes) -> Callable[[int], dict]:
    """depth -> the work of each stage of this run (stage_units with this run's global stage)."""
    flags = {k: v for k, v in work_flags(settings, sizes).items() if k != "nonlandmarks"}
    return lambda depth: stage_units(sizes, depth, **flags)


def plan_run(models: Models, inputs: Inputs, settings: Settings, timing: Timing, knn_rate: float, gpu: bool):
    """The extraction settings of the global pass: planned (--plan auto) or as given; recorded in timing.plan."""
    run, extraction, budget = settings.run, settings.extraction, settings.budget
    if budget.plan == "fixed" or run.shard != "0/1" or not inputs.db_ids:
        if extraction.global_xla == "auto":
            extraction = dataclasses.replace(extraction, global_xla="off")
        timing.plan = {"mode": "fixed", "global": global_settings(extraction), "knn_seconds_per_item": knn_rate,
                       "devices": len(models.devices)}
        return extraction
    sizes = inputs.sizes()
    probe_paths = [image_path(run.data, inputs.db_split, i) for i in inputs.db_ids[:budget.probe_images]]
    measure = lambda ext, limit_s: time_global(models, probe_paths, ext, run, run.work / "probe", limit_s)
    reserve_s = budget.rerank_reserve * budget.time_budget_h * 3600
    limit_s = PROBE_SHARE * budget.time_budget_h * 3600
    extraction, timing.plan = plan_extraction(ladder(extraction, models.has("float16", False)), measure,
                                              run_units(settings, sizes), knn_rate, reserve_s, timing, limit_s)
    chosen = timing.plan["rungs"][-1]
    extraction, chosen["xla"] = choose_xla(extraction, models.has(extraction.global_precision, True), gpu, measure,
                                           limit_s, chosen)
    timing.plan.update(seconds_per_image=chosen["seconds_per_image"], devices=len(models.devices),
                       sizes=sizes._asdict(), time_left_h=timing.time_left() / 3600)
    return extraction
