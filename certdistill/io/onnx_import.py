"""ONNX import: a network file as an ``nn.Sequential`` the bound engine can walk.

:func:`load_onnx` reads the graph with the ``onnx`` package (an optional dependency,
``pip install "certdistill[onnx]"``) and turns each node on the path from the input to the output
into the torch layer that computes the same thing, so the result runs, trains, pickles and is
bounded like any other network of supported layers.

Conventions
-----------
* **Samples.** The module takes ``(n, *input_shape)``. When the file's input has a leading axis
  of size 1 or a symbolic size (its batch axis, e.g. ``(1, 784, 1)`` or ``("N", 3, 32, 32)``),
  ``input_shape`` is the rest (``(784, 1)``, ``(3, 32, 32)``); otherwise the whole input is one
  sample. VNN-LIB's ``X_i`` is then entry ``i`` of a sample in row-major order either way.
* **Batch of one.** Every tensor of the file is followed with its batch axis of size 1, and each
  node becomes a per-sample layer; a node that would mix samples cannot arise.
* **Constants** (initializers, ``Constant`` nodes and whatever is computed from constants only,
  such as the ``Shape -> Gather -> Concat`` chains of exported ``Reshape`` targets) are evaluated
  once with onnx's reference evaluator.
* **Graphs.** A file whose computed tensors branch and merge again (residual connections:
  ``Add`` or ``Sub`` of two branches of one shape) becomes a
  :class:`~certdistill.bounds.layers.GraphNetwork`; a chain becomes an ``nn.Sequential``.

Layers emitted: ``nn.Linear`` (Gemm, MatMul by a constant matrix, with a following constant
``Add`` folded into its bias), ``nn.Conv2d`` (and ``nn.ZeroPad2d`` before it for asymmetric
padding), ``nn.ReLU``, :class:`~certdistill.bounds.layers.ConstantAffine` (``Add``, ``Sub``,
``Mul``, ``Div`` by constants, inference ``BatchNormalization``; consecutive ones are merged),
``nn.AvgPool2d`` (AveragePool), ``nn.ZeroPad2d`` (a constant-zero ``Pad`` of the spatial axes),
``nn.Flatten`` and :class:`~certdistill.bounds.layers.Reshape` (Flatten, Reshape, Squeeze,
Unsqueeze, and Transpose where it moves only axes of size one). ``Identity``, ``Dropout`` and
float ``Cast`` pass through.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from certdistill.bounds.layers import Add, ConstantAffine, GraphNetwork, Reshape
from certdistill.exceptions import UnsupportedLayerError

__all__ = ["ONNX_OPS", "OnnxImportError", "load_onnx", "supported_onnx_ops_text"]

_INSTALL_HINT = 'ONNX support needs the "onnx" package: pip install "certdistill[onnx]"'


class OnnxImportError(UnsupportedLayerError):
    """An ONNX file holds a node, attribute or graph shape that :func:`load_onnx` cannot turn
    into layers of the native engine."""


def _require_onnx():
    try:
        import onnx
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError(_INSTALL_HINT) from None
    return onnx


@dataclass
class _Flow:
    """A computed tensor: its name, its shape in the file (batch 1) and the layer writing it."""

    name: str
    shape: tuple[int, ...]
    #: Axis 0 of the file's tensor is the batch axis (our samples drop it).
    batched: bool
    #: Index of the layer that computes it (-1: the network input).
    node: int = -1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.batched else self.shape


def load_onnx(
    path: str | os.PathLike,
    *,
    output: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Read an ONNX network as an ``nn.Sequential`` of layers the bound engine supports.

    Parameters
    ----------
    path : str or path-like
        The ``.onnx`` file (``.onnx.gz`` is read through gzip).
    output : str, optional
        Name of the graph output to compute; by default the first one.
    dtype : torch.dtype, default=torch.float32
        Floating-point type of the module's weights.

    Returns
    -------
    torch.nn.Sequential or GraphNetwork
        In eval mode (a ``GraphNetwork`` when the file has skip connections). It takes
        ``(n, *module.input_shape)`` and returns ``(n, n_outputs)``; the
        attributes ``input_shape`` (one sample), ``onnx_input`` and ``onnx_output`` (names in the
        file) and ``onnx_path`` describe where it came from.

    Raises
    ------
    OnnxImportError
        For an unsupported op (the message names the op, the node and the supported ops), an
        unsupported attribute, several network inputs, or branches merged other than by
        ``Add``/``Sub`` of equal shapes.
    FileNotFoundError, ValueError
        For a missing file or one that is not an ONNX model.
    ImportError
        Without the ``onnx`` package.
    """
    onnx = _require_onnx()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No ONNX file at {path!r}.")
    try:
        if path.endswith(".gz"):
            import gzip

            with gzip.open(path, "rb") as handle:
                model = onnx.load_model_from_string(handle.read())
        else:
            model = onnx.load(path)
    except Exception as error:  # onnx raises DecodeError and others for a foreign file
        raise ValueError(f"{path!r} is not a readable ONNX model: {error}") from None
    module = _Converter(model, output=output, dtype=dtype, source=path).convert()
    module.onnx_path = path
    return module


