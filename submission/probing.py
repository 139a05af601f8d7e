"""--probe N of submission/main.py: time N images of every stage on this machine, project the run at this data's
full size (WORK/timing.json: the measured stages and the plan), and stop.

Shipped beside main.py (which imports it from its own folder). main.py hands it the pieces of the run it times
that live there: the global stage's reranking (alpha-QE, SuperGlobal) and the rule that verifies a pair.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from budget import plan_run, project_rerank
from costs import TIMED_PRODUCT, Sizes, projected_memory
from search import gpu_present, knn, knn_seconds_per_item, l2_normalize
from settings_cli import InputError
from verifier import verification_pool, verify_batch

if TYPE_CHECKING:  # the types of the files beside it, for the annotations only
    from budget import Timing
    from devices import Models
    from files import Inputs
    from settings import Global, Settings
    from verifier import CountInliers

    Reranked = Callable[..., tuple[np.ndarray, np.ndarray]]  # main.py's global_rerank

log = logging.getLogger("submission")


def probe(
    models: Models,
    inputs: Inputs,
    settings: Settings,
    timing: Timing,
    candidates: int,
    reranked: Reranked,
    count_inliers: CountInliers,
) -> None:
    """--probe N: time N images of every stage on this machine, project the run at this data's full size
    (WORK/timing.json: the measured stages and the plan), and stop. candidates: neighbours searched per query."""
    run_ = settings.run
    if not inputs.db_ids or not inputs.test_ids:
        raise InputError("--probe needs database and test images to time")
    count = run_.probe
    scratch = run_.work / "probe"
    probing = dataclasses.replace(
        settings,
        run=dataclasses.replace(run_, work=scratch),
        budget=dataclasses.replace(settings.budget, probe_images=count, plan="auto"),
    )
    dim = sum(model.global_dim for model in models.global_models)  # the (concatenated) descriptor searched
    knn_rate = knn_seconds_per_item(dim, run_.knn_block_mb)
    plan_run(models, inputs, probing, timing, knn_rate, gpu_present())
    timing.measure_memory()
    seconds = timing.plan["seconds_per_image"] * count
    timing.add("global_db", count, seconds)
    timing.add("global_query", count, seconds)
    timing.add("global_train", count, seconds)  # a train image of label transfer's pass: the same pass
    for products in ("knn", "bridge"):  # label transfer's and hubness's products are kNN products
        timing.add(products, TIMED_PRODUCT[0] * TIMED_PRODUCT[1], knn_rate * TIMED_PRODUCT[0] * TIMED_PRODUCT[1])
    timing.add_timed_knn(knn_rate)
    timing.add("global_rerank", 1, time_global_rerank(dim, settings.global_stage, candidates, reranked))
    half = max(1, count // 2)
    queries, candidate_ids = inputs.test_ids[:half], inputs.db_ids[:half]
    with verification_pool(count_inliers, settings.verification, 0) as pool:
        verify_batch(models.local, probing, timing, pool, queries, inputs.db_split, [candidate_ids] * len(queries))
    shutil.rmtree(scratch, ignore_errors=True)
    depth = timing.rerank_depth = settings.scoring.rerank  # what `local_eval time --log` projects by default
    project_rerank(
        timing, len(inputs.test_ids), depth, settings.budget.rerank_reserve * settings.budget.time_budget_h * 3600
    )
    rerank_h = timing.plan["rerank"]["seconds_per_query"] * len(inputs.test_ids) / 3600
    memory = baseline_and_peak(timing, inputs.sizes(), depth)
    log.info(
        "probe of %d images: global pass at '%s' (%s), projected %.2f h; reranking every query at depth "
        "%d would take %.2f h more; peak memory %.2f GB (%.2f GB of it before any descriptor); details in %s",
        count,
        timing.plan["chosen"],
        "fits" if timing.plan["fits"] else "does not fit",
        sum(timing.plan["projection_h"].values()),
        depth,
        rerank_h,
        *memory,
        timing.path,
    )


def baseline_and_peak(timing: Timing, sizes: Sizes, depth: int) -> tuple[float, float]:
    """(peak GB of the run at these sizes, the process's GB before any descriptor), by the cost model."""
    record = {"work": timing.work, "memory": timing.memory}
    projected = projected_memory(record, sizes, depth)
    return projected["peak"], projected["baseline"]


def time_global_rerank(dim: int, stage: Global, candidates: int, reranked: Reranked) -> float:
    """Seconds per query of SuperGlobal on random unit rows (alpha-QE's second search is kNN products)."""
    if not stage.superglobal_m:
        return 0.0
    stage = dataclasses.replace(stage, qe_n=0)
    rng = np.random.default_rng(0)
    queries = l2_normalize(rng.normal(size=(64, dim)).astype(np.float32))
    database = l2_normalize(rng.normal(size=(max(candidates, 2 * stage.superglobal_m, 1000), dim)).astype(np.float32))
    began = time.monotonic()
    reranked(queries, database, *knn(queries, database, candidates), stage, block_mb=64)
    return (time.monotonic() - began) / len(queries)
