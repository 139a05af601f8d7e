"""The submission script's settings: the DELG defaults, the sections (extraction, global stage, verification,
scoring, budget, run), each task's defaults and the presets, and how flags and files layer into one Settings.

The bottom of submission/: it imports no other file of the script but settings_cli.py (settings as flags and files)
and costs.py (the one safety margin), so every sibling can take its types from here.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from costs import SAFETY_MARGIN
from settings_cli import InputError, build_parser, layer_settings, parse_shard, setting

DESCRIPTION = (  # main.py's first docstring paragraph, for --help (tests/test_kit_constants.py ties the two)
    "Landmark recognition / retrieval submission: DELG global kNN, a global stage, then local reranking "
    "inside a time budget."
)

# DELG extraction defaults (a copy of train/config.py: this file imports nothing from the kit; a test ties them).
DELG_IMAGE_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
DELG_GLOBAL_SCALE_INDICES = (3, 4, 5)
DELG_MAX_IMAGE_SIDE = 1024
DELG_MAX_FEATURE_NUM = 1000
DELG_ATTENTION_ABS_THRESHOLD = 0.0
NOTEBOOK_LIMIT_H = 9.0  # Kaggle's notebook limit of most years (a copy of common/kit.py)
IMAGE_SPLITS = {"recognition": ("train", "test"), "retrieval": ("index", "test")}
RETRIEVAL_SIZE = 100  # index ids submitted per query


@dataclass(frozen=True)
class Extraction:
    """How images become features; with the model's files, what the feature caches depend on."""

    scales: tuple[float, ...] = setting(DELG_IMAGE_SCALES, "image scales of the local features", above=0, maximum=8)
    global_scale_indices: tuple[int, ...] = setting(
        DELG_GLOBAL_SCALE_INDICES, "indices into --scales whose global descriptors are summed", minimum=0, maximum=63
    )
    max_image_side: int = setting(
        DELG_MAX_IMAGE_SIDE, "longer image side for local features (downscaled to it)", minimum=32, maximum=8192
    )
    global_max_side: int = setting(
        DELG_MAX_IMAGE_SIDE, "longer side of the largest global size bucket", minimum=64, maximum=8192
    )
    min_image_side: int = setting(
        32, "a shorter side below this is padded up to it (local features)", minimum=1, maximum=8192
    )
    max_features: int = setting(
        DELG_MAX_FEATURE_NUM, "local features kept per image, by attention", minimum=1, maximum=100_000
    )
    attention_threshold: float = setting(
        DELG_ATTENTION_ABS_THRESHOLD, "minimum attention score of a local feature", minimum=-1e6, maximum=1e6
    )
    border_margin: float = setting(
        0.0,
        "drop local features whose keypoint (receptive-field centre) lies within "
        "this share of the image's longer side from its border, where padding gives "
        "features that match anything; 0 = keep all",
        minimum=0,
        below=0.5,
    )
    global_precision: str = setting(
        "float32",
        "global pass precision; float16 needs a model exported with --float16",
        choices=("float32", "float16"),
    )
    global_batch: int = setting(
        16, "images per batched global call (models exported with global_batch)", minimum=1, maximum=1024
    )
    global_xla: str = setting(
        "auto",
        "XLA-compiled batched functions (exports hold both): auto lets --plan auto time "
        "both and keep the faster, off with --plan fixed",
        choices=("auto", "on", "off"),
    )
    cache_float16: bool = setting(False, "store cached global descriptors as float16 (half the disk and memory)")

    def global_scales(self) -> tuple[float, ...]:
        return tuple(self.scales[i] for i in self.global_scale_indices)


