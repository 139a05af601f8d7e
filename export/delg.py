"""The DELG SavedModel: the `serving_default` signature that DELF's extractor and the Kaggle baselines call.

Inputs: input_image uint8 [H,W,3], input_scales float32 [S], input_max_feature_num int32,
input_abs_thres float32, input_global_scales_ind int32 [G].
Outputs: boxes [N,4] (ymin, xmin, ymax, xmax in original-image pixels), features [N,128]
(L2-normalized local descriptors), scales [N] (1/scale of the image level a feature comes from, as
DELF writes it), scores [N,1] (attention), global_descriptors [G,D].

Our global_descriptors rows are the per-scale descriptor the training model produces: GeM, whitening,
then L2-normalized on their own. They are not summed or normalized across scales; that is the
caller's step, as with Google's released DELG models (whose per-scale rows are not normalized).
"""
from __future__ import annotations

import logging
from pathlib import Path

import tensorflow as tf

from common.cli import atomic_output_dir
from export.receptive_field import ReceptiveField, receptive_field
from train.model import DelgModel
from train.run_files import (
    LABEL_MAP_FILE,
    latest_checkpoint,
    load_config,
    load_label_map,
    make_checkpoint,
    restore_checkpoint,
)

log = logging.getLogger(__name__)

SIGNATURE = [
    tf.TensorSpec([None, None, 3], tf.uint8, name="input_image"),
    tf.TensorSpec([None], tf.float32, name="input_scales"),
    tf.TensorSpec([], tf.int32, name="input_max_feature_num"),
    tf.TensorSpec([], tf.float32, name="input_abs_thres"),
    tf.TensorSpec([None], tf.int32, name="input_global_scales_ind"),
]
BUILD_SIZE = 64  # side of the dummy image that creates the model's variables before restoring
# The parts of DelgModel that extraction reads. Only these are saved: the ArcFace and attention
# classifiers (81k classes x 512 floats = 166 MB for GLDv2-clean) serve training alone.
SERVING_PARTS = ("backbone", "gem", "whitening", "autoencoder", "attention")


def serving_module(model: DelgModel, serve, signature: list[tf.TensorSpec]) -> tf.Module:
    """A tf.Module holding `serve` as a tf.function and, as its saved variables, the model's SERVING_PARTS."""
    module = tf.Module()
    module.serving_parts = [getattr(model, name) for name in SERVING_PARTS]
    module.serve = tf.function(serve, input_signature=signature)
    return module


def load_trained_model(run_dir: Path) -> DelgModel:
    """The run's DelgModel with the newest checkpoint restored; every model variable must be in it."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    model = DelgModel(cfg, num_classes=len(load_label_map(run_dir)))
    model(tf.zeros([1, BUILD_SIZE, BUILD_SIZE, 3]))
    prefix = latest_checkpoint(run_dir)
    status = restore_checkpoint(make_checkpoint(model), prefix, f"checkpoint does not match {run_dir / 'config.json'}")
    status.expect_partial()  # the optimizer and step saved for training are not needed here
    log.info("restored %s", prefix)
    return model


def resize_by(pixels: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """[H,W,3] pixels -> [1,h,w,3] float, h = round(H*scale) (at least 1), bilinear as DELF resizes."""
    size = tf.cast(tf.shape(pixels)[:2], tf.float32)
    new_size = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), 1)
    return tf.image.resize(pixels[None], new_size)


def cell_boxes(field: ReceptiveField, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
    """Receptive-field boxes [rows*cols, 4] (ymin, xmin, ymax, xmax) of a feature map's cells, row-major."""
    ys, xs = tf.meshgrid(tf.range(rows), tf.range(cols), indexing="ij")
    centres = field.start + field.stride * tf.cast(tf.reshape(tf.stack([ys, xs], axis=-1), [-1, 2]), tf.float32)
    half = (field.size - 1) / 2
    return tf.concat([centres - half, centres + half], axis=1)


