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

__all__ = ["ConstantAffine", "Reshape"]


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
