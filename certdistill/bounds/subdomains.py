"""Bounds of input subdomains and of ReLU splits, for branch and bound (beta-CROWN)."""

from __future__ import annotations

import torch
from torch import Tensor

from certdistill.bounds.ops import numel
from certdistill.bounds.propagation import (
    Propagation,
    SubdomainBounds,
    ZeroPerturbation,
    mask_reference,
)
from certdistill.bounds.specification import margin_specification


class SubdomainBounding:
    """Bounds of many subdomains at once, for :mod:`certdistill.verify.bab` (a part of
    :class:`~certdistill.bounds.engine.BoundEngine`)."""

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
        state = self._sweep(probe, ZeroPerturbation, record_bounds=False)
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

    def _wide_segments(self, state: Propagation, dtype, device) -> list[tuple[Tensor, Tensor]]:
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
                blocks.append(
                    block.reshape(width, size) if block is not None else A.new_zeros(width, size)
                )
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
        state = Propagation(
            center=center, radius=radius, input_shapes=shapes, ibp_bounds=dict(bounds)
        )
        self._crown_intermediate_bounds(state)
        spec = margin_specification(reference, self._n_classes(center), dtype=center.dtype)
        record: dict[int, Tensor] = {}
        A, bias = self._backward(spec, state, end=len(self.ops), record=record)
        margins = self._concretize(A, bias, center, radius, overwrite=True)
        margins = mask_reference(margins, reference)
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
            margins=margins,
            bounds=state.bounds,
            relaxations=state.relaxations,
            coefficients={k: a[rows, worst] for k, a in record.items()},
            candidate=candidate,
            infeasible=infeasible,
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
        state = Propagation(center=center.detach(), radius=radius.detach(), input_shapes=shapes)
        for index, (lower, upper) in bounds.items():
            self._set_bounds(state, index, lower.detach(), upper.detach())
        n_classes = self._n_classes(center)
        done, classes, ignore, spec = _open_margin_specification(
            reference, n_classes, closed, center
        )
        alphas, betas = self._split_multipliers(state, splits, classes.shape[1])
        best, A, record = self._optimise_split_bounds(
            spec, state, alphas, betas, ignore, steps=steps, alpha_lr=alpha_lr, beta_lr=beta_lr
        )
        selected = best.masked_fill(ignore, float("inf"))
        worst = selected.argmin(1)
        rows = torch.arange(center.shape[0], device=center.device)
        candidate = state.center - state.radius * torch.sign(A.detach()[rows, worst])
        margins = _largest_per_class(best, classes, done)
        return SubdomainBounds(
            margins=margins,
            bounds=state.bounds,
            relaxations=state.relaxations,
            coefficients={k: a.detach()[rows, worst] for k, a in record.items()},
            candidate=candidate,
            infeasible=torch.zeros(center.shape[0], dtype=torch.bool, device=center.device),
        )

    def _split_multipliers(
        self, state: Propagation, splits: dict[int, Tensor], n_open: int
    ) -> tuple[dict[int, Tensor], dict[int, tuple[Tensor, Tensor]]]:
        """Starting lower slopes (alpha, per open margin) and split multipliers (beta = 0,
        with each neuron's split sign) of every activation."""
        alphas, betas = {}, {}
        for index in self._activation_indices:
            lower, upper = state.bounds[index]
            start = self.ops[index].initial_lower_slope(lower, upper)
            alphas[index] = start.unsqueeze(1).expand(-1, n_open, *start.shape[1:]).clone()
            sign = splits[index].to(state.center.dtype)
            betas[index] = (torch.zeros_like(alphas[index]), sign)
        return alphas, betas

    def _optimise_split_bounds(
        self,
        spec: Tensor,
        state: Propagation,
        alphas: dict[int, Tensor],
        betas: dict[int, tuple[Tensor, Tensor]],
        ignore: Tensor,
        *,
        steps: int,
        alpha_lr: float,
        beta_lr: float,
    ) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """Projected Adam on alpha and beta for ``steps`` steps: the best bound seen per row of
        ``spec`` (every iterate is sound), the last pass's coefficients ``A`` and its recorded
        coefficients of the activations."""
        best = torch.full(
            spec.shape[:2], float("-inf"), dtype=state.center.dtype, device=state.center.device
        )
        parameters = [*alphas.values(), *(beta for beta, _ in betas.values())]
        optimizer = torch.optim.Adam(
            [
                {"params": list(alphas.values()), "lr": alpha_lr},
                {"params": [beta for beta, _ in betas.values()], "lr": beta_lr},
            ]
        )
        for parameter in parameters:
            parameter.requires_grad_(steps > 0)
        with torch.enable_grad():
            for step in range(steps + 1):
                record: dict[int, Tensor] | None = {} if step == steps else None
                A, bias = self._backward(
                    spec, state, end=len(self.ops), alphas=alphas, betas=betas, record=record
                )
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
        return best, A, record


def _open_margin_specification(
    reference: Tensor, n_classes: int, closed: Tensor | None, like: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The margins to bound per subdomain: ``done`` (reference or closed, shape
    ``(d, n_classes)``), the open ``classes``, worst first, and the padding mask ``ignore``
    (both ``(d, n_open)``), and ``spec`` (``(d, n_open, n_classes)``, in ``like``'s dtype and
    device)."""
    done = torch.nn.functional.one_hot(reference, n_classes).bool()
    if closed is not None:
        done = done | closed
    # Bound only the open margins: per subdomain its open classes, worst first, padded by
    # repeating the first one (a repeated row is bounded twice, harmlessly).
    n_open = int((~done).sum(1).max()) if like.shape[0] else 0
    n_open = max(n_open, 1)
    order = torch.argsort(done.to(torch.int8), dim=1, stable=True)[:, :n_open]
    valid = ~done.gather(1, order)
    classes = torch.where(valid, order, order[:, :1])
    eye = torch.eye(n_classes, dtype=like.dtype, device=like.device)
    spec = eye[reference].unsqueeze(1) - eye[classes]
    return done, classes, ~valid, spec


def _largest_per_class(best: Tensor, classes: Tensor, done: Tensor) -> Tensor:
    """Margin bounds of shape ``(d, n_classes)``: each open class its largest bound in
    ``best`` (rows ``classes``), ``+inf`` where ``done``."""
    # A padding row repeats the first open class: its own (sound) bound must not replace that
    # class's, and scatter_ would keep an arbitrary one of the duplicates (with the padding
    # masked to +inf, as for the candidate, unsoundly).
    margins = torch.full(done.shape, float("-inf"), dtype=best.dtype, device=best.device)
    margins = margins.scatter_reduce(1, classes, best, reduce="amax")
    return margins.masked_fill(done, float("inf"))
