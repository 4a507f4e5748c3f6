"""Intermediate bounds of CROWN: the bounds of every activation's input by a backward pass from
it (dense, or on patches for convolutions), intersected with the interval bounds."""

from __future__ import annotations

import torch
from torch import Tensor

from certdistill.bounds.ops import numel
from certdistill.bounds.patches import (
    PatchGeometry,
    concretize_patches,
    identity_patches,
    in_map_mask,
)
from certdistill.bounds.propagation import (
    RAGGED_WASTE,
    Propagation,
)


class IntermediateBounds:
    """The pre-activation bounds of ``crown`` and ``alpha-crown`` (a part of
    :class:`~certdistill.bounds.engine.BoundEngine`)."""

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

    def _set_bounds(self, state: Propagation, index: int, lower: Tensor, upper: Tensor) -> None:
        state.bounds[index] = (lower, upper)
        state.relaxations[index] = self.ops[index].relax(lower, upper)

    def _crown_intermediate_bounds(self, state: Propagation) -> None:
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

    def _patches_apply(self, state: Propagation, index: int, unstable: Tensor) -> bool:
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
        self, state: Propagation, index: int, ibp_lower: Tensor, ibp_upper: Tensor, _=None
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
                coeffs = coeffs * in_map_mask(state.input_shapes[op_index], geometry, dtype, device)
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
        self,
        state: Propagation,
        index: int,
        ibp_lower: Tensor,
        ibp_upper: Tensor,
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
        if n * most <= RAGGED_WASTE * total:
            # Per sample, the indices of its unstable neurons first.
            order = torch.argsort(unstable.to(torch.int8), dim=1, descending=True, stable=True)
            order = order[:, :most]
            group = max(1, state.backward_elements // max(1, 2 * n * largest))
            for first in range(0, most, group):
                neurons = order[:, first : first + group]
                one_hot = torch.nn.functional.one_hot(neurons, width).to(ibp_lower.dtype)
                A, bias = self._backward_both_signs(
                    one_hot.view(n, -1, *shape), state, end=self._source(index) + 1
                )
                bound = self._concretize(A, bias, state.center, state.radius, overwrite=True)
                k = neurons.shape[1]
                lower_flat.scatter_(
                    1, neurons, torch.maximum(lower_flat.gather(1, neurons), bound[:, :k])
                )
                upper_flat.scatter_(
                    1, neurons, torch.minimum(upper_flat.gather(1, neurons), -bound[:, k:])
                )
            return lower_flat.view_as(ibp_lower), upper_flat.view_as(ibp_upper)
        samples, neurons = unstable.nonzero(as_tuple=True)
        # Each row is a batch entry of its own, with a copy of its sample's relaxations.
        relaxed = sum(numel(state.input_shapes[i]) for i in state.relaxations)
        group = max(1, state.backward_elements // (2 * largest + relaxed))
        for first in range(0, total, group):
            rows, columns = samples[first : first + group], neurons[first : first + group]
            sub = state.rows(rows)
            one_hot = torch.nn.functional.one_hot(columns, width).to(ibp_lower.dtype)
            A, bias = self._backward_both_signs(
                one_hot.view(-1, 1, *shape), sub, end=self._source(index) + 1
            )
            bound = self._concretize(A, bias, sub.center, sub.radius, overwrite=True)
            lower_flat[rows, columns] = torch.maximum(lower_flat[rows, columns], bound[:, 0])
            upper_flat[rows, columns] = torch.minimum(upper_flat[rows, columns], -bound[:, 1])
        return lower_flat.view_as(ibp_lower), upper_flat.view_as(ibp_upper)

    def _backward_both_signs(
        self, A: Tensor, state: Propagation, end: int
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
