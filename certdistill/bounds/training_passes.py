"""The differentiable passes of certified training: IBP with the clean logits, and CROWN-IBP
on the same sweep, of the margins or (loss fusion) of the cross-entropy itself."""

from __future__ import annotations

import torch
from torch import Tensor

from certdistill.bounds.perturbation import Perturbation
from certdistill.bounds.propagation import (
    IntervalPass,
    mask_reference,
)


class TrainingPasses:
    """The certified-training passes (a part of
    :class:`~certdistill.bounds.engine.BoundEngine`)."""

    def interval_pass(
        self,
        x: Tensor,
        perturbation: Perturbation,
        reference: Tensor,
        *,
        record_activations: bool = False,
        keep_state: bool = False,
    ) -> IntervalPass:
        """Clean forward pass and IBP margin bounds in one training sweep.

        Each layer runs in its current mode, as the module's own forward would: BatchNorm in
        training mode normalises inputs and bounds with the clean batch statistics and updates
        its running statistics once; Dropout in training mode applies one mask to inputs and
        bounds. Differentiable with respect to the module's parameters.

        Parameters
        ----------
        x : Tensor of shape (n, ...)
            Clean inputs.
        perturbation : Perturbation
            The set around each input (the scheduled training radius).
        reference : LongTensor of shape (n,)
            Class whose margins are bounded (the label when training).
        record_activations : bool, default=False
            Keep the interval of each activation's input (for regularisers).
        keep_state : bool, default=False
            Keep what :meth:`crown_ibp_margins` needs to bound the same thinned network by
            CROWN-IBP without a second sweep.

        Returns
        -------
        IntervalPass
        """
        state = self._sweep(
            x, perturbation, record_bounds=record_activations or keep_state, training=True
        )
        recorded = []
        if record_activations:
            for index in self._activation_indices:
                lower, upper = state.ibp_bounds[index]
                recorded.append(((upper + lower) / 2, (upper - lower) / 2))
        # The fused CROWN-IBP step needs the upper margin bounds too: one tail pass for both.
        margins, upper_margins = self._tail_margin_bounds(state, reference, upper=keep_state)
        return IntervalPass(
            logits=state.logits,
            margins=mask_reference(margins, reference),
            activation_bounds=recorded,
            input_radius=state.radius,
            reference=reference,
            _state=state if keep_state else None,
            _tail_bounds=(margins, upper_margins) if keep_state else None,
        )

    def crown_ibp_margins(self, interval_pass: IntervalPass) -> Tensor:
        """CROWN-IBP margin bounds of the network of an :meth:`interval_pass`.

        The backward pass reuses that sweep's interval bounds, batch statistics and Dropout
        mask, so in training both bounds describe the same thinned network.

        Parameters
        ----------
        interval_pass : IntervalPass
            A pass run with ``keep_state=True``.

        Returns
        -------
        Tensor of shape (n, n_classes)
            Lower bounds of ``z_ref - z_j``, ``+inf`` in the reference column; differentiable.
        """
        state = interval_pass._state
        if state is None:
            raise ValueError("crown_ibp_margins needs an interval_pass run with keep_state=True.")
        return mask_reference(
            self._crown_ibp(state, interval_pass.reference), interval_pass.reference
        )

    def crown_ibp_cross_entropy(self, interval_pass: IntervalPass, mix: float = 1.0) -> Tensor:
        """Upper bound of the worst-case cross-entropy per sample by loss fusion.

        Bounds ``max CE(z(x'), ref) = max log sum_j exp(z_j - z_ref)`` over the ball as one
        function (Xu et al. 2020, "loss fusion"): each ``exp(z_j - z_ref)`` is bounded above by
        its chord over the IBP interval of ``z_j - z_ref`` (:func:`exp_chord`), so the sum is
        bounded by one linear function of the logits, and one CROWN-IBP backward row bounds it
        over the ball, where :meth:`crown_ibp_margins` propagates a row per class. The
        result ``s + log S`` (``s`` the largest IBP upper bound of ``z_j - z_ref``, a shift that
        keeps the exponentials finite) mixes the two bounds of ``S``:
        ``S = (1 - mix) S_IBP + mix S_CROWN-IBP``; ``mix = 0`` is the cross-entropy of IBP's
        worst-case logits.

        Parameters
        ----------
        interval_pass : IntervalPass
            A pass run with ``keep_state=True``.
        mix : float, default=1.0
            Weight of the CROWN-IBP bound of ``S``, in [0, 1].

        Returns
        -------
        Tensor of shape (n,)
            Upper bounds of the worst-case cross-entropy at ``interval_pass.reference``;
            differentiable.
        """
        state = interval_pass._state
        if state is None:
            raise ValueError(
                "crown_ibp_cross_entropy needs an interval_pass run with keep_state=True."
            )
        reference = interval_pass.reference.view(-1, 1)
        lower_margin, upper_margin = interval_pass._tail_bounds
        shift = (-lower_margin).amax(1, keepdim=True).detach()  # >= 0: the reference's is 0
        # t_j = z_j - z_ref - shift lies in [low, high] <= 0 (t_ref = -shift exactly).
        low, high = -upper_margin - shift, -lower_margin - shift
        ibp_sum = high.exp().sum(1)
        if mix <= 0.0:
            return shift.squeeze(1) + ibp_sum.log()
        slope, intercept = exp_chord(low, high)
        # sum_j exp(t_j) <= sum_j slope_j (z_j - z_ref) + sum_j (intercept_j - slope_j shift);
        # the reference's term is the constant exp(-shift).
        constant = (intercept - slope * shift).sum(1)
        slope = slope.scatter(1, reference, 0.0)
        coefficients = slope.scatter(1, reference, -slope.sum(1, keepdim=True))
        linear_upper = -self._crown_ibp_rows(state, -coefficients.unsqueeze(1)).squeeze(1)
        # The sum is at least its reference term exp(-shift): a larger value stays an upper bound.
        crown_sum = torch.maximum(linear_upper + constant, (-shift.squeeze(1)).exp())
        mixed = (1.0 - mix) * ibp_sum + mix * crown_sum if mix < 1.0 else crown_sum
        return shift.squeeze(1) + mixed.log()


def exp_chord(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """The chord of ``exp`` over ``[low, high]``: ``slope * t + intercept >= exp(t)`` there.

    ``exp`` is convex, so the chord lies above it between its ends. Any smaller non-negative
    slope through ``(high, exp(high))`` also lies above it there, so where the interval is too
    narrow for ``-expm1(-w) / w`` to be computed accurately the slope uses ``1 - w / 2`` of
    ``exp(high)`` (less than the chord's), which keeps the bound.

    Parameters
    ----------
    low, high : Tensor
        Ends of the intervals, ``low <= high``.

    Returns
    -------
    slope, intercept : Tensor
    """
    width = high - low
    wide = width > 1e-4
    # (exp(high) - exp(low)) / width, written so that a very low end cannot overflow.
    ratio = torch.where(wide, -torch.expm1(-width) / torch.where(wide, width, 1.0), 1.0 - width / 2)
    slope = high.exp() * ratio
    return slope, high.exp() - slope * high
