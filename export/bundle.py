"""The Kaggle bundle: one folder that `kaggle datasets create` uploads and `kaggle kernels push` runs.

Layout:
    dataset-metadata.json    the dataset (model + script + wheel)
    kernel-metadata.json     the notebook: internet off, GPU on, this dataset and the competition attached
    delg/                    the DELG SavedModel (label map in delg/assets/)
    submission/main.py       the submission script
    kernel.py                the notebook's code file: installs the wheel offline, runs main.py on Kaggle's paths
                             (its own command-line arguments follow, so they win over the bundle's)
    wheels/pydegensac-*.whl  when one is at hand, for `pip install --no-index --find-links`
    settings.json            with --settings: tuned settings (`local_eval tune`), checked by the kit's main.py,
                             passed as main.py --settings
    nonlandmark/             with --nonlandmark-dir: images known to show no landmark, main.py --nonlandmark-dir
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from common.cli import UserError, atomic_output_dir
from common.kit import NOTEBOOK_LIMIT_H, SUBMISSION_SCRIPT, load_submission
from export.delg import export_delg
from export.whitening import WhitenSettings

log = logging.getLogger(__name__)

MODEL_DIR = "delg"
SCRIPT_PATH = "submission/main.py"
KERNEL_FILE = "kernel.py"
WHEEL_DIR = "wheels"
SETTINGS_FILE = "settings.json"
NONLANDMARK_DIR = "nonlandmark"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_COMPETITION = "landmark-recognition-2021"
DEFAULT_BUDGET_H = NOTEBOOK_LIMIT_H  # main.py keeps its own safety margin inside it
# Kaggle runs the kernel's code file with no arguments, so the launcher carries the paths of the server. Run by
# hand (`python kernel.py --probe 30` in an interactive session), it passes its own arguments on to main.py.
LAUNCHER = """\"\"\"Kaggle notebook: install pydegensac offline if needed, then run the submission script.\"\"\"
import subprocess
import sys

DATASET = "/kaggle/input/{dataset}"
try:
    import pydegensac  # noqa: F401
except ImportError:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", DATASET + "/{wheels}",
                    "pydegensac"], check=True)
