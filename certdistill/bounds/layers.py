"""Torch layers the bound engine knows beyond torch's own.

Imported networks (:func:`certdistill.load_onnx`) need a few affine maps that ``torch.nn`` has
no layer for: input normalisation by constants (``Sub``, ``Div``, ``Mul``, ``Add`` in ONNX) and a
general change of shape of each sample (``Reshape``, ``Squeeze``, ``Unsqueeze`` and the
transposes that move only axes of size one). Each one is an ordinary ``nn.Module``, so an
imported network is an ``nn.Sequential`` that runs, trains and pickles like any other; the bound
operations of :mod:`certdistill.bounds.ops` are registered for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Add", "ConstantAffine", "GraphNetwork", "Reshape"]


class ConstantAffine(nn.Module):
    """Element-wise ``y = x * scale + shift`` with constant ``scale`` and ``shift``.

    Parameters
    ----------
    scale, shift : Tensor or float
        Broadcastable to one sample (no batch dimension): a scalar, one value per channel of
        shape ``(C, 1, 1)``, one value per feature, ... Stored as buffers (not trained).
    """

    def __init__(self, scale: Tensor | float = 1.0, shift: Tensor | float = 0.0):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.get_default_dtype()))
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.get_default_dtype()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    def extra_repr(self) -> str:
        def text(tensor: Tensor) -> str:
            return f"{float(tensor):g}" if tensor.numel() == 1 else f"<{tuple(tensor.shape)}>"

        return f"scale={text(self.scale)}, shift={text(self.shift)}"


class Reshape(nn.Module):
    """Reshape each sample to ``shape``: ``(n, ...) -> (n, *shape)``.

    Parameters
    ----------
    shape : sequence of int
        The shape of one output sample (no batch dimension, no ``-1``).
    """

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in self.shape):
            raise ValueError(f"Reshape needs an explicit shape, got {self.shape!r}.")

    def forward(self, x: Tensor) -> Tensor:
        if math.prod(x.shape[1:]) != math.prod(self.shape):
            raise ValueError(
                f"cannot reshape samples of shape {tuple(x.shape[1:])} to {self.shape}"
            )
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class Add(nn.Module):
    """The sum of two tensors of one shape: the merge of a residual connection."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class GraphNetwork(nn.Module):
    """A network whose layers form a directed acyclic graph (residual connections).

    Layer ``i`` reads the outputs of the nodes ``inputs[i]`` (``-1`` is the network's input),
    in topological order; the last layer's output is the network's. A chain
    (``inputs[i] == (i - 1,)`` for every ``i``) is an ``nn.Sequential``.

    Parameters
    ----------
    layers : sequence of torch.nn.Module
        One module per node; :class:`Add` for a node with two inputs.
    inputs : sequence of sequence of int
        The nodes each layer reads, every one smaller than the layer's own index.

    Examples
    --------
    ``x + W2 relu(W1 x)``, then a classifier::

        GraphNetwork([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), Add(), nn.Linear(4, 3)],
                     [(-1,), (0,), (1,), (2, -1), (3,)])
    """

    def __init__(self, layers: Sequence[nn.Module], inputs: Sequence[Sequence[int]]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.inputs = [tuple(int(j) for j in node) for node in inputs]
        if len(self.inputs) != len(self.layers) or not self.layers:
            raise ValueError(
                f"GraphNetwork needs one input list per layer, got {len(self.layers)} layers "
                f"and {len(self.inputs)} input lists."
            )
        for index, node in enumerate(self.inputs):
            if not node or any(not -1 <= j < index for j in node):
                raise ValueError(
                    f"layer {index} reads {node}: every input must be an earlier layer's index "
                    "or -1 (the network input)."
                )

    def forward(self, x: Tensor) -> Tensor:
        outputs: list[Tensor] = []
        for layer, node in zip(self.layers, self.inputs, strict=True):
            outputs.append(layer(*(x if j < 0 else outputs[j] for j in node)))
        return outputs[-1]

    def extra_repr(self) -> str:
        return f"inputs={self.inputs}"
