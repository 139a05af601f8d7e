"""`python -m export delg|retrieval|bundle|train-descriptors ...`: SavedModels, the Kaggle bundle, train descriptors."""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

from common.cli import (
    KitArgumentParser,
    UserError,
    check_at_least,
    check_input_folder,
    check_not_an_input,
    check_output_parent,
    check_positive,
    dispatch,
)
from export.bundle import DEFAULT_COMPETITION, KAGGLE_PYTHONS, SUBMISSION_SCRIPT, BundleSpec, build_bundle
from export.delg import export_delg
from export.retrieval import DEFAULT_MAX_MB, export_retrieval
from export.train_descriptors import check_npz_out, export_train_descriptors
from export.whitening import DEFAULT_IMAGES, DEFAULT_SHRINKAGE, WhitenSettings

COMMANDS = {  # name -> ("module:function", help); this module is __main__ under `python -m export`
    "delg": (
        f"{__name__}:main_delg",
        "the DELG SavedModel (local + global features, the DELF/Kaggle-baseline contract)",
    ),
    "retrieval": (
        f"{__name__}:main_retrieval",
        "the Kaggle retrieval SavedModel, zipped for upload (one global descriptor per image)",
    ),
    "bundle": (f"{__name__}:main_bundle", "a folder for `kaggle datasets create` + `kaggle kernels push`"),
    "train-descriptors": (
        f"{__name__}:main_train_descriptors",
        "global descriptors and landmark ids of a labelled train set, for the notebook's --train-descriptors",
    ),
}


RUN_HELP = "training run folder (config.json, checkpoints/)"


def _parser(command: str, ensemble: bool = False, run_required: bool = True) -> argparse.ArgumentParser:
    """The flags every export shares; with `ensemble`, --run repeats and --model-weights weighs the runs."""
    parser = KitArgumentParser(prog=f"python -m export {command}", description=COMMANDS[command][1])
    if ensemble:
        parser.add_argument(
            "--run",
            type=Path,
            action="append",
            required=run_required,
            help=RUN_HELP + "; repeat it for an ensemble (--run A --run B)",
        )
        parser.add_argument(
            "--model-weights",
            type=float,
            nargs="+",
            default=None,
            metavar="W",
            help="ensemble: one weight per --run (bundle: or per --model), as submission/main.py's "
            "--model-weights (default all 1)",
        )
    else:
        parser.add_argument("--run", type=Path, required=True, help=RUN_HELP)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if this kit wrote it (a folder or file of other origin is never replaced)",
    )
    return parser


WHITEN_FLAGS = ("--whiten-images", "--whiten-shrinkage", "--whiten-dim", "--whiten-data")


def _add_whiten_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "PCA whitening of the global descriptors (fitted on the run's training images, inside the SavedModel)"
    )
    group.add_argument(
        "--no-whiten",
        dest="whiten",
        action="store_false",
        help="export the trained descriptors as they are, without PCA whitening",
    )
    group.add_argument(
        "--whiten-images",
        type=int,
        default=None,
        metavar="N",
        help=f"training images the fit extracts: a seeded sample, the same for every export "
        f"(default {DEFAULT_IMAGES}; all of them when there are fewer)",
    )
    group.add_argument(
        "--whiten-shrinkage",
        type=float,
        default=None,
        metavar="S",
        help=f"added to each eigenvalue before its axis is scaled by 1/sqrt, as a fraction of the "
        f"mean eigenvalue; above 0, so axes the sample barely varies along stay finite "
        f"(default {DEFAULT_SHRINKAGE:g})",
    )
    group.add_argument(
        "--whiten-dim",
        type=int,
        default=None,
        metavar="D",
        help="keep only the D principal axes of largest variance (default: all, the run's "
        "embedding_dim); the descriptor then has D dimensions",
    )
    group.add_argument(
        "--whiten-data",
        type=Path,
        default=None,
        metavar="DIR",
        help="training data folder (train.csv, train/) to fit on (default: the folder the run "
        "trained on, as RUN/data.json records it)",
    )


