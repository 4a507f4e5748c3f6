"""The steps of the bound methods after the forward sweep, one per entry of
:data:`~certdistill.bounds.engine.METHOD_TABLE`."""

from __future__ import annotations

import torch
from torch import Tensor

from certdistill.bounds.ops import numel
from certdistill.bounds.propagation import (
    PAIRWISE_ELEMENT_BUDGET,
    Propagation,
)
from certdistill.bounds.specification import margin_specification


class MethodSteps:
    """What each bound method does with the sweep's state (a part of
    :class:`~certdistill.bounds.engine.BoundEngine`)."""

    # -------------------------------------------------------------- methods
    def _ibp(self, state: Propagation, reference: Tensor, **_) -> Tensor:
        return self._tail_margins(state, reference)

    def _tail_margins(self, state: Propagation, reference: Tensor) -> Tensor:
        """IBP margin lower bounds with the specification folded into the trailing affine layers.

        Their exact composition is tighter than interval arithmetic through each of them.
        """
        return self._tail_margin_bounds(state, reference, upper=False)[0]

    def _tail_margin_bounds(
        self, state: Propagation, reference: Tensor, *, upper: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """IBP lower and (with ``upper``) upper bounds of the margins ``z_ref - z_j``, the
        specification folded into the trailing affine layers; both are 0 in the reference
        column."""
        center, radius = state.tail_interval
        n_classes = state.logits.shape[1]
        tail_width = numel(center.shape[1:])
        if n_classes * n_classes * tail_width > PAIRWISE_ELEMENT_BUDGET:
            spec = margin_specification(reference, n_classes, dtype=center.dtype)
            A, bias = self._backward(spec, state, end=len(self.ops), start=self._tail_start)
            lower = self._concretize(A, bias, center, radius, overwrite=not upper)
            highest = (
                -self._concretize(-A, -bias, center, radius, overwrite=True) if upper else None
            )
            return lower, highest
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
        at_center = logits.gather(1, rows) - logits
        spread_of_reference = spread_of_reference.squeeze(1)
        return (at_center - spread_of_reference, at_center + spread_of_reference if upper else None)

    def _specification(self, state: Propagation, reference: Tensor) -> Tensor:
        return margin_specification(reference, state.logits.shape[1], dtype=state.center.dtype)

    def _crown_ibp(self, state: Propagation, reference: Tensor, **_) -> Tensor:
        return self._crown_ibp_rows(state, self._specification(state, reference))

    def _crown_ibp_rows(self, state: Propagation, spec: Tensor) -> Tensor:
        """Lower bounds of ``spec @ z`` by a backward pass over the sweep's IBP bounds."""
        for index, (lower, upper) in state.ibp_bounds.items():
            self._set_bounds(state, index, lower, upper)
        return self._final_backward(state, spec)

    def _crown(self, state: Propagation, reference: Tensor, **_) -> Tensor:
        self._crown_intermediate_bounds(state)
        return self._final_backward(state, self._specification(state, reference))

    def _alpha_crown(
        self, state: Propagation, reference: Tensor, *, alpha_steps: int, alpha_lr: float, **_
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
        detached = Propagation(
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
