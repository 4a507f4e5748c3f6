"""The bound engine: walks a list of bound operations to bound specification margins.

Methods (DESIGN.md section 3):

* ``ibp``: interval bounds through every layer; the margin specification is folded into the
  affine layers after the last activation (exact composition), then concretised on the interval.
* ``crown-ibp``: pre-activation bounds by IBP, the specification by backward linear relaxation.
* ``crown``: pre-activation bounds also by backward relaxation (intersected with the IBP ones,
  which is sound and never looser), the specification by backward relaxation.
* ``alpha-crown``: ``crown`` followed by projected gradient ascent on the lower ReLU slopes of the
  specification's backward pass, keeping the best bound seen per margin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from certdistill.bounds.ops import BoundOp, build_ops, numel
from certdistill.bounds.patches import (
    PatchGeometry,
    concretize_patches,
    identity_patches,
    in_map_mask,
)
from certdistill.bounds.perturbation import input_box
from certdistill.bounds.specification import margin_specification

#: Bound methods understood by the engine.
METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")

#: Largest number of elements in one backward ``A`` tensor for intermediate bounds; the neurons
#: whose bounds are computed are split into groups to stay under it.
_BACKWARD_ELEMENT_BUDGET = 2**26

#: Largest ``n_classes**2 * width`` for which IBP bounds every class pair of the trailing affine
#: map at once (memory independent of the batch size).
_PAIRWISE_ELEMENT_BUDGET = 2**24


@dataclass
class _Propagation:
    """Per-batch state of one bound computation."""

    center: Tensor
    radius: Tensor
    input_shapes: list[torch.Size] = field(default_factory=list)
    #: Interval (lower, upper) of each activation op's input, by op index.
    ibp_bounds: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    #: Bounds used for the relaxation of each activation op's input, by op index.
    bounds: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    #: Interval of the network's input to the trailing affine part (after the last activation).
    tail_interval: tuple[Tensor, Tensor] | None = None


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
    """

    logits: Tensor
    margins: Tensor
    activation_bounds: list[tuple[Tensor, Tensor]]
    input_radius: Tensor


