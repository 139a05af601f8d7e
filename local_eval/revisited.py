"""Score a model on Revisited Oxford / Paris with the papers' protocol, through the notebook's own pipeline.

    python -m local_eval revisited --data DIR --dataset roxford5k|rparis6k --model MODEL --out OUT
        [--distractors DIR] [-- submission/main.py flags]

It reads the revisitop layout (DIR/<dataset>/jpg/<name>.jpg, DIR/<dataset>/gnd_<dataset>.pkl), crops each query
to its bbx, and runs submission/main.py's functions: global descriptors, its global stage (PCA whitening fitted
on the database by default; --dba-n, --qe-n, --superglobal-m when given) and exact kNN ranking the whole database
(with --distractors, a folder of extra database images such as revisitop's 1M distractors), then its local-feature
verification (pydegensac) of the top --rerank candidates, reordered as the notebook orders them. Flags after `--`
are the script's (--settings tuned.json, --rerank N, --ransac-threshold-px 4, --workers 2, ...). It scores both
rankings with revisitop's Easy / Medium / Hard mAP and mP@1,5,10 (local_eval.revisited_metric) and writes
  OUT/report.json       {"global": {"easy": {"map", "mp@1", "mp@5", "mp@10"}, "medium", "hard"}, "reranked": ...}
                        as fractions (null for a protocol no query has positives under), with what was run;
  OUT/ranks.csv         query,ranked: every database image, best first, of the reranked ranking;
  OUT/ranks_global.csv  the same for the global ranking;
  OUT/summary.txt       the one-screen summary it prints: Medium and Hard as the papers lay them out, beside
                        DELG's published R50 figures.
OUT/work holds the crops and the script's caches (reused by the next run with the same model and settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from common.cli import (
    KIT_MARKER,
    KitArgumentParser,
    UserError,
    atomic_write,
    atomic_write_text,
    check_input_folder,
    check_not_an_input,
    check_writable_folder,
    marker_kind,
)
from local_eval.revisited_metric import evaluate, scored_queries
from local_eval.show import global_ranking, load_model, script_settings
from local_eval.submission_script import load_submission, sibling

log = logging.getLogger("revisited")

REVISITED_KIND = "revisited report"  # the kind of output its kit marker records
DATASETS = {"roxford5k": "Revisited Oxford", "rparis6k": "Revisited Paris"}
# DELG (Cao et al., ECCV 2020), ResNet-50 trained on GLDv2-clean, mAP in % on the Medium / Hard protocols without
# distractors; "reranked" adds its local-feature geometric verification. Only the figures the kit's design notes
# record are here; the others are shown as "-".
PUBLISHED_DELG_R50 = {
    "roxford5k": {"global": {"medium": 73.6, "hard": 51.0}, "reranked": {"hard": 57.9}},
    "rparis6k": {"global": {"medium": 85.7, "hard": 71.5}, "reranked": {}},
}
SPLITS = ("query", "db", "distractors")  # folders of the caches and of the mirror the local extractor reads


@dataclass
class Dataset:
    folder: Path  # DIR/<dataset>
    gnd_path: Path
    db_names: list[str]
    query_names: list[str]
    gnd: list[dict]


@dataclass
class Images:
    """Every image the run ranks or extracts, per split: names, the files read (for queries: the crops), and the
    ids the script's caches know them by."""

    names: dict[str, list[str]]
    sources: dict[str, list[Path]]
    ids: dict[str, list[str]]

    def by_row(self, row: int) -> tuple[str, int]:
        """(split, index in it) of a row of the searched database: the dataset's images, then the distractors."""
        n_db = len(self.names["db"])
        return ("db", int(row)) if row < n_db else ("distractors", int(row) - n_db)


def safe_id(name: str) -> str:
    """A name as an id the script's file layout accepts (no folder separators; at least three characters)."""
    return name.replace("/", "__").replace("\\", "__").ljust(3, "_")


# ---------------------------------------------------------------------------------------------------------
# Reading the revisitop layout


