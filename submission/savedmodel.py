"""The DELG model of submission/main.py: a SavedModel called through the DELG contract (TF2 serving_default and
its batched global functions, or a TF1 graph pruned to the contract's tensors), and one error line for a folder
that is no DELG model or that this TensorFlow cannot load.

Shipped beside main.py (which imports it from its own folder). What the contract gives: a global descriptor per
image (each scale's descriptor L2-normalized, summed, L2-normalized, as DELG) and local features (keypoints at
the boxes' centres, L2-normalized descriptors).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import tensorflow as tf
from search import l2_normalize
from settings_cli import InputError

if TYPE_CHECKING:  # settings.py's type, for the annotations only
    from settings import Extraction

log = logging.getLogger("submission")


class LocalFeatures(NamedTuple):
    keypoints: np.ndarray  # [N,2] y, x in the pixels of the image fed to the model
    descriptors: np.ndarray  # [N,128] L2-normalized
    side: int  # longer side of that image: relative RANSAC thresholds scale with it


DELG_INPUTS = ("input_image", "input_scales", "input_max_feature_num", "input_abs_thres", "input_global_scales_ind")
DELG_OUTPUTS = ("boxes", "features", "scales", "scores", "global_descriptors")
# (precision, XLA-compiled) -> the batched signature export/delg.py writes for it
BATCH_SIGNATURES = {
    ("float32", False): "global_batch",
    ("float32", True): "global_batch_xla",
    ("float16", False): "global_batch_float16",
    ("float16", True): "global_batch_float16_xla",
}


OLDEST_LOADING_TF = "2.10"  # the oldest TensorFlow known to load the kit's exports (2.9 lacks DisableCopyOnRead)
EXPORT_INFO_PATH = ("assets", "export_info.json")  # export/delg.py writes the exporting versions there


def load_saved_model(model_dir: Path):
    """tf.saved_model.load, or one InputError naming the folder (and, when TensorFlow fails, the versions)."""
    if not model_dir.is_dir():
        raise InputError(f"--model {model_dir}: {'not a folder' if model_dir.exists() else 'no such folder'}")
    if not (model_dir / "saved_model.pb").is_file():
        raise InputError(f"--model {model_dir} is not a SavedModel folder (no saved_model.pb)")
    try:
        return tf.saved_model.load(str(model_dir))
    except Exception as err:  # noqa: BLE001 - whatever TensorFlow raises (an op it lacks, a corrupt file): one line
        raise InputError(model_load_error(model_dir, err)) from None


def model_load_error(model_dir: Path, err: Exception) -> str:
    """One line: the load failure, this TensorFlow, the one that exported the model, the oldest known to work."""
    try:
        info = json.loads(model_dir.joinpath(*EXPORT_INFO_PATH).read_text())
        exported = f"TensorFlow {info['versions']['tensorflow']}"
    except (OSError, ValueError, KeyError, TypeError):
        exported = f"an unrecorded TensorFlow (no version in {'/'.join(EXPORT_INFO_PATH)})"
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return (
        f"--model {model_dir}: TensorFlow {tf.__version__} cannot load it ({reason}); it was exported with "
        f"{exported}; TensorFlow {OLDEST_LOADING_TF} or newer is known to load the kit's exports"
    )


def contract_error(model_dir: Path, serving) -> InputError:
    """The error for a SavedModel that is not DELG: what was expected, what it has."""
    expected = (
        f"expected the DELG contract, serving_default({', '.join(DELG_INPUTS)}) -> "
        f"{', '.join(DELG_OUTPUTS)} (or a TF1 export with these tensors)"
    )
    if serving is None:
        return InputError(
            f"--model {model_dir} is not a DELG model: {expected}; it has no serving_default and no "
            "TF1 graph with these tensors"
        )
    inputs, outputs = sorted(serving.structured_input_signature[1]), sorted(serving.structured_outputs)
    hint = (
        "; it is a retrieval model (the Kaggle retrieval contract), not the DELG export"
        if (outputs == ["global_descriptor"])
        else ""
    )
    return InputError(
        f"--model {model_dir} is not a DELG model: {expected}; its serving_default takes "
        f"{', '.join(inputs) or 'nothing'} and gives {', '.join(outputs) or 'nothing'}{hint}"
    )


class DelgSavedModel:
    """Calls a DELG SavedModel: TF2 serving_default (and its batched global signatures when exported with them),
    or a TF1 export through .prune() on tensor names."""

    parallel = 1  # calls that may run at once (devices.py's Replicas: one per device)

    def __init__(self, model_dir: Path, extraction: Extraction):
        self.model = load_saved_model(model_dir)
        info = model_dir / "assets" / "export_info.json"  # a global-only export has no local features
        self.has_local = not (info.is_file() and json.loads(info.read_text()).get("global_only", False))
        self.scales = tf.constant(extraction.scales, tf.float32)
        self.global_indices = tf.constant(extraction.global_scale_indices, tf.int32)
        self.max_features = extraction.max_features
        self.threshold = tf.constant(extraction.attention_threshold, tf.float32)
        self.border_margin = extraction.border_margin
        signatures = getattr(self.model, "signatures", {})
        serving = signatures.get("serving_default")
        if serving is not None and set(DELG_INPUTS) <= set(serving.structured_input_signature[1]):
            if not set(DELG_OUTPUTS) <= set(serving.structured_outputs):
                raise contract_error(model_dir, serving)
            self.kind, self.function = "tf2", serving
        else:
            self.kind, self.function = "tf1", self._prune(model_dir, serving)
        self.batched = {key: signatures[name] for key, name in BATCH_SIGNATURES.items() if name in signatures}
        probe = np.full((1, 64, 64, 3), 128, np.uint8)
        probe_dim = lambda: int(self.global_batch(probe, extraction.global_scales(), "float32").shape[1])
        if self.batched:
            try:
                self.global_dim = probe_dim()
            except tf.errors.OpError as err:  # a batched function this TensorFlow cannot run: the contract still works
                log.warning(
                    "the batched global functions fail here (%s): one image per call",
                    str(err).strip().splitlines()[0][:200],
                )
                self.batched = {}
        if not self.batched:
            try:
                self.global_dim = probe_dim()
            except (tf.errors.OpError, ValueError, TypeError, KeyError, IndexError) as err:
                raise InputError(
                    f"--model {model_dir}: the DELG contract fails on a 64x64 test image "
                    f"({(str(err).strip().splitlines() or [type(err).__name__])[0][:200]})"
                ) from None
        names = [BATCH_SIGNATURES[key] for key in self.batched]
        log.info(
            "loaded %s DELG model from %s (global dimension %d, batched global: %s)",
            self.kind,
            model_dir,
            self.global_dim,
            ", ".join(names) or "no",
        )

    def device_copy(self, stage: str, count: int) -> contextlib.AbstractContextManager[DelgSavedModel]:
        """The model itself, on the current device (devices.py's Replicas lends one copy per device)."""
        return contextlib.nullcontext(self)

    def _prune(self, model_dir: Path, serving) -> Callable:
        """The TF1 contract: the graph's DELG tensors by name (input_max_feature_num and input_global_scales_ind
        may be absent)."""
        needed = ("input_image", "input_scales", "input_abs_thres", *DELG_OUTPUTS)
        if not all(self._has_tensor(name) for name in needed):
            raise contract_error(model_dir, serving)
        feeds = [name for name in DELG_INPUTS if self._has_tensor(name)]
        self.tf1_feeds = feeds
        return self.model.prune([f"{name}:0" for name in feeds], [f"{name}:0" for name in DELG_OUTPUTS])

    def _has_tensor(self, name: str) -> bool:
        try:
            self.model.graph.get_operation_by_name(name)
            return True
        except (KeyError, AttributeError, ValueError):
            return False

    def __call__(
        self,
        image: np.ndarray,
        max_features: int,
        scales: tf.Tensor | None = None,
        global_indices: tf.Tensor | None = None,
    ) -> dict[str, np.ndarray]:
        """The DELG contract on one image: boxes, features, scales, scores, global_descriptors."""
        if scales is None:
            scales, global_indices = self.scales, self.global_indices
        elif global_indices is None:
            global_indices = tf.range(tf.size(scales))
        inputs = {
            "input_image": tf.constant(image),
            "input_scales": scales,
            "input_max_feature_num": tf.constant(max_features, tf.int32),
            "input_abs_thres": self.threshold,
            "input_global_scales_ind": global_indices,
        }
        if self.kind == "tf2":
            outputs = self.function(**inputs)
        else:
            outputs = dict(zip(DELG_OUTPUTS, self.function(*[inputs[name] for name in self.tf1_feeds]), strict=True))
        return {name: value.numpy() for name, value in outputs.items()}

    def global_descriptor(self, image: np.ndarray, global_scales: tuple[float, ...]) -> np.ndarray:
        """One image through the contract: L2-normalize each scale's descriptor, sum, L2-normalize (as DELG)."""
        scales = tf.constant(global_scales, tf.float32)
        raw = self(image, max_features=0, scales=scales)["global_descriptors"]
        return l2_normalize(l2_normalize(np.atleast_2d(raw).astype(np.float32)).sum(axis=0))

    def global_batch(
        self, images: np.ndarray, global_scales: tuple[float, ...], precision: str, xla: bool = False
    ) -> np.ndarray:
        """Descriptors [B,D] of B images of one size: one batched call when the model has a function for this
        precision (XLA-compiled if asked and present), else one contract call per image."""
        function = self.batched.get((precision, xla)) or self.batched.get((precision, False))
        if function is None:
            return np.stack([self.global_descriptor(image, global_scales) for image in images])
        outputs = function(input_images=tf.constant(images), input_scales=tf.constant(global_scales, tf.float32))
        return outputs["global_descriptors"].numpy().astype(np.float32)

    def local_features(self, image: np.ndarray) -> LocalFeatures:
        """Keypoints [N,2] (box centres, y x), L2-normalized descriptors [N,128] and the image's longer side; the
        features within the border margin dropped."""
        outputs = self(image, self.max_features)
        boxes = outputs["boxes"].reshape(-1, 4)
        keypoints = (boxes[:, :2] + boxes[:, 2:]) / 2
        keep = away_from_border(keypoints, image.shape[:2], self.border_margin)
        descriptors = outputs["features"][keep]
        return LocalFeatures(
            keypoints[keep].astype(np.float32), l2_normalize(descriptors.astype(np.float32)), max(image.shape[:2])
        )


def away_from_border(keypoints: np.ndarray, shape: tuple[int, int], margin: float) -> np.ndarray:
    """Mask of the keypoints [N,2] (y, x pixel coordinates) at least margin x the longer side inside each edge of
    an image of shape (height, width); with margin 0, all of them (even centres in the padding)."""
    if margin <= 0:
        return np.ones(len(keypoints), bool)
    band = margin * max(shape)
    low, high = band - 0.5, np.asarray(shape, np.float64) - 0.5 - band  # pixel i spans [i - 0.5, i + 0.5]
    return np.all((keypoints >= low) & (keypoints <= high), axis=1)
