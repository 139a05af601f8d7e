"""`python -m local_eval tune`: choose the reranking recipe by measuring it on a local competition.

    python -m local_eval tune --competition DIR --task recognition|retrieval --model MODEL --out OUT \
        [--limit-h H] [--grid GRID.json] [--overwrite] [-- extra submission/main.py flags]

It runs the submission script once as the server would (replay), reranking every query to the deepest depth of
the grid so that the script caches the local features of every pair; then it sweeps the verification settings
over those cached features (no new extraction) and the scoring settings over the verified pairs (no new
RANSAC), and scores every combination with the official-equivalent metric on Public, Private, all, and on 5
folds of all the labelled queries (Public + Private). It chooses by cross-validation and keeps the script's
defaults unless a setting beats them by more than the spread: for each fold, the setting best on the other four
(mean of their scores; exact ties: the cheapest by a fixed order of the settings) is scored on it; the chosen one
replaces the defaults only when these held-out scores beat the defaults' on the same folds by more than one
standard error (mean gain - SE > 0), and is then the setting best over all five folds. The expected score is the
mean held-out score with its standard error. The grid always holds the defaults (a --grid list without the
default value gets it added). Recognition's global stage (how a query nobody verified is scored: top-k,
non-landmark suppression) is chosen first, by the same rule on the unverified run; the verification and scoring
settings then on the verified ones; last, the chosen settings are scored with 0, 10, 30 and 100% of the queries
verified (most confident first), the regimes a time limit leaves. Verification is swept in two stages: every
matching setting x RANSAC threshold x minimum matches at the script's default iterations and confidence, then
every other iterations x confidence at the best of those. It writes OUT whole (an existing OUT only with
--overwrite):
  OUT/table.csv   one row per setting: the settings, Public / Private / all and per-fold scores, seconds per query;
  OUT/tuned.json  the chosen settings, for `submission/main.py --settings` (and replay / export bundle), with
                  what they were chosen on, the expected score with its spread and the defaults' score;
  OUT/depth.png   Public (solid) and Private (dashed) against rerank depth for the best few verification
                  settings, the choice ringed;
  OUT/global.csv  recognition: the global-stage settings scored with no query verified;
  OUT/regimes.csv the chosen settings' scores by share of queries verified.

`python -m local_eval tune-merge --tables A/table.csv B/table.csv ... --out OUT` averages the tables of several
competitions (seeds) setting by setting and chooses by the same rule, over every fold of every table (a table
written before folds existed counts as one fold, its "all" score).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import logging
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from common.cli import (
    KitArgumentParser,
    UserError,
    atomic_output_dir,
    atomic_write_text,
    check_at_least,
    check_not_an_input,
    check_output_dir,
    check_positive,
)
from local_eval import draw
from local_eval.kaggle_csv import read_solution
from local_eval.layout import nonlandmark_folder
from local_eval.metrics import (
    METRIC_NAME,
    REPORTED_SUBSETS,
    TASK_METRIC,
    global_average_precision,
    mean_average_precision,
    subsets_with_all,
)
from local_eval.replay import ScriptRun, competition_paths, replay, script_command
from local_eval.submission_script import load_submission, sibling

log = logging.getLogger("tune")
costs = sibling("costs")  # the script's cost model: seconds per item and per query, written down once

# The default grid. Verification settings are swept over cached features, scoring settings over verified pairs.
# Stage 1 sweeps matching x threshold at the first iterations and confidence; stage 2 sweeps iterations x
# confidence at stage 1's best matching and threshold (every combination of all five costs ~6x more RANSAC).
MATCHING = {"match_max_distance": [0.9, 1.1], "mutual": [True, False]}
RANSAC = {
    "ransac_threshold": [0.005, 0.01, 0.02, 0.04],
    "ransac_iterations": [1000, 300],
    "ransac_confidence": [1.0, 0.99],
}
FILTER = {"min_matches": [4, 8]}
GLOBAL = {
    "recognition": {
        "global_top_k": [1, 3, 5],
        "suppression": [True, False],
        "db_nonlandmark_k": [5, 10],
        "query_nonlandmark_k": [10],
        "query_nonlandmark_weight": [0.0, 0.5, 1.0, 1.5],
    },
    "retrieval": {  # label transfer (with a train set in the script's flags) and hubness, on the cached descriptors
        "bridge_weight": [0.0, 0.1, 0.2, 0.3],
        "bridge_k": [2, 3, 5],
        "hubness_weight": [0.0, 0.25, 0.5],
    },
}
SCORING = {
    "recognition": {
        "rerank": [0, 1, 3, 5, 10, 20],
        "top_k": [1, 3, 5, 10],
        "max_inlier_score": [10, 20, 40, 80],
        "nonlandmark_penalty": [0.0, 0.5, 1.0, 2.0],
        "calibrate": [True, False],
    },
    "retrieval": {"rerank": [0, 10, 30, 100]},
}
VERIFICATION_KEYS = [*MATCHING, *RANSAC, *FILTER]
REGIMES = (0.0, 0.1, 0.3, 1.0)  # shares of the queries verified
BEST_CURVES = 5  # verification settings drawn in depth.png
SCORE_COLUMNS = (*REPORTED_SUBSETS, "seconds_per_query")
MAX_WORKERS = 256  # processes of the verification sweep
TUNE_KIND = "tune result"  # the kind of output its kit marker records (tune and tune-merge write the same)
FOLDS = 5  # cross-validation folds over the labelled queries (Public + Private)
FOLD_SEED = 0  # the queries' fixed assignment to folds
FOLD_PREFIX = "fold_"  # a table's per-fold score columns: fold_1 ... (tune-merge: fold_<table>.<fold>)
MEASURES = (*SCORE_COLUMNS, "tables")  # a table's columns that are no setting ("tables": tune-merge's count)
# Exact ties go to the cheapest setting by the cost model: fewer candidates verified, then fewer RANSAC iterations.
TIE_ORDER = ("rerank", "ransac_iterations")


def grid_combinations(grid: dict[str, list]) -> list[dict]:
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def read_grid(path: Path | None, task: str) -> dict[str, dict[str, list]]:
    """The default grid, with any list replaced by --grid's (a JSON object of setting -> list of values), every
    value checked as submission/main.py checks the setting; the script's default added to any list without it."""
    grid = {
        "matching": dict(MATCHING),
        "ransac": dict(RANSAC),
        "filter": dict(FILTER),
        "scoring": dict(SCORING[task]),
        "global": dict(GLOBAL[task]),
    }
    if path is not None:
        read_grid_file(path, task, grid)
    return with_defaults(grid, task)


