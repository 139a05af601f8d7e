"""The files of submission/main.py besides its caches: the input tables and image folders checked (each problem one
InputError line naming the file, and the line and id), --out and --work checked, the lock on --work,
WORK/verified_pairs.csv (the log of the verified pairs) and WORK/settings.json (the run's settings, the versions
it ran with, the plan's choice), written and read back.

Shipped beside main.py (which imports it from its own folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import importlib.metadata
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import tensorflow as tf
from costs import Sizes
from settings_cli import InputError
from store import JPEG_SUFFIXES, atomic_save, space_checked

if TYPE_CHECKING:  # settings.py's types, for the annotations only
    from settings import Run, Settings

log = logging.getLogger("submission")

ID_PATTERN = re.compile(r"[0-9A-Za-z_-]{3,}")  # an image id names its own folders a/b/c: 3 characters at least


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
        raise InputError(
            f"{path} line {bad[0] + 2}: id {ids.iloc[bad[0]]!r} is not an image id (3 or more letters, digits, _ or -)"
        )
    repeated = np.flatnonzero(ids.duplicated().to_numpy())
    if len(repeated):
        first = int(np.flatnonzero((ids == ids.iloc[repeated[0]]).to_numpy())[0])
        raise InputError(f"{path} line {repeated[0] + 2}: id {ids.iloc[repeated[0]]} repeats line {first + 2}")


def list_image_ids(folder: Path) -> list[str]:
    """Ids of the JPEG files under folder in the GLDv2 layout: <id>.jpg (or .jpeg, .JPG, .JPEG, as image_file finds
    them) in the folder a/b/c its first three characters name. Regular files only: a FIFO or device would block
    its reader. Other files are skipped with a warning; an id found twice is an error naming both files."""
    if not folder.is_dir():
        raise InputError(f"{folder} not found")
    found: dict[str, tuple[tuple[str, ...], str]] = {}
    skipped: dict[str, list[tuple[tuple[str, ...], str]]] = {
        "whose names are no image ids": [],
        "that are no regular files": [],
        "outside their id's folder a/b/c": [],
    }
    for parts, name, regular in jpeg_entries(folder):
        stem = os.path.splitext(name)[0]
        if not ID_PATTERN.fullmatch(stem):
            skipped["whose names are no image ids"].append((parts, name))
        elif not regular:
            skipped["that are no regular files"].append((parts, name))
        elif stem in found:
            raise InputError(
                f"{folder}: image id {stem} is found twice, as {folder.joinpath(*found[stem])} and "
                f"{folder.joinpath(*parts, name)}; keep one"
            )
        else:
            found[stem] = (*parts, name)
    for stem, place in list(found.items()):
        if place[:-1] != tuple(stem[:3]):
            skipped["outside their id's folder a/b/c"].append((place[:-1], found.pop(stem)[-1]))
    for why, places in skipped.items():
        if places:
            log.warning(
                "%s: skipping %d .jpg files %s (first: %s)",
                folder,
                len(places),
                why,
                folder.joinpath(*places[0][0], places[0][1]),
            )
    return sorted(found)


def jpeg_entries(folder: Path) -> Iterator[tuple[tuple[str, ...], str, bool]]:
    """(its folders below folder, name, is a regular file) of every name under folder ending in a JPEG suffix,
    folders in sorted order; links to folders are not followed (as rglob)."""
    suffixes = {suffix.lower() for suffix in JPEG_SUFFIXES}
    stack: list[tuple[str, ...]] = [()]
    while stack:
        parts, below = stack.pop(), []
        with os.scandir(os.path.join(folder, *parts)) as scan:
            for entry in scan:
                if entry.is_dir(follow_symlinks=False):
                    below.append(entry.name)
                elif os.path.splitext(entry.name)[1].lower() in suffixes:
                    yield parts, entry.name, entry.is_file()
        stack += [(*parts, name) for name in sorted(below, reverse=True)]


def check_output_paths(run: Run) -> None:
    """--out must be a file path and --work a folder path that can be created, neither of them an input (nor
    inside one); one error line otherwise, before anything is written."""
    check_not_an_input(run)
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


def check_not_an_input(run: Run) -> None:
    """--out and --work may neither be an input (--data, --model, --local-model, --nonlandmark-dir, the --settings
    file) nor lie inside one: the run would overwrite what it reads. Symbolic and hard links count as the file.
    --out may not lie inside --work either: a cache cleared, or an intermediate file, would take it."""
    inputs = [
        ("--data", run.data),
        *(("--model", model) for model in run.model),
        ("--local-model", run.local_model),
        ("--nonlandmark-dir", run.nonlandmark_dir),
        ("--settings", run.settings),
    ]
    for name, output in (("--out", run.out), ("--work", run.work)):
        for flag, given in inputs:
            if given is None:
                continue
            if same_file(output, given):
                raise InputError(
                    f"{name} {output} is {flag} {given}: a run must not overwrite its input; write elsewhere"
                )
            if Path(given).resolve() in Path(output).resolve().parents:
                raise InputError(
                    f"{name} {output} is inside {flag} {given}: a run must not write among its inputs; write elsewhere"
                )
    if Path(run.work).resolve() in Path(run.out).resolve().parents:
        raise InputError(
            f"--out {run.out} is inside --work {run.work}, whose files and caches the script rewrites "
            "and deletes; write --out elsewhere"
        )


def same_file(a: Path, b: Path) -> bool:
    """a and b name one file or folder (the same path once links are resolved, or hard links of one file)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