# The global stage's defaults (database whitening, top 3, suppression at weight 0.5) were chosen on a small
# synthetic competition (seed 41, tiny 300-step model exported with `export delg`'s defaults); docs/global-stage.md
# has the table and how it was measured. alpha-QE, DBA and SuperGlobal lowered every score there: off
# (retrieval turns QE and DBA on in TASK_DEFAULTS).
@dataclass(frozen=True)
class Global:
    """The global stage: how descriptors become candidates, and how a query nobody verified is scored."""

    whiten: str = setting(
        "database",
        "database: fit PCA whitening on the database descriptors here (one "
        "covariance), on top of the export's; off: use them as the model gives them",
        choices=("off", "database"),
    )
    whiten_shrinkage: float = setting(
        0.1, "--whiten database: added to each eigenvalue, as a share of their mean", minimum=0, maximum=100
    )
    dba_n: int = setting(
        0,
        "database-side augmentation: each database descriptor becomes the sim^alpha-weighted "
        "sum of its n nearest (itself included); 0 = off",
        minimum=0,
        maximum=1000,
    )
    dba_alpha: float = setting(3.0, "DBA: the alpha of its weights", minimum=0, maximum=100)
    qe_n: int = setting(
        0,
        "alpha query expansion: q + the sim^alpha-weighted sum of its top n, searched again; 0 = off",
        minimum=0,
        maximum=1000,
    )
    qe_alpha: float = setting(3.0, "alpha-QE: the alpha of its weights", minimum=0, maximum=100)
    superglobal_m: int = setting(
        0,
        "SuperGlobal reranking of each query's top M candidates with global "
        "descriptors only (ICCV 2023: M 400); 0 = off",
        minimum=0,
        maximum=10_000,
    )
    superglobal_k: int = setting(
        9, "SuperGlobal: neighbours within the M that refine each candidate", minimum=1, maximum=1000
    )
    superglobal_beta: float = setting(
        0.15, "SuperGlobal: weight of a neighbour, times its cosine", minimum=0, maximum=100
    )
    global_top_k: int = setting(
        3, "recognition, unverified queries: neighbours whose scores are summed per landmark", minimum=1, maximum=1000
    )
    suppression: bool = setting(
        True,
        "non-landmark suppression with --nonlandmark-dir (recognition 2020 1st): "
        "a candidate scores clamp(cos, 0, 1) - B(j), B(j) its mean cosine to its "
        "--db-nonlandmark-k nearest non-landmark images",
    )
    db_nonlandmark_k: int = setting(
        5, "suppression: non-landmark neighbours of a database image in B(j)", minimum=1, maximum=1000
    )
    query_nonlandmark_k: int = setting(
        10, "suppression: non-landmark neighbours of a query in C(q)", minimum=1, maximum=1000
    )
    query_nonlandmark_weight: float = setting(
        0.5,
        "suppression: confidence -= weight x C(q), the query's mean cosine to its nearest non-landmark images",
        minimum=0,
        maximum=100,
    )
    bridge_weight: float = setting(
        0.0,
        "retrieval with --train-data or --train-descriptors: label transfer, candidates scored cos + w x "
        "sum_l p_q(l) p_i(l), p an image's landmark distribution from its --bridge-k nearest train images; 0 = off",
        minimum=0,
        maximum=100,
    )
    bridge_k: int = setting(3, "label transfer: train neighbours whose labels vote", minimum=1, maximum=1000)
    bridge_m: int = setting(
        300,
        "label transfer and hubness: candidates rescored per query (searched, then cut to the usual count)",
        minimum=1,
        maximum=10_000,
    )
    hubness_weight: float = setting(
        0.0,
        "retrieval: candidates scored cos - lambda x the index image's mean cosine to its --hubness-k nearest "
        "index images; 0 = off",
        minimum=0,
        maximum=100,
    )
    hubness_k: int = setting(5, "hubness: index neighbours in an image's mean cosine", minimum=1, maximum=1000)


