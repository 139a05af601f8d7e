"""Each fact the notebook must keep its own copy of is tied here to its one home in the kit, and the kit uses
only the notebook names main.py's __all__ and common/kit.py's SIBLING_API list."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common import kit
from export import delg
from local_eval import projection
from local_eval.submission_script import SCRIPT, load_submission, sibling
from tests import HANG_GUARD_S
from train import config

sub = load_submission()
ROOT = Path(__file__).resolve().parents[1]


def test_delg_defaults_equal_train_config():
    assert sub.DELG_IMAGE_SCALES == config.DELG_IMAGE_SCALES
    assert sub.DELG_GLOBAL_SCALE_INDICES == config.DELG_GLOBAL_SCALE_INDICES
    assert sub.DELG_MAX_IMAGE_SIDE == config.DELG_MAX_IMAGE_SIDE
    assert sub.DELG_MAX_FEATURE_NUM == config.DELG_MAX_FEATURE_NUM
    assert sub.DELG_ATTENTION_ABS_THRESHOLD == config.DELG_ATTENTION_ABS_THRESHOLD


def test_notebook_limit_stage_names_and_script_path_have_one_home():
    assert sub.NOTEBOOK_LIMIT_H == kit.NOTEBOOK_LIMIT_H
    assert sub.Budget().time_budget_h == kit.NOTEBOOK_LIMIT_H
    assert sub.TIMING_STAGES == projection.STAGES
    assert SCRIPT == kit.SUBMISSION_SCRIPT and SCRIPT.is_file()


def test_batched_signature_names_are_the_exports():
    assert sub.BATCH_SIGNATURES == {
        ("float32", False): delg.GLOBAL_BATCH,
        ("float32", True): delg.GLOBAL_BATCH + delg.XLA_SUFFIX,
        ("float16", False): delg.GLOBAL_BATCH_FLOAT16,
        ("float16", True): delg.GLOBAL_BATCH_FLOAT16 + delg.XLA_SUFFIX,
    }


KIT_FOLDERS = ("local_eval", "bench", "demo", "export", "train")


def kit_uses_of_the_files_beside_the_script(text: str) -> set[str]:
    """'file.name' for each name a kit file takes from a file beside the script (through common.kit.sibling)."""
    used = {f"{f}.{n}" for f, n in re.findall(r"""sibling\(["'](\w+)["']\)\.(\w+)""", text)}
    for alias, f in re.findall(r"""(\w+)\s*=\s*(?:script_)?sibling\(["'](\w+)["']\)\s*(?:#.*)?$""", text, re.M):
        used |= {f"{f}.{n}" for n in re.findall(rf"\b{alias}\.(\w+)", text) if n != "py"}  # not "costs.py"
    return used


def test_the_kit_uses_only_the_notebooks_listed_names():
    """One fence: every name the kit takes from submission/, from main.py or a file beside it, is listed."""
    fence = set(sub.__all__) | set(kit.SIBLING_API)
    for name in fence:
        where, _, member = name.rpartition(".")
        assert hasattr(sibling(where) if where else sub, member), name
    used = set()
    for folder in KIT_FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            used |= kit_uses_of_the_files_beside_the_script(text)
            if "load_submission" in text:
                used |= set(re.findall(r"\bsub\.([A-Za-z_]\w*)", text))
                used |= set(re.findall(r"load_submission\(\)\.([A-Za-z_]\w*)", text))
    assert {name for name in used if "." in name}, "the pattern finds the kit's uses of the files beside it"
    assert used <= fence, sorted(used - fence)


def test_the_fence_sees_a_name_taken_through_an_alias():
    text = 'costs = sibling("costs")  # costs.py\nx = costs.secret_rate + sibling("store").hidden\ny = sibling("a").b'
    assert kit_uses_of_the_files_beside_the_script(text) == {"costs.secret_rate", "store.hidden", "a.b"}


def test_the_kit_takes_only_the_listed_files_beside_the_script():
    from common.kit import SIBLINGS, SUBMISSION_SCRIPT

    used = set()
    for folder in (*KIT_FOLDERS, "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path != Path(__file__):  # this test asks for a file that is not listed, on purpose
                used |= set(re.findall(r"""sibling\(["'](\w+)["']\)""", path.read_text()))
    assert used, "the pattern finds the kit's uses"
    assert used <= set(SIBLINGS), sorted(used - set(SIBLINGS))
    assert {(SUBMISSION_SCRIPT.parent / f"{name}.py").is_file() for name in SIBLINGS} == {True}
    with pytest.raises(ImportError, match="not one of the script's files"):
        sibling("main")


def test_the_help_describes_the_script_as_its_docstring_does():
    """settings.py keeps a copy of main.py's first docstring paragraph for --help (it may not import main.py)."""
    first_paragraph = " ".join(load_submission().__doc__.split("\n\n")[0].split())
    assert sibling("settings").DESCRIPTION == first_paragraph


def test_the_suites_timeout_is_the_hang_guard(pytestconfig):
    assert float(pytestconfig.getini("timeout")) == HANG_GUARD_S  # pyproject.toml's pytest-timeout setting