def read_grid_file(path: Path, task: str, grid: dict[str, dict[str, list]]) -> None:
    """Replace grid's lists by those of --grid's JSON object."""
    try:
        given = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--grid {path}: cannot read it as JSON ({err})") from None
    if not isinstance(given, dict):
        raise UserError(
            f"--grid {path}: expected a JSON object of setting -> list of values, "
            f'such as {{"rerank": [0, 10]}}; found {type(given).__name__} {json.dumps(given)[:40]}'
        )
    for name, values in given.items():
        part = next((part for part in grid.values() if name in part), None)
        if part is None:
            raise UserError(
                f"--grid {path}: '{name}' is not a tunable setting of {task}; "
                f"choose from {', '.join(k for part in grid.values() for k in part)}"
            )
        part[name] = grid_values(path, name, values)


@functools.cache
def script_defaults(task: str) -> dict:
    """The script's own value of every tunable setting for the task: its sections' defaults under TASK_DEFAULTS."""
    sub = load_submission()
    values = {
        f.name: f.default
        for section in (sub.Global, sub.Verification, sub.Scoring)
        for f in dataclasses.fields(section)
    }
    return {**values, **{k: v for k, v in sub.TASK_DEFAULTS[task].items() if k in values}}


def with_defaults(grid: dict[str, dict[str, list]], task: str) -> dict[str, dict[str, list]]:
    """The grid with the script's default added to each list that lacks it: every choice is weighed against them."""
    defaults = script_defaults(task)
    for part in grid.values():
        for name, values in part.items():
            if defaults[name] not in values:
                log.info("the grid's %s %s gets the script's default %s", name, values, defaults[name])
                part[name] = [*values, defaults[name]]
    return grid


def grid_values(path: Path, name: str, values) -> list:
    """--grid's list for one setting: non-empty, no repeats, each value of the setting's type and range."""
    if not isinstance(values, list) or not values:
        raise UserError(f"--grid {path}: '{name}' must be a non-empty list of values, got {json.dumps(values)}")
    sub = load_submission()
    cli = sibling("settings_cli")
    section = next(cls() for cls in sub.SECTIONS.values() if name in {f.name for f in dataclasses.fields(cls)})
    field = next(f for f in dataclasses.fields(section) if f.name == name)
    where, checked = f"--grid {path}: '{name}'", []
    for value in values:
        try:
            if value is None:  # the script reads null as "the default", which is no value to sweep
                raise sub.InputError(f"{where} must be {cli.field_type(field)[0].__name__}, got null")
            checked.append(cli.coerce(field, value, where))
            cli.check_settings(dataclasses.replace(section, **{name: checked[-1]}))
        except sub.InputError as err:
            raise UserError(str(err).replace(cli.flag(name), where)) from None
    repeated = [value for k, value in enumerate(checked) if value in checked[:k]]
    if repeated:
        raise UserError(f"--grid {path}: '{name}' lists {json.dumps(repeated[0])} more than once")
    return checked