class DelgExtractor:
    """The extraction graph: one backbone pass per scale feeds the global head and (when asked for) the local head."""

    def __init__(self, model: DelgModel):
        self.model = model
        self.field = receptive_field(model.backbone.outputs[0])
        self.local_dim = model.cfg.local_dim
        self.global_dim = model.cfg.embedding_dim

    def _no_local_features(self):
        return tf.zeros([0, 4]), tf.zeros([0, self.local_dim]), tf.zeros([0])

    def _local_features(self, conv4: tf.Tensor, scale: tf.Tensor, abs_thres: tf.Tensor):
        """Boxes in original pixels, raw descriptors and attention scores of the cells at or above abs_thres."""
        head = self.model.local_head(conv4)
        scores = tf.reshape(head["attention"], [-1])
        descriptors = tf.reshape(head["descriptors"], [-1, self.local_dim])
        boxes = cell_boxes(self.field, tf.shape(conv4)[1], tf.shape(conv4)[2]) / scale
        keep = tf.where(scores >= abs_thres)[:, 0]
        return tf.gather(boxes, keep), tf.gather(descriptors, keep), tf.gather(scores, keep)

    def _one_scale(self, pixels, scale, want_local, abs_thres):
        """Global descriptor [D] and selected local features of the image resized by `scale`."""
        resized = resize_by(pixels, scale)
        conv4, conv5 = self.model.features(resized)
        global_descriptor = self.model.global_descriptor(conv5)[0]
        # An image smaller than one conv4 cell at this scale has no local structure to describe.
        big_enough = tf.reduce_all(tf.shape(resized)[1:3] >= int(self.field.stride))
        local = tf.cond(tf.logical_and(want_local, big_enough),
                        lambda: self._local_features(conv4, scale, abs_thres), self._no_local_features)
        return global_descriptor, local

    def serve(self, input_image, input_scales, input_max_feature_num, input_abs_thres, input_global_scales_ind):
        pixels = tf.cast(input_image, tf.float32)
        want_local = input_max_feature_num > 0
        num_scales = tf.shape(input_scales)[0]
        globals_ = tf.TensorArray(tf.float32, size=num_scales, element_shape=[self.global_dim])
        boxes = tf.TensorArray(tf.float32, size=num_scales, element_shape=[None, 4], infer_shape=False)
        features = tf.TensorArray(tf.float32, size=num_scales, element_shape=[None, self.local_dim],
                                  infer_shape=False)
        scores = tf.TensorArray(tf.float32, size=num_scales, element_shape=[None], infer_shape=False)
        scales = tf.TensorArray(tf.float32, size=num_scales, element_shape=[None], infer_shape=False)
        for i in tf.range(num_scales):
            scale = input_scales[i]
            global_descriptor, (b, f, s) = self._one_scale(pixels, scale, want_local, input_abs_thres)
            globals_ = globals_.write(i, global_descriptor)
            boxes, features, scores = boxes.write(i, b), features.write(i, f), scores.write(i, s)
            scales = scales.write(i, tf.fill(tf.shape(s), 1.0 / scale))
        all_scores = scores.concat()
        count = tf.clip_by_value(input_max_feature_num, 0, tf.size(all_scores))
        strongest = tf.math.top_k(all_scores, count).indices
        return {
            "boxes": tf.gather(boxes.concat(), strongest),
            "features": tf.nn.l2_normalize(tf.gather(features.concat(), strongest), axis=1),
            "scales": tf.gather(scales.concat(), strongest),
            "scores": tf.gather(all_scores, strongest)[:, None],
            "global_descriptors": tf.gather(globals_.stack(), input_global_scales_ind),
        }


def save_delg(model: DelgModel, out_dir: Path, label_map: Path | None = None) -> None:
    """Write the DELG SavedModel of `model` into the existing folder out_dir."""
    module = serving_module(model, DelgExtractor(model).serve, SIGNATURE)
    if label_map is not None:
        module.label_map = tf.saved_model.Asset(str(label_map))
    tf.saved_model.save(module, str(out_dir), signatures={"serving_default": module.serve})


def export_delg(run_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Export the run's newest checkpoint as a DELG SavedModel folder (label map in its assets/)."""
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        save_delg(load_trained_model(run_dir), tmp, label_map=Path(run_dir) / LABEL_MAP_FILE)
    log.info("wrote %s", out_dir)
    return Path(out_dir)
