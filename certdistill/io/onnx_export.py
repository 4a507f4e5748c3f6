"""ONNX export: a fitted estimator or a network as an ONNX graph.

:func:`export_onnx` writes the graph node by node with ``onnx.helper`` (no tracing, no
``torch.onnx``): each supported layer maps to fixed ONNX nodes, so the file is deterministic and
an ONNX runtime computes what the network computes in eval mode, to float32 rounding.

Conventions
-----------
* **Estimators** (a fitted :class:`~certdistill.CertifiedTeacher`,
  :class:`~certdistill.DistilledStudent`, or a :class:`sklearn.frozen.FrozenEstimator` of one).
  The graph input ``input`` takes flat rows ``(batch, n_features_in_)`` exactly like
  ``predict_proba``: when the estimator reshapes rows for its network (``input_shape``), the
  first node is a ``Reshape`` to ``(batch, *input_shape)``. Two outputs: ``logits``
  ``(batch, n_classes)`` and ``probabilities``, their ``Softmax`` over axis 1 (columns in the
  order of ``classes_``, so ``classes_[probabilities.argmax(1)]`` is ``predict``).
* **Modules** (any network the bound engine takes: an ``nn.Sequential`` of supported layers,
  possibly nested, one supported layer, a :class:`~certdistill.bounds.layers.GraphNetwork` or a
  ``torch.fx``-traceable module with skip connections). The input ``input`` has shape
  ``(batch, *input_shape)`` and the one output ``logits`` the module's output shape (a module
  need not be a classifier, so no ``probabilities``).
* **Graph.** The exporter walks :func:`~certdistill.bounds.graph.build_graph`, the bound engine's
  own view of the network, so it exports exactly what the engine certifies: each operation's
  layer becomes its nodes, reading the tensors of the operations it reads (``input`` for the
  network's input), and the last operation's tensor is ``logits``. A chain gives a chain of
  nodes; a residual network the same nodes joined by ``Add``.
* **Batch.** The first axis is the symbolic dimension ``"batch"``: one file serves any batch size.
* **Eval mode.** BatchNorm uses its running statistics and Dropout is the identity, whatever the
  module's ``training`` flag (the estimators predict in eval mode).
* **dtype.** Weights, inputs and outputs are float32, the dtype the estimators compute in. A
  module holding float64 tensors is exported as float32 with a warning (float16 and bfloat16
  tensors are widened exactly).
* **Metadata.** ``metadata_props`` hold JSON values (see :data:`METADATA_KEYS`): for an
  estimator its class name, ``classes_``, ``n_features_in_``, the sample shape, ``eps``,
  ``lower`` and ``upper`` (the values of those parameters; per-feature arrays as lists) and
  ``feature_names_in_`` when fitted on a DataFrame; for a module its class name and sample shape.

Layer -> nodes: ``nn.Linear`` -> ``Gemm`` (``transB=1``; ``MatMul`` + ``Add`` on inputs with
more than one axis per sample), ``nn.Conv2d`` -> ``Conv``, ``nn.ReLU`` -> ``Relu``,
``nn.Flatten`` -> ``Flatten`` (``axis=1``) or ``Reshape`` (other dims), ``nn.Unflatten`` and
:class:`~certdistill.bounds.layers.Reshape` -> ``Reshape`` (the batch axis copied with ``0``),
:class:`~certdistill.bounds.layers.ConstantAffine` -> ``Mul`` then ``Add``,
``nn.BatchNorm1d``/``nn.BatchNorm2d`` -> ``BatchNormalization`` (inference),
``nn.AvgPool2d`` -> ``AveragePool``, ``nn.ZeroPad2d`` -> ``Pad`` (constant zeros),
``nn.Identity`` and ``nn.Dropout`` -> no node, :class:`~certdistill.bounds.layers.Add` (the
merge of a skip connection; ``x + y`` of a traced module) -> ``Add`` of its two input tensors.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import pathlib
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from torch import nn

from certdistill._version import __version__
from certdistill.bounds.graph import INPUT, BoundGraph, build_graph
from certdistill.bounds.layers import Add, ConstantAffine, Reshape
from certdistill.exceptions import UnsupportedLayerError

__all__ = [
    "EXPORTED_LAYERS",
    "METADATA_KEYS",
    "MIN_OPSET",
    "export_onnx",
    "supported_export_layers_text",
]

_INSTALL_HINT = 'ONNX export needs the "onnx" package: pip install "certdistill[onnx]"'

#: Oldest opset written: ``Softmax`` normalises one axis from opset 13 on (the whole coerced
#: 2-D input before).
MIN_OPSET = 13

#: ``metadata_props`` keys written, each holding a JSON value.
METADATA_KEYS: dict[str, str] = {
    "certdistill.estimator": "class name of the estimator (absent for a module)",
    "certdistill.module": "class name of the network",
    "certdistill.classes": "the estimator's classes_, a list in column order",
    "certdistill.n_features_in": "features per input row",
    "certdistill.input_shape": "shape of one sample as the network sees it",
    "certdistill.eps": "the estimator's eps (a number or a list per feature)",
    "certdistill.lower": "the estimator's lower (null, a number or a list per feature)",
    "certdistill.upper": "the estimator's upper (null, a number or a list per feature)",
    "certdistill.feature_names_in": "feature_names_in_, when the estimator has them",
}

#: Initializers larger than this in total are written to a ``.data`` file next to the model
#: (protobuf cannot serialise 2 GiB).
_EXTERNAL_DATA_BYTES = 1 << 30

_INPUT, _LOGITS, _PROBABILITIES = "input", "logits", "probabilities"


# ----------------------------------------------------------------------- supported layers
#: Layer types :func:`export_onnx` writes (exact types), with their restrictions.
EXPORTED_LAYERS: dict[type[nn.Module], str] = {
    nn.Linear: "",
    nn.Conv2d: "groups=1, dilation=1, zero padding; 'same' with odd kernels",
    nn.ReLU: "",
    nn.Flatten: "not the batch axis",
    nn.Unflatten: "not the batch axis",
    Reshape: "",
    ConstantAffine: "constants broadcast over a sample",
    nn.BatchNorm1d: "running statistics",
    nn.BatchNorm2d: "running statistics",
    nn.AvgPool2d: "divisor_override=None",
    nn.ZeroPad2d: "non-negative padding",
    nn.Identity: "",
    nn.Dropout: "",
    Add: "two inputs of one shape",
}


def supported_export_layers_text() -> str:
    """The sentence listing the layers :func:`export_onnx` supports.

    Returns
    -------
    str
    """
    names = [
        f"{t.__name__} ({note})" if note else t.__name__ for t, note in EXPORTED_LAYERS.items()
    ]
    return (
        f"Supported layers: {', '.join(names)}; nested Sequential, GraphNetwork and "
        "torch.fx-traceable modules of them (with + of two branches, relu and flatten)."
    )


def _bound_graph(module: nn.Module) -> BoundGraph:
    """The bound engine's graph of ``module`` (:func:`~certdistill.bounds.graph.build_graph`:
    nested Sequentials flattened, GraphNetworks expanded, other modules traced with
    ``torch.fx``), every operation's layer one the exporter writes."""
    graph = build_graph(module)  # UnsupportedLayerError for what the engine cannot bound
    for name, op in zip(graph.names, graph.ops, strict=True):
        layer = getattr(op, "layer", None)
        if type(layer) not in _WRITERS:
            raise UnsupportedLayerError(
                f"Layer '{name}' ({layer!r}) cannot be exported to ONNX. "
                f"{supported_export_layers_text()}"
            )
    return graph