# Verification sweep (worker processes)
def sweep_query(task: tuple[Path, list[Path]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one query and its candidates: putative matches [M, D] per matching setting, inliers [M, R, D] per
    matching x RANSAC setting, and the seconds each (matching, RANSAC) setting took [M, R] (the similarity
    matrix, computed once for all matching settings, is charged to each in full)."""
    sub = load_submission()
    matching, ransac = sibling("verifier").worker_state()
    query = sub.load_local(task[0])
    depth = len(task[1])
    matches = np.zeros((len(matching), depth), np.int64)
    inliers = np.zeros((len(matching), len(ransac), depth), np.int64)
    seconds = np.zeros((len(matching), len(ransac)))
    for d, path in enumerate(task[1]):
        other = sub.load_local(path)
        if len(query.descriptors) == 0 or len(other.descriptors) == 0:
            continue
        began = time.perf_counter()
        similarity = query.descriptors @ other.descriptors.T
        similarity_s = time.perf_counter() - began
        for m, match_setting in enumerate(matching):
            began = time.perf_counter()
            a, b = sub.matches_in(similarity, match_setting["match_max_distance"], match_setting["mutual"])
            matching_s = similarity_s + time.perf_counter() - began
            matches[m, d] = len(a)
            for r, ransac_setting in enumerate(ransac):  # min_matches is swept later: the gate (enough_matches)
                began = time.perf_counter()  # on these counts, over inliers of the lowest gate
                verification = sub.Verification(**match_setting, **ransac_setting, min_matches=4)
                inliers[m, r, d] = np.count_nonzero(sub.inlier_mask(query, other, a, b, verification))
                seconds[m, r] += matching_s + time.perf_counter() - began
    return matches, inliers, seconds


def sweep_verification(
    tasks: list[tuple[Path, list[Path]]], matching: list[dict], ransac: list[dict], workers: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(matches [Q, M, D], inliers [Q, M, R, D], seconds [M, R]) over every query's candidates."""
    verifier = sibling("verifier")
    with verifier.worker_pool((matching, ransac), workers) as pool:  # the script's verification pool
        results = verifier.pooled_map(sweep_query, tasks, pool, desc="verify sweep")
    matches = np.stack([r[0] for r in results])
    inliers = np.stack([r[1] for r in results])
    return matches, inliers, sum(r[2] for r in results)


# Scoring sweep
class Scorer:
    """The task's metric per reported subset, computed by local_eval.metrics on the submission's arrays."""

    def __init__(self, task: str, solution_path: Path, test_ids: list[str]):
        self.task, self.test_ids = task, test_ids
        self.subsets = subsets_with_all(read_solution(solution_path, task).subsets)
        self.subsets.update(query_folds(self.subsets["all"], FOLDS))

    def recognition(self, landmarks: np.ndarray, confidences: np.ndarray) -> dict[str, float]:
        # Confidences as the submission writes them (6 decimals): rounding makes ties that GAP breaks by id.
        predictions = {
            q: (int(lm), float(f"{c:.6f}"))
            for q, lm, c in zip(self.test_ids, landmarks, confidences, strict=True)
            if not np.isnan(c)
        }
        return {
            name: global_average_precision({q: predictions[q] for q in truth if q in predictions}, truth)
            for name, truth in self.subsets.items()
        }

    def retrieval(self, ranked: list[list[str]]) -> dict[str, float]:
        predictions = dict(zip(self.test_ids, ranked, strict=True))
        return {
            name: mean_average_precision({q: predictions[q] for q in truth if predictions.get(q)}, truth)
            for name, truth in self.subsets.items()
        }


def query_folds(truth: dict[str, list], folds: int, seed: int = FOLD_SEED) -> dict[str, dict[str, list]]:
    """The labelled queries dealt into `folds` folds in a fixed random order, those with ground truth first, so that
    each fold holds its share of landmark and non-landmark queries."""
    ids = sorted(truth)
    shuffled = np.random.default_rng(seed).permutation(len(ids))
    dealt = sorted(shuffled, key=lambda i: not truth[ids[i]])  # stable: the shuffle stays within each group
    return {f"{FOLD_PREFIX}{k + 1}": {ids[i]: truth[ids[i]] for i in dealt[k::folds]} for k in range(folds)}


@dataclasses.dataclass
class ExtractionRun:
    """What the extraction run left: the script's neighbours and settings, and where its caches are."""

    work: Path
    settings: object  # the script's Settings
    test_ids: list[str]
    db_ids: list[str]
    labels: np.ndarray
    candidates: object  # the script's Candidates
    timing: dict

    @property
    def neighbours(self) -> np.ndarray:
        return self.candidates.neighbours

    @property
    def query_ok(self) -> np.ndarray:
        return self.candidates.query_ok


def read_run(work: Path) -> ExtractionRun:
    sub = load_submission()
    path = work / "neighbours.npz"
    if not path.is_file():
        raise UserError(f"{path}: the extraction run left no neighbours (see its script.log)")
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    candidates = sub.Candidates(**{name: arrays[name] for name in sub.Candidates._fields})
    return ExtractionRun(
        work,
        sub.read_settings_record(work),
        arrays["test_ids"].tolist(),
        arrays["db_ids"].tolist(),
        arrays["labels"],
        candidates,
        json.loads((work / "timing.json").read_text()),
    )


@dataclasses.dataclass
class Sweep:
    """What every sweep shares: the extraction run, its scorer and grid, the verification tasks (one per readable
    query) and the pairs they verify, the worker processes and the chosen global stage."""

    run: ExtractionRun
    scorer: Scorer
    grid: dict
    tasks: list[tuple[Path, list[Path]]]
    verified: np.ndarray
    workers: int
    stage: dict


def score_table(
    sweep: Sweep,
    matching: list[dict],
    ransac: list[dict],
    matches: np.ndarray,
    inliers: np.ndarray,
    seconds: np.ndarray,
) -> pd.DataFrame:
    """One row per verification (matching x RANSAC x filter) x scoring setting."""
    run, scorer, grid, verified, stage = sweep.run, sweep.scorer, sweep.grid, sweep.verified, sweep.stage
    scoring_grid = grid_combinations(grid["scoring"])
    if not run.candidates.query_nonlandmark.shape[1]:  # no distractor set: the penalty changes nothing
        default = script_defaults(scorer.task)["nonlandmark_penalty"]
        scoring_grid = [s for s in scoring_grid if s.get("nonlandmark_penalty", default) == default]
    local_rate = costs.rate(run.timing["stages"]["local_features"]) or 0.0
    rows = []
    combos = list(itertools.product(range(len(matching)), range(len(ransac)), grid_combinations(grid["filter"])))
    for m, r, filter_setting in tqdm(combos, desc="score sweep", unit="verification"):
        gate = load_submission().enough_matches(matches[:, m], filter_setting["min_matches"])
        counts = np.where(gate, inliers[:, m, r], 0)
        counts = np.where(verified, counts, -1)
        verification = {**matching[m], **ransac[r], **filter_setting}
        for scoring in scoring_grid:
            depth = min(scoring["rerank"], counts.shape[1])
            at_depth = np.where(np.arange(counts.shape[1]) < depth, counts, -1)
            scores = score_one(run, scorer, at_depth, scoring, stage)
            rows.append(
                {
                    **verification,
                    **scoring,
                    **scores,
                    "seconds_per_query": query_seconds(run, depth, seconds[m, r], local_rate, verified),
                }
            )
    return pd.DataFrame(rows)


def score_one(
    run: ExtractionRun, scorer: Scorer, inliers: np.ndarray, scoring: dict, stage: dict | None = None
) -> dict:
    """The scores of one setting, computed by the script's own functions on the candidates it would have:
    recognition searches max(top_k, global top-k, depth) neighbours."""
    sub = load_submission()
    c = run.candidates
    if scorer.task == "recognition":
        settings = dataclasses.replace(run.settings.scoring, **{k: v for k, v in scoring.items() if k != "rerank"})
        global_stage = dataclasses.replace(run.settings.global_stage, **(stage or {}))
        k = min(max(settings.top_k, global_stage.global_top_k, scoring["rerank"]), c.cosines.shape[1])
        found = c._replace(cosines=c.cosines[:, :k], neighbours=c.neighbours[:, :k])
        landmarks, confidences = sub.recognition_predictions(
            found, unverified_beyond(inliers, k), run.labels, global_stage, settings
        )
        return scorer.recognition(landmarks, confidences)
    order = sub.retrieval_order(c.cosines, inliers)
    ranked = np.take_along_axis(c.neighbours, order, 1)
    return scorer.retrieval(
        [[run.db_ids[j] for j in row] if ok else [] for row, ok in zip(ranked, c.query_ok, strict=True)]
    )


def unverified_beyond(inliers: np.ndarray, width: int) -> np.ndarray:
    """inliers [Q, D] as [Q, width]: cut, or padded with -1 (not verified) past the depth the sweep verified."""
    if inliers.shape[1] >= width:
        return inliers[:, :width]
    return np.pad(inliers, ((0, 0), (0, width - inliers.shape[1])), constant_values=-1)


def global_table(run: ExtractionRun, scorer: Scorer, grid: dict, job: Job) -> pd.DataFrame:
    """The global-stage settings scored on the unverified run (every query global-only): recognition's on its
    candidates, retrieval's (label transfer, hubness) on candidates searched again from the cached descriptors."""
    if scorer.task == "retrieval":
        return retrieval_global_table(run, scorer, grid, job)
    unverified = np.full(run.neighbours.shape, -1)
    rows = []
    for stage in grid_combinations(grid["global"]):
        scores = score_one(run, scorer, unverified, {"rerank": 0}, stage)
        rows.append({**stage, **scores})
    return pd.DataFrame(rows)


def retrieval_global_table(run: ExtractionRun, scorer: Scorer, grid: dict, job: Job) -> pd.DataFrame:
    """Retrieval's global-stage settings, each through the script's global stage (global_candidates) on the
    extraction run's cached descriptors and train set, scored global-only."""
    sub = load_submission()
    bridge = sibling("bridge")
    data, _ = competition_paths(job.competition, job.task)
    script = ScriptRun(job.task, data, job.model, run.work, job.limit_h, job.script_args, nonlandmark_dir(job))
    settings = sub.parse_settings([*script_command(script, run.work)[2:], "--plan", "fixed"])
    inputs = sub.read_inputs(settings.run)
    timing = sibling("budget").Timing(run.work / "tune_global_timing.json", job.task, settings.budget)
    train = bridge.load_train_descriptors(settings, settings.extraction, timing)
    models = sub.load_models(settings.run, settings.extraction)
    found = sub.global_pass(models, inputs, settings, timing, 0.0)  # every descriptor is cached: nothing extracted
    found = found._replace(train=found.train if train is None else train)
    rows = []
    for stage in grid_combinations(grid["global"]):
        copies = found._replace(
            db=found.db.copy(),  # whitening works in place
            queries=found.queries.copy(),
            nonlandmarks=found.nonlandmarks.copy(),
            train=None if found.train is None else found.train._replace(descriptors=found.train.descriptors.copy()),
        )
        staged = dataclasses.replace(settings, global_stage=dataclasses.replace(settings.global_stage, **stage))
        c = sub.global_candidates(copies, len(inputs.db_ids), staged, timing)
        ranked = [
            [inputs.db_ids[j] for j in row] if ok else [] for row, ok in zip(c.neighbours, c.query_ok, strict=True)
        ]
        rows.append({**stage, **scorer.retrieval(ranked)})
    return pd.DataFrame(rows)


def nonlandmark_dir(job: Job) -> Path | None:
    distractors = nonlandmark_folder(job.competition)
    return distractors.resolve() if distractors.is_dir() else None


def regimes(run: ExtractionRun, scorer: Scorer, inliers: np.ndarray, scoring: dict, stage: dict) -> pd.DataFrame:
    """The chosen settings' scores with 0, 10, 30, 100% of the readable queries verified, most confident first
    (the order the script reranks in), the rest global-only: what a time limit that stops verification leaves."""
    sub = load_submission()
    depth = min(scoring["rerank"], inliers.shape[1])
    inliers = unverified_beyond(inliers, run.neighbours.shape[1])
    at_depth = np.where(np.arange(inliers.shape[1]) < depth, inliers, -1)
    unverified = np.full(at_depth.shape, -1)
    if scorer.task == "recognition":
        settings = dataclasses.replace(run.settings.scoring, **{k: v for k, v in scoring.items() if k != "rerank"})
        global_stage = dataclasses.replace(run.settings.global_stage, **stage)
        priority = sub.recognition_predictions(run.candidates, unverified, run.labels, global_stage, settings)[1]
    else:
        priority = run.candidates.cosines[:, 0]
    order = sub.rerank_order(priority, run.query_ok)
    rows = []
    for share in REGIMES:
        cut = unverified.copy()
        chosen = order[: round(share * len(order))]
        cut[chosen] = at_depth[chosen]
        scores = score_one(run, scorer, cut, scoring, stage)
        rows.append(
            {"verified_share": share, "queries_verified": len(chosen), **{s: scores[s] for s in REPORTED_SUBSETS}}
        )
    return pd.DataFrame(rows)


def query_seconds(
    run: ExtractionRun, depth: int, verify_seconds: float, local_rate: float, verified: np.ndarray
) -> float:
    """Seconds per query of reranking at this depth: local features of the query and its new candidates, and
    verification at the measured rate of this setting (the sweep verified `verified` pairs with it)."""
    readable = np.flatnonzero(run.query_ok)
    if depth == 0 or not len(readable):
        return 0.0
    new_image_share = len(np.unique(run.neighbours[readable, :depth])) / (len(readable) * depth)
    per_pair = costs.rate({"items": np.count_nonzero(verified), "seconds": verify_seconds}) or 0.0
    pair_share = np.count_nonzero(verified[readable, :depth]) / (len(readable) * depth)
    return costs.rerank_seconds_per_query(local_rate, per_pair * pair_share, depth, new_image_share)


def fold_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith(FOLD_PREFIX)]


def setting_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in MEASURES and not c.startswith(FOLD_PREFIX)]


