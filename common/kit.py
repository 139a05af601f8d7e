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

# What the kit may take from those files ('file.name'); from main.py itself, its __all__. Everything else in
# submission/ may change freely: tests/test_kit_constants.py checks every use in the kit against the two.
SIBLING_API = (
    "bridge.TrainSet",
    "bridge.load_train_descriptors",
    "bridge.model_fingerprint",
    "bridge.read_train_descriptors",
    "bridge.write_train_descriptors",
    "budget.Timing",
    "competitions.COMPETITIONS",
    "competitions.KAGGLE_GPU",
    "competitions.profile_name",
    "costs.GPU_KNN_S",
    "costs.GPU_MATMUL_SPEEDUP",
    "costs.NUMPY_16_CORES_KNN_S",
    "costs.RETRIEVAL_ONLY",
    "costs.SAFETY_MARGIN",
    "costs.Server",
    "costs.Sizes",
    "costs.TIMING_STAGES",
    "costs.Work",
    "costs.dba_bytes",
    "costs.depth_that_fits",
    "costs.knn_bytes",
    "costs.knn_products",
    "costs.memory_bytes",
    "costs.projected_disk",
    "costs.projected_memory",
    "costs.projected_seconds",
    "costs.rate",
    "costs.rerank_seconds_per_query",
    "costs.server_rates",
    "costs.stage_units",
    "costs.superglobal_bytes",
    "settings_cli.InputError",
    "settings_cli.check_settings",
    "settings_cli.coerce",
    "settings_cli.field_type",
    "settings_cli.flag",
    "store.global_settings",
    "store.image_path",
    "store.image_stamps",
    "verifier.pooled_map",
    "verifier.verification_pool",
    "verifier.verify_all",
    "verifier.worker_pool",
    "verifier.worker_state",
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
