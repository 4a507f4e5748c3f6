"""The perturbation set: an L-infinity ball intersected with the input domain."""

from __future__ import annotations

import torch
from torch import Tensor


def input_box(
    x: Tensor,
    eps: float | Tensor,
    lower: float | Tensor | None = None,
    upper: float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Centre and radius of ``{x' : |x' - x|_inf <= eps} ∩ [lower, upper]``.

    Parameters
    ----------
    x : Tensor of shape (n, ...)
    eps : float or Tensor
        Radius, broadcastable to ``x`` (scalar, per feature, or per sample).
    lower, upper : float or Tensor, optional
        Bounds of the input domain, broadcastable to ``x``.

    Returns
    -------
    center : Tensor
        Centre of the box, of the shape of ``x``.
    radius : Tensor
        Half-width of the box, of the shape of ``x``: the box is
        ``center - radius <= x' <= center + radius``.
    """
    if isinstance(eps, int | float) and not eps >= 0:  # tensors are checked by callers
        raise ValueError(f"eps must be non-negative, got {eps!r}.")
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if lower is None and upper is None:
        return x, eps.expand_as(x)
    box_lower, box_upper = x - eps, x + eps
    if lower is not None:
        box_lower = torch.maximum(box_lower, torch.as_tensor(lower, dtype=x.dtype, device=x.device))
    if upper is not None:
        box_upper = torch.minimum(box_upper, torch.as_tensor(upper, dtype=x.dtype, device=x.device))
    return (box_upper + box_lower) / 2, (box_upper - box_lower) / 2