# ----------------------------------------------------------------------- graph builder
class _Graph:
    """Nodes and initializers of the graph being written, and the tensor flowing through it."""

    def __init__(self, onnx, sample_shape: tuple[int, ...]):
        self.onnx = onnx
        self.nodes: list = []
        self.initializers: list = []
        self.names: set[str] = {_INPUT, _LOGITS, _PROBABILITIES}
        self.flow = _INPUT
        #: Shape of one sample of the flowing tensor (no batch axis).
        self.shape = tuple(sample_shape)
        self.float64: list[str] = []

    def unique(self, name: str) -> str:
        candidate, suffix = name, 1
        while candidate in self.names:
            candidate, suffix = f"{name}_{suffix}", suffix + 1
        self.names.add(candidate)
        return candidate

    def constant(self, name: str, value, dtype=np.float32) -> str:
        """Add an initializer and return its name; float tensors become float32."""
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.float64:
                self.float64.append(name)
            value = value.detach().to(device="cpu", dtype=torch.float64).numpy()
        array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        unique = self.unique(name)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, unique))
        return unique

    def node(
        self, op_type: str, name: str, inputs: Sequence[str], shape: Sequence[int], **attributes
    ) -> None:
        """Add a node on the flow (its first input) and move the flow to its output."""
        node_name = self.unique(f"{name}/{op_type}")
        output = self.unique(f"{name}/{op_type}:0")
        self.nodes.append(
            self.onnx.helper.make_node(
                op_type, list(inputs), [output], name=node_name, **attributes
            )
        )
        self.flow = output
        self.set_shape(name, shape)

    def set_shape(self, name: str, shape: Sequence[int]) -> None:
        shape = tuple(int(s) for s in shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"Layer '{name}' gives samples of shape {shape}: nothing to export.")
        self.shape = shape

    def reshape(self, name: str, shape: Sequence[int]) -> None:
        """Reshape each sample to ``shape``; ``0`` copies the batch axis (any batch size, 0
        included, unlike ``-1``)."""
        target = self.constant(f"{name}.shape", [0, *shape], dtype=np.int64)
        self.node("Reshape", name, [self.flow, target], shape)


