"""Landmark recognition / retrieval submission: DELG global kNN, then local reranking inside a time budget.

One self-contained file to paste into a Kaggle notebook or run as a script:

    python main.py --task recognition --data ../input/landmark-recognition-2021 \
        --model ../input/delg-model --out submission.csv [--settings tuned.json] [--preset host-2020]

It reads top to bottom: 1. settings, 2. inputs, 3. global descriptors, 4. nearest neighbours,
5. local features and verification, 6. scoring, 7. time budget, 8. main. Only numpy, pandas,
tensorflow, pydegensac, scikit-learn, tqdm, Pillow and the standard library are used.

Settings come in four small sections (extraction, verification, scoring, budget), each a dataclass whose
fields are also the flags. They are layered: the script's defaults, then --preset, then the --settings file,
then the flags given on the command line. WORK/settings.json records what a run used and where each value
came from; give it back as --settings to run the same way again.

Files it leaves: --out (all-empty at once, then global-only, then the reranked result every --write-every-s
seconds and at the end), WORK/settings.json, WORK/timing.json (items and seconds per stage, and the plan of
the database pass), WORK/submission_global_only.csv, WORK/neighbours.npz (every query's candidates and
cosines), WORK/verified_pairs.csv (id, rank, candidate, cosine, inliers of every verified pair), and its
caches: WORK/global/<split>/chunk_*.npz (resumable) and WORK/local/<split>/<id>.npz, each deleted when its key
in WORK/cache_key.json (the model's files and the settings the features depend on) no longer matches.

The kit (local_eval: replay, tune, show; tests and benches) imports only the names in KIT_API.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pydegensac
import tensorflow as tf
from PIL import Image
from sklearn.isotonic import IsotonicRegression
from threadpoolctl import threadpool_limits  # installed with scikit-learn
from tqdm import tqdm

log = logging.getLogger("submission")

KIT_API = (  # the names the kit (local_eval, bench, demo) may use; everything else may change without notice
    "KIT_API", "DELG_IMAGE_SCALES", "DELG_GLOBAL_SCALE_INDICES", "DELG_MAX_IMAGE_SIDE", "DELG_MAX_FEATURE_NUM",
    "DELG_ATTENTION_ABS_THRESHOLD", "NOTEBOOK_LIMIT_H", "TIMING_STAGES", "IMAGE_SPLITS", "RETRIEVAL_SIZE",
    "SECTIONS", "PRESETS", "DEFAULT_RERANK", "Settings", "Extraction", "Verification", "Scoring", "Budget",
    "InputError", "parse_settings", "read_settings_record", "DelgSavedModel", "read_test_ids", "read_train_labels",
    "list_image_ids", "image_path", "decode_image", "extract_global", "load_global", "cached_global", "knn",
    "LocalFeatures", "local_path", "extract_local", "load_local", "putative_matches", "matches_in",
    "ransac_inliers", "ransac_matches", "count_inliers", "pixel_threshold", "recognition_predictions",
    "retrieval_order", "nonlandmark_shares", "expected_local_scores", "rerank_order", "KNN_Q_BLOCK", "KNN_DB_CHUNK",
    "ladder", "BATCH_SIGNATURES", "main",
)

# %% 1. Settings
# DELG extraction defaults (a copy of train/config.py: this file imports nothing from the kit; a test ties them).
DELG_IMAGE_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
DELG_GLOBAL_SCALE_INDICES = (3, 4, 5)
DELG_MAX_IMAGE_SIDE = 1024
DELG_MAX_FEATURE_NUM = 1000
DELG_ATTENTION_ABS_THRESHOLD = 0.0
NOTEBOOK_LIMIT_H = 9.0  # Kaggle's notebook limit of most years (a copy of common/kit.py)
IMAGE_SPLITS = {"recognition": ("train", "test"), "retrieval": ("index", "test")}
TIMING_STAGES = ("global_db", "global_query", "knn", "local_features", "verification")
RETRIEVAL_SIZE = 100  # index ids submitted per query
KNN_DB_CHUNK = 8192  # database rows per numpy multiply (measured best with KNN_Q_BLOCK on 2 cores)
KNN_Q_BLOCK = 512  # queries per numpy multiply
# Global descriptors are computed on a few fixed sizes so that images can be batched (section 3).
BUCKET_ASPECTS = (9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9)  # width / height
BUCKET_SIDES = (1.0, 0.75, 0.5, 0.375, 0.25)  # longer side, as a share of --global-max-side
PROBE_SHARE = 0.01  # of the budget, at most, for timing one setting of the ladder (per pass)
ID_PATTERN = re.compile(r"[0-9A-Za-z_-]{3,}")  # an image id names its own folders a/b/c: 3 characters at least


def setting(default, help_text: str, **checks):
    """A settings field: its default, its --help and its checks (minimum, above, maximum, below, choices)."""
    return field(default=default, metadata={"help": help_text, **checks})


@dataclass(frozen=True)
class Extraction:
    """How images become features; with the model's files, what the feature caches depend on."""

    scales: tuple[float, ...] = setting(DELG_IMAGE_SCALES, "image scales of the local features", above=0)
    global_scale_indices: tuple[int, ...] = setting(
        DELG_GLOBAL_SCALE_INDICES, "indices into --scales whose global descriptors are summed", minimum=0)
    max_image_side: int = setting(DELG_MAX_IMAGE_SIDE, "longer image side for local features (downscaled to it)",
                                  minimum=32)
    global_max_side: int = setting(DELG_MAX_IMAGE_SIDE, "longer side of the largest global size bucket", minimum=64)
    min_image_side: int = setting(32, "a shorter side below this is padded up to it (local features)", minimum=1)
    max_features: int = setting(DELG_MAX_FEATURE_NUM, "local features kept per image, by attention", minimum=1)
    attention_threshold: float = setting(DELG_ATTENTION_ABS_THRESHOLD, "minimum attention score of a local feature")
    global_precision: str = setting("float32", "global pass precision; float16 needs a model exported with "
                                    "--float16", choices=("float32", "float16"))
    global_batch: int = setting(16, "images per batched global call (models exported with global_batch)", minimum=1)
    global_xla: str = setting("auto", "XLA-compiled batched functions (exports hold both): auto lets --plan auto time "
                              "both and keep the faster, off with --plan fixed", choices=("auto", "on", "off"))
    cache_float16: bool = setting(False, "store cached global descriptors as float16 (half the disk and memory)")

    def global_scales(self) -> tuple[float, ...]:
        return tuple(self.scales[i] for i in self.global_scale_indices)


@dataclass(frozen=True)
class Verification:
    """How a query and a candidate are matched: putative matches, then a pydegensac homography."""

    match_max_distance: float = setting(1.1, "largest L2 distance between normalized descriptors of a match",
                                        above=0, maximum=2)
    mutual: bool = setting(True, "keep mutual nearest neighbours only (--no-mutual: one-way, the host baseline's)")
    min_matches: int = setting(4, "pairs with fewer putative matches score zero inliers", minimum=4)
    ransac_threshold: float = setting(0.02, "RANSAC reprojection threshold as a share of the longer image side "
                                      "(0.02 = 20 px at 1024, 0.0039 = 4 px)", above=0, maximum=1)
    ransac_threshold_px: float | None = setting(None, "RANSAC threshold in pixels (overrides --ransac-threshold)",
                                                above=0)
    ransac_iterations: int = setting(1000, "pydegensac maximum iterations", minimum=1)
    ransac_confidence: float = setting(1.0, "pydegensac confidence (1.0 runs every iteration)", above=0, maximum=1)
    ransac_seed: int = setting(0, "pydegensac seed (-1: random)", minimum=-1)


@dataclass(frozen=True)
class Scoring:
    """How global cosines and inliers become a submission."""

    rerank: int | None = setting(None, "candidates verified per query (default: 20 recognition, 100 retrieval); "
                                 "the time budget may lower it; 0 = global only", minimum=0)
    top_k: int = setting(1, "recognition: neighbours whose scores are summed per landmark", minimum=1)
    max_inlier_score: int = setting(80, "recognition: C in the candidate score min(inliers, C)/C + cosine",
                                    minimum=1)
    nonlandmark_penalty: float = setting(0.0, "confidence x (1 - penalty x non-landmark share of the top-k)",
                                         minimum=0)
    calibrate: bool = setting(True, "give unverified candidates the local score verified ones earn at the same "
                              "cosine, so queries cut from reranking rank fairly")


@dataclass(frozen=True)
class Budget:
    """Time: the limit, its margin, the plan of the database pass and the pace of reranking."""

    time_budget_h: float = setting(NOTEBOOK_LIMIT_H, "wall-clock hours the whole run may take", above=0)
    safety_margin: float = setting(0.15, "share of the budget kept free", minimum=0, below=1)
    plan: str = setting("auto", "auto: time a probe and lower the global settings until the run fits; "
                        "fixed: keep them", choices=("auto", "fixed"))
    rerank_reserve: float = setting(0.2, "share of the budget the plan keeps for local reranking", minimum=0,
                                    below=1)
    probe_images: int = setting(32, "database images timed per setting when planning", minimum=1)
    warmup_queries: int = setting(20, "queries reranked first to measure the local rates", minimum=1)
    rerank_batch: int = setting(500, "queries reranked between two re-plannings of the depth", minimum=1)
    max_rerank_queries: int | None = setting(None, "rerank at most this many queries (most confident first)",
                                             minimum=0)
    write_every_s: float = setting(300.0, "seconds between two rewrites of --out while reranking", minimum=0)