def fold_scores(table: pd.DataFrame) -> np.ndarray:
    """[settings, folds] of the folds that hold a score (a fold with no landmark query has no GAP): at least two."""
    if table.empty:
        raise UserError("no setting was scored: nothing to choose from")
    scores = table[fold_columns(table)].to_numpy(float)
    scores = scores[:, ~np.isnan(scores).any(axis=0)]
    if scores.shape[1] < 2:
        raise UserError(
            f"fewer than 2 folds hold a score ({', '.join(fold_columns(table)) or 'no fold columns'}): "
            "too few labelled queries to cross-validate"
        )
    return scores


def best_position(table: pd.DataFrame, scores: np.ndarray, defaults: dict | None = None) -> int:
    """The row with the best score; among equals the cheapest by a fixed order of the settings, never by measured
    time (which load moves), so that the same table always gives the same choice: TIE_ORDER first, then (given
    the script's defaults) the fewest settings away from them, then the other settings' values, smallest first, in
    the table's column order. A setting the table cannot tell apart stays at its default: on a local competition
    every query is verified, so --calibrate (which only rescales unverified queries) always ties, and the smallest
    value, off, would ship a setting that loses when the server's budget leaves queries unverified."""
    best = np.flatnonzero(scores >= np.max(scores) - 1e-12)
    settings = setting_columns(table)
    cost = [c for c in TIE_ORDER if c in settings]
    rest = [c for c in settings if c not in TIE_ORDER]
    candidates = table.iloc[best].reset_index(drop=True)
    away = [c for c in rest if c in (defaults or {})]
    candidates["_away"] = (candidates[away] != pd.Series({c: defaults[c] for c in away})).sum(axis=1) if away else 0
    return int(best[candidates.sort_values([*cost, "_away", *rest], kind="stable").index[0]])


