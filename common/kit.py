"""Facts of the kit that several packages share, written down once.

submission/main.py keeps its own copies (it must run alone in a Kaggle notebook); tests/test_kit_constants.py
ties each copy to its home here or in local_eval.
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBMISSION_SCRIPT = REPO_ROOT / "submission" / "main.py"  # the notebook: replayed, bundled, imported by the kit
NOTEBOOK_LIMIT_H = 9.0  # Kaggle's notebook limit of most years (2021: 12 h): the default budget everywhere