@dataclass(frozen=True)
class Run:
    """What to run on, where to write, and this machine's resources (not part of a settings file)."""

    task: str = setting(None, "which competition", choices=tuple(IMAGE_SPLITS), required=True)
    data: Path = setting(None, "competition folder: train.csv, train/, test/ (recognition) or index/, test/ "
                         "(retrieval), and sample_submission.csv", required=True)
    model: Path = setting(None, "DELG SavedModel folder: our TF2 export or Google's released TF1 model",
                          required=True)
    out: Path = setting(Path("submission.csv"), "submission file to write")
    work: Path = setting(Path("work/submission"), "cache and log folder")
    settings: Path | None = setting(None, "JSON settings file (local_eval tune's tuned.json, or a run's "
                                    "WORK/settings.json); command-line flags win over it")
    preset: str | None = setting(None, "a published recipe under the settings file and flags: host-2020 "
                                 "(Kaggle 2020 baseline) or delg-paper", choices=("host-2020", "delg-paper"))
    nonlandmark_dir: Path | None = setting(None, "folder of images known to show no landmark: a test image whose "
                                           "neighbours are mostly among them gets a lower confidence")
    probe: int | None = setting(None, "time this many images of every stage, write WORK/timing.json with the "
                                "projection to this data's full size, and stop", minimum=1)
    shard: str = setting("0/1", "i/n: extract only the i-th of n slices of the database descriptors, then stop")
    workers: int = setting(os.cpu_count() or 1, "processes verifying pairs; 0 or 1 verifies in this process",
                           minimum=0)
    decode_threads: int = setting(4, "threads decoding images ahead of the model", minimum=1)
    prefetch: int = setting(64, "images decoded ahead of the model", minimum=1)
    chunk_size: int = setting(10_000, "images per cached global-descriptor chunk", minimum=1)
    local_cache_gb: float = setting(10.0, "disk kept for cached local features; the oldest go first", above=0)
    knn_block_mb: int = setting(512, "memory for one block of the query x database similarity matrix", minimum=1)


SECTIONS = {"extraction": Extraction, "verification": Verification, "scoring": Scoring, "budget": Budget}
# The verification and scoring defaults above and DEFAULT_RERANK were chosen by `local_eval tune` on three
# synthetic competitions (seeds 21-23, averaged with `tune-merge`, chosen on Public); README "Defaults" has the
# tables and the command that reproduces them.
DEFAULT_RERANK = {"recognition": 20, "retrieval": 100}
# Published recipes. host-2020: Kaggle's 2020 recognition baseline (3 scales, one-way matches within 0.9,
# 20 px, 1000 iterations at confidence 1, score min(inliers, 20)/20 + cosine over the top 3 of 3 reranked; it
# also used an attention threshold of 175, which fits Google's released model only: pass it yourself).
# delg-paper: the DELG paper's retrieval reranking (DELF's perform_retrieval: top 100, one-way matches within
# 1.0, 20 px residual).
PRESETS: dict[str, dict] = {
    "host-2020": {"scales": (0.7071, 1.0, 1.4142), "global_scale_indices": (0, 1, 2), "rerank": 3, "top_k": 3,
                  "max_inlier_score": 20, "match_max_distance": 0.9, "mutual": False, "min_matches": 5,
                  "ransac_threshold_px": 20.0, "ransac_iterations": 1000, "ransac_confidence": 1.0,
                  "nonlandmark_penalty": 0.0, "calibrate": False},
    "delg-paper": {"scales": DELG_IMAGE_SCALES, "global_scale_indices": DELG_GLOBAL_SCALE_INDICES, "rerank": 100,
                   "match_max_distance": 1.0, "mutual": False, "min_matches": 4, "ransac_threshold_px": 20.0,
                   "ransac_iterations": 1000, "ransac_confidence": 1.0, "calibrate": False},
}


@dataclass(frozen=True)
class Settings:
    run: Run
    extraction: Extraction
    verification: Verification
    scoring: Scoring
    budget: Budget
    sources: dict = field(default_factory=dict)  # setting name -> preset | settings file | command line

    def rerank_depth(self) -> int:
        return DEFAULT_RERANK[self.run.task] if self.scoring.rerank is None else self.scoring.rerank


class InputError(Exception):
    """A problem with the inputs: printed as one line, exit status 2."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(element type, is a tuple) of a settings field, from its annotation."""
    kind = str(f.type).removesuffix(" | None")
    names = {"int": int, "float": float, "str": str, "bool": bool, "Path": Path}
    if kind.startswith("tuple["):
        return names[kind.removeprefix("tuple[").split(",")[0]], True
    return names[kind], False


def build_parser() -> argparse.ArgumentParser:
    """One flag per settings field. Unset flags stay out of the result, so the layers below them show through."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for cls in (Run, *SECTIONS.values()):
        group = parser.add_argument_group(cls.__name__.lower(), cls.__doc__)
        for f in fields(cls):
            kind, is_tuple = field_type(f)
            meta = f.metadata
            options = {"default": argparse.SUPPRESS, "help": meta["help"]}
            if meta.get("required"):
                options["required"] = True
            elif f.default is not None:
                shown = " ".join(map(str, f.default)) if is_tuple else f.default
                options["help"] += f" (default: {shown})"
            if kind is bool:
                options["action"] = argparse.BooleanOptionalAction
            else:
                options["type"] = kind
                options["nargs"] = "+" if is_tuple else None
                options["choices"] = meta.get("choices")
            group.add_argument(flag(f.name), **options)
    return parser


def read_settings_file(path: Path) -> dict:
    """{setting: value} from a JSON file of sections ({"verification": {...}, ...}); other top-level keys
    (a record's "run", "sources", "plan", a tune's "about") are ignored."""
    try:
        content = json.loads(path.read_text())
    except OSError as err:
        raise InputError(f"--settings {path}: cannot read it ({err.strerror})") from None
    except ValueError as err:
        raise InputError(f"--settings {path}: not JSON ({err})") from None
    if not isinstance(content, dict):
        raise InputError(f"--settings {path}: expected an object of sections {', '.join(SECTIONS)}")
    values = {}
    for section, cls in SECTIONS.items():
        given = content.get(section, {})
        known = {f.name: f for f in fields(cls)}
        if not isinstance(given, dict):
            raise InputError(f"--settings {path}: '{section}' must be an object")
        for name, value in given.items():
            if name not in known:
                raise InputError(f"--settings {path}: unknown setting '{section}.{name}'")
            values[name] = coerce(known[name], value, f"--settings {path}: '{section}.{name}'")
    return values


def coerce(f: dataclasses.Field, value, where: str):
    """value as the field's type (a JSON number for a float, a list for a tuple); InputError naming `where`."""
    kind, is_tuple = field_type(f)
    if value is None and "None" in str(f.type):
        return None

    def fits(item) -> bool:
        if kind is bool or isinstance(item, bool):
            return kind is bool and isinstance(item, bool)
        return isinstance(item, (int, float) if kind is float else str if kind is Path else kind)

    items = value if is_tuple and isinstance(value, list) else [value]
    if (is_tuple and not (isinstance(value, list) and value)) or not all(fits(item) for item in items):
        expected = f"a non-empty list of {kind.__name__}" if is_tuple else kind.__name__
        raise InputError(f"{where} must be {expected}, got {value!r}")
    items = [kind(item) for item in items]
    return tuple(items) if is_tuple else items[0]


def check_settings(section) -> None:
    """Every field within its range: one InputError naming the flag."""
    for f in fields(section):
        value, meta = getattr(section, f.name), f.metadata
        for item in value if isinstance(value, tuple) else [value]:
            if item is None or isinstance(item, (bool, str, Path)):
                continue
            bounds = [("minimum", lambda v, b: v >= b, ">="), ("above", lambda v, b: v > b, ">"),
                      ("maximum", lambda v, b: v <= b, "<="), ("below", lambda v, b: v < b, "<")]
            for key, holds, sign in bounds:
                if key in meta and not (math.isfinite(item) and holds(item, meta[key])):
                    raise InputError(f"{flag(f.name)} must be {sign} {meta[key]}, got {item}")


def parse_settings(argv: list[str] | None = None) -> Settings:
    """The layered settings of a run: defaults < --preset < --settings file < command-line flags."""
    given = vars(build_parser().parse_args(argv))
    values, sources = {}, {}
    layers = [("preset " + given["preset"], PRESETS[given["preset"]]) if given.get("preset") else None,
              ("file " + str(given["settings"]), read_settings_file(given["settings"])) if given.get("settings")
              else None,
              ("command line", given)]
    for source, layer in filter(None, layers):
        values.update(layer)
        sources.update({name: source for name in layer})
    sections = {}
    for name, cls in (("run", Run), *SECTIONS.items()):
        section = cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})
        section = dataclasses.replace(section, **{f.name: tuple(getattr(section, f.name)) for f in fields(cls)
                                                  if isinstance(getattr(section, f.name), list)})
        check_settings(section)
        sections[name] = section
    settings = Settings(**sections, sources={k: v for k, v in sources.items() if k not in {f.name for f in
                                                                                          fields(Run)}})
    check_consistency(settings)
    return settings


def check_consistency(settings: Settings) -> None:
    ext = settings.extraction
    bad = [i for i in ext.global_scale_indices if i >= len(ext.scales)]
    if bad:
        raise InputError(f"--global-scale-indices {bad[0]} is out of range for {len(ext.scales)} --scales")
    parse_shard(settings.run.shard)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like i/n, got {text!r}") from None
    if not 0 <= index < count:
        raise InputError(f"--shard {text}: need 0 <= i < n")
    return index, count


def settings_record(settings: Settings, plan: dict | None = None) -> dict:
    """The run's settings as JSON: one object per section, where each value came from, the plan's choice."""
    as_json = lambda section: json.loads(json.dumps(dataclasses.asdict(section), default=str))
    record = {name: as_json(getattr(settings, name)) for name in ("run", *SECTIONS)}
    record["scoring"]["rerank"] = settings.rerank_depth()
    record["sources"] = settings.sources
    if plan is not None:
        record["plan"] = plan
    return record


def read_settings_record(work: Path) -> Settings | None:
    """The settings a finished run recorded in WORK/settings.json (None when it left none)."""
    path = Path(work) / "settings.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    run = record["run"]
    argv = ["--task", run["task"], "--data", run["data"], "--model", run["model"], "--work", str(work),
            "--settings", str(path)]
    return parse_settings(argv)


# %% 2. Inputs
def read_table(path: Path, **options) -> pd.DataFrame:
    """A CSV file (a header line and zero or more rows); a clear error when missing or without a header."""
    if not path.is_file():
        raise InputError(f"{path} not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, **options)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path} is empty: it needs at least a header line") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a CSV file ({str(err).splitlines()[0]})") from None


