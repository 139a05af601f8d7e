"""Recipes as data: named stages trained one after another, each a set of config overrides and a step count.

Stage k trains into OUT/k-NAME, starting from stage k-1's weights (--init-from; the first stage from its config's
own weights). A finished stage is skipped when the recipe runs again and a stopped one resumes from its
checkpoint, so after SIGTERM the same command continues where the recipe stopped. The last stage's folder is
the recipe's run: export it as any run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train import run_files
from train.config import TrainConfig, get_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields, over the recipe's config

    def describe(self) -> str:
        changes = " ".join(f"{name}={value}" for name, value in self.overrides.items())
        return f"{self.name} ({self.steps} steps{', ' + changes if changes else ''})"


@dataclass(frozen=True)
class Recipe:
    config: str  # the named config (train/config.py) every stage starts from
    stages: tuple[Stage, ...]
    about: str

    def describe(self) -> str:
        return f"{self.about}; --config {self.config}: " + " -> ".join(stage.describe() for stage in self.stages)


RECIPES: dict[str, Recipe] = {
    # The tests' recipe: progressive resizing on the tiny synthetic competition, in seconds.
    "tiny": Recipe(
        "tiny",
        (Stage("64px", 60, {"image_size": 64}), Stage("96px", 60, {"image_size": 96})),
        "the tests' recipe: tiny at 64 px, then at 96 px",
    ),
    # Retrieval 2020 1st place: GLDv2-clean first, then the full set at growing sizes, the images outside the clean
    # list down-weighted in the last stage.
    "effv2s": Recipe(
        "effv2s",
        (
            Stage("clean-512", 60_000, {"image_size": 512, "not_clean_weight": 0.0}),
            Stage("full-640", 40_000, {"image_size": 640, "not_clean_weight": 1.0}),
            Stage("full-768", 20_000, {"image_size": 768, "not_clean_weight": 0.5}),
        ),
        "EfficientNetV2-S as the 2020 winners trained: clean at 512, full at 640, full at 768 (not-clean weight 0.5)",
    ),
    # DELG (Cao et al., ECCV 2020): ResNet-50 from ImageNet on GLDv2-clean, 512x512 crops, 2048-d global descriptor.
    "delg-r50": Recipe(
        "r50",
        (Stage("clean-512", 1_500_000, {"image_size": 512, "embedding_dim": 2048, "not_clean_weight": 0.0}),),
        "DELG R50 as in the paper: GLDv2-clean at 512, a 2048-d descriptor, DELG's losses and margins",
    ),
}


def recipe_help() -> str:
    return "; ".join(f"{name}: {recipe.describe()}" for name, recipe in RECIPES.items())


def stage_dirs(out: Path, recipe: Recipe) -> list[Path]:
    return [Path(out) / f"{index}-{stage.name}" for index, stage in enumerate(recipe.stages, start=1)]


def stage_configs(name: str, out: Path, overrides: dict[str, Any]) -> list[tuple[Path, TrainConfig]]:
    """Each stage's run folder and config: the recipe's config, the stage's overrides, then the command line's
    (which apply to every stage); every stage after the first starts from the one before it."""
    recipe = RECIPES[name]
    stages = []
    for index, (stage, run_dir) in enumerate(zip(recipe.stages, stage_dirs(out, recipe), strict=True)):
        cfg = get_config(recipe.config, **{**stage.overrides, "steps": stage.steps, **overrides})
        if index > 0:
            previous = stages[-1][0]
            cfg = dataclasses.replace(cfg, init_from=str(previous.resolve()), backbone_weights="none")
        stages.append((run_dir, cfg))
    return stages


def finished(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether run_dir holds this stage trained to its last step (its metrics written, its config the same)."""
    metrics, config = run_dir / run_files.METRICS_FILE, run_dir / run_files.CONFIG_FILE
    if not (metrics.is_file() and config.is_file()):
        return False
    done = json.loads(metrics.read_text())
    return done.get("step") == cfg.steps and not done.get("stopped_by") and run_files.load_config(run_dir) == cfg


def run_recipe(name: str, out: Path, overrides: dict[str, Any], train_stage) -> dict:
    """Train the recipe's stages in order with train_stage(cfg, run_dir) -> metrics, skipping finished ones;
    stops after a stage that a signal stopped and returns its metrics (else the last stage's)."""
    run_files.check_run_folder(out)
    metrics: dict = {}
    for index, (run_dir, cfg) in enumerate(stage_configs(name, out, overrides), start=1):
        if finished(run_dir, cfg):
            log.info("recipe %s: stage %d (%s) is already trained", name, index, run_dir)
            metrics = json.loads((run_dir / run_files.METRICS_FILE).read_text())
            continue
        log.info("recipe %s: stage %d -> %s", name, index, run_dir)
        metrics = train_stage(cfg, run_dir)
        if metrics.get("stopped_by"):
            break
    return {**metrics, "run_dir": str(run_dir)}
