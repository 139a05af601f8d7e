"""--validate-on COMPETITION_DIR: global-only GAP (recognition) or mAP@100 (retrieval) of the model being trained,
through the notebook's own global stage (submission/main.py's global_stage and global vote, with the
competition's non-landmark set), scored as local_eval scores a replay.

The descriptors are the training model's, one pass over each whole image resized to --image-size (the view the
run validates on), not the exported model's multi-scale extraction: a measure to choose checkpoints by, not the
replay's score.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from common.cli import UserError, atomic_write_text
from common.gldv2 import image_path
from train import run_files
from train.config import flag_name
from train.data import resize

log = logging.getLogger(__name__)

VALIDATION_FILE = "validation.json"  # in the run folder: the curve of --validate-on scores and the best step
BEST_DIR = "best"  # in the run folder: a run folder of the best-scoring checkpoint (export it with --run RUN/best)

METRIC = {"recognition": "gap", "retrieval": "map@100"}  # the score each task's checkpoints are chosen by
TASK_FOLDER = {"recognition": "landmark-recognition", "retrieval": "landmark-retrieval"}


def read_view(path: Path, size: int) -> np.ndarray | None:
    """The whole image resized to size x size (uint8), or None when it cannot be read."""
    try:
        encoded = tf.io.read_file(str(path))
        return resize(tf.io.decode_image(encoded, channels=3, expand_animations=False), size).numpy()
    except (tf.errors.OpError, ValueError):
        return None


class CompetitionValidator:
    """Scores a model on a local competition (written by `local_eval build`) as its global-only submission."""

    def __init__(self, competition: Path, task: str, image_size: int, batch_size: int):
        from local_eval.layout import nonlandmark_folder, solution_file
        from local_eval.submission_script import load_submission

        self.sub, self.task, self.batch_size = load_submission(), task, batch_size
        competition = Path(competition)
        data = competition / TASK_FOLDER[task]
        self.solution = solution_file(competition, task)
        if not data.is_dir() or not self.solution.is_file():
            raise UserError(
                f"{flag_name('validate_on')} {competition}: no {TASK_FOLDER[task]}/ or solution file in "
                "it; give a folder written by `python -m local_eval build`"
            )
        self.work = Path(tempfile.mkdtemp(prefix="validate-on-"))
        argv = [
            "--task",
            task,
            "--data",
            str(data),
            "--model",
            str(data),
            "--out",
            str(self.work / "out.csv"),
            "--work",
            str(self.work),
            "--rerank",
            "0",
        ]
        if nonlandmark_folder(competition).is_dir():
            argv += ["--nonlandmark-dir", str(nonlandmark_folder(competition))]
        self.settings = self.sub.parse_settings(argv)
        self.inputs = self.sub.read_inputs(self.settings.run)
        db_split, query_split = self.sub.IMAGE_SPLITS[task]
        self.views = {
            name: self.read_views(paths, image_size, name)
            for name, paths in (
                ("db", [image_path(data, db_split, i) for i in self.inputs.db_ids]),
                ("queries", [image_path(data, query_split, i) for i in self.inputs.test_ids]),
                ("nonlandmarks", list(self.inputs.nonlandmark_paths)),
            )
        }

    @staticmethod
    def read_views(paths: list[Path], size: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(views [n, size, size, 3] uint8, readable mask [n]) of the images, decoded once for the whole run."""
        views = [read_view(path, size) for path in tqdm(paths, desc=f"validation {name}", unit="img")]
        ok = np.array([view is not None for view in views], bool)
        blank = np.zeros((size, size, 3), np.uint8)
        return np.stack([blank if view is None else view for view in views] or [blank])[: len(views)], ok

    def descriptors(self, model, views: np.ndarray) -> np.ndarray:
        """L2-normalized global descriptors of the views, float32 [n, D]."""
        parts = [
            model.global_descriptor(model.features(tf.constant(views[i : i + self.batch_size]))[1]).numpy()
            for i in range(0, len(views), self.batch_size)
        ]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, model.cfg.embedding_dim), np.float32)

    def score(self, model) -> float:
        """The global-only score of the model's descriptors on the competition (GAP or mAP@100, all rows)."""
        from local_eval.metrics import score_files

        sub, inputs = self.sub, self.inputs
        db, db_ok = self.views["db"]
        queries, query_ok = self.views["queries"]
        nonlandmarks, nonlandmark_ok = self.views["nonlandmarks"]
        db_rows = np.flatnonzero(db_ok)
        found = sub.Descriptors(
            self.descriptors(model, db[db_rows]),
            db_rows,
            self.descriptors(model, queries),
            query_ok,
            self.descriptors(model, nonlandmarks[nonlandmark_ok]),
        )
        timing = sub.Timing(self.work / "timing.json", self.task, self.settings.budget)
        candidates = sub.global_candidates(found, len(inputs.db_ids), self.settings, timing)
        if self.task == "recognition":
            rows = sub.recognition_rows(*sub.global_predictions(candidates, inputs.labels, self.settings.global_stage))
        else:
            unverified = np.full(candidates.neighbours.shape, -1)
            rows = sub.retrieval_rows(
                candidates.cosines, candidates.neighbours, unverified, inputs.db_ids, candidates.query_ok
            )
        submission = self.work / "submission.csv"
        sub.write_submission(submission, self.task, inputs.test_ids, rows)
        return float(score_files(self.task, self.solution, submission)["all"][METRIC[self.task]])


class BestCheckpoint:
    """Scores the model every --validate-every steps, keeps the curve in RUN/validation.json (across resumes) and
    the best-scoring weights in RUN/best, a run folder of their own (config, label map, checkpoint)."""

    def __init__(self, validator: CompetitionValidator, run_dir: Path, model):
        self.validator, self.run_dir, self.model = validator, Path(run_dir), model
        self.metric = METRIC[validator.task]
        saved = self.run_dir / VALIDATION_FILE
        self.curve: list[list[float]] = json.loads(saved.read_text())["curve"] if saved.is_file() else []
        self.manager = run_files.checkpoint_manager(run_files.make_checkpoint(model), self.run_dir / BEST_DIR, keep=1)

    def record(self, step: int) -> float:
        """Score the model at this step; when it is the best so far, its weights become RUN/best's."""
        score = self.validator.score(self.model)
        earlier = [point for point in self.curve if point[0] < step]
        self.curve = [*earlier, [step, score]]
        if all(score > point[1] for point in earlier):
            for name in (run_files.CONFIG_FILE, run_files.LABEL_MAP_FILE, run_files.DATA_FILE):
                if (self.run_dir / name).is_file():
                    atomic_write_text(self.run_dir / BEST_DIR / name, (self.run_dir / name).read_text())
            self.manager.save(checkpoint_number=step)
        log.info(
            "step %d: global-only %s %.4f on %s (best %.4f at step %d)",
            step,
            self.metric,
            score,
            self.validator.solution.parent.parent,
            *self.best()[::-1],
        )
        atomic_write_text(self.run_dir / VALIDATION_FILE, json.dumps(self.summary(), indent=2) + "\n")
        return score

    def best(self) -> tuple[int, float]:
        step, score = max(self.curve, key=lambda point: point[1])
        return int(step), score

    def summary(self) -> dict:
        step, score = self.best() if self.curve else (None, None)
        return {"metric": self.metric, "curve": self.curve, "best_step": step, "best_score": score}
