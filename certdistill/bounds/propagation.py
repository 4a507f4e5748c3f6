"""The state of one bound computation and the results the engine returns.

:class:`Propagation` is what a forward sweep records (centre and radius of the input, interval
and linear bounds of every activation, their relaxations) and what the backward passes read;
:class:`BoundResult`, :class:`IntervalPass` and :class:`SubdomainBounds` are the engine's results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from certdistill.bounds.ops import Relaxation

#: Largest number of elements in one backward ``A`` tensor for intermediate bounds when the
#: caller gives no memory plan (certification plans it from its ``memory_limit``, see
#: :mod:`certdistill.bounds.memory`); the neurons whose bounds are computed are split into groups
#: to stay under it.
BACKWARD_ELEMENT_BUDGET = 2**26


#: Intermediate CROWN bounds pad every sample to the batch's largest number of unstable neurons
#: unless that wastes more than this factor of the rows; then the rows are gathered per neuron.
RAGGED_WASTE = 1.5


#: Largest ``n_classes**2 * width`` for which IBP bounds every class pair of the trailing affine
#: map at once (memory independent of the batch size).
PAIRWISE_ELEMENT_BUDGET = 2**24


@dataclass
class Propagation:
    """Per-batch state of one bound computation (the forward sweep and what methods add)."""

    center: Tensor
    radius: Tensor
    input_shapes: list[torch.Size] = field(default_factory=list)
    #: Interval (lower, upper) of each activation op's input, by op index.
    ibp_bounds: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    #: Bounds used for the relaxation of each activation op's input, by op index.
    bounds: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    #: The relaxation of each activation op on its ``bounds``, by op index.
    relaxations: dict[int, Relaxation] = field(default_factory=dict)
    #: Interval of the network's input to the trailing affine part (after the last activation).
    tail_interval: tuple[Tensor, Tensor] | None = None
    #: Clean logits of the sweep.
    logits: Tensor | None = None
    #: Elements of one backward ``A`` tensor of the intermediate bounds (the group size).
    backward_elements: int = BACKWARD_ELEMENT_BUDGET

    def rows(self, samples: Tensor) -> Propagation:
        """What a backward pass needs of the given samples (repeats allowed), one batch entry
        per index."""
        return Propagation(
            center=self.center[samples],
            radius=self.radius[samples],
            input_shapes=self.input_shapes,
            relaxations={k: lines.rows(samples) for k, lines in self.relaxations.items()},
            backward_elements=self.backward_elements,
        )


@dataclass
class BoundResult:
    """Result of :meth:`BoundEngine.bound`.

    Attributes
    ----------
    logits : Tensor of shape (n, n_classes)
        Clean logits (from the same sweep as the bounds).
    reference : LongTensor of shape (n,)
        Reference class of each sample: the one given, or the clean prediction.
    margins : Tensor of shape (n, n_classes)
        Lower bounds of ``z_ref - z_j`` over the perturbation; ``+inf`` in the reference column.
    """

    logits: Tensor
    reference: Tensor
    margins: Tensor


@dataclass
class IntervalPass:
    """Result of :meth:`BoundEngine.interval_pass` (the certified-training hot path).

    Attributes
    ----------
    logits : Tensor of shape (n, n_classes)
        Clean logits.
    margins : Tensor of shape (n, n_classes)
        IBP lower bounds of ``z_ref - z_j``; ``+inf`` in the reference column.
    activation_bounds : list of (Tensor, Tensor)
        ``(center, radius)`` of each activation's input (when requested).
    input_radius : Tensor
        Radius of the input box.
    reference : LongTensor of shape (n,)
        Class whose margins are bounded.
    """

    logits: Tensor
    margins: Tensor
    activation_bounds: list[tuple[Tensor, Tensor]]
    input_radius: Tensor
    reference: Tensor
    _state: Propagation | None = field(default=None, repr=False)
    #: IBP lower and upper bounds of ``z_ref - z_j`` (0 in the reference column), kept with
    #: ``_state`` for the fused CROWN-IBP loss.
    _tail_bounds: tuple[Tensor, Tensor] | None = field(default=None, repr=False)


@dataclass
class SubdomainBounds:
    """Result of :meth:`BoundEngine.bound_subdomains` (one row per subdomain).

    Attributes
    ----------
    margins : Tensor of shape (d, n_classes)
        Lower bounds of ``z_ref - z_j`` on the subdomain; ``+inf`` for the reference and the
        margins closed before.
    bounds : dict of int to (Tensor, Tensor)
        The tightened bounds of every activation's input on the subdomain.
    relaxations : dict of int to Relaxation
        The relaxation of every activation on those bounds.
    coefficients : dict of int to Tensor
        For the worst margin of each subdomain, the coefficients of the linear bound on each
        activation's output, shape ``(d, *output_shape)``: the weight each neuron's relaxation
        has in the bound (for branching scores).
    candidate : Tensor of shape (d, *sample_shape)
        The input minimising the linear lower bound of the worst margin (a candidate
        counterexample; it may lie outside the subdomain).
    infeasible : BoolTensor of shape (d,)
        Subdomains whose bounds contradict each other somewhere (lower above upper): they
        contain no input.
    """

    margins: Tensor
    bounds: dict[int, tuple[Tensor, Tensor]]
    relaxations: dict[int, Relaxation]
    coefficients: dict[int, Tensor]
    candidate: Tensor
    infeasible: Tensor


class ZeroPerturbation:
    """The box of the clean input itself (for sweeps that only need shapes)."""

    @staticmethod
    def box(x: Tensor) -> tuple[Tensor, Tensor]:
        return x, torch.zeros_like(x)


def mask_reference(margins: Tensor, reference: Tensor) -> Tensor:
    ref_column = torch.nn.functional.one_hot(reference, margins.shape[1]).bool()
    return margins.masked_fill(ref_column, float("inf"))
