"""Patches: a sparse form of backward matrices for convolutional layers.

For the pre-activation bounds of a convolutional layer, CROWN propagates one row per neuron.
Each row is non-zero only on the neuron's receptive field, so storing it densely (as
``(n, S, C, H, W)``) wastes memory and time quadratically in the image size. A patch stores, for
every specification channel ``s`` and output location ``l``, only the coefficients on the window
of the current feature map that location ``l`` sees: ``coeffs`` of shape
``(n, S, L, C, Kh, Kw)``, with the window of location ``l`` starting at
``(row(l) * stride - padding, col(l) * stride - padding)``.

The same idea is auto_LiRPA's "patches" mode (Xu et al. 2020); this is an independent
implementation restricted to what the native engine needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PatchGeometry:
    """Window size, stride and padding of the patches relative to the current feature map."""

    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    def through(self, kernel, stride, padding) -> PatchGeometry:
        """Geometry on the input map of a layer with the given kernel, stride and padding."""
        axes = range(2)
        return PatchGeometry(
            kernel=tuple((self.kernel[a] - 1) * stride[a] + kernel[a] for a in axes),
            stride=tuple(self.stride[a] * stride[a] for a in axes),
            padding=tuple(self.padding[a] * stride[a] + padding[a] for a in axes),
        )


def unfold_map(feature_map: Tensor, geometry: PatchGeometry) -> Tensor:
    """Windows of ``feature_map`` (n, C, H, W) as ``(n, L, C, Kh, Kw)``; zero outside the map."""
    n, channels = feature_map.shape[:2]
    columns = F.unfold(
        feature_map, geometry.kernel, padding=geometry.padding, stride=geometry.stride
    )
    return columns.view(n, channels, *geometry.kernel, -1).permute(0, 4, 1, 2, 3)


def identity_patches(shape: torch.Size, channels: Tensor, dtype, device) -> Tensor:
    """Patches of ``[I; -I]`` restricted to ``channels`` of a map of ``shape`` (C, H, W).

    Returns ``(1, 2k, H*W, C, 1, 1)`` for ``k`` channels: rows ``e_(c, l)`` then ``-e_(c, l)``.
    The batch dimension is 1 and broadcasts: rows only become sample-dependent at the first
    activation relaxation.
    """
    n_channels, height, width = shape
    eye = torch.eye(n_channels, dtype=dtype, device=device)[channels]
    rows = torch.cat([eye, -eye]).view(-1, 1, n_channels, 1, 1)
    return rows.expand(-1, height * width, n_channels, 1, 1).unsqueeze(0)


def in_map_mask(shape: torch.Size, geometry: PatchGeometry, dtype, device) -> Tensor:
    """``(1, 1, L, 1, Kh, Kw)`` mask: 1 where a window position lies inside the map."""
    ones = torch.ones(1, 1, *shape[1:], dtype=dtype, device=device)
    return unfold_map(ones, geometry).unsqueeze(1)


def concretize_patches(
    coeffs: Tensor, bias: Tensor, center: Tensor, radius: Tensor, geometry: PatchGeometry
) -> Tensor:
    """Minimum of the patched linear functions over the box ``center +- radius``: (n, S, L)."""
    center_windows = unfold_map(center, geometry).flatten(2)
    radius_windows = unfold_map(radius, geometry).flatten(2)
    flat = coeffs.flatten(3).expand(center.shape[0], -1, -1, -1)
    return (
        torch.einsum("nsld,nld->nsl", flat, center_windows)
        - torch.einsum("nsld,nld->nsl", flat.abs(), radius_windows)
        + bias
    )
