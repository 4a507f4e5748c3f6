"""The differentiable passes of certified training: IBP with the clean logits, and CROWN-IBP
on the same sweep."""

from __future__ import annotations

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
        state = self._sweep(x, perturbation, record_bounds=record_activations or keep_state,
                            training=True)
        recorded = []
        if record_activations:
            for index in self._activation_indices:
                lower, upper = state.ibp_bounds[index]
                recorded.append(((upper + lower) / 2, (upper - lower) / 2))
        margins = self._tail_margins(state, reference)
        return IntervalPass(
            logits=state.logits, margins=mask_reference(margins, reference),
            activation_bounds=recorded, input_radius=state.radius, reference=reference,
            _state=state if keep_state else None,
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
        return mask_reference(self._crown_ibp(state, interval_pass.reference),
                               interval_pass.reference)
