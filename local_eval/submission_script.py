"""submission/main.py, which must stand alone on Kaggle (it is no package): its path, the script as a module, and the
files shipped beside it (budget, search, settings_cli, store) as the script imported them."""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from common.kit import SUBMISSION_SCRIPT

SCRIPT = SUBMISSION_SCRIPT
MODULE_NAME = "submission_main"


def load_submission() -> ModuleType:
    """The script as a module, loaded once per process (tests, benches and `show` share the copy)."""
    if MODULE_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(MODULE_NAME, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE_NAME] = module  # worker processes find pickled functions by this name
        spec.loader.exec_module(module)
    return sys.modules[MODULE_NAME]


def sibling(name: str) -> ModuleType:
    """A file shipped beside the script (budget, search, settings_cli, store), the module the script imports too:
    its folder goes on sys.path, as the script puts it there."""
    folder = str(SCRIPT.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)