class _Converter:
    def __init__(self, model, *, output: str | None, dtype: torch.dtype, source: str):
        onnx = _require_onnx()
        from onnx import numpy_helper

        self.onnx = onnx
        self.graph = model.graph
        self.source = source
        self.dtype = dtype
        self.opsets = {entry.domain or "": entry.version for entry in model.opset_import}
        self.constants: dict[str, np.ndarray] = {
            init.name: numpy_helper.to_array(init) for init in self.graph.initializer
        }
        outputs = [o.name for o in self.graph.output]
        if not outputs:
            raise OnnxImportError(f"{source}: the graph has no output.")
        if output is None:
            output = outputs[0]
        elif output not in outputs:
            raise ValueError(f"{source}: no graph output named {output!r}; outputs: {outputs}.")
        self.output = output
        self.layers: list[nn.Module] = []
        #: The layers each layer reads (-1: the network input).
        self.reads: list[tuple[int, ...]] = []
        #: Computed tensors by name.
        self.tensors: dict[str, _Flow] = {}
        #: Layer -> the tensor it writes, where a following constant op may fold into it.
        self.foldable_at: dict[int, str] = {}
        #: Readers of each tensor among the nodes the output needs.
        self.consumers: dict[str, int] = {}
        #: The layer the next emitted layer reads (moves as a handler emits several).
        self.cursor = -1
        self._emitted_foldable = False

    # ------------------------------------------------------------------ driver
    def convert(self) -> nn.Module:
        inputs = [i for i in self.graph.input if i.name not in self.constants]
        if len(inputs) != 1:
            names = [i.name for i in inputs]
            raise OnnxImportError(
                f"{self.source}: the graph has {len(inputs)} non-constant inputs {names}; "
                "certdistill reads networks with exactly one input."
            )
        graph_input = inputs[0]
        dims = []
        for dim in graph_input.type.tensor_type.shape.dim:
            dims.append(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else -1)
        if any(d == -1 for d in dims[1:]):
            raise OnnxImportError(
                f"{self.source}: input {graph_input.name!r} has a symbolic size outside its "
                f"first axis ({dims}); certdistill needs fixed sample shapes."
            )
        batched = len(dims) >= 2 and dims[0] in (1, -1)
        shape = tuple(1 if d == -1 else d for d in dims)
        if not shape:
            raise OnnxImportError(f"{self.source}: the input {graph_input.name!r} is a scalar.")
        flow = _Flow(graph_input.name, shape, batched, -1)
        input_shape = flow.sample_shape
        self.tensors[flow.name] = flow
        nodes = self._needed_nodes(graph_input.name)
        for node in nodes:
            for name in node.input:
                self.consumers[name] = self.consumers.get(name, 0) + 1
        for node in nodes:
            self._convert_node(node)
        if self.output in self.constants:
            raise OnnxImportError(
                f"{self.source}: output {self.output!r} does not depend on the input."
            )
        out = self.tensors.get(self.output)
        if out is None:  # pragma: no cover - guarded by _needed_nodes
            raise OnnxImportError(f"{self.source}: the output is not reached from the input.")
        self.cursor = out.node
        if len(out.sample_shape) != 1:
            # Logits of shape (n, n_outputs), whatever extra unit axes the file keeps.
            self._append(nn.Flatten())
        elif out.node != len(self.layers) - 1 or out.node < 0:
            self._append(nn.Identity())
        module = self._module().to(self.dtype).eval()
        module.input_shape = tuple(input_shape)
        module.onnx_input = graph_input.name
        module.onnx_output = self.output
        return module

    def _module(self) -> nn.Module:
        """The layers as a ``Sequential`` (a chain) or a ``GraphNetwork``, without the layers
        the output does not read (those that only fed a ``Shape``)."""
        keep, stack = set(), [len(self.layers) - 1]
        while stack:
            index = stack.pop()
            if index >= 0 and index not in keep:
                keep.add(index)
                stack.extend(self.reads[index])
        order = sorted(keep)
        renumber = {old: new for new, old in enumerate(order)}
        renumber[-1] = -1
        layers = [self.layers[i] for i in order]
        reads = [tuple(renumber[j] for j in self.reads[i]) for i in order]
        if all(r == (k - 1,) for k, r in enumerate(reads)):
            return nn.Sequential(*layers)
        return GraphNetwork(layers, reads)

    def _needed_nodes(self, input_name: str) -> list:
        """The nodes the output depends on, in file order (ONNX stores them sorted)."""
        producers = {}
        for node in self.graph.node:
            for name in node.output:
                producers[name] = node
        needed, stack = set(), [self.output]
        while stack:
            name = stack.pop()
            node = producers.get(name)
            if node is None or id(node) in needed:
                continue
            needed.add(id(node))
            stack.extend(n for n in node.input if n)
        nodes = [node for node in self.graph.node if id(node) in needed]
        if self.output != input_name and self.output not in producers:
            raise OnnxImportError(f"{self.source}: no node computes output {self.output!r}.")
        return nodes

    def _where(self, node) -> str:
        label = f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node"
        return f"{self.source}: {label} (output {node.output[0]!r})"

    def _refuse(self, node, why: str) -> OnnxImportError:
        return OnnxImportError(f"{self._where(node)}: {why}")

    def _convert_node(self, node) -> None:
        if node.domain not in ("", "ai.onnx"):
            raise self._refuse(
                node, f"custom domain {node.domain!r} is not supported. {supported_onnx_ops_text()}"
            )
        computed = [name for name in node.input if name and name not in self.constants]
        if not computed:
            self._fold_constant(node)
            return
        flows = [self.tensors[name] for name in computed]
        if node.op_type == "Shape":
            # The file's shape with the batch of one: what exported Reshape targets are built from.
            start, end = self.attribute(node, "start", 0), self.attribute(node, "end")
            self.constants[node.output[0]] = np.array(flows[0].shape[start:end], dtype=np.int64)
            return
        if len(set(computed)) != len(computed):
            raise self._refuse(
                node,
                "it uses the same computed tensor twice (e.g. x * x), which is not linear in it.",
            )
        if len(flows) > 1:
            self._merge(node, flows)
            return
        handler = _HANDLERS.get(node.op_type)
        if handler is None:
            raise self._refuse(
                node, f"op {node.op_type!r} is not supported. {supported_onnx_ops_text()}"
            )
        flow = flows[0]
        self.cursor, self._emitted_foldable = flow.node, False
        shape, batched = handler(self, node, flow)
        name = node.output[0]
        self.tensors[name] = _Flow(name, shape, batched, self.cursor)
        if self.cursor != flow.node:
            if self._emitted_foldable:
                self.foldable_at[self.cursor] = name
        elif self.foldable_at.get(flow.node) == flow.name and self.consumers[flow.name] == 1:
            self.foldable_at[flow.node] = name  # folded in place, or passed through
        else:
            self.foldable_at.pop(flow.node, None)

    def _merge(self, node, flows: list[_Flow]) -> None:
        """``Add`` (or ``Sub``) of two computed tensors: the merge of a residual connection."""
        if node.op_type not in ("Add", "Sub") or len(flows) != 2:
            raise self._refuse(
                node,
                f"{node.op_type} of {len(flows)} computed tensors is not "
                "supported (only the Add or Sub of two branches).",
            )
        first, second = (self.tensors[name] for name in node.input[:2])
        if first.shape != second.shape or first.batched != second.batched:
            raise self._refuse(
                node,
                f"the branches have shapes {first.shape} and "
                f"{second.shape}; broadcasting between branches is not "
                "supported.",
            )
        right = second.node
        if node.op_type == "Sub":
            self.cursor = second.node
            self._append(ConstantAffine(-1.0, 0.0))
            right = self.cursor
        self.layers.append(Add())
        self.reads.append((first.node, right))
        name = node.output[0]
        self.tensors[name] = _Flow(name, first.shape, first.batched, len(self.layers) - 1)

    def _fold_constant(self, node) -> None:
        from onnx.reference import ReferenceEvaluator

        inputs = {name: self.constants[name] for name in node.input if name}
        try:
            opsets = {"": self.opsets.get("", 13)}
            values = ReferenceEvaluator(node, opsets=opsets).run(None, inputs)
        except Exception as error:
            raise self._refuse(node, f"could not evaluate it on constants: {error}") from None
        for name, value in zip(node.output, values, strict=False):
            self.constants[name] = np.asarray(value)

    # -------------------------------------------------------------- helpers
    def attribute(self, node, name: str, default=None):
        for attr in node.attribute:
            if attr.name == name:
                return self.onnx.helper.get_attribute_value(attr)
        return default

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(array, dtype=np.float64))

    def _append(self, layer: nn.Module) -> None:
        """Add ``layer`` reading the cursor's layer; the cursor moves to it."""
        self.layers.append(layer.to(torch.float64))
        self.reads.append((self.cursor,))
        self.cursor = len(self.layers) - 1

    def emit(self, layer: nn.Module, flow: _Flow, *, foldable: bool = False) -> tuple:
        """Append ``layer`` and return the flow's new (shape, batched)."""
        self._append(layer)
        self._emitted_foldable = foldable
        with torch.no_grad():
            probe = layer(torch.zeros(1, *flow.sample_shape, dtype=torch.float64))
        sample = tuple(probe.shape[1:])
        return ((1, *sample) if flow.batched else sample), flow.batched

    def reshape_to(self, shape: tuple[int, ...], flow: _Flow) -> tuple:
        """The flow takes the file's ``shape`` (same number of entries): a per-sample reshape."""
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != math.prod(flow.shape):
            raise OnnxImportError(
                f"{self.source}: a reshape from {flow.shape} to {shape} "
                "changes the number of entries."
            )
        batched = len(shape) >= 2 and shape[0] == 1
        sample = shape[1:] if batched else shape
        if sample != flow.sample_shape:
            self._append(nn.Flatten() if len(sample) == 1 else Reshape(sample))
            self._emitted_foldable = False
        return shape, batched

    def per_sample_constant(self, node, value: np.ndarray, flow: _Flow) -> np.ndarray:
        """``value`` broadcast against the flow as one sample's constant (or refuse)."""
        value = np.asarray(value, dtype=np.float64)
        try:
            result = np.broadcast_shapes(value.shape, flow.shape)
        except ValueError:
            raise self._refuse(
                node,
                f"constant of shape {value.shape} does not broadcast with "
                f"the input of shape {flow.shape}.",
            ) from None
        if tuple(result) != tuple(flow.shape):
            raise self._refuse(
                node,
                f"constant of shape {value.shape} would broadcast the "
                f"input of shape {flow.shape} to {tuple(result)}.",
            )
        aligned = value.reshape((1,) * (len(flow.shape) - value.ndim) + value.shape)
        if flow.batched:
            aligned = aligned[0]
        while aligned.ndim and aligned.shape[0] == 1:
            aligned = aligned[0]
        return aligned

    def affine(self, node, flow: _Flow, scale, shift) -> tuple:
        """Emit ``x * scale + shift`` (per-sample constants), folded into what came before."""
        scale = self.per_sample_constant(node, scale, flow)
        shift = self.per_sample_constant(node, shift, flow)
        # Fold only into the layer writing this tensor, and only when nothing else reads it.
        foldable = (
            flow.node >= 0
            and self.foldable_at.get(flow.node) == flow.name
            and self.consumers.get(flow.name, 0) == 1
        )
        previous = self.layers[flow.node] if foldable else None
        if isinstance(previous, ConstantAffine):
            # (x * a + b) * s + h = x * (a s) + (b s + h): one layer for a whole normalisation.
            a, b = previous.scale.numpy(), previous.shift.numpy()
            merged_scale, merged_shift = a * scale, b * scale + shift
            self.layers[flow.node] = ConstantAffine(
                self.tensor(merged_scale), self.tensor(merged_shift)
            ).double()
            return flow.shape, flow.batched
        if np.all(scale == 1) and isinstance(previous, nn.Linear | nn.Conv2d):
            bias = _bias_vector(previous, shift)
            if bias is not None:
                with torch.no_grad():
                    if previous.bias is None:
                        previous.bias = nn.Parameter(self.tensor(bias))
                    else:
                        previous.bias += self.tensor(bias)
                return flow.shape, flow.batched
        return self.emit(
            ConstantAffine(self.tensor(scale), self.tensor(shift)), flow, foldable=True
        )