def _whiten_settings(args: argparse.Namespace) -> WhitenSettings | None:
    """The whitening the flags ask for; None with --no-whiten (which no --whiten-* flag may accompany)."""
    given = [flag for flag in WHITEN_FLAGS if getattr(args, flag[2:].replace("-", "_")) is not None]
    if not args.whiten:
        if given:
            raise UserError(f"{given[0]} has no effect with --no-whiten; drop one of them")
        return None
    if args.whiten_images is not None:
        check_at_least("--whiten-images", args.whiten_images, 1)
    if args.whiten_shrinkage is not None:
        check_positive("--whiten-shrinkage", args.whiten_shrinkage)
    if args.whiten_dim is not None:
        check_at_least("--whiten-dim", args.whiten_dim, 1)
    if args.whiten_data is not None:
        check_input_folder("--whiten-data", args.whiten_data)
    defaults = WhitenSettings()
    return WhitenSettings(
        images=defaults.images if args.whiten_images is None else args.whiten_images,
        shrinkage=defaults.shrinkage if args.whiten_shrinkage is None else args.whiten_shrinkage,
        dim=args.whiten_dim,
        data=args.whiten_data,
    )


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, then check what every export shares: each --run is a folder (and an ensemble's weights fit its runs),
    --out can be written where it points."""
    args = parser.parse_args(argv)
    if isinstance(args.run, list) or hasattr(args, "model"):  # retrieval and bundle: members repeat
        flag, members = _members(args)
        for member in members:
            check_input_folder(flag, member)
        _check_ensemble(flag, members, args.model_weights)
        inputs = [(flag, member) for member in members]
    else:
        check_input_folder("--run", args.run)
        inputs = [("--run", args.run)]
    inputs += [
        (flag, getattr(args, flag[2:].replace("-", "_"), None))
        for flag in ("--whiten-data", "--script", "--settings", "--nonlandmark-dir", "--train-descriptors")
    ]
    inputs += [("--wheel", wheel) for wheel in getattr(args, "wheel", [])]
    check_not_an_input("--out", args.out, inputs)
    check_output_parent(args.out)
    return args


def _members(args: argparse.Namespace) -> tuple[str, list[Path]]:
    """The flag and folders of an ensemble's members: the --run folders, or (bundle) the --model exports."""
    models = getattr(args, "model", None)
    if models and args.run:
        raise UserError(
            "--model and --run together: ship the exports you replayed (--model) or export the runs "
            "again (--run), not both"
        )
    if models:
        return "--model", models
    if not args.run:
        raise UserError(
            "give --model EXPORT_DIR (the export you replayed and tuned) or --run RUN_DIR (export it again)"
        )
    return "--run", args.run


def _check_ensemble(flag: str, members: list[Path], weights: list[float] | None) -> None:
    """Each member (--run or --model) once; --model-weights, when given, one finite weight above 0 per member."""
    seen = set()
    for member in members:
        if member.resolve() in seen:
            raise UserError(f"{flag} {member} is given twice; give each member of the ensemble once")
        seen.add(member.resolve())
    if weights is None:
        return
    if len(weights) != len(members):
        raise UserError(f"--model-weights gives {len(weights)} weights for {len(members)} {flag}")
    for weight in weights:
        check_positive("--model-weights", weight)


def _check_zip_out(out: Path, overwrite: bool) -> None:
    """--out of `export retrieval`: a new file, or with --overwrite a retrieval zip this kit wrote."""
    if out.is_dir():
        raise UserError(f"--out {out}: a folder; give the path of the zip file to write")
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it or choose another path")
    if not _is_saved_model_zip(out):
        raise UserError(
            f"--out {out} exists and is no SavedModel zip written by this kit; "
            "--overwrite replaces only the kit's own outputs: choose another path"
        )


def _is_saved_model_zip(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return "saved_model.pb" in archive.namelist()


def _check_slug(flag: str, value: str) -> None:
    """Kaggle names (user, dataset, notebook, competition): letters, digits, '-' and '_'."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", value):
        raise UserError(f"{flag} {value!r}: expected a Kaggle name (letters, digits, '-' and '_')")


def main_delg(argv: list[str] | None) -> None:
    parser = _parser("delg")
    parser.add_argument("--out", type=Path, required=True, help="SavedModel folder to create")
    parser.add_argument(
        "--float16", action="store_true", help="also hold global_batch_float16 (float16 compute, float32 outputs)"
    )
    parser.add_argument(
        "--no-xla", dest="xla", action="store_false", help="do not XLA-compile the batched global functions"
    )
    _add_whiten_flags(parser)
    args = _parse(parser, argv)
    whiten = _whiten_settings(args)
    print(export_delg(args.run, args.out, overwrite=args.overwrite, float16=args.float16, xla=args.xla, whiten=whiten))


def main_retrieval(argv: list[str] | None) -> None:
    parser = _parser("retrieval", ensemble=True)
    parser.add_argument("--out", type=Path, required=True, help="zip file to create (e.g. model.zip)")
    parser.add_argument(
        "--dim",
        type=int,
        default=None,
        help="descriptor size D (default: the run's embedding_dim); a smaller D is the PCA "
        "whitening's reduction (--whiten-dim D), so it needs the whitening; one --run only "
        "(an ensemble's D is the sum of its runs')",
    )
    parser.add_argument(
        "--max-mb",
        type=float,
        default=DEFAULT_MAX_MB,
        help=f"refuse a zip larger than this many MB (default {DEFAULT_MAX_MB:g})",
    )
    _add_whiten_flags(parser)
    args = _parse(parser, argv)
    if args.dim is not None:
        check_at_least("--dim", args.dim, 1)
    check_positive("--max-mb", args.max_mb)
    whiten = _whiten_settings(args)
    _check_zip_out(args.out, args.overwrite)
    size_mb = export_retrieval(
        args.run,
        args.out,
        dim=args.dim,
        max_mb=args.max_mb,
        overwrite=args.overwrite,
        whiten=whiten,
        weights=args.model_weights,
    )
    print(f"{args.out}: {size_mb:.1f} MB (limit {args.max_mb:g} MB)")


def _check_exported_flags(args: argparse.Namespace) -> None:
    """With --model the export is shipped as it is: a flag that would change it is an error."""
    changing = [flag for flag in WHITEN_FLAGS if getattr(args, flag[2:].replace("-", "_")) is not None]
    if not args.whiten:
        changing.append("--no-whiten")
    if args.float16:
        changing.append("--float16")
    if changing:
        raise UserError(
            f"{changing[0]} has no effect with --model: its export is shipped as it is (export it "
            "with that flag and replay it first, or use --run)"
        )


def main_bundle(argv: list[str] | None) -> None:
    parser = _parser("bundle", ensemble=True, run_required=False)
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        default=None,
        metavar="EXPORT_DIR",
        help="a DELG SavedModel folder (`export delg`'s), shipped byte for byte: the export you "
        "replayed and tuned; repeat it for an ensemble; instead of --run, which exports again",
    )
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    parser.add_argument("--kaggle-user", required=True, help="your Kaggle user name (owner of dataset and notebook)")
    parser.add_argument("--dataset", default="delg-landmark-model", help="dataset slug (default %(default)s)")
    parser.add_argument("--kernel", default="delg-landmark-submission", help="notebook slug (default %(default)s)")
    parser.add_argument(
        "--competition",
        default=DEFAULT_COMPETITION,
        help="competition slug the notebook is attached to (default %(default)s)",
    )
    parser.add_argument(
        "--wheel",
        type=Path,
        action="append",
        default=[],
        help="a pydegensac wheel to ship; repeat the flag for several (kernel.py installs the one "
        "tagged for its Python)",
    )
    parser.add_argument(
        "--python",
        nargs="+",
        metavar="X.Y",
        default=None,
        help="fetch pydegensac's wheel for each of these Pythons with pip (needs internet); default "
        f"without --wheel: {' '.join(KAGGLE_PYTHONS)} (Kaggle's image's Python and the next)",
    )
    parser.add_argument(
        "--script",
        type=Path,
        default=SUBMISSION_SCRIPT,
        help="submission script, shipped as main.py with the .py files beside it (default %(default)s)",
    )
    parser.add_argument(
        "--time-budget-h",
        type=float,
        default=None,
        help="the notebook limit in hours, passed to main.py (default: the competition's, from "
        "submission/competitions.py)",
    )
    parser.add_argument(
        "--settings",
        type=Path,
        default=None,
        help="JSON settings file (local_eval tune's), checked as main.py will read it, shipped as "
        "settings.json and passed to main.py",
    )
    parser.add_argument(
        "--nonlandmark-dir",
        type=Path,
        default=None,
        help="folder of images showing no landmark, shipped as nonlandmark/, passed to main.py",
    )
    parser.add_argument(
        "--train-descriptors",
        type=Path,
        default=None,
        help="retrieval: `export train-descriptors`' file of the --model shipped, shipped as train-descriptors.npz "
        "and passed to main.py (label transfer)",
    )
    parser.add_argument("--float16", action="store_true", help="export the model with --float16 (--run only)")
    _add_whiten_flags(parser)
    args = _parse(parser, argv)
    for flag in ("--kaggle-user", "--dataset", "--kernel", "--competition"):
        _check_slug(flag, getattr(args, flag[2:].replace("-", "_")))
    if args.time_budget_h is not None:
        check_positive("--time-budget-h", args.time_budget_h)
    if args.model:
        _check_exported_flags(args)
    whiten = None if args.model else _whiten_settings(args)
    spec = BundleSpec(
        user=args.kaggle_user,
        dataset=args.dataset,
        kernel=args.kernel,
        competition=args.competition,
        wheels=args.wheel or (),
        pythons=args.python,
        script=args.script,
        budget_h=args.time_budget_h,
        settings=args.settings,
        nonlandmark_dir=args.nonlandmark_dir,
        train_descriptors=args.train_descriptors,
        float16=args.float16,
        whiten=whiten,
        weights=args.model_weights,
        exported=bool(args.model),
    )
    print(build_bundle(args.model or args.run, args.out, spec, overwrite=args.overwrite))


def main_train_descriptors(argv: list[str] | None) -> None:
    parser = KitArgumentParser(prog="python -m export train-descriptors", description=COMMANDS["train-descriptors"][1])
    parser.add_argument("--model", type=Path, required=True, help="the DELG SavedModel folder the notebook will run")
    parser.add_argument("--data", type=Path, required=True, help="GLDv2 train folder: train.csv and train/a/b/c/ID.jpg")
    parser.add_argument("--out", type=Path, required=True, help=".npz file to write")
    parser.add_argument(
        "--settings",
        type=Path,
        default=None,
        help="JSON settings file the notebook will run with (its global extraction settings are used)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if this command wrote it")
    args = parser.parse_args(argv)
    check_input_folder("--model", args.model)
    check_input_folder("--data", args.data)
    if not (args.data / "train.csv").is_file():
        raise UserError(f"--data {args.data}: no train.csv in it (a GLDv2 train folder holds train.csv and train/)")
    check_not_an_input(
        "--out", args.out, [("--model", args.model), ("--data", args.data), ("--settings", args.settings)]
    )
    check_output_parent(args.out)
    check_npz_out(args.out, args.overwrite)
    print(export_train_descriptors(args.model, args.data, args.out, args.settings))


def main(argv: list[str]) -> int:
    return dispatch("export", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
