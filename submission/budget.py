"""Time budget of submission/main.py: its timing log, the plan of the database pass and the depth of reranking.

Shipped beside main.py (which imports it from its own folder). It measures nothing itself: main.py hands it
rates (seconds per unit of work) and callables that time a setting, and it decides, with costs.py's cost model
(the units of each stage, the rates, the bytes), which the kit's projections use too.
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
from typing import TYPE_CHECKING

from costs import (
    GB,
    SAFETY_MARGIN,
    TIMED_PRODUCT,
    TIMING_STAGES,
    Sizes,
    Work,
    bridge_products,
    current_rss_bytes,
    depth_that_fits,
    disk_bytes,
    folder_bytes,
    knn_products,
    machine_ram_bytes,
    memory_bytes,
    peak_rss_bytes,
    project_seconds,
    rate,
    rerank_seconds_per_query,
    stage_units,
)
from store import decode_for_global, extract_global, global_settings, image_path, save_json

if TYPE_CHECKING:  # the types of settings.py and the files beside it, for the annotations only
    from devices import Models
    from files import Inputs
    from settings import Budget, Extraction, Run, Settings

log = logging.getLogger("submission")

PROBE_SHARE = 0.01  # of the budget, at most, for timing one setting of the ladder (per pass)
PLAN_SHARE = 0.1  # of the time left, at most, for timing the ladder; then the cheapest rung, untimed
LOAD_SPREAD = 0.25  # two timings of one setting further apart than this share: the machine is busy, say so


def deepest_rerank(
    seconds_left: float, queries: int, per_image: float, per_pair: float, max_depth: int, new_image_share: float = 1.0
) -> int:
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

    def __init__(
        self, path: Path, task: str, budget: Budget, versions: dict | None = None, started: float | None = None
    ):
        """started: the clock's zero (time.monotonic()); by default this process's start, as on the server."""
        self.path, self.task, self.budget_h, self.versions = path, task, budget.time_budget_h, versions or {}
        self.start = time.monotonic() - process_age() if started is None else started
        self.deadline = self.start + budget.time_budget_h * 3600 * (1 - budget.safety_margin)
        self.stages = {name: {"items": 0, "seconds": 0.0} for name in TIMING_STAGES}
        self.rerank_depth = 0
        self.plan: dict = {}
        self.work: dict = {}  # what the cost model needs beyond the sizes (costs.Work's record, nonlandmarks)
        self.devices: dict = {}  # per device, the images of the global and the local pass it did
        self.timed_products: dict = {}  # the kNN timed at a fixed shape: {"knn": {"items", "seconds"}}
        self.decode: dict = {}  # one core decoding images for the global pass: {"items", "seconds", "threads"}
        self.memory: dict = {}  # baseline_bytes (models loaded), peak_rss_bytes, work_bytes

    def add(self, stage: str, items: int, seconds: float) -> None:
        self.stages[stage]["items"] += int(items)
        self.stages[stage]["seconds"] += float(seconds)
        self.save()

    def rate(self, stage: str) -> float | None:
        """Seconds per item measured so far, or None before any item."""
        return rate(self.stages[stage])

    def add_timed_knn(self, seconds_per_product: float) -> None:
        """The kNN rate timed on a product of TIMED_PRODUCT's shape (what projections use below that size)."""
        items = TIMED_PRODUCT[0] * TIMED_PRODUCT[1]
        self.timed_products["knn"] = {"items": items, "seconds": seconds_per_product * items}
        self.save()

    def measure_memory(self, baseline: bool = False) -> None:
        """Record this process's peak RSS and WORK's size (and, with baseline, the RSS before any descriptor)."""
        if baseline:
            self.memory["baseline_bytes"] = current_rss_bytes()
        self.memory.update(peak_rss_bytes=peak_rss_bytes(), work_bytes=folder_bytes(self.path.parent))
        self.save()

    def rates(self) -> dict[str, float | None]:
        return {name: self.rate(name) for name in TIMING_STAGES}

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def past_deadline(self, *_) -> bool:
        """A stop rule for any loop: true once the deadline has passed."""
        return self.time_left() <= 0

    def save(self) -> None:
        record = {
            "task": self.task,
            "budget_h": self.budget_h,
            "rerank_depth": self.rerank_depth,
            "stages": self.stages,
            "total_seconds": time.monotonic() - self.start,
            "plan": self.plan,
            "work": self.work,
            "devices": self.devices,
            "timed_products": self.timed_products,
            "decode": self.decode,
            "memory": self.memory,
            "versions": self.versions,
        }
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


