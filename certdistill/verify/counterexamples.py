"""Concrete counterexamples: inputs in the perturbation set at which the decision changes.

A sample is *falsified* only by a point of the set (the ball intersected with the domain) at
which the module itself, in eval mode and its own precision, prefers another class than the
reference; the same must hold when the point is evaluated again in float64, so that a rounding
artefact of the module's precision never counts as a counterexample.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["Judge", "inner_box", "worst_margin"]


def inner_box(x: Tensor, perturbation) -> tuple[Tensor, Tensor]:
    """Corners of the perturbation set around ``x``, rounded inwards to ``x``'s precision.

    The corners are computed in float64 and rounded towards the inside, so that a point clipped
    into them lies in the ball and the domain exactly, whatever precision it is checked in.
    """
    lower, upper = perturbation.to(dtype=torch.float64).bounds(x.double())
    lower_r, upper_r = lower.to(x.dtype), upper.to(x.dtype)
    lower_r = torch.where(
        lower_r.double() < lower,
        torch.nextafter(lower_r, torch.full_like(lower_r, float("inf"))),
        lower_r,
    )
    upper_r = torch.where(
        upper_r.double() > upper,
        torch.nextafter(upper_r, torch.full_like(upper_r, float("-inf"))),
        upper_r,
    )
    return lower_r, upper_r


def worst_margin(logits: Tensor, reference: Tensor) -> Tensor:
    """Per row ``z_ref - max_{j != ref} z_j`` (negative: another class wins strictly)."""
    reference_logit = logits.gather(1, reference[:, None]).squeeze(1)
    others = logits.scatter(1, reference[:, None], float("-inf"))
    return reference_logit - others.max(1).values


class Judge:
    """Checks candidate counterexamples against a module (kept in eval mode by the caller).

    Parameters
    ----------
    module : torch.nn.Module
        The network, in the precision it is deployed in.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self._float64: nn.Module | None = None

    def _reference_copy(self) -> nn.Module:
        if self._float64 is None:
            self._float64 = copy.deepcopy(self.module).double().eval()
        return self._float64

    def flips(
        self, points: Tensor, reference: Tensor, lower: Tensor, upper: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Which points flip the decision; the points clipped into ``[lower, upper]``.

        Parameters
        ----------
        points : Tensor of shape (n, *sample_shape)
            Candidates (clipped into the set first: attacks and bounds may step out by rounding).
        reference : LongTensor of shape (n,)
            Class each point must not lose.
        lower, upper : Tensor of shape (n, *sample_shape)
            Corners of each candidate's perturbation set (from :func:`inner_box`).

        Returns
        -------
        flipped : BoolTensor of shape (n,)
            True where another class beats the reference strictly, in the module's precision and
            again in float64.
        points : Tensor
            The clipped candidates.
        """
        points = torch.minimum(torch.maximum(points.detach(), lower), upper)
        with torch.no_grad():
            flipped = worst_margin(self.module(points), reference) < 0
            if bool(flipped.any()):
                rows = flipped.nonzero().squeeze(1)
                again = (
                    worst_margin(self._reference_copy()(points[rows].double()), reference[rows]) < 0
                )
                flipped[rows] = again
        return flipped, points
