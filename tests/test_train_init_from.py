"""--init-from RUN_DIR: a new run starts from another run's weights at a new size (or margin, data, loss weights),
with new classifiers for a different label set; it exports and submits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.cli import UserError, run_main
from export.__main__ import main as export_main
from local_eval.layout import solution_file
from local_eval.metrics import score_files
from local_eval.submission_script import load_submission
from tests import LIGHT as LIGHT_BASE
from train.__main__ import main as train_main
from train.config import get_config
from train.init_from import init_from_run, load_run_model
from train.loop import train
from train.model import DelgModel

# The submission's light settings (as tests/test_backbones.py runs a family's export).
LIGHT = [*LIGHT_BASE, "--plan", "fixed", "--global-max-side", "128", "--rerank", "3", "--max-rerank-queries", "10"]


def export_and_submit(run: Path, competition: Path, folder: Path) -> dict:
    """The run exported (`export delg`), submitted on the competition's recognition data with LIGHT settings, and
    scored: what a continued run or a recipe must still do end to end."""
    model, submission = folder / "model", folder / "submission.csv"
    assert export_main(["delg", "--run", str(run), "--out", str(model)]) == 0
    argv = ["--task", "recognition", "--data", str(competition / "landmark-recognition"), "--model", str(model)]
    assert load_submission().main([*argv, "--work", str(folder / "work"), "--out", str(submission), *LIGHT]) == 0
    return score_files("recognition", solution_file(competition, "recognition"), submission)


def at_96px(**overrides):
    """One step at 96 px: its logged loss is the loss of the starting weights on the stream's first batch."""
    return get_config(
        "tiny",
        steps=1,
        image_size=96,
        batch_size=16,
        warmup_steps=1,
        log_every=1,
        checkpoint_every=1,
        validate_every=1,
        **overrides,
    )


def test_a_64px_run_continued_at_96px_starts_lower_than_scratch_and_exports_and_submits(
    tiny_run, data_dir, tiny_competition, tmp_path
):
    scratch = train(at_96px(), data_dir=data_dir, run_dir=tmp_path / "scratch")
    continued = train(at_96px(init_from=str(tiny_run)), data_dir=data_dir, run_dir=tmp_path / "continued")
    assert json.loads((tiny_run / "config.json").read_text())["image_size"] == 64
    assert continued["loss_total"] < scratch["loss_total"], (continued["loss_total"], scratch["loss_total"])
    recorded = json.loads((tmp_path / "continued" / "config.json").read_text())
    assert recorded["init_from"] == continued["init_from"] == str(tiny_run.resolve())
    scores = export_and_submit(tmp_path / "continued", tiny_competition, tmp_path)
    assert 0 <= scores["all"]["gap"] <= 1


def test_another_label_set_gets_new_classifiers_and_keeps_the_rest(tiny_run):
    source, landmark_ids, _ = load_run_model(tiny_run)
    fewer = landmark_ids[:-1]
    model = DelgModel(dataclasses.replace(source.cfg, image_size=96), num_classes=len(fewer))
    model(np.zeros([1, 64, 64, 3], np.float32))
    copied = init_from_run(model, tiny_run, fewer)
    assert copied == ["backbone", "whitening", "autoencoder", "attention"]
    for name in copied:
        for a, b in zip(getattr(model, name).get_weights(), getattr(source, name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
    same = DelgModel(source.cfg, num_classes=len(landmark_ids))
    same(np.zeros([1, 64, 64, 3], np.float32))
    assert init_from_run(same, tiny_run, landmark_ids)[-2:] == ["attention", "attention_classifier"]


def test_another_backbone_is_refused(tiny_run):
    model = DelgModel(get_config("tiny", tiny_widths=(8, 8, 8, 8)), num_classes=3)
    model(np.zeros([1, 64, 64, 3], np.float32))
    with pytest.raises(
        UserError,
        match=r"its backbone \(tiny, widths 16,32,64,128\) does not fit this run's "
        r"\(tiny, widths 8,8,8,8\)",
    ):
        init_from_run(model, tiny_run, [1, 2, 3])


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--init-from", "nowhere"], "--init-from nowhere: must be a training run folder"),
        (
            ["--config", "r50", "--init-from", "RUN", "--backbone-weights", "imagenet"],
            "--init-from RUN and --backbone-weights imagenet both give the starting weights",
        ),
    ],
)
def test_bad_init_from_flags_are_one_error_line(flags, expected, tiny_run, data_dir, tmp_path, capsys):
    flags = [str(tiny_run) if flag == "RUN" else flag for flag in flags]
    code = run_main(train_main, ["--data", str(data_dir), "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {expected.replace('RUN', str(tiny_run))}"), err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_a_label_map_that_differs_only_in_ids_is_another_label_set(tiny_run):
    ids = pd.read_csv(tiny_run / "label_map.csv")["landmark_id"].tolist()
    shifted = [landmark_id + 1_000_000 for landmark_id in ids]
    source, _, _ = load_run_model(tiny_run)
    model = DelgModel(source.cfg, num_classes=len(shifted))
    model(np.zeros([1, 64, 64, 3], np.float32))
    assert "cosine_classifier" not in init_from_run(model, tiny_run, shifted)