def check_columns(frame: pd.DataFrame, path: Path, columns: set[str]) -> None:
    missing = columns - set(frame.columns)
    if missing:
        raise InputError(f"{path} lacks columns {sorted(missing)}")


def check_ids(ids: pd.Series, path: Path) -> None:
    """Every id a valid image id, none twice; the error names the file, line and id."""
    bad = np.flatnonzero(~ids.str.fullmatch(ID_PATTERN.pattern).to_numpy(bool))
    if len(bad):
        raise InputError(f"{path} line {bad[0] + 2}: id {ids.iloc[bad[0]]!r} is not an image id "
                         "(3 or more letters, digits, _ or -)")
    repeated = np.flatnonzero(ids.duplicated().to_numpy())
    if len(repeated):
        first = int(np.flatnonzero((ids == ids.iloc[repeated[0]]).to_numpy())[0])
        raise InputError(f"{path} line {repeated[0] + 2}: id {ids.iloc[repeated[0]]} repeats line {first + 2}")


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
        raise InputError(f"{path} line {bad[0] + 2}: id {row['id']}: landmark_id {row['landmark_id']!r} "
                         "is not an integer")
    return frame["id"].tolist(), frame["landmark_id"].astype(np.int64).to_numpy()


def list_image_ids(folder: Path) -> list[str]:
    """Ids of the .jpg files under folder (GLDv2 layout); a file whose name is no image id is skipped."""
    if not folder.is_dir():
        raise InputError(f"{folder} not found")
    stems = sorted(p.stem for p in folder.rglob("*.jpg"))
    valid = [s for s in stems if ID_PATTERN.fullmatch(s)]
    if len(valid) < len(stems):
        log.warning("%s: skipping %d files whose names are no image ids", folder, len(stems) - len(valid))
    return valid


def image_path(data: Path, split: str, image_id: str) -> Path:
    """Image 'abcdef…' of a split lives at split/a/b/c/abcdef….jpg."""
    return data / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def round_robin(labels: np.ndarray) -> np.ndarray:
    """Row order taking one image of every landmark before a second of any: a database pass cut short by the
    deadline still covers every landmark."""
    occurrence = pd.Series(labels).groupby(labels).cumcount().to_numpy()
    return np.lexsort((np.arange(len(labels)), occurrence))


def open_rgb(path: Path, layout: Callable[[int, int], tuple[tuple[int, int], tuple[float, ...]]]) -> Image.Image:
    """The file as RGB: layout(width, height) gives the output size and the box of the original to resize into it.
    A JPEG that shrinks is decoded at a reduced scale (PIL's draft mode), which saves most of its decoding time."""
    with Image.open(path) as image:
        width, height = image.size
        size, box = layout(width, height)
        shrink = min(size[0] / (box[2] - box[0]), size[1] / (box[3] - box[1]))
        if shrink < 1:
            image.draft("RGB", (math.ceil(width * shrink), math.ceil(height * shrink)))
        fx, fy = image.size[0] / width, image.size[1] / height
        image = image.convert("RGB")
        box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        if image.size == size and box == (0, 0, *image.size):
            return image
        return image.resize(size, Image.BILINEAR, box=box)


def warn_unreadable(path: Path, err: Exception) -> None:
    log.warning("skipping unreadable image %s: %s", path, (str(err).splitlines() or [type(err).__name__])[0][:200])


def decode_image(path: Path, max_side: int, min_side: int) -> np.ndarray | None:
    """RGB uint8 [H,W,3] for local features: longer side capped, shorter side edge-padded; None (logged) when
    unreadable."""
    def capped(width: int, height: int):
        factor = min(1.0, max_side / max(width, height))
        return (max(1, round(width * factor)), max(1, round(height * factor))), (0, 0, width, height)

    try:
        pixels = np.asarray(open_rgb(path, capped))
    except Exception as err:  # noqa: BLE001 - any unreadable image is skipped, never fatal
        warn_unreadable(path, err)
        return None
    pad_rows, pad_cols = max(0, min_side - pixels.shape[0]), max(0, min_side - pixels.shape[1])
    return np.pad(pixels, [(0, pad_rows), (0, pad_cols), (0, 0)], mode="edge")


def global_bucket(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) of the bucket an image is fed at for its global descriptor: the nearest of
    BUCKET_ASPECTS, and the largest of BUCKET_SIDES (x max_side) not above the image's longer side (the
    smallest when the image is smaller than all). Sides are multiples of 16."""
    aspect = min(BUCKET_ASPECTS, key=lambda a: abs(math.log(width / height / a)))
    sides = [max(16, round(max_side * share / 16) * 16) for share in BUCKET_SIDES]
    long_side = next((side for side in sides if side <= max(width, height)), sides[-1])
    short_side = max(16, round(long_side * min(aspect, 1 / aspect) / 16) * 16)
    return (long_side, short_side) if aspect >= 1 else (short_side, long_side)


def decode_for_global(path: Path, max_side: int) -> np.ndarray | None:
    """RGB uint8 of the image's bucket: the centred part of the image with the bucket's aspect, resized to it (an
    image between 9:16 and 16:9 loses at most ~13% of its longer side; wider ones more). None when unreadable."""
    def centred_crop(width: int, height: int):
        bucket = global_bucket(width, height, max_side)
        scale = max(bucket[0] / width, bucket[1] / height)
        crop_w, crop_h = min(width, bucket[0] / scale), min(height, bucket[1] / scale)
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        return bucket, (left, top, left + crop_w, top + crop_h)

    try:
        return np.asarray(open_rgb(path, centred_crop))
    except Exception as err:  # noqa: BLE001 - any unreadable image is skipped, never fatal
        warn_unreadable(path, err)
        return None


def prefetched(load: Callable, items: Iterable, threads: int, depth: int) -> Iterator:
    """load(item) for each item, in order, computed by `threads` threads up to `depth` items ahead."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(load, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary file beside path, then rename it over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_json(path: Path, content: dict) -> None:
    atomic_save(path, lambda tmp: tmp.write_text(json.dumps(content, indent=1, default=str)))


def check_output_paths(run: Run) -> None:
    """--out must be a file path and --work a folder path that can be created; one error line otherwise."""
    for name, path, is_folder in (("--out", run.out, False), ("--work", run.work, True)):
        if path.exists() and path.is_dir() != is_folder:
            raise InputError(f"{name} {path} is {'a file' if is_folder else 'a folder'}")
        folder = path if is_folder else path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"{name} {path}: cannot create {folder} ({err.strerror or err})") from None
        if not os.access(folder, os.W_OK):
            raise InputError(f"{name} {path}: {folder} is not writable")


# %% 3. Global descriptors
DELG_INPUTS = ("input_image", "input_scales", "input_max_feature_num", "input_abs_thres",
               "input_global_scales_ind")
DELG_OUTPUTS = ("boxes", "features", "scales", "scores", "global_descriptors")
# (precision, XLA-compiled) -> the batched signature export/delg.py writes for it
BATCH_SIGNATURES = {("float32", False): "global_batch", ("float32", True): "global_batch_xla",
                    ("float16", False): "global_batch_float16", ("float16", True): "global_batch_float16_xla"}


class DelgSavedModel:
    """Calls a DELG SavedModel: TF2 serving_default (and its batched global signatures when exported with them),
    or a TF1 export through .prune() on tensor names."""

    def __init__(self, model_dir: Path, extraction: Extraction):
        if not (model_dir / "saved_model.pb").is_file():
            raise InputError(f"{model_dir} is not a SavedModel folder (no saved_model.pb)")
        self.model = tf.saved_model.load(str(model_dir))
        info = model_dir / "assets" / "export_info.json"  # a global-only export has no local features
        self.has_local = not (info.is_file() and json.loads(info.read_text()).get("global_only", False))
        self.scales = tf.constant(extraction.scales, tf.float32)
        self.global_indices = tf.constant(extraction.global_scale_indices, tf.int32)
        self.max_features = extraction.max_features
        self.threshold = tf.constant(extraction.attention_threshold, tf.float32)
        signatures = getattr(self.model, "signatures", {})
        serving = signatures.get("serving_default")
        if serving is not None and set(DELG_INPUTS) <= set(serving.structured_input_signature[1]):
            self.kind, self.function = "tf2", serving
        else:
            self.kind, self.function = "tf1", self._prune()
        self.batched = {key: signatures[name] for key, name in BATCH_SIGNATURES.items() if name in signatures}
        probe = np.full((1, 64, 64, 3), 128, np.uint8)
        try:
            self.global_dim = int(self.global_batch(probe, extraction.global_scales(), "float32").shape[1])
        except tf.errors.OpError as err:  # a batched function this TensorFlow cannot run: the contract still works
            log.warning("the batched global functions fail here (%s): one image per call",
                        str(err).strip().splitlines()[0][:200])
            self.batched = {}
            self.global_dim = int(self.global_batch(probe, extraction.global_scales(), "float32").shape[1])
        names = [BATCH_SIGNATURES[key] for key in self.batched]
        log.info("loaded %s DELG model from %s (global dimension %d, batched global: %s)", self.kind, model_dir,
                 self.global_dim, ", ".join(names) or "no")

    def _prune(self):
        feeds = [name for name in DELG_INPUTS if self._has_tensor(name)]
        self.tf1_feeds = feeds
        return self.model.prune([f"{name}:0" for name in feeds], [f"{name}:0" for name in DELG_OUTPUTS])

    def _has_tensor(self, name: str) -> bool:
        try:
            self.model.graph.get_operation_by_name(name)
            return True
        except (KeyError, AttributeError):
            return False

    def __call__(self, image: np.ndarray, max_features: int, scales: tf.Tensor | None = None,
                 global_indices: tf.Tensor | None = None) -> dict[str, np.ndarray]:
        """The DELG contract on one image: boxes, features, scales, scores, global_descriptors."""
        if scales is None:
            scales, global_indices = self.scales, self.global_indices
        elif global_indices is None:
            global_indices = tf.range(tf.size(scales))
        inputs = {"input_image": tf.constant(image), "input_scales": scales,
                  "input_max_feature_num": tf.constant(max_features, tf.int32), "input_abs_thres": self.threshold,
                  "input_global_scales_ind": global_indices}
        if self.kind == "tf2":
            outputs = self.function(**inputs)
        else:
            outputs = dict(zip(DELG_OUTPUTS, self.function(*[inputs[name] for name in self.tf1_feeds]),
                               strict=True))
        return {name: value.numpy() for name, value in outputs.items()}

    def global_descriptor(self, image: np.ndarray, global_scales: tuple[float, ...]) -> np.ndarray:
        """One image through the contract: L2-normalize each scale's descriptor, sum, L2-normalize (as DELG)."""
        scales = tf.constant(global_scales, tf.float32)
        raw = self(image, max_features=0, scales=scales)["global_descriptors"]
        return l2_normalize(l2_normalize(np.atleast_2d(raw).astype(np.float32)).sum(axis=0))

    def global_batch(self, images: np.ndarray, global_scales: tuple[float, ...], precision: str,
                     xla: bool = False) -> np.ndarray:
        """Descriptors [B,D] of B images of one size: one batched call when the model has a function for this
        precision (XLA-compiled if asked and present), else one contract call per image."""
        function = self.batched.get((precision, xla)) or self.batched.get((precision, False))
        if function is None:
            return np.stack([self.global_descriptor(image, global_scales) for image in images])
        outputs = function(input_images=tf.constant(images), input_scales=tf.constant(global_scales, tf.float32))
        return outputs["global_descriptors"].numpy().astype(np.float32)

    def local_features(self, image: np.ndarray) -> LocalFeatures:
        """Keypoints [N,2] (box centres, y x), L2-normalized descriptors [N,128] and the image's longer side."""
        outputs = self(image, self.max_features)
        boxes = outputs["boxes"].reshape(-1, 4)
        keypoints = (boxes[:, :2] + boxes[:, 2:]) / 2
        return LocalFeatures(keypoints.astype(np.float32), l2_normalize(outputs["features"].astype(np.float32)),
                             max(image.shape[:2]))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def chunk_path(cache: Path, index: int) -> Path:
    return cache / f"chunk_{index:06d}.npz"


