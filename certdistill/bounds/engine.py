"""The bound engine: walks a graph of bound operations to bound specification margins.

The graph (:mod:`certdistill.bounds.graph`) lists the operations in topological order with the
nodes each reads; a ``Sequential`` is the chain case. Forward sweeps run the nodes in order;
backward passes run them in reverse and sum the linear functions ``A`` of a node read by several
others (the skip connection of a residual block) before passing them on.

Methods (DESIGN.md section 3), one entry each in :data:`METHOD_TABLE`:

* ``ibp``: interval bounds through every layer; the margin specification is folded into the
  affine layers after the last activation (exact composition), then concretised on the interval.
* ``crown-ibp``: pre-activation bounds by IBP, the specification by backward linear relaxation.
* ``crown``: pre-activation bounds also by backward relaxation (intersected with the IBP ones,
  which is sound and never looser), the specification by backward relaxation.
* ``alpha-crown``: ``crown`` followed by projected gradient ascent on the lower slopes of the
  specification's backward pass, keeping the best bound seen per margin.

Every bound computation starts with one forward sweep that runs the clean input and the interval
bounds through the network together (the clean logits give the reference class when none is
given), then applies the method to the recorded state.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from certdistill.bounds.graph import INPUT, build_graph
from certdistill.bounds.memory import MemoryPlan, plan_memory
from certdistill.bounds.ops import BoundOp, Relaxation, needs_graph, numel
from certdistill.bounds.patches import (
    PatchGeometry,
    concretize_patches,
    identity_patches,
    in_map_mask,
)
from certdistill.bounds.perturbation import Perturbation
from certdistill.bounds.specification import margin_specification

__all__ = [
    "METHODS",
    "METHOD_TABLE",
    "BoundEngine",
    "BoundMethod",
    "BoundResult",
    "IntervalPass",
    "SubdomainBounds",
    "check_method",
    "engine_for",
    "margin_lower_bounds",
]

#: Largest number of elements in one backward ``A`` tensor for intermediate bounds when the
#: caller gives no memory plan (certification plans it from its ``memory_limit``, see
#: :mod:`certdistill.bounds.memory`); the neurons whose bounds are computed are split into groups
#: to stay under it.
_BACKWARD_ELEMENT_BUDGET = 2**26

#: Intermediate CROWN bounds pad every sample to the batch's largest number of unstable neurons
#: unless that wastes more than this factor of the rows; then the rows are gathered per neuron.
_RAGGED_WASTE = 1.5

#: Largest ``n_classes**2 * width`` for which IBP bounds every class pair of the trailing affine
#: map at once (memory independent of the batch size).
_PAIRWISE_ELEMENT_BUDGET = 2**24


@dataclass
class _Propagation:
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
    backward_elements: int = _BACKWARD_ELEMENT_BUDGET

    def rows(self, samples: Tensor) -> _Propagation:
        """What a backward pass needs of the given samples (repeats allowed), one batch entry
        per index."""
        return _Propagation(
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
    _state: _Propagation | None = field(default=None, repr=False)


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


@dataclass(frozen=True)
class BoundMethod:
    """One bound method of the engine: what it runs and what it needs.

    Attributes
    ----------
    name : str
        Public name (``method=`` everywhere).
    run : callable
        ``run(engine, state, reference, **options) -> margins`` on the state of the forward sweep.
    activation_bounds : bool
        The method needs the interval bounds of every activation's input from the sweep.
    trainable : bool
        Cheap and differentiable enough to be a certified-training loss.
    lirpa_name : str
        The same method's name in auto_LiRPA (the optional backend).
    summary : str
        One line for documentation and help texts.
    """

    name: str
    run: Callable[..., Tensor]
    activation_bounds: bool
    trainable: bool
    lirpa_name: str
    summary: str


def check_method(method: str | Sequence[str]) -> tuple[str, ...]:
    """Validate a bound method name, or a sequence of them tried in order.

    Parameters
    ----------
    method : str or sequence of str
        One of :data:`METHODS`, or a non-empty sequence of distinct ones.

    Returns
    -------
    tuple of str
        The methods, in order.

    Raises
    ------
    ValueError
        For an unknown name, an empty sequence or a repeated method.
    """
    methods = (method,) if isinstance(method, str) else tuple(method)
    if not methods:
        raise ValueError(f"method must name at least one bound method of {METHODS}.")
    for name in methods:
        if name not in METHOD_TABLE:
            raise ValueError(f"Unknown bound method {name!r}; choose one of {METHODS}.")
    if len(set(methods)) != len(methods):
        raise ValueError(f"method names a bound method twice: {methods!r}.")
    return methods


def _method(name: str) -> BoundMethod:
    try:
        return METHOD_TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown bound method {name!r}; choose one of {METHODS}.") from None


class BoundEngine:
    """Bound propagation over a network of supported layers.

    Parameters
    ----------
    module : torch.nn.Module
        The network: an ``nn.Sequential``, a :class:`~certdistill.bounds.layers.GraphNetwork`
        or a ``torch.fx``-traceable module with skip connections (see
        :func:`~certdistill.bounds.graph.build_graph`). Its parameters are read at every call
        (no copy), so bounds stay differentiable with respect to them and follow training
        updates; its structure is read once (build a new engine, or use :func:`engine_for`,
        after replacing layers).
    conv_mode : {"auto", "patches", "matrix"}, default="auto"
        How CROWN computes pre-activation bounds of convolutional feature maps: with sparse
        patches over each neuron's receptive field, or with dense backward matrices restricted
        to unstable neurons. Both give the same bounds up to floating-point rounding. ``"auto"``
        uses patches where receptive fields are small against the input map (large images),
        where they are much faster.

    Raises
    ------
    UnsupportedLayerError
        If the module contains a layer the engine cannot handle.
    """

    def __init__(self, module: nn.Module, conv_mode: str = "auto"):
        if conv_mode not in ("auto", "patches", "matrix"):
            raise ValueError(
                f"conv_mode must be 'auto', 'patches' or 'matrix', got {conv_mode!r}."
            )
        self.module = module
        self.conv_mode = conv_mode
        self.graph = build_graph(module)
        self.ops: list[BoundOp] = self.graph.ops
        #: The nodes each operation reads (``-1``: the network input), in topological order.
        self.inputs: list[tuple[int, ...]] = self.graph.inputs
        self._is_chain = self.graph.is_chain
        self._activation_indices = [i for i, op in enumerate(self.ops) if op.is_activation]
        last_activation = self._activation_indices[-1] if self._activation_indices else -1
        # The trailing affine part: after the last activation, entered through one node only.
        self._tail_start = next(k for k in range(last_activation + 1, len(self.ops) + 1)
                                if self._single_entry(k, len(self.ops)))
        self._last_use = {INPUT: 0}
        readers: dict[int, int] = {}
        for index, reads in enumerate(self.inputs):
            for j in reads:
                self._last_use[j] = index
                readers[j] = readers.get(j, 0) + 1
        #: Nodes read by one operation only, once: that reader may overwrite their outputs.
        self._single_reader = {j for j, count in readers.items() if count == 1}
        self._exact_interval = {index: self._interval_exact_up_to(index)
                                for index in self._activation_indices}
        self._shape_cache: dict[tuple[int, ...], list[torch.Size]] = {}

    # ------------------------------------------------------------------ public
    def bound(
        self,
        x: Tensor,
        perturbation: Perturbation,
        reference: Tensor | None = None,
        *,
        method: str = "ibp",
        alpha_steps: int = 20,
        alpha_lr: float = 0.1,
        backward_elements: int | None = None,
    ) -> BoundResult:
        """Clean logits and margin lower bounds over the perturbation, from one sweep.

        The module runs in its current mode (certification puts it in eval mode); in training
        mode BatchNorm normalises with the statistics of the clean batch ``x`` (its running
        statistics are not updated) and Dropout is the identity.

        Parameters
        ----------
        x : Tensor of shape (n, ...)
            Clean inputs.
        perturbation : Perturbation
            The set around each input.
        reference : LongTensor of shape (n,), optional
            Reference class of each sample; by default the clean prediction of the same sweep.
        method : {"ibp", "crown-ibp", "crown", "alpha-crown"}, default="ibp"
        alpha_steps : int, default=20
            Steps of the slope optimisation of ``alpha-crown``.
        alpha_lr : float, default=0.1
            Adam learning rate of the slope optimisation of ``alpha-crown``.
        backward_elements : int, optional
            Elements of one coefficient tensor of CROWN's pre-activation backward passes (their
            neurons are grouped to stay under it); by default ``2**26``. A
            :meth:`memory_plan` gives it for a memory budget.

        Returns
        -------
        BoundResult
        """
        bound_method = _method(method)
        state = self._sweep(x, perturbation, record_bounds=bound_method.activation_bounds)
        if backward_elements is not None:
            state.backward_elements = int(backward_elements)
        if reference is None:
            reference = state.logits.argmax(1)
        margins = bound_method.run(self, state, reference, alpha_steps=alpha_steps,
                                   alpha_lr=alpha_lr)
        return BoundResult(state.logits, reference, _mask_reference(margins, reference))

    def margin_lower_bounds(
        self,
        x: Tensor,
        perturbation: Perturbation,
        reference: Tensor,
        *,
        method: str = "ibp",
        **options,
    ) -> Tensor:
        """Lower bounds of ``z_ref - z_j`` over the perturbation (:meth:`bound`'s margins).

        Returns
        -------
        Tensor of shape (n, n_classes)
            Margin lower bounds, ``+inf`` in the reference column.
        """
        return self.bound(x, perturbation, reference, method=method, **options).margins

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
            logits=state.logits, margins=_mask_reference(margins, reference),
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
        return _mask_reference(self._crown_ibp(state, interval_pass.reference),
                               interval_pass.reference)

    def memory_plan(self, x: Tensor, method: str, *, memory_limit: int,
                    max_samples: int) -> MemoryPlan:
        """How many samples of ``x``'s shape, and backward rows, :meth:`bound` may take at once
        within ``memory_limit`` bytes (see :func:`~certdistill.bounds.memory.plan_memory`).

        Parameters
        ----------
        x : Tensor of shape (n, ...)
            Samples (only their shape and dtype are used).
        method : str
            Bound method.
        memory_limit : int
            Bytes.
        max_samples : int
            Samples at most.

        Returns
        -------
        MemoryPlan
            Pass its ``samples`` rows at a time to :meth:`bound`, with
            ``backward_elements=plan.backward_elements``.
        """
        _method(method)
        return plan_memory(self._input_shapes(x), self._activation_indices, method,
                           memory_limit=memory_limit, itemsize=x.element_size(),
                           max_samples=max_samples, device=x.device)

    def activation_interval_bounds(
        self, x: Tensor, perturbation: Perturbation
    ) -> list[tuple[Tensor, Tensor]]:
        """IBP bounds ``(lower, upper)`` of each activation's input, in network order.

        Used for diagnostics (unstable neurons) and by the regularisers of Shi et al. (2021).
        """
        state = self._sweep(x, perturbation, record_bounds=True)
        return [state.ibp_bounds[index] for index in self._activation_indices]

    def affine_segments(self, sample_shape) -> list[tuple[Tensor, Tensor]]:
        """Dense ``(W, b)`` of the affine maps between the activations, in network order.

        The first maps the flattened input to the first activation's input, each next one an
        activation's output to the next activation's input, the last one the last activation's
        output to the logits; the network is ``W_L act(... act(W_1 x + b_1) ...) + b_L``. With
        skip connections (:attr:`segments_are_wide`) map ``k`` reads the flattened input and the
        outputs of activations ``0 .. k - 1``, concatenated in that order. The module should be
        in eval mode (BatchNorm's running statistics, no Dropout).

        Parameters
        ----------
        sample_shape : tuple of int
            Shape of one input sample.

        Returns
        -------
        list of (Tensor, Tensor)
            ``W`` of shape ``(out_features, in_features)`` and ``b`` of shape ``(out_features,)``
            in the module's dtype.
        """
        dtype = next((p.dtype for p in self.module.parameters()), torch.float32)
        device = next((p.device for p in self.module.parameters()), torch.device("cpu"))
        probe = torch.zeros(1, *sample_shape, dtype=dtype, device=device)
        state = self._sweep(probe, _ZeroPerturbation, record_bounds=False)
        if self.segments_are_wide:
            return self._wide_segments(state, dtype, device)
        ends = [*self._activation_indices, len(self.ops)]
        starts = [0, *(index + 1 for index in self._activation_indices)]
        segments = []
        for start, end in zip(starts, ends, strict=True):
            shape = state.logits.shape[1:] if end == len(self.ops) else state.input_shapes[end]
            width = numel(shape)
            rows = torch.eye(width, dtype=dtype, device=device).view(1, width, *shape)
            A, bias = self._backward(rows, state, end=end, start=start)
            segments.append((A.reshape(width, -1), bias.reshape(width)))
        return segments

    @property
    def segments_are_wide(self) -> bool:
        """True when :meth:`affine_segments` are wide: with skip connections, each map reads the
        flattened input followed by the outputs of every earlier activation."""
        return not self._is_chain

    def _wide_segments(self, state: _Propagation, dtype, device) -> list[tuple[Tensor, Tensor]]:
        activations = self._activation_indices
        targets = [(self._source(a), state.input_shapes[a]) for a in activations]
        targets.append((len(self.ops) - 1, state.logits.shape[1:]))
        segments = []
        for k, (node, shape) in enumerate(targets):
            width = numel(shape)
            rows = torch.eye(width, dtype=dtype, device=device).view(1, width, *shape)
            reached: dict[int, Tensor] = {}
            A, bias = self._backward(rows, state, end=node + 1, leaves=reached)
            blocks = [A.reshape(width, -1)]
            for earlier in activations[:k]:
                size = numel(state.input_shapes[earlier])
                block = reached.get(earlier)
                blocks.append(block.reshape(width, size) if block is not None
                              else A.new_zeros(width, size))
            segments.append((torch.cat(blocks, dim=1), bias.reshape(width)))
        return segments

    def bound_subdomains(
        self,
        center: Tensor,
        radius: Tensor,
        bounds: dict[int, tuple[Tensor, Tensor]],
        reference: Tensor,
        *,
        closed: Tensor | None = None,
    ) -> SubdomainBounds:
        """CROWN margin bounds of subdomains given by bounds on every activation's input.

        Each subdomain ``d`` is the part of the box ``center[d] +- radius[d]`` on which every
        activation input lies within ``bounds`` (branch and bound fixes a ReLU's phase by
        setting its lower bound or its upper bound to 0). The intermediate bounds are tightened
        by CROWN under those constraints, then the margins are bounded; everything is valid on
        the subdomain (not on the whole box). The module should be in eval mode.

        Parameters
        ----------
        center, radius : Tensor of shape (d, *sample_shape)
            The input box of each subdomain.
        bounds : dict of int to (Tensor, Tensor)
            Activation op index -> ``(lower, upper)`` of shape ``(d, *input_shape)``, valid on the
            subdomain (e.g. its parent's, with the new split applied).
        reference : LongTensor of shape (d,)
            Reference class of each subdomain's sample.
        closed : BoolTensor of shape (d, n_classes), optional
            Margins already proven for the subdomain (reported as ``+inf`` without bounding).

        Returns
        -------
        SubdomainBounds
        """
        shapes = self._input_shapes(center)
        state = _Propagation(center=center, radius=radius, input_shapes=shapes,
                             ibp_bounds=dict(bounds))
        self._crown_intermediate_bounds(state)
        spec = margin_specification(reference, self._n_classes(center), dtype=center.dtype)
        record: dict[int, Tensor] = {}
        A, bias = self._backward(spec, state, end=len(self.ops), record=record)
        margins = self._concretize(A, bias, center, radius, overwrite=True)
        margins = _mask_reference(margins, reference)
        if closed is not None:
            margins = margins.masked_fill(closed, float("inf"))
        worst = margins.argmin(1)
        rows = torch.arange(center.shape[0], device=center.device)
        # The input minimising the linear lower bound of the worst margin: a candidate point.
        sign = torch.sign(A[rows, worst])
        candidate = center - radius * sign
        infeasible = torch.zeros(center.shape[0], dtype=torch.bool, device=center.device)
        for lower, upper in state.bounds.values():
            infeasible |= (lower > upper).flatten(1).any(1)
        return SubdomainBounds(
            margins=margins, bounds=state.bounds, relaxations=state.relaxations,
            coefficients={k: a[rows, worst] for k, a in record.items()},
            candidate=candidate, infeasible=infeasible,
        )

    def bound_split_subdomains(
        self,
        center: Tensor,
        radius: Tensor,
        bounds: dict[int, tuple[Tensor, Tensor]],
        splits: dict[int, Tensor],
        reference: Tensor,
        *,
        closed: Tensor | None = None,
        steps: int = 20,
        alpha_lr: float = 0.1,
        beta_lr: float = 0.05,
    ) -> SubdomainBounds:
        """Margin bounds of subdomains defined by ReLU splits, by beta-CROWN.

        Unlike :meth:`bound_subdomains` the intermediate bounds are not tightened: ``bounds``
        (valid on the subdomain, with every split ReLU's bound set to 0 on its side) give the
        relaxations, and the split constraints ``sign * z >= 0`` enter the final bound through
        Lagrangian terms ``-beta * sign * z`` (Wang et al. 2021). The lower slopes (alpha) and the
        multipliers (beta >= 0) are optimised by projected Adam for ``steps`` steps; every
        ``alpha`` in ``[0, 1]`` and ``beta >= 0`` gives a sound bound, so the best bound seen per
        margin is kept.

        Parameters
        ----------
        center, radius : Tensor of shape (d, *sample_shape)
            The input box of each subdomain.
        bounds : dict of int to (Tensor, Tensor)
            Activation op index -> ``(lower, upper)`` of shape ``(d, *input_shape)``.
        splits : dict of int to Tensor
            Activation op index -> sign of each neuron's split, shape ``(d, *input_shape)``:
            ``+1`` for ``z >= 0``, ``-1`` for ``z <= 0``, ``0`` if not split.
        reference : LongTensor of shape (d,)
            Reference class of each subdomain's sample.
        closed : BoolTensor of shape (d, n_classes), optional
            Margins already proven (not optimised, reported as ``+inf``).
        steps : int, default=20
            Optimisation steps (0: plain CROWN on the given bounds).
        alpha_lr, beta_lr : float
            Adam learning rates of the slopes and of the multipliers.

        Returns
        -------
        SubdomainBounds
            ``bounds`` are the given ones; ``infeasible`` is all False (infeasible subdomains get
            large bounds from beta instead).
        """
        shapes = self._input_shapes(center)
        state = _Propagation(center=center.detach(), radius=radius.detach(), input_shapes=shapes)
        for index, (lower, upper) in bounds.items():
            self._set_bounds(state, index, lower.detach(), upper.detach())
        n_classes = self._n_classes(center)
        done = torch.nn.functional.one_hot(reference, n_classes).bool()
        if closed is not None:
            done = done | closed
        # Bound only the open margins: per subdomain its open classes, worst first, padded by
        # repeating the first one (a repeated row is bounded twice, harmlessly).
        n_open = int((~done).sum(1).max()) if center.shape[0] else 0
        n_open = max(n_open, 1)
        order = torch.argsort(done.to(torch.int8), dim=1, stable=True)[:, :n_open]
        valid = ~done.gather(1, order)
        classes = torch.where(valid, order, order[:, :1])
        ignore = ~valid
        eye = torch.eye(n_classes, dtype=center.dtype, device=center.device)
        spec = eye[reference].unsqueeze(1) - eye[classes]
        alphas, betas = {}, {}
        for index in self._activation_indices:
            lower, upper = state.bounds[index]
            start = self.ops[index].initial_lower_slope(lower, upper)
            alphas[index] = start.unsqueeze(1).expand(-1, n_open, *start.shape[1:]).clone()
            sign = splits[index].to(center.dtype)
            betas[index] = (torch.zeros_like(alphas[index]), sign)
        best = torch.full(spec.shape[:2], float("-inf"), dtype=center.dtype,
                          device=center.device)
        parameters = [*alphas.values(), *(beta for beta, _ in betas.values())]
        optimizer = torch.optim.Adam([
            {"params": list(alphas.values()), "lr": alpha_lr},
            {"params": [beta for beta, _ in betas.values()], "lr": beta_lr},
        ])
        for parameter in parameters:
            parameter.requires_grad_(steps > 0)
        with torch.enable_grad():
            for step in range(steps + 1):
                record: dict[int, Tensor] | None = {} if step == steps else None
                A, bias = self._backward(spec, state, end=len(self.ops), alphas=alphas,
                                         betas=betas, record=record)
                margins = self._concretize(A, bias, state.center, state.radius)
                best = torch.maximum(best, margins.detach())
                if step == steps:
                    break
                optimizer.zero_grad(set_to_none=True)
                (-margins.masked_fill(ignore, 0.0).sum()).backward(inputs=parameters)
                optimizer.step()
                with torch.no_grad():
                    for alpha in alphas.values():
                        alpha.clamp_(0.0, 1.0)
                    for beta, _ in betas.values():
                        beta.clamp_(min=0.0)
        selected = best.masked_fill(ignore, float("inf"))
        worst = selected.argmin(1)
        rows = torch.arange(center.shape[0], device=center.device)
        candidate = state.center - state.radius * torch.sign(A.detach()[rows, worst])
        # Each open class gets the largest of its bounds. A padding row repeats the first open
        # class: its own (sound) bound must not replace that class's, and scatter_ would keep
        # an arbitrary one of the duplicates (the padding's +inf of ``selected``, unsoundly).
        margins = torch.full((center.shape[0], n_classes), float("-inf"), dtype=center.dtype,
                             device=center.device)
        margins = margins.scatter_reduce(1, classes, best, reduce="amax")
        margins = margins.masked_fill(done, float("inf"))
        return SubdomainBounds(
            margins=margins, bounds=state.bounds, relaxations=state.relaxations,
            coefficients={k: a.detach()[rows, worst] for k, a in record.items()},
            candidate=candidate,
            infeasible=torch.zeros(center.shape[0], dtype=torch.bool, device=center.device),
        )

    def _input_shapes(self, x: Tensor) -> list[torch.Size]:
        """Input shape of every op for samples shaped like ``x``'s (cached)."""
        key = tuple(x.shape[1:])
        shapes = self._shape_cache.get(key)
        if shapes is None:
            probe = x[:1].detach()
            state = self._sweep(probe, _ZeroPerturbation, record_bounds=False)
            shapes = [*state.input_shapes, state.logits.shape[1:]]
            self._shape_cache[key] = shapes
        return shapes

    def _n_classes(self, x: Tensor) -> int:
        return int(self._input_shapes(x)[-1][0])

    # --------------------------------------------------------------- passes
    def _sweep(
        self, x: Tensor, perturbation: Perturbation, *, record_bounds: bool,
        training: bool = False,
    ) -> _Propagation:
        """The clean forward and the interval bounds up to the last activation, in one pass."""
        center, radius = perturbation.box(x)
        state = _Propagation(center=center, radius=radius)
        values: dict[int, tuple] = {INPUT: (x, center, radius)}
        fresh = {INPUT: False}  # the input is the caller's
        for index, op in enumerate(self.ops):
            reads = self.inputs[index]
            x, center, radius = values[reads[0]]
            state.input_shapes.append(x.shape[1:])
            if index == self._tail_start:
                state.tail_interval = (center, radius)
            if index >= self._tail_start:
                # After the last activation the specification is folded into the exact affine
                # map (IBP) or bounded by a backward pass: no interval is needed there.
                if op.arity == 1:
                    out = (op.forward(x, update_running_stats=training), None, None)
                else:
                    out = (op.forward_many([values[j][0] for j in reads]), None, None)
            elif op.arity == 1:
                if record_bounds and op.is_activation:
                    state.ibp_bounds[index] = (center - radius, center + radius)
                owned = fresh[reads[0]] and reads[0] in self._single_reader
                out = op.propagate(x, center, radius, training, owned=owned)
            else:
                parts = [values[j] for j in reads]
                out = (op.forward_many([p[0] for p in parts]),
                       *op.interval_many([p[1] for p in parts], [p[2] for p in parts]))
            values[index] = out
            fresh[index] = op.fresh_outputs and index < self._tail_start
            for j in set(reads):
                if self._last_use[j] == index:
                    del values[j]
        last = values[len(self.ops) - 1]
        if state.tail_interval is None:  # the network ends with an activation
            state.tail_interval = (last[1], last[2])
        state.logits = last[0]
        return state

    # --------------------------------------------------------------- passes
    def _backward(
        self,
        A: Tensor,
        state: _Propagation,
        end: int,
        start: int = 0,
        alphas: dict[int, Tensor] | None = None,
        record: dict[int, Tensor] | None = None,
        betas: dict[int, tuple[Tensor, Tensor]] | None = None,
        leaves: dict[int, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Propagate ``A`` from the output of node ``end - 1`` back to the input of node
        ``start`` (the output of node ``start - 1``, or the network input), which must be the
        only way into the nodes ``start .. end - 1`` (see :meth:`_single_entry`).

        With ``record``, the coefficients reaching each activation's output are kept in it.
        ``betas`` maps an activation op index to ``(beta, sign)``: the Lagrangian term
        ``-beta * sign * z`` of the split constraints ``sign * z >= 0`` on that activation's input
        ``z`` is added where the pass reaches it (beta-CROWN). With ``leaves`` (a dict to fill),
        the pass stops at activations: the coefficients on each activation's output are stored
        there instead of being propagated through it.
        """
        bias = A.new_zeros(A.shape[:2])
        if end <= start:
            return A, bias
        pending: dict[int, Tensor] = {end - 1: A}
        rows = A.shape[:2]
        entered = None
        for index in range(end - 1, start - 1, -1):
            A = pending.pop(index, None)
            if A is None:
                continue
            op = self.ops[index]
            if leaves is not None and op.is_activation:
                leaves[index] = A
                continue
            if record is not None and op.is_activation:
                record[index] = A
            if op.arity == 1:
                alpha = alphas.get(index) if alphas else None
                A, bias_term = op.backward(
                    A, state.input_shapes[index], state.relaxations.get(index), alpha
                )
                if betas is not None and index in betas:
                    beta, sign = betas[index]
                    A = A - beta * sign.unsqueeze(1)
                passed = ((self.inputs[index][0], A),)
            else:
                coefficients, bias_term = op.backward_many(A, state.input_shapes[index])
                passed = tuple(zip(self.inputs[index], coefficients, strict=True))
            if bias_term is not None:
                bias = bias + bias_term
            for node, coefficient in passed:
                if node < start:
                    entered = coefficient if entered is None else entered + coefficient
                elif node in pending:
                    pending[node] = pending[node] + coefficient
                else:
                    pending[node] = coefficient
        if entered is None:  # every path stopped at a leaf
            entered = bias.new_zeros(rows + state.input_shapes[start])
        return entered, bias

    def _single_entry(self, start: int, end: int) -> bool:
        """Nodes ``start .. end - 1`` read only each other and node ``start - 1`` (or the input
        for ``start == 0``): a backward pass over them ends on that one node."""
        return all(j >= start - 1 for node in self.inputs[start:end] for j in node)

    def _backward_both_signs(
        self, A: Tensor, state: _Propagation, end: int
    ) -> tuple[Tensor, Tensor]:
        """Backward pass of ``[A; -A]`` (lower and upper bounds) to the input.

        The affine layers between ``end`` and the previous activation map ``A`` and ``-A`` to
        exact negatives of each other, so they are propagated once and split afterwards.
        """
        previous = [i for i in self._activation_indices if i < end]
        split = previous[-1] + 1 if previous else 0
        if not self._single_entry(split, end):
            # Skip connections cross the activation: no shared affine stretch to reuse.
            return self._backward(torch.cat([A, -A], dim=1), state, end=end)
        A, bias = self._backward(A, state, end=end, start=split)
        A, bias = torch.cat([A, -A], dim=1), torch.cat([bias, -bias], dim=1)
        if split == 0:
            return A, bias
        A, more_bias = self._backward(A, state, end=split)
        return A, bias + more_bias

    @staticmethod
    def _concretize(A: Tensor, bias: Tensor, center: Tensor, radius: Tensor, *,
                    overwrite: bool = False) -> Tensor:
        """Minimum of ``A @ h + bias`` over the box ``center +- radius``.

        With ``overwrite`` (the caller's ``A`` is its own and not used again) and no autograd
        graph, ``|A|`` is taken in place: ``A`` reaching the input is the largest tensor of a
        backward pass.
        """
        A_flat = A.flatten(2)
        at_center = torch.einsum("nsd,nd->ns", A_flat, center.flatten(1))
        magnitude = (A_flat.abs_() if overwrite and not needs_graph(A_flat)
                     else A_flat.abs())
        return at_center - torch.einsum("nsd,nd->ns", magnitude, radius.flatten(1)) + bias

    def _final_backward(
        self, state: _Propagation, spec: Tensor, alphas: dict[int, Tensor] | None = None
    ) -> Tensor:
        A, bias = self._backward(spec, state, end=len(self.ops), alphas=alphas)
        return self._concretize(A, bias, state.center, state.radius, overwrite=True)

    # -------------------------------------------------------- intermediate
    def _interval_is_exact(self, index: int) -> bool:
        return self._exact_interval[index]

    def _interval_exact_up_to(self, index: int) -> bool:
        # Interval arithmetic is exact through one feature-mixing layer followed by
        # element-wise affine ones, so CROWN would return the same bounds. A merge of branches
        # (counted as mixing) loses their correlation.
        ancestors, stack = set(), list(self.inputs[index])
        while stack:
            node = stack.pop()
            if node >= 0 and node not in ancestors:
                ancestors.add(node)
                stack.extend(self.inputs[node])
        return sum(self.ops[node].mixes_features for node in ancestors) <= 1

    def _source(self, index: int) -> int:
        """The node whose output is op ``index``'s (first) input."""
        return self.inputs[index][0]

    def _set_bounds(self, state: _Propagation, index: int, lower: Tensor, upper: Tensor) -> None:
        state.bounds[index] = (lower, upper)
        state.relaxations[index] = self.ops[index].relax(lower, upper)

    def _crown_intermediate_bounds(self, state: _Propagation) -> None:
        for index in self._activation_indices:
            ibp_lower, ibp_upper = state.ibp_bounds[index]
            if self._interval_is_exact(index):
                self._set_bounds(state, index, ibp_lower, ibp_upper)
                continue
            unstable = self.ops[index].unstable(ibp_lower, ibp_upper)
            compute = (
                self._patch_bounds_of_node
                if self._patches_apply(state, index, unstable)
                else self._crown_bounds_of_node
            )
            self._set_bounds(state, index, *compute(state, index, ibp_lower, ibp_upper, unstable))

    def _patches_apply(self, state: _Propagation, index: int, unstable: Tensor) -> bool:
        if not (
            self.conv_mode != "matrix"
            and self._is_chain
            and all(len(shape) == 3 for shape in state.input_shapes[: index + 1])
            and all(op.supports_patches for op in self.ops[:index])
        ):
            return False
        if self.conv_mode == "patches":
            return True
        # Patches bound every neuron of the map over its receptive field; dense rows bound only
        # the unstable neurons, over whole maps. Pick the one that touches fewer elements.
        n = state.center.shape[0]
        geometry, patch_elements, dense_elements = PatchGeometry(), 0, 0
        for op_index in range(index - 1, -1, -1):
            geometry = self.ops[op_index].patch_geometry(geometry)
            channels = state.input_shapes[op_index][0]
            patch_elements += channels * geometry.kernel[0] * geometry.kernel[1]
            dense_elements += numel(state.input_shapes[op_index])
        # The count is read on the host only here (a device synchronisation on GPUs).
        n_unstable = int(unstable.sum())
        return n * numel(state.input_shapes[index]) * patch_elements < n_unstable * dense_elements

    def _patch_bounds_of_node(
        self, state: _Propagation, index: int, ibp_lower: Tensor, ibp_upper: Tensor, _=None
    ) -> tuple[Tensor, Tensor]:
        """CROWN bounds of a feature map, propagated as patches, intersected with IBP's."""
        n, channels = ibp_lower.shape[:2]
        dtype, device = ibp_lower.dtype, ibp_lower.device
        lowers, uppers = [], []
        group, first = 1, 0
        while first < channels:
            selected = torch.arange(first, min(channels, first + group), device=device)
            coeffs = identity_patches(ibp_lower.shape[1:], selected, dtype, device)
            geometry, bias, peak = PatchGeometry(), 0.0, 0
            for op_index in range(index - 1, -1, -1):
                coeffs, geometry, bias_term = self.ops[op_index].backward_patches(
                    coeffs, geometry, state.relaxations.get(op_index)
                )
                # Window positions outside the map stand for zero padding: drop them.
                coeffs = coeffs * in_map_mask(state.input_shapes[op_index], geometry, dtype,
                                              device)
                if bias_term is not None:
                    bias = bias + bias_term
                peak = max(peak, coeffs[0, :2].numel())
            bound = concretize_patches(coeffs, bias, state.center, state.radius, geometry)
            k = len(selected)
            lowers.append(bound[:, :k])
            uppers.append(-bound[:, k:])
            first += k
            group = max(1, state.backward_elements // max(1, n * peak))
        shape = ibp_lower.shape
        crown_lower = torch.cat(lowers, dim=1).view(shape)
        crown_upper = torch.cat(uppers, dim=1).view(shape)
        return torch.maximum(ibp_lower, crown_lower), torch.minimum(ibp_upper, crown_upper)

    def _crown_bounds_of_node(
        self, state: _Propagation, index: int, ibp_lower: Tensor, ibp_upper: Tensor,
        unstable: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """CROWN bounds of the input of op ``index``, intersected with its interval bounds.

        Only neurons that interval bounds leave unstable are computed: a stable neuron's
        relaxation is exact whatever its bounds, so tighter numbers would not change anything.
        When the samples of the batch have similar numbers of unstable neurons, each sample
        propagates as many rows as the most unstable one (padding with stable neurons is
        harmless: any CROWN bound is sound); when the numbers differ widely, the unstable
        (sample, neuron) pairs form one ragged list of rows, each a batch entry of its own.
        """
        n, shape = ibp_lower.shape[0], ibp_lower.shape[1:]
        width = numel(shape)
        lower_flat, upper_flat = ibp_lower.flatten(1).clone(), ibp_upper.flatten(1).clone()
        unstable = unstable.flatten(1)
        counts = unstable.sum(1)
        # One host read for both (the shapes below depend on them).
        total, most = torch.stack([counts.sum(), counts.max()]).tolist() if n else (0, 0)
        if total == 0:
            return ibp_lower, ibp_upper
        largest = max(numel(s) for s in state.input_shapes[: index + 1])
        if n * most <= _RAGGED_WASTE * total:
            # Per sample, the indices of its unstable neurons first.
            order = torch.argsort(unstable.to(torch.int8), dim=1, descending=True, stable=True)
            order = order[:, :most]
            group = max(1, state.backward_elements // max(1, 2 * n * largest))
            for first in range(0, most, group):
                neurons = order[:, first:first + group]
                one_hot = torch.nn.functional.one_hot(neurons, width).to(ibp_lower.dtype)
                A, bias = self._backward_both_signs(one_hot.view(n, -1, *shape), state,
                                                    end=self._source(index) + 1)
                bound = self._concretize(A, bias, state.center, state.radius, overwrite=True)
                k = neurons.shape[1]
                lower_flat.scatter_(1, neurons, torch.maximum(lower_flat.gather(1, neurons),
                                                              bound[:, :k]))
                upper_flat.scatter_(1, neurons, torch.minimum(upper_flat.gather(1, neurons),
                                                              -bound[:, k:]))
            return lower_flat.view_as(ibp_lower), upper_flat.view_as(ibp_upper)
        samples, neurons = unstable.nonzero(as_tuple=True)
        # Each row is a batch entry of its own, with a copy of its sample's relaxations.
        relaxed = sum(numel(state.input_shapes[i]) for i in state.relaxations)
        group = max(1, state.backward_elements // (2 * largest + relaxed))
        for first in range(0, total, group):
            rows, columns = samples[first:first + group], neurons[first:first + group]
            sub = state.rows(rows)
            one_hot = torch.nn.functional.one_hot(columns, width).to(ibp_lower.dtype)
            A, bias = self._backward_both_signs(one_hot.view(-1, 1, *shape), sub,
                                                end=self._source(index) + 1)
            bound = self._concretize(A, bias, sub.center, sub.radius, overwrite=True)
            lower_flat[rows, columns] = torch.maximum(lower_flat[rows, columns], bound[:, 0])
            upper_flat[rows, columns] = torch.minimum(upper_flat[rows, columns], -bound[:, 1])
        return lower_flat.view_as(ibp_lower), upper_flat.view_as(ibp_upper)

    # -------------------------------------------------------------- methods
    def _ibp(self, state: _Propagation, reference: Tensor, **_) -> Tensor:
        return self._tail_margins(state, reference)

    def _tail_margins(self, state: _Propagation, reference: Tensor) -> Tensor:
        """IBP margin bounds with the specification folded into the trailing affine layers.

        Their exact composition is tighter than interval arithmetic through each of them.
        """
        center, radius = state.tail_interval
        n_classes = state.logits.shape[1]
        tail_width = numel(center.shape[1:])
        if n_classes * n_classes * tail_width > _PAIRWISE_ELEMENT_BUDGET:
            spec = margin_specification(reference, n_classes, dtype=center.dtype)
            A, bias = self._backward(spec, state, end=len(self.ops), start=self._tail_start)
            return self._concretize(A, bias, center, radius, overwrite=True)
        # The tail holds no activation, so its composite affine map is the same for every
        # sample: bound all class pairs from it instead of building per-sample spec rows.
        eye = torch.eye(n_classes, dtype=center.dtype, device=center.device).unsqueeze(0)
        A, bias = self._backward(eye, state, end=len(self.ops), start=self._tail_start)
        tail = A.reshape(n_classes, tail_width)
        logits = center.flatten(1) @ tail.T + bias
        pair_radius = (tail.unsqueeze(1) - tail.unsqueeze(0)).abs().view(-1, tail_width)
        spread = (radius.flatten(1) @ pair_radius.T).view(-1, n_classes, n_classes)
        rows = reference.view(-1, 1)
        spread_of_reference = spread.gather(1, rows.unsqueeze(-1).expand(-1, 1, n_classes))
        return logits.gather(1, rows) - logits - spread_of_reference.squeeze(1)

    def _specification(self, state: _Propagation, reference: Tensor) -> Tensor:
        return margin_specification(reference, state.logits.shape[1], dtype=state.center.dtype)

    def _crown_ibp(self, state: _Propagation, reference: Tensor, **_) -> Tensor:
        for index, (lower, upper) in state.ibp_bounds.items():
            self._set_bounds(state, index, lower, upper)
        return self._final_backward(state, self._specification(state, reference))

    def _crown(self, state: _Propagation, reference: Tensor, **_) -> Tensor:
        self._crown_intermediate_bounds(state)
        return self._final_backward(state, self._specification(state, reference))

    def _alpha_crown(
        self, state: _Propagation, reference: Tensor, *, alpha_steps: int, alpha_lr: float, **_
    ) -> Tensor:
        self._crown_intermediate_bounds(state)
        spec = self._specification(state, reference)
        n_specs = spec.shape[1]
        with torch.no_grad():
            best = self._final_backward(state, spec)
        alphas = {}
        for index in self._activation_indices:
            lower, upper = state.bounds[index]
            start = self.ops[index].initial_lower_slope(lower.detach(), upper.detach())
            alphas[index] = start.unsqueeze(1).expand(-1, n_specs, *start.shape[1:]).clone()
            alphas[index].requires_grad_(True)
        if not alphas or alpha_steps <= 0:
            return best
        detached = _Propagation(
            center=state.center.detach(),
            radius=state.radius.detach(),
            input_shapes=state.input_shapes,
        )
        for index, (lower, upper) in state.bounds.items():
            self._set_bounds(detached, index, lower.detach(), upper.detach())
        optimizer = torch.optim.Adam(list(alphas.values()), lr=alpha_lr)
        with torch.enable_grad():
            for _ in range(alpha_steps):
                margins = self._final_backward(detached, spec.detach(), alphas)
                best = torch.maximum(best, margins.detach())
                optimizer.zero_grad(set_to_none=True)
                (-margins.sum()).backward(inputs=list(alphas.values()))
                optimizer.step()
                with torch.no_grad():
                    for alpha in alphas.values():
                        alpha.clamp_(0.0, 1.0)
            with torch.no_grad():
                best = torch.maximum(best, self._final_backward(detached, spec, alphas))
        return best


class _ZeroPerturbation:
    """The box of the clean input itself (for sweeps that only need shapes)."""

    @staticmethod
    def box(x: Tensor) -> tuple[Tensor, Tensor]:
        return x, torch.zeros_like(x)


def _mask_reference(margins: Tensor, reference: Tensor) -> Tensor:
    ref_column = torch.nn.functional.one_hot(reference, margins.shape[1]).bool()
    return margins.masked_fill(ref_column, float("inf"))


#: Bound methods by name, cheapest first.
METHOD_TABLE: dict[str, BoundMethod] = {
    method.name: method
    for method in (
        BoundMethod("ibp", BoundEngine._ibp, activation_bounds=False, trainable=True,
                    lirpa_name="IBP",
                    summary="interval bounds through every layer (fastest, differentiable)"),
        BoundMethod("crown-ibp", BoundEngine._crown_ibp, activation_bounds=True, trainable=True,
                    lirpa_name="CROWN-IBP",
                    summary="IBP intermediate bounds, linear relaxation for the output"),
        BoundMethod("crown", BoundEngine._crown, activation_bounds=True, trainable=False,
                    lirpa_name="CROWN", summary="linear relaxation everywhere"),
        BoundMethod("alpha-crown", BoundEngine._alpha_crown, activation_bounds=True,
                    trainable=False, lirpa_name="alpha-CROWN",
                    summary="CROWN with optimised lower slopes (tightest, slowest)"),
    )
}

#: Bound methods understood by the engine, cheapest first.
METHODS: tuple[str, ...] = tuple(METHOD_TABLE)

_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_for(module: nn.Module) -> BoundEngine:
    """The bound engine of ``module``, built once and reused while its layers stay the same.

    The engine holds its layers, so a layer replaced in the module gets a new identity and the
    engine is rebuilt.

    Raises
    ------
    UnsupportedLayerError
        If the module contains a layer the engine cannot handle.
    """
    signature = tuple(map(id, module.modules()))
    cached = _ENGINES.get(module)
    if cached is not None and cached[0] == signature:
        return cached[1]
    engine = BoundEngine(module)
    _ENGINES[module] = (signature, engine)
    return engine


def margin_lower_bounds(
    module: nn.Module,
    x: Tensor,
    eps: float | Tensor | Perturbation,
    reference: Tensor,
    *,
    method: str = "ibp",
    lower: float | Tensor | None = None,
    upper: float | Tensor | None = None,
    **options,
) -> Tensor:
    """Lower bounds of the margins ``z_ref - z_j`` of ``module`` over an L-infinity ball.

    A convenience for scripts and tests: no chunking, and the module's current train/eval mode
    is used (in training mode BatchNorm uses the statistics of the clean batch ``x``). ``ibp``
    and ``crown-ibp`` (and ``crown``) are differentiable with respect to the module's
    parameters.

    Parameters
    ----------
    module : torch.nn.Module
        An ``nn.Sequential`` of supported layers.
    x : Tensor of shape (n, ...)
        Clean inputs on the module's device.
    eps : float, Tensor or Perturbation
        Radius of the L-infinity ball (scalar or per feature), or a whole perturbation.
    reference : LongTensor of shape (n,)
        Class whose margins are bounded.
    method : {"ibp", "crown-ibp", "crown", "alpha-crown"}
    lower, upper : float or Tensor, optional
        Input domain intersected with the ball (with a scalar or tensor ``eps``).
    **options
        ``alpha_steps`` and ``alpha_lr`` for ``alpha-crown``.

    Returns
    -------
    Tensor of shape (n, n_classes)
        Lower bounds; ``+inf`` in the reference column.
    """
    if not isinstance(eps, Perturbation):
        eps = Perturbation.create(eps, x.shape[1:], lower=lower, upper=upper, dtype=x.dtype,
                                  device=x.device)
    return engine_for(module).margin_lower_bounds(x, eps, reference, method=method, **options)