@dataclass(frozen=True)
class Verification:
    """How a query and a candidate are matched: putative matches, then a pydegensac homography."""

    match_max_distance: float = setting(
        1.1, "largest L2 distance between normalized descriptors of a match", above=0, maximum=2
    )
    mutual: bool = setting(True, "keep mutual nearest neighbours only (--no-mutual: one-way, the host baseline's)")
    min_matches: int = setting(4, "pairs with fewer putative matches score zero inliers", minimum=4, maximum=100_000)
    ransac_threshold: float = setting(
        0.02,
        "RANSAC reprojection threshold as a share of the longer image side (0.02 = 20 px at 1024, 0.0039 = 4 px)",
        above=0,
        maximum=1,
    )
    ransac_threshold_px: float | None = setting(
        None, "RANSAC threshold in pixels (overrides --ransac-threshold)", above=0, maximum=10_000
    )
    ransac_iterations: int = setting(1000, "pydegensac maximum iterations", minimum=1, maximum=10_000_000)
    ransac_confidence: float = setting(1.0, "pydegensac confidence (1.0 runs every iteration)", above=0, maximum=1)
    ransac_seed: int = setting(0, "pydegensac seed (-1: random)", minimum=-1, maximum=2**31 - 1)


@dataclass(frozen=True)
class Scoring:
    """How global cosines and inliers become a submission."""

    rerank: int = setting(
        20, "candidates verified per query; the time budget may lower it; 0 = global only", minimum=0, maximum=10_000
    )
    top_k: int = setting(1, "recognition: neighbours whose scores are summed per landmark", minimum=1, maximum=1000)
    max_inlier_score: int = setting(
        40, "recognition: C in the candidate score min(inliers, C)/C + cosine", minimum=1, maximum=100_000
    )
    nonlandmark_penalty: float = setting(
        0.0, "confidence x (1 - penalty x non-landmark share of the top-k)", minimum=0, maximum=100
    )
    calibrate: bool = setting(
        True,
        "give unverified candidates the local score verified ones earn at the same "
        "cosine, so queries cut from reranking rank fairly",
    )


@dataclass(frozen=True)
class Budget:
    """Time: the limit, its margin, the plan of the database pass and the pace of reranking."""

    time_budget_h: float = setting(NOTEBOOK_LIMIT_H, "wall-clock hours the whole run may take", above=0, maximum=1000)
    safety_margin: float = setting(SAFETY_MARGIN, "share of the budget kept free", minimum=0, below=1)
    plan: str = setting(
        "auto",
        "auto: time a probe and lower the global settings until the run fits; fixed: keep them",
        choices=("auto", "fixed"),
    )
    rerank_reserve: float = setting(0.2, "share of the budget the plan keeps for local reranking", minimum=0, below=1)
    probe_images: int = setting(32, "database images timed per setting when planning", minimum=1, maximum=100_000)
    warmup_queries: int = setting(20, "queries reranked first to measure the local rates", minimum=1, maximum=1_000_000)
    rerank_batch: int = setting(
        500, "queries reranked between two re-plannings of the depth", minimum=1, maximum=1_000_000
    )
    max_rerank_queries: int | None = setting(
        None, "rerank at most this many queries (most confident first)", minimum=0, maximum=10**9
    )
    write_every_s: float = setting(
        300.0, "seconds between two rewrites of WORK/submission_latest.csv while reranking", minimum=0, maximum=10**6
    )


