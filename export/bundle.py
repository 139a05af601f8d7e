"""The Kaggle bundle: one folder that `kaggle datasets create` uploads and `kaggle kernels push` runs.

Layout:
    dataset-metadata.json    the dataset (model + scripts + wheels)
    kernel-metadata.json     the notebook: internet off, GPU on, this dataset and the competition attached
    delg/                    the DELG SavedModel (label map in delg/assets/): with --model, that export folder
                             byte for byte (the one replayed and tuned); with --run, exported again from the run
    delg-2/, delg-3/, ...    an ensemble's other members (several --model or --run): kernel.py passes every model as
                             main.py --model, in the order given (the first, delg/, gives the local features), and
                             --model-weights when given
    submission/*.py          the submission script as main.py, with the .py files beside it (modules it imports)
    kernel.py                the notebook's code file: installs the wheel for its Python offline, runs main.py on
                             Kaggle's paths (its own command-line arguments follow, so they win over the bundle's)
    wheels/pydegensac-*.whl  the --wheel files and one wheel fetched per --python (default: the Python of Kaggle's
                             image and the next one); kernel.py installs the one tagged cpXY for its Python
    settings.json            with --settings: tuned settings (`local_eval tune`), checked by the kit's main.py,
                             passed as main.py --settings
    nonlandmark/             with --nonlandmark-dir: images known to show no landmark, main.py --nonlandmark-dir
    train-descriptors.npz    with --train-descriptors (retrieval): `export train-descriptors`' file of the shipped
                             model, main.py --train-descriptors (label transfer)
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.cli import UserError, atomic_output_dir
from common.kit import NOTEBOOK_LIMIT_H, SUBMISSION_SCRIPT, load_submission
from common.kit import sibling as script_sibling
from export.delg import export_delg
from export.whitening import WhitenSettings

log = logging.getLogger(__name__)

MODEL_DIR = "delg"
SCRIPT_DIR = "submission"
SCRIPT_PATH = f"{SCRIPT_DIR}/main.py"
KERNEL_FILE = "kernel.py"
WHEEL_DIR = "wheels"
SETTINGS_FILE = "settings.json"
NONLANDMARK_DIR = "nonlandmark"
TRAIN_FILE = "train-descriptors.npz"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
BUNDLE_KIND = "Kaggle bundle"  # the kind of output its kit marker records
DEFAULT_COMPETITION = "landmark-recognition-2021"
DEFAULT_BUDGET_H = NOTEBOOK_LIMIT_H  # main.py keeps its own safety margin inside it
KAGGLE_PYTHONS = ("3.12", "3.13")  # Kaggle's image today, and the next (its Colab base has moved to 3.13)
WHEEL_PLATFORM = "manylinux2014_x86_64"  # Kaggle's servers
# Kaggle runs the kernel's code file with no arguments, so the launcher carries the paths of the server. Run by
# hand (`python kernel.py --probe 30` in an interactive session), it passes its own arguments on to main.py.
LAUNCHER = """\"\"\"Kaggle notebook: install pydegensac's wheel for this Python offline, then run main.py.\"\"\"
import subprocess
import sys
from pathlib import Path

DATASET = "/kaggle/input/{dataset}"


def install_pydegensac() -> None:
    \"\"\"pip-install the bundled wheel tagged for this Python (cpXY); one error line when there is none.\"\"\"
    tag = "cp{{}}{{}}".format(*sys.version_info[:2])
    wheels = sorted(Path(DATASET, "{wheels}").glob("pydegensac-*.whl"))
    matching = [wheel for wheel in wheels if tag in wheel.name.split("-")[-3].split(".")]
    if not matching:
        found = ", ".join(wheel.name for wheel in wheels) or "none"
        print(f"error: no pydegensac wheel for this Python {{sys.version.split()[0]}} ({{tag}}) in "
              f"{{DATASET}}/{wheels}; wheels found: {{found}}", file=sys.stderr)
        sys.exit(2)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", str(matching[-1])]
    if subprocess.run(command).returncode != 0:
        print(f"error: pip could not install {{matching[-1]}} (its message is above)", file=sys.stderr)
        sys.exit(2)