@contextlib.contextmanager
def work_lock(work: Path) -> Iterator[None]:
    """Hold WORK/.lock while the run lasts: a second run on the same --work refuses to start, since it would
    rewrite or delete the caches under the first. The system drops the lock when the run ends, however it ends."""
    path = work / ".lock"
    with space_checked(path):
        file = open(path, "a+")  # held open, and locked, until the run ends
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            raise InputError(
                f"--work {work} is in use by another run ({holder}); wait for it to end or give another --work"
            ) from None
        except OSError as err:  # a file system without locks: run unprotected rather than not at all
            log.warning("cannot lock %s (%s): make sure no other run uses this --work", path, err.strerror)
        with space_checked(path):
            file.truncate(0)
            file.write(f"process {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            file.flush()
        yield


def write_submission(path: Path, task: str, test_ids: list[str], rows: list[str]) -> None:
    """submission.csv, written whole: id,landmarks (recognition) or id,images (retrieval)."""
    column = "landmarks" if task == "recognition" else "images"
    frame = pd.DataFrame({"id": test_ids, column: rows})
    atomic_save(path, lambda tmp: frame.to_csv(tmp, index=False))


PAIR_COLUMNS = ["id", "rank", "candidate", "cosine", "inliers"]


def start_verified_pairs(path: Path) -> None:
    """A fresh verified_pairs.csv holding only its header; append_verified_pairs adds each batch."""
    atomic_save(path, lambda tmp: pd.DataFrame(columns=PAIR_COLUMNS).to_csv(tmp, index=False))


def append_verified_pairs(
    path: Path,
    query_ids: list[str],
    db_ids: list[str],
    neighbours: np.ndarray,
    cosines: np.ndarray,
    inliers: np.ndarray,
) -> None:
    """The verified (query, candidate) pairs of these queries with rank, cosine and inliers (debugging, pictures)."""
    queries, ranks = np.nonzero(inliers >= 0)
    frame = pd.DataFrame(
        {
            "id": [query_ids[q] for q in queries],
            "rank": ranks + 1,
            "candidate": [db_ids[j] for j in neighbours[queries, ranks]],
            "cosine": np.round(cosines[queries, ranks], 6),
            "inliers": inliers[queries, ranks],
        }
    )
    with space_checked(path):
        frame.to_csv(path, mode="a", header=False, index=False)


@functools.cache
def runtime_versions() -> dict[str, str]:
    """The versions this run uses: Python and the packages the script imports (settings.json, timing.json)."""
    versions = {"python": sys.version.split()[0], "tensorflow": tf.__version__}
    for name in ("numpy", "pandas", "scikit-learn", "pydegensac"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # imported, yet installed without metadata
            versions[name] = "unknown"
    return versions


def settings_record(settings: Settings, sections: Iterable[str], plan: dict | None = None) -> dict:
    """WORK/settings.json: the run's settings as JSON, one object per section (run and `sections`), where each
    value came from, the versions, the plan's choice."""
    as_json = lambda section: json.loads(json.dumps(dataclasses.asdict(section), default=str))
    record = {name: as_json(getattr(settings, name)) for name in ("run", *sections)}
    record["sources"] = settings.sources
    record["versions"] = runtime_versions()
    if plan is not None:
        record["plan"] = plan
    return record


def recorded_settings(work: Path, parse: Callable[[list[str]], Settings]) -> Settings | None:
    """The settings a finished run recorded in WORK/settings.json, read back by parse (main.py's parse_settings)
    with the flags they need; None when the run left none."""
    path = Path(work) / "settings.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    run = record["run"]
    models = run["model"] if isinstance(run["model"], list) else [run["model"]]
    argv = [
        "--task",
        run["task"],
        "--data",
        run["data"],
        *[a for m in models for a in ("--model", m)],
        "--work",
        str(work),
        "--settings",
        str(path),
    ]
    return parse(argv)


@dataclass
class Inputs:
    """What a run reads: ids, labels (recognition), the database in round-robin order, the non-landmark set."""

    test_ids: list[str]
    db_split: str
    db_ids: list[str]
    labels: np.ndarray
    nonlandmark_ids: list[str] = field(default_factory=list)
    nonlandmark_paths: list[Path] = field(default_factory=list)
    train_ids: list[str] = field(default_factory=list)  # --train-data's images (retrieval's label transfer)
    train_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # theirs, or the file's

    def sizes(self) -> Sizes:
        return Sizes(len(self.db_ids), len(self.test_ids), len(self.nonlandmark_ids), len(self.train_labels))
