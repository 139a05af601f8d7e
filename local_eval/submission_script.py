"""submission/main.py, which must stand alone on Kaggle (it is no package): its path, the script as a module, the
files shipped beside it (budget, store, savedmodel, verifier, ...), all loaded by common.kit, which export shares, and
the interpreter that runs it in a subprocess."""

from __future__ import annotations

import os
import sys

from common.kit import SUBMISSION_SCRIPT, load_submission, sibling

SCRIPT = SUBMISSION_SCRIPT
SCRIPT_PYTHON_ENV = "KIT_SCRIPT_PYTHON"  # another interpreter for the script (replays, end-to-end tests)
__all__ = ["SCRIPT", "SCRIPT_PYTHON_ENV", "load_submission", "script_python", "sibling"]


def script_python() -> str:
    """The interpreter that runs the script in a subprocess: $KIT_SCRIPT_PYTHON when set (e.g. .venv-kaggle's
    Python, Kaggle's image's versions), else this process's."""
    return os.environ.get(SCRIPT_PYTHON_ENV) or sys.executable
