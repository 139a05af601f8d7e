"""The GLDv2 / Kaggle file layout: ids and where their images live."""
from __future__ import annotations

import re
from pathlib import Path

ID_PATTERN = re.compile(r"^[0-9a-f]{16}$")


def image_path(root: str | Path, split: str, image_id: str) -> Path:
    """Image of id 'abcdef…' in split 'train' lives at root/train/a/b/c/abcdef….jpg."""
    return Path(root) / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
