"""--init-from RUN_DIR: a new run starts from another run's newest weights (progressive resizing, a new margin,
new data or loss weights). The backbone must fit; each head is taken when its weights have the same shapes, and
the two classifiers only when the label maps are the same: a different label set gets new classifiers."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import tensorflow as tf

from common.cli import UserError
from train import run_files
from train.config import LAST_MAP_STRIDE, TrainConfig, flag_name
from train.model import DelgModel

log = logging.getLogger(__name__)

HEADS = ("whitening", "cosine_classifier", "autoencoder", "attention", "attention_classifier")
CLASSIFIERS = frozenset({"cosine_classifier", "attention_classifier"})  # their rows are the run's classes


def load_run_model(run_dir: Path) -> tuple[DelgModel, list[int], str]:
    """The run's DelgModel with its newest checkpoint restored, its label map and the checkpoint's prefix."""
    run_dir = Path(run_dir)
    cfg = dataclasses.replace(run_files.load_config(run_dir), backbone_weights="none", init_from="")
    landmark_ids = run_files.load_label_map(run_dir)
    model = DelgModel(cfg, num_classes=len(landmark_ids))
    model(tf.zeros([1, 2 * LAST_MAP_STRIDE, 2 * LAST_MAP_STRIDE, 3]))
    prefix = run_files.latest_checkpoint(run_dir)
    status = run_files.restore_checkpoint(
        run_files.make_checkpoint(model), prefix, f"checkpoint does not match {run_dir / run_files.CONFIG_FILE}"
    )
    status.expect_partial()  # the optimizer's state, the step and the stream position are not needed
    return model, landmark_ids, prefix


def describe_backbone(cfg: TrainConfig) -> str:
    return f"tiny, widths {','.join(map(str, cfg.tiny_widths))}" if cfg.backbone == "tiny" else cfg.backbone


def same_shapes(a, b) -> bool:
    return [tuple(w.shape) for w in a.weights] == [tuple(w.shape) for w in b.weights]


def init_from_run(model: DelgModel, source_dir: Path, landmark_ids: list[int]) -> list[str]:
    """Copy the source run's backbone and every head that fits into model; returns the parts copied."""
    source, source_ids, prefix = load_run_model(source_dir)
    flag = f"{flag_name('init_from')} {source_dir}"
    if source.cfg.backbone != model.cfg.backbone or not same_shapes(source.backbone, model.backbone):
        raise UserError(
            f"{flag}: its backbone ({describe_backbone(source.cfg)}) does not fit this run's "
            f"({describe_backbone(model.cfg)}); --init-from continues the same backbone"
        )
    copied, fresh = ["backbone"], []
    model.backbone.set_weights(source.backbone.get_weights())
    for name in HEADS:
        target, origin = getattr(model, name, None), getattr(source, name, None)
        if target is None:
            continue
        if origin is None or not same_shapes(origin, target) or (name in CLASSIFIERS and source_ids != landmark_ids):
            fresh.append(name)
            continue
        target.set_weights(origin.get_weights())
        copied.append(name)
    log.info(
        "%s: started from %s (%s)%s", flag, prefix, ", ".join(copied), f"; new {', '.join(fresh)}" if fresh else ""
    )
    return copied
