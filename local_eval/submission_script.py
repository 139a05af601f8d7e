"""submission/main.py, which must stand alone on Kaggle (it is no package): its path, and the script as a module."""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

from common.kit import SUBMISSION_SCRIPT

SCRIPT = SUBMISSION_SCRIPT
MODULE_NAME = "submission_main"
SCRIPT_PYTHON_ENV = "KIT_SCRIPT_PYTHON"  # another interpreter for the script (replays, end-to-end tests)


def script_python() -> str:
    """The interpreter that runs the script in a subprocess: $KIT_SCRIPT_PYTHON when set (e.g. .venv-kaggle's
    Python, Kaggle's image's versions), else this process's."""
    return os.environ.get(SCRIPT_PYTHON_ENV) or sys.executable


def load_submission() -> ModuleType:
    """The script as a module, loaded once per process (tests, benches and `show` share the copy)."""
    if MODULE_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(MODULE_NAME, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE_NAME] = module  # worker processes find pickled functions by this name
        spec.loader.exec_module(module)
    return sys.modules[MODULE_NAME]