def read_dataset(data: Path, dataset: str) -> Dataset:
    """The ground truth file, checked: every list where it belongs and every index and box in range."""
    folder = data / dataset
    path = folder / f"gnd_{dataset}.pkl"
    check_input_folder("--data", data)
    if not path.is_file():
        raise UserError(f"--data {data}: no {path.relative_to(data)} (expected the revisitop layout)")
    check_input_folder("--data", folder / "jpg")
    try:
        with open(path, "rb") as file:
            content = pickle.load(file)
    except Exception as err:  # noqa: BLE001 - any unreadable pickle is the user's file, not a crash
        raise UserError(f"{path}: cannot read it as a pickle ({type(err).__name__}: {err})") from None
    if not isinstance(content, dict) or not {"imlist", "qimlist", "gnd"} <= set(content):
        raise UserError(f"{path}: expected a dict with imlist, qimlist and gnd")
    db_names, query_names, gnd = list(content["imlist"]), list(content["qimlist"]), list(content["gnd"])
    if len(gnd) != len(query_names):
        raise UserError(f"{path}: {len(gnd)} gnd entries for {len(query_names)} qimlist names")
    for name, entry in zip(query_names, gnd, strict=True):
        check_query(path, name, entry, len(db_names))
        easy, hard = (set(np.asarray(entry[kind]).reshape(-1).tolist()) for kind in ("easy", "hard"))
        both = sorted(easy & hard)
        if both:
            raise UserError(
                f"{path}: query {name!r}: database image {db_names[both[0]]!r} (index {both[0]}) is both "
                "easy and hard; an image has one label per query"
            )
    return Dataset(folder, path, [str(n) for n in db_names], [str(n) for n in query_names], gnd)


def check_query(path: Path, name: str, entry: dict, n_db: int) -> None:
    where = f"{path}: query {name!r}"
    if not isinstance(entry, dict) or not {"bbx", "easy", "hard", "junk"} <= set(entry):
        raise UserError(f"{where}: expected bbx, easy, hard and junk")
    box = np.asarray(entry["bbx"], np.float64).reshape(-1)
    if len(box) != 4 or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
        raise UserError(f"{where}: bbx must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2, got {entry['bbx']}")
    for kind in ("easy", "hard", "junk"):
        indices = np.asarray(entry[kind]).reshape(-1)
        if len(indices) and (indices.dtype.kind not in "iu" or indices.min() < 0 or indices.max() >= n_db):
            raise UserError(f"{where}: {kind} must hold database indices in [0, {n_db}), got {entry[kind]}")


def crop_query(source: Path, box, target: Path) -> tuple[int, int]:
    """Write the query's bbx (rounded to pixels, inside the image) as lossless PNG bytes at target; its size."""
    try:
        with Image.open(source) as image:
            width, height = image.size
            x1, y1, x2, y2 = (int(round(v)) for v in np.asarray(box, np.float64).reshape(4))
            x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
            if x2 <= x1 or y2 <= y1:
                raise UserError(f"{source}: bbx {list(box)} holds no pixel of the {width}x{height} image")
            crop = image.convert("RGB").crop((x1, y1, x2, y2))
    except OSError as err:
        raise UserError(f"{source}: cannot read the query image ({err})") from None
    atomic_write(target, lambda tmp: crop.save(tmp, format="PNG"))
    return crop.size


def list_distractors(folder: Path | None) -> list[str]:
    """Names (relative paths without .jpg) of the distractor folder's jpg files, sorted."""
    if folder is None:
        return []
    check_input_folder("--distractors", folder)
    names = sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.jpg"))
    if not names:
        raise UserError(f"--distractors {folder}: no .jpg file in it")
    return names


# ---------------------------------------------------------------------------------------------------------
# The run


def prepare_out(out: Path, inputs: list[tuple[str, Path | None]]) -> Path:
    """OUT, created or reused (only a folder this command wrote, or an empty one, and none of the `inputs`); its
    work folder."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / KIT_MARKER).is_file())):
        raise UserError(f"--out {out} exists and was not written by this kit; choose another output path")
    if marker_kind(out) not in (None, REVISITED_KIND):
        raise UserError(
            f"--out {out} holds a {marker_kind(out)} written by this kit, not a {REVISITED_KIND}; "
            "choose another output path"
        )
    check_not_an_input("--out", out, inputs, replaces_out=False)
    check_writable_folder("--out", out)
    (out / "work").mkdir(parents=True, exist_ok=True)
    (out / KIT_MARKER).write_text(
        f"Written by `python -m local_eval revisited`; a rerun reuses work/.\nkind: {REVISITED_KIND}\n"
    )
    return out / "work"


def cache_key(settings, dataset: Dataset, distractors: Path | None) -> dict:
    """What the caches depend on: the model's files, the extraction settings, the ground truth, the distractors."""
    stat = lambda path: [path.stat().st_size, path.stat().st_mtime_ns] if path.is_file() else None
    model = settings.run.model[0].resolve()
    return json.loads(
        json.dumps(
            {
                "model": str(model),
                "files": [stat(model / n) for n in ("saved_model.pb", "variables/variables.index")],
                "extraction": dataclasses.asdict(settings.extraction),
                "data": str(dataset.folder.resolve()),
                "gnd": stat(dataset.gnd_path),
                "distractors": str(distractors and distractors.resolve()),
            },
            default=str,
        )
    )


