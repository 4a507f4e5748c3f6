"""Training losses for certified training.

The hot path of IBP-based training is :func:`ibp_forward`: one pass through an ``nn.Sequential``
that carries the clean activations and the interval (centre/radius form) side by side. It returns
the clean logits, the IBP lower bounds of the margins ``z_y - z_j`` (with the margin
specification folded into the last ``Linear`` layer) and, on request, the pre-activation bounds of
every ReLU (needed by the warm-up regularisers of Shi et al. 2021). Sharing the pass means the clean
forward is computed once and BatchNorm in training mode normalises the bounds with the statistics
of the clean batch, updating its running statistics once per step.

The loss functions then combine these pieces:

* :func:`certified_cross_entropy`: cross-entropy of the worst-case logits ``zhat_j = -m_j``,
  ``zhat_y = 0`` built from margin lower bounds ``m``;
* :func:`shi_regularizer`: the bound-tightness and ReLU-balance regularisers of Shi et al. (2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certdistill.exceptions import UnsupportedLayerError

__all__ = [
    "IBPPass",
    "certified_cross_entropy",
    "flatten_sequential",
    "ibp_forward",
    "input_interval",
    "shi_regularizer",
    "worst_case_logits",
]

_SUPPORTED = (
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.Flatten,
    nn.Unflatten,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.AvgPool2d,
    nn.Identity,
    nn.Dropout,
)


def flatten_sequential(module: nn.Module) -> list[nn.Module] | None:
    """Return the layers of a (possibly nested) ``nn.Sequential`` in order.

    Parameters
    ----------
    module : torch.nn.Module
        The network.

    Returns
    -------
    list of torch.nn.Module or None
        The leaf layers, or ``None`` when ``module`` is not exactly an ``nn.Sequential`` (a
        custom ``forward`` that this fast path cannot follow).

    Raises
    ------
    UnsupportedLayerError
        If a leaf layer is not one of the supported types.
    """
    # Exact types, as in the bound engine: a subclass may override forward().
    if type(module) is not nn.Sequential:
        return None
    layers: list[nn.Module] = []
    for layer in module:
        if type(layer) is nn.Sequential:
            layers.extend(flatten_sequential(layer))
        elif type(layer) in _SUPPORTED:
            layers.append(layer)
        else:
            names = ", ".join(t.__name__ for t in _SUPPORTED)
            raise UnsupportedLayerError(
                f"layer {layer!r} is not supported by certified training; supported layers: "
                f"{names} and nested Sequential"
            )
    return layers


def input_interval(
    x: Tensor, eps: float | Tensor, lower=None, upper=None
) -> tuple[Tensor, Tensor]:
    """Centre and radius of the L-infinity ball around ``x`` intersected with the domain.

    Parameters
    ----------
    x : Tensor
        Clean inputs.
    eps : float or Tensor
        Radius of the ball (scalar or broadcastable to ``x``).
    lower, upper : float, Tensor or None
        Bounds of the input domain (``None``: unbounded).

    Returns
    -------
    center, radius : Tensor
        ``(u + l) / 2`` and ``(u - l) / 2`` where ``[l, u]`` is the clipped box.
    """
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    lo = x - eps_t
    hi = x + eps_t
    if lower is not None:
        lo = torch.maximum(lo, torch.as_tensor(lower, dtype=x.dtype, device=x.device))
    if upper is not None:
        hi = torch.minimum(hi, torch.as_tensor(upper, dtype=x.dtype, device=x.device))
    hi = torch.maximum(hi, lo)
    return (hi + lo) / 2, (hi - lo) / 2


@dataclass
class IBPPass:
    """Result of :func:`ibp_forward`.

    Attributes
    ----------
    logits : Tensor
        Clean logits, shape ``(n, C)``.
    margins : Tensor or None
        IBP lower bounds of ``z_y - z_j``, shape ``(n, C)``, ``+inf`` in the reference column;
        ``None`` when no reference was given.
    pre_activations : list of (Tensor, Tensor)
        ``(center, radius)`` of the input of every ReLU (only when requested).
    input_radius : Tensor or None
        Radius of the input box (only when pre-activations were requested).
    """

    logits: Tensor
    margins: Tensor | None = None
    pre_activations: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    input_radius: Tensor | None = None


def _batch_norm(layer, x, center, radius):
    """BatchNorm on the clean batch and the same per-channel affine map on the interval."""
    dims = [0] + list(range(2, x.dim()))
    if layer.training:
        var, mean = torch.var_mean(x, dims, unbiased=False)
        if layer.track_running_stats and layer.running_mean is not None:
            with torch.no_grad():
                n = x.numel() // x.shape[1]
                momentum = layer.momentum
                if momentum is None:  # cumulative moving average
                    layer.num_batches_tracked += 1
                    momentum = 1.0 / float(layer.num_batches_tracked)
                else:
                    layer.num_batches_tracked += 1
                unbiased = var * (n / max(n - 1, 1))
                layer.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                layer.running_var.mul_(1 - momentum).add_(momentum * unbiased.detach())
    else:
        # copies: the running statistics may be restored in place later in the step (PGD)
        mean, var = layer.running_mean.clone(), layer.running_var.clone()
    scale = torch.rsqrt(var + layer.eps)
    if layer.affine:
        scale = scale * layer.weight
        shift = layer.bias - mean * scale
    else:
        shift = -mean * scale
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = scale.view(shape)
    shift = shift.view(shape)
    return x * scale + shift, center * scale + shift, radius * scale.abs()


def _folded_radius(weight: Tensor, radius: Tensor, reference: Tensor) -> Tensor:
    """``sum_h |W[ref, h] - W[j, h]| r[n, h]`` for every sample ``n`` and class ``j``.

    With few classes, one matrix product against all ``C * C`` class-pair rows (independent of the
    batch size) is much faster, forward and backward, than a batched product with a per-sample
    ``(n, C, H)`` difference tensor; with many classes the per-sample form uses less compute.
    """
    n_classes = weight.shape[0]
    if n_classes * n_classes <= 4 * radius.shape[0] or n_classes <= 16:
        pairs = (weight.unsqueeze(1) - weight.unsqueeze(0)).abs()  # (C, C, H)
        all_pairs = radius @ pairs.reshape(n_classes * n_classes, -1).t()  # (n, C*C)
        rows = reference[:, None, None].expand(-1, 1, n_classes)
        return all_pairs.view(-1, n_classes, n_classes).gather(1, rows).squeeze(1)
    diff = (weight[reference].unsqueeze(1) - weight.unsqueeze(0)).abs()  # (n, C, H)
    return torch.bmm(diff, radius.unsqueeze(-1)).squeeze(-1)


def ibp_forward(
    layers: list[nn.Module],
    x: Tensor,
    eps: float | Tensor,
    reference: Tensor | None = None,
    *,
    lower=None,
    upper=None,
    return_pre_activations: bool = False,
) -> IBPPass:
    """Clean forward pass and interval bound propagation in one sweep.

    Parameters
    ----------
    layers : list of torch.nn.Module
        Leaf layers from :func:`flatten_sequential`. Each layer's current mode is used: BatchNorm
        in training mode normalises clean activations and bounds with the clean batch statistics
        (and updates its running statistics once); Dropout in training mode applies the same mask
        to the clean activations and the bounds.
    x : Tensor
        Clean inputs of the shape the first layer expects.
    eps : float or Tensor
        L-infinity radius.
    reference : LongTensor or None
        Class per sample for the margin specification. ``None`` skips the margins.
    lower, upper : float, Tensor or None
        Input domain.
    return_pre_activations : bool, default=False
        Keep the centre and radius of every ReLU input.

    Returns
    -------
    IBPPass
        Clean logits, margin lower bounds and (optionally) pre-activation bounds.
    """
    center, radius = input_interval(x, eps, lower, upper)
    out = IBPPass(logits=x)
    if return_pre_activations:
        out.input_radius = radius
    n = x.shape[0]
    fold_last = reference is not None and len(layers) > 0 and isinstance(layers[-1], nn.Linear)
    body = layers[:-1] if fold_last else layers
    for layer in body:
        if isinstance(layer, nn.Linear | nn.Conv2d):
            # one call on the stacked batch is faster than two; split() backpropagates by a
            # single concatenation instead of zero-filling a full-size gradient per slice
            x, center = layer(torch.cat([x, center], dim=0)).split(n)
            if isinstance(layer, nn.Linear):
                radius = F.linear(radius, layer.weight.abs())
            else:
                radius = F.conv2d(
                    radius,
                    layer.weight.abs(),
                    None,
                    layer.stride,
                    layer.padding,
                    layer.dilation,
                    layer.groups,
                )
        elif isinstance(layer, nn.ReLU):
            if return_pre_activations:
                out.pre_activations.append((center, radius))
            x = F.relu(x)
            lo = F.relu(center - radius)
            hi = F.relu(center + radius)
            center, radius = (hi + lo) / 2, (hi - lo) / 2
        elif isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
            x, center, radius = _batch_norm(layer, x, center, radius)
        elif isinstance(layer, nn.Flatten | nn.Unflatten | nn.AvgPool2d):
            x, center, radius = layer(x), layer(center), layer(radius)
        elif isinstance(layer, nn.Dropout):
            if layer.training and layer.p > 0:
                keep = (torch.rand_like(x) >= layer.p).to(x.dtype) / (1 - layer.p)
                x, center, radius = x * keep, center * keep, radius * keep
        elif isinstance(layer, nn.Identity):
            pass
        else:  # pragma: no cover - flatten_sequential filters these
            raise UnsupportedLayerError(f"layer {layer!r} is not supported")
    if reference is None:
        out.logits = x
        return out
    if fold_last:
        last = layers[-1]
        logits, center_logits = last(torch.cat([x, center], dim=0)).split(n)
        rad = _folded_radius(last.weight, radius, reference)
        mid = center_logits.gather(1, reference[:, None]) - center_logits
        margins = mid - rad
    else:
        logits = x
        lo = center - radius
        hi = center + radius
        margins = lo.gather(1, reference[:, None]) - hi
    out.logits = logits
    out.margins = margins.masked_fill(
        F.one_hot(reference, margins.shape[1]).bool(), math.inf
    )
    return out


def worst_case_logits(margins: Tensor) -> Tensor:
    """Worst-case logits ``zhat_j = -m_j``, ``zhat_ref = 0`` from margin lower bounds.

    Parameters
    ----------
    margins : Tensor
        Lower bounds of ``z_ref - z_j``, shape ``(n, C)``, ``+inf`` in the reference column.

    Returns
    -------
    Tensor
        Logits whose softmax cross-entropy at the reference upper-bounds the worst-case loss.
    """
    return torch.where(torch.isinf(margins) & (margins > 0), torch.zeros_like(margins), -margins)


def certified_cross_entropy(margins: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of the worst-case logits built from margin lower bounds.

    Parameters
    ----------
    margins : Tensor
        Lower bounds of ``z_y - z_j`` with reference ``y == target``; shape ``(n, C)``.
    target : LongTensor
        Labels, shape ``(n,)``.

    Returns
    -------
    Tensor
        Mean loss (scalar).
    """
    return F.cross_entropy(worst_case_logits(margins), target)


