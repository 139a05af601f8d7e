"""The GLDv2 / Kaggle file layout: ids, where their images live, and what each CSV field holds."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from common.cli import UserError

# What a field of the GLDv2 CSV files holds: (regular expression of the whole field, words for an error)
ID = (r"[0-9a-f]{16}", "an id of 16 hex digits")
IDS = (r"[0-9a-f]{16}(?: [0-9a-f]{16})*", "space-separated ids of 16 hex digits")
LANDMARK = (r"\d+", "a landmark id (an integer)")
LANDMARKS = (r"(?:\d+(?: \d+)*)?", "space-separated landmark ids, or nothing")
INDEX_IMAGES = (rf"None|{IDS[0]}", "None or space-separated ids of 16 hex digits")
USAGE = (r"Public|Private|Ignored", "Public, Private or Ignored")
ID_PATTERN = re.compile(rf"^{ID[0]}$")


def image_path(root: str | Path, split: str, image_id: str) -> Path:
    """Image of id 'abcdef…' in split 'train' lives at root/train/a/b/c/abcdef….jpg."""
    return Path(root) / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def check_fields(path: Path, frame: pd.DataFrame, fields: dict[str, tuple[str, str]]) -> None:
    """Every value of each column matches its field pattern, else a UserError naming the file, line and id."""
    for column, (pattern, words) in fields.items():
        bad = ~frame[column].str.fullmatch(pattern, na=False)
        if bad.any():
            row = int(bad.to_numpy().argmax())
            where = f"id {frame['id'].iloc[row]}: " if "id" in frame.columns and column != "id" else ""
            raise UserError(f"{path}, line {row + 2}: {where}{column} {frame[column].iloc[row]!r} is not {words}")