class BoundEngine:
    """Bound propagation over an ``nn.Sequential`` of supported layers.

    Parameters
    ----------
    module : torch.nn.Module
        The network. Its parameters are read at every call (no copy), so bounds stay
        differentiable with respect to them and follow training updates.
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
        self.ops: list[BoundOp] = build_ops(module)
        self._activation_indices = [i for i, op in enumerate(self.ops) if op.is_activation]
        last_activation = self._activation_indices[-1] if self._activation_indices else -1
        self._tail_start = last_activation + 1

    # ------------------------------------------------------------------ public
    def margin_lower_bounds(
        self,
        x: Tensor,
        eps: float | Tensor,
        reference: Tensor,
        *,
        method: str = "ibp",
        lower: float | Tensor | None = None,
        upper: float | Tensor | None = None,
        alpha_steps: int = 20,
        alpha_lr: float = 0.1,
    ) -> Tensor:
        """Lower bounds of ``z_ref - z_j`` over the L-infinity ball around each sample.

        Parameters
        ----------
        x : Tensor of shape (n, ...)
            Clean inputs.
        eps : float or Tensor
            Radius of the ball, broadcastable to ``x``.
        reference : LongTensor of shape (n,)
            Reference class of each sample.
        method : {"ibp", "crown-ibp", "crown", "alpha-crown"}
        lower, upper : float or Tensor, optional
            Input domain intersected with the ball.
        alpha_steps : int, default=20
            Steps of the slope optimisation of ``alpha-crown``.
        alpha_lr : float, default=0.1
            Adam learning rate of the slope optimisation of ``alpha-crown``.

        Returns
        -------
        Tensor of shape (n, n_classes)
            Margin lower bounds, ``+inf`` in the reference column.
        """
        if method not in _METHOD_IMPLEMENTATIONS:
            raise ValueError(f"Unknown bound method {method!r}; choose one of {METHODS}.")
        center, radius = input_box(x, eps, lower, upper)
        self._bind_batch_statistics(x)
        state = _Propagation(center=center, radius=radius)
        out_center, _ = self._interval_pass(state, record_bounds=method != "ibp")
        n_classes = out_center.shape[1]
        spec = margin_specification(reference, n_classes, dtype=center.dtype)
        implementation = _METHOD_IMPLEMENTATIONS[method]
        margins = implementation(self, state, spec, reference=reference,
                                 alpha_steps=alpha_steps, alpha_lr=alpha_lr)
        ref_column = torch.nn.functional.one_hot(reference, n_classes).bool()
        return margins.masked_fill(ref_column, float("inf"))

    def interval_bounds(
        self,
        x: Tensor,
        eps: float | Tensor,
        *,
        lower: float | Tensor | None = None,
        upper: float | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """IBP bounds ``(lower, upper)`` of the network's outputs (no specification folded in)."""
        center, radius = input_box(x, eps, lower, upper)
        self._bind_batch_statistics(x)
        out_center, out_radius = self._interval_pass(_Propagation(center=center, radius=radius))
        return out_center - out_radius, out_center + out_radius

    def interval_pass(
        self,
        x: Tensor,
        eps: float | Tensor,
        reference: Tensor,
        *,
        lower: float | Tensor | None = None,
        upper: float | Tensor | None = None,
        record_activations: bool = False,
    ) -> IntervalPass:
        """Clean forward pass and IBP margin bounds in one sweep, for certified training.

        Each layer runs in its current mode, as the module's own forward would: BatchNorm in
        training mode normalises inputs and bounds with the clean batch statistics and updates
        its running statistics once; Dropout in training mode applies one mask to inputs and
        bounds. Differentiable with respect to the module's parameters.

        Parameters
        ----------
        x : Tensor of shape (n, ...)
            Clean inputs.
        eps : float or Tensor
            Radius of the ball, broadcastable to ``x``.
        reference : LongTensor of shape (n,)
            Class whose margins are bounded (the label when training).
        lower, upper : float or Tensor, optional
            Input domain intersected with the ball.
        record_activations : bool, default=False
            Keep the interval of each activation's input (for regularisers).

        Returns
        -------
        IntervalPass
        """
        center, radius = input_box(x, eps, lower, upper)
        state = _Propagation(center=center, radius=radius)
        recorded = []
        for index, op in enumerate(self.ops):
            state.input_shapes.append(center.shape[1:])
            if index == self._tail_start:
                state.tail_interval = (center, radius)
            if index >= self._tail_start:
                x = op.forward(x, update_running_stats=True)
                continue
            if record_activations and op.is_activation:
                recorded.append((center, radius))
            x, center, radius = op.propagate(x, center, radius)
        if state.tail_interval is None:
            state.tail_interval = (center, radius)
        margins = self._tail_margins(state, reference, x.shape[1])
        ref_column = torch.nn.functional.one_hot(reference, margins.shape[1]).bool()
        return IntervalPass(logits=x, margins=margins.masked_fill(ref_column, float("inf")),
                            activation_bounds=recorded, input_radius=state.radius)

    def activation_interval_bounds(
        self,
        x: Tensor,
        eps: float | Tensor,
        *,
        lower: float | Tensor | None = None,
        upper: float | Tensor | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """IBP bounds ``(lower, upper)`` of each activation's input, in network order.

        Used for diagnostics (unstable neurons) and by the regularisers of Shi et al. (2021).
        """
        center, radius = input_box(x, eps, lower, upper)
        self._bind_batch_statistics(x)
        state = _Propagation(center=center, radius=radius)
        self._interval_pass(state, record_bounds=True)
        return [state.ibp_bounds[index] for index in self._activation_indices]

    # --------------------------------------------------------------- passes
    def _bind_batch_statistics(self, x: Tensor) -> None:
        if any(op.uses_batch_statistics for op in self.ops):
            h = x
            for op in self.ops:
                h = op.forward(h)

    def _interval_pass(
        self, state: _Propagation, record_bounds: bool = False
    ) -> tuple[Tensor, Tensor]:
        center, radius = state.center, state.radius
        for index, op in enumerate(self.ops):
            state.input_shapes.append(center.shape[1:])
            if record_bounds and op.is_activation:
                state.ibp_bounds[index] = (center - radius, center + radius)
            if index == self._tail_start:
                state.tail_interval = (center, radius)
            center, radius = op.interval(center, radius)
        if state.tail_interval is None:  # the network ends with an activation
            state.tail_interval = (center, radius)
        return center, radius

    def _backward(
        self,
        A: Tensor,
        state: _Propagation,
        end: int,
        start: int = 0,
        alphas: dict[int, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Propagate ``A`` from the output of op ``end - 1`` back to the input of op ``start``."""
        bias = A.new_zeros(A.shape[:2])
        for index in range(end - 1, start - 1, -1):
            op = self.ops[index]
            alpha = alphas.get(index) if alphas else None
            A, bias_term = op.backward(
                A, state.input_shapes[index], state.bounds.get(index), alpha
            )
            if bias_term is not None:
                bias = bias + bias_term
        return A, bias

    def _backward_both_signs(
        self, A: Tensor, state: _Propagation, end: int
    ) -> tuple[Tensor, Tensor]:
        """Backward pass of ``[A; -A]`` (lower and upper bounds) to the input.

        The affine layers between ``end`` and the previous activation map ``A`` and ``-A`` to
        exact negatives of each other, so they are propagated once and split afterwards.
        """
        previous = [i for i in self._activation_indices if i < end]
        split = previous[-1] + 1 if previous else 0
        A, bias = self._backward(A, state, end=end, start=split)
        A, bias = torch.cat([A, -A], dim=1), torch.cat([bias, -bias], dim=1)
        if split == 0:
            return A, bias
        A, more_bias = self._backward(A, state, end=split)
        return A, bias + more_bias

    @staticmethod
    def _concretize(A: Tensor, bias: Tensor, center: Tensor, radius: Tensor) -> Tensor:
        """Minimum of ``A @ h + bias`` over the box ``center +- radius``."""
        A_flat = A.flatten(2)
        return (
            torch.einsum("nsd,nd->ns", A_flat, center.flatten(1))
            - torch.einsum("nsd,nd->ns", A_flat.abs(), radius.flatten(1))
            + bias
        )

    def _final_backward(
        self, state: _Propagation, spec: Tensor, alphas: dict[int, Tensor] | None = None
    ) -> Tensor:
        A, bias = self._backward(spec, state, end=len(self.ops), alphas=alphas)
        return self._concretize(A, bias, state.center, state.radius)

    # -------------------------------------------------------- intermediate
    def _interval_is_exact(self, index: int) -> bool:
        # Interval arithmetic is exact through one feature-mixing layer followed by
        # element-wise affine ones, so CROWN would return the same bounds.
        return sum(op.mixes_features for op in self.ops[:index]) <= 1

    def _crown_intermediate_bounds(self, state: _Propagation) -> None:
        for index in self._activation_indices:
            ibp_lower, ibp_upper = state.ibp_bounds[index]
            if self._interval_is_exact(index):
                state.bounds[index] = (ibp_lower, ibp_upper)
                continue
            compute = (
                self._patch_bounds_of_node
                if self._patches_apply(state, index)
                else self._crown_bounds_of_node
            )
            state.bounds[index] = compute(state, index, ibp_lower, ibp_upper)

    def _patches_apply(self, state: _Propagation, index: int) -> bool:
        if not (
            self.conv_mode != "matrix"
            and all(len(shape) == 3 for shape in state.input_shapes[: index + 1])
            and all(op.supports_patches for op in self.ops[:index])
        ):
            return False
        if self.conv_mode == "patches":
            return True
        # Patches pay off while a neuron's receptive field is small against the input map;
        # dense rows (restricted to unstable neurons) are cheaper for small maps.
        geometry = PatchGeometry()
        for op in reversed(self.ops[:index]):
            geometry = op.patch_geometry(geometry)
        height, width = state.input_shapes[0][1:]
        return geometry.kernel[0] * geometry.kernel[1] <= height * width

    def _patch_bounds_of_node(
        self, state: _Propagation, index: int, ibp_lower: Tensor, ibp_upper: Tensor
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
                    coeffs, geometry, state.bounds.get(op_index)
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
            group = max(1, _BACKWARD_ELEMENT_BUDGET // max(1, n * peak))
        shape = ibp_lower.shape
        crown_lower = torch.cat(lowers, dim=1).view(shape)
        crown_upper = torch.cat(uppers, dim=1).view(shape)
        return torch.maximum(ibp_lower, crown_lower), torch.minimum(ibp_upper, crown_upper)

    def _crown_bounds_of_node(
        self, state: _Propagation, index: int, ibp_lower: Tensor, ibp_upper: Tensor
    ) -> tuple[Tensor, Tensor]:
        """CROWN bounds of the input of op ``index``, intersected with its interval bounds.

        Only neurons that interval bounds leave unstable are computed: a stable neuron's
        relaxation is exact whatever its bounds, so tighter numbers would not change anything.
        """
        shape = ibp_lower.shape[1:]
        n, width = ibp_lower.shape[0], numel(shape)
        lower_flat, upper_flat = ibp_lower.flatten(1), ibp_upper.flatten(1)
        unstable = (lower_flat < 0) & (upper_flat > 0)
        n_unstable = int(unstable.sum(1).max()) if n else 0
        if n_unstable == 0:
            return ibp_lower, ibp_upper
        # Per sample, the indices of its unstable neurons first (padding with stable ones is
        # harmless: any CROWN bound is sound, so intersecting with it never hurts).
        order = torch.argsort(unstable.to(torch.int8), dim=1, descending=True, stable=True)
        order = order[:, :n_unstable]
        largest = max(numel(s) for s in state.input_shapes[: index + 1])
        group = max(1, _BACKWARD_ELEMENT_BUDGET // max(1, 2 * n * largest))
        for first in range(0, n_unstable, group):
            neurons = order[:, first : first + group]
            rows = torch.nn.functional.one_hot(neurons, width).to(ibp_lower.dtype)
            A, bias = self._backward_both_signs(rows.view(n, -1, *shape), state, end=index)
            bound = self._concretize(A, bias, state.center, state.radius)
            k = neurons.shape[1]
            crown_lower, crown_upper = bound[:, :k], -bound[:, k:]
            lower_flat = lower_flat.scatter(
                1, neurons, torch.maximum(lower_flat.gather(1, neurons), crown_lower)
            )
            upper_flat = upper_flat.scatter(
                1, neurons, torch.minimum(upper_flat.gather(1, neurons), crown_upper)
            )
        return lower_flat.view(n, *shape), upper_flat.view(n, *shape)

    # -------------------------------------------------------------- methods
    def _ibp(self, state: _Propagation, spec: Tensor, *, reference: Tensor, **_) -> Tensor:
        return self._tail_margins(state, reference, spec.shape[1], spec)

    def _tail_margins(
        self, state: _Propagation, reference: Tensor, n_classes: int, spec: Tensor | None = None
    ) -> Tensor:
        """IBP margin bounds with the specification folded into the trailing affine layers.

        Their exact composition is tighter than interval arithmetic through each of them.
        """
        center, radius = state.tail_interval
        tail_width = numel(center.shape[1:])
        if n_classes * n_classes * tail_width > _PAIRWISE_ELEMENT_BUDGET:
            if spec is None:
                spec = margin_specification(reference, n_classes, dtype=center.dtype)
            A, bias = self._backward(spec, state, end=len(self.ops), start=self._tail_start)
            return self._concretize(A, bias, center, radius)
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

    def _crown_ibp(self, state: _Propagation, spec: Tensor, **_) -> Tensor:
        state.bounds = dict(state.ibp_bounds)
        return self._final_backward(state, spec)

    def _crown(self, state: _Propagation, spec: Tensor, **_) -> Tensor:
        self._crown_intermediate_bounds(state)
        return self._final_backward(state, spec)

    def _alpha_crown(
        self, state: _Propagation, spec: Tensor, *, alpha_steps: int, alpha_lr: float, **_
    ) -> Tensor:
        self._crown_intermediate_bounds(state)
        n_specs = spec.shape[1]
        with torch.no_grad():
            best = self._final_backward(state, spec)
        alphas = {}
        for index in self._activation_indices:
            lower, upper = state.bounds[index]
            start = self.ops[index].adaptive_lower_slope(lower.detach(), upper.detach())
            alphas[index] = start.unsqueeze(1).expand(-1, n_specs, *start.shape[1:]).clone()
            alphas[index].requires_grad_(True)
        if not alphas or alpha_steps <= 0:
            return best
        detached = _Propagation(
            center=state.center.detach(),
            radius=state.radius.detach(),
            input_shapes=state.input_shapes,
            bounds={k: (lo.detach(), up.detach()) for k, (lo, up) in state.bounds.items()},
        )
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


_METHOD_IMPLEMENTATIONS: dict[str, Callable[..., Tensor]] = {
    "ibp": BoundEngine._ibp,
    "crown-ibp": BoundEngine._crown_ibp,
    "crown": BoundEngine._crown,
    "alpha-crown": BoundEngine._alpha_crown,
}


def margin_lower_bounds(
    module: nn.Module,
    x: Tensor,
    eps: float | Tensor,
    reference: Tensor,
    *,
    method: str = "ibp",
    lower: float | Tensor | None = None,
    upper: float | Tensor | None = None,
    **options,
) -> Tensor:
    """Lower bounds of the margins ``z_ref - z_j`` of ``module`` over an L-infinity ball.

    This is the differentiable entry point used for certified training: no validation, no
    chunking, and the module's current train/eval mode is used (in training mode BatchNorm uses
    the statistics of the clean batch ``x``). ``ibp`` and ``crown-ibp`` (and ``crown``) are
    differentiable with respect to the module's parameters.

    Parameters
    ----------
    module : torch.nn.Module
        An ``nn.Sequential`` of supported layers.
    x : Tensor of shape (n, ...)
        Clean inputs on the module's device.
    eps : float or Tensor
        Radius of the L-infinity ball, broadcastable to ``x``.
    reference : LongTensor of shape (n,)
        Class whose margins are bounded.
    method : {"ibp", "crown-ibp", "crown", "alpha-crown"}
    lower, upper : float or Tensor, optional
        Input domain intersected with the ball.
    **options
        ``alpha_steps`` and ``alpha_lr`` for ``alpha-crown``.

    Returns
    -------
    Tensor of shape (n, n_classes)
        Lower bounds; ``+inf`` in the reference column.
    """
    engine = BoundEngine(module)
    return engine.margin_lower_bounds(
        x, eps, reference, method=method, lower=lower, upper=upper, **options
    )