def plan_extraction(
    rungs: list[tuple[str, object]],
    measure: Measure,
    units: Callable[[int], dict],
    knn_rate: float,
    reserve_s: float,
    timing: Timing,
    limit_s: float,
) -> tuple[object, dict]:
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
        seconds = project_seconds(pass_rates(rate, knn_rate, timing), units(0))
        parts = {**{k: v for k, v in seconds.items() if v}, "rerank_reserve": reserve_s}
        fits = sum(parts.values()) <= timing.time_left()
        tried.append(
            {
                "rung": name,
                "seconds_per_image": rate,
                "spread": spread,
                "timed": not over,
                "projected_h": {k: v / 3600 for k, v in parts.items()},
                "fits": fits,
                "global": global_settings(extraction),
            }
        )
        untimed = " (untimed: planning's time is up)" if over else ""
        log.info(
            "plan: %-14s %.4f s/image%s: %s of %.2f h left: %s",
            name,
            rate,
            untimed,
            hours_text(parts),
            timing.time_left() / 3600,
            "fits" if fits else "does not fit",
        )
        warn_spread(name, spread)
        chosen = (extraction, tried[-1])
        if fits:
            break
    extraction, record = chosen
    plan = {
        "mode": "auto",
        "chosen": record["rung"],
        "fits": record["fits"],
        "rungs": tried,
        "seconds_per_image": record["seconds_per_image"],
        "knn_seconds_per_item": knn_rate,
        "projection_h": record["projected_h"],
        "planning_s": time.monotonic() - began,
        "load_average": load_average(),
    }
    verb = "fits" if record["fits"] else "DOES NOT FIT even so (the database pass will stop at its deadline)"
    log.info(
        "plan: global pass at '%s' (%s): %s; %s (load average %s)",
        record["rung"],
        json.dumps(record["global"]),
        hours_text(record["projected_h"], 1),
        verb,
        plan["load_average"],
    )
    return extraction, plan


def pass_rates(rate: float, knn_rate: float, timing: Timing) -> dict[str, float | None]:
    """The rates the plan projects a rung with: its pass rate for every global pass (the train set's too, unless
    it was loaded from a file: then as loaded), the kNN's for every product."""
    train_pass = Work.from_record(timing.work).train_pass
    train_rate = rate if train_pass else timing.rate("global_train")
    return {"global_db": rate, "global_query": rate, "global_train": train_rate, "knn": knn_rate, "bridge": knn_rate}


def hours_text(parts: dict[str, float], scale: float = 1 / 3600) -> str:
    """'global_db 0.01 h + knn 0.00 h + rerank_reserve 1.80 h = 1.81 h' (parts in seconds, or hours at scale 1)."""
    named = " + ".join(f"{name} {value * scale:.2f} h" for name, value in parts.items())
    return f"{named} = {sum(parts.values()) * scale:.2f} h"


def warn_spread(name: str, spread: float) -> None:
    if spread > LOAD_SPREAD:
        log.warning(
            "plan: two timings of '%s' differ by %.0f%%: the machine is busy (load average %s), so the "
            "projection is uncertain",
            name,
            100 * spread,
            load_average(),
        )


def choose_xla(
    extraction, has_xla: bool, gpu: bool, measure: Measure, limit_s: float, chosen: dict
) -> tuple[object, dict | None]:
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
    log.info(
        "plan: XLA-compiled %.4f s/image against %.4f without: %s",
        rate,
        chosen["seconds_per_image"],
        "XLA" if faster else "no XLA",
    )
    if faster:
        chosen["seconds_per_image"] = rate
    return (compiled if faster else plain), {"seconds_per_image": rate, "used": faster}


def database_stop_rule(timing: Timing, later: Sizes, searched: Sizes, knn_rate: float) -> Callable[[int, float], bool]:
    """Stop the database pass when what is still to extract (`later`: the queries and --train-data's images of this
    model and the next, the database of the next) and the global stage's products over `searched` (the suppression,
    DBA, alpha-QE and label transfer included, as the run has them), at the rates measured so far, would no longer
    fit before the deadline."""
    work = Work.from_record(timing.work)
    products = knn_products(searched, work) + bridge_products(searched, work)
    images = later.queries + later.db + (later.train if work.train_pass else 0)

    def stop(done: int, seconds: float) -> bool:
        per_image = seconds / done if done else 0.0
        return timing.time_left() < images * per_image + products * knn_rate

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
    per_query = rerank_seconds_per_query(
        timing.rate("local_features") or 0.0, timing.rate("verification") or 0.0, depth
    )
    timing.plan["rerank"] = {
        "depth": depth,
        "seconds_per_query": per_query,
        "queries": queries,
        "queries_in_reserve": int(reserve_s / per_query) if per_query else None,
    }
    timing.save()


