"""Readers for the GLDv2 solution files and Kaggle submission files, with errors that name file, line and id.

Recognition solution `id,landmarks,Usage` (landmarks: space-separated ids, empty for a non-landmark image);
retrieval solution `id,images,Usage` (ignored rows hold `None`). Recognition submission `id,landmarks` with
`"<landmark_id> <score>"` or empty; retrieval submission `id,images` with space-separated index ids.
Blank lines and trailing spaces are tolerated; `Ignored` rows are skipped, as the official reader does.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import UserError

TASKS = ("recognition", "retrieval")
USAGES = {"Public": "public", "Private": "private"}
IGNORED = "Ignored"


@dataclass
class Solution:
    """Ground truth per scored subset ('public', 'private': id -> landmark ids or index ids) and ignored ids."""

    subsets: dict[str, dict[str, list]] = field(default_factory=lambda: {"public": {}, "private": {}})
    ignored: set[str] = field(default_factory=set)

    def __contains__(self, test_id: str) -> bool:
        return test_id in self.subsets["public"] or test_id in self.subsets["private"] or test_id in self.ignored


def values_column(task: str) -> str:
    """The second column's name: `landmarks` for recognition, `images` for retrieval."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return "landmarks" if task == "recognition" else "images"


def read_solution(path: str | Path, task: str) -> Solution:
    """Read a solution file; Public/Private rows are parsed, Ignored rows only remembered."""
    solution = Solution()
    line_of: dict[str, int] = {}
    for line, test_id, (values, usage) in _rows(path, ["id", values_column(task), "Usage"]):
        _check_new_id(path, line, test_id, line_of)
        if usage == IGNORED:
            solution.ignored.add(test_id)
        elif usage in USAGES:
            parse = _parse_landmark_ids if task == "recognition" else _parse_relevant_images
            solution.subsets[USAGES[usage]][test_id] = parse(path, line, test_id, values)
        else:
            raise UserError(
                f"{path}:{line}: id {test_id}: unknown Usage {usage!r}; expected Public, Private or {IGNORED}"
            )
    return solution


def read_submission(path: str | Path, task: str, solution: Solution) -> dict[str, tuple[int, float] | list[str]]:
    """Read a submission: recognition id -> (landmark_id, score), retrieval id -> index ids in rank order.

    Empty predictions and ignored ids are left out; an id the solution lacks or a repeated id is an error.
    """
    predictions: dict[str, tuple[int, float] | list[str]] = {}
    line_of: dict[str, int] = {}
    for line, test_id, (values,) in _rows(path, ["id", values_column(task)]):
        _check_new_id(path, line, test_id, line_of)
        if test_id not in solution:
            raise UserError(f"{path}:{line}: id {test_id}: not in the solution file")
        if values and test_id not in solution.ignored:
            parse = _parse_recognition_prediction if task == "recognition" else _parse_retrieval_prediction
            predictions[test_id] = parse(path, line, test_id, values)
    return predictions


def _rows(path: str | Path, columns: list[str]) -> Iterator[tuple[int, str, list[str]]]:
    """Yield (line number, id, the other named columns' values) for each non-blank data row."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            rows = (row for row in reader if "".join(row).strip())
            header = [name.strip() for name in next(rows, [])]
            missing = [name for name in columns if name not in header]
            if missing:
                raise UserError(
                    f"{path}:{max(reader.line_num, 1)}: missing column(s) {', '.join(missing)}; "
                    f"expected header {','.join(columns)}, found {','.join(header) or 'nothing'}"
                )
            indices = [header.index(name) for name in columns]
            for row in rows:
                if len(row) != len(header):
                    raise UserError(
                        f"{path}:{reader.line_num}: expected {len(header)} fields "
                        f"({','.join(header)}), found {len(row)}"
                    )
                test_id, *values = [row[i].rstrip() for i in indices]
                yield reader.line_num, test_id.strip(), values
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    except (csv.Error, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable CSV file: {err}") from None


def _check_new_id(path: str | Path, line: int, test_id: str, line_of: dict[str, int]) -> None:
    if not test_id:
        raise UserError(f"{path}:{line}: empty id")
    if test_id in line_of:
        raise UserError(f"{path}:{line}: id {test_id}: repeated (first on line {line_of[test_id]})")
    line_of[test_id] = line


def _parse_landmark_id(path: str | Path, line: int, test_id: str, token: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise UserError(f"{path}:{line}: id {test_id}: landmark id {token!r} is not an integer") from None


def _parse_landmark_ids(path: str | Path, line: int, test_id: str, values: str) -> list[int]:
    """Ground-truth landmark ids; an empty field is a non-landmark image."""
    return [_parse_landmark_id(path, line, test_id, token) for token in values.split(" ") if token]


def _parse_relevant_images(path: str | Path, line: int, test_id: str, values: str) -> list[str]:
    images = [image for image in values.split(" ") if image]
    if not images:
        raise UserError(f"{path}:{line}: id {test_id}: a scored retrieval query needs relevant index images")
    return images


def _parse_recognition_prediction(path: str | Path, line: int, test_id: str, values: str) -> tuple[int, float]:
    tokens = values.split(" ")
    if len(tokens) != 2:
        raise UserError(
            f"{path}:{line}: id {test_id}: expected '<landmark_id> <score>', found {len(tokens)} token(s) in {values!r}"
        )
    landmark_id = _parse_landmark_id(path, line, test_id, tokens[0])
    try:
        score = float(tokens[1])
    except ValueError:
        raise UserError(f"{path}:{line}: id {test_id}: score {tokens[1]!r} is not a number") from None
    if not math.isfinite(score):
        raise UserError(f"{path}:{line}: id {test_id}: score {tokens[1]!r} is not finite")
    return landmark_id, score


def _parse_retrieval_prediction(path: str | Path, line: int, test_id: str, values: str) -> list[str]:
    """Index ids in rank order; as in the official reader, an empty token (double space) holds a rank."""
    return values.split(" ")