@dataclass(frozen=True)
class Run:
    """What to run on, where to write, and this machine's resources (not part of a settings file)."""

    task: str = setting(None, "which competition", choices=tuple(IMAGE_SPLITS), required=True)
    data: Path = setting(
        None,
        "competition folder: train.csv, train/, test/ (recognition) or index/, test/ "
        "(retrieval), and sample_submission.csv",
        required=True,
    )
    model: tuple[Path, ...] = setting(
        None,
        "DELG SavedModel folder: our TF2 export or Google's released TF1 "
        "model; give it again for an ensemble (--model A --model B)",
        required=True,
        repeat=True,
    )
    model_weights: tuple[float, ...] | None = setting(
        None, "ensemble: one weight per --model (default all 1)", above=0, maximum=1000
    )
    local_model: Path | None = setting(
        None, "ensemble: the model whose local features verify (default: the first --model)"
    )
    out: Path = setting(Path("submission.csv"), "submission file to write")
    work: Path = setting(Path("work/submission"), "cache and log folder")
    settings: Path | None = setting(
        None,
        "JSON settings file (local_eval tune's tuned.json, or a run's "
        "WORK/settings.json); command-line flags win over it",
    )
    preset: str | None = setting(
        None,
        "a published recipe under the settings file and flags: host-2020 (Kaggle 2020 baseline) or delg-paper",
        choices=("host-2020", "delg-paper"),
    )
    nonlandmark_dir: Path | None = setting(
        None,
        "folder of images known to show no landmark: non-landmark "
        "suppression and the penalty compare queries and database to them",
    )
    train_data: Path | None = setting(
        None,
        "retrieval: a GLDv2 train folder (train.csv, train/) whose labelled images the label transfer "
        "(--bridge-weight) votes with; its global pass runs here",
    )
    train_descriptors: Path | None = setting(
        None,
        "retrieval: the train set's descriptors and labels written by `python -m export train-descriptors` "
        "from this --model, instead of --train-data's pass",
    )
    probe: int | None = setting(
        None,
        "time this many images of every stage, write WORK/timing.json with the "
        "projection to this data's full size, and stop",
        minimum=1,
        maximum=10**6,
    )
    shard: str = setting("0/1", "i/n: extract only the i-th of n slices of the database descriptors, then stop")
    workers: int = setting(
        os.cpu_count() or 1, "processes verifying pairs; 0 or 1 verifies in this process", minimum=0, maximum=1024
    )
    devices: str = setting(
        "all",
        "devices of the global and local passes, one stream of batches each: all (every "
        "GPU, else every CPU device; $KIT_LOGICAL_DEVICES=N splits a CPU into N) or a count",
    )
    decode_threads: int = setting(4, "threads decoding images ahead of the model", minimum=1, maximum=256)
    decode_timeout_s: float = setting(
        120.0,
        "seconds the run waits for one image to be read and decoded; a slower one is logged and treated as unreadable",
        above=0,
        maximum=86_400,
    )
    prefetch: int = setting(64, "images decoded ahead of the model", minimum=1, maximum=1024)
    chunk_size: int = setting(10_000, "images per cached global-descriptor chunk", minimum=1, maximum=1_000_000)
    local_cache_gb: float = setting(
        10.0, "disk kept for cached local features; the oldest go first", above=0, maximum=10**6
    )
    knn_block_mb: int = setting(
        512, "memory for one block of the query x database similarity matrix", minimum=1, maximum=10**6
    )
    ram_gb: float | None = setting(
        None,
        "memory of this machine in GB (default: the cgroup limit or /proc/meminfo); "
        "give less to plan for a smaller machine",
        above=0,
        maximum=10**6,
    )

    def verifying_model(self) -> Path:
        return self.local_model or self.model[0]