def choose(table: pd.DataFrame, defaults: dict | None = None) -> pd.Series:
    """The setting best over all the folds (the mean of their scores), no matter the defaults (which only break
    exact ties, see best_position)."""
    return table.iloc[best_position(table, fold_scores(table).mean(axis=1), defaults)]


def default_position(table: pd.DataFrame, defaults: dict) -> int:
    """The row of the script's defaults (over the table's setting columns)."""
    keys = [c for c in setting_columns(table) if c in defaults]
    match = np.logical_and.reduce([(table[k] == defaults[k]).to_numpy() for k in keys])
    if not match.any():
        raise UserError(
            "no row holds the script's defaults ("
            + ", ".join(f"{k} {defaults[k]}" for k in keys)
            + "): the tables were tuned on a grid without them; tune again (tune adds them to any grid)"
        )
    return int(np.flatnonzero(match)[0])


def mean_error(values: np.ndarray) -> dict[str, float]:
    """The mean of per-fold values and its standard error."""
    return {"mean": float(np.mean(values)), "standard_error": float(np.std(values, ddof=1) / np.sqrt(len(values)))}


@dataclasses.dataclass
class Choice:
    """A choice by cross-validation: the chosen row, the defaults' row, and the held-out evidence per fold."""

    row: pd.Series
    defaults: pd.Series
    held_out: np.ndarray  # the score of the setting best on the other folds, on this one
    default_scores: np.ndarray  # the defaults' score on this fold

    @property
    def gain(self) -> dict[str, float]:
        return mean_error(self.held_out - self.default_scores)

    @property
    def beats_defaults(self) -> bool:
        return self.gain["mean"] - self.gain["standard_error"] > 0

    def summary(self) -> dict:
        """What tuned.json records: the rule's evidence, the expected score with its spread, the defaults'."""
        expected = self.held_out if self.beats_defaults else self.default_scores
        return {
            "folds": len(self.held_out),
            "kept_defaults": not self.beats_defaults,
            "expected": mean_error(expected),
            "held_out_gain": self.gain,
            "held_out": [round(float(v), 6) for v in self.held_out],
            "defaults": {
                **mean_error(self.default_scores),
                **{subset: native(self.defaults[subset]) for subset in REPORTED_SUBSETS},
            },
        }


def choose_honestly(table: pd.DataFrame, defaults: dict) -> Choice:
    """Cross-validated over the table's folds: the setting best over all the folds if the setting best on the other
    folds beats the defaults on each held-out fold by more than the spread (mean gain - standard error > 0);
    otherwise the defaults."""
    scores = fold_scores(table)
    default = default_position(table, defaults)
    held_out = np.array(
        [
            scores[best_position(table, np.delete(scores, f, axis=1).mean(axis=1), defaults), f]
            for f in range(scores.shape[1])
        ]
    )
    choice = Choice(table.iloc[default], table.iloc[default], held_out, scores[default])
    if choice.beats_defaults:
        choice.row = table.iloc[best_position(table, scores.mean(axis=1), defaults)]
    return choice


def tuned_settings(row: pd.Series, task: str, extraction: dict, about: dict) -> dict:
    """tuned.json: the sections submission/main.py --settings reads, and what they were chosen on."""
    sub = load_submission()
    sections = {}
    for section in ("verification", "scoring"):
        names = {f.name for f in dataclasses.fields(sub.SECTIONS[section])}
        sections[section] = {k: native(row[k]) for k in row.index if k in names}
    return {"extraction": extraction, **sections, "about": about}


def native(value):
    """A numpy scalar as the JSON value it stands for."""
    return value.item() if hasattr(value, "item") else value


def depth_picture(table: pd.DataFrame, task: str, out: Path, chosen: pd.Series) -> None:
    """Public (solid) and Private (dashed) against rerank depth for the best few verification settings (by the mean
    over the folds), each in its own colour and marker, named by the settings in which they differ (the rest in a
    note); at each depth the scoring setting best over the folds; the chosen setting ringed."""
    table = table.assign(cv=fold_scores(table).mean(axis=1))
    best = table.groupby(VERIFICATION_KEYS)["cv"].max().sort_values(ascending=False).head(BEST_CURVES)
    keys = pd.DataFrame(list(best.index), columns=VERIFICATION_KEYS)
    differing = [k for k in VERIFICATION_KEYS if keys[k].nunique() > 1]
    shared = ", ".join(f"{k}={native(keys[k].iloc[0])}" for k in VERIFICATION_KEYS if k not in differing)
    series, styles = {}, []
    for index, key in enumerate(best.index):
        rows = table[(table[VERIFICATION_KEYS] == pd.Series(key, index=VERIFICATION_KEYS)).all(axis=1)]
        per_depth = rows.loc[rows.groupby("rerank")["cv"].idxmax()]
        setting = dict(zip(VERIFICATION_KEYS, key, strict=True))
        label = ", ".join(f"{k}={native(setting[k])}" for k in differing) or "the one verification setting"
        colour, marker, _ = draw.series_style(index)
        for subset, dash in (("public", ()), ("private", draw.SERIES_DASHES[1])):
            series[f"{subset.capitalize()}: {label}"] = list(
                zip(per_depth["rerank"].tolist(), per_depth[subset].tolist(), strict=True)
            )
            styles.append((colour, marker, dash))
    metric = METRIC_NAME[TASK_METRIC[task]]
    marked = (
        native(chosen["rerank"]),
        native(chosen["public"]),
        f"chosen: rerank {native(chosen['rerank'])}, "
        + ", ".join(f"{k}={native(chosen[k])}" for k in differing)
        + f" (Public {chosen['public']:.4f}, Private {chosen['private']:.4f})",
    )
    draw.save_png(
        draw.line_chart(
            series,
            f"{task}: {metric} by rerank depth, Public solid, Private dashed (per "
            "depth the scoring best over the folds)",
            "rerank depth",
            metric,
            marked=marked,
            note=f"every curve: {shared}" if shared else None,
            styles=styles,
        ),
        out / "depth.png",
    )


