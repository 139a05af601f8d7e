"""A consistent subset of a local GLDv2 download, in the Kaggle layout, with images linked rather than copied.

Recognition: test images whose landmarks are kept in train plus non-landmark test images in the official
proportion; train holds the clean images of those landmarks and of as many other landmarks.
Retrieval: queries whose relevant index images all fit, every one of those images, then distractors.
Images missing from a partial download are skipped when choosing.
A folder of images known to show no landmark (--nonlandmark-dir) becomes the competition's distractor set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import UserError, atomic_output_dir, check_at_least, check_input_folder, check_not_an_input
from common.gldv2 import ID, IDS, INDEX_IMAGES, LANDMARK, LANDMARKS, USAGE, check_fields, image_path, read_csv_strings
from local_eval.layout import BUILD_INFO, check_existing, nonlandmark_folder, task_folder, write_build_info, write_csvs

log = logging.getLogger(__name__)

FILES = {  # the GLDv2 files read, with the fields used and what each holds
    "train.csv": {"id": ID, "landmark_id": LANDMARK},
    "train_clean.csv": {"landmark_id": LANDMARK, "images": IDS},
    "recognition_solution_v2.1.csv": {"id": ID, "landmarks": LANDMARKS, "Usage": USAGE},
    "retrieval_solution_v2.1.csv": {"id": ID, "images": INDEX_IMAGES, "Usage": USAGE},
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # files of --nonlandmark-dir taken as images


def read_gldv2_csv(gldv2: Path, name: str) -> pd.DataFrame:
    """One of the GLDv2 CSV files, all columns as strings; a missing file or column or a malformed field is a
    UserError naming the file (and line)."""
    path = gldv2 / name
    if not path.is_file():
        raise UserError(f"{path}: file not found (expected the GLDv2 file {name})")
    frame = read_csv_strings(path)
    missing = [c for c in FILES[name] if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {','.join(frame.columns)}")
    check_fields(path, frame, FILES[name])
    key = next(iter(FILES[name]))  # id, or landmark_id in train_clean.csv: one row each
    repeated = frame[key].duplicated(keep="first")
    if repeated.any():
        row = int(repeated.to_numpy().argmax())
        first = int((frame[key] == frame[key].iloc[row]).to_numpy().argmax())
        raise UserError(
            f"{path}, line {row + 2}: {key} {frame[key].iloc[row]} repeats line {first + 2}; the GLDv2 "
            f"file lists each {key} once: remove the repeated row"
        )
    return frame


def present(gldv2: Path, split: str, ids: Iterable[str], n: int | None = None) -> list[str]:
    """The first n ids (all when n is None) whose image exists in the download."""
    found: list[str] = []
    for image_id in ids:
        if n is not None and len(found) >= n:
            break
        if image_path(gldv2, split, image_id).is_file():
            found.append(image_id)
    return found


def _shuffled(rng: np.random.Generator, frame: pd.DataFrame) -> pd.DataFrame:
    return frame.iloc[rng.permutation(len(frame))]


def choose_recognition(
    gldv2: Path, solution: pd.DataFrame, clean: dict[str, list[str]], n_test: int, rng: np.random.Generator
) -> pd.DataFrame:
    """Test rows: landmark images whose landmarks are all in the clean train set, and non-landmark images."""
    is_landmark = solution.landmarks.str.strip() != ""
    share = float(is_landmark.mean()) if len(solution) else 0.0
    known = solution.landmarks.str.split().map(lambda ids: bool(ids) and all(i in clean for i in ids))
    n_landmark = max(1, round(n_test * share)) if share else 0
    picked = [
        present(gldv2, "test", _shuffled(rng, solution[known]).id, n_landmark),
        present(gldv2, "test", _shuffled(rng, solution[~is_landmark]).id, n_test - n_landmark),
    ]
    if not picked[0]:
        raise UserError(f"{gldv2}: no test image of a train_clean landmark has its image in {gldv2 / 'test'}")
    return solution.set_index("id").loc[picked[0] + picked[1]].reset_index()


def choose_retrieval(
    gldv2: Path, solution: pd.DataFrame, n_queries: int, n_index: int, rng: np.random.Generator
) -> tuple[pd.DataFrame, list[str]]:
    """Queries whose relevant images all exist and fit in half the index, a few Ignored rows, and the index."""
    ignored = solution.Usage == "Ignored"
    n_ignored = round(n_queries * float(ignored.mean())) if len(solution) else 0
    chosen, index = [], set()
    for row in _shuffled(rng, solution[~ignored]).itertuples():
        relevant = set(row.images.split())
        if len(chosen) >= n_queries - n_ignored or len(index | relevant) > n_index // 2:
            continue
        if present(gldv2, "test", [row.id]) and len(present(gldv2, "index", relevant)) == len(relevant):
            chosen.append(row.id)
            index |= relevant
    chosen += present(gldv2, "test", _shuffled(rng, solution[ignored]).id, n_ignored)
    if not index:
        raise UserError(
            f"{gldv2}: no retrieval query has all its relevant images in {gldv2 / 'index'} "
            f"within {n_index // 2} images; raise --index"
        )
    all_index = sorted(p.stem for p in (gldv2 / "index").glob("*/*/*/*.jpg"))
    distractors = [all_index[i] for i in rng.permutation(len(all_index)) if all_index[i] not in index]
    index_ids = sorted(index) + distractors[: n_index - len(index)]
    return solution.set_index("id").loc[chosen].reset_index(), index_ids


def link_images(gldv2: Path, root: Path, split: str, ids: Iterable[str], out_split: str | None = None) -> None:
    """Symbolic links root/out_split/a/b/c/<id>.jpg -> the download's image."""
    for image_id in ids:
        target = image_path(root, out_split or split, image_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(image_path(gldv2, split, image_id).resolve(), target)


def nonlandmark_images(folder: Path, taken: set[str]) -> list[Path]:
    """The image files under folder (relative paths), less those whose id is an image of the subset."""
    images = sorted(
        p.relative_to(folder) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    kept = [p for p in images if p.stem not in taken]
    if len(kept) < len(images):
        log.warning("--nonlandmark-dir: left out %d images that are in the subset itself", len(images) - len(kept))
    if not kept:
        raise UserError(f"--nonlandmark-dir {folder}: no image ({', '.join(IMAGE_SUFFIXES)}) outside the subset")
    return kept


def link_nonlandmark(folder: Path, images: list[Path], root: Path) -> None:
    """Symbolic links in the competition's distractor folder, at the images' paths under folder."""
    for relative in images:
        target = nonlandmark_folder(root) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((folder / relative).resolve(), target)


def build_gldv2_subset(
    gldv2: Path,
    out: Path,
    n_test: int,
    n_index: int,
    seed: int = 0,
    overwrite: bool = False,
    nonlandmark_dir: Path | None = None,
) -> Path:
    """Write a consistent GLDv2 subset in the Kaggle layout into `out` (atomically) and return `out`;
    an identical build there is kept."""
    gldv2, out = Path(gldv2).resolve(), Path(out)
    check_input_folder("--gldv2", gldv2)
    check_at_least("--test", n_test, 1)
    check_at_least("--index", n_index, 2)
    check_at_least("--seed", seed, 0)
    info = {"source": "gldv2", "gldv2": str(gldv2), "test": n_test, "index": n_index, "seed": seed}
    if nonlandmark_dir is not None:
        check_input_folder("--nonlandmark-dir", nonlandmark_dir)
        info["nonlandmark_dir"] = str(Path(nonlandmark_dir).resolve())
    check_not_an_input("--out", out, [("--gldv2", gldv2), ("--nonlandmark-dir", nonlandmark_dir)])
    if check_existing(out, info, overwrite):
        log.info("%s already holds this competition; nothing to do", out)
        return out
    frames = {name: read_gldv2_csv(gldv2, name) for name in FILES}
    clean = {row.landmark_id: row.images.split() for row in frames["train_clean.csv"].itertuples()}
    rng = np.random.default_rng(seed)
    test = choose_recognition(gldv2, frames["recognition_solution_v2.1.csv"], clean, n_test, rng)
    queries, index_ids = choose_retrieval(gldv2, frames["retrieval_solution_v2.1.csv"], n_test, n_index, rng)
    test_landmarks = sorted({lm for ids in test.landmarks.str.split() for lm in ids})
    others = sorted(set(clean) - set(test_landmarks))
    kept = test_landmarks + [others[i] for i in rng.permutation(len(others))[: len(test_landmarks)]]
    clean_ids = {image_id for lm in kept for image_id in clean[lm]}
    train = frames["train.csv"][frames["train.csv"].id.isin(clean_ids)][["id", "landmark_id"]]
    train = train[train.id.isin(present(gldv2, "train", train.id))].sort_values("id")
    taken = {*train.id, *test.id, *queries.id, *index_ids}
    distractors = [] if nonlandmark_dir is None else nonlandmark_images(Path(nonlandmark_dir), taken)
    with atomic_output_dir(out, overwrite=overwrite, marker=BUILD_INFO) as tmp:
        recognition, retrieval = task_folder(tmp, "recognition"), task_folder(tmp, "retrieval")
        link_images(gldv2, recognition, "train", train.id)
        link_images(gldv2, recognition, "test", test.id)
        link_images(gldv2, retrieval, "index", index_ids)
        link_images(gldv2, retrieval, "test", queries.id)
        if nonlandmark_dir is not None:
            link_nonlandmark(Path(nonlandmark_dir), distractors, tmp)
        write_csvs(tmp, train, test.sort_values("id"), queries.sort_values("id"))
        write_build_info(tmp, info)
    log.info(
        "built %s: %d train, %d test, %d index, %d queries, %d distractors",
        out,
        len(train),
        len(test),
        len(index_ids),
        len(queries),
        len(distractors),
    )
    return out
