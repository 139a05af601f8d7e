"""Receptive field of a feature map, computed by walking the Keras layers that produce it.

DELF hard-codes (291, 16, 145) for its slim ResNet50; our backbones are Keras graphs, so the numbers
are derived from the layers instead: a cell (y, x) of the map sees the input square centred at
(start + stride*y, start + stride*x) with side `size`.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras

# Layers that act on each pixel alone: they leave the receptive field as it is.
PER_PIXEL_LAYERS = (keras.layers.BatchNormalization, keras.layers.Activation, keras.layers.ReLU,
                    keras.layers.Dropout, keras.layers.Rescaling, keras.layers.Normalization)
WINDOW_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.MaxPooling2D,
                 keras.layers.AveragePooling2D)
MERGE_LAYERS = (keras.layers.Add, keras.layers.Multiply, keras.layers.Average, keras.layers.Maximum,
                keras.layers.Concatenate)


@dataclass(frozen=True)
class ReceptiveField:
    """Input pixels seen by one cell of a feature map (square kernels and strides)."""

    size: float  # side of the square of input pixels one cell sees
    stride: float  # input pixels between neighbouring cells
    start: float  # input coordinate of the centre of cell 0 (negative: it lies in the padding)

    @property
    def padding(self) -> float:
        """DELF's `padding`: box of cell i spans [stride*i - padding, stride*i - padding + size - 1]."""
        return (self.size - 1) / 2 - self.start


INPUT_FIELD = ReceptiveField(size=1.0, stride=1.0, start=0.0)


def _square(value, what: str, layer) -> int:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(set(values)) != 1:
        raise ValueError(f"layer {layer.name}: non-square {what} {values} is not supported")
    return int(values[0])


def _through_window(field: ReceptiveField, layer) -> ReceptiveField:
    """A sliding window of kernel k, stride s; 'same' padding assumes sizes divisible by s, as TF pads then."""
    kernel = _square(getattr(layer, "kernel_size", None) or layer.pool_size, "kernel", layer)
    dilation = _square(getattr(layer, "dilation_rate", 1), "dilation", layer)
    stride = _square(layer.strides, "stride", layer)
    kernel = (kernel - 1) * dilation + 1
    pad_before = max(kernel - stride, 0) // 2 if layer.padding == "same" else 0
    return ReceptiveField(size=field.size + (kernel - 1) * field.stride,
                          stride=field.stride * stride,
                          start=field.start + ((kernel - 1) / 2 - pad_before) * field.stride)


def _through_zero_padding(field: ReceptiveField, layer) -> ReceptiveField:
    (top, bottom), (left, right) = layer.padding
    if top != left:
        raise ValueError(f"layer {layer.name}: uneven padding {layer.padding} is not supported")
    return ReceptiveField(field.size, field.stride, field.start - top * field.stride)


def _merge(fields: list[ReceptiveField], layer) -> ReceptiveField:
    """Branches that meet (a residual Add) must share the cell grid; the field is the widest branch's."""
    if len({(f.stride, f.start) for f in fields}) != 1:
        raise ValueError(f"layer {layer.name}: its inputs lie on different grids: {fields}")
    return ReceptiveField(max(f.size for f in fields), fields[0].stride, fields[0].start)


def _field_of_tensor(tensor, memo: dict) -> ReceptiveField:
    layer, node_index, _ = tensor._keras_history
    key = (id(layer), node_index)
    if key not in memo:
        inputs = layer._inbound_nodes[node_index].input_tensors
        fields = [_field_of_tensor(t, memo) for t in inputs]
        memo[key] = _through_layer(layer, fields)
    return memo[key]


def _through_layer(layer, fields: list[ReceptiveField]) -> ReceptiveField:
    if isinstance(layer, keras.layers.InputLayer):
        return INPUT_FIELD
    if isinstance(layer, MERGE_LAYERS):
        return _merge(fields, layer)
    if len(fields) != 1:
        raise ValueError(f"layer {layer.name} ({type(layer).__name__}) with {len(fields)} inputs is not supported")
    if isinstance(layer, WINDOW_LAYERS):
        return _through_window(fields[0], layer)
    if isinstance(layer, keras.layers.ZeroPadding2D):
        return _through_zero_padding(fields[0], layer)
    if isinstance(layer, PER_PIXEL_LAYERS):
        return fields[0]
    raise ValueError(f"layer {layer.name} ({type(layer).__name__}): receptive field unknown")


def receptive_field(keras_tensor) -> ReceptiveField:
    """Receptive field of a symbolic Keras tensor (e.g. `backbone.outputs[0]`, the conv4 map)."""
    return _field_of_tensor(keras_tensor, {})