def _bias_vector(layer: nn.Linear | nn.Conv2d, shift: np.ndarray) -> np.ndarray | None:
    """``shift`` as a bias of ``layer`` (one value per output unit or channel), if it is one."""
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if shift.ndim == 0:
        return np.full(out, float(shift))
    if isinstance(layer, nn.Linear) and shift.shape == (out,):
        return shift
    if isinstance(layer, nn.Conv2d) and shift.ndim == 3 and shift.shape == (out, 1, 1):
        return shift.reshape(out)
    return None


# ------------------------------------------------------------------------ op handlers
def _constant_input(conv: _Converter, node, index: int, what: str) -> np.ndarray:
    name = node.input[index] if len(node.input) > index else ""
    if not name:
        raise conv._refuse(node, f"its {what} input is missing.")
    if name not in conv.constants:
        raise conv._refuse(node, f"its {what} ({name!r}) must be a constant.")
    return conv.constants[name]


def _gemm(conv: _Converter, node, flow: _Flow):
    if node.input[0] != flow.name:
        raise conv._refuse(node, "the computed tensor must be its first input A.")
    if len(flow.shape) != 2 or conv.attribute(node, "transA", 0):
        raise conv._refuse(node, f"Gemm needs A of shape (1, k) without transA; got {flow.shape}.")
    weight = _constant_input(conv, node, 1, "B").astype(np.float64)
    if not conv.attribute(node, "transB", 0):
        weight = weight.T
    weight = weight * conv.attribute(node, "alpha", 1.0)
    out_features, in_features = weight.shape
    if in_features != flow.shape[1]:
        raise conv._refuse(node, f"B takes {in_features} features, A has {flow.shape[1]}.")
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.copy_(conv.tensor(weight))
        layer.bias.zero_()
        if len(node.input) > 2 and node.input[2]:
            c = _constant_input(conv, node, 2, "C") * conv.attribute(node, "beta", 1.0)
            c = np.broadcast_to(np.asarray(c, dtype=np.float64), (1, out_features))
            layer.bias.copy_(conv.tensor(c[0]))
    return conv.emit(layer, flow, foldable=True)