def clear_stale(work: Path, key: dict) -> None:
    """Delete the caches when the last run's key differs, then record this one."""
    path = work / "cache_key.json"
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is not None and old != key:
        log.warning("model, settings or data changed since the last run in %s: deleting its caches", work)
        for folder in ("global", "local", "images"):
            shutil.rmtree(work / folder, ignore_errors=True)
    atomic_write_text(path, json.dumps(key, indent=1) + "\n")


def gather_images(dataset: Dataset, distractor_dir: Path | None, work: Path) -> tuple[Images, list[tuple[int, int]]]:
    """Names, files and ids of the three splits, the query crops written into the mirror; the crops' sizes."""
    names = {"query": dataset.query_names, "db": dataset.db_names, "distractors": list_distractors(distractor_dir)}
    ids = {split: [safe_id(name) for name in split_names] for split, split_names in names.items()}
    crops = [load_submission().image_path(work / "images", "query", i) for i in ids["query"]]
    sizes = [
        crop_query(dataset.folder / "jpg" / f"{name}.jpg", entry["bbx"], crop)
        for name, entry, crop in zip(dataset.query_names, dataset.gnd, crops, strict=True)
    ]
    sources = {
        "query": crops,
        "db": [dataset.folder / "jpg" / f"{n}.jpg" for n in names["db"]],
        "distractors": [distractor_dir / f"{n}.jpg" for n in names["distractors"]],
    }
    return Images(names, sources, ids), sizes


