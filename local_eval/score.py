"""`python -m local_eval score`: score a Kaggle submission file against a GLDv2 solution file."""

from __future__ import annotations

import argparse
import json
import logging
import time

from common.cli import KitArgumentParser
from local_eval.kaggle_csv import TASKS
from local_eval.metrics import REPORTED_SUBSETS, score_files

log = logging.getLogger(__name__)
COLUMNS = REPORTED_SUBSETS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = KitArgumentParser(prog="python -m local_eval score", description=__doc__)
    parser.add_argument(
        "--task",
        required=True,
        choices=TASKS,
        help="recognition (GAP of id,landmarks) or retrieval (mAP@100 of id,images)",
    )
    parser.add_argument(
        "--solution",
        required=True,
        help="solution CSV: id,landmarks,Usage or id,images,Usage (Usage Public/Private/Ignored)",
    )
    parser.add_argument("--submission", required=True, help="submission CSV: id,landmarks or id,images")
    parser.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object {"task", "public", "private", "all"} instead of a table',
    )
    return parser.parse_args(argv)


def format_table(scores: dict) -> str:
    """One row per metric, one column per subset; '-' where a metric is undefined (nothing to divide by)."""
    metrics = list(scores["all"])
    width = max(len(name) for name in metrics)
    lines = [f"{scores['task']:<{width}}" + "".join(f"{column:>12}" for column in COLUMNS)]
    for name in metrics:
        cells = [_format_cell(scores[column][name]) for column in COLUMNS]
        lines.append(f"{name:<{width}}" + "".join(f"{cell:>12}" for cell in cells))
    return "\n".join(lines)


def _format_cell(value: float | int | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.6f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    scores = score_files(args.task, args.solution, args.submission)
    log.info("scored %s in %.2f s", args.submission, time.perf_counter() - start)
    print(json.dumps(scores) if args.json else format_table(scores))
    return 0