# The plan of a run, measured with main.py's models on this run's images.
def time_global(
    models: Models, paths: list[Path], extraction: Extraction, run: Run, scratch: Path, limit_s: float
) -> tuple[float, float]:
    """(seconds per image of the global pass of every model, decoding included; how far the two halves of the
    timing differ, as a share). A first untimed pass compiles every size the images need. A pass that takes
    more than limit_s stops there, and its rate so far (compilation included: pessimistic) is the answer."""
    probe_run = dataclasses.replace(run, chunk_size=max(1, len(paths)))

    def rate_of(model, first: int, end: int) -> tuple[float, bool]:
        shutil.rmtree(scratch, ignore_errors=True)
        began = time.monotonic()
        ids = [f"probe{i:06d}" for i in range(first, end)]
        finished, stopped = extract_global(
            model, ids, paths[first:end], scratch, extraction, probe_run, stop=lambda done, seconds: seconds > limit_s
        )
        return (time.monotonic() - began) / max(1, finished), stopped

    total, halves = 0.0, [0.0, 0.0]
    for model in models.global_models:
        rate, stopped = rate_of(model, 0, len(paths))  # compiles every size the images need
        parts = (
            [rate, rate]
            if stopped or len(paths) < 2
            else [rate_of(model, 0, len(paths) // 2)[0], rate_of(model, len(paths) // 2, len(paths))[0]]
        )
        halves = [h + p for h, p in zip(halves, parts, strict=True)]
        total += rate if stopped or len(paths) < 2 else sum(parts) / 2
    shutil.rmtree(scratch, ignore_errors=True)
    return total, abs(halves[0] - halves[1]) / max(min(halves), 1e-12)


def time_decode(paths: list[Path], max_side: int, threads: int) -> dict:
    """One core decoding these images as the global pass does: {"items", "seconds", "threads"} (the threads that
    decode beside the network on this machine), for the cost model's decode rate. CPU seconds of this thread, so
    that other processes on a busy machine do not count; the faster of two rounds (the first warms the decoder)."""
    rounds = []
    for _ in range(2):
        began = time.thread_time()
        for path in paths:
            decode_for_global(path, max_side)
        rounds.append(time.thread_time() - began)
    return {"items": len(paths), "seconds": min(rounds), "threads": min(threads, os.cpu_count() or 1)}


def run_work(settings: Settings, sizes: Sizes, dims: tuple[int, ...], candidates: int, gpu: bool) -> Work:
    """What this run's cost depends on beyond its sizes (the cost model's Work)."""
    stage, run = settings.global_stage, settings.run
    suppression = stage.suppression and sizes.nonlandmarks > 0 and run.task == "recognition"
    return Work(
        suppression=bool(suppression),
        dba=stage.dba_n > 0,
        qe=stage.qe_n > 0,
        superglobal=stage.superglobal_m > 0,
        bridge=stage.bridge_weight > 0 and sizes.train > 0,
        train_pass=stage.bridge_weight > 0 and sizes.train > 0 and run.train_data is not None,
        hubness=stage.hubness_weight > 0 and run.task == "retrieval",
        dims=tuple(dims),
        candidates=candidates,
        max_features=settings.extraction.max_features,
        knn_block_mb=run.knn_block_mb,
        local_cache_gb=run.local_cache_gb,
        gpu=gpu,
    )


def memory_room(run: Run) -> tuple[float, str]:
    """(bytes this run's data may use: the machine's memory less the margin, less what the process holds now;
    where the machine's figure comes from)."""
    if run.ram_gb is not None:
        ram, source = run.ram_gb * GB, f"--ram-gb {run.ram_gb:g}"
    else:
        ram, source = machine_ram_bytes(), "this machine (cgroup limit or /proc/meminfo)"
    if ram is None:
        return math.inf, "unknown (no /proc/meminfo)"
    return ram * (1 - SAFETY_MARGIN) - current_rss_bytes(), source


def plan_memory(
    settings: Settings, models: Models, sizes: Sizes, timing: Timing, work_of: Callable[[Settings, Models], Work]
) -> tuple[Settings, Models]:
    """Act on memory and disk as the plan does on time: when the projected peak of this run's data does not fit the
    machine's memory (less the margin and what the process holds), cut what costs least score first: DBA (its copy
    of the database), then label transfer (the train set), then the ensemble's last members; when WORK's projected
    disk does not fit the free space, trim the local-feature cache. Each cut is logged and recorded in timing.json
    ("memory": "plan")."""
    room, source = memory_room(settings.run)
    depth, cuts = settings.scoring.rerank, []
    peak = lambda s, m: max(memory_bytes(sizes, work_of(s, m), depth).values())

    def turned_off(field: str, off_value: float, what: str) -> Settings:
        """settings with this global-stage setting off, the cut and the bytes it saves logged in `cuts`."""
        stage = dataclasses.replace(settings.global_stage, **{field: off_value})
        off = dataclasses.replace(settings, global_stage=stage)
        cuts.append(f"{what}: {(peak(settings, models) - peak(off, models)) / GB:.2f} GB)")
        return off

    while peak(settings, models) > room:
        if settings.global_stage.dba_n:
            settings = turned_off("dba_n", 0, "DBA off (its copy of the database")
        elif work_of(settings, models).bridge:
            settings = turned_off("bridge_weight", 0.0, "label transfer off (the train set's descriptors")
        elif len(models.global_models) > 1:
            models = models._replace(global_models=models.global_models[:-1], weights=models.weights[:-1])
            cuts.append(f"ensemble member {len(models.global_models) + 1} dropped (its descriptors)")
        else:
            break
    settings, trimmed = trimmed_local_cache(settings, sizes, work_of(settings, models))
    cuts += trimmed
    work = work_of(settings, models)
    projected = peak(settings, models)
    timing.work = work_flags(work, sizes)
    timing.memory["plan"] = {
        "room_gb": room / GB,
        "machine": source,
        "projected_gb": projected / GB,
        "fits": projected <= room,
        "cuts": cuts,
    }
    for cut in cuts:
        log.warning(
            "memory plan: %s: the run's data would need more than the %.2f GB free of %s", cut, room / GB, source
        )
    if projected > room:
        log.warning(
            "memory plan: %.2f GB projected for the run's data, %.2f GB free (%s): DOES NOT FIT even after the cuts",
            projected / GB,
            room / GB,
            source,
        )
    timing.save()
    return settings, models


def trimmed_local_cache(settings: Settings, sizes: Sizes, work: Work) -> tuple[Settings, list[str]]:
    """--local-cache-gb lowered to what WORK's free disk leaves beside the rest of WORK (never below 0.1 GB)."""
    run = settings.run
    run.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(run.work).free * (1 - SAFETY_MARGIN)
    parts = disk_bytes(sizes, work, settings.scoring.rerank, run.task)
    room_for_local = (free - sum(v for k, v in parts.items() if k != "local_cache")) / GB
    if parts["local_cache"] / GB <= room_for_local:
        return settings, []
    cap = max(0.1, room_for_local)
    trimmed = dataclasses.replace(settings, run=dataclasses.replace(run, local_cache_gb=cap))
    return trimmed, [f"local-feature cache capped at {cap:.2f} GB (free disk of {run.work})"]


def work_flags(work: Work, sizes: Sizes) -> dict:
    """timing.json's "work": the Work's record and the run's own sizes, for projections."""
    return {**sizes._asdict(), **work.record()}


def run_units(timing: Timing, sizes: Sizes) -> Callable[[int], dict]:
    """depth -> the work of each stage of this run (stage_units with the run's Work, as timing.json records it)."""
    work = Work.from_record(timing.work)
    return lambda depth: stage_units(sizes, depth, work)


def plan_run(models: Models, inputs: Inputs, settings: Settings, timing: Timing, knn_rate: float, gpu: bool):
    """The extraction settings of the global pass: planned (--plan auto) or as given; recorded in timing.plan."""
    run, extraction, budget = settings.run, settings.extraction, settings.budget
    decode_paths = [image_path(run.data, inputs.db_split, i) for i in inputs.db_ids[: budget.probe_images]]
    timing.decode = time_decode(decode_paths, extraction.global_max_side, run.decode_threads)
    if budget.plan == "fixed" or run.shard != "0/1" or not inputs.db_ids:
        if extraction.global_xla == "auto":
            extraction = dataclasses.replace(extraction, global_xla="off")
        timing.plan = {
            "mode": "fixed",
            "global": global_settings(extraction),
            "knn_seconds_per_item": knn_rate,
            "devices": len(models.devices),
        }
        return extraction
    sizes = inputs.sizes()
    probe_paths = [image_path(run.data, inputs.db_split, i) for i in inputs.db_ids[: budget.probe_images]]
    measure = lambda ext, limit_s: time_global(models, probe_paths, ext, run, run.work / "probe", limit_s)
    reserve_s = budget.rerank_reserve * budget.time_budget_h * 3600
    limit_s = PROBE_SHARE * budget.time_budget_h * 3600
    extraction, timing.plan = plan_extraction(
        ladder(extraction, models.has("float16", False)),
        measure,
        run_units(timing, sizes),
        knn_rate,
        reserve_s,
        timing,
        limit_s,
    )
    chosen = timing.plan["rungs"][-1]
    extraction, chosen["xla"] = choose_xla(
        extraction, models.has(extraction.global_precision, True), gpu, measure, limit_s, chosen
    )
    timing.plan.update(
        seconds_per_image=chosen["seconds_per_image"],
        devices=len(models.devices),
        sizes=sizes._asdict(),
        time_left_h=timing.time_left() / 3600,
    )
    return extraction