try:
    import pydegensac  # noqa: F401
except ImportError:
    install_pydegensac()
# Inside a notebook cell sys.argv is the Jupyter kernel's own; only a command line's arguments are passed on.
extra = [] if "ipykernel" in sys.modules else sys.argv[1:]
status = subprocess.run([sys.executable, DATASET + "/{script}", {arguments}] + extra).returncode
if status != 0:
    sys.exit(status)
"""


def check_wheel(path: Path) -> Path:
    """A --wheel argument: an existing pydegensac .whl file that is a wheel inside too (a zip whose .dist-info
    METADATA names pydegensac and whose WHEEL file has a Tag), not a file that would fail only on Kaggle."""
    if not path.is_file() or path.suffix != ".whl":
        raise UserError(f"--wheel {path}: not a .whl file")
    if not path.name.startswith("pydegensac-"):
        raise UserError(f"--wheel {path}: not a pydegensac wheel (its name must start with pydegensac-)")
    problem = wheel_problem(path)
    if problem:
        raise UserError(f"--wheel {path}: not a real wheel ({problem}); pass the file pip downloaded")
    return path


def wheel_problem(path: Path) -> str | None:
    """What keeps `path` from being a pydegensac wheel (None when nothing does)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            metadata = [name for name in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", name)]
            tags = [name for name in names if re.fullmatch(r"[^/]+\.dist-info/WHEEL", name)]
            if not metadata or not tags:
                return "no .dist-info/METADATA and .dist-info/WHEEL in it"
            fields = archive.read(metadata[0]).decode("utf-8", "replace").splitlines()
            wheel = archive.read(tags[0]).decode("utf-8", "replace").splitlines()
    except (zipfile.BadZipFile, OSError) as err:
        return f"not a zip file: {err}"
    names = [line.split(":", 1)[1].strip() for line in fields if line.lower().startswith("name:")]
    if not names or re.sub(r"[-_.]+", "-", names[0]).lower() != "pydegensac":
        return f"its METADATA names {names[0] if names else 'no package'!r}, not pydegensac"
    if not any(line.startswith("Tag:") for line in wheel):
        return "its WHEEL file has no Tag"
    return None


def check_python_version(version: str) -> str:
    """A --python argument: MAJOR.MINOR, e.g. 3.12."""
    if not re.fullmatch(r"3\.\d{1,2}", version):
        raise UserError(f"--python {version!r}: expected a Python version such as 3.12")
    return version


def download_pydegensac_wheel(version: str, folder: Path) -> Path:
    """pip-download the kit's pydegensac for Python `version` on Kaggle's platform into folder/version; a
    UserError saying to pass --wheel when pip cannot (no internet, or no wheel for that Python)."""
    requirement = f"pydegensac=={importlib.metadata.version('pydegensac')}"
    target = folder / version
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        version,
        "--platform",
        WHEEL_PLATFORM,
        "--dest",
        str(target),
        requirement,
    ]
    log.info("fetching %s for Python %s", requirement, version)
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wheels = sorted(target.glob("pydegensac-*.whl"))
    if result.returncode != 0 or not wheels:
        reason = ([line.strip() for line in result.stderr.splitlines() if line.strip()] or ["no wheel"])[-1]
        raise UserError(
            f"--python {version}: pip could not download {requirement} for {WHEEL_PLATFORM} "
            f"({reason}); without internet, pass the wheels you have as --wheel PATH (repeatable)"
        )
    return wheels[-1]