def _matmul(conv: _Converter, node, flow: _Flow):
    if node.input[0] == flow.name:
        weight = _constant_input(conv, node, 1, "second").astype(np.float64)
        if weight.ndim != 2 or flow.shape[-1] != weight.shape[0]:
            raise conv._refuse(
                node,
                f"x @ W needs a constant matrix W of shape "
                f"({flow.shape[-1]}, m), got {weight.shape}.",
            )
        weight = weight.T
    else:
        # W @ x for a vector x (VNN-COMP's small test networks) is the same map.
        weight = _constant_input(conv, node, 0, "first").astype(np.float64)
        if len(flow.shape) != 1 or weight.ndim != 2 or weight.shape[1] != flow.shape[0]:
            raise conv._refuse(
                node,
                f"W @ x is supported for a vector x only; got W of shape "
                f"{weight.shape} and x of shape {flow.shape}.",
            )
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(conv.tensor(weight))
    return conv.emit(layer, flow, foldable=True)


def _binary(conv: _Converter, node, flow: _Flow):
    first_computed = node.input[0] == flow.name
    constant = conv.constants[node.input[1] if first_computed else node.input[0]]
    constant = np.asarray(constant, dtype=np.float64)
    op = node.op_type
    if op == "Add":
        return conv.affine(node, flow, 1.0, constant)
    if op == "Sub":
        if first_computed:
            return conv.affine(node, flow, 1.0, -constant)
        return conv.affine(node, flow, -np.ones_like(constant), constant)
    if op == "Mul":
        return conv.affine(node, flow, constant, 0.0)
    if not first_computed:
        raise conv._refuse(node, "a constant divided by the computed tensor is not linear.")
    if np.any(constant == 0):
        raise conv._refuse(node, "division by a constant that holds zeros.")
    return conv.affine(node, flow, 1.0 / constant, 0.0)


