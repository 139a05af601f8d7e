"""--recipe: the tiny recipe trains its stages in order, resumes after SIGTERM in the second stage, exports and
submits; the shipped recipes are listed by --help and pass the config checks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.cli import run_main
from tests import HANG_GUARD_S
from tests.test_train_init_from import export_and_submit
from train.__main__ import main as train_main
from train.config import check_config
from train.recipes import RECIPES, stage_configs, stage_dirs

ROOT = Path(__file__).resolve().parent.parent
STEPS = 30  # per stage; SIGTERM comes once the second stage has written its first checkpoint (step 5)


def test_every_shipped_recipe_passes_the_config_checks_and_help_lists_it(tmp_path):
    for name in RECIPES:
        for index, (_, cfg) in enumerate(stage_configs(name, tmp_path / name, {})):
            if index == 0:
                check_config(cfg)
            assert cfg.backbone_weights == ("none" if index or name == "tiny" else "imagenet")
    assert [cfg.image_size for _, cfg in stage_configs("effv2s", tmp_path, {})] == [512, 640, 768]
    assert [cfg.not_clean_weight for _, cfg in stage_configs("effv2s", tmp_path, {})] == [0.0, 1.0, 0.5]
    help_text = subprocess.run(
        [sys.executable, "-m", "train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=True,
    ).stdout
    flat = " ".join(help_text.split())
    for name, recipe in RECIPES.items():
        assert f"{name}: {' '.join(recipe.describe().split())}" in flat, name


def test_a_recipe_with_a_config_is_one_error_line(data_dir, tmp_path, capsys):
    code = run_main(
        train_main, ["--data", str(data_dir), "--out", str(tmp_path / "r"), "--recipe", "tiny", "--config", "r50"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --recipe tiny trains its own config (tiny); drop --config\n"


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.5)


def test_the_tiny_recipe_runs_its_stages_resumes_after_sigterm_exports_and_submits(
    data_dir, tiny_competition, tmp_path
):
    out = tmp_path / "recipe"
    command = [
        sys.executable,
        "-m",
        "train",
        "--data",
        str(data_dir),
        "--recipe",
        "tiny",
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--batch-size",
        "8",
        "--checkpoint-every",
        "5",
        "--log-every",
        "5",
        "--validate-every",
        str(STEPS),
    ]
    first, second = stage_dirs(out, RECIPES["tiny"])
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(second / "checkpoints" / "checkpoint", process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=HANG_GUARD_S)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = json.loads((second / "metrics.json").read_text())
    assert stopped["stopped_by"] == "SIGTERM" and 5 <= stopped["step"] < STEPS
    first_metrics = (first / "metrics.json").read_text()
    assert json.loads(first_metrics)["step"] == STEPS

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage 1 (" in resumed.stderr and "is already trained" in resumed.stderr
    assert f"resumed {second / 'checkpoints' / 'ckpt-'}{stopped['step']}" in resumed.stderr
    assert (first / "metrics.json").read_text() == first_metrics  # the first stage was not trained again
    final = json.loads((second / "metrics.json").read_text())
    assert final["step"] == STEPS and final["stopped_by"] is None
    config = json.loads((second / "config.json").read_text())
    assert config["image_size"] == 96 and config["init_from"] == str(first.resolve())
    assert json.loads((first / "config.json").read_text())["image_size"] == 64

    scores = export_and_submit(second, tiny_competition, tmp_path)
    assert 0 <= scores["all"]["gap"] <= 1


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_stage_after_the_first_starts_from_the_one_before(name, tmp_path):
    stages = stage_configs(name, tmp_path, {"batch_size": 8})
    for (previous, _), (_, cfg) in zip(stages, stages[1:], strict=False):
        assert cfg.init_from == str(previous.resolve()) and cfg.batch_size == 8
    assert stages[0][1].init_from == ""
