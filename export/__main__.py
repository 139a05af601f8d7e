"""`python -m export delg|retrieval|bundle ...`: SavedModels and the Kaggle bundle from a training run."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import dispatch
from export.bundle import DEFAULT_BUDGET_H, DEFAULT_COMPETITION, SUBMISSION_SCRIPT, build_bundle
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
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    return parser


def main_delg(argv: list[str] | None) -> None:
    parser = _parser("delg")
    parser.add_argument("--out", type=Path, required=True, help="SavedModel folder to create")
    args = parser.parse_args(argv)
    print(export_delg(args.run, args.out, overwrite=args.overwrite))


def main_retrieval(argv: list[str] | None) -> None:
    parser = _parser("retrieval")
    parser.add_argument("--out", type=Path, required=True, help="zip file to create (e.g. model.zip)")
    parser.add_argument("--dim", type=int, default=None,
                        help="descriptor size D; must equal the run's embedding_dim (default: that value)")
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_MB,
                        help=f"refuse a zip larger than this many MB (default {DEFAULT_MAX_MB:g})")
    args = parser.parse_args(argv)
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
    parser.add_argument("--wheel", type=Path, default=None,
                        help="pydegensac wheel to include (default: look in pip's wheel cache; never downloads)")
    parser.add_argument("--script", type=Path, default=SUBMISSION_SCRIPT,
                        help="submission script to ship (default %(default)s)")
    parser.add_argument("--time-budget-h", type=float, default=DEFAULT_BUDGET_H,
                        help="the competition's notebook limit in hours, passed to main.py (default %(default)s)")
    args = parser.parse_args(argv)
    print(build_bundle(args.run, args.out, user=args.kaggle_user, dataset=args.dataset, kernel=args.kernel,
                       competition=args.competition, wheel=args.wheel, script=args.script,
                       overwrite=args.overwrite, budget_h=args.time_budget_h))


def main(argv: list[str]) -> int:
    return dispatch("export", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