def _relu(conv: _Converter, node, flow: _Flow):
    return conv.emit(nn.ReLU(), flow)


def _pass_through(conv: _Converter, node, flow: _Flow):
    if node.op_type == "Cast":
        import onnx

        target = conv.attribute(node, "to")
        if target not in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.DOUBLE,
            onnx.TensorProto.FLOAT16,
        ):
            raise conv._refuse(node, "only casts between floating-point types are supported.")
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
        raise conv._refuse(node, "the dropout mask output is not supported.")
    return flow.shape, flow.batched


def _flatten(conv: _Converter, node, flow: _Flow):
    axis = conv.attribute(node, "axis", 1)
    if axis < 0:
        axis += len(flow.shape)
    shape = (math.prod(flow.shape[:axis]), math.prod(flow.shape[axis:]))
    return conv.reshape_to(shape, flow)


def _reshape(conv: _Converter, node, flow: _Flow):
    target = [int(s) for s in _constant_input(conv, node, 1, "shape").reshape(-1)]
    allow_zero = conv.attribute(node, "allowzero", 0)
    shape = []
    for index, size in enumerate(target):
        if size == 0 and not allow_zero:
            if index >= len(flow.shape):
                raise conv._refuse(node, f"a 0 in the target {target} has no input axis to copy.")
            shape.append(flow.shape[index])
        else:
            shape.append(size)
    if shape.count(-1) > 1:
        raise conv._refuse(node, f"target shape {target} has more than one -1.")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = math.prod(flow.shape) // max(known, 1)
    return conv.reshape_to(tuple(shape), flow)


