"""The Kaggle bundle: one folder that `kaggle datasets create` uploads and `kaggle kernels push` runs.

Layout:
    dataset-metadata.json    the dataset (model + script + wheel)
    kernel-metadata.json     the notebook: internet off, GPU on, this dataset and the competition attached
    delg/                    the DELG SavedModel (label map in delg/assets/)
    submission/main.py       the submission script
    kernel.py                the notebook's code file: installs the wheel offline, runs main.py on Kaggle's paths
    wheels/pydegensac-*.whl  when one is at hand, for `pip install --no-index --find-links`
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from common.cli import UserError, atomic_output_dir
from export.delg import export_delg

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SUBMISSION_SCRIPT = REPO_ROOT / "submission" / "main.py"
MODEL_DIR = "delg"
SCRIPT_PATH = "submission/main.py"
KERNEL_FILE = "kernel.py"
WHEEL_DIR = "wheels"
DEFAULT_COMPETITION = "landmark-recognition-2021"
DEFAULT_BUDGET_H = 9.0  # the notebook limit of most years; main.py keeps its own --safety-margin inside it
# Kaggle runs the kernel's code file with no arguments, so the launcher carries the paths of the server.
LAUNCHER = """\"\"\"Kaggle notebook: install pydegensac offline if needed, then run the submission script.\"\"\"
import subprocess
import sys

DATASET = "/kaggle/input/{dataset}"
try:
    import pydegensac  # noqa: F401
except ImportError:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", DATASET + "/{wheels}",
                    "pydegensac"], check=True)
subprocess.run([sys.executable, DATASET + "/{script}", "--task", "{task}", "--data", "/kaggle/input/{competition}",
                "--model", DATASET + "/{model}", "--out", "/kaggle/working/submission.csv",
                "--work", "/tmp/landmark-work", "--time-budget-h", "{budget_h}"], check=True)
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


def launcher(dataset: str, competition: str, budget_h: float = DEFAULT_BUDGET_H) -> str:
    """The notebook's code: the submission script with the dataset's and the competition's Kaggle paths."""
    task = "retrieval" if "retrieval" in competition else "recognition"
    return LAUNCHER.format(dataset=dataset, wheels=WHEEL_DIR, script=SCRIPT_PATH, task=task,
                           competition=competition, model=MODEL_DIR, budget_h=budget_h)


def build_bundle(run_dir: Path, out_dir: Path, user: str, dataset: str, kernel: str,
                 competition: str = DEFAULT_COMPETITION, wheel: Path | None = None,
                 script: Path = SUBMISSION_SCRIPT, overwrite: bool = False,
                 budget_h: float = DEFAULT_BUDGET_H) -> Path:
    """Write the bundle folder; the DELG export, script and wheel are copied in, metadata written."""
    if not script.is_file():
        raise UserError(f"{script}: submission script not found")
    wheel = find_pydegensac_wheel(wheel)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        export_delg(run_dir, tmp / MODEL_DIR)
        (tmp / SCRIPT_PATH).parent.mkdir()
        shutil.copy2(script, tmp / SCRIPT_PATH)
        if wheel is not None:
            (tmp / WHEEL_DIR).mkdir()
            shutil.copy2(wheel, tmp / WHEEL_DIR / wheel.name)
        (tmp / "dataset-metadata.json").write_text(json.dumps(dataset_metadata(user, dataset), indent=2))
        (tmp / KERNEL_FILE).write_text(launcher(dataset, competition, budget_h))
        metadata = kernel_metadata(user, dataset, kernel, competition)
        (tmp / "kernel-metadata.json").write_text(json.dumps(metadata, indent=2))
    if wheel is None:
        log.warning("no pydegensac wheel found (pass --wheel PATH); the notebook must find one another way")
    log.info("wrote %s", out_dir)
    return Path(out_dir)