def sweep_stage(sweep: Sweep, matching: list[dict], ransac: list[dict]) -> pd.DataFrame:
    """Verify every pair with each matching x RANSAC setting, then score every scoring setting on the result."""
    run = sweep.run
    matches, inliers, seconds = sweep_verification(sweep.tasks, matching, ransac, sweep.workers)
    readable = np.flatnonzero(run.query_ok)
    all_matches = np.zeros((len(run.test_ids), *matches.shape[1:]), matches.dtype)
    all_inliers = np.zeros((len(run.test_ids), *inliers.shape[1:]), inliers.dtype)
    all_matches[readable], all_inliers[readable] = matches, inliers
    return score_table(sweep, matching, ransac, all_matches, all_inliers, seconds)


def stages(grid: dict, task: str) -> tuple[list[dict], list[dict]]:
    """Stage 1's (matching, RANSAC) lists: every matching x threshold, at the script's default iterations and
    confidence (so that the defaults' row is always scored)."""
    defaults = script_defaults(task)
    first = {name: [defaults[name]] for name in grid["ransac"] if name != "ransac_threshold"}
    return (
        grid_combinations(grid["matching"]),
        grid_combinations({"ransac_threshold": grid["ransac"]["ransac_threshold"], **first}),
    )


def second_stage(grid: dict, best: pd.Series, task: str) -> tuple[list[dict], list[dict]]:
    """Stage 2's lists: the best matching and threshold, every other iterations x confidence."""
    matching = [{name: native(best[name]) for name in grid["matching"]}]
    ransac = grid_combinations(
        {
            "ransac_threshold": [native(best["ransac_threshold"])],
            **{name: values for name, values in grid["ransac"].items() if name != "ransac_threshold"},
        }
    )
    first = {name: script_defaults(task)[name] for name in grid["ransac"] if name != "ransac_threshold"}
    return matching, [r for r in ransac if any(r[name] != value for name, value in first.items())]


@dataclasses.dataclass(frozen=True)
class Job:
    """What tune runs: the competition, task and model, the extraction run's limit and extra script flags, and the
    verification sweep's worker processes."""

    competition: Path
    task: str
    model: Path
    limit_h: float
    script_args: list[str]
    workers: int


def tune(job: Job, out: Path, grid_path: Path | None, overwrite: bool = False) -> dict:
    """Extract once, choose the global stage, sweep verification and scoring, score the regimes; write OUT
    (table.csv, tuned.json, depth.png, global.csv, regimes.csv, run/) whole or not at all; returns the chosen row
    with its scores. An existing OUT is replaced only with overwrite."""
    grid = read_grid(grid_path, job.task)
    _, solution = competition_paths(job.competition, job.task)
    check_not_an_input(
        "--out", out, [("--competition", job.competition), ("--model", job.model), ("--grid", grid_path)]
    )
    with atomic_output_dir(out, overwrite, kind=TUNE_KIND) as tmp:
        result = sweep_all(job, tmp, grid, solution)
        write_choice(
            tmp,
            result["table"],
            result["choice"],
            job.task,
            result["extraction"],
            {
                "competition": str(job.competition),
                "task": job.task,
                "model": str(job.model),
                "regimes": result["regimes"].to_dict(orient="records"),
            },
            result["global_stage"],
            result["global_choice"],
        )
    return result


def sweep_all(job: Job, out: Path, grid: dict, solution: Path) -> dict:
    """The extraction run in out/run, then both sweeps: the table, its chosen row, the run's extraction settings."""
    competition, task, model, workers = job.competition, job.task, job.model, job.workers
    max_depth = max(grid["scoring"]["rerank"])
    extra = [*job.script_args, "--rerank", str(max_depth), "--plan", "fixed"]  # replay adds the distractor folder
    if task == "recognition":  # the neighbours of the largest top-k are searched once
        extra += [
            "--top-k",
            str(max(grid["scoring"]["top_k"])),
            "--global-top-k",
            str(max(grid["global"]["global_top_k"])),
            "--db-nonlandmark-k",
            str(max(grid["global"]["db_nonlandmark_k"])),
            "--query-nonlandmark-k",
            str(max(grid["global"]["query_nonlandmark_k"])),
        ]
    report = replay(competition, task, model, out / "run", job.limit_h, extra)
    if report["status"] != "ok":
        last = report.get("log_tail", "").strip().splitlines()[-1:] or ["no log"]
        raise UserError(f"the extraction run ended '{report['status']}': {last[0]}")
    run = read_run(out / "run" / "work")
    tasks, verified = pair_tasks(run, max_depth)
    if not tasks:
        raise UserError(f"{competition}: no test image of the extraction run was readable; nothing to tune on")
    scorer = Scorer(task, solution, run.test_ids)
    stage, global_choice = {}, None
    if grid["global"]:
        global_rows = global_table(run, scorer, grid, job)
        global_choice = choose_honestly(global_rows, script_defaults(task))
        stage = {k: native(v) for k, v in global_choice.row.items() if k in grid["global"]}
        atomic_write_text(out / "global.csv", global_rows.to_csv(index=False))
    shared = Sweep(run, scorer, grid, tasks, verified, workers, stage)
    table = sweep_stage(shared, *stages(grid, task))
    matching, ransac = second_stage(grid, choose(table, script_defaults(task)), task)
    if ransac:
        table = pd.concat([table, sweep_stage(shared, matching, ransac)], ignore_index=True)
    choice = choose_honestly(table, script_defaults(task))
    chosen = choice.row
    regime_table = regimes(
        run,
        scorer,
        chosen_inliers(run, tasks, verified, chosen, workers),
        {k: native(chosen[k]) for k in grid["scoring"]},
        stage,
    )
    atomic_write_text(out / "regimes.csv", regime_table.to_csv(index=False))
    extraction = json.loads((run.work / "settings.json").read_text())["extraction"]
    return {
        "choice": choice,
        "chosen": chosen,
        "table": table,
        "extraction": extraction,
        "global_stage": stage,
        "global_choice": global_choice,
        "regimes": regime_table,
    }


