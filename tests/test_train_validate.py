"""--validate-on COMPETITION_DIR: global-only GAP / mAP@100 through the notebook's global stage every
--validate-every steps; the best-scoring weights are kept in RUN/best; metrics.json, validation.json and
TensorBoard show the curve."""

from __future__ import annotations

import json

import pytest
import tensorflow as tf

from common.cli import run_main
from export.delg import load_trained_model
from train.__main__ import main as train_main
from train.config import get_config
from train.loop import train
from train.validate import BEST_DIR, VALIDATION_FILE, CompetitionValidator

STEPS, EVERY = 30, 10


def tensorboard_curve(run_dir, tag: str) -> list[tuple[int, float]]:
    points = []
    for events in sorted((run_dir / "logs" / "validation").glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            points += [
                (event.step, float(tf.make_ndarray(value.tensor))) for value in event.summary.value if value.tag == tag
            ]
    return sorted(points)


def test_validate_on_keeps_the_best_checkpoint_and_shows_the_curve(data_dir, tiny_competition, tmp_path):
    cfg = get_config(
        "tiny",
        steps=STEPS,
        image_size=64,
        batch_size=16,
        warmup_steps=5,
        validate_every=EVERY,
        checkpoint_every=EVERY,
        log_every=EVERY,
        validate_on=str(tiny_competition),
    )
    run = tmp_path / "run"
    metrics = train(cfg, data_dir=data_dir, run_dir=run)
    summary = metrics["competition_validation"]
    assert summary == json.loads((run / VALIDATION_FILE).read_text())
    assert [step for step, _ in summary["curve"]] == [10, 20, 30] and summary["metric"] == "gap"
    assert all(0 <= score <= 1 for _, score in summary["curve"])
    best_step, best_score = max(summary["curve"], key=lambda point: point[1])
    assert (summary["best_step"], summary["best_score"]) == (best_step, best_score)
    assert tf.train.latest_checkpoint(str(run / BEST_DIR / "checkpoints")).endswith(f"ckpt-{best_step}")
    logged = tensorboard_curve(run, "competition_gap")
    assert [step for step, _ in logged] == [step for step, _ in summary["curve"]]
    assert [score for _, score in logged] == pytest.approx([score for _, score in summary["curve"]], abs=1e-6)
    # The kept weights score what the curve says they scored.
    validator = CompetitionValidator(tiny_competition, "recognition", cfg.image_size, cfg.batch_size)
    assert validator.score(load_trained_model(run / BEST_DIR)) == pytest.approx(best_score, abs=1e-6)


def test_retrieval_scores_map_at_100(tiny_run, tiny_competition):
    validator = CompetitionValidator(tiny_competition, "retrieval", 64, 16)
    assert 0 < validator.score(load_trained_model(tiny_run)) <= 1


def test_a_folder_that_is_no_competition_is_one_error_line(data_dir, tmp_path, capsys):
    code = run_main(
        train_main,
        ["--data", str(data_dir), "--out", str(tmp_path / "run"), "--validate-on", str(data_dir), "--steps", "1"],
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.startswith(f"error: --validate-on {data_dir}: no landmark-recognition/ or solution file in it")
        and err.count("\n") == 1
    ), err
