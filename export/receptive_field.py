"""Receptive field of a feature map, computed by walking the Keras layers that produce it.

DELF hard-codes (291, 16, 145) for its slim ResNet50; our backbones are Keras graphs, so the numbers
are derived from the layers instead: a cell (y, x) of the map sees the input square centred at
(start + stride*y, start + stride*x) with side `size`.

Squeeze-and-excitation (EfficientNet's blocks) scales each channel by a gate computed from the whole map;
that gate is left out of the field, which is the part of the image the convolutions see.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

# Layers that act on each pixel alone: they leave the receptive field as it is.
PER_PIXEL_LAYERS = (
    keras.layers.BatchNormalization,
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.Dropout,
    keras.layers.Rescaling,
    keras.layers.Normalization,
)
WINDOW_LAYERS = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
)
MERGE_LAYERS = (
    keras.layers.Add,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Concatenate,
)
# Layers whose output is one value per channel for the whole map (None stands for such a map's field).
GLOBAL_POOLING_LAYERS = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
# By class name: element-wise operations of keras.ops (`a + b` between Keras tensors), and per-pixel layers
# of keras.applications.convnext that Keras does not export.
ELEMENTWISE_OPERATIONS = ("Add", "Multiply", "Subtract")
PER_PIXEL_BY_NAME = ("LayerScale", "StochasticDepth", "Identity")


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
    return ReceptiveField(
        size=field.size + (kernel - 1) * field.stride,
        stride=field.stride * stride,
        start=field.start + ((kernel - 1) / 2 - pad_before) * field.stride,
    )


def _through_zero_padding(field: ReceptiveField, layer) -> ReceptiveField:
    (top, bottom), (left, right) = layer.padding
    if top != left:
        raise ValueError(f"layer {layer.name}: uneven padding {layer.padding} is not supported")
    return ReceptiveField(field.size, field.stride, field.start - top * field.stride)


def _merge(fields: list[ReceptiveField | None], layer) -> ReceptiveField | None:
    """Branches that meet (a residual Add) must share the cell grid; the field is the widest branch's. A
    whole-map branch (a squeeze-and-excitation gate) is left out."""
    fields = [f for f in fields if f is not None]
    if not fields:
        return None
    if len({(f.stride, f.start) for f in fields}) != 1:
        raise ValueError(f"layer {layer.name}: its inputs lie on different grids: {fields}")
    return ReceptiveField(max(f.size for f in fields), fields[0].stride, fields[0].start)


def _producer(tensor) -> tuple:
    """(layer, its inbound node) that produced a symbolic tensor."""
    layer, node_index, _ = tensor._keras_history
    return layer, layer._inbound_nodes[node_index]


def _field_of_tensor(tensor) -> ReceptiveField | None:
    """Walks the graph from the inputs to tensor without recursion (deep nets have thousands of layers)."""
    memo: dict[int, ReceptiveField | None] = {}
    stack = [_producer(tensor)]
    while stack:
        layer, node = stack[-1]
        if id(node) in memo:
            stack.pop()
            continue
        pending = [_producer(t) for t in node.input_tensors if id(_producer(t)[1]) not in memo]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        memo[id(node)] = _through_layer(layer, [memo[id(_producer(t)[1])] for t in node.input_tensors])
    return memo[id(_producer(tensor)[1])]


def _is_per_pixel(layer) -> bool:
    if isinstance(layer, keras.layers.LayerNormalization):
        return tuple(layer.axis) in ((-1,), (len(layer.input.shape) - 1,))
    return (
        isinstance(layer, PER_PIXEL_LAYERS)
        or type(layer).__name__ in PER_PIXEL_BY_NAME
        or (isinstance(layer, keras.layers.Dense) and len(layer.input.shape) == 4)
    )


def _through_sequential(field: ReceptiveField | None, model: keras.Sequential) -> ReceptiveField | None:
    for layer in model.layers:
        field = _through_layer(layer, [field])
    return field


def _through_layer(layer, fields: list[ReceptiveField | None]) -> ReceptiveField | None:
    if isinstance(layer, keras.layers.InputLayer):
        return INPUT_FIELD
    if isinstance(layer, MERGE_LAYERS) or (
        not isinstance(layer, keras.layers.Layer) and type(layer).__name__ in ELEMENTWISE_OPERATIONS
    ):
        return _merge(fields, layer)
    if len(fields) != 1:
        raise ValueError(f"layer {layer.name} ({type(layer).__name__}) with {len(fields)} inputs is not supported")
    if isinstance(layer, GLOBAL_POOLING_LAYERS) or fields[0] is None:  # a whole-map value stays one
        return None
    if isinstance(layer, keras.Sequential):
        return _through_sequential(fields[0], layer)
    if isinstance(layer, WINDOW_LAYERS):
        return _through_window(fields[0], layer)
    if isinstance(layer, keras.layers.ZeroPadding2D):
        return _through_zero_padding(fields[0], layer)
    if _is_per_pixel(layer):
        return fields[0]
    raise ValueError(f"layer {layer.name} ({type(layer).__name__}): receptive field unknown")


def receptive_field(keras_tensor) -> ReceptiveField:
    """Receptive field of a symbolic Keras tensor (e.g. `backbone.outputs[0]`, the conv4 map)."""
    field = _field_of_tensor(keras_tensor)
    if field is None:
        raise ValueError("the tensor is pooled over the whole image: it has no receptive field of its own")
    return field
