"""Verification's plumbing of submission/main.py: the local features of a batch of queries and their candidates,
then each pair verified in worker processes (or in this one) until the deadline. The rule that verifies a pair
(main.py's count_inliers: putative matches, RANSAC) is handed in, with its settings.

Shipped beside main.py (which imports it from its own folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING

from store import extract_local, load_local, local_path, trim_local_cache
from threadpoolctl import threadpool_limits  # installed with scikit-learn
from tqdm import tqdm

if TYPE_CHECKING:  # the types of the files beside it, for the annotations only
    from budget import Timing
    from savedmodel import DelgSavedModel, LocalFeatures
    from settings import Settings, Verification

    CountInliers = Callable[[LocalFeatures, LocalFeatures, Verification], int]

_WORKER_STATE: list = []  # what this process's tasks read (worker_state): the verification pool's (rule, settings)
TASKS_PER_SUBMIT = 4  # tasks sent to a worker process at a time: fewer round trips, a prompt stop at the deadline
log = logging.getLogger("submission")


def _init_worker(state: tuple) -> None:
    """One BLAS thread per worker: small matrix products run several times slower on busy shared cores. Ctrl-C
    reaches the whole process group: the workers leave it to the main process, which ends them with one line."""
    _WORKER_STATE[:] = state
    threadpool_limits(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_state() -> tuple:
    """The state the pool was started with, in a worker (or in this process when there is no pool)."""
    return tuple(_WORKER_STATE)


@dataclasses.dataclass
class Workers:
    """Worker processes holding `state`; executor None: this process runs the tasks (no pool, or it broke)."""

    state: tuple
    executor: ProcessPoolExecutor | None = None


@contextlib.contextmanager
def worker_pool(state: tuple, workers: int) -> Iterator[Workers]:
    """Worker processes holding `state`, started once for all their tasks (workers <= 1: none, this process).
    The one pool of the kit: the script's verification, tune's sweeps and revisited's reranking use it."""
    pool = Workers(state)
    if workers > 1:  # forked: the tasks' functions live in a script that is no importable module
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        pool.executor = ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(state,))
    try:
        yield pool
    finally:
        if pool.executor is not None:
            pool.executor.shutdown(wait=True, cancel_futures=True)


def _run_tasks(function: Callable, tasks: list) -> list:
    return [function(task) for task in tasks]


def _in_this_process(function: Callable, tasks: list, pool: Workers) -> Iterator:
    _WORKER_STATE[:] = pool.state
    with threadpool_limits(1):
        yield from map(function, tasks)


def _results(function: Callable, tasks: list, pool: Workers) -> Iterator:
    """function(task) for each task in order: from the pool's processes and, once one of them has died (a crash
    takes only its process), from this one; the tasks not yet asked for are cancelled when the caller stops."""
    if pool.executor is None:
        yield from _in_this_process(function, tasks, pool)
        return
    step = TASKS_PER_SUBMIT
    futures = [pool.executor.submit(_run_tasks, function, tasks[i : i + step]) for i in range(0, len(tasks), step)]
    done = 0
    try:
        for future in futures:
            yield from future.result()
            done += step
    except BrokenProcessPool as err:
        log.warning("a worker process died (%s): the last %d tasks run in this process", err, len(tasks) - done)
        pool.executor.shutdown(wait=False, cancel_futures=True)
        pool.executor = None
        yield from _in_this_process(function, tasks[done:], pool)
    finally:
        for future in futures:
            future.cancel()


def pooled_map(
    function: Callable,
    tasks: list,
    pool: Workers,
    stop: Callable[[], bool] = lambda: False,
    desc: str = "verify",
) -> list:
    """function over the tasks in order, in the pool's processes or in this one, until stop() says so: the results
    of the tasks finished by then."""
    results = []
    found = _results(function, tasks, pool)
    for result in tqdm(found, total=len(tasks), desc=desc, unit="query", leave=False):
        results.append(result)
        if stop():
            break
    found.close()
    return results


def verify_query(task: tuple[Path, list[Path]]) -> list[int]:
    """Inliers between one query and each of its candidates, from their cached local features."""
    count_inliers, verification = worker_state()
    query = load_local(task[0])
    return [count_inliers(query, load_local(path), verification) for path in task[1]]


def verification_pool(
    count_inliers: CountInliers, verification: Verification, workers: int
) -> contextlib.AbstractContextManager[Workers]:
    """Worker processes for verify_query with this rule and settings (workers <= 1: this process)."""
    return worker_pool((count_inliers, verification), workers)


def verify_all(
    tasks: list[tuple[Path, list[Path]]],
    pool: Workers,
    stop: Callable[[], bool] = lambda: False,
) -> list[list[int]]:
    """verify_query over the tasks in order until stop() says so: the results of the queries finished by then."""
    return pooled_map(verify_query, tasks, pool, stop)


def verify_batch(
    model: DelgSavedModel,
    settings: Settings,
    timing: Timing,
    pool: Workers,
    query_ids: list[str],
    db_split: str,
    candidates: list[list[str]],
) -> tuple[list[list[int]], float]:
    """Inliers of each query with each of its candidates, in order until the deadline, and the share of
    candidate images whose local features had to be extracted (the rest were cached). Features come query by
    query, so a cut leaves a prefix of queries ready to verify."""
    run = settings.run
    cache = run.work / "local"
    wanted = [
        item
        for q, cs in zip(query_ids, candidates, strict=True)
        for item in [("test", q), *((db_split, c) for c in cs)]
    ]
    began = time.monotonic()
    extracted = extract_local(model, run.data, wanted, cache, settings.extraction, run, timing.past_deadline)
    timing.add("local_features", extracted, time.monotonic() - began)
    tasks = [
        (local_path(cache, "test", q), [local_path(cache, db_split, c) for c in cs])
        for q, cs in zip(query_ids, candidates, strict=True)
    ]
    ready = next((i for i, (q, cs) in enumerate(tasks) if not all(p.is_file() for p in (q, *cs))), len(tasks))
    began = time.monotonic()
    counts = verify_all(tasks[:ready], pool, timing.past_deadline)
    timing.add("verification", sum(len(cs) for cs in candidates[: len(counts)]), time.monotonic() - began)
    trim_local_cache(cache, run.local_cache_gb)
    return counts, max(0.0, extracted - len(query_ids)) / max(1, len(wanted) - len(query_ids))
