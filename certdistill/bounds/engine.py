"""The bound engine: walks a graph of bound operations to bound specification margins.

The graph (:mod:`certdistill.bounds.graph`) lists the operations in topological order with the
nodes each reads; a ``Sequential`` is the chain case. Forward sweeps run the nodes in order;
backward passes run them in reverse and sum the linear functions ``A`` of a node read by several
others (the skip connection of a residual block) before passing them on.

Methods, one entry each in :data:`METHOD_TABLE` (their steps in
:mod:`~certdistill.bounds.method_steps`):

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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from certdistill.bounds.graph import INPUT, build_graph
from certdistill.bounds.inplace import needs_graph
from certdistill.bounds.intermediate import IntermediateBounds
from certdistill.bounds.memory import MemoryPlan, plan_memory
from certdistill.bounds.method_steps import MethodSteps
from certdistill.bounds.ops import BoundOp
from certdistill.bounds.perturbation import Perturbation
from certdistill.bounds.propagation import (
    BoundResult,
    IntervalPass,
    Propagation,
    SubdomainBounds,
    ZeroPerturbation,
    mask_reference,
)
from certdistill.bounds.subdomains import SubdomainBounding
from certdistill.bounds.training_passes import TrainingPasses

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


class BoundEngine(MethodSteps, TrainingPasses, IntermediateBounds, SubdomainBounding):
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
            raise ValueError(f"conv_mode must be 'auto', 'patches' or 'matrix', got {conv_mode!r}.")
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
        self._tail_start = next(
            k
            for k in range(last_activation + 1, len(self.ops) + 1)
            if self._single_entry(k, len(self.ops))
        )
        self._last_use = {INPUT: 0}
        readers: dict[int, int] = {}
        for index, reads in enumerate(self.inputs):
            for j in reads:
                self._last_use[j] = index
                readers[j] = readers.get(j, 0) + 1
        #: Nodes read by one operation only, once: that reader may overwrite their outputs.
        self._single_reader = {j for j, count in readers.items() if count == 1}
        self._exact_interval = {
            index: self._interval_exact_up_to(index) for index in self._activation_indices
        }
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
        margins = bound_method.run(
            self, state, reference, alpha_steps=alpha_steps, alpha_lr=alpha_lr
        )
        return BoundResult(state.logits, reference, mask_reference(margins, reference))

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

    def memory_plan(
        self, x: Tensor, method: str, *, memory_limit: int, max_samples: int
    ) -> MemoryPlan:
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
        return plan_memory(
            self._input_shapes(x),
            self._activation_indices,
            method,
            memory_limit=memory_limit,
            itemsize=x.element_size(),
            max_samples=max_samples,
            device=x.device,
        )

    def activation_interval_bounds(
        self, x: Tensor, perturbation: Perturbation
    ) -> list[tuple[Tensor, Tensor]]:
        """IBP bounds ``(lower, upper)`` of each activation's input, in network order.

        Used for diagnostics (unstable neurons) and by the regularisers of Shi et al. (2021).
        """
        state = self._sweep(x, perturbation, record_bounds=True)
        return [state.ibp_bounds[index] for index in self._activation_indices]

    def _input_shapes(self, x: Tensor) -> list[torch.Size]:
        """Input shape of every op for samples shaped like ``x``'s (cached)."""
        key = tuple(x.shape[1:])
        shapes = self._shape_cache.get(key)
        if shapes is None:
            probe = x[:1].detach()
            state = self._sweep(probe, ZeroPerturbation, record_bounds=False)
            shapes = [*state.input_shapes, state.logits.shape[1:]]
            self._shape_cache[key] = shapes
        return shapes

    def _n_classes(self, x: Tensor) -> int:
        return int(self._input_shapes(x)[-1][0])

    # --------------------------------------------------------------- passes
    def _sweep(
        self,
        x: Tensor,
        perturbation: Perturbation,
        *,
        record_bounds: bool,
        training: bool = False,
    ) -> Propagation:
        """The clean forward and the interval bounds up to the last activation, in one pass."""
        center, radius = perturbation.box(x)
        state = Propagation(center=center, radius=radius)
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
                out = (
                    op.forward_many([p[0] for p in parts]),
                    *op.interval_many([p[1] for p in parts], [p[2] for p in parts]),
                )
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
        state: Propagation,
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

    @staticmethod
    def _concretize(
        A: Tensor, bias: Tensor, center: Tensor, radius: Tensor, *, overwrite: bool = False
    ) -> Tensor:
        """Minimum of ``A @ h + bias`` over the box ``center +- radius``.

        With ``overwrite`` (the caller's ``A`` is its own and not used again) and no autograd
        graph, ``|A|`` is taken in place: ``A`` reaching the input is the largest tensor of a
        backward pass.
        """
        A_flat = A.flatten(2)
        at_center = torch.einsum("nsd,nd->ns", A_flat, center.flatten(1))
        magnitude = A_flat.abs_() if overwrite and not needs_graph(A_flat) else A_flat.abs()
        return at_center - torch.einsum("nsd,nd->ns", magnitude, radius.flatten(1)) + bias

    def _final_backward(
        self, state: Propagation, spec: Tensor, alphas: dict[int, Tensor] | None = None
    ) -> Tensor:
        A, bias = self._backward(spec, state, end=len(self.ops), alphas=alphas)
        return self._concretize(A, bias, state.center, state.radius, overwrite=True)


#: Bound methods by name, cheapest first.
METHOD_TABLE: dict[str, BoundMethod] = {
    method.name: method
    for method in (
        BoundMethod(
            "ibp",
            BoundEngine._ibp,
            activation_bounds=False,
            trainable=True,
            lirpa_name="IBP",
            summary="interval bounds through every layer (fastest, differentiable)",
        ),
        BoundMethod(
            "crown-ibp",
            BoundEngine._crown_ibp,
            activation_bounds=True,
            trainable=True,
            lirpa_name="CROWN-IBP",
            summary="IBP intermediate bounds, linear relaxation for the output",
        ),
        BoundMethod(
            "crown",
            BoundEngine._crown,
            activation_bounds=True,
            trainable=False,
            lirpa_name="CROWN",
            summary="linear relaxation everywhere",
        ),
        BoundMethod(
            "alpha-crown",
            BoundEngine._alpha_crown,
            activation_bounds=True,
            trainable=False,
            lirpa_name="alpha-CROWN",
            summary="CROWN with optimised lower slopes (tightest, slowest)",
        ),
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
        eps = Perturbation.create(
            eps, x.shape[1:], lower=lower, upper=upper, dtype=x.dtype, device=x.device
        )
    return engine_for(module).margin_lower_bounds(x, eps, reference, method=method, **options)