def _axes(conv: _Converter, node, flow_rank: int) -> list[int] | None:
    axes = conv.attribute(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = _constant_input(conv, node, 1, "axes").reshape(-1).tolist()
    if axes is None:
        return None
    return [int(a) + flow_rank if int(a) < 0 else int(a) for a in axes]


def _squeeze(conv: _Converter, node, flow: _Flow):
    axes = _axes(conv, node, len(flow.shape))
    if axes is None:
        axes = [i for i, s in enumerate(flow.shape) if s == 1]
    if any(flow.shape[a] != 1 for a in axes):
        raise conv._refuse(node, f"squeezes an axis that is not of size 1 ({flow.shape}).")
    return conv.reshape_to(tuple(s for i, s in enumerate(flow.shape) if i not in axes), flow)


def _unsqueeze(conv: _Converter, node, flow: _Flow):
    axes = conv.attribute(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = _constant_input(conv, node, 1, "axes").reshape(-1).tolist()
    if not axes:
        raise conv._refuse(node, "Unsqueeze without axes.")
    rank = len(flow.shape) + len(axes)
    shape = list(flow.shape)
    for axis in sorted(int(a) + rank if int(a) < 0 else int(a) for a in axes):
        shape.insert(axis, 1)
    return conv.reshape_to(tuple(shape), flow)


def _transpose(conv: _Converter, node, flow: _Flow):
    perm = conv.attribute(node, "perm")
    if perm is None:
        perm = list(reversed(range(len(flow.shape))))
    moved = [axis for axis in perm if flow.shape[axis] != 1]
    if moved != sorted(moved):
        raise conv._refuse(
            node,
            f"Transpose with perm={list(perm)} on shape {flow.shape} "
            "permutes data; only transposes that move axes of size 1 (a "
            "reshape) are supported.",
        )
    return conv.reshape_to(tuple(flow.shape[axis] for axis in perm), flow)


def _spatial_pads(conv: _Converter, node, flow: _Flow, kernel, strides) -> tuple[int, ...]:
    """``(top, left, bottom, right)`` of a Conv or AveragePool, auto_pad resolved."""
    auto_pad = conv.attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s in zip(flow.shape[2:], kernel, strides, strict=True):
            out = -(-size // s)
            pads.append(max(0, (out - 1) * s + k - size))
        begin = [p // 2 if auto_pad == "SAME_UPPER" else p - p // 2 for p in pads]
        end = [p - b for p, b in zip(pads, begin, strict=True)]
        return (begin[0], begin[1], end[0], end[1])
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    pads = conv.attribute(node, "pads", [0, 0, 0, 0])
    return tuple(int(p) for p in pads)


def _check_feature_map(conv: _Converter, node, flow: _Flow) -> None:
    if len(flow.shape) != 4 or not flow.batched:
        raise conv._refuse(
            node, f"needs a 2-D feature map of shape (1, C, H, W), got {flow.shape}."
        )


def _conv(conv: _Converter, node, flow: _Flow):
    _check_feature_map(conv, node, flow)
    weight = _constant_input(conv, node, 1, "weight").astype(np.float64)
    if weight.ndim != 4:
        raise conv._refuse(node, "only 2-D convolutions are supported.")
    group = conv.attribute(node, "group", 1)
    dilations = list(conv.attribute(node, "dilations", [1, 1]))
    if group != 1 or dilations != [1, 1]:
        raise conv._refuse(
            node,
            f"group={group}, dilations={dilations}: only group=1 and dilation 1 are supported.",
        )
    kernel = tuple(weight.shape[2:])
    strides = tuple(conv.attribute(node, "strides", [1, 1]))
    top, left, bottom, right = _spatial_pads(conv, node, flow, kernel, strides)
    out_channels, in_channels = weight.shape[:2]
    if in_channels != flow.shape[1]:
        raise conv._refuse(node, f"weight takes {in_channels} channels, input has {flow.shape[1]}.")
    shape = flow.shape, flow.batched
    padding = (top, left)
    if (top, left) != (bottom, right):
        shape = conv.emit(nn.ZeroPad2d((left, right, top, bottom)), flow)
        flow = _Flow(flow.name, *shape)
        padding = (0, 0)
    layer = nn.Conv2d(in_channels, out_channels, kernel, stride=strides, padding=padding)
    with torch.no_grad():
        layer.weight.copy_(conv.tensor(weight))
        if len(node.input) > 2 and node.input[2]:
            layer.bias.copy_(conv.tensor(_constant_input(conv, node, 2, "bias")))
        else:
            layer.bias.zero_()
    return conv.emit(layer, flow, foldable=True)


def _average_pool(conv: _Converter, node, flow: _Flow):
    _check_feature_map(conv, node, flow)
    kernel = tuple(conv.attribute(node, "kernel_shape"))
    strides = tuple(conv.attribute(node, "strides", [1, 1]))
    if list(conv.attribute(node, "dilations", [1, 1])) != [1, 1]:
        raise conv._refuse(node, "dilated pooling is not supported.")
    top, left, bottom, right = _spatial_pads(conv, node, flow, kernel, strides)
    include_pad = bool(conv.attribute(node, "count_include_pad", 0))
    ceil_mode = bool(conv.attribute(node, "ceil_mode", 0))
    padding = (top, left)
    if (top, left) != (bottom, right):
        if not include_pad:
            raise conv._refuse(
                node, "asymmetric padding that is not counted in the average is not supported."
            )
        flow = _Flow(flow.name, *conv.emit(nn.ZeroPad2d((left, right, top, bottom)), flow))
        padding = (0, 0)
    if any(2 * p > k for p, k in zip(padding, kernel, strict=True)):
        raise conv._refuse(node, f"padding {padding} exceeds half the kernel {kernel}.")
    layer = nn.AvgPool2d(
        kernel, stride=strides, padding=padding, ceil_mode=ceil_mode, count_include_pad=include_pad
    )
    return conv.emit(layer, flow)


def _pad(conv: _Converter, node, flow: _Flow):
    mode = conv.attribute(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if len(node.input) > 1 and node.input[1]:
        pads = _constant_input(conv, node, 1, "pads").reshape(-1).tolist()
    else:
        pads = list(conv.attribute(node, "pads", []))
    value = 0.0
    if len(node.input) > 2 and node.input[2]:
        value = float(_constant_input(conv, node, 2, "constant_value").reshape(-1)[0])
    else:
        value = float(conv.attribute(node, "value", 0.0))
    if len(node.input) > 3 and node.input[3]:
        raise conv._refuse(node, "Pad with an axes input is not supported.")
    rank = len(flow.shape)
    if mode != "constant" or value != 0.0 or len(pads) != 2 * rank or rank != 4:
        raise conv._refuse(
            node,
            f"only zero padding of the two spatial axes of a (1, C, H, W) "
            f"map is supported (mode={mode!r}, value={value}, pads={pads}).",
        )
    begin, end = pads[:rank], pads[rank:]
    if any(begin[:2]) or any(end[:2]) or min(pads) < 0:
        raise conv._refuse(node, f"pads {pads} touch the batch or channel axes or crop.")
    return conv.emit(nn.ZeroPad2d((begin[3], end[3], begin[2], end[2])), flow)


def _batch_norm(conv: _Converter, node, flow: _Flow):
    if len(node.output) > 1 and any(node.output[1:]):
        raise conv._refuse(
            node, "training-mode BatchNormalization (running statistics outputs) is not supported."
        )
    if conv.attribute(node, "training_mode", 0):
        raise conv._refuse(node, "training_mode=1 is not supported.")
    if len(flow.shape) < 2 or not flow.batched:
        raise conv._refuse(node, f"needs an input of shape (1, C, ...), got {flow.shape}.")
    gamma, beta, mean, var = (
        _constant_input(conv, node, i, what).astype(np.float64)
        for i, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var"))
    )
    epsilon = conv.attribute(node, "epsilon", 1e-5)
    scale = gamma / np.sqrt(var + epsilon)
    shift = beta - mean * scale
    channel_shape = (1, -1) + (1,) * (len(flow.shape) - 2)
    return conv.affine(node, flow, scale.reshape(channel_shape), shift.reshape(channel_shape))


_HANDLERS: dict[str, Callable] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _binary,
    "Sub": _binary,
    "Mul": _binary,
    "Div": _binary,
    "Relu": _relu,
    "Conv": _conv,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Transpose": _transpose,
    "BatchNormalization": _batch_norm,
    "AveragePool": _average_pool,
    "Pad": _pad,
    "Identity": _pass_through,
    "Dropout": _pass_through,
    "Cast": _pass_through,
}

#: ONNX ops :func:`load_onnx` turns into layers (``Constant`` and any op on constants only are
#: evaluated at load time).
ONNX_OPS: tuple[str, ...] = (*_HANDLERS, "Shape", "Constant")


def supported_onnx_ops_text() -> str:
    """The sentence listing the ONNX ops :func:`load_onnx` supports."""
    return (
        f"Supported ONNX ops: {', '.join(ONNX_OPS)} (Add, Sub, Mul, Div with one constant "
        "operand; any op whose inputs are all constants is evaluated at load time)."
    )