def read_chunk(cache: Path, index: int, ids: list[str], fields_: tuple[str, ...],
               complete: bool = True) -> list[np.ndarray] | None:
    """The named arrays of a cached chunk (only its ids are read for no fields), or None when the chunk is
    missing, unreadable, for other ids, or (with complete) cut short by a deadline."""
    try:
        with np.load(chunk_path(cache, index)) as chunk:
            if chunk["ids"].tolist() == ids and (not complete or bool(chunk["complete"])):
                return [chunk[name] for name in fields_]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    return None


class Batcher:
    """Collects (row, pixels) by image size and calls the model on full batches of one size."""

    def __init__(self, model: DelgSavedModel, extraction: Extraction, descriptors: np.ndarray, ok: np.ndarray):
        self.model, self.ext, self.descriptors, self.ok = model, extraction, descriptors, ok
        self.pending: dict[tuple, list[tuple[int, np.ndarray]]] = {}

    def add(self, row: int, pixels: np.ndarray | None) -> int:
        """Queue one image; the number of images this call finished (computed, or unreadable)."""
        if pixels is None:
            return 1
        group = self.pending.setdefault(pixels.shape, [])
        group.append((row, pixels))
        if len(group) >= self.ext.global_batch:
            return self._run(pixels.shape)
        if sum(map(len, self.pending.values())) > 4 * self.ext.global_batch:  # bounded memory with many sizes
            return self._run(max(self.pending, key=lambda shape: len(self.pending[shape])))
        return 0

    def flush(self) -> int:
        return sum(self._run(shape) for shape in list(self.pending))

    def _run(self, shape: tuple) -> int:
        group = self.pending.pop(shape)
        rows = [row for row, _ in group]
        images = np.stack([pixels for _, pixels in group])
        if (self.ext.global_precision, False) in self.model.batched and len(group) < self.ext.global_batch:
            padding = np.zeros((self.ext.global_batch - len(group), *shape), np.uint8)  # one compiled shape
            images = np.concatenate([images, padding])
        try:
            found = self.model.global_batch(images, self.ext.global_scales(), self.ext.global_precision,
                                            self.ext.global_xla == "on")
            self.descriptors[rows], self.ok[rows] = found[:len(rows)], True
        except Exception as err:  # noqa: BLE001 - one bad image must not end the run: retry them one by one
            log.warning("batched global call failed (%s); retrying its %d images one by one",
                        str(err).splitlines()[0][:200], len(rows))
            for row, pixels in group:
                with contextlib.suppress(Exception):
                    self.descriptors[row] = self.model.global_descriptor(pixels, self.ext.global_scales())
                    self.ok[row] = True
        return len(rows)


StopRule = Callable[[int, float], bool]  # (images done, seconds spent) -> stop now


def extract_global(model: DelgSavedModel, ids: list[str], paths: list[Path], cache: Path, extraction: Extraction,
                   run: Run, shard: tuple[int, int] = (0, 1), stop: StopRule | None = None) -> tuple[int, bool]:
    """Extract and cache, chunk by chunk, every missing global descriptor of this shard, batched by size bucket.
    Returns (images finished, stopped): when stop(finished, seconds) says so, the images still waiting for a
    batch are dropped and the current chunk is saved as it is."""
    size = run.chunk_size
    chunks = [c for c in range(math.ceil(len(ids) / size)) if c % shard[1] == shard[0]]
    todo = [c for c in chunks if read_chunk(cache, c, ids[c * size:(c + 1) * size], ()) is None]
    if len(todo) < len(chunks):
        log.info("%s: %d of %d chunks already cached", cache.name, len(chunks) - len(todo), len(chunks))
    rows = [i for c in todo for i in range(c * size, min(len(ids), (c + 1) * size))]
    load = lambda i: decode_for_global(paths[i], extraction.global_max_side)
    images = prefetched(load, rows, run.decode_threads, run.prefetch)
    dtype = np.float16 if extraction.cache_float16 else np.float32
    finished, began = 0, time.monotonic()
    with tqdm(total=len(rows), desc=f"global {cache.name}", unit="img") as bar:
        for c in todo:
            chunk_ids = ids[c * size:(c + 1) * size]
            descriptors, ok = np.zeros((len(chunk_ids), model.global_dim), np.float32), np.zeros(len(chunk_ids), bool)
            batcher, stopped = Batcher(model, extraction, descriptors, ok), False
            for j in range(len(chunk_ids)):
                count = batcher.add(j, next(images))
                finished += count
                bar.update(count)
                if stop is not None and stop(finished, time.monotonic() - began):
                    stopped = True
                    break
            if not stopped:
                count = batcher.flush()
                finished += count
                bar.update(count)
            saved = descriptors.astype(dtype)
            atomic_save(chunk_path(cache, c), lambda tmp, d=saved, o=ok, i=chunk_ids, s=stopped:
                        np.savez(tmp, ids=np.array(i), descriptors=d, ok=o, complete=not s))
            if stopped:
                images.close()
                log.warning("%s: stopped after %d of %d images", cache.name, finished, len(rows))
                return finished, True
    return finished, False