def global_descriptors(model, settings, images: Images, work: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (descriptors, ok), through the script's cached, batched global extraction."""
    sub, found = load_submission(), {}
    for split in SPLITS:
        ids, cache = images.ids[split], work / "global" / split
        sub.extract_global(model, ids, images.sources[split], cache, settings.extraction, settings.run)
        found[split] = sub.load_global(cache, ids, settings.run.chunk_size, model.global_dim)
    return found


def verify(tasks: list[tuple[Path, list[Path]]], verification, workers: int) -> list[list[int]]:
    """Inliers of each query with each candidate, from cached local features: the script's rule and pool."""
    verifier = sibling("verifier")
    with verifier.verification_pool(load_submission().count_inliers, verification, workers) as pool:
        return verifier.verify_all(tasks, pool)


def verified_ranking(
    model,
    settings,
    images: Images,
    ranking: np.ndarray,
    cosines: np.ndarray,
    depth: int,
    work: Path,
    seconds: dict[str, float],
) -> np.ndarray:
    """The ranking with each query's top `depth` verified and reordered by the script's retrieval_order."""
    if depth == 0:
        return ranking
    sub = load_submission()
    mirror, cache = work / "images", work / "local"
    candidates = [images.by_row(row) for row in np.unique(ranking[:, :depth])]
    for split, index in candidates:  # the script's extractor reads DATA/split/a/b/c/id.jpg
        link = sub.image_path(mirror, split, images.ids[split][index])
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(images.sources[split][index].resolve(), link)
    wanted = [("query", i) for i in images.ids["query"]] + [(s, images.ids[s][i]) for s, i in candidates]
    began = time.monotonic()
    sub.extract_local(model, mirror, wanted, cache, settings.extraction, settings.run)
    seconds["local_features"] = time.monotonic() - began

    def features(row: int) -> Path:
        split, index = images.by_row(row)
        return sub.local_path(cache, split, images.ids[split][index])

    tasks = [
        (sub.local_path(cache, "query", query_id), [features(row) for row in rows])
        for query_id, rows in zip(images.ids["query"], ranking[:, :depth], strict=True)
    ]
    began = time.monotonic()
    inliers = np.array(verify(tasks, settings.verification, settings.run.workers), np.int64).reshape(-1, depth)
    seconds["verification"] = time.monotonic() - began
    order = sub.retrieval_order(cosines[:, :depth], inliers)
    return np.concatenate([np.take_along_axis(ranking[:, :depth], order, 1), ranking[:, depth:]], axis=1)


# ---------------------------------------------------------------------------------------------------------
# Outputs


def write_ranks(path: Path, images: Images, ranking: np.ndarray) -> None:
    names = np.array(images.names["db"] + images.names["distractors"], dtype=object)
    frame = pd.DataFrame({"query": images.names["query"], "ranked": [" ".join(names[row]) for row in ranking]})
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def summary(report: dict) -> str:
    """One screen: Medium and Hard mAP / mP@10 of both rankings beside DELG's published R50 figures."""
    dataset, about = report["dataset"], report["about"]
    distractors = f"+{about['distractors']:,} distractors" if about["distractors"] else "no distractors"
    lines = [
        f"{DATASETS[dataset]} ({dataset}): {about['queries']} cropped queries, {about['database']:,} database "
        f"images, {distractors}",
        f"model {about['model']}; reranked: top {about['rerank']} verified (local features + pydegensac)",
        "",
        f"{'':34}{'Medium':>14}{'Hard':>16}",
        f"{'':34}{'mAP':>7}{'mP@10':>7}{'mAP':>9}{'mP@10':>7}",
    ]
    for stage in ("global", "reranked"):
        scores = report[stage]
        lines.append(
            f"{'this model, ' + stage:34}{percent(scores['medium']['map']):>7}"
            f"{percent(scores['medium']['mp@10']):>7}{percent(scores['hard']['map']):>9}"
            f"{percent(scores['hard']['mp@10']):>7}"
        )
    published = PUBLISHED_DELG_R50[dataset]
    for stage in ("global", "reranked"):
        shown = lambda protocol, figures=published[stage]: f"{figures.get(protocol, '-')}"
        lines.append(f"{'DELG R50 GLDv2-clean, ' + stage:34}{shown('medium'):>7}{'-':>7}{shown('hard'):>9}{'-':>7}")
    easy = ", ".join(f"{stage} {percent(report[stage]['easy']['map'])}" for stage in ("global", "reranked"))
    lines += [
        "",
        f"Easy mAP: {easy}. Figures in %; report.json holds fractions and mP@1/5/10.",
        "DELG's rows are its paper's figures, without distractors.",
        "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = KitArgumentParser(
        prog="python -m local_eval revisited",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags after `--` go to submission/main.py's own settings parser.",
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="folder holding <dataset>/jpg and "
        "<dataset>/gnd_<dataset>.pkl (revisitop's download, or `build revisited-synthetic`)",
    )
    parser.add_argument("--dataset", required=True, choices=list(DATASETS), help="which of the two")
    parser.add_argument("--model", required=True, type=Path, help="DELG SavedModel folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder (report.json, ranks.csv, ...)")
    parser.add_argument(
        "--distractors",
        type=Path,
        default=None,
        help="folder of extra database images (*.jpg, searched recursively), e.g. revisitop1m/jpg",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.script_args = argv[split + 1 :]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dataset = read_dataset(args.data, args.dataset)
    if not args.model.is_dir():
        raise UserError(f"--model {args.model}: no such folder")
    work = prepare_out(args.out, [("--data", args.data), ("--model", args.model), ("--distractors", args.distractors)])
    settings = script_settings("retrieval", work / "images", args.model, ["--work", str(work), *args.script_args])
    clear_stale(work, cache_key(settings, dataset, args.distractors))
    images, crop_sizes = gather_images(dataset, args.distractors, work)
    model, seconds = load_model(settings), {}
    began = time.monotonic()
    found = global_descriptors(model, settings, images, work)
    seconds["global"] = time.monotonic() - began
    query_desc, query_ok = found["query"]
    if not query_ok.all():
        raise UserError(f"query {images.names['query'][int(np.argmin(query_ok))]!r}: no global descriptor")
    database = np.concatenate([found["db"][0], found["distractors"][0]])
    database_ok = np.concatenate([found["db"][1], found["distractors"][1]])
    began = time.monotonic()
    ranking, cosines = global_ranking(
        query_desc, database, database_ok, settings.global_stage, settings.run.knn_block_mb
    )
    seconds["knn"] = time.monotonic() - began
    depth = min(settings.scoring.rerank, cosines.shape[1])
    reranked = verified_ranking(model, settings, images, ranking, cosines, depth, work, seconds)
    report = {
        "global": evaluate(ranking, dataset.gnd),
        "reranked": evaluate(reranked, dataset.gnd),
        "dataset": args.dataset,
        "about": {
            "queries": len(dataset.query_names),
            "database": len(dataset.db_names),
            "distractors": len(images.names["distractors"]),
            "unreadable": int((~database_ok).sum()),
            "scored_queries": scored_queries(dataset.gnd),
            "rerank": depth,
            "model": str(args.model),
            "script_flags": args.script_args,
            "global_stage": dataclasses.asdict(settings.global_stage),
            "crop_sizes": [list(s) for s in crop_sizes],
        },
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    write_ranks(args.out / "ranks_global.csv", images, ranking)
    write_ranks(args.out / "ranks.csv", images, reranked)
    atomic_write_text(args.out / "report.json", json.dumps(report, indent=1) + "\n")
    text = summary(report)
    atomic_write_text(args.out / "summary.txt", text + "\n")
    print(text)
    return 0