# ----------------------------------------------------------------------- layer writers
def _require_rank(
    name: str, layer: nn.Module, shape: tuple[int, ...], ranks: Sequence[int], what: str
) -> None:
    if len(shape) not in ranks:
        raise ValueError(
            f"Layer '{name}' ({layer!r}) needs {what}, but its input samples have shape "
            f"{shape}: check input_shape."
        )


def _write_linear(g: _Graph, name: str, layer: nn.Linear) -> None:
    if g.shape[-1] != layer.in_features:
        raise ValueError(
            f"Layer '{name}' ({layer!r}) takes {layer.in_features} features, but its input "
            f"samples have shape {g.shape}: check input_shape."
        )
    out_shape = (*g.shape[:-1], layer.out_features)
    if len(g.shape) == 1:
        inputs = [g.flow, g.constant(f"{name}.weight", layer.weight)]
        if layer.bias is not None:
            inputs.append(g.constant(f"{name}.bias", layer.bias))
        g.node("Gemm", name, inputs, out_shape, transB=1)
        return
    # Linear maps the last axis of any input; Gemm takes matrices only.
    g.node("MatMul", name, [g.flow, g.constant(f"{name}.weight_t", layer.weight.t())], out_shape)
    if layer.bias is not None:
        g.node("Add", name, [g.flow, g.constant(f"{name}.bias", layer.bias)], out_shape)


def _pair(value) -> tuple[int, int]:
    return (
        (int(value), int(value))
        if isinstance(value, numbers.Integral)
        else tuple(int(v) for v in value)
    )