def chosen_inliers(
    run: ExtractionRun, tasks: list, verified: np.ndarray, chosen: pd.Series, workers: int
) -> np.ndarray:
    """Inliers [Q, D] of every cached pair under the chosen verification setting (-1: not verified)."""
    matching = [{name: native(chosen[name]) for name in MATCHING}]
    ransac = [{name: native(chosen[name]) for name in RANSAC}]
    matches, inliers, _ = sweep_verification(tasks, matching, ransac, workers)
    counts = np.full(verified.shape, -1, np.int64)
    readable = np.flatnonzero(run.query_ok)
    gate = load_submission().enough_matches(matches[:, 0], native(chosen["min_matches"]))
    counts[readable] = np.where(gate, inliers[:, 0, 0], 0)
    return counts


def chosen_on(table: pd.DataFrame) -> str:
    folds = len(fold_scores(table).T)
    if "tables" in table.columns:
        return f"cross-validation over the {folds} folds of {int(table['tables'].iloc[0])} tables (tune-merge)"
    return f"{folds}-fold cross-validation over the labelled queries (Public + Private)"


def write_choice(
    out: Path,
    table: pd.DataFrame,
    choice: Choice,
    task: str,
    extraction: dict,
    about: dict,
    global_stage: dict | None = None,
    global_choice: Choice | None = None,
) -> None:
    """table.csv, tuned.json (the chosen settings, the global stage's, what they were chosen on, the expected score
    with its spread and the defaults' score) and depth.png into out."""
    chosen = choice.row
    about = {
        **about,
        "chosen_on": chosen_on(table),
        "metric": METRIC_NAME[TASK_METRIC[task]],
        **{subset: native(chosen[subset]) for subset in REPORTED_SUBSETS},
        **choice.summary(),
        "seconds_per_query": native(chosen["seconds_per_query"]),
        "settings_rows": len(table),
    }
    if global_choice is not None:
        about["global_stage_choice"] = global_choice.summary()
    tuned = tuned_settings(chosen, task, extraction, about)
    if global_stage:
        tuned["global_stage"] = global_stage
    atomic_write_text(out / "table.csv", table.to_csv(index=False))
    atomic_write_text(out / "tuned.json", json.dumps(tuned, indent=1) + "\n")
    depth_picture(table, task, out, chosen)


def pair_tasks(run: ExtractionRun, max_depth: int) -> tuple[list[tuple[Path, list[Path]]], np.ndarray]:
    """(one (query features, candidate features) task per readable query, verified mask [Q, D]: the pairs whose
    features the extraction run cached)."""
    sub = load_submission()
    db_split, query_split = sub.IMAGE_SPLITS[run.settings.run.task]
    cache = run.work / "local"
    depth = min(max_depth, run.neighbours.shape[1])
    verified = np.zeros((len(run.test_ids), depth), bool)
    tasks = []
    for q in np.flatnonzero(run.query_ok):
        query = sub.local_path(cache, query_split, run.test_ids[q])
        candidates = [sub.local_path(cache, db_split, run.db_ids[j]) for j in run.neighbours[q, :depth]]
        if not query.is_file() or not all(path.is_file() for path in candidates):
            raise UserError(
                f"{cache}: local features of query {run.test_ids[q]} or its candidates are missing "
                "(the extraction run was cut short, or --local-cache-gb trimmed them)"
            )
        verified[q] = True
        tasks.append((query, candidates))
    return tasks, verified


def format_summary(result: dict, task: str, out: Path) -> str:
    choice, metric, table = result["choice"], METRIC_NAME[TASK_METRIC[task]], result["table"]
    chosen, summary = choice.row, choice.summary()
    settings = ", ".join(f"{k} {native(chosen[k])}" for k in setting_columns(table))
    expected, gain, defaults = summary["expected"], summary["held_out_gain"], summary["defaults"]
    verdict = (
        "the script's defaults kept: nothing beats them by more than the spread"
        if summary["kept_defaults"]
        else "beats the script's defaults by more than the spread"
    )
    return "\n".join(
        [
            f"{task}: {len(table)} settings scored; chosen by {chosen_on(table)}; {verdict}:",
            f"  {settings}",
            f"  {metric} public {chosen['public']:.4f} | private {chosen['private']:.4f} | all {chosen['all']:.4f}"
            f" ({chosen['seconds_per_query']:.3f} s per query here)",
            f"  expected {metric} (held-out folds) {expected['mean']:.4f} +- {expected['standard_error']:.4f};"
            f" the defaults {defaults['mean']:.4f} +- {defaults['standard_error']:.4f} (public {defaults['public']:.4f}"
            f" | private {defaults['private']:.4f}); held-out gain of tuning {gain['mean']:+.4f} +- "
            f"{gain['standard_error']:.4f}",
            *([f"  global stage (unverified queries): {result['global_stage']}"] if result.get("global_stage") else []),
            *(
                [
                    "  by share of queries verified: "
                    + ", ".join(
                        f"{r['verified_share']:.0%} {r['public']:.4f}/{r['private']:.4f}"
                        for _, r in result["regimes"].iterrows()
                    )
                    + " (public/private)"
                ]
                if result.get("regimes") is not None
                else []
            ),
            f"  {out / 'table.csv'}, {out / 'tuned.json'}, {out / 'depth.png'}",
            f"  next: python -m local_eval replay ... -- --settings {out / 'tuned.json'}",
        ]
    )


def split_script_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    argv = list(argv or [])
    split = argv.index("--") if "--" in argv else len(argv)
    return argv[:split], argv[split + 1 :]