def shi_regularizer(
    pre_activations: list[tuple[Tensor, Tensor]],
    input_radius: Tensor,
    tol: float = 0.5,
) -> Tensor:
    """Bound-tightness and ReLU-balance regularisers of Shi et al. (2021).

    For every ReLU with pre-activation bounds ``[c - r, c + r]``:

    * tightness: ``relu(tol - mean(r_0) / mean(r)) / tol`` penalises layers whose bounds are
      much looser than the input box of radius ``r_0``;
    * balance: with the active (``c - r > 0``) and inactive (``c + r < 0``) units, the ratios of
      their mean centres and of their centre variances are pushed towards one,
      ``(relu(tol - mean_ratio) + relu(tol - var_ratio)) / tol`` with each ratio folded to
      ``min(q, 1/q)``.

    Both are averaged over the ReLU layers and summed.

    Parameters
    ----------
    pre_activations : list of (Tensor, Tensor)
        ``(center, radius)`` of every ReLU input, from :func:`ibp_forward`.
    input_radius : Tensor
        Radius of the input box.
    tol : float, default=0.5
        Tolerance ``tau`` of both regularisers.

    Returns
    -------
    Tensor
        The regulariser (scalar, differentiable).
    """
    if not pre_activations:
        return input_radius.new_zeros(())
    tightness_0 = input_radius.mean()
    loss_tight = input_radius.new_zeros(())
    loss_relu = input_radius.new_zeros(())
    for center, radius in pre_activations:
        tightness = radius.mean()
        loss_tight = loss_tight + F.relu(tol - tightness_0 / tightness.clamp(min=1e-12)) / tol
        lo, hi = center - radius, center + radius
        active = (lo > 0).to(center.dtype)
        inactive = (hi < 0).to(center.dtype)
        mean_act = (center * active).mean()
        mean_inact = (center * inactive).mean()
        delta = (center - center.mean()) ** 2
        var_act = (delta * active).sum()
        var_inact = (delta * inactive).sum()
        mean_ratio = mean_act / -mean_inact
        var_ratio = var_act / var_inact
        mean_ratio = torch.minimum(mean_ratio, 1 / mean_ratio.clamp(min=1e-12))
        var_ratio = torch.minimum(var_ratio, 1 / var_ratio.clamp(min=1e-12))
        term = (F.relu(tol - mean_ratio) + F.relu(tol - var_ratio)) / tol
        if torch.isfinite(term):
            loss_relu = loss_relu + term
    count = len(pre_activations)
    return (loss_tight + loss_relu) / count