def _write_conv2d(g: _Graph, name: str, layer: nn.Conv2d) -> None:
    kernel = _pair(layer.kernel_size)
    if layer.groups != 1 or _pair(layer.dilation) != (1, 1) or layer.padding_mode != "zeros":
        raise UnsupportedLayerError(
            f"Layer '{name}' ({layer!r}): only Conv2d with groups=1, dilation=1 and "
            f"padding_mode='zeros' can be exported. {supported_export_layers_text()}"
        )
    if layer.padding == "valid":
        padding = (0, 0)
    elif layer.padding == "same":
        if any(k % 2 == 0 for k in kernel):
            raise UnsupportedLayerError(
                f"Layer '{name}' ({layer!r}): padding='same' with an even kernel pads "
                "asymmetrically; give explicit padding (or a ZeroPad2d) instead."
            )
        padding = tuple((k - 1) // 2 for k in kernel)
    else:
        padding = _pair(layer.padding)
    _require_rank(name, layer, g.shape, (3,), "samples of shape (C, H, W)")
    if g.shape[0] != layer.in_channels:
        raise ValueError(
            f"Layer '{name}' ({layer!r}) takes {layer.in_channels} channels, but its input "
            f"samples have shape {g.shape}: check input_shape."
        )
    stride = _pair(layer.stride)
    spatial = [
        (size + 2 * p - k) // s + 1
        for size, k, s, p in zip(g.shape[1:], kernel, stride, padding, strict=True)
    ]
    inputs = [g.flow, g.constant(f"{name}.weight", layer.weight)]
    if layer.bias is not None:
        inputs.append(g.constant(f"{name}.bias", layer.bias))
    g.node(
        "Conv",
        name,
        inputs,
        (layer.out_channels, *spatial),
        kernel_shape=list(kernel),
        strides=list(stride),
        pads=[*padding, *padding],
        dilations=[1, 1],
        group=1,
    )


def _write_relu(g: _Graph, name: str, layer: nn.ReLU) -> None:
    g.node("Relu", name, [g.flow], g.shape)


def _axis(name: str, layer: nn.Module, dim, rank: int) -> int:
    """``dim`` of the batched tensor (rank ``rank``) as an axis of one sample."""
    if not isinstance(dim, numbers.Integral) or not -rank <= dim < rank:
        raise ValueError(
            f"Layer '{name}' ({layer!r}): dim {dim!r} is not an axis of its input of rank {rank}."
        )
    axis = int(dim) % rank
    if axis == 0:
        raise UnsupportedLayerError(
            f"Layer '{name}' ({layer!r}) changes the batch axis, which an exported graph keeps. "
            f"{supported_export_layers_text()}"
        )
    return axis - 1


def _write_flatten(g: _Graph, name: str, layer: nn.Flatten) -> None:
    rank = len(g.shape) + 1
    start = _axis(name, layer, layer.start_dim, rank)
    end = _axis(name, layer, layer.end_dim, rank)
    if start > end:
        raise ValueError(f"Layer '{name}' ({layer!r}): start_dim comes after end_dim.")
    shape = (*g.shape[:start], math.prod(g.shape[start : end + 1]), *g.shape[end + 1 :])
    if start == 0 and end == len(g.shape) - 1:
        g.node("Flatten", name, [g.flow], shape, axis=1)
    else:
        g.reshape(name, shape)


def _write_unflatten(g: _Graph, name: str, layer: nn.Unflatten) -> None:
    axis = _axis(name, layer, layer.dim, len(g.shape) + 1)
    sizes = [int(s) for s in layer.unflattened_size]
    size = g.shape[axis]
    if sizes.count(-1) == 1:
        known = math.prod(s for s in sizes if s != -1)
        if known > 0 and size % known == 0:
            sizes[sizes.index(-1)] = size // known
    if math.prod(sizes) != size or any(s < 1 for s in sizes):
        raise ValueError(
            f"Layer '{name}' ({layer!r}) cannot unflatten an axis of size {size} "
            f"(input samples of shape {g.shape})."
        )
    g.reshape(name, (*g.shape[:axis], *sizes, *g.shape[axis + 1 :]))


def _write_reshape(g: _Graph, name: str, layer: Reshape) -> None:
    if math.prod(layer.shape) != math.prod(g.shape):
        raise ValueError(f"Layer '{name}' ({layer!r}) cannot reshape samples of shape {g.shape}.")
    g.reshape(name, layer.shape)


def _write_constant_affine(g: _Graph, name: str, layer: ConstantAffine) -> None:
    scale, shift = layer.scale, layer.shift
    try:
        full = tuple(torch.broadcast_shapes((1, *g.shape), scale.shape, shift.shape))
    except RuntimeError:
        full = None
    if full is None or len(full) != len(g.shape) + 1 or full[0] != 1:
        raise ValueError(
            f"Layer '{name}' ({layer!r}): constants of shapes {tuple(scale.shape)} and "
            f"{tuple(shift.shape)} do not broadcast over samples of shape {g.shape}."
        )

    def batched(t: torch.Tensor) -> torch.Tensor:
        # ONNX broadcasts from the last axis as torch does; the explicit leading 1 makes the
        # constant's axes line up with the batched tensor's.
        return t if t.dim() == 0 else t.reshape((1,) * (len(full) - t.dim()) + tuple(t.shape))

    g.node("Mul", name, [g.flow, g.constant(f"{name}.scale", batched(scale))], full[1:])
    g.node("Add", name, [g.flow, g.constant(f"{name}.shift", batched(shift))], full[1:])


def _write_batch_norm(g: _Graph, name: str, layer: nn.modules.batchnorm._BatchNorm) -> None:
    if layer.running_mean is None or layer.running_var is None:
        raise UnsupportedLayerError(
            f"Layer '{name}' ({layer!r}) has no running statistics (track_running_stats=False) "
            "and normalises with each batch's own statistics, which an exported graph cannot. "
            f"{supported_export_layers_text()}"
        )
    if isinstance(layer, nn.BatchNorm2d):
        _require_rank(name, layer, g.shape, (3,), "samples of shape (C, H, W)")
    else:
        _require_rank(name, layer, g.shape, (1, 2), "samples of shape (C,) or (C, L)")
    channels = layer.num_features
    if g.shape[0] != channels:
        raise ValueError(
            f"Layer '{name}' ({layer!r}) normalises {channels} channels, but its "
            f"input samples have shape {g.shape}."
        )
    weight = layer.weight if layer.weight is not None else torch.ones(channels)
    bias = layer.bias if layer.bias is not None else torch.zeros(channels)
    inputs = [
        g.flow,
        g.constant(f"{name}.weight", weight),
        g.constant(f"{name}.bias", bias),
        g.constant(f"{name}.running_mean", layer.running_mean),
        g.constant(f"{name}.running_var", layer.running_var),
    ]
    g.node("BatchNormalization", name, inputs, g.shape, epsilon=float(layer.eps))


def _write_avg_pool2d(g: _Graph, name: str, layer: nn.AvgPool2d) -> None:
    if layer.divisor_override is not None:
        raise UnsupportedLayerError(
            f"Layer '{name}' ({layer!r}): divisor_override has no ONNX AveragePool equivalent. "
            f"{supported_export_layers_text()}"
        )
    _require_rank(name, layer, g.shape, (3,), "samples of shape (C, H, W)")
    kernel = _pair(layer.kernel_size)
    stride = _pair(layer.stride) if layer.stride not in (None, (), []) else kernel
    padding = _pair(layer.padding)
    if any(2 * p > k for p, k in zip(padding, kernel, strict=True)):
        raise ValueError(f"Layer '{name}' ({layer!r}): padding exceeds half the kernel.")
    floor, ceil, torch_out = [], [], []
    for size, k, s, p in zip(g.shape[1:], kernel, stride, padding, strict=True):
        span = size + 2 * p - k
        floor.append(span // s + 1)
        ceil.append(-(-span // s) + 1)
        # torch: in ceil mode the last window must start inside the input or its left padding
        torch_out.append(ceil[-1] - 1 if (ceil[-1] - 1) * s >= size + p else ceil[-1])
    ceil_mode = bool(layer.ceil_mode)
    if ceil_mode and torch_out != ceil:
        # ONNX keeps the window torch drops. Where torch's windows are those of floor mode,
        # write floor mode (same windows, same divisors).
        if torch_out != floor:
            raise UnsupportedLayerError(
                f"Layer '{name}' ({layer!r}): with ceil_mode=True on samples of shape {g.shape} "
                "torch drops a last window that ONNX AveragePool keeps on one axis but not on "
                f"the other. {supported_export_layers_text()}"
            )
        ceil_mode = False
    g.set_shape(name, (g.shape[0], *(torch_out if layer.ceil_mode else floor)))
    g.node(
        "AveragePool",
        name,
        [g.flow],
        g.shape,
        kernel_shape=list(kernel),
        strides=list(stride),
        pads=[*padding, *padding],
        ceil_mode=int(ceil_mode),
        count_include_pad=int(layer.count_include_pad),
    )


def _write_zero_pad2d(g: _Graph, name: str, layer: nn.ZeroPad2d) -> None:
    left, right, top, bottom = (int(p) for p in layer.padding)
    if min(left, right, top, bottom) < 0:
        raise UnsupportedLayerError(
            f"Layer '{name}' ({layer!r}): negative padding (cropping) is not exported. "
            f"{supported_export_layers_text()}"
        )
    _require_rank(name, layer, g.shape, (2, 3), "samples of shape (C, H, W) or (H, W)")
    # ONNX pads: the starts of every axis (batch and channel included), then their ends.
    lead = [0] * (len(g.shape) - 1)
    pads = g.constant(f"{name}.pads", [*lead, top, left, *lead, bottom, right], dtype=np.int64)
    shape = (*g.shape[:-2], g.shape[-2] + top + bottom, g.shape[-1] + left + right)
    g.node("Pad", name, [g.flow, pads], shape, mode="constant")


def _write_nothing(g: _Graph, name: str, layer: nn.Module) -> None:
    """Identity and Dropout (eval mode) compute nothing."""


def _write_add(g: _Graph, name: str, layer: Add, operands: Sequence[tuple[str, tuple]]) -> None:
    """The sum of two tensors ``(name, sample shape)`` of one shape (a skip connection)."""
    (first, first_shape), (second, second_shape) = operands
    if first_shape != second_shape:
        raise ValueError(
            f"Layer '{name}' ({layer!r}) adds samples of shapes {first_shape} and "
            f"{second_shape}; a skip connection needs one shape: check input_shape."
        )
    g.node("Add", name, [first, second], first_shape)


_WRITERS = {
    nn.Linear: _write_linear,
    nn.Conv2d: _write_conv2d,
    nn.ReLU: _write_relu,
    nn.Flatten: _write_flatten,
    nn.Unflatten: _write_unflatten,
    Reshape: _write_reshape,
    ConstantAffine: _write_constant_affine,
    nn.BatchNorm1d: _write_batch_norm,
    nn.BatchNorm2d: _write_batch_norm,
    nn.AvgPool2d: _write_avg_pool2d,
    nn.ZeroPad2d: _write_zero_pad2d,
    nn.Identity: _write_nothing,
    nn.Dropout: _write_nothing,
    Add: _write_add,
}

#: Layers reading several tensors: their writers take the ``(tensor, sample shape)`` of each.
_MERGES = (Add,)

#: Layers that keep the sample shape and do not say what it is.
_SHAPE_AGNOSTIC = (nn.ReLU, nn.Identity, nn.Dropout, ConstantAffine, nn.BatchNorm1d, Add)


# ----------------------------------------------------------------------- inputs
def _require_onnx():
    try:
        import onnx
        import onnx.checker
        import onnx.helper
        import onnx.numpy_helper
    except ImportError:
        raise ImportError(_INSTALL_HINT) from None
    return onnx


def _check_opset(onnx, opset) -> int:
    newest = onnx.defs.onnx_opset_version()
    if (
        not isinstance(opset, numbers.Integral)
        or isinstance(opset, bool)
        or not MIN_OPSET <= opset <= newest
    ):
        raise ValueError(
            f"opset must be an integer from {MIN_OPSET} to {newest} (the newest "
            f"this onnx package knows), got {opset!r}."
        )
    return int(opset)


def _sample_shape_arg(input_shape) -> tuple[int, ...]:
    shape = (input_shape,) if isinstance(input_shape, numbers.Integral) else input_shape
    try:
        shape = tuple(shape)
    except TypeError:
        shape = None
    if not shape or any(
        not isinstance(s, numbers.Integral) or isinstance(s, bool) or s < 1 for s in shape
    ):
        raise ValueError(
            f"input_shape must be the shape of one sample (no batch axis), a tuple "
            f"of positive ints such as (1, 28, 28), got {input_shape!r}."
        )
    return tuple(int(s) for s in shape)


def _infer_input_shape(graph: BoundGraph) -> tuple[int, ...]:
    """The sample shape read off the first layer reading the input (through layers that keep
    the shape without fixing it; for a chain, the first layers)."""
    like_input = {INPUT}  # nodes whose samples have the input's shape
    for index, (name, op, reads) in enumerate(
        zip(graph.names, graph.ops, graph.inputs, strict=True)
    ):
        if like_input.isdisjoint(reads):
            continue
        layer = op.layer
        if isinstance(layer, nn.Linear):
            return (layer.in_features,)
        if type(layer) in _SHAPE_AGNOSTIC:
            like_input.add(index)
        else:
            raise ValueError(
                f"input_shape is required: the shape of one input sample cannot be read off the "
                f"first layer '{name}' ({layer!r}). Pass the shape of one sample without the "
                "batch axis, e.g. export_onnx(module, path, input_shape=(1, 28, 28))."
            )
    raise ValueError(
        "input_shape is required: the module has no layer that fixes the shape of its input. "
        "Pass the shape of one sample without the batch axis, e.g. input_shape=(10,)."
    )


def _json(value) -> str:
    def plain(v):
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return json.dumps(plain(value), default=str)


def _estimator(obj):
    """The certdistill estimator inside ``obj`` (FrozenEstimators unwrapped), or None."""
    while isinstance(obj, FrozenEstimator):
        obj = obj.estimator
    # A tag, not an isinstance check: formats sit below the estimators and do not import them.
    return obj if getattr(type(obj), "_certdistill_estimator", False) else None


def _fitted_module(estimator) -> nn.Module:
    module = getattr(estimator, "module_", None)
    if not (
        getattr(estimator, "initialized_", False)
        and hasattr(estimator, "n_features_in_")
        and isinstance(module, nn.Module)
    ):
        raise NotFittedError(
            f"This {type(estimator).__name__} instance is not fitted yet: call 'fit' before "
            "exporting it to ONNX."
        )
    return module


# ----------------------------------------------------------------------- export
def _write_graph(g: _Graph, graph: BoundGraph) -> tuple[str, tuple[int, ...]]:
    """Write the nodes of every operation of ``graph`` in its (topological) order.

    Each operation reads the tensors of the nodes ``graph.inputs`` names (``g.flow`` as it is on
    entry for the network's input) and its output is the tensor its last node writes (the one it
    reads for Identity and Dropout). Returns the tensor and sample shape of the last operation,
    the network's output.
    """
    tensors: dict[int, tuple[str, tuple[int, ...]]] = {INPUT: (g.flow, g.shape)}
    for index, (name, op, reads) in enumerate(
        zip(graph.names, graph.ops, graph.inputs, strict=True)
    ):
        layer = op.layer
        operands = [tensors[j] for j in reads]
        if type(layer) in _MERGES:
            _WRITERS[type(layer)](g, name, layer, operands)
        else:
            ((g.flow, g.shape),) = operands
            _WRITERS[type(layer)](g, name, layer)
        tensors[index] = (g.flow, g.shape)
    return tensors[len(graph.ops) - 1]


def _rename_tensor(nodes: list, old: str, new: str) -> None:
    """Rename the tensor ``old`` where nodes write and read it."""
    for node in nodes:
        for names in (node.input, node.output):
            for k, name in enumerate(names):
                if name == old:
                    names[k] = new


class _ExportedNetwork(NamedTuple):
    """The network to export, with the shapes around it and the model's metadata."""

    module: nn.Module
    graph: BoundGraph
    #: Shape of one row of the graph input ``input`` (no batch axis).
    graph_input: tuple[int, ...]
    #: Shape of one sample as the network sees it (no batch axis).
    sample_shape: tuple[int, ...]
    metadata: dict[str, str]


def _estimator_network(estimator, input_shape) -> _ExportedNetwork:
    """The network of a fitted estimator, fed flat rows as ``predict_proba`` feeds it."""
    module = _fitted_module(estimator)
    n_features = int(estimator.n_features_in_)
    if input_shape is not None and _sample_shape_arg(input_shape) != (n_features,):
        raise ValueError(
            f"input_shape={input_shape!r}: an exported {type(estimator).__name__} takes flat "
            f"rows of {n_features} features, as predict_proba does (it reshapes them to its "
            "own input_shape); leave input_shape=None."
        )
    sample_shape = estimator._module_sample_shape() or (n_features,)
    graph = _bound_graph(module)
    metadata = {
        "certdistill.estimator": json.dumps(type(estimator).__name__),
        "certdistill.classes": _json(np.asarray(estimator.classes_)),
        "certdistill.n_features_in": json.dumps(n_features),
    }
    for key in ("eps", "lower", "upper"):
        if hasattr(estimator, key):
            metadata[f"certdistill.{key}"] = _json(getattr(estimator, key))
    if hasattr(estimator, "feature_names_in_"):
        metadata["certdistill.feature_names_in"] = _json(estimator.feature_names_in_)
    return _ExportedNetwork(module, graph, (n_features,), sample_shape, metadata)


def _module_network(module: nn.Module, input_shape) -> _ExportedNetwork:
    """A bare network, fed samples of ``input_shape`` (read off its first layer if None)."""
    graph = _bound_graph(module)
    sample_shape = (
        _infer_input_shape(graph) if input_shape is None else _sample_shape_arg(input_shape)
    )
    return _ExportedNetwork(module, graph, sample_shape, sample_shape, {})


def _exported_network(estimator_or_module, estimator, input_shape) -> _ExportedNetwork:
    """The network of ``export_onnx``'s argument (``estimator``: the estimator inside it)."""
    if estimator is not None:
        network = _estimator_network(estimator, input_shape)
    elif isinstance(estimator_or_module, nn.Module):
        network = _module_network(estimator_or_module, input_shape)
    else:
        raise TypeError(
            "export_onnx takes a fitted CertifiedTeacher or DistilledStudent (or a "
            "FrozenEstimator of one) or a torch.nn.Module, got "
            f"{type(estimator_or_module).__name__}."
        )
    sample_shape = tuple(int(s) for s in network.sample_shape)
    network.metadata["certdistill.module"] = json.dumps(type(network.module).__name__)
    network.metadata["certdistill.input_shape"] = json.dumps(list(sample_shape))
    return network._replace(sample_shape=sample_shape)


def _write_nodes(onnx, network: _ExportedNetwork, estimator) -> tuple[_Graph, tuple[int, ...]]:
    """All nodes and initializers, ending in ``logits`` (and ``probabilities`` for an
    estimator), and the sample shape of ``logits``."""
    g = _Graph(onnx, network.graph_input)
    if network.graph_input != network.sample_shape:
        g.reshape("input_reshape", network.sample_shape)
    output, output_shape = _write_graph(g, network.graph)
    if estimator is not None and output_shape != (len(estimator.classes_),):
        raise ValueError(
            f"The network of {type(estimator).__name__} gives outputs of shape {output_shape} per "
            f"sample, not one logit per class ({len(estimator.classes_)})."
        )
    if g.float64:
        warnings.warn(
            f"The network holds float64 tensors ({', '.join(g.float64[:3])}"
            f"{', ...' if len(g.float64) > 3 else ''}); they are exported as float32, the dtype "
            "the estimators compute in.",
            UserWarning,
            stacklevel=3,  # the caller of export_onnx
        )
    helper = onnx.helper
    if output == _INPUT:  # only Identity/Dropout layers
        g.nodes.append(helper.make_node("Identity", [_INPUT], [_LOGITS], name="output/Identity"))
    else:
        _rename_tensor(g.nodes, output, _LOGITS)
    if estimator is not None:
        g.nodes.append(
            helper.make_node(
                "Softmax", [_LOGITS], [_PROBABILITIES], axis=1, name="probabilities/Softmax"
            )
        )
    return g, output_shape


def _make_model(
    onnx,
    g: _Graph,
    network: _ExportedNetwork,
    output_shape: tuple[int, ...],
    opset: int,
    exported: object,
    with_probabilities: bool,
):
    """The ONNX model of the written graph ``g``, with its opset and metadata."""
    helper, float32 = onnx.helper, onnx.TensorProto.FLOAT
    outputs = [helper.make_tensor_value_info(_LOGITS, float32, ["batch", *output_shape])]
    if with_probabilities:
        outputs.append(
            helper.make_tensor_value_info(_PROBABILITIES, float32, ["batch", *output_shape])
        )
    graph = helper.make_graph(
        g.nodes,
        "certdistill",
        [helper.make_tensor_value_info(_INPUT, float32, ["batch", *network.graph_input])],
        outputs,
        initializer=g.initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph, opset_imports=opsets, producer_name="certdistill", producer_version=__version__
    )
    # The oldest IR version that can hold the opset: readable by older runtimes too.
    model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    model.doc_string = f"{type(exported).__name__} exported by certdistill"
    helper.set_model_props(model, network.metadata)
    return model


def _save_checked(onnx, model, initializers: list, path: pathlib.Path) -> None:
    """Write ``model`` to ``path`` (its weights to ``<path>.data`` when large) and check it."""
    data = path.with_name(f"{path.name}.data")
    if sum(init.ByteSize() for init in initializers) > _EXTERNAL_DATA_BYTES:
        onnx.save_model(
            model,
            os.fspath(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
        )
    else:
        onnx.save_model(model, os.fspath(path))
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except Exception:  # pragma: no cover - a bug of the exporter: leave no invalid file
        path.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        raise


def export_onnx(
    estimator_or_module,
    path: str | os.PathLike,
    input_shape: Sequence[int] | None = None,
    *,
    opset: int = 17,
) -> pathlib.Path:
    """Write a fitted estimator or a network as an ONNX model.

    Parameters
    ----------
    estimator_or_module : CertifiedNetBase, sklearn.frozen.FrozenEstimator or torch.nn.Module
        A fitted :class:`~certdistill.CertifiedTeacher` or :class:`~certdistill.DistilledStudent`
        (or a ``FrozenEstimator`` of one): the graph takes flat rows ``(batch, n_features_in_)``
        like ``predict_proba`` and has the outputs ``logits`` and ``probabilities``. Or a
        network the bound engine takes (:func:`~certdistill.bounds.graph.build_graph`): an
        ``nn.Sequential`` of supported layers (nested ones are flattened), one supported layer,
        a :class:`~certdistill.bounds.layers.GraphNetwork` or a ``torch.fx``-traceable module of
        them with skip connections (``x + y``, ``relu``, ``flatten(x, 1)``): the graph takes
        ``(batch, *input_shape)`` and has the output ``logits``. The estimators' ``module_`` may
        be any of these too. The graph computes the network in eval mode (BatchNorm's running
        statistics, no Dropout).
    path : str or path-like
        The file to write (its folder must exist).
    input_shape : sequence of int or None, default=None
        For a module, the shape of one input sample without the batch axis, e.g.
        ``(1, 28, 28)``. It may be omitted when the first layer that fixes it is an
        ``nn.Linear`` (``(in_features,)``; only ReLU, Identity, Dropout, BatchNorm1d,
        ConstantAffine and Add may come before it; in a residual network, the first layer
        reading the input). For an estimator it must be None or
        ``(n_features_in_,)``: the graph takes flat rows and reshapes them as the estimator does.
    opset : int, default=17
        ONNX opset of the default domain, at least :data:`MIN_OPSET` (13).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    NotFittedError
        For an unfitted estimator.
    UnsupportedLayerError
        For a layer (or a layer setting) outside the supported ones, or a module the bound
        engine cannot read as a graph (an untraceable module, an unsupported function); the
        message names the layer by its dotted name in the module (or the ``torch.fx`` node)
        and lists the supported layers.
    ValueError
        Without ``input_shape`` for a module whose input shape cannot be read off its first
        layer, for an ``input_shape`` the layers do not accept, or for a bad ``opset``.
    ImportError
        Without the ``onnx`` package (``pip install "certdistill[onnx]"``).

    Warns
    -----
    UserWarning
        When the network holds float64 tensors: they are written as float32.

    Notes
    -----
    Supported layers and their nodes: ``Linear`` -> ``Gemm`` (``MatMul`` and ``Add`` when
    samples have more than one axis), ``Conv2d`` -> ``Conv``, ``ReLU`` -> ``Relu``, ``Flatten``
    -> ``Flatten`` or ``Reshape``, ``Unflatten`` and ``Reshape`` -> ``Reshape``,
    ``ConstantAffine`` -> ``Mul`` and ``Add``, ``BatchNorm1d``/``BatchNorm2d`` ->
    ``BatchNormalization``, ``AvgPool2d`` -> ``AveragePool``, ``ZeroPad2d`` -> ``Pad``;
    ``Identity`` and ``Dropout`` write no node, ``Add`` (a skip connection) -> ``Add``. The
    graph follows the bound engine's operations, each reading its inputs' tensors. The batch
    axis is the symbolic ``"batch"``. ``metadata_props`` hold JSON values, listed in
    :data:`METADATA_KEYS`.

    Examples
    --------
    >>> import onnxruntime  # doctest: +SKIP
    >>> from certdistill.io.onnx_export import export_onnx
    >>> path = export_onnx(teacher, "teacher.onnx")  # doctest: +SKIP
    >>> session = onnxruntime.InferenceSession(path)  # doctest: +SKIP
    >>> logits, proba = session.run(None, {"input": X.astype("float32")})  # doctest: +SKIP
    """
    onnx = _require_onnx()
    opset = _check_opset(onnx, opset)
    path = pathlib.Path(path)
    estimator = _estimator(estimator_or_module)
    network = _exported_network(estimator_or_module, estimator, input_shape)
    g, output_shape = _write_nodes(onnx, network, estimator)
    exported = estimator if estimator is not None else network.module
    model = _make_model(
        onnx, g, network, output_shape, opset, exported, with_probabilities=estimator is not None
    )
    _save_checked(onnx, model, g.initializers, path)
    return path
