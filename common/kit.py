"""Facts of the kit that several packages share, written down once, and the notebook loaded as a module.

submission/main.py keeps its own copies (it must run alone in a Kaggle notebook); tests/test_kit_constants.py
ties each copy to its home here or in local_eval.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBMISSION_SCRIPT = REPO_ROOT / "submission" / "main.py"  # the notebook: replayed, bundled, imported by the kit
SUBMISSION_MODULE = "submission_main"  # its name as a module
NOTEBOOK_LIMIT_H = 9.0  # Kaggle's notebook limit of most years (2021: 12 h): the default budget everywhere


def load_submission() -> ModuleType:
    """submission/main.py (no package: it stands alone on Kaggle) as a module, loaded once per process (local_eval,
    export's settings check, tests and benches share the copy)."""
    if SUBMISSION_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(SUBMISSION_MODULE, SUBMISSION_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[SUBMISSION_MODULE] = module  # worker processes find pickled functions by this name
        spec.loader.exec_module(module)
    return sys.modules[SUBMISSION_MODULE]


# The files beside the script that the kit may import (through sibling()); the rest of submission/ is the script's.
SIBLINGS = (
    "bridge",
    "budget",
    "competitions",
    "costs",
    "devices",
    "savedmodel",
    "search",
    "settings",
    "settings_cli",
    "store",
    "verifier",
)


def sibling(name: str) -> ModuleType:
    """A file shipped beside the script (one of SIBLINGS), the module the script imports too: its folder goes on
    sys.path, as the script puts it there. A module of that name from elsewhere (another installed package imported
    first) is an ImportError naming both, never a silent stand-in."""
    if name not in SIBLINGS:
        raise ImportError(f"{name!r} is not one of the script's files the kit may use: {', '.join(SIBLINGS)}")
    folder = str(SUBMISSION_SCRIPT.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module = importlib.import_module(name)
    if Path(module.__file__ or "").resolve().parent != SUBMISSION_SCRIPT.parent:
        raise ImportError(
            f"module {name!r} comes from {module.__file__}, not from {SUBMISSION_SCRIPT.parent}: another "
            "package of that name was imported first"
        )
    return module
