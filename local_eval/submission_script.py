"""submission/main.py, which must stand alone on Kaggle (it is no package): its path, and the script as a module
(loaded by common.kit, which export shares)."""
from __future__ import annotations

from common.kit import SUBMISSION_SCRIPT, load_submission

SCRIPT = SUBMISSION_SCRIPT
__all__ = ["SCRIPT", "load_submission"]
