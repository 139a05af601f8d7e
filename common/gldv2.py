"""The GLDv2 / Kaggle file layout: ids, where their images live, and what each CSV field holds."""

from __future__ import annotations

import io
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


def read_csv_strings(path: Path) -> pd.DataFrame:
    """A CSV file with a header line, every field a string; a UserError naming the file (and the line) when it is
    missing, empty, not UTF-8 text, or has a row with more fields than the header."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {'a folder, not a CSV file' if path.is_dir() else 'no such file'}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(
            f"{path}, line {line}: byte 0x{data[err.start]:02x} is not UTF-8 text; is this a CSV file?"
        ) from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise UserError(f"{path}, line {line}: a NUL byte; is this a CSV file?")
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: empty; it needs at least a header line") from None
    except pd.errors.ParserError as err:
        message = str(err).splitlines()[0]
        ragged = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
        if ragged:
            expected, line, seen = ragged.groups()
            raise UserError(f"{path}, line {line}: {seen} fields where the header has {expected}") from None
        detail = message.removeprefix("Error tokenizing data. ")
        raise UserError(f"{path}: not a readable CSV file ({detail})") from None


def check_fields(path: Path, frame: pd.DataFrame, fields: dict[str, tuple[str, str]]) -> None:
    """Every value of each column matches its field pattern, else a UserError naming the file, line and id."""
    for column, (pattern, words) in fields.items():
        bad = ~frame[column].str.fullmatch(pattern, na=False)
        if bad.any():
            row = int(bad.to_numpy().argmax())
            where = f"id {frame['id'].iloc[row]}: " if "id" in frame.columns and column != "id" else ""
            raise UserError(f"{path}, line {row + 2}: {where}{column} {frame[column].iloc[row]!r} is not {words}")
