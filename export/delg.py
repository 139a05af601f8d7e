"""The DELG SavedModel: the `serving_default` signature that DELF's extractor and the Kaggle baselines call.

Inputs: input_image uint8 [H,W,3], input_scales float32 [S], input_max_feature_num int32,
input_abs_thres float32, input_global_scales_ind int32 [G].
Outputs: boxes [N,4] (ymin, xmin, ymax, xmax in original-image pixels), features [N,128]
(L2-normalized local descriptors), scales [N] (1/scale of the image level a feature comes from, as
DELF writes it), scores [N,1] (attention), global_descriptors [G,D].

Our global_descriptors rows are the per-scale descriptor the training model produces: GeM, whitening,
then L2-normalized on their own. They are not summed or normalized across scales; that is the
caller's step, as with Google's released DELG models (whose per-scale rows are not normalized).

Beside it, `global_batch` (GLOBAL_BATCH_SIGNATURE) takes B images of one size and the global scales and
returns one descriptor per image, summed over scales and L2-normalized inside the graph, as the submission
script does with serving_default's rows: what a GPU needs to be busy (one call per batch, not per image).
`export delg --float16` adds `global_batch_float16`: the backbone computes in float16, GeM, whitening and the
normalisations in float32, the output is float32; it shares the float32 graph's variables. Each batched
function also comes XLA-compiled (`..._xla`), unless XLA fails where the export runs or --no-xla: XLA is
slower on a CPU and removes per-layer overhead on a GPU, so the script times both where it runs and keeps the
faster. assets/export_info.json says which functions exist, float16 or not, XLA or not, and the model's
dimensions.

With PCA whitening (export/whitening.py; `export delg` fits it unless --no-whiten), every global output is
whitened: each per-scale descriptor goes through the fitted whitening and is L2-normalized again, in
serving_default's rows and inside the batched functions alike, so global_dim is the whitening's dimension and
export_info.json's "whitening" records the fit.

A global-only run (train --global-only) has no local head: its export holds the same global functions, and its
serving_default returns the global descriptors with zero local features; export_info.json says "global_only".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import keras
import tensorflow as tf

from common.cli import UserError, atomic_output_dir, check_output_dir
from export.receptive_field import ReceptiveField, receptive_field
from export.whitening import NOT_WHITENED, FittedWhitening, PcaWhitening, WhitenSettings, fit_whitening
from train.backbone import build_backbone
from train.config import DELG_GLOBAL_SCALE_INDICES, DELG_IMAGE_SCALES
from train.model import DelgModel
from train.precision import precision_policy
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
# The batched global function, a second signature; the submission script calls exactly these names.
GLOBAL_BATCH = "global_batch"
GLOBAL_BATCH_FLOAT16 = "global_batch_float16"  # only in exports made with --float16
XLA_SUFFIX = "_xla"  # global_batch_xla, global_batch_float16_xla: the same functions XLA-compiled
GLOBAL_BATCH_SIGNATURE = [
    tf.TensorSpec([None, None, None, 3], tf.uint8, name="input_images"),  # B images of one size
    tf.TensorSpec([None], tf.float32, name="input_scales"),  # the global scales, e.g. 0.7071 1.0 1.4142
]
GLOBAL_BATCH_OUTPUT = "global_descriptors"  # float32 [B, D], each row L2-normalized
EXPORT_INFO_FILE = "export_info.json"  # in assets/: functions (float16, XLA), global_dim, local_dim, local_stride
DELG_GLOBAL_SCALES = tuple(DELG_IMAGE_SCALES[i] for i in DELG_GLOBAL_SCALE_INDICES)  # the whitening's fit
DELG_KIND = "DELG SavedModel"  # the kind of output its kit marker records: --overwrite replaces only this kind
BUILD_SIZE = 64  # side of the dummy image that creates the model's variables before restoring
# An export serves inference only: nothing differentiates its functions, so saving leaves out the custom gradients
# of their ops (Keras's swish has one in every EfficientNet block), whose tracing took a third of an
# EfficientNetV2-B0 export's time.
SAVE_OPTIONS = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
# The parts of DelgModel that extraction reads. Only these are saved: the ArcFace and attention
# classifiers (81k classes x 512 floats = 166 MB for GLDv2-clean) serve training alone.
SERVING_PARTS = ("backbone", "gem", "whitening", "autoencoder", "attention")
LOCAL_PARTS = ("autoencoder", "attention")  # what a global-only model lacks


def serving_part_names(model: DelgModel) -> tuple[str, ...]:
    """The SERVING_PARTS this model has: a global-only model has no local head."""
    return tuple(name for name in SERVING_PARTS if not (model.cfg.global_only and name in LOCAL_PARTS))


def serving_module(
    model: DelgModel, serve, signature: list[tf.TensorSpec], whitening: PcaWhitening | None = None
) -> tf.Module:
    """A tf.Module holding `serve` as a tf.function and, as its saved variables, the model's SERVING_PARTS (and
    the PCA whitening, as `pca_whitening`, when there is one)."""
    module = tf.Module()
    module.serving_parts = [getattr(model, name) for name in serving_part_names(model)]
    if whitening is not None:
        module.pca_whitening = whitening
    module.serve = tf.function(serve, input_signature=signature)
    return module


def load_trained_model(run_dir: Path) -> DelgModel:
    """The run's DelgModel with the newest checkpoint restored; every model variable must be in it."""
    run_dir = Path(run_dir)
    cfg = dataclasses.replace(load_config(run_dir), backbone_weights="none")  # the checkpoint holds every weight
    model = DelgModel(cfg, num_classes=len(load_label_map(run_dir)))
    model(tf.zeros([1, BUILD_SIZE, BUILD_SIZE, 3]))
    prefix = latest_checkpoint(run_dir)
    status = restore_checkpoint(make_checkpoint(model), prefix, f"checkpoint does not match {run_dir / 'config.json'}")
    status.expect_partial()  # the optimizer and step saved for training are not needed here
    log.info("restored %s", prefix)
    return model