def gather_wheels(wheels: list[Path], pythons: list[str] | None, folder: Path) -> list[Path]:
    """The --wheel files plus one downloaded wheel per --python; with neither given, one per KAGGLE_PYTHONS."""
    explicit = [check_wheel(Path(path)) for path in wheels]
    if pythons is None:
        pythons = [] if explicit else list(KAGGLE_PYTHONS)
    versions = [check_python_version(version) for version in dict.fromkeys(pythons)]
    fetched = [download_pydegensac_wheel(version, folder) for version in versions]
    by_name = {wheel.name: wheel for wheel in [*explicit, *fetched]}
    return [by_name[name] for name in sorted(by_name)]


def python_tags(wheel_name: str) -> set[str]:
    """The Python tags of a wheel file name (pydegensac-0.3.0-cp312-cp312-manylinux...whl -> {'cp312'})."""
    parts = wheel_name.removesuffix(".whl").split("-")
    return set(parts[-3].split(".")) if len(parts) >= 5 else set()


def warn_without_kaggle_python(wheels: list[Path]) -> None:
    """A warning when no wheel fits the Python of Kaggle's image (KAGGLE_PYTHONS[0])."""
    tag = "cp" + KAGGLE_PYTHONS[0].replace(".", "")
    if not any(tag in python_tags(wheel.name) for wheel in wheels):
        log.warning(
            "no pydegensac wheel for Kaggle's Python %s (%s) among: %s; the notebook stops at once there",
            KAGGLE_PYTHONS[0],
            tag,
            ", ".join(wheel.name for wheel in wheels) or "none",
        )


def copy_scripts(script: Path, target: Path) -> list[str]:
    """The script as target/main.py and the .py files beside it (modules it imports) under their own names."""
    target.mkdir()
    for sibling in sorted(script.parent.glob("*.py")):
        if sibling.name != "main.py" and sibling.resolve() != script.resolve():
            shutil.copy2(sibling, target / sibling.name)
    shutil.copy2(script, target / "main.py")
    return sorted(path.name for path in target.glob("*.py"))


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


def competition_limit_h(competition: str) -> float:
    """The notebook limit of a competition of submission/competitions.py's table (NOTEBOOK_LIMIT_H for others)."""
    known = script_sibling("competitions").COMPETITIONS.get(competition)
    return known.limit_h if known else NOTEBOOK_LIMIT_H


def launcher_task(competition: str) -> str:
    return "retrieval" if "retrieval" in competition else "recognition"


def model_dirs(count: int) -> list[str]:
    """The bundle's model folders, one per run: delg/, then delg-2/, delg-3/, ... for an ensemble's others."""
    return [MODEL_DIR] + [f"{MODEL_DIR}-{i}" for i in range(2, count + 1)]


def launcher(
    dataset: str,
    competition: str,
    budget_h: float = DEFAULT_BUDGET_H,
    settings: bool = False,
    nonlandmark: bool = False,
    models: Sequence[str] = (MODEL_DIR,),
    weights: Sequence[float] | None = None,
    train: bool = False,
) -> str:
    """The notebook's code: the submission script with the dataset's and the competition's Kaggle paths, one
    --model per folder in `models` (and their --model-weights when given)."""
    task = launcher_task(competition)
    in_dataset = 'DATASET + "/{}"'.format
    arguments = [
        ("--task", json.dumps(task)),
        ("--data", json.dumps(f"/kaggle/input/{competition}")),
        *[("--model", in_dataset(model)) for model in models],
    ]
    if weights is not None:
        arguments.append(("--model-weights", ", ".join(json.dumps(str(float(weight))) for weight in weights)))
    arguments += [
        ("--out", '"/kaggle/working/submission.csv"'),
        ("--work", '"/tmp/landmark-work"'),
        ("--time-budget-h", json.dumps(str(budget_h))),
    ]
    if settings:
        arguments.append(("--settings", in_dataset(SETTINGS_FILE)))
    if nonlandmark:
        arguments.append(("--nonlandmark-dir", in_dataset(NONLANDMARK_DIR)))
    if train:
        arguments.append(("--train-descriptors", in_dataset(TRAIN_FILE)))
    text = (",\n" + " " * len("status = subprocess.run([")).join(f'"{flag}", {value}' for flag, value in arguments)
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
        notebook.parse_settings(
            [
                "--task",
                launcher_task(competition),
                "--data",
                ".",
                "--model",
                ".",
                "--time-budget-h",
                str(budget_h),
                "--settings",
                str(path),
            ]
        )
    except notebook.InputError as err:
        raise UserError(str(err)) from None