# Inside a notebook cell sys.argv is the Jupyter kernel's own; only a command line's arguments are passed on.
extra = [] if "ipykernel" in sys.modules else sys.argv[1:]
subprocess.run([sys.executable, DATASET + "/{script}", {arguments}] + extra, check=True)
"""


def pip_wheel_cache() -> Path:
    """Where pip keeps the wheels it built (PIP_CACHE_DIR or ~/.cache/pip, then wheels/)."""
    return Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache" / "pip")) / "wheels"


def find_pydegensac_wheel(explicit: Path | None) -> Path | None:
    """The --wheel file, else the newest pydegensac wheel in pip's wheel cache, else None (nothing downloads)."""
    if explicit is not None:
        if not explicit.is_file() or explicit.suffix != ".whl":
            raise UserError(f"--wheel {explicit}: not a .whl file")
        return explicit
    found = sorted(pip_wheel_cache().rglob("pydegensac-*.whl"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def dataset_metadata(user: str, dataset: str) -> dict:
    return {"title": dataset, "id": f"{user}/{dataset}", "licenses": [{"name": "CC0-1.0"}]}


def kernel_metadata(user: str, dataset: str, kernel: str, competition: str) -> dict:
    return {
        "id": f"{user}/{kernel}",
        "title": kernel,
        "code_file": KERNEL_FILE,
        "language": "python",
        "kernel_type": "script",
        "is_private": True,
        "enable_gpu": True,
        "enable_internet": False,
        "dataset_sources": [f"{user}/{dataset}"],
        "competition_sources": [competition],
        "kernel_sources": [],
    }


def launcher_task(competition: str) -> str:
    return "retrieval" if "retrieval" in competition else "recognition"


def launcher(dataset: str, competition: str, budget_h: float = DEFAULT_BUDGET_H, settings: bool = False,
             nonlandmark: bool = False) -> str:
    """The notebook's code: the submission script with the dataset's and the competition's Kaggle paths."""
    task = launcher_task(competition)
    in_dataset = 'DATASET + "/{}"'.format
    arguments = [("--task", json.dumps(task)), ("--data", json.dumps(f"/kaggle/input/{competition}")),
                 ("--model", in_dataset(MODEL_DIR)), ("--out", '"/kaggle/working/submission.csv"'),
                 ("--work", '"/tmp/landmark-work"'), ("--time-budget-h", json.dumps(str(budget_h)))]
    if settings:
        arguments.append(("--settings", in_dataset(SETTINGS_FILE)))
    if nonlandmark:
        arguments.append(("--nonlandmark-dir", in_dataset(NONLANDMARK_DIR)))
    text = ",\n                ".join(f'"{flag}", {value}' for flag, value in arguments)
    return LAUNCHER.format(dataset=dataset, wheels=WHEEL_DIR, script=SCRIPT_PATH, arguments=text)


def check_settings_file(path: Path, competition: str, budget_h: float) -> None:
    """--settings must be a JSON object that the notebook accepts: the kit's main.py reads it here with the flags the
    launcher gives, as it will on the server (every key known, every value of its type and in its range)."""
    if not path.is_file():
        raise UserError(f"--settings {path}: not a file")
    try:
        settings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--settings {path}: not readable JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(settings, dict):
        raise UserError(f"--settings {path}: expected a JSON object, found {type(settings).__name__}")
    notebook = load_submission()
    try:
        notebook.parse_settings(["--task", launcher_task(competition), "--data", ".", "--model", ".",
                                 "--time-budget-h", str(budget_h), "--settings", str(path)])
    except notebook.InputError as err:
        raise UserError(str(err)) from None


def nonlandmark_images(folder: Path) -> list[Path]:
    """The images (IMAGE_SUFFIXES) under --nonlandmark-dir, at any depth; a UserError when there are none."""
    if not folder.is_dir():
        raise UserError(f"--nonlandmark-dir {folder}: not a folder")
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"--nonlandmark-dir {folder}: no {'/'.join(IMAGE_SUFFIXES)} images in it")
    return images


def copy_images(images: list[Path], source: Path, target: Path) -> None:
    """Copy images from under source to the same relative paths under target."""
    for image in images:
        destination = target / image.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(image, destination)


def build_bundle(run_dir: Path, out_dir: Path, user: str, dataset: str, kernel: str,
                 competition: str = DEFAULT_COMPETITION, wheel: Path | None = None,
                 script: Path = SUBMISSION_SCRIPT, overwrite: bool = False,
                 budget_h: float = DEFAULT_BUDGET_H, settings: Path | None = None,
                 nonlandmark_dir: Path | None = None, float16: bool = False,
                 whiten: WhitenSettings | None = None) -> Path:
    """Write the bundle folder; the DELG export (PCA-whitened with `whiten`), script, wheel, settings and
    non-landmark images copied in."""
    if not script.is_file():
        raise UserError(f"{script}: submission script not found")
    if settings is not None:
        check_settings_file(settings, competition, budget_h)
    images = nonlandmark_images(nonlandmark_dir) if nonlandmark_dir is not None else []
    wheel = find_pydegensac_wheel(wheel)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        export_delg(run_dir, tmp / MODEL_DIR, float16=float16, whiten=whiten)
        (tmp / SCRIPT_PATH).parent.mkdir()
        shutil.copy2(script, tmp / SCRIPT_PATH)
        if wheel is not None:
            (tmp / WHEEL_DIR).mkdir()
            shutil.copy2(wheel, tmp / WHEEL_DIR / wheel.name)
        if settings is not None:
            shutil.copy2(settings, tmp / SETTINGS_FILE)
        copy_images(images, nonlandmark_dir, tmp / NONLANDMARK_DIR)
        (tmp / "dataset-metadata.json").write_text(json.dumps(dataset_metadata(user, dataset), indent=2))
        code = launcher(dataset, competition, budget_h, settings=settings is not None, nonlandmark=bool(images))
        (tmp / KERNEL_FILE).write_text(code)
        metadata = kernel_metadata(user, dataset, kernel, competition)
        (tmp / "kernel-metadata.json").write_text(json.dumps(metadata, indent=2))
    if wheel is None:
        log.warning("no pydegensac wheel found (pass --wheel PATH); the notebook must find one another way")
    if images:
        log.info("shipped %d non-landmark images", len(images))
    log.info("wrote %s", out_dir)
    return Path(out_dir)