def resize_images(images: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """[B,H,W,3] pixels -> [B,h,w,3] float, h = round(H*scale) (at least 1), bilinear as DELF resizes."""
    size = tf.cast(tf.shape(images)[1:3], tf.float32)
    new_size = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), 1)
    return tf.image.resize(images, new_size)


def resize_by(pixels: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """[H,W,3] pixels -> [1,h,w,3] float, resized as resize_images does."""
    return resize_images(pixels[None], scale)


def cell_boxes(field: ReceptiveField, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
    """Receptive-field boxes [rows*cols, 4] (ymin, xmin, ymax, xmax) of a feature map's cells, row-major."""
    ys, xs = tf.meshgrid(tf.range(rows), tf.range(cols), indexing="ij")
    centres = field.start + field.stride * tf.cast(tf.reshape(tf.stack([ys, xs], axis=-1), [-1, 2]), tf.float32)
    half = (field.size - 1) / 2
    return tf.concat([centres - half, centres + half], axis=1)


def global_head(model: DelgModel, whitening: PcaWhitening | None):
    """conv5 [B,h,w,C] -> [B,D] descriptors in float32: the model's head, then the PCA whitening when there is one."""

    def head(conv5: tf.Tensor) -> tf.Tensor:
        descriptors = model.global_descriptor(tf.cast(conv5, tf.float32))
        return descriptors if whitening is None else whitening(descriptors)

    return head


def output_dim(model: DelgModel, whitening: PcaWhitening | None) -> int:
    return model.cfg.embedding_dim if whitening is None else whitening.dim


class DelgExtractor:
    """The extraction graph: one backbone pass per scale feeds the global head and (when asked for) the local head.

    With a PCA whitening, each scale's global descriptor is whitened and L2-normalized."""

    def __init__(self, model: DelgModel, whitening: PcaWhitening | None = None):
        self.model = model
        self.field = receptive_field(model.backbone.outputs[0])
        self.local_dim = model.cfg.local_dim
        self.global_dim = output_dim(model, whitening)
        self.global_head = global_head(model, whitening)

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
        global_descriptor = self.global_head(conv5)[0]
        if self.model.cfg.global_only:
            return global_descriptor, self._no_local_features()
        # An image smaller than one conv4 cell at this scale has no local structure to describe.
        big_enough = tf.reduce_all(tf.shape(resized)[1:3] >= int(self.field.stride))
        local = tf.cond(
            tf.logical_and(want_local, big_enough),
            lambda: self._local_features(conv4, scale, abs_thres),
            self._no_local_features,
        )
        return global_descriptor, local

    def serve(self, input_image, input_scales, input_max_feature_num, input_abs_thres, input_global_scales_ind):
        pixels = tf.cast(input_image, tf.float32)
        want_local = input_max_feature_num > 0
        num_scales = tf.shape(input_scales)[0]
        globals_ = tf.TensorArray(tf.float32, size=num_scales, element_shape=[self.global_dim])
        boxes = tf.TensorArray(tf.float32, size=num_scales, element_shape=[None, 4], infer_shape=False)
        features = tf.TensorArray(tf.float32, size=num_scales, element_shape=[None, self.local_dim], infer_shape=False)
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


@contextmanager
def backbone_in_float16(model: DelgModel) -> Iterator[None]:
    """Inside, the backbone's layers compute as they do when built under Keras's mixed_float16 policy.

    The policies are read from a copy of the backbone built under that policy. The layers keep their float32
    variables, so a graph traced inside shares them with the float32 graphs: one copy of the weights."""
    with precision_policy("float16"):
        float16_layers = build_backbone(dataclasses.replace(model.cfg, backbone_weights="none")).layers
    layers = model.backbone.layers
    previous = [layer.dtype_policy for layer in layers]
    for layer, twin in zip(layers, float16_layers, strict=True):
        layer.dtype_policy = twin.dtype_policy
    try:
        yield
    finally:
        for layer, policy in zip(layers, previous, strict=True):
            layer.dtype_policy = policy


class BatchedGlobal:
    """`global_batch`: B images of one size and the global scales -> [B,D] descriptors.

    Per scale: resized as serving_default resizes, backbone, GeM, whitening, L2-normalized (then the PCA
    whitening and L2 again, when there is one); then summed over the scales and L2-normalized. With float16 the
    backbone computes in float16 and the head in float32 (GeM's x^3 overflows float16 above ~40). With xla the
    per-scale network is XLA-compiled, once per input shape; the scale loop and the resizing stay outside it,
    since XLA needs shapes known at compile time.
    """

    def __init__(
        self, model: DelgModel, float16: bool = False, xla: bool = False, whitening: PcaWhitening | None = None
    ):
        self.model, self.float16 = model, float16
        self.dim, self.global_head = output_dim(model, whitening), global_head(model, whitening)
        self._per_scale = tf.function(self._descriptors, jit_compile=xla)

    def _descriptors(self, pixels: tf.Tensor) -> tf.Tensor:
        """Float pixels [B,h,w,3] -> L2-normalized descriptors [B,D], head in float32."""
        _, conv5 = self.model.features(pixels)
        return self.global_head(conv5)

    def serve(self, input_images: tf.Tensor, input_scales: tf.Tensor) -> dict[str, tf.Tensor]:
        pixels = tf.cast(input_images, tf.float32)
        total = tf.zeros([tf.shape(pixels)[0], self.dim])
        for i in tf.range(tf.size(input_scales)):
            total += self._per_scale(resize_images(pixels, input_scales[i]))
        return {GLOBAL_BATCH_OUTPUT: tf.nn.l2_normalize(total, axis=1)}

    def concrete_function(self):
        """serve traced once for GLOBAL_BATCH_SIGNATURE (in float16 when asked for)."""
        traced = tf.function(self.serve, input_signature=GLOBAL_BATCH_SIGNATURE)
        with backbone_in_float16(self.model) if self.float16 else nullcontext():
            return traced.get_concrete_function()


def batched_functions(float16: bool, xla: bool) -> dict[str, tuple[bool, bool]]:
    """The batched signatures an export holds: name -> (computes in float16, XLA-compiled)."""
    plain = {GLOBAL_BATCH: False, **({GLOBAL_BATCH_FLOAT16: True} if float16 else {})}
    compiled = {name + XLA_SUFFIX: half for name, half in plain.items()} if xla else {}
    return {
        **{name: (half, False) for name, half in plain.items()},
        **{name: (half, True) for name, half in compiled.items()},
    }


def write_saved_model(
    model: DelgModel,
    out_dir: Path,
    label_map: Path | None,
    batched: dict[str, tuple[bool, bool]],
    whitening: FittedWhitening | None = None,
) -> None:
    """serving_default plus the batched functions, saved into out_dir."""
    pca = None if whitening is None else PcaWhitening(whitening.fit)
    module = serving_module(model, DelgExtractor(model, pca).serve, SIGNATURE, pca)
    if label_map is not None:
        module.label_map = tf.saved_model.Asset(str(label_map))
    signatures = {"serving_default": module.serve}
    for name, (float16, xla) in batched.items():
        signatures[name] = BatchedGlobal(model, float16, xla=xla, whitening=pca).concrete_function()
    tf.saved_model.save(module, str(out_dir), signatures=signatures, options=SAVE_OPTIONS)


def failing_functions(saved_model_dir: Path, names: list[str]) -> dict[str, str]:
    """Load the SavedModel, call each named batched function on one small image: name -> first error line."""
    loaded = tf.saved_model.load(str(saved_model_dir))
    images = tf.zeros([1, BUILD_SIZE, BUILD_SIZE, 3], tf.uint8)
    failures = {}
    for name in names:
        try:
            loaded.signatures[name](input_images=images, input_scales=tf.constant([1.0]))
        except tf.errors.OpError as err:
            failures[name] = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return failures


def save_delg(
    model: DelgModel,
    out_dir: Path,
    label_map: Path | None = None,
    float16: bool = False,
    xla: bool = True,
    whitening: FittedWhitening | None = None,
) -> dict:
    """Write the DELG SavedModel of `model` into the existing folder out_dir; returns what export_info.json says.

    With xla, each batched function also comes XLA-compiled unless, once loaded back, the compiled one fails
    here; it is then left out and the reason recorded. With a whitening, every global output is whitened."""
    batched = batched_functions(float16, xla)
    xla_errors: dict[str, str] = {}
    while True:
        write_saved_model(model, out_dir, label_map, batched, whitening)
        failures = failing_functions(out_dir, list(batched))
        if not failures:
            break
        for name, reason in failures.items():
            if not batched[name][1]:
                raise RuntimeError(f"{out_dir}: {name} fails without XLA: {reason}")
            log.warning("%s: XLA fails on this machine (%s); saving the model without it", name, reason)
            del batched[name]
            xla_errors[name] = reason
    info = export_info(model, batched, xla_errors, whitening)
    info["global_only"] = model.cfg.global_only
    (Path(out_dir) / "assets").mkdir(exist_ok=True)
    (Path(out_dir) / "assets" / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log.info(
        "functions: %s",
        ", ".join(
            f"{name} ({'float16' if f['float16'] else 'float32'}{', XLA' if f['xla'] else ''})"
            for name, f in info["functions"].items()
        ),
    )
    return info


def export_info(
    model: DelgModel,
    batched: dict[str, tuple[bool, bool]],
    xla_errors: dict[str, str],
    whitening: FittedWhitening | None = None,
) -> dict:
    """What assets/export_info.json records: each function (float16? XLA?), the compiled ones left out and why,
    the model's dimensions, whether and how the global descriptors are PCA-whitened, and the versions that
    exported it."""
    functions = {"serving_default": {"float16": False, "xla": False}}
    functions.update({name: {"float16": float16, "xla": xla} for name, (float16, xla) in batched.items()})
    global_dim = model.cfg.embedding_dim if whitening is None else whitening.fit.dim
    return {
        "functions": functions,
        "xla_errors": xla_errors,
        "global_dim": global_dim,
        "local_dim": model.cfg.local_dim,
        "local_stride": DelgExtractor(model).field.stride,
        "whitening": NOT_WHITENED if whitening is None else whitening.info,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()},
    }


def per_scale_rows(model: DelgModel, scales: tuple[float, ...]):
    """image uint8 [H,W,3] -> its unwhitened global descriptors at `scales` [G,D], by serving_default's graph."""
    serve = tf.function(DelgExtractor(model).serve, input_signature=SIGNATURE)
    scales_in, indices = tf.constant(scales, tf.float32), tf.range(len(scales), dtype=tf.int32)

    def rows_of(image) -> tf.Tensor:
        outputs = serve(tf.constant(image), scales_in, tf.constant(0), tf.constant(0.0), indices)
        return outputs["global_descriptors"].numpy()

    return rows_of


def fit_model_whitening(
    model: DelgModel, run_dir: Path, settings: WhitenSettings | None, scales: tuple[float, ...]
) -> FittedWhitening | None:
    """The PCA whitening of the model's per-scale descriptors at `scales` over the run's training sample (None
    when settings is None: not whitened)."""
    if settings is None:
        return None
    if settings.dim is not None and settings.dim > model.cfg.embedding_dim:
        raise UserError(
            f"--whiten-dim {settings.dim}: more than the run's embedding_dim "
            f"{model.cfg.embedding_dim}; whitening can keep at most that many axes"
        )
    return fit_whitening(run_dir, settings, per_scale_rows(model, scales), scales)


def export_delg(
    run_dir: Path,
    out_dir: Path,
    overwrite: bool = False,
    float16: bool = False,
    xla: bool = True,
    whiten: WhitenSettings | None = None,
) -> Path:
    """Export the run's newest checkpoint as a DELG SavedModel folder (label map in its assets/); with `whiten`,
    PCA whitening fitted on the training images at DELG's global scales is baked into every global output."""
    check_output_dir(Path(out_dir), overwrite, kind=DELG_KIND)  # before the fit's minutes, not after
    model = load_trained_model(run_dir)
    whitening = fit_model_whitening(model, run_dir, whiten, DELG_GLOBAL_SCALES)
    with atomic_output_dir(out_dir, overwrite=overwrite, kind=DELG_KIND) as tmp:
        save_delg(model, tmp, label_map=Path(run_dir) / LABEL_MAP_FILE, float16=float16, xla=xla, whitening=whitening)
    log.info("wrote %s", out_dir)
    return Path(out_dir)
