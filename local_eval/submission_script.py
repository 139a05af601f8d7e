"""submission/main.py, which must stand alone on Kaggle (it is no package): its path, the script as a module, and the
files shipped beside it (budget, search, settings_cli, store), all loaded by common.kit, which export shares."""
from __future__ import annotations

from common.kit import SUBMISSION_SCRIPT, load_submission, sibling

SCRIPT = SUBMISSION_SCRIPT
__all__ = ["SCRIPT", "load_submission", "sibling"]
