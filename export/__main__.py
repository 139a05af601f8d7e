"""`python -m export delg|retrieval|bundle ...`: SavedModels and the Kaggle bundle from a training run."""
from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

from common.cli import UserError, check_at_least, check_input_folder, check_output_parent, check_positive, dispatch
from export.bundle import DEFAULT_BUDGET_H, DEFAULT_COMPETITION, KAGGLE_PYTHONS, SUBMISSION_SCRIPT, build_bundle
from export.delg import export_delg
from export.retrieval import DEFAULT_MAX_MB, export_retrieval

COMMANDS = {  # name -> ("module:function", help); this module is __main__ under `python -m export`
    "delg": (f"{__name__}:main_delg",
             "the DELG SavedModel (local + global features, the DELF/Kaggle-baseline contract)"),
    "retrieval": (f"{__name__}:main_retrieval",
                  "the Kaggle retrieval SavedModel, zipped for upload (one global descriptor per image)"),
    "bundle": (f"{__name__}:main_bundle", "a folder for `kaggle datasets create` + `kaggle kernels push`"),
}


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m export {command}", description=COMMANDS[command][1])
    parser.add_argument("--run", type=Path, required=True, help="training run folder (config.json, checkpoints/)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if this kit wrote it (a folder or file of other origin is never replaced)")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, then check what every export shares: --run is a folder, --out can be written where it points."""
    args = parser.parse_args(argv)
    check_input_folder("--run", args.run)
    check_output_parent(args.out)
    return args


def _check_zip_out(out: Path, overwrite: bool) -> None:
    """--out of `export retrieval`: a new file, or with --overwrite a retrieval zip this kit wrote."""
    if out.is_dir():
        raise UserError(f"--out {out}: a folder; give the path of the zip file to write")
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it or choose another path")
    if not _is_saved_model_zip(out):
        raise UserError(f"--out {out} exists and is no SavedModel zip written by this kit; "
                        "--overwrite replaces only the kit's own outputs: choose another path")


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
    parser.add_argument("--float16", action="store_true",
                        help="also hold global_batch_float16 (float16 compute, float32 outputs)")
    parser.add_argument("--no-xla", dest="xla", action="store_false",
                        help="do not XLA-compile the batched global functions")
    args = _parse(parser, argv)
    print(export_delg(args.run, args.out, overwrite=args.overwrite, float16=args.float16, xla=args.xla))


def main_retrieval(argv: list[str] | None) -> None:
    parser = _parser("retrieval")
    parser.add_argument("--out", type=Path, required=True, help="zip file to create (e.g. model.zip)")
    parser.add_argument("--dim", type=int, default=None,
                        help="descriptor size D; must equal the run's embedding_dim (default: that value)")
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_MB,
                        help=f"refuse a zip larger than this many MB (default {DEFAULT_MAX_MB:g})")
    args = _parse(parser, argv)
    if args.dim is not None:
        check_at_least("--dim", args.dim, 1)
    check_positive("--max-mb", args.max_mb)
    _check_zip_out(args.out, args.overwrite)
    size_mb = export_retrieval(args.run, args.out, dim=args.dim, max_mb=args.max_mb, overwrite=args.overwrite)
    print(f"{args.out}: {size_mb:.1f} MB (limit {args.max_mb:g} MB)")


def main_bundle(argv: list[str] | None) -> None:
    parser = _parser("bundle")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    parser.add_argument("--kaggle-user", required=True, help="your Kaggle user name (owner of dataset and notebook)")
    parser.add_argument("--dataset", default="delg-landmark-model", help="dataset slug (default %(default)s)")
    parser.add_argument("--kernel", default="delg-landmark-submission", help="notebook slug (default %(default)s)")
    parser.add_argument("--competition", default=DEFAULT_COMPETITION,
                        help="competition slug the notebook is attached to (default %(default)s)")
    parser.add_argument("--wheel", type=Path, action="append", default=[],
                        help="a pydegensac wheel to ship; repeat the flag for several (kernel.py installs the one "
                             "tagged for its Python)")
    parser.add_argument("--python", nargs="+", metavar="X.Y", default=None,
                        help="fetch pydegensac's wheel for each of these Pythons with pip (needs internet); default "
                             f"without --wheel: {' '.join(KAGGLE_PYTHONS)} (Kaggle's image's Python and the next)")
    parser.add_argument("--script", type=Path, default=SUBMISSION_SCRIPT,
                        help="submission script, shipped as main.py with the .py files beside it (default %(default)s)")
    parser.add_argument("--time-budget-h", type=float, default=DEFAULT_BUDGET_H,
                        help="the competition's notebook limit in hours, passed to main.py (default %(default)s)")
    parser.add_argument("--settings", type=Path, default=None,
                        help="JSON settings file (local_eval tune's) shipped as settings.json, passed to main.py")
    parser.add_argument("--nonlandmark-dir", type=Path, default=None,
                        help="folder of images showing no landmark, shipped as nonlandmark/, passed to main.py")
    parser.add_argument("--float16", action="store_true", help="export the model with --float16")
    args = _parse(parser, argv)
    for flag in ("--kaggle-user", "--dataset", "--kernel", "--competition"):
        _check_slug(flag, getattr(args, flag[2:].replace("-", "_")))
    check_positive("--time-budget-h", args.time_budget_h)
    print(build_bundle(args.run, args.out, user=args.kaggle_user, dataset=args.dataset, kernel=args.kernel,
                       competition=args.competition, wheels=args.wheel, pythons=args.python, script=args.script,
                       overwrite=args.overwrite, budget_h=args.time_budget_h, settings=args.settings,
                       nonlandmark_dir=args.nonlandmark_dir, float16=args.float16))


def main(argv: list[str]) -> int:
    return dispatch("export", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
