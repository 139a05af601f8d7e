"""`python -m local_eval build synthetic|gldv2|revisited-synthetic ...`: build a local competition (or a synthetic
dataset in the Revisited Oxford / Paris layout) and print its summary."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import KitArgumentParser
from local_eval import revisited_synthetic
from local_eval.gldv2_subset import build_gldv2_subset
from local_eval.layout import nonlandmark_folder, solution_file, task_folder
from local_eval.synthetic import SIZES, build_synthetic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = KitArgumentParser(prog="python -m local_eval build", description=__doc__)
    sources = parser.add_subparsers(dest="source", required=True, metavar="{synthetic,gldv2,revisited-synthetic}")
    synthetic = sources.add_parser("synthetic", help="render a synthetic competition from a seed")
    synthetic.add_argument(
        "--size",
        default="tiny",
        choices=list(SIZES),
        help="tiny: tests (~30 landmarks); demo: `make demo`'s (~40); half (~75); small (~150); "
        "medium: benchmarks (10x small)",
    )
    synthetic.add_argument(
        "--seed", type=int, default=0, help="master seed (0 or more): the same seed gives the same bytes"
    )
    synthetic.add_argument(
        "--nonlandmark-share",
        type=float,
        default=0.7,
        help="share of recognition test images that show no train landmark",
    )
    gldv2 = sources.add_parser("gldv2", help="cut a consistent subset of a local GLDv2 download (links images)")
    gldv2.add_argument(
        "--gldv2",
        type=Path,
        required=True,
        help="GLDv2 folder: train.csv, train_clean.csv, the v2.1 solutions, train/ test/ index/",
    )
    gldv2.add_argument("--test", type=int, required=True, help="test images (recognition) and queries (retrieval)")
    gldv2.add_argument("--index", type=int, required=True, help="index images: relevant ones plus distractors")
    gldv2.add_argument("--seed", type=int, default=0, help="seed of the random choices")
    gldv2.add_argument(
        "--nonlandmark-dir",
        type=Path,
        default=None,
        help="a folder of images known to show no landmark (e.g. an earlier year's non-landmark test "
        "images): linked as the competition's distractor set",
    )
    revisited = sources.add_parser(
        "revisited-synthetic", help="render a small dataset in the revisitop layout (for local_eval revisited)"
    )
    revisited.add_argument(
        "--dataset",
        default="roxford5k",
        choices=revisited_synthetic.DATASETS,
        help="the dataset name it is written as (OUT/NAME/jpg, OUT/NAME/gnd_NAME.pkl)",
    )
    revisited.add_argument(
        "--size",
        default="small",
        choices=list(revisited_synthetic.SIZES),
        help="tiny: tests (4 landmarks, 4 queries, 34 database images); small: 11 landmarks, "
        "55 queries, 274 database images",
    )
    revisited.add_argument("--seed", type=int, default=0, help="seed (0 or more): the same seed gives the same bytes")
    for sub in (synthetic, gldv2, revisited):
        sub.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
        sub.add_argument(
            "--overwrite",
            action="store_true",
            help="replace a different competition this kit built at --out (never other folders)",
        )
    return parser.parse_args(argv)


def _quantiles(counts: pd.Series) -> str:
    if counts.empty:
        return "none"
    q = np.percentile(counts, [0, 25, 50, 75, 90, 100]).round(1)
    return "min {} / q25 {} / median {} / q75 {} / q90 {} / max {}".format(*q)


def summary(out: Path) -> str:
    """One screen: images per split, rows per Usage, images per landmark."""
    read = lambda path: pd.read_csv(path, dtype=str, keep_default_na=False)
    train = read(task_folder(out, "recognition") / "train.csv")
    recognition = read(solution_file(out, "recognition"))
    retrieval = read(solution_file(out, "retrieval"))
    n_index = sum(1 for _ in (task_folder(out, "retrieval") / "index").rglob("*.jpg"))
    relevant = retrieval.loc[retrieval.Usage != "Ignored", "images"].str.split()
    per_landmark = train.landmark_id.value_counts()
    nonlandmark = (recognition.landmarks == "").mean() if len(recognition) else 0.0
    lines = [
        f"competition at {out}",
        f"  recognition: {len(train)} train images of {len(per_landmark)} landmarks, {len(recognition)} test "
        f"images ({nonlandmark:.0%} non-landmark)",
        f"    test Usage: {_usage(recognition)}",
        f"    train images per landmark: {_quantiles(per_landmark)}",
        f"  retrieval: {n_index} index images, {len(retrieval)} queries",
        f"    query Usage: {_usage(retrieval)}",
        f"    relevant index images per scored query: {_quantiles(relevant.str.len())}",
        f"  distractors: {_distractors(out)}",
    ]
    return "\n".join(lines)


def _distractors(out: Path) -> str:
    folder = nonlandmark_folder(out)
    if not folder.is_dir():
        return "none (build gldv2 --nonlandmark-dir DIR adds them)"
    count = sum(1 for p in folder.rglob("*") if p.is_file())
    return f"{count} images of no landmark in {folder} (pass it to the script as --nonlandmark-dir)"


def _usage(solution: pd.DataFrame) -> str:
    counts = solution.Usage.value_counts()
    return ", ".join(f"{name} {counts.get(name, 0)}" for name in ("Public", "Private", "Ignored"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.source == "revisited-synthetic":
        out = revisited_synthetic.build_revisited_synthetic(
            args.out, args.dataset, args.size, args.seed, args.overwrite
        )
        print(revisited_synthetic.summary(out, args.dataset))
        return 0
    if args.source == "synthetic":
        out = build_synthetic(
            args.out, size=args.size, seed=args.seed, nonlandmark_share=args.nonlandmark_share, overwrite=args.overwrite
        )
    else:
        out = build_gldv2_subset(
            args.gldv2,
            args.out,
            n_test=args.test,
            n_index=args.index,
            seed=args.seed,
            overwrite=args.overwrite,
            nonlandmark_dir=args.nonlandmark_dir,
        )
    print(summary(out))
    return 0