def load_global(cache: Path, ids: list[str], chunk_size: int, dim: int = 0,
                allow_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """All cached descriptors [n,D] float32 and their ok mask, in the order of ids, filled chunk by chunk into
    one array (dim: the width when no chunk has any). A missing chunk is an error unless allow_missing (a pass
    cut by the deadline): its rows are then not ok."""
    descriptors, ok = None, np.zeros(len(ids), bool)
    for c in range(math.ceil(len(ids) / chunk_size)):
        rows = slice(c * chunk_size, (c + 1) * chunk_size)
        part = read_chunk(cache, c, ids[rows], ("descriptors", "ok"), complete=False)
        if part is None:
            if not allow_missing:
                raise InputError(f"{cache}: descriptor chunk {c} is missing (run every --shard first)")
            continue
        if descriptors is None:
            descriptors = np.zeros((len(ids), part[0].shape[1]), np.float32)
        descriptors[rows], ok[rows] = part  # float16 chunks are converted in place
    return (np.zeros((len(ids), dim), np.float32) if descriptors is None else descriptors), ok


def cached_global(cache: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, descriptors, ok) of every readable chunk in a cache folder, whatever order it was written in."""
    ids, descriptors, ok = [], [], []
    for path in sorted(cache.glob("chunk_*.npz")):
        with contextlib.suppress(OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile), np.load(path) as chunk:
            part = chunk["ids"].tolist(), chunk["descriptors"].astype(np.float32), chunk["ok"]
            ids += part[0]
            descriptors.append(part[1])
            ok.append(part[2])
    if not ids:
        return [], np.zeros((0, 0), np.float32), np.zeros(0, bool)
    return ids, np.concatenate(descriptors), np.concatenate(ok)


def compact_valid(descriptors: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the ok rows, their row numbers): the rows move to the front in place, so no second full-size copy."""
    rows = np.flatnonzero(ok)
    for start in range(0, len(rows), KNN_DB_CHUNK):  # a row only moves up, past rows already moved
        part = rows[start:start + KNN_DB_CHUNK]
        descriptors[start:start + len(part)] = descriptors[part]
    return descriptors[:len(rows)], rows


# %% 4. Nearest neighbours
def knn(queries: np.ndarray, database: np.ndarray, k: int, block_mb: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products (cosines of normalized rows) in blocks of bounded memory, never the full
    query x database matrix. Returns (scores [nq,k] descending, indices [nq,k]); TensorFlow on a GPU, else numpy."""
    k = min(k, len(database))
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    if tf.config.list_physical_devices("GPU"):
        db_block = min(len(database), max(k, block_mb * 2**20 // 4 // 1024))
        return knn_tensorflow(queries, database, k, q_block=max(1, block_mb * 2**20 // 4 // db_block),
                              db_block=db_block)
    db_chunk = max(k, KNN_DB_CHUNK)
    q_block = max(1, min(KNN_Q_BLOCK, block_mb * 2**20 // 4 // db_chunk))
    return knn_numpy(queries, database, k, q_block=q_block, db_chunk=db_chunk)


def knn_tensorflow(queries: np.ndarray, database: np.ndarray, k: int, q_block: int, db_block: int):
    """GPU kNN: blocked matmul + top_k, merging the blocks' top-k."""
    db_parts = [tf.constant(database[s:s + db_block], tf.float32) for s in range(0, len(database), db_block)]
    scores, indices = [], []
    for start in tqdm(range(0, len(queries), q_block), desc="knn", unit="block", leave=False):
        block = tf.constant(queries[start:start + q_block], tf.float32)
        best_s = best_i = None
        for part_index, part in enumerate(db_parts):
            s, i = tf.math.top_k(tf.matmul(block, part, transpose_b=True), min(k, part.shape[0]))
            i = i + part_index * db_block
            if best_s is not None:
                s, order = tf.math.top_k(tf.concat([best_s, s], axis=1), k)
                i = tf.gather(tf.concat([best_i, i], axis=1), order, batch_dims=1)
            best_s, best_i = s, i
        scores.append(best_s.numpy())
        indices.append(best_i.numpy().astype(np.int64))
    return np.concatenate(scores), np.concatenate(indices)


def knn_numpy(queries: np.ndarray, database: np.ndarray, k: int, q_block: int, db_chunk: int):
    """CPU kNN near the speed of the bare multiply: after the first database chunk only scores above each
    query's current k-th best are looked at, and those are few. Score and mask buffers are reused."""
    queries, database = np.asarray(queries, np.float32), np.asarray(database, np.float32)  # no copy if float32
    db_chunk = max(k, db_chunk)
    scores_buffer = np.empty((min(q_block, len(queries)), db_chunk), np.float32)
    mask_buffer = np.empty(scores_buffer.shape, bool)
    scores, indices = [], []
    for start in tqdm(range(0, len(queries), q_block), desc="knn", unit="block", leave=False):
        block = queries[start:start + q_block]
        best_s = best_i = None
        for chunk_start in range(0, len(database), db_chunk):
            part = database[chunk_start:chunk_start + db_chunk]
            chunk = np.matmul(block, part.T, out=scores_buffer[:len(block), :len(part)])
            if best_s is None:
                best_i = np.argpartition(chunk, len(part) - k, axis=1)[:, len(part) - k:]
                best_s = np.take_along_axis(chunk, best_i, 1)
            else:
                mask = np.greater(chunk, best_s.min(axis=1, keepdims=True), out=mask_buffer[:len(block), :len(part)])
                best_s, best_i = merge_candidates(best_s, best_i, chunk, np.flatnonzero(mask), chunk_start, k)
        order = np.lexsort((best_i, -best_s), axis=1)  # score descending, then index ascending
        scores.append(np.take_along_axis(best_s, order, 1))
        indices.append(np.take_along_axis(best_i, order, 1).astype(np.int64))
    return np.concatenate(scores), np.concatenate(indices)


def merge_candidates(best_s: np.ndarray, best_i: np.ndarray, chunk: np.ndarray, flat: np.ndarray, offset: int,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top-k of its current best and its candidates (flat positions into the chunk)."""
    if len(flat) == 0:
        return best_s, best_i
    rows, cols = np.divmod(flat, chunk.shape[1])
    counts = np.bincount(rows, minlength=len(chunk))
    slots = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
    cand_s = np.full((len(chunk), counts.max()), -np.inf, np.float32)
    cand_i = np.zeros((len(chunk), counts.max()), best_i.dtype)
    cand_s[rows, slots], cand_i[rows, slots] = chunk[rows, cols], cols + offset
    all_s, all_i = np.concatenate([best_s, cand_s], 1), np.concatenate([best_i, cand_i], 1)
    keep = np.argpartition(all_s, all_s.shape[1] - k, axis=1)[:, all_s.shape[1] - k:]
    return np.take_along_axis(all_s, keep, 1), np.take_along_axis(all_i, keep, 1)


def knn_seconds_per_item(dim: int, block_mb: int) -> float:
    """Measured seconds per query x database row of knn on random data the size of one block (for planning)."""
    rng = np.random.default_rng(0)
    queries = l2_normalize(rng.normal(size=(256, dim)).astype(np.float32))
    database = l2_normalize(rng.normal(size=(16_384, dim)).astype(np.float32))
    began = time.monotonic()
    knn(queries, database, RETRIEVAL_SIZE, block_mb)
    return (time.monotonic() - began) / (len(queries) * len(database))


# %% 5. Local features and verification
class LocalFeatures(NamedTuple):
    keypoints: np.ndarray  # [N,2] y, x in the pixels of the image fed to the model
    descriptors: np.ndarray  # [N,128] L2-normalized
    side: int  # longer side of that image: relative RANSAC thresholds scale with it


def local_path(cache: Path, split: str, image_id: str) -> Path:
    return cache / split / f"{image_id}.npz"


def load_local(path: Path) -> LocalFeatures:
    with np.load(path) as features:
        return LocalFeatures(features["keypoints"], features["descriptors"].astype(np.float32),
                             int(features["side"]))


def readable_local(path: Path) -> bool:
    """A cached feature file that opens (a file cut short by a crash does not) and holds every array."""
    try:
        with np.load(path) as features:
            return {"keypoints", "descriptors", "side"} <= set(features.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def trim_local_cache(cache: Path, max_gb: float) -> int:
    """Delete the oldest cached local features until the cache holds at most max_gb; the count deleted.

    At full size the features of every reranked image would not fit on a notebook's disk (~250 KB each)."""
    files = sorted(((f.stat().st_mtime, f.stat().st_size, f) for f in cache.rglob("*.npz")), reverse=True)
    total, deleted = 0, 0
    for _, size, path in files:  # newest first: keep while there is room
        total += size
        if total > max_gb * 2**30:
            path.unlink(missing_ok=True)
            deleted += 1
    return deleted


def extract_local(model: DelgSavedModel, data: Path, images: list[tuple[str, str]], cache: Path,
                  extraction: Extraction, run: Run) -> int:
    """Cache local features of every (split, id) not cached yet or cached unreadably (unreadable image: zero
    features); the count extracted."""
    todo = [(split, i) for split, i in dict.fromkeys(images) if not readable_local(local_path(cache, split, i))]
    load = lambda item: decode_image(image_path(data, *item), extraction.max_image_side, extraction.min_image_side)
    decoded = prefetched(load, todo, run.decode_threads, run.prefetch)
    for (split, image_id), image in zip(todo, tqdm(decoded, total=len(todo), desc="local", unit="img"), strict=True):
        features = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 0), np.float32), 0)
        if image is not None:
            try:
                features = model.local_features(image)
            except Exception as err:  # noqa: BLE001 - one bad image must not end the run
                log.warning("local extraction failed for %s: %s", image_id, str(err).splitlines()[0][:200])
        atomic_save(local_path(cache, split, image_id), lambda tmp, f=features:
                    np.savez(tmp, keypoints=f.keypoints, descriptors=f.descriptors.astype(np.float16), side=f.side))
    return len(todo)


def putative_matches(desc_a: np.ndarray, desc_b: np.ndarray, max_distance: float,
                     mutual: bool) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (a, b): b is a's nearest neighbour within max_distance (and, if mutual, vice versa)."""
    return matches_in(desc_a @ desc_b.T, max_distance, mutual)


def matches_in(similarity: np.ndarray, max_distance: float, mutual: bool) -> tuple[np.ndarray, np.ndarray]:
    """putative_matches from the descriptors' similarity matrix (normalized rows: distance^2 = 2 - 2 similarity)."""
    nearest_b = similarity.argmax(axis=1)
    keep = np.flatnonzero(similarity[np.arange(len(similarity)), nearest_b] >= 1 - max_distance ** 2 / 2)
    if mutual:  # only the kept candidates' columns are searched
        keep = keep[similarity[:, nearest_b[keep]].argmax(axis=0) == keep]
    return keep, nearest_b[keep]


def pixel_threshold(verification: Verification, side_a: int, side_b: int) -> float:
    """The RANSAC threshold in pixels for two images: the pixel override, or the relative threshold times
    the mean of their longer sides."""
    if verification.ransac_threshold_px is not None:
        return verification.ransac_threshold_px
    return verification.ransac_threshold * max(1.0, (side_a + side_b) / 2)


def ransac_inliers(points_a: np.ndarray, points_b: np.ndarray, threshold_px: float,
                   verification: Verification) -> np.ndarray:
    """Inlier mask of a pydegensac homography between matched points; all False when RANSAC fails."""
    try:
        _, mask = pydegensac.findHomography(points_a.astype(np.float64), points_b.astype(np.float64),
                                            px_th=threshold_px, conf=verification.ransac_confidence,
                                            max_iters=verification.ransac_iterations, seed=verification.ransac_seed)
    except Exception:  # noqa: BLE001 - a RANSAC failure scores zero, never ends the run
        mask = None
    return np.zeros(len(points_a), bool) if mask is None else np.asarray(mask, bool).reshape(len(points_a))


def ransac_matches(a: LocalFeatures, b: LocalFeatures,
                   verification: Verification) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Putative matches (indices a, b) and their RANSAC inlier mask; no inliers when there are too few matches."""
    if len(a.descriptors) == 0 or len(b.descriptors) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    ia, ib = putative_matches(a.descriptors, b.descriptors, verification.match_max_distance, verification.mutual)
    if len(ia) < max(4, verification.min_matches):
        return ia, ib, np.zeros(len(ia), bool)
    threshold = pixel_threshold(verification, a.side, b.side)
    return ia, ib, ransac_inliers(a.keypoints[ia], b.keypoints[ib], threshold, verification)


def count_inliers(a: LocalFeatures, b: LocalFeatures, verification: Verification) -> int:
    return int(np.count_nonzero(ransac_matches(a, b, verification)[2]))


_WORKER_SETTINGS: list[Verification] = []


def _init_worker(verification: Verification) -> None:
    """One BLAS thread per worker: small matrix products run several times slower on busy shared cores."""
    _WORKER_SETTINGS[:] = [verification]
    threadpool_limits(1)


def verify_query(task: tuple[Path, list[Path]]) -> list[int]:
    """Inliers between one query and each of its candidates, from their cached local features."""
    query = load_local(task[0])
    return [count_inliers(query, load_local(path), _WORKER_SETTINGS[0]) for path in task[1]]


@contextlib.contextmanager
def verification_pool(verification: Verification, workers: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """Worker processes for verify_query, started once for the whole rerank; None: verify in this process."""
    if workers <= 1:
        _WORKER_SETTINGS[:] = [verification]
        yield None
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _init_worker, (verification,)) as pool:
        yield pool


def verify_all(tasks: list[tuple[Path, list[Path]]], pool: multiprocessing.pool.Pool | None) -> list[list[int]]:
    """verify_query over all tasks, in the pool's processes or (no pool) in this one."""
    progress = lambda results: list(tqdm(results, total=len(tasks), desc="verify", unit="query", leave=False))
    if pool is None:
        with threadpool_limits(1):
            return progress(map(verify_query, tasks))
    return progress(pool.imap(verify_query, tasks, chunksize=4))