def warn_without_nonlandmarks(competition: str, budget_h: float, settings: Path | None) -> None:
    """A warning when a bundle without non-landmark images runs recognition with settings (the settings file over
    main.py's defaults) that use them: non-landmark suppression or the non-landmark penalty."""
    if launcher_task(competition) != "recognition":
        return
    argv = ["--task", "recognition", "--data", ".", "--model", ".", "--time-budget-h", str(budget_h)]
    parsed = load_submission().parse_settings(argv + (["--settings", str(settings)] if settings else []))
    uses = []
    if parsed.global_stage.suppression:
        uses.append(f"global_stage.suppression ({parsed.sources.get('suppression', 'the default')})")
    if parsed.scoring.nonlandmark_penalty > 0:
        uses.append(f"scoring.nonlandmark_penalty {parsed.scoring.nonlandmark_penalty:g}")
    if uses:
        log.warning(
            "the bundle has no non-landmark images (--nonlandmark-dir) but its settings use them: %s; "
            "without them main.py skips that step, unlike a replay or tune that had them",
            ", ".join(uses),
        )


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


def check_exported_model(model_dir: Path) -> None:
    """A --model argument: a SavedModel folder (an `export delg` output, or any DELG SavedModel main.py loads)."""
    if not (model_dir / "saved_model.pb").is_file():
        raise UserError(
            f"--model {model_dir}: not a SavedModel folder (no saved_model.pb); give the folder "
            "`export delg` wrote, or --run to export from a training run"
        )


def add_models(
    sources: Sequence[Path], exported: bool, target: Path, float16: bool, whiten: WhitenSettings | None
) -> list[str]:
    """The bundle's model folders under target: each exported folder copied byte for byte, or each run exported
    again (said in the log: its whitening is fitted again, so it is not an export that was replayed)."""
    models = model_dirs(len(sources))
    for source, model in zip(sources, models, strict=True):
        if exported:
            log.info("shipping %s as %s/, byte for byte", source, model)
            shutil.copytree(source, target / model, symlinks=False)
        else:
            log.info(
                "re-exporting run %s as %s/ (a new export: not one that was replayed; --model ships an "
                "export as it is)",
                source,
                model,
            )
            export_delg(source, target / model, float16=float16, whiten=whiten)
    return models


@dataclass(frozen=True)
class BundleSpec:
    """What a bundle holds beside its models, and where Kaggle finds it."""

    user: str  # Kaggle user owning the dataset and the kernel
    dataset: str  # the dataset's slug (the bundle's folder under /kaggle/input)
    kernel: str  # the notebook's slug
    competition: str = DEFAULT_COMPETITION
    wheels: Sequence[Path] = ()  # pydegensac wheels to ship, beside one fetched per Python in `pythons`
    pythons: Sequence[str] | None = None  # None: KAGGLE_PYTHONS, unless wheels are given
    script: Path = SUBMISSION_SCRIPT
    budget_h: float | None = None  # None: the competition's limit
    settings: Path | None = None  # a --settings file for main.py
    nonlandmark_dir: Path | None = None
    train_descriptors: Path | None = None  # `export train-descriptors`' file of the shipped model (retrieval)
    float16: bool = False  # re-exports only
    whiten: WhitenSettings | None = None  # re-exports only
    weights: Sequence[float] | None = None  # one per model of an ensemble
    exported: bool = False  # the models are export folders, shipped byte for byte (else runs, exported again)


