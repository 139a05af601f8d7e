"""Landmark recognition / retrieval submission: DELG global kNN, a global stage, then local reranking inside a
time budget.

One script, with the .py files beside it: it runs as a script, not pasted into a notebook cell (it imports its
siblings from its own folder, found through __file__, which a cell does not have). On Kaggle, `python -m export
bundle` ships it as submission/main.py with its siblings, and the bundle's kernel.py (the notebook's code file, a
Kaggle "script" kernel) installs pydegensac's wheel and runs it as a process on the server's paths:

    python /kaggle/input/DATASET/submission/main.py --task recognition --data /kaggle/input/landmark-recognition-2021 \
        --model /kaggle/input/DATASET/delg --out /kaggle/working/submission.csv --time-budget-h 9 [--settings ...]

Anywhere else, run it the same way: python submission/main.py --task ... --data DIR --model DIR --out FILE.

It reads top to bottom: 1. settings, 2. inputs, 3. global descriptors, 4. nearest neighbours, 5. the global stage
(whitening, non-landmark suppression, query expansion, database augmentation, SuperGlobal reranking), 6. local
features and verification, 7. scoring, 8. main. Only numpy, pandas, tensorflow, pydegensac, scikit-learn, tqdm,
Pillow and the standard library are used. The machinery lives beside it: costs.py (the cost model: each stage's
units, rates and bytes), competitions.py (each competition's sizes, limit and machine), budget.py (the plan),
devices.py (a model per device), probing.py (--probe), savedmodel.py (the DELG SavedModel contract, loading
errors), store.py (decoding, caches), search.py (exact kNN), verifier.py (verification in worker processes),
files.py (input checks, --out, --work and its lock, the run's records), bridge.py (retrieval through the
labelled train set: label transfer, hubness), settings.py (the sections, the task
defaults and presets: the bottom of submission/, importing no other file of it but costs.py and settings_cli.py)
and settings_cli.py (settings as flags and files).

Settings come in small sections (extraction, global, verification, scoring, budget), each a dataclass whose
fields are also the flags. They are layered: the script's defaults, then --preset, then the --settings file,
then the flags given on the command line. WORK/settings.json records what a run used and where each value
came from; give it back as --settings to run the same way again.

Files it leaves: --out, written once, atomically, by a finished run (a run the deadline cut short finishes too):
a failure, Ctrl-C or a crash leaves an earlier --out as it was. WORK/submission_latest.csv holds the newest
intermediate result (all-empty once the inputs and the models are checked, then global-only, then the reranked
result every --write-every-s seconds). WORK/settings.json, WORK/timing.json (items and seconds per stage, the
plan of the database pass, the versions it ran with), WORK/submission_global_only.csv,
WORK/neighbours.npz (every query's candidates, their scores and non-landmark cosines), WORK/verified_pairs.csv
(id, rank, candidate, cosine, inliers of every verified pair), and its caches: WORK/global/m<i>/<split>/chunk_*.npz
(per model, resumable) and WORK/local/<split>/<id>.npz, each deleted when its key in WORK/cache_key.json (the
models' files and the settings the features depend on) no longer matches; a chunk or a feature file is also
redone when its image's size or modification time changed since. A run holds WORK/.lock while it lasts: a
second run on the same --work stops with an error. docs/robustness.md lists what it guarantees under faults.

The kit (local_eval: replay, tune, show; tests and benches) imports only the names in __all__, at the bottom.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pydegensac
from sklearn.isotonic import IsotonicRegression

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the files shipped beside this one
from bridge import (  # noqa: E402
    TrainSet,
    bridge_depth,
    bridge_rerank,
    load_train_descriptors,
    train_file_labels,
    train_pass,
)
from budget import (  # noqa: E402
    Timing,
    database_stop_rule,
    deepest_rerank,
    ladder,
    plan_depth,
    plan_memory,
    plan_run,
    run_work,
)
from costs import (  # noqa: E402
    DBA_BLOCK,
    KNN_DB_CHUNK,
    KNN_Q_BLOCK,
    TIMING_STAGES,
    Sizes,
    Work,
    knn_products,
    project_seconds,
    rerank_seconds_per_query,
    stage_units,
)
from devices import Models, Replicas, chosen_devices, split_cpu  # noqa: E402
from files import (  # noqa: E402
    Inputs,
    append_verified_pairs,
    check_columns,
    check_ids,
    check_output_paths,
    list_image_ids,
    read_table,
    recorded_settings,
    runtime_versions,
    settings_record,
    start_verified_pairs,
    work_lock,
    write_submission,
)
from probing import gpu_present, probe  # noqa: E402
from savedmodel import BATCH_SIGNATURES, DelgSavedModel, LocalFeatures  # noqa: E402
from search import knn, knn_seconds_per_item, l2_normalize  # noqa: E402
from settings_cli import InputError, parse_shard, read_settings_file  # noqa: E402
from store import (  # noqa: E402
    NO_SPACE,
    ImageSet,
    atomic_save,
    cache_keys,
    cached_global,
    clear_stale_caches,
    compact_valid,
    decode_image,
    extract_global,
    extract_local,
    image_path,
    load_global,
    load_local,
    local_path,
    save_json,
    timed_global,
)
from verifier import verification_pool, verify_batch  # noqa: E402

log = logging.getLogger("submission")

# %% 1. Settings
# The sections, each task's defaults and the presets live in settings.py (the bottom of submission/).
from settings import (  # noqa: E402
    DELG_ATTENTION_ABS_THRESHOLD,
    DELG_GLOBAL_SCALE_INDICES,
    DELG_IMAGE_SCALES,
    DELG_MAX_FEATURE_NUM,
    DELG_MAX_IMAGE_SIDE,
    IMAGE_SPLITS,
    NOTEBOOK_LIMIT_H,
    PRESETS,
    RETRIEVAL_SIZE,
    SECTIONS,
    TASK_DEFAULTS,
    Budget,
    Extraction,
    Global,
    Run,
    Scoring,
    Settings,
    Verification,
    parse_settings,
    settings_parser,
)


def read_settings_record(work: Path) -> Settings | None:
    """The settings a finished run recorded in WORK/settings.json (None when it left none)."""
    return recorded_settings(work, parse_settings)


# %% 2. Inputs
def read_test_ids(data: Path) -> list[str]:
    """Test ids come from sample_submission.csv, so the output has exactly the rows the server expects."""
    path = data / "sample_submission.csv"
    frame = read_table(path)
    check_columns(frame, path, {"id"})
    check_ids(frame["id"], path)
    return frame["id"].tolist()


def read_train_labels(data: Path) -> tuple[list[str], np.ndarray]:
    """Train ids and their landmark ids (integers); the error names the file, line and id of a bad row."""
    path = data / "train.csv"
    frame = read_table(path)
    check_columns(frame, path, {"id", "landmark_id"})
    check_ids(frame["id"], path)
    bad = np.flatnonzero(~frame["landmark_id"].str.fullmatch(r"-?\d{1,18}").to_numpy(bool))
    if len(bad):
        row = frame.iloc[bad[0]]
        raise InputError(
            f"{path} line {bad[0] + 2}: id {row['id']}: landmark_id {row['landmark_id']!r} is not an integer"
        )
    return frame["id"].tolist(), frame["landmark_id"].astype(np.int64).to_numpy()


def round_robin(labels: np.ndarray) -> np.ndarray:
    """Row order taking one image of every landmark before a second of any: a database pass cut short by the
    deadline still covers every landmark."""
    occurrence = pd.Series(labels).groupby(labels).cumcount().to_numpy()
    return np.lexsort((np.arange(len(labels)), occurrence))


def read_inputs(run: Run) -> Inputs:
    """The ids and labels of a run, checked before anything is written: a database to search, the image folders,
    the --nonlandmark-dir."""
    db_split, query_split = IMAGE_SPLITS[run.task]
    test_ids = read_test_ids(run.data)
    if run.task == "recognition":
        db_ids, labels = read_train_labels(run.data)
        if not db_ids:
            raise InputError(f"{run.data / 'train.csv'} lists no images: there is no database to search")
        order = round_robin(labels)
        db_ids, labels = [db_ids[i] for i in order], labels[order]
    else:
        db_ids, labels = list_image_ids(run.data / "index"), np.zeros(0, np.int64)
        if not db_ids:
            raise InputError(
                f"{run.data / 'index'} holds no .jpg images named by an image id: there is no database to search"
            )
    for split in (db_split, query_split) if test_ids else (db_split,):
        if not (run.data / split).is_dir():
            raise InputError(f"{run.data / split} not found: the {split} images belong there")
    if not test_ids:
        log.warning(
            "%s lists no test images: the submission will hold only its header", run.data / "sample_submission.csv"
        )
    return Inputs(test_ids, db_split, db_ids, labels, *nonlandmark_paths(run), *train_labels(run))


def train_labels(run: Run) -> tuple[list[str], np.ndarray]:
    """Ids and landmark ids of the --train-data images (none without the flag)."""
    if run.train_data is None:
        return [], np.zeros(0, np.int64)
    if not (run.train_data / "train").is_dir():
        raise InputError(f"--train-data {run.train_data}: no train/ folder in it (a GLDv2 train folder)")
    return read_train_labels(run.train_data)


def nonlandmark_paths(run: Run) -> tuple[list[str], list[Path]]:
    """Ids and paths of the --nonlandmark-dir images (none without the flag)."""
    if run.nonlandmark_dir is None:
        return [], []
    if not run.nonlandmark_dir.is_dir():
        raise InputError(f"--nonlandmark-dir {run.nonlandmark_dir} is not a folder")
    paths = sorted(p for p in run.nonlandmark_dir.rglob("*") if p.is_file())  # regular files only, no FIFO
    if not paths:
        raise InputError(
            f"--nonlandmark-dir {run.nonlandmark_dir} holds no files: give a folder of non-landmark "
            "images, or leave the flag out"
        )
    return [str(p.relative_to(run.nonlandmark_dir)) for p in paths], paths


# %% 3. Global descriptors
# A DELG model (savedmodel.py) gives each image a global descriptor: each scale's L2-normalized, summed,
# L2-normalized. store.py batches the images by size and caches the descriptors per model and split.
def load_models(run: Run, extraction: Extraction) -> Models:
    paths = [path.resolve() for path in run.model]
    devices, items = chosen_devices(run.devices), {}
    replicas = lambda path: Replicas(lambda: DelgSavedModel(path, extraction), devices, items)
    models = [replicas(path) for path in run.model]
    local_path_ = run.verifying_model().resolve()
    local = models[paths.index(local_path_)] if local_path_ in paths else replicas(local_path_)
    log.info("global and local passes on %d device(s): %s", len(devices), ", ".join(devices))
    return Models(models, run.model_weights or (1.0,) * len(models), local, items)


class Descriptors(NamedTuple):
    """The global descriptors of a run (the ensemble's, combined): database rows that were readable and searched
    (and their row numbers in Inputs.db_ids), queries (all, with an ok mask), non-landmark images."""

    db: np.ndarray
    db_rows: np.ndarray
    queries: np.ndarray
    query_ok: np.ndarray
    nonlandmarks: np.ndarray
    train: TrainSet | None = None  # retrieval's label transfer: the train set's readable rows and labels


def global_pass(
    models: Models, inputs: Inputs, settings: Settings, timing: Timing, knn_rate: float
) -> Descriptors | None:
    """Every model's descriptors of the database, the queries and the non-landmark set (cached per model), or
    None for a shard run. The database passes stop early when the queries and kNN would no longer fit."""
    run, extraction = settings.run, settings.extraction
    shard = parse_shard(run.shard)
    _, query_split = IMAGE_SPLITS[run.task]
    sizes = inputs.sizes()
    db_paths = [image_path(run.data, inputs.db_split, i) for i in inputs.db_ids]
    query_paths = [image_path(run.data, query_split, i) for i in inputs.test_ids]
    splits = {"db": [], "query": [], "nonlandmark": [], "train": []}
    cut_any = False
    for m, model in enumerate(models.global_models):
        cache = run.work / "global" / f"m{m}"
        # the queries and train set of this model and the next, and the database of the next, must still fit
        n = len(models.global_models)
        later = Sizes(sizes.db * (n - 1 - m), sizes.queries * (n - m), 0, sizes.train * (n - m))
        stop = database_stop_rule(timing, later, sizes, knn_rate) if shard == (0, 1) else None
        cut = timed_global(
            model,
            ImageSet(inputs.db_ids, db_paths, cache / inputs.db_split),
            extraction,
            run,
            timing,
            "global_db",
            shard,
            stop,
        )
        if shard != (0, 1):
            log.info("shard %d/%d extracted into %s", *shard, cache / inputs.db_split)
            continue
        cut_any |= cut
        splits["db"].append(
            load_global(cache / inputs.db_split, inputs.db_ids, run.chunk_size, model.global_dim, allow_missing=cut)
        )
        queries = ImageSet(inputs.test_ids, query_paths, cache / query_split)  # past the deadline: unreadable, empty
        query_cut = timed_global(model, queries, extraction, run, timing, "global_query", stop=timing.past_deadline)
        splits["query"].append(
            load_global(cache / query_split, inputs.test_ids, run.chunk_size, model.global_dim, allow_missing=query_cut)
        )
        nonlandmarks = ImageSet(inputs.nonlandmark_ids, inputs.nonlandmark_paths, cache / "nonlandmark")
        nl_cut = timed_global(model, nonlandmarks, extraction, run, timing, "global_db", stop=timing.past_deadline)
        splits["nonlandmark"].append(
            load_global(
                cache / "nonlandmark", inputs.nonlandmark_ids, run.chunk_size, model.global_dim, allow_missing=nl_cut
            )
        )
        splits["train"] += train_pass(model, cache, inputs, settings, timing)  # label transfer's, --train-data
    if shard != (0, 1):
        return None
    train_parts = splits.pop("train")
    train = combine(train_parts, models.weights) if train_parts else None
    (db, db_ok), (queries, query_ok), (nonlandmarks, nl_ok) = (combine(splits[s], models.weights) for s in splits)
    db, db_rows = compact_valid(db, db_ok)
    if not cut_any and not len(db_rows):
        raise InputError(
            f"none of the {sizes.db} database images under {run.data / inputs.db_split} could be "
            "read (see the warnings above): there is no database to search"
        )
    if cut_any:
        log.warning("database pass cut by the deadline: %d of %d images searched", len(db_rows), sizes.db)
        timing.plan["database_cut_at"] = int(len(db_rows))
    train_set = None if train is None else TrainSet(compact_valid(*train)[0], inputs.train_labels[train[1]])
    return Descriptors(db, db_rows, queries, query_ok, compact_valid(nonlandmarks, nl_ok)[0], train_set)


def combine(parts: list[tuple[np.ndarray, np.ndarray]], weights: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One model's (descriptors, ok) as they are; an ensemble's concatenated, each model's unit rows times its
    weight, normalized (rows ok in every model)."""
    if len(parts) == 1:
        return parts[0]
    ok = np.logical_and.reduce([part_ok for _, part_ok in parts])
    joined = np.concatenate(
        [weight * descriptors for (descriptors, _), weight in zip(parts, weights, strict=True)], axis=1
    )
    return l2_normalize(joined), ok


# %% 4. Nearest neighbours
# search.py's knn: the exact top-k cosines, in blocks of bounded memory. Here: how many candidates a query gets,
# and an image's nearest non-landmark images.
def candidate_count(settings: Settings) -> int:
    """Neighbours searched per query: what scoring, reranking and submitting read."""
    depth, stage = settings.scoring.rerank, settings.global_stage
    if settings.run.task == "retrieval":
        return max(RETRIEVAL_SIZE, depth, stage.superglobal_m)
    return max(settings.scoring.top_k, stage.global_top_k, depth, stage.superglobal_m)


def nonlandmark_cosines(descriptors: np.ndarray, nonlandmarks: np.ndarray, k: int, block_mb: int) -> np.ndarray:
    """Each row's k highest cosines to the non-landmark set, descending ([n, 0] without one)."""
    if len(nonlandmarks) == 0 or len(descriptors) == 0:
        return np.zeros((len(descriptors), 0), np.float32)
    return knn(descriptors, nonlandmarks, k, block_mb)[0].astype(np.float32)


# %% 5. The global stage
# Between the kNN and verification: each step optional, each measured on the kit's own competitions before it
# became a default (docs/global-stage.md). Descriptors are unit rows; cosines are inner products. Retrieval's
# label transfer and hubness (bridge.py) rescore the candidates last (docs/train-set-retrieval.md).
class Whitening(NamedTuple):
    mean: np.ndarray  # [D]
    projection: np.ndarray  # [D, D]: onto the principal axes, each scaled to unit variance


def fit_whitening(descriptors: np.ndarray, shrinkage: float, block: int = 65_536) -> Whitening:
    """PCA whitening of the rows (Jégou & Chum 2012): one covariance, accumulated in blocks (no centred copy);
    each eigenvalue gets shrinkage x their mean added, so near-empty axes are not blown up."""
    mean = descriptors.mean(axis=0, dtype=np.float64)
    covariance = np.zeros((descriptors.shape[1],) * 2)
    for start in range(0, len(descriptors), block):
        part = descriptors[start : start + block].astype(np.float64)
        covariance += part.T @ part
    covariance = covariance / max(1, len(descriptors)) - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(covariance)
    values = np.maximum(values, 0) + shrinkage * max(values.mean(), 1e-12)
    return Whitening(mean.astype(np.float32), (vectors / np.sqrt(values)).astype(np.float32))


def apply_whitening(descriptors: np.ndarray, whitening: Whitening, block: int = 65_536) -> np.ndarray:
    """The rows whitened and L2-normalized, in place, block by block."""
    for start in range(0, len(descriptors), block):
        part = descriptors[start : start + block]
        part[:] = l2_normalize((part - whitening.mean) @ whitening.projection)
    return descriptors


def weighted_sums(cosines: np.ndarray, neighbours: np.ndarray, vectors: np.ndarray, alpha: float) -> np.ndarray:
    """normalize(sum over each row's neighbours of max(cos, 0)^alpha x vector): alpha-QE's and DBA's update."""
    weights = np.maximum(cosines, 0) ** alpha
    return l2_normalize(np.einsum("qn,qnd->qd", weights, vectors[neighbours]))


def query_expansion(
    queries: np.ndarray, database: np.ndarray, cosines: np.ndarray, neighbours: np.ndarray, n: int, alpha: float
) -> np.ndarray:
    """alpha-QE (Radenović et al.): each query plus its top n weighted by cos^alpha, normalized (search again)."""
    top = np.concatenate([np.ones((len(queries), 1), np.float32), cosines[:, :n]], axis=1)
    stacked = np.concatenate([queries, database])
    rows = np.concatenate([np.arange(len(queries))[:, None], len(queries) + neighbours[:, :n]], axis=1)
    return weighted_sums(top, rows, stacked, alpha)


def database_augmentation(
    database: np.ndarray, n: int, alpha: float, block_mb: int, stop: Callable[[], bool]
) -> tuple[np.ndarray, int]:
    """DBA (retrieval 2019 1st): each database row becomes the cos^alpha-weighted sum of its n nearest rows,
    itself included. A database x database kNN, block by block; (new rows, rows done) when stop() cuts it."""
    augmented, block = database.copy(), DBA_BLOCK
    for start in range(0, len(database), block):
        if stop():
            log.warning("DBA cut by the deadline after %d of %d database rows", start, len(database))
            return augmented, start
        cosines, neighbours = knn(database[start : start + block], database, n, block_mb)
        augmented[start : start + block] = weighted_sums(cosines, neighbours, database, alpha)
    return augmented, len(database)


def superglobal_rerank(
    queries: np.ndarray,
    database: np.ndarray,
    cosines: np.ndarray,
    neighbours: np.ndarray,
    m: int,
    k: int,
    beta: float,
    batch: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """SuperGlobal's refinement (Shao et al., ICCV 2023) of each query's top m: every candidate becomes
    (d + sum beta cos d_j) / (1 + sum beta cos) over its k nearest among the m; s1 = q . refined; the refined
    query is the element-wise max of the k+1 best refined candidates; s2 = refined query . refined; the m are
    reordered by (s1 + s2) / 2, which becomes their score. Candidates past m keep theirs."""
    m, cosines, neighbours = min(m, neighbours.shape[1]), cosines.copy(), neighbours.copy()
    k = min(k, m - 1)
    for start in range(0, len(queries), batch) if k > 0 else ():
        rows = slice(start, start + batch)
        candidates = database[neighbours[rows, :m]]  # [B, m, D]
        similar = np.einsum("bmd,bnd->bmn", candidates, candidates)
        similar[:, np.arange(m), np.arange(m)] = -np.inf  # a candidate is not its own neighbour
        nearest = np.argpartition(-similar, k - 1, axis=2)[:, :, :k]
        weights = beta * np.maximum(np.take_along_axis(similar, nearest, 2), 0)  # [B, m, k]
        neighbour_vectors = candidates[np.arange(len(candidates))[:, None, None], nearest]  # [B, m, k, D]
        mixed = np.einsum("bmk,bmkd->bmd", weights, neighbour_vectors)
        refined = (candidates + mixed) / (1 + weights.sum(axis=2, keepdims=True))
        s1 = np.einsum("bmd,bd->bm", refined, queries[rows])
        best = np.argsort(-s1, axis=1)[:, : k + 1]
        refined_query = np.take_along_axis(refined, best[..., None], 1).max(axis=1)
        score = (s1 + np.einsum("bmd,bd->bm", refined, refined_query)) / 2
        order = np.argsort(-score, axis=1, kind="stable")
        cosines[rows, :m] = np.take_along_axis(score, order, 1)
        neighbours[rows, :m] = np.take_along_axis(neighbours[rows, :m], order, 1)
    return cosines, neighbours


def global_candidates(found: Descriptors, n_db: int, settings: Settings, timing: Timing) -> Candidates:
    """Whitening, non-landmark cosines, DBA, kNN, alpha-QE and SuperGlobal, as the settings ask: the candidates."""
    stage, run = settings.global_stage, settings.run
    began = time.monotonic()
    train_rows = () if found.train is None else (found.train.descriptors,)
    db, queries, nonlandmarks, *train_rows = whitened(stage, found.db, found.queries, found.nonlandmarks, *train_rows)
    query_nl = nonlandmark_cosines(
        queries, nonlandmarks, max(stage.query_nonlandmark_k, settings.scoring.top_k), run.knn_block_mb
    )
    db_nl = np.zeros((n_db, 0), np.float32)
    suppression = bool(stage.suppression and run.task == "recognition" and len(nonlandmarks))
    if suppression:
        found_nl = nonlandmark_cosines(db, nonlandmarks, stage.db_nonlandmark_k, run.knn_block_mb)
        db_nl = np.zeros((n_db, found_nl.shape[1]), np.float32)
        db_nl[found.db_rows] = found_nl
    marks: dict[str, float] = {}
    k = candidate_count(settings)
    cosines, rows, augmented = global_chain(
        queries, db, max(k, bridge_depth(stage, run.task)), stage, run.knn_block_mb, timing.past_deadline, marks
    )
    work = dataclasses.replace(Work.from_record(timing.work), suppression=suppression, dba=False, qe=bool(stage.qe_n))
    products = knn_products(Sizes(len(db), len(queries), len(nonlandmarks)), work) + augmented * len(db)
    timing.add("knn", products, marks["searched"] - began)
    if stage.superglobal_m:
        timing.add("global_rerank", len(queries), time.monotonic() - marks["searched"])
    train = None if found.train is None else TrainSet(*train_rows, found.train.labels)
    cosines, rows = bridge_rerank(queries, db, (cosines, rows), train, settings, timing, k)
    return Candidates(cosines, found.db_rows[rows], found.query_ok, query_nl, db_nl)


def whitened(stage: Global, db: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """db and the others whitened by a PCA fitted on db, when the settings ask (--whiten database)."""
    if stage.whiten != "database" or len(db) < 2:
        return (db, *others)
    whitening = fit_whitening(db, stage.whiten_shrinkage)
    return tuple(apply_whitening(x, whitening) for x in (db, *others))


def global_chain(
    queries: np.ndarray,
    db: np.ndarray,
    k: int,
    stage: Global,
    block_mb: int,
    stop: Callable[[], bool] = lambda: False,
    marks: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The global stage's chain on (whitened) descriptors, as the settings ask: DBA, the top-k kNN, then
    global_rerank (alpha-QE, SuperGlobal). (cosines, rows, the database rows DBA replaced: all but when stop() cut
    it). The script, show and revisited all rank through it."""
    augmented = 0
    if stage.dba_n:
        db, augmented = database_augmentation(db, stage.dba_n, stage.dba_alpha, block_mb, stop)
    cosines, rows = knn(queries, db, k, block_mb)
    cosines, rows = global_rerank(queries, db, cosines, rows, stage, block_mb, marks)
    return cosines, rows, augmented


def second_search(
    queries: np.ndarray, db: np.ndarray, cosines: np.ndarray, rows: np.ndarray, stage: Global, block_mb: int
) -> tuple[np.ndarray, np.ndarray]:
    """alpha-QE: the queries expanded by their top n, searched again."""
    expanded = query_expansion(queries, db, cosines, rows, stage.qe_n, stage.qe_alpha)
    return knn(expanded, db, rows.shape[1], block_mb)


def global_rerank(
    queries: np.ndarray,
    db: np.ndarray,
    cosines: np.ndarray,
    rows: np.ndarray,
    stage: Global,
    block_mb: int,
    marks: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """alpha-QE (a second search) and SuperGlobal, as the settings ask; marks["searched"]: when the search (with
    alpha-QE's) ended and SuperGlobal began."""
    if stage.qe_n:
        cosines, rows = second_search(queries, db, cosines, rows, stage, block_mb)
    if marks is not None:
        marks["searched"] = time.monotonic()
    if stage.superglobal_m:
        cosines, rows = superglobal_rerank(
            queries, db, cosines, rows, stage.superglobal_m, stage.superglobal_k, stage.superglobal_beta
        )
    return cosines, rows


# %% 6. Local features and verification
# Local features come from the DELG model, cached by store.py; verifier.py applies the rule below (count_inliers)
# to each batch's pairs, in worker processes.
def putative_matches(
    desc_a: np.ndarray, desc_b: np.ndarray, max_distance: float, mutual: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (a, b): b is a's nearest neighbour within max_distance (and, if mutual, vice versa)."""
    return matches_in(desc_a @ desc_b.T, max_distance, mutual)


def matches_in(similarity: np.ndarray, max_distance: float, mutual: bool) -> tuple[np.ndarray, np.ndarray]:
    """putative_matches from the descriptors' similarity matrix (normalized rows: distance^2 = 2 - 2 similarity)."""
    nearest_b = similarity.argmax(axis=1)
    keep = np.flatnonzero(similarity[np.arange(len(similarity)), nearest_b] >= 1 - max_distance**2 / 2)
    if mutual:  # only the kept candidates' columns are searched
        keep = keep[similarity[:, nearest_b[keep]].argmax(axis=0) == keep]
    return keep, nearest_b[keep]


def pixel_threshold(verification: Verification, side_a: int, side_b: int) -> float:
    """The RANSAC threshold in pixels for two images: the pixel override, or the relative threshold times
    the mean of their longer sides."""
    if verification.ransac_threshold_px is not None:
        return verification.ransac_threshold_px
    return verification.ransac_threshold * max(1.0, (side_a + side_b) / 2)


def ransac_inliers(
    points_a: np.ndarray, points_b: np.ndarray, threshold_px: float, verification: Verification
) -> np.ndarray:
    """Inlier mask of a pydegensac homography between matched points; all False when RANSAC fails."""
    try:
        _, mask = pydegensac.findHomography(
            points_a.astype(np.float64),
            points_b.astype(np.float64),
            px_th=threshold_px,
            conf=verification.ransac_confidence,
            max_iters=verification.ransac_iterations,
            seed=verification.ransac_seed,
        )
    except Exception:  # noqa: BLE001 - a RANSAC failure scores zero, never ends the run
        mask = None
    return np.zeros(len(points_a), bool) if mask is None else np.asarray(mask, bool).reshape(len(points_a))


def ransac_matches(
    a: LocalFeatures, b: LocalFeatures, verification: Verification
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Putative matches (indices a, b) and their RANSAC inlier mask."""
    if len(a.descriptors) == 0 or len(b.descriptors) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    ia, ib = putative_matches(a.descriptors, b.descriptors, verification.match_max_distance, verification.mutual)
    return ia, ib, inlier_mask(a, b, ia, ib, verification)


def inlier_mask(
    a: LocalFeatures, b: LocalFeatures, ia: np.ndarray, ib: np.ndarray, verification: Verification
) -> np.ndarray:
    """RANSAC inliers among the putative matches (ia, ib) of two images; none when there are fewer than
    min_matches (and 4, a homography's minimum). The one verification rule: the script and tune use it."""
    if not enough_matches(len(ia), verification.min_matches):
        return np.zeros(len(ia), bool)
    threshold = pixel_threshold(verification, a.side, b.side)
    return ransac_inliers(a.keypoints[ia], b.keypoints[ib], threshold, verification)


def enough_matches(matches: int | np.ndarray, min_matches: int) -> bool | np.ndarray:
    """The gate before RANSAC: at least min_matches putative matches, and 4 (a homography's minimum)."""
    return np.asarray(matches) >= max(4, min_matches)


def count_inliers(a: LocalFeatures, b: LocalFeatures, verification: Verification) -> int:
    return int(np.count_nonzero(ransac_matches(a, b, verification)[2]))


def verify_queries(
    model: DelgSavedModel,
    settings: Settings,
    timing: Timing,
    inputs: Inputs,
    neighbours: np.ndarray,
    order: list[int],
    max_depth: int,
    on_progress: Callable[[np.ndarray, list[int]], None],
) -> np.ndarray:
    """Inliers [nq, candidates] (-1: not verified), batch after batch in `order` while the budget allows; every
    image and every query checks the deadline. on_progress(inliers, queries) after each batch."""
    run, budget = settings.run, settings.budget
    inliers = np.full(neighbours.shape, -1, np.int64)
    if budget.max_rerank_queries is not None:
        order = order[: budget.max_rerank_queries]
    start, new_image_share = 0, 1.0
    with verification_pool(count_inliers, settings.verification, run.workers) as pool:
        while start < len(order) and max_depth > 0:
            depth = plan_depth(timing, len(order) - start, max_depth, new_image_share)
            if depth == 0 or timing.past_deadline():
                break
            batch = order[start : start + (budget.warmup_queries if start == 0 else budget.rerank_batch)]
            candidates = [[inputs.db_ids[j] for j in neighbours[q, :depth]] for q in batch]
            counts, new_image_share = verify_batch(
                model, settings, timing, pool, [inputs.test_ids[q] for q in batch], inputs.db_split, candidates
            )
            done = batch[: len(counts)]
            for q, query_counts in zip(done, counts, strict=True):
                inliers[q, : len(query_counts)] = query_counts
            timing.rerank_depth = max(timing.rerank_depth, depth)
            start += len(done)
            log.info("reranked %d of %d queries at depth %d", start, len(order), depth)
            on_progress(inliers, done)
            if len(done) < len(batch):
                break
    if start < len(order):
        log.info("time budget reached: %d of %d queries keep their global ranking", len(order) - start, len(order))
    timing.save()
    return inliers


# %% 7. Scoring
def local_scores(inliers: np.ndarray, cosines: np.ndarray, scoring: Scoring) -> np.ndarray:
    """min(inliers, C)/C of verified candidates. Unverified ones (inliers < 0) get 0, or with calibration the
    local score verified candidates earn at the same cosine, so that every query's confidence is on one scale
    however deep it was verified."""
    verified = inliers >= 0
    local = np.minimum(np.maximum(inliers, 0), scoring.max_inlier_score) / scoring.max_inlier_score
    if not scoring.calibrate:
        return np.where(verified, local, 0.0)
    return np.where(verified, local, expected_local_scores(cosines[verified], local[verified], cosines))


def expected_local_scores(verified_cosines: np.ndarray, verified_scores: np.ndarray, cosines: np.ndarray) -> np.ndarray:
    """E[local score | cosine]: an increasing (isotonic) fit to the verified pairs, evaluated at `cosines`.
    With fewer than 20 verified pairs there is nothing to learn from: 0."""
    if len(verified_cosines) < 20:
        return np.zeros_like(cosines, np.float64)
    fit = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(verified_cosines, verified_scores)
    return fit.predict(cosines.ravel()).reshape(cosines.shape)


class Candidates(NamedTuple):
    """What the global stage hands scoring: each query's candidates and their non-landmark evidence."""

    cosines: np.ndarray  # [nq, k] scores of the candidates, descending (cosines, or SuperGlobal's scores)
    neighbours: np.ndarray  # [nq, k] database rows
    query_ok: np.ndarray  # [nq] the query image was readable
    query_nonlandmark: np.ndarray  # [nq, Kq] the query's highest cosines to non-landmark images ([nq, 0]: none)
    db_nonlandmark: np.ndarray  # [n_db, Kd] the same for every database row ([n_db, 0]: none)


def vote(scores: np.ndarray, neighbours: np.ndarray, labels: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(landmark, total) per query: the candidates' scores summed per landmark over the best top_k; a tie goes
    to the landmark of the better-ranked candidate."""
    best = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    best_scores = np.take_along_axis(scores, best, 1)
    best_labels = labels[np.take_along_axis(neighbours, best, 1)]
    same = best_labels[:, :, None] == best_labels[:, None, :]
    totals = (same * best_scores[:, None, :]).sum(axis=2)  # each position: the total of its landmark
    winner = totals.argmax(axis=1)
    rows = np.arange(len(scores))
    return best_labels[rows, winner], totals[rows, winner]


def global_predictions(candidates: Candidates, labels: np.ndarray, stage: Global) -> tuple[np.ndarray, np.ndarray]:
    """(landmark, confidence) of a query nobody verified, from its global_top_k nearest by cosine (whatever the
    rerank depth searched, so a query scores the same in every run). With suppression and a non-landmark set
    (recognition 2020 1st): candidate score clamp(cos, 0, 1) - B(j), summed per landmark, then confidence -=
    weight x C(q). Unreadable queries and empty databases get NaN."""
    c, nq = candidates, len(candidates.cosines)
    if c.neighbours.shape[1] == 0:
        return np.zeros(nq, np.int64), np.full(nq, np.nan)
    scores, neighbours = c.cosines[:, : stage.global_top_k].astype(np.float64), c.neighbours[:, : stage.global_top_k]
    suppress = stage.suppression and c.query_nonlandmark.shape[1] > 0
    if suppress:
        bias = c.db_nonlandmark[:, : stage.db_nonlandmark_k].mean(axis=1)[neighbours]
        scores = np.clip(scores, 0, 1) - bias
    landmarks, totals = vote(scores, neighbours, labels, stage.global_top_k)
    if suppress:
        totals = totals - stage.query_nonlandmark_weight * c.query_nonlandmark[:, : stage.query_nonlandmark_k].mean(1)
    return landmarks, np.where(c.query_ok, totals, np.nan)


def verified_predictions(
    candidates: Candidates, inliers: np.ndarray, labels: np.ndarray, scoring: Scoring
) -> tuple[np.ndarray, np.ndarray]:
    """(landmark, confidence) of a verified query: cosine + local score summed per landmark over the best
    top_k candidates, times the non-landmark penalty."""
    c, nq = candidates, len(candidates.cosines)
    if c.neighbours.shape[1] == 0:
        return np.zeros(nq, np.int64), np.full(nq, np.nan)
    landmarks, totals = vote(c.cosines + local_scores(inliers, c.cosines, scoring), c.neighbours, labels, scoring.top_k)
    shares = nonlandmark_shares(c.cosines, c.query_nonlandmark, scoring.top_k)
    penalty = np.maximum(0.0, 1.0 - scoring.nonlandmark_penalty * shares)
    return landmarks, np.where(c.query_ok, totals * penalty, np.nan)


def recognition_predictions(
    candidates: Candidates, inliers: np.ndarray, labels: np.ndarray, stage: Global, scoring: Scoring
) -> tuple[np.ndarray, np.ndarray]:
    """(landmark, confidence) per query: verified queries (any candidate with inliers >= 0) by the verification
    scoring, the others by the global stage's; with --calibrate the global confidences are mapped onto the
    verified ones' scale, since GAP ranks all queries in one list."""
    global_landmarks, global_conf = global_predictions(candidates, labels, stage)
    verified = (inliers >= 0).any(axis=1) & candidates.query_ok
    if not verified.any():
        return global_landmarks, global_conf
    landmarks, confidences = verified_predictions(candidates, inliers, labels, scoring)
    if scoring.calibrate:
        agrees = landmarks == global_landmarks
        global_conf = calibrated(global_conf, verified, np.where(agrees, confidences, 0.0))
    return np.where(verified, landmarks, global_landmarks), np.where(verified, confidences, global_conf)


def calibrated(global_conf: np.ndarray, verified: np.ndarray, earned: np.ndarray) -> np.ndarray:
    """The global confidences on the verified scale: a least-squares line, kept increasing, from a verified
    query's global confidence to what verification gave its global prediction (its confidence where it kept
    that landmark, 0 where it changed it). A line, not a fit in steps: the unverified queries are the least
    confident ones, below every verified one, and their order must survive. Fewer than 20 verified: as is."""
    x, y = global_conf[verified], earned[verified]
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 20 or np.ptp(x[keep]) == 0:
        return global_conf
    slope, intercept = np.polyfit(x[keep], y[keep], 1)
    return max(slope, 1e-3) * global_conf + intercept


def recognition_rows(landmarks: np.ndarray, confidences: np.ndarray) -> list[str]:
    return ["" if np.isnan(c) else f"{landmark} {c:.6f}" for landmark, c in zip(landmarks, confidences, strict=True)]


def retrieval_order(cosines: np.ndarray, inliers: np.ndarray) -> np.ndarray:
    """Per query, candidate positions in submitted order: the verified prefix by (inliers, cosine) descending
    as DELG reranks, then the rest by cosine."""
    verified = inliers >= 0
    positions = np.broadcast_to(np.arange(cosines.shape[1], dtype=np.float64), cosines.shape)
    # np.lexsort sorts by its last key first: verified first, then more inliers, then higher cosine; the
    # unverified keep their positions. Ties keep the global order (the sort is stable).
    return np.lexsort((np.where(verified, -cosines, positions), -np.where(verified, inliers, 0), ~verified))


def retrieval_rows(
    cosines: np.ndarray, neighbours: np.ndarray, inliers: np.ndarray, db_ids: list[str], query_ok: np.ndarray
) -> list[str]:
    order = retrieval_order(cosines, inliers)
    ranked = np.take_along_axis(neighbours, order, 1)
    return [" ".join(db_ids[j] for j in row) if ok else "" for row, ok in zip(ranked, query_ok, strict=True)]


def nonlandmark_shares(query_cos: np.ndarray, nonlandmark_cos: np.ndarray, top_k: int) -> np.ndarray:
    """Per query, the share of non-landmark images among its top_k neighbours of both sets."""
    if nonlandmark_cos.shape[1] == 0:
        return np.zeros(len(query_cos))
    both = np.concatenate([query_cos[:, :top_k], nonlandmark_cos[:, :top_k]], axis=1)
    is_nonlandmark = np.concatenate(
        [np.zeros_like(query_cos[:, :top_k]), np.ones_like(nonlandmark_cos[:, :top_k])], axis=1
    )
    best = np.argsort(-both, axis=1, kind="stable")[:, :top_k]
    return np.take_along_axis(is_nonlandmark, best, axis=1).mean(axis=1)


def rerank_order(priority: np.ndarray, query_ok: np.ndarray) -> list[int]:
    """Readable queries, highest global confidence first: when the budget cuts reranking short, the queries at
    the top of GAP's single ranking, where a wrong prediction costs most, have been verified."""
    priority = np.where(query_ok, np.nan_to_num(priority, nan=-np.inf), -np.inf)
    return [int(q) for q in np.argsort(-priority, kind="stable") if query_ok[q]]


# %% 8. Main
def submit(settings: Settings) -> None:
    """Check the output paths, take --work, run."""
    run_settings = settings.run
    split_cpu()  # before anything sets TensorFlow's devices up
    check_output_paths(run_settings)
    with work_lock(run_settings.work):
        locked_submit(settings)


def locked_submit(settings: Settings) -> None:
    """The run, once it holds --work. Nothing is written before the inputs and the models have been checked, so
    a bad flag leaves an earlier --out as it was."""
    run_settings = settings.run
    timing = Timing(run_settings.work / "timing.json", run_settings.task, settings.budget, runtime_versions())
    inputs = read_inputs(run_settings)
    file_labels = train_file_labels(settings)  # --train-descriptors, checked before anything is written
    inputs = inputs if file_labels is None else dataclasses.replace(inputs, train_labels=file_labels)
    models = load_models(run_settings, settings.extraction)
    timing.devices = models.devices
    timing.measure_memory(baseline=True)
    work_of = lambda s, m: run_work(
        s, inputs.sizes(), tuple(x.global_dim for x in m.global_models), candidate_count(s), gpu_present()
    )
    settings, models = plan_memory(settings, models, inputs.sizes(), timing, work_of)
    dims = tuple(model.global_dim for model in models.global_models)
    if run_settings.probe is not None:
        return probe(models, inputs, settings, timing, candidate_count(settings), global_rerank, count_inliers)
    if parse_shard(run_settings.shard) == (0, 1):  # a valid file at once in WORK, whatever happens later
        write_submission(
            latest_submission(run_settings), run_settings.task, inputs.test_ids, [""] * len(inputs.test_ids)
        )
    knn_rate = knn_seconds_per_item(sum(dims), run_settings.knn_block_mb)
    timing.add_timed_knn(knn_rate)
    given = settings.extraction
    settings = dataclasses.replace(
        settings, extraction=plan_run(models, inputs, settings, timing, knn_rate, gpu_present())
    )
    bridging = settings.global_stage.bridge_weight > 0  # the memory plan may have turned label transfer off
    train = load_train_descriptors(settings, given, timing) if bridging else None
    timing.save()
    save_json(run_settings.work / "settings.json", settings_record(settings, SECTIONS, timing.plan))
    clear_stale_caches(run_settings.work, cache_keys(run_settings, settings.extraction))
    found = global_pass(models, inputs, settings, timing, knn_rate)
    if found is not None:
        finish(models.local, inputs, settings, timing, found if train is None else found._replace(train=train))


def latest_submission(run_settings: Run) -> Path:
    """WORK's copy of the newest intermediate result: --out itself changes only when the run finishes."""
    return run_settings.work / "submission_latest.csv"


def finish(model: DelgSavedModel, inputs: Inputs, settings: Settings, timing: Timing, found: Descriptors) -> None:
    """The global stage, the global-only submission, then reranking (most confident queries first) and the final
    submission."""
    run_settings, depth = settings.run, settings.scoring.rerank
    if depth and not model.has_local:
        log.info(
            "%s is a global-only model (no local features): no reranking, global-only", run_settings.verifying_model()
        )
        depth = 0
    candidates = global_candidates(found, len(inputs.db_ids), settings, timing)
    atomic_save(
        run_settings.work / "neighbours.npz",
        lambda tmp: np.savez(
            tmp,
            test_ids=np.array(inputs.test_ids, dtype=str),
            db_ids=np.array(inputs.db_ids, dtype=str),
            labels=inputs.labels,
            **candidates._asdict(),
        ),
    )

    def predictions(inliers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return recognition_predictions(candidates, inliers, inputs.labels, settings.global_stage, settings.scoring)

    def rows_for(inliers: np.ndarray) -> list[str]:
        if run_settings.task == "recognition":
            return recognition_rows(*predictions(inliers))
        return retrieval_rows(candidates.cosines, candidates.neighbours, inliers, inputs.db_ids, candidates.query_ok)

    unverified, latest = np.full(candidates.neighbours.shape, -1), latest_submission(run_settings)
    write_submission(latest, run_settings.task, inputs.test_ids, rows_for(unverified))
    atomic_save(run_settings.work / "submission_global_only.csv", lambda tmp: shutil.copyfile(latest, tmp))
    log.info("global-only submission written to %s", latest)
    pairs_path, last_write = run_settings.work / "verified_pairs.csv", time.monotonic()
    start_verified_pairs(pairs_path)

    def on_progress(inliers: np.ndarray, batch: list[int]) -> None:
        nonlocal last_write
        append_verified_pairs(
            pairs_path,
            [inputs.test_ids[q] for q in batch],
            inputs.db_ids,
            candidates.neighbours[batch],
            candidates.cosines[batch],
            inliers[batch],
        )
        if time.monotonic() - last_write >= settings.budget.write_every_s:
            write_submission(latest, run_settings.task, inputs.test_ids, rows_for(inliers))
            last_write = time.monotonic()

    priority = (
        predictions(unverified)[1] if run_settings.task == "recognition" else candidates.cosines[:, :1].sum(axis=1)
    )
    inliers = verify_queries(
        model,
        settings,
        timing,
        inputs,
        candidates.neighbours,
        rerank_order(priority, candidates.query_ok),
        min(depth, candidates.neighbours.shape[1]),
        on_progress,
    )
    write_submission(run_settings.out, run_settings.task, inputs.test_ids, rows_for(inliers))
    timing.measure_memory()
    log.info("submission written to %s; timings in %s", run_settings.out, timing.path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        submit(parse_settings(argv))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk where space_checked does not look (the system's temporary files)
        if err.errno not in NO_SPACE:
            raise
        print(
            f"error: no space left on the device ({err.filename or err.strerror}): free some space there",
            file=sys.stderr,
        )
        return 2
    except MemoryError as err:  # numpy's ArrayMemoryError too: --out is written only by a finished run
        print(
            f"error: out of memory ({str(err) or 'MemoryError'}): lower --global-batch, --prefetch or "
            "--knn-block-mb; --out is left as it was",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            "error: interrupted: --out is left as it was (WORK/submission_latest.csv holds the newest result)",
            file=sys.stderr,
        )
        return 130
    return 0


# The kit's fence: what the kit may take from this file (from the files beside it: common/kit.py's SIBLING_API).
__all__ = (  # the names the kit (local_eval, bench, demo, export) may use; all else may change freely
    "DELG_IMAGE_SCALES",
    "DELG_GLOBAL_SCALE_INDICES",
    "DELG_MAX_IMAGE_SIDE",
    "DELG_MAX_FEATURE_NUM",
    "DELG_ATTENTION_ABS_THRESHOLD",
    "NOTEBOOK_LIMIT_H",
    "TIMING_STAGES",
    "IMAGE_SPLITS",
    "RETRIEVAL_SIZE",
    "SECTIONS",
    "PRESETS",
    "TASK_DEFAULTS",
    "Settings",
    "Extraction",
    "Global",
    "Verification",
    "Scoring",
    "Budget",
    "InputError",
    "parse_settings",
    "settings_parser",
    "read_settings_file",
    "read_settings_record",
    "DelgSavedModel",
    "load_models",
    "read_test_ids",
    "read_train_labels",
    "list_image_ids",
    "image_path",
    "decode_image",
    "extract_global",
    "load_global",
    "cached_global",
    "knn",
    "LocalFeatures",
    "local_path",
    "extract_local",
    "load_local",
    "putative_matches",
    "matches_in",
    "ransac_inliers",
    "ransac_matches",
    "inlier_mask",
    "enough_matches",
    "count_inliers",
    "pixel_threshold",
    "Candidates",
    "recognition_predictions",
    "global_predictions",
    "verified_predictions",
    "retrieval_order",
    "nonlandmark_shares",
    "expected_local_scores",
    "rerank_order",
    "fit_whitening",
    "apply_whitening",
    "query_expansion",
    "database_augmentation",
    "superglobal_rerank",
    "global_rerank",
    "global_chain",
    "whitened",
    "global_candidates",
    "global_pass",
    "verify_queries",
    "Descriptors",
    "read_inputs",
    "recognition_rows",
    "retrieval_rows",
    "write_submission",
    "KNN_Q_BLOCK",
    "KNN_DB_CHUNK",
    "ladder",
    "BATCH_SIGNATURES",
    "Sizes",
    "Timing",
    "stage_units",
    "project_seconds",
    "rerank_seconds_per_query",
    "deepest_rerank",
    "plan_depth",
    "main",
)


if __name__ == "__main__":
    sys.exit(main())