# %% 6. Scoring
def local_scores(inliers: np.ndarray, cosines: np.ndarray, scoring: Scoring) -> np.ndarray:
    """min(inliers, C)/C of verified candidates. Unverified ones (inliers < 0) get 0, or with calibration the
    local score verified candidates earn at the same cosine, so that every query's confidence is on one scale
    however deep it was verified."""
    verified = inliers >= 0
    local = np.minimum(np.maximum(inliers, 0), scoring.max_inlier_score) / scoring.max_inlier_score
    if not scoring.calibrate:
        return np.where(verified, local, 0.0)
    return np.where(verified, local, expected_local_scores(cosines[verified], local[verified], cosines))


def expected_local_scores(verified_cosines: np.ndarray, verified_scores: np.ndarray,
                          cosines: np.ndarray) -> np.ndarray:
    """E[local score | cosine]: an increasing (isotonic) fit to the verified pairs, evaluated at `cosines`.
    With fewer than 20 verified pairs there is nothing to learn from: 0."""
    if len(verified_cosines) < 20:
        return np.zeros_like(cosines, np.float64)
    fit = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(verified_cosines, verified_scores)
    return fit.predict(cosines.ravel()).reshape(cosines.shape)


def recognition_predictions(cosines: np.ndarray, neighbours: np.ndarray, inliers: np.ndarray, labels: np.ndarray,
                            scoring: Scoring, nonlandmark_share: np.ndarray,
                            query_ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(landmark, confidence) per query: cosine + local score summed per landmark over the best top_k
    candidates, times the non-landmark penalty; unreadable queries (and empty databases) get confidence NaN."""
    nq = len(cosines)
    if neighbours.shape[1] == 0:
        return np.zeros(nq, np.int64), np.full(nq, np.nan)
    scores = cosines + local_scores(inliers, cosines, scoring)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :scoring.top_k]
    best_scores = np.take_along_axis(scores, best, 1)
    best_labels = labels[np.take_along_axis(neighbours, best, 1)]
    same = best_labels[:, :, None] == best_labels[:, None, :]
    totals = (same * best_scores[:, None, :]).sum(axis=2)  # each position: the total of its landmark
    winner = totals.argmax(axis=1)  # first position of the best landmark: ties go to the better-ranked one
    rows = np.arange(nq)
    penalty = np.maximum(0.0, 1.0 - scoring.nonlandmark_penalty * nonlandmark_share)
    confidence = np.where(query_ok, totals[rows, winner] * penalty, np.nan)
    return best_labels[rows, winner], confidence


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


def retrieval_rows(cosines: np.ndarray, neighbours: np.ndarray, inliers: np.ndarray, db_ids: list[str],
                   query_ok: np.ndarray) -> list[str]:
    order = retrieval_order(cosines, inliers)
    ranked = np.take_along_axis(neighbours, order, 1)
    return [" ".join(db_ids[j] for j in row) if ok else "" for row, ok in zip(ranked, query_ok, strict=True)]


def nonlandmark_shares(query_cos: np.ndarray, nonlandmark_cos: np.ndarray, top_k: int) -> np.ndarray:
    """Per query, the share of non-landmark images among its top_k neighbours of both sets."""
    if nonlandmark_cos.shape[1] == 0:
        return np.zeros(len(query_cos))
    both = np.concatenate([query_cos[:, :top_k], nonlandmark_cos[:, :top_k]], axis=1)
    is_nonlandmark = np.concatenate([np.zeros_like(query_cos[:, :top_k]),
                                     np.ones_like(nonlandmark_cos[:, :top_k])], axis=1)
    best = np.argsort(-both, axis=1, kind="stable")[:, :top_k]
    return np.take_along_axis(is_nonlandmark, best, axis=1).mean(axis=1)


def rerank_order(priority: np.ndarray, query_ok: np.ndarray) -> list[int]:
    """Readable queries, highest global confidence first: when the budget cuts reranking short, the queries at
    the top of GAP's single ranking, where a wrong prediction costs most, have been verified."""
    priority = np.where(query_ok, np.nan_to_num(priority, nan=-np.inf), -np.inf)
    return [int(q) for q in np.argsort(-priority, kind="stable") if query_ok[q]]


def write_submission(path: Path, task: str, test_ids: list[str], rows: list[str]) -> None:
    column = "landmarks" if task == "recognition" else "images"
    frame = pd.DataFrame({"id": test_ids, column: rows})
    atomic_save(path, lambda tmp: frame.to_csv(tmp, index=False))


PAIR_COLUMNS = ["id", "rank", "candidate", "cosine", "inliers"]


def start_verified_pairs(path: Path) -> None:
    """A fresh verified_pairs.csv holding only its header; append_verified_pairs adds each batch."""
    atomic_save(path, lambda tmp: pd.DataFrame(columns=PAIR_COLUMNS).to_csv(tmp, index=False))


def append_verified_pairs(path: Path, query_ids: list[str], db_ids: list[str], neighbours: np.ndarray,
                          cosines: np.ndarray, inliers: np.ndarray) -> None:
    """The verified (query, candidate) pairs of these queries with rank, cosine and inliers (debugging, pictures)."""
    queries, ranks = np.nonzero(inliers >= 0)
    frame = pd.DataFrame({"id": [query_ids[q] for q in queries], "rank": ranks + 1,
                          "candidate": [db_ids[j] for j in neighbours[queries, ranks]],
                          "cosine": np.round(cosines[queries, ranks], 6), "inliers": inliers[queries, ranks]})
    frame.to_csv(path, mode="a", header=False, index=False)


# %% 7. Time budget
class Timing:
    """Items and seconds per stage, against a deadline; saved as WORK/timing.json after every change."""

    def __init__(self, path: Path, task: str, budget: Budget):
        self.path, self.task, self.budget_h = path, task, budget.time_budget_h
        self.start = time.monotonic()
        self.deadline = self.start + budget.time_budget_h * 3600 * (1 - budget.safety_margin)
        self.stages = {name: {"items": 0, "seconds": 0.0} for name in TIMING_STAGES}
        self.rerank_depth = 0
        self.plan: dict = {}

    def add(self, stage: str, items: int, seconds: float) -> None:
        self.stages[stage]["items"] += int(items)
        self.stages[stage]["seconds"] += float(seconds)
        self.save()

    def rate(self, stage: str) -> float | None:
        """Seconds per item measured so far, or None before any item."""
        stage_log = self.stages[stage]
        return stage_log["seconds"] / stage_log["items"] if stage_log["items"] else None

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        record = {"task": self.task, "budget_h": self.budget_h, "rerank_depth": self.rerank_depth,
                  "stages": self.stages, "total_seconds": time.monotonic() - self.start, "plan": self.plan}
        save_json(self.path, record)


class Sizes(NamedTuple):
    """Image counts of a run, for projections."""

    db: int
    queries: int
    nonlandmarks: int


def ladder(extraction: Extraction, model: DelgSavedModel) -> list[tuple[str, Extraction]]:
    """The given global settings, then cheaper ones, each step keeping the previous: float16 (when the model
    has it), one global scale (the one nearest 1), longer side 768, then 512."""
    rungs = [("as given", extraction)]
    step = lambda name, **change: rungs.append((name, dataclasses.replace(rungs[-1][1], **change)))
    if ("float16", False) in model.batched and extraction.global_precision != "float16":
        step("float16", global_precision="float16")
    if len(extraction.global_scale_indices) > 1:
        nearest = min(extraction.global_scale_indices, key=lambda i: abs(math.log(extraction.scales[i])))
        step("1 global scale", global_scale_indices=(nearest,))
    for side in (768, 512):
        if side < rungs[-1][1].global_max_side:
            step(f"max side {side}", global_max_side=side)
    return rungs


def time_global(model: DelgSavedModel, paths: list[Path], extraction: Extraction, run: Run, scratch: Path,
                limit_s: float) -> float:
    """Seconds per image of the global pass (decoding included) on these images: a first untimed pass compiles
    every size they need, the second is timed. A pass that takes more than limit_s stops there, and its rate
    so far (compilation included: pessimistic) is the answer."""
    ids = [f"probe{i:06d}" for i in range(len(paths))]
    probe_run = dataclasses.replace(run, chunk_size=max(1, len(paths)))
    rate = 0.0
    for _ in ("compile", "time"):
        shutil.rmtree(scratch, ignore_errors=True)
        began = time.monotonic()
        finished, stopped = extract_global(model, ids, paths, scratch, extraction, probe_run,
                                           stop=lambda done, seconds: seconds > limit_s)
        rate = (time.monotonic() - began) / max(1, finished)
        if stopped:
            break
    shutil.rmtree(scratch, ignore_errors=True)
    return rate


def project_seconds(global_rate: float, knn_rate: float, sizes: Sizes, budget: Budget) -> dict[str, float]:
    """Projected seconds of each part of a run at these rates; reranking gets its reserved share."""
    return {"global_db": sizes.db * global_rate, "global_query": sizes.queries * global_rate,
            "global_nonlandmark": sizes.nonlandmarks * global_rate, "knn": sizes.queries * sizes.db * knn_rate,
            "rerank_reserve": budget.rerank_reserve * budget.time_budget_h * 3600}


def plan_extraction(model: DelgSavedModel, probe_paths: list[Path], settings: Settings, sizes: Sizes,
                    time_left: float, knn_rate: float, scratch: Path) -> tuple[Extraction, dict]:
    """The first rung of the ladder whose projected run (database, queries, kNN and the rerank reserve) fits
    the time left; the cheapest when none does. Returns it and the plan's record."""
    run, budget = settings.run, settings.budget
    tried = []
    limit_s = PROBE_SHARE * budget.time_budget_h * 3600
    for name, extraction in ladder(settings.extraction, model):
        rate = time_global(model, probe_paths, extraction, run, scratch, limit_s)  # "auto" runs uncompiled
        seconds = project_seconds(rate, knn_rate, sizes, budget)
        fits = sum(seconds.values()) <= time_left
        tried.append({"rung": name, "seconds_per_image": rate, "projected_h": sum(seconds.values()) / 3600,
                      "fits": fits, "global": global_settings(extraction)})
        log.info("plan: %-14s %.4f s/image, projected %.2f h of %.2f h left: %s", name, rate,
                 sum(seconds.values()) / 3600, time_left / 3600, "fits" if fits else "does not fit")
        if fits:
            break
    chosen = tried[-1]
    extraction, chosen["xla"] = choose_xla(model, probe_paths, extraction, run, scratch, limit_s, chosen)
    record = {"mode": "auto", "chosen": chosen["rung"], "fits": chosen["fits"], "rungs": tried,
              "seconds_per_image": chosen["seconds_per_image"], "knn_seconds_per_item": knn_rate,
              "sizes": sizes._asdict(), "time_left_h": time_left / 3600,
              "projection_h": {k: v / 3600 for k, v in project_seconds(chosen["seconds_per_image"], knn_rate, sizes,
                                                                     budget).items()}}
    verb = "fits" if chosen["fits"] else "DOES NOT FIT even so (the database pass will stop at its deadline)"
    log.info("plan: global pass at '%s' (%s): projected %.2f h, %s", chosen["rung"],
             json.dumps(chosen["global"]), chosen["projected_h"], verb)
    return extraction, record


def choose_xla(model: DelgSavedModel, probe_paths: list[Path], extraction: Extraction, run: Run, scratch: Path,
               limit_s: float, chosen: dict) -> tuple[Extraction, dict | None]:
    """--global-xla auto: time the XLA-compiled function of the chosen setting too and keep the faster (XLA
    removes per-layer overhead on a GPU; on a CPU it is slower). The setting and what was measured."""
    if extraction.global_xla != "auto":
        return extraction, None
    plain = dataclasses.replace(extraction, global_xla="off")
    if (extraction.global_precision, True) not in model.batched:
        return plain, None
    compiled = dataclasses.replace(extraction, global_xla="on")
    rate = time_global(model, probe_paths, compiled, run, scratch, limit_s)
    faster = rate < chosen["seconds_per_image"]
    log.info("plan: XLA-compiled %.4f s/image against %.4f without: %s", rate, chosen["seconds_per_image"],
             "XLA" if faster else "no XLA")
    if faster:
        chosen["seconds_per_image"] = rate
    return (compiled if faster else plain), {"seconds_per_image": rate, "used": faster}


def global_settings(extraction: Extraction) -> dict:
    return {"global_scales": list(extraction.global_scales()), "global_max_side": extraction.global_max_side,
            "global_precision": extraction.global_precision}


def plan_depth(timing: Timing, queries_left: int, max_depth: int, new_image_share: float) -> int:
    """Deepest rerank (<= max_depth) whose projected cost for the remaining queries fits the time left; at
    least 1 while one more query fits. Breadth first: measured on local competitions, at a fixed cost more
    queries at depth 1-3 beat fewer at depth 10-20 (README), and the queries come most confident first."""
    per_image, per_pair = timing.rate("local_features"), timing.rate("verification")
    if per_image is None or per_pair is None:
        return max_depth  # the warm-up batch measures the rates
    per_candidate = per_image * new_image_share + per_pair
    if timing.time_left() < per_image + per_candidate:
        return 0
    depth = (timing.time_left() / max(1, queries_left) - per_image) / per_candidate
    return int(max(1, min(max_depth, math.floor(depth))))


# %% 8. Main
@dataclass
class Inputs:
    """What a run reads: ids, labels (recognition), the database in round-robin order."""

    test_ids: list[str]
    db_split: str
    db_ids: list[str]
    labels: np.ndarray


def read_inputs(run: Run) -> Inputs:
    db_split, _ = IMAGE_SPLITS[run.task]
    test_ids = read_test_ids(run.data)
    if run.task == "recognition":
        db_ids, labels = read_train_labels(run.data)
        order = round_robin(labels)
        db_ids, labels = [db_ids[i] for i in order], labels[order]
    else:
        db_ids, labels = list_image_ids(run.data / "index"), np.zeros(0, np.int64)
    return Inputs(test_ids, db_split, db_ids, labels)


def nonlandmark_paths(run: Run) -> tuple[list[str], list[Path]]:
    """Ids and paths of the --nonlandmark-dir images (none without the flag)."""
    if run.nonlandmark_dir is None:
        return [], []
    if not run.nonlandmark_dir.is_dir():
        raise InputError(f"--nonlandmark-dir {run.nonlandmark_dir} is not a folder")
    paths = sorted(p for p in run.nonlandmark_dir.rglob("*") if p.is_file())
    return [str(p.relative_to(run.nonlandmark_dir)) for p in paths], paths


def cache_keys(model_dir: Path, extraction: Extraction) -> dict:
    """What each feature cache depends on: the model's files and the settings of its features."""
    model = model_dir.resolve()
    files = {name: [(model / name).stat().st_size, (model / name).stat().st_mtime_ns]
             for name in ("saved_model.pb", "variables/variables.index") if (model / name).is_file()}
    ext = dataclasses.asdict(extraction)
    local = {name: ext[name] for name in ("scales", "max_image_side", "min_image_side", "max_features",
                                          "attention_threshold")}
    global_ = {**global_settings(extraction), "cache_float16": extraction.cache_float16,
               "buckets": [BUCKET_ASPECTS, BUCKET_SIDES]}
    return json.loads(json.dumps({"global": {"model": str(model), "files": files, "settings": global_},
                                  "local": {"model": str(model), "files": files, "settings": local}}))


def clear_stale_caches(work: Path, keys: dict) -> None:
    """Delete WORK/global or WORK/local when WORK/cache_key.json was written for another model or settings."""
    path = work / "cache_key.json"
    try:
        old = json.loads(path.read_text()) if path.is_file() else keys
    except ValueError:
        old = {}
    for folder in ("global", "local"):
        if old.get(folder) != keys[folder]:
            log.warning("model or %s settings changed since %s: deleting WORK/%s", folder, path, folder)
            shutil.rmtree(work / folder, ignore_errors=True)
    save_json(path, keys)


def timed_global(model, ids, paths, cache, extraction, run, timing, stage, shard=(0, 1), stop=None) -> bool:
    began = time.monotonic()
    count, stopped = extract_global(model, ids, paths, cache, extraction, run, shard, stop)
    timing.add(stage, count, time.monotonic() - began)
    return stopped


def database_stop_rule(timing: Timing, sizes: Sizes, knn_rate: float) -> StopRule:
    """Stop the database pass when the queries' descriptors and the kNN, at the rate measured so far, would no
    longer fit before the deadline."""
    def stop(done: int, seconds: float) -> bool:
        per_image = seconds / done if done else 0.0
        return timing.time_left() < sizes.queries * per_image + sizes.queries * sizes.db * knn_rate
    return stop


def global_pass(model: DelgSavedModel, inputs: Inputs, settings: Settings, timing: Timing, extraction: Extraction,
                knn_rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(database descriptors, their rows, query descriptors, query ok, non-landmark descriptors), or None for a
    shard run. The database pass stops early when the queries and kNN would no longer fit."""
    run = settings.run
    shard = parse_shard(run.shard)
    _, query_split = IMAGE_SPLITS[run.task]
    nl_ids, nl_paths = nonlandmark_paths(run)
    sizes = Sizes(len(inputs.db_ids), len(inputs.test_ids), len(nl_ids))
    cache = run.work / "global"
    db_paths = [image_path(run.data, inputs.db_split, i) for i in inputs.db_ids]
    stop = database_stop_rule(timing, sizes, knn_rate) if shard == (0, 1) else None
    cut = timed_global(model, inputs.db_ids, db_paths, cache / inputs.db_split, extraction, run, timing,
                       "global_db", shard, stop)
    if shard != (0, 1):
        log.info("shard %d/%d extracted into %s", *shard, cache / inputs.db_split)
        return None
    db_desc, db_rows = compact_valid(*load_global(cache / inputs.db_split, inputs.db_ids, run.chunk_size,
                                                  model.global_dim, allow_missing=cut))
    if cut:
        log.warning("database pass cut by the deadline: %d of %d images searched", len(db_rows), sizes.db)
        timing.plan["database_cut_at"] = int(len(db_rows))
    query_paths = [image_path(run.data, query_split, i) for i in inputs.test_ids]
    timed_global(model, inputs.test_ids, query_paths, cache / query_split, extraction, run, timing, "global_query")
    query_desc, query_ok = load_global(cache / query_split, inputs.test_ids, run.chunk_size, model.global_dim)
    nl_cut = timed_global(model, nl_ids, nl_paths, cache / "nonlandmark", extraction, run, timing, "global_db",
                          stop=lambda done, seconds: timing.time_left() <= 0)
    nl_desc = compact_valid(*load_global(cache / "nonlandmark", nl_ids, run.chunk_size, model.global_dim,
                                         allow_missing=nl_cut))[0]
    return db_desc, db_rows, query_desc, query_ok, nl_desc


def rerank(model: DelgSavedModel, settings: Settings, timing: Timing, inputs: Inputs, neighbours: np.ndarray,
           order: list[int], max_depth: int, on_progress: Callable[[np.ndarray, list[int]], None]) -> np.ndarray:
    """Inliers [nq, candidates] (-1: not verified), batch after batch in `order` while the budget allows;
    on_progress(inliers, batch) after each batch."""
    run, budget = settings.run, settings.budget
    inliers = np.full(neighbours.shape, -1, np.int64)
    if budget.max_rerank_queries is not None:
        order = order[:budget.max_rerank_queries]
    start, new_image_share = 0, 1.0
    with verification_pool(settings.verification, run.workers) as pool:
        while start < len(order) and max_depth > 0:
            depth = plan_depth(timing, len(order) - start, max_depth, new_image_share)
            if depth == 0 or timing.time_left() <= 0:
                log.info("time budget reached: %d of %d queries keep their global ranking", len(order) - start,
                         len(order))
                break
            batch = order[start:start + (budget.warmup_queries if start == 0 else budget.rerank_batch)]
            candidates = [[inputs.db_ids[j] for j in neighbours[q, :depth]] for q in batch]
            counts, new_image_share = verify_batch(model, settings, timing, pool,
                                                   [inputs.test_ids[q] for q in batch], inputs.db_split, candidates)
            for q, query_counts in zip(batch, counts, strict=True):
                inliers[q, :len(query_counts)] = query_counts
            timing.rerank_depth = max(timing.rerank_depth, depth)
            start += len(batch)
            log.info("reranked %d of %d queries at depth %d", start, len(order), depth)
            on_progress(inliers, batch)
    timing.save()
    return inliers


def verify_batch(model: DelgSavedModel, settings: Settings, timing: Timing, pool: multiprocessing.pool.Pool | None,
                 query_ids: list[str], db_split: str, candidates: list[list[str]]) -> tuple[list[list[int]], float]:
    """Inliers of each query with each of its candidates, and the share of candidate images whose local
    features had to be extracted (the rest were cached)."""
    run = settings.run
    cache = run.work / "local"
    wanted = [("test", q) for q in query_ids] + [(db_split, c) for cs in candidates for c in cs]
    began = time.monotonic()
    extracted = extract_local(model, run.data, wanted, cache, settings.extraction, run)
    timing.add("local_features", extracted, time.monotonic() - began)
    tasks = [(local_path(cache, "test", q), [local_path(cache, db_split, c) for c in cs])
             for q, cs in zip(query_ids, candidates, strict=True)]
    began = time.monotonic()
    counts = verify_all(tasks, pool)
    timing.add("verification", sum(len(cs) for cs in candidates), time.monotonic() - began)
    trim_local_cache(cache, run.local_cache_gb)
    return counts, max(0.0, extracted - len(query_ids)) / max(1, len(wanted) - len(query_ids))


def probe(model: DelgSavedModel, inputs: Inputs, settings: Settings, timing: Timing) -> None:
    """--probe N: time N images of every stage on this machine, project the run at this data's full size
    (WORK/timing.json: the measured stages and the plan), and stop."""
    run_ = settings.run
    if not inputs.db_ids or not inputs.test_ids:
        raise InputError("--probe needs database and test images to time")
    count = run_.probe
    scratch = run_.work / "probe"
    sizes = Sizes(len(inputs.db_ids), len(inputs.test_ids), len(nonlandmark_paths(run_)[0]))
    db_paths = [image_path(run_.data, inputs.db_split, i) for i in inputs.db_ids[:count]]
    knn_rate = knn_seconds_per_item(model.global_dim, run_.knn_block_mb)
    _, timing.plan = plan_extraction(model, db_paths, settings, sizes, timing.time_left(), knn_rate,
                                     scratch / "global")
    seconds = timing.plan["seconds_per_image"] * len(db_paths)
    timing.add("global_db", len(db_paths), seconds)
    timing.add("global_query", len(db_paths), seconds)
    timing.add("knn", 256 * 16_384, knn_rate * 256 * 16_384)
    half = max(1, count // 2)
    queries, candidates = inputs.test_ids[:half], inputs.db_ids[:half]
    probe_settings = dataclasses.replace(settings, run=dataclasses.replace(run_, work=scratch))
    with verification_pool(settings.verification, 0) as pool:
        verify_batch(model, probe_settings, timing, pool, queries, inputs.db_split, [candidates] * len(queries))
    shutil.rmtree(scratch, ignore_errors=True)
    timing.rerank_depth = settings.rerank_depth()  # what `local_eval time --log` projects by default
    project_rerank(timing, sizes, settings)
    log.info("probe of %d images: global pass at '%s', projected %.2f h (%s); details in %s", count,
             timing.plan["chosen"], sum(timing.plan["projection_h"].values()),
             "fits" if timing.plan["fits"] else "does not fit", timing.path)


def project_rerank(timing: Timing, sizes: Sizes, settings: Settings) -> None:
    """Add to the plan how many queries at the configured depth the rerank reserve buys at the measured rates."""
    per_image, per_pair = timing.rate("local_features") or 0.0, timing.rate("verification") or 0.0
    reserve = settings.budget.rerank_reserve * settings.budget.time_budget_h * 3600
    depth = settings.rerank_depth()
    per_query = per_image * (1 + depth) + per_pair * depth
    timing.plan["rerank"] = {"depth": depth, "seconds_per_query": per_query, "queries": sizes.queries,
                             "queries_in_reserve": int(reserve / per_query) if per_query else None}
    timing.save()


def plan_run(model: DelgSavedModel, inputs: Inputs, settings: Settings, timing: Timing,
             knn_rate: float) -> Extraction:
    """The extraction settings of the global pass: planned (--plan auto) or as given; recorded in timing.plan."""
    run_, extraction = settings.run, settings.extraction
    if settings.budget.plan == "fixed" or parse_shard(run_.shard) != (0, 1) or not inputs.db_ids:
        if extraction.global_xla == "auto":
            extraction = dataclasses.replace(extraction, global_xla="off")
        timing.plan = {"mode": "fixed", "global": global_settings(extraction), "knn_seconds_per_item": knn_rate}
        return extraction
    sizes = Sizes(len(inputs.db_ids), len(inputs.test_ids), len(nonlandmark_paths(run_)[0]))
    probe_paths = [image_path(run_.data, inputs.db_split, i) for i in inputs.db_ids[:settings.budget.probe_images]]
    extraction, timing.plan = plan_extraction(model, probe_paths, settings, sizes, timing.time_left(), knn_rate,
                                              run_.work / "probe")
    return extraction


def run(settings: Settings) -> None:
    run_ = settings.run
    check_output_paths(run_)
    timing = Timing(run_.work / "timing.json", run_.task, settings.budget)
    inputs = read_inputs(run_)
    if parse_shard(run_.shard) == (0, 1) and run_.probe is None:  # a valid file at once, whatever happens later
        write_submission(run_.out, run_.task, inputs.test_ids, [""] * len(inputs.test_ids))
    model = DelgSavedModel(run_.model, settings.extraction)
    if run_.probe is not None:
        return probe(model, inputs, settings, timing)
    knn_rate = knn_seconds_per_item(model.global_dim, run_.knn_block_mb)
    settings = dataclasses.replace(settings, extraction=plan_run(model, inputs, settings, timing, knn_rate))
    timing.save()
    save_json(run_.work / "settings.json", settings_record(settings, timing.plan))
    clear_stale_caches(run_.work, cache_keys(run_.model, settings.extraction))
    found = global_pass(model, inputs, settings, timing, settings.extraction, knn_rate)
    if found is not None:
        finish(model, inputs, settings, timing, *found)


def finish(model: DelgSavedModel, inputs: Inputs, settings: Settings, timing: Timing, db_desc: np.ndarray,
           db_rows: np.ndarray, query_desc: np.ndarray, query_ok: np.ndarray, nl_desc: np.ndarray) -> None:
    """kNN, the global-only submission, then reranking (most confident queries first) and the final submission."""
    run_, scoring = settings.run, settings.scoring
    began = time.monotonic()
    depth = settings.rerank_depth()
    if depth and not model.has_local:
        log.info("%s is a global-only model (no local features): no reranking, global-only", run_.model)
        depth = 0
    k = RETRIEVAL_SIZE if run_.task == "retrieval" else max(scoring.top_k, depth)
    cosines, found = knn(query_desc, db_desc, k, run_.knn_block_mb)
    neighbours = db_rows[found]
    nonlandmark_cos, _ = knn(query_desc, nl_desc, scoring.top_k, run_.knn_block_mb)
    timing.add("knn", len(query_desc) * (len(db_desc) + len(nl_desc)), time.monotonic() - began)
    shares = nonlandmark_shares(cosines, nonlandmark_cos, scoring.top_k)
    atomic_save(run_.work / "neighbours.npz", lambda tmp: np.savez(
        tmp, test_ids=np.array(inputs.test_ids, dtype=str), db_ids=np.array(inputs.db_ids, dtype=str),
        labels=inputs.labels, neighbours=neighbours, cosines=cosines, query_ok=query_ok,
        nonlandmark_cosines=nonlandmark_cos))

    def predictions(inliers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return recognition_predictions(cosines, neighbours, inliers, inputs.labels, scoring, shares, query_ok)

    def rows_for(inliers: np.ndarray) -> list[str]:
        if run_.task == "recognition":
            return recognition_rows(*predictions(inliers))
        return retrieval_rows(cosines, neighbours, inliers, inputs.db_ids, query_ok)

    unverified = np.full(neighbours.shape, -1)
    write_submission(run_.out, run_.task, inputs.test_ids, rows_for(unverified))
    shutil.copyfile(run_.out, run_.work / "submission_global_only.csv")
    log.info("global-only submission written to %s", run_.out)
    pairs_path, last_write = run_.work / "verified_pairs.csv", time.monotonic()
    start_verified_pairs(pairs_path)

    def on_progress(inliers: np.ndarray, batch: list[int]) -> None:
        nonlocal last_write
        append_verified_pairs(pairs_path, [inputs.test_ids[q] for q in batch], inputs.db_ids, neighbours[batch],
                              cosines[batch], inliers[batch])
        if time.monotonic() - last_write >= settings.budget.write_every_s:
            write_submission(run_.out, run_.task, inputs.test_ids, rows_for(inliers))
            last_write = time.monotonic()

    priority = predictions(unverified)[1] if run_.task == "recognition" else cosines[:, :1].sum(axis=1)
    inliers = rerank(model, settings, timing, inputs, neighbours, rerank_order(priority, query_ok),
                     min(depth, neighbours.shape[1]), on_progress)
    write_submission(run_.out, run_.task, inputs.test_ids, rows_for(inliers))
    log.info("submission written to %s; timings in %s", run_.out, timing.path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        run(parse_settings(argv))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