def main(argv: list[str] | None = None) -> int:
    own, script_args = split_script_args(argv)
    parser = KitArgumentParser(
        prog="python -m local_eval tune",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags after `--` go to submission/main.py for the extraction run. "
        f"The choice: {FOLDS}-fold cross-validation over the labelled queries "
        "(Public + Private); the script's defaults unless the held-out gain "
        "minus its standard error is above 0.",
    )
    parser.add_argument("--competition", required=True, type=Path, help="folder written by `local_eval build`")
    parser.add_argument("--task", required=True, choices=sorted(SCORING))
    parser.add_argument("--model", required=True, type=Path, help="exported DELG SavedModel folder")
    parser.add_argument("--out", required=True, type=Path, help="folder for table.csv, tuned.json, depth.png, run/")
    parser.add_argument(
        "--limit-h",
        type=float,
        default=2.0,
        help="wall-clock limit of the extraction run, in hours (default %(default)s)",
    )
    parser.add_argument(
        "--grid",
        type=Path,
        default=None,
        help="JSON object: setting -> list of values, replacing the default grid's list (the "
        "script's default is added to a list without it)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=multiprocessing.cpu_count(),
        help="processes of the verification sweep (default: the cores)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT written by the kit")
    args = parser.parse_args(own)
    check_positive("--limit-h", args.limit_h)
    check_at_least("--workers", args.workers, 1)
    if args.workers > MAX_WORKERS:  # a pool of that many forked processes would bring the machine down
        raise UserError(f"--workers must be at most {MAX_WORKERS}, got {args.workers}")
    check_output_dir(args.out, args.overwrite, kind=TUNE_KIND)  # before the grid is read and the script loaded
    job = Job(args.competition, args.task, args.model, args.limit_h, script_args, args.workers)
    result = tune(job, args.out, args.grid, args.overwrite)
    print(format_summary(result, args.task, args.out))
    return 0


def merge_tables(paths: list[Path], task: str) -> pd.DataFrame:
    """Mean scores and seconds per setting over several tables (competitions of other seeds), with every table's
    folds side by side (fold_<table>.<fold>; a table without folds gives its "all" score as one); only the settings
    every table holds (a table may have swept a narrower grid), and at least one."""
    tables = [read_table(path, task) for path in paths]
    keys = setting_columns(tables[0])
    units = []
    for number, table in enumerate(tables, 1):
        folds = fold_columns(table) or ["all"]
        renamed = {c: f"{FOLD_PREFIX}{number}.{c.removeprefix(FOLD_PREFIX)}" for c in folds}
        units += renamed.values()
        tables[number - 1] = pd.concat([table[[*keys, *SCORE_COLUMNS]], table[folds].rename(columns=renamed)], axis=1)
    merged = (
        pd.concat(tables)
        .groupby(keys, dropna=False, sort=False)
        .agg(**{c: (c, "mean") for c in [*SCORE_COLUMNS, *units]}, tables=("public", "size"))
    )
    common = merged[merged["tables"] == len(tables)].reset_index()
    if common.empty:
        raise UserError(
            f"{paths[0]} and the other tables share no setting: they were tuned on different grids; "
            "merge tables of one grid (or of grids that overlap)"
        )
    if len(common) < len(merged):
        log.warning("%d of %d settings are not in every table and are left out", len(merged) - len(common), len(merged))
    return common


def read_table(path: Path, task: str) -> pd.DataFrame:
    """A table.csv written by tune (or tune-merge) for this task: its settings columns, scores that are numbers."""
    try:
        table = pd.read_csv(path, keep_default_na=False)  # an empty or "n/a" score is shown as written
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read it as a tune table ({str(err).splitlines()[0]})") from None
    settings = [*VERIFICATION_KEYS, *SCORING[task]]
    expected = {*settings, *SCORE_COLUMNS}
    missing = expected - set(table.columns)
    extra = set(table.columns) - expected - {"tables", *fold_columns(table)}
    if missing or extra:
        other = next((t for t in SCORING if t != task and set(SCORING[t]) <= set(table.columns)), None)
        raise UserError(
            f"{path}: not a {task} tune table"
            + (f" (a {other} one)" if other else "")
            + f"; expected the columns {','.join([*settings, *SCORE_COLUMNS])}"
        )
    if table.empty:
        raise UserError(f"{path}: a tune table with no rows")
    for column in SCORE_COLUMNS:
        values = pd.to_numeric(table[column], errors="coerce")
        if values.isna().any():
            line = int(values.isna().to_numpy().argmax()) + 2
            raise UserError(f"{path}, line {line}: {column} {str(table[column].iloc[line - 2])!r} is not a number")
        low, high = (0, 1) if column in REPORTED_SUBSETS else (0, np.inf)  # GAP and mAP@100 are shares
        outside = ~values.between(low, high) | ~np.isfinite(values)
        if outside.any():
            line = int(outside.to_numpy().argmax()) + 2
            raise UserError(
                f"{path}, line {line}: {column} {str(table[column].iloc[line - 2])!r} is outside "
                f"[{low}, {high}]: no {column} score; was the table edited?"
            )
    folds = fold_columns(table)  # a fold with no landmark query has no score: empty, read as NaN
    table[folds] = table[folds].apply(lambda column: pd.to_numeric(column.replace("", "nan"), errors="coerce"))
    return table


def main_merge(argv: list[str] | None = None) -> int:
    parser = KitArgumentParser(
        prog="python -m local_eval tune-merge",
        description="average tune tables of several competitions and choose by "
        "cross-validation over every table's folds, keeping the script's "
        "defaults unless a setting beats them by more than the spread",
    )
    parser.add_argument("--tables", required=True, nargs="+", type=Path, help="table.csv files written by tune")
    parser.add_argument("--task", required=True, choices=sorted(SCORING))
    parser.add_argument("--out", required=True, type=Path, help="folder for the merged table.csv and tuned.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT written by the kit")
    args = parser.parse_args(argv)
    check_not_an_input("--out", args.out, [("--tables", table) for table in args.tables])
    check_output_dir(args.out, args.overwrite, kind=TUNE_KIND)
    table = merge_tables(args.tables, args.task)
    choice = choose_honestly(table, script_defaults(args.task))
    with atomic_output_dir(args.out, args.overwrite, kind=TUNE_KIND) as tmp:
        write_choice(tmp, table, choice, args.task, {}, {"tables": [str(p) for p in args.tables], "task": args.task})
    print(format_summary({"choice": choice, "table": table}, args.task, args.out))
    return 0
