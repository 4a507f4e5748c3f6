"""Training losses for certified training.

The hot path of IBP-based training is the bound engine's
:meth:`certdistill.bounds.BoundEngine.interval_pass`: one sweep that computes the clean logits,
the IBP lower bounds of the margins ``z_y - z_j`` and, on request, the interval of every
activation's input (BatchNorm in training mode normalises the bounds with the clean batch
statistics). The functions here turn those pieces into losses:

* :func:`worst_case_logits`: the logits ``zhat_j = -m_j``, ``zhat_y = 0`` built from margin
  lower bounds ``m``, and :func:`certified_loss`, the certified cross-entropy of teacher and
  student;
* :func:`shi_regularizer`: the bound-tightness and ReLU-balance regularisers of Shi et al. (2021);
* :func:`distillation_kl` and :func:`margin_matching`: the distillation terms of
  :class:`~certdistill.DistilledStudent`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "certified_loss",
    "distillation_kl",
    "margin_matching",
    "rival_gap",
    "shi_regularizer",
    "worst_case_logits",
    "with_clean_term",
]


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


def rival_gap(worst: Tensor, y: Tensor) -> Tensor:
    """The largest worst-case logit other than the label's (``worst`` from
    :func:`worst_case_logits`): minus the smallest margin bound, negative exactly where every
    margin of the label is proven positive."""
    return worst.scatter(1, y[:, None], float("-inf")).amax(1)


def with_clean_term(worst_loss: Tensor, logits: Tensor, target: Tensor, kappa: float) -> Tensor:
    """``kappa CE(z, target) + (1 - kappa) worst_loss``; at ``kappa == 0`` no clean term.

    The one place of the clean/certified mix, for losses whose certified part is computed
    without worst-case logits (the fused CROWN-IBP cross-entropy) as well as for
    :func:`certified_loss`.
    """
    loss = (1.0 - kappa) * worst_loss
    if kappa > 0.0:
        loss = loss + kappa * F.cross_entropy(logits, target)
    return loss


def certified_loss(
    logits: Tensor,
    worst_logits: Tensor,
    target: Tensor,
    kappa: float = 0.0,
    weights: Tensor | None = None,
) -> Tensor:
    """The certified training loss ``kappa CE(z, target) + (1 - kappa) CE(zhat, target)``.

    Shared by the teacher and the student. ``target`` may be class indices or class
    probabilities (soft labels). With per-sample ``weights`` ``w`` in [0, 1], a sample's
    certified term becomes ``w CE(zhat) + (1 - w) CE(z)`` (the student's selective loss).

    Parameters
    ----------
    logits : Tensor of shape (n, C)
        Clean logits ``z``.
    worst_logits : Tensor of shape (n, C)
        Worst-case logits ``zhat`` (:func:`worst_case_logits` of margin lower bounds).
    target : Tensor
        Labels ``(n,)`` or probabilities ``(n, C)``.
    kappa : float, default=0.0
        Weight of the clean term.
    weights : Tensor of shape (n,), optional
        Per-sample weight of the certified term.

    Returns
    -------
    Tensor
        Mean loss (scalar).
    """
    if weights is None:
        return with_clean_term(F.cross_entropy(worst_logits, target), logits, target, kappa)
    clean = F.cross_entropy(logits, target, reduction="none")
    certified = weights * F.cross_entropy(worst_logits, target, reduction="none")
    certified = certified + (1.0 - weights) * clean
    return ((1.0 - kappa) * certified + kappa * clean).mean()


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
        ``(center, radius)`` of every ReLU input (``IntervalPass.activation_bounds``).
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


def distillation_kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 KL(softmax(t / T) || softmax(s / T))``, averaged over the batch.

    The ``T^2`` factor keeps the gradient's scale independent of the temperature (Hinton et al.,
    2015).

    Parameters
    ----------
    teacher_logits, student_logits : Tensor of shape (n, C)
    temperature : float

    Returns
    -------
    Tensor
        Scalar loss.
    """
    return temperature**2 * F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )


def margin_matching(teacher_worst: Tensor, student_worst: Tensor, temperature: float) -> Tensor:
    """Huber distance between logit differences ``z_j - z_y``, scaled by ``1 / T``.

    Applied to clean logits shifted by the label's logit, it matches clean margins; applied to
    worst-case logits (``-m_j``), it matches margin bounds. Averaged over samples and classes.

    Parameters
    ----------
    teacher_worst, student_worst : Tensor of shape (n, C)
        Logit differences (0 in the label's column).
    temperature : float
        Scale of the differences (the Huber loss is quadratic below ``T`` and linear above).

    Returns
    -------
    Tensor
        Scalar loss.
    """
    return temperature * F.smooth_l1_loss(student_worst / temperature, teacher_worst / temperature)