SECTIONS = {
    "extraction": Extraction,
    "global_stage": Global,
    "verification": Verification,
    "scoring": Scoring,
    "budget": Budget,
}
# Each task's own defaults, over the sections' and under a preset. The verification and scoring defaults above and
# each task's rerank depth were chosen by `local_eval tune` on three synthetic competitions (seeds 21-23, averaged
# with `tune-merge`, chosen on Public); docs/defaults-and-tuning.md has the tables and the command that reproduces
# them. Retrieval's global stage (lighter database whitening, alpha-QE n 1, DBA n 3 at alpha 5) raised global-only and
# reranked mAP@100 on five synthetic competitions, two of them (seeds 44, 45) held out from the choice; on recognition
# it lowered the verified GAP. docs/global-stage.md has the figures. Retrieval's label transfer (at work with
# --train-data or --train-descriptors) and hubness correction raised global-only mAP@100 on five synthetic
# competitions (seeds 51-55; the weights chosen on the demo and seed 51); docs/train-set-retrieval.md has the table.
TASK_DEFAULTS: dict[str, dict] = {
    "recognition": {},
    "retrieval": {
        "rerank": 100,
        "whiten_shrinkage": 0.02,
        "qe_n": 1,
        "dba_n": 3,
        "dba_alpha": 5.0,
        "bridge_weight": 0.2,
        "hubness_weight": 0.25,
    },
}
# Published recipes. host-2020: Kaggle's 2020 recognition baseline (3 scales, one-way matches within 0.9,
# 20 px, 1000 iterations at confidence 1, score min(inliers, 20)/20 + cosine over the top 3 of 3 reranked; it
# also used an attention threshold of 175, which fits Google's released model only: pass it yourself).
# delg-paper: the DELG paper's retrieval reranking (DELF's perform_retrieval: top 100, one-way matches within
# 1.0, 20 px residual). Neither suppressed non-landmarks, whitened on the database, expanded queries or database, nor
# used a train set or corrected hubs.
PRESETS: dict[str, dict] = {
    "host-2020": {
        "scales": (0.7071, 1.0, 1.4142),
        "global_scale_indices": (0, 1, 2),
        "rerank": 3,
        "top_k": 3,
        "global_top_k": 3,
        "max_inlier_score": 20,
        "match_max_distance": 0.9,
        "mutual": False,
        "min_matches": 5,
        "ransac_threshold_px": 20.0,
        "ransac_iterations": 1000,
        "ransac_confidence": 1.0,
        "nonlandmark_penalty": 0.0,
        "calibrate": False,
        "suppression": False,
        "whiten": "off",
        "qe_n": 0,
        "dba_n": 0,
        "bridge_weight": 0.0,
        "hubness_weight": 0.0,
    },
    "delg-paper": {
        "scales": DELG_IMAGE_SCALES,
        "global_scale_indices": DELG_GLOBAL_SCALE_INDICES,
        "rerank": 100,
        "match_max_distance": 1.0,
        "mutual": False,
        "min_matches": 4,
        "ransac_threshold_px": 20.0,
        "ransac_iterations": 1000,
        "ransac_confidence": 1.0,
        "calibrate": False,
        "suppression": False,
        "whiten": "off",
        "qe_n": 0,
        "dba_n": 0,
        "bridge_weight": 0.0,
        "hubness_weight": 0.0,
    },
}


@dataclass(frozen=True)
class Settings:
    run: Run
    extraction: Extraction
    global_stage: Global
    verification: Verification
    scoring: Scoring
    budget: Budget
    sources: dict = field(default_factory=dict)  # setting name -> task default | preset | settings file | command line


def settings_parser() -> argparse.ArgumentParser:
    return build_parser(DESCRIPTION, [Run, *SECTIONS.values()], TASK_DEFAULTS)


def parse_settings(argv: list[str] | None = None) -> Settings:
    """The layered settings of a run: defaults < the task's (TASK_DEFAULTS) < --preset < --settings file <
    command-line flags."""
    given = vars(settings_parser().parse_args(argv))
    sections, sources = layer_settings(given, PRESETS, {"run": Run, **SECTIONS}, SECTIONS, TASK_DEFAULTS)
    run_names = {f.name for f in fields(Run)}
    settings = Settings(**sections, sources={k: v for k, v in sources.items() if k not in run_names})
    check_consistency(settings)
    return settings


def check_consistency(settings: Settings) -> None:
    ext, run = settings.extraction, settings.run
    bad = [i for i in ext.global_scale_indices if i >= len(ext.scales)]
    if bad:
        raise InputError(f"--global-scale-indices {bad[0]} is out of range for {len(ext.scales)} --scales")
    if run.model_weights is not None and len(run.model_weights) != len(run.model):
        raise InputError(f"--model-weights gives {len(run.model_weights)} weights for {len(run.model)} --model")
    parse_shard(run.shard)
    check_train_set(run)


def check_train_set(run: Run) -> None:
    """--train-data or --train-descriptors: one of them, for retrieval, and a file of one model."""
    if run.train_data is None and run.train_descriptors is None:
        return
    flag = "--train-data" if run.train_data is not None else "--train-descriptors"
    if run.task != "retrieval":
        raise InputError(f"{flag} is for --task retrieval (recognition's database is its train set)")
    if run.train_data is not None and run.train_descriptors is not None:
        raise InputError("--train-data and --train-descriptors together: give one train set")
    if run.train_descriptors is not None and len(run.model) > 1:
        raise InputError("--train-descriptors holds one model's descriptors: an ensemble needs --train-data")