def check_train_file(spec: BundleSpec, sources: Sequence[Path]) -> None:
    """--train-descriptors: a retrieval notebook's, written from the one export the bundle ships (--model) as it is."""
    path = spec.train_descriptors
    if launcher_task(spec.competition) != "retrieval":
        raise UserError(f"--train-descriptors {path}: for a retrieval competition, not {spec.competition}")
    if not spec.exported or len(sources) != 1:
        raise UserError(
            f"--train-descriptors {path}: give the one export it was written from as --model (a --run is exported "
            "again, and an ensemble needs the notebook's own train pass)"
        )
    if not path.is_file():
        raise UserError(f"--train-descriptors {path}: not a file")
    bridge = script_sibling("bridge")
    try:
        bridge.read_train_descriptors(path, bridge.model_fingerprint(sources[0]))
    except script_sibling("settings_cli").InputError as err:
        raise UserError(str(err)) from None


def build_bundle(sources: Sequence[Path], out_dir: Path, spec: BundleSpec, overwrite: bool = False) -> Path:
    """Write the bundle folder: each of `sources` exported again (a run; PCA-whitened with spec.whiten) or, with
    spec.exported, copied as it is (an export); several are an ensemble (spec.weights, one each); then the
    scripts, wheels, settings and non-landmark images."""
    competition, settings, nonlandmark_dir = spec.competition, spec.settings, spec.nonlandmark_dir
    budget_h = competition_limit_h(competition) if spec.budget_h is None else spec.budget_h
    if not spec.script.is_file():
        raise UserError(f"{spec.script}: submission script not found")
    if spec.exported:
        for source in sources:
            check_exported_model(Path(source))
    if settings is not None:
        check_settings_file(settings, competition, budget_h)
    images = nonlandmark_images(nonlandmark_dir) if nonlandmark_dir is not None else []
    if spec.train_descriptors is not None:
        check_train_file(spec, sources)
    with tempfile.TemporaryDirectory(prefix="pydegensac-") as downloads:
        shipped = gather_wheels(list(spec.wheels), spec.pythons, Path(downloads))
        with atomic_output_dir(out_dir, overwrite=overwrite, kind=BUNDLE_KIND) as tmp:
            names = add_models(sources, spec.exported, tmp, spec.float16, spec.whiten)
            scripts = copy_scripts(spec.script, tmp / SCRIPT_DIR)
            (tmp / WHEEL_DIR).mkdir()
            for wheel in shipped:
                shutil.copy2(wheel, tmp / WHEEL_DIR / wheel.name)
            if settings is not None:
                shutil.copy2(settings, tmp / SETTINGS_FILE)
            copy_images(images, nonlandmark_dir, tmp / NONLANDMARK_DIR)
            if spec.train_descriptors is not None:
                shutil.copy2(spec.train_descriptors, tmp / TRAIN_FILE)
            (tmp / "dataset-metadata.json").write_text(json.dumps(dataset_metadata(spec.user, spec.dataset), indent=2))
            code = launcher(
                spec.dataset,
                competition,
                budget_h,
                settings=settings is not None,
                nonlandmark=bool(images),
                models=names,
                weights=spec.weights,
                train=spec.train_descriptors is not None,
            )
            (tmp / KERNEL_FILE).write_text(code)
            metadata = kernel_metadata(spec.user, spec.dataset, spec.kernel, competition)
            (tmp / "kernel-metadata.json").write_text(json.dumps(metadata, indent=2))
    log.info(
        "shipped %s; wheels: %s",
        ", ".join(f"{SCRIPT_DIR}/{name}" for name in scripts),
        ", ".join(wheel.name for wheel in shipped),
    )
    if len(sources) > 1:
        pairs = ", ".join(f"{name}/ from {source}" for name, source in zip(names, sources, strict=True))
        weights = " ".join(f"{w:g}" for w in spec.weights) if spec.weights else "all 1"
        log.info("ensemble: %s; weights %s", pairs, weights)
    warn_without_kaggle_python(shipped)
    if images:
        log.info("shipped %d non-landmark images", len(images))
    else:
        warn_without_nonlandmarks(competition, budget_h, settings)
    log.info("wrote %s", out_dir)
    return Path(out_dir)
