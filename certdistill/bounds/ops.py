"""Bound operations: one small class per supported layer type.

Each operation knows the steps the engine (:mod:`certdistill.bounds.engine`) asks of the layer it
wraps; the engine walks a list of operations and never asks what kind of layer one wraps.

* ``forward(x)``: the plain forward pass in the layer's current mode;
* ``interval(center, radius)``: interval bound propagation in centre/radius form;
* ``propagate(x, center, radius, training)``: both in one step (training runs BatchNorm's
  running-statistics update and Dropout's mask here, the same for the inputs and the bounds);
* ``backward(A, input_shape, relaxation, alpha)``: the backward linear-relaxation step of CROWN.
  ``A`` has shape ``(n, S, *output_shape)`` and represents ``S`` linear functions ``A @ h`` of the
  layer's output ``h`` for each of the ``n`` samples. The step returns ``(A', b)`` such that
  ``A @ layer(z) >= A' @ z + b`` for every ``z`` inside the layer's input bounds, with ``b`` of
  shape ``(n, S)``. For affine layers the inequality is an equality;
* ``backward_patches`` and ``patch_geometry``: the same step on patches, for layers acting
  locally on feature maps (``supports_patches``);
* activations (``is_activation``, subclasses of :class:`ActivationOp`) also ``relax`` on their
  input bounds (the lines of a :class:`Relaxation`, which their backward steps use), say which
  inputs are ``unstable`` (not exact on the given bounds, so tighter bounds pay off) and give the
  ``initial_lower_slope`` from which alpha-CROWN optimises.

Adding a layer
--------------
Write one subclass of :class:`BoundOp` with the steps above (affine layers need ``forward``,
``interval`` and ``backward``; set ``mixes_features`` when an output unit depends on several
inputs), validate the layer's configuration in ``__init__`` (raise
:class:`~certdistill.exceptions.UnsupportedLayerError` for what the class cannot bound), and
register it::

    register_op(MyLayer, MyLayerOp, note="stride 1 only")

The supported-layer text of every error message and of the documentation is generated from the
registry. Then add the layer to the random networks of the soundness tests (``tests/networks.py``)
so that sampling, attacks and the MILP oracle check it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certdistill.bounds.inplace import needs_graph
from certdistill.bounds.layers import Add, ConstantAffine, Reshape
from certdistill.bounds.patches import PatchGeometry, unfold_map
from certdistill.exceptions import UnsupportedLayerError


class BoundOp:
    """Base class of a bound operation.

    Attributes
    ----------
    mixes_features : bool
        True when an output unit depends on several input units (dense or convolutional layers).
        Interval arithmetic is exact through at most one such layer, which lets the engine skip a
        backward pass for the first layer of pre-activation bounds.
    is_activation : bool
        True for the non-linear operations that need pre-activation bounds for their relaxation.
    uses_batch_statistics : bool
        True when the operation must see the clean input before propagating bounds (BatchNorm in
        training mode normalises with the statistics of the clean batch).
    """

    mixes_features = False
    is_activation = False
    #: True when ``backward_patches`` is implemented (layers acting locally on feature maps).
    supports_patches = False
    #: Number of inputs; operations with more (:class:`MergeOp`) use the ``*_many`` steps.
    arity = 1
    #: True when :meth:`propagate` returns tensors no other node holds (new ones, or its own
    #: inputs' when it owned them): the next operation may then work on them in place.
    fresh_outputs = False

    @property
    def uses_batch_statistics(self) -> bool:
        return False

    def forward(self, x: Tensor, update_running_stats: bool = False) -> Tensor:
        """Clean forward pass in the layer's current mode.

        BatchNorm in training mode binds the statistics of ``x`` for the following bound steps
        and, with ``update_running_stats``, updates its running statistics as the layer would.
        """
        raise NotImplementedError

    def propagate(
        self,
        x: Tensor,
        center: Tensor,
        radius: Tensor,
        training: bool = False,
        owned: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The clean forward and the interval step in one.

        With ``training``, the step is one of certified training: BatchNorm updates its running
        statistics and Dropout draws one mask for the inputs and the bounds (kept for the
        backward steps of the same pass). ``owned`` says that no other node reads ``x``,
        ``center`` and ``radius`` (the engine's bookkeeping): an operation may then overwrite
        them.
        """
        x = self.forward(x, update_running_stats=training)
        return (x, *self.interval(center, radius))

    def interval(self, center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(
        self,
        A: Tensor,
        input_shape: torch.Size,
        relaxation: Relaxation | None = None,
        alpha: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Backward linear-relaxation step (see the module docstring); activations receive
        their :class:`Relaxation` and optional optimised lower slopes ``alpha``."""
        raise NotImplementedError

    # ------------------------------------------------------- activation hooks
    def relax(self, lower: Tensor, upper: Tensor) -> Relaxation:
        """Linear lines bounding the activation on ``[lower, upper]`` (activations only)."""
        raise NotImplementedError(f"{type(self).__name__} is not an activation")

    def unstable(self, lower: Tensor, upper: Tensor) -> Tensor:
        """Inputs whose relaxation is not exact on ``[lower, upper]`` (activations only)."""
        raise NotImplementedError(f"{type(self).__name__} is not an activation")

    def initial_lower_slope(self, lower: Tensor, upper: Tensor) -> Tensor:
        """Lower-line slope before optimisation: CROWN's choice, alpha-CROWN's start."""
        raise NotImplementedError(f"{type(self).__name__} is not an activation")

    def patch_geometry(self, geometry: PatchGeometry) -> PatchGeometry:
        """Geometry on the input map of patches with ``geometry`` on the output map."""
        return geometry

    def backward_patches(
        self,
        coeffs: Tensor,
        geometry: PatchGeometry,
        relaxation: Relaxation | None = None,
    ) -> tuple[Tensor, PatchGeometry, Tensor | None]:
        """Backward step on patches (see :mod:`certdistill.bounds.patches`).

        ``coeffs`` has shape ``(n, S, L, C, Kh, Kw)`` on this layer's output map; the step
        returns the patches on its input map, their geometry there and a bias ``(n, S, L)``.
        """
        raise NotImplementedError


def stacked(x: Tensor, center: Tensor) -> Tensor:
    """``torch.cat([x, center])``, without the copy when the two are already the halves of one
    tensor in that order (the split outputs of the previous affine layer)."""
    base = x._base
    if (
        base is not None
        and center._base is base
        and base.is_contiguous()
        and x.is_contiguous()
        and center.is_contiguous()
        and x.shape == center.shape
        and base.numel() == 2 * x.numel()
        and base.data_ptr() == x.data_ptr()
        and center.data_ptr() == x.data_ptr() + x.numel() * x.element_size()
    ):
        return base.view(2 * x.shape[0], *x.shape[1:])
    return torch.cat([x, center])


def _window_sum(coeffs: Tensor) -> Tensor:
    """Sum a patch over its channels and window: ``(n, S, L, C, Kh, Kw) -> (n, S, L)``."""
    return coeffs.flatten(3).sum(-1)


class _AbsWeightCache:
    """``|W|`` of one weight, reused while the weight is unchanged and no graph is needed.

    Certification calls the interval step once per chunk with the same weights; training needs
    ``|W|`` in the autograd graph and recomputes it.
    """

    def __init__(self):
        self._key = None
        self._value = None

    def __call__(self, weight: Tensor) -> Tensor:
        if needs_graph(weight):
            return weight.abs()
        key = (weight.data_ptr(), weight._version)
        if key != self._key:
            self._value, self._key = weight.detach().abs(), key
        return self._value


def _flat_sum(x: Tensor) -> Tensor:
    """Sum over every dimension after the first two: ``(n, S, ...) -> (n, S)``."""
    return x.flatten(2).sum(-1) if x.dim() > 2 else x


class LinearOp(BoundOp):
    """``nn.Linear``: ``y = x W^T + b``."""

    mixes_features = True
    fresh_outputs = True

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.abs_weight = _AbsWeightCache()

    def forward(self, x, update_running_stats=False):
        return self.layer(x)

    def interval(self, center, radius):
        weight = self.layer.weight
        return (
            F.linear(center, weight, self.layer.bias),
            F.linear(radius, self.abs_weight(weight)),
        )

    def propagate(self, x, center, radius, training=False, owned=False):
        # Clean inputs and centres share the map: one call on the stacked batch is faster.
        x, center = self.forward(stacked(x, center)).split(x.shape[0])
        return x, center, F.linear(radius, self.abs_weight(self.layer.weight))

    def backward(self, A, input_shape, relaxation=None, alpha=None):
        bias = self.layer.bias
        bias_term = _flat_sum(A @ bias) if bias is not None else None
        return A @ self.layer.weight, bias_term


class Conv2dOp(BoundOp):
    """``nn.Conv2d`` with ``groups=1``, ``dilation=1`` and zero padding."""

    mixes_features = True
    fresh_outputs = True

    def __init__(self, layer: nn.Conv2d):
        if layer.groups != 1 or _pair(layer.dilation) != (1, 1) or layer.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"{layer!r}: only Conv2d with groups=1, dilation=1 and padding_mode='zeros' is "
                f"supported by the native engine. {supported_layers_text()}"
            )
        self.layer = layer
        self.padding = _numeric_padding(layer)
        self.abs_weight = _AbsWeightCache()

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.layer.stride, self.padding)

    def forward(self, x, update_running_stats=False):
        return self._conv(x, self.layer.weight, self.layer.bias)

    def interval(self, center, radius):
        weight = self.layer.weight
        return (
            self._conv(center, weight, self.layer.bias),
            self._conv(radius, self.abs_weight(weight), None),
        )

    def propagate(self, x, center, radius, training=False, owned=False):
        x, center = self.forward(stacked(x, center)).split(x.shape[0])
        return x, center, self._conv(radius, self.abs_weight(self.layer.weight), None)

    def backward(self, A, input_shape, relaxation=None, alpha=None):
        n, specs = A.shape[:2]
        # The transpose of the convolution: the transposed convolution, with the output padding
        # that gives back the input's size (rows and columns the stride skipped get zeros). It
        # is the gradient of the input, and faster on the CPU than autograd's kernel for it.
        stride, kernel = _pair(self.layer.stride), self.layer.kernel_size
        out_size = A.shape[-2:]
        output_padding = tuple(
            size - ((out - 1) * step - 2 * pad + k)
            for size, out, step, pad, k in zip(
                input_shape[-2:], out_size, stride, self.padding, kernel, strict=True
            )
        )
        A_in = F.conv_transpose2d(
            A.reshape(n * specs, *A.shape[2:]),
            self.layer.weight,
            stride=stride,
            padding=self.padding,
            output_padding=output_padding,
        ).view(n, specs, *input_shape)
        bias = self.layer.bias
        bias_term = A.sum(dim=(3, 4)) @ bias if bias is not None else None
        return A_in, bias_term

    supports_patches = True

    def backward_patches(self, coeffs, geometry, relaxation=None):
        bias = self.layer.bias
        bias_term = coeffs.sum(dim=(-2, -1)) @ bias if bias is not None else None
        widened = _transpose_patches(coeffs, self.layer.weight, self.layer.stride)
        return widened, self.patch_geometry(geometry), bias_term

    def patch_geometry(self, geometry):
        return geometry.through(self.layer.kernel_size, self.layer.stride, self.padding)


def _transpose_patches(coeffs: Tensor, weight: Tensor, stride, groups: int = 1) -> Tensor:
    """Transposed convolution of every patch: ``(n, S, L, C, Kh, Kw) -> (n, S, L, C', Kh', Kw')``.

    A patch is tiny, so the transposed convolution is built once as a dense matrix (by applying
    it to the basis of patch space) and applied to all patches in one matrix product, which is
    much faster than ``conv_transpose2d`` over millions of tiny inputs.
    """
    n, specs, locations = coeffs.shape[:3]
    patch_shape = coeffs.shape[3:]
    size = math.prod(patch_shape)
    basis = torch.eye(size, dtype=coeffs.dtype, device=coeffs.device).view(size, *patch_shape)
    matrix = F.conv_transpose2d(basis, weight, stride=stride, groups=groups)
    widened = coeffs.reshape(-1, size) @ matrix.view(size, -1)
    return widened.view(n, specs, locations, *matrix.shape[1:])


def _numeric_padding(layer: nn.Conv2d) -> tuple[int, int]:
    padding = layer.padding
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        kernel = layer.kernel_size
        if any(k % 2 == 0 for k in kernel):
            raise UnsupportedLayerError(
                f"{layer!r}: padding='same' with an even kernel pads asymmetrically; "
                "give explicit padding instead."
            )
        return tuple((k - 1) // 2 for k in kernel)
    return tuple(padding)


class ElementwiseAffineOp(BoundOp):
    """Per-channel affine map ``y = scale * x + shift`` (BatchNorm in any mode)."""

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm):
        self.layer = layer
        self._batch_affine: tuple[Tensor, Tensor] | None = None

    @property
    def uses_batch_statistics(self) -> bool:
        layer = self.layer
        return layer.training or layer.running_mean is None

    def _channel_view(self, param: Tensor, ndim: int) -> Tensor:
        # Channels are dimension 1; trailing spatial dimensions broadcast.
        return param.view(-1, *([1] * (ndim - 2)))

    def _affine_from(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        layer = self.layer
        scale = torch.rsqrt(var + layer.eps)
        if layer.weight is not None:
            scale = scale * layer.weight
        shift = -mean * scale
        if layer.bias is not None:
            shift = shift + layer.bias
        return scale, shift

    def affine(self) -> tuple[Tensor, Tensor]:
        """Return per-channel ``(scale, shift)`` of the map currently in force."""
        if self.uses_batch_statistics:
            if self._batch_affine is None:
                raise RuntimeError("batch statistics were not bound before propagating bounds")
            return self._batch_affine
        return self._affine_from(self.layer.running_mean, self.layer.running_var)

    def forward(self, x, update_running_stats=False):
        if self.uses_batch_statistics:
            # Statistics of the clean batch, as in certified training.
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x, dim=dims, unbiased=False)
            self._batch_affine = self._affine_from(mean, var)
            if update_running_stats:
                self._update_running_stats(mean, var, x.numel() // x.shape[1])
        scale, shift = self.affine()
        return x * self._channel_view(scale, x.dim()) + self._channel_view(shift, x.dim())

    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        layer = self.layer
        if not (layer.training and layer.track_running_stats and layer.running_mean is not None):
            return
        with torch.no_grad():
            layer.num_batches_tracked += 1
            momentum = layer.momentum
            if momentum is None:  # cumulative moving average
                momentum = 1.0 / float(layer.num_batches_tracked)
            unbiased = var * (count / max(count - 1, 1))
            layer.running_mean.mul_(1 - momentum).add_(momentum * mean)
            layer.running_var.mul_(1 - momentum).add_(momentum * unbiased)

    def interval(self, center, radius):
        scale, shift = self.affine()
        scale_v = self._channel_view(scale, center.dim())
        return center * scale_v + self._channel_view(shift, center.dim()), radius * scale_v.abs()

    def backward(self, A, input_shape, relaxation=None, alpha=None):
        scale, shift = self.affine()
        scale_v = self._channel_view(scale, A.dim() - 1)  # a sample's shape, channels first
        # Sum over positions first: no full-size product for the bias.
        per_channel = A.flatten(3).sum(-1) if A.dim() > 3 else A
        return A * scale_v, per_channel @ shift

    supports_patches = True

    def backward_patches(self, coeffs, geometry, relaxation=None):
        # Positions outside the map were zeroed by the engine, so the shift sums correctly.
        scale, shift = self.affine()
        return coeffs * scale.view(-1, 1, 1), geometry, coeffs.sum(dim=(-2, -1)) @ shift


class ConstantAffineOp(BoundOp):
    """:class:`~certdistill.bounds.layers.ConstantAffine`: ``y = x * scale + shift`` with
    constants broadcast over each sample (input normalisation of imported networks)."""

    def __init__(self, layer: ConstantAffine):
        self.layer = layer

    def forward(self, x, update_running_stats=False):
        return self.layer(x)

    def interval(self, center, radius):
        scale = self.layer.scale
        return center * scale + self.layer.shift, radius * scale.abs()

    def backward(self, A, input_shape, relaxation=None, alpha=None):
        scale, shift = self.layer.scale, self.layer.shift
        if shift.dim() == 0:
            bias = _flat_sum(A) * shift
        else:
            bias = _flat_sum(A * shift)
        return A * scale, bias

    @property
    def supports_patches(self) -> bool:
        # Patches carry one coefficient per channel and window position: constants must be
        # scalars or one value per channel of a feature map.
        return all(_per_channel(t) is not None for t in (self.layer.scale, self.layer.shift))

    def backward_patches(self, coeffs, geometry, relaxation=None):
        channels = coeffs.shape[3]
        scale = _per_channel(self.layer.scale).expand(channels)
        shift = _per_channel(self.layer.shift).expand(channels)
        return (coeffs * scale.view(-1, 1, 1), geometry, coeffs.sum(dim=(-2, -1)) @ shift)


def _per_channel(constant: Tensor) -> Tensor | None:
    """A scalar or ``(C, 1, 1)`` constant as a vector of channels (``None`` otherwise)."""
    if constant.dim() == 0:
        return constant.reshape(1)
    if constant.dim() == 3 and constant.shape[1:] == (1, 1):
        return constant.reshape(-1)
    return None


class _PlacementOp(BoundOp):
    """Layers that only move values, or add zeros: each output is one input or 0, so the
    layer itself maps centres and radii."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def forward(self, x, update_running_stats=False):
        return self.layer(x)

    def interval(self, center, radius):
        return self.layer(center), self.layer(radius)


class ZeroPad2dOp(_PlacementOp):
    """``nn.ZeroPad2d``: zeros around each feature map (exact for intervals and relaxations)."""

    def __init__(self, layer: nn.ZeroPad2d):
        if any(p < 0 for p in layer.padding):
            raise UnsupportedLayerError(
                f"{layer!r}: negative padding (cropping) is not supported. "
                f"{supported_layers_text()}"
            )
        super().__init__(layer)

    def backward(self, A, input_shape, relaxation=None, alpha=None):
        left, _, top, _ = self.layer.padding
        height, width = input_shape[-2:]
        return A[..., top : top + height, left : left + width], None


class AvgPool2dOp(BoundOp):
    """``nn.AvgPool2d``: a linear map with non-negative weights."""

    mixes_features = True

    def __init__(self, layer: nn.AvgPool2d):
        self.layer = layer
        self.kernel_size = _pair(layer.kernel_size)
        self.stride = _pair(layer.stride if layer.stride is not None else layer.kernel_size)
        self.padding = _pair(layer.padding)
        # A depthwise convolution with a constant kernel, unless the divisor varies at borders.
        self.supports_patches = not layer.ceil_mode and (
            layer.count_include_pad or self.padding == (0, 0)
        )

    def backward_patches(self, coeffs, geometry, relaxation=None):
        channels = coeffs.shape[3]
        divisor = self.layer.divisor_override or (self.kernel_size[0] * self.kernel_size[1])
        kernel = coeffs.new_full((channels, 1, *self.kernel_size), 1.0 / divisor)
        widened = _transpose_patches(coeffs, kernel, self.stride, groups=channels)
        return widened, self.patch_geometry(geometry), None

    def patch_geometry(self, geometry):
        return geometry.through(self.kernel_size, self.stride, self.padding)

    def forward(self, x, update_running_stats=False):
        return self.layer(x)

    def interval(self, center, radius):
        # Non-negative weights: the radius maps through the same pooling.
        return self.layer(center), self.layer(radius)

    def backward(self, A, input_shape, relaxation=None, alpha=None):
        n, specs = A.shape[:2]
        shape_holder = A.new_zeros(()).expand(n * specs, *input_shape)
        A_in = torch.ops.aten.avg_pool2d_backward(
            A.reshape(n * specs, *A.shape[2:]),
            shape_holder,
            list(self.kernel_size),
            list(self.stride),
            list(self.padding),
            self.layer.ceil_mode,
            self.layer.count_include_pad,
            self.layer.divisor_override,
        )
        return A_in.view(n, specs, *input_shape), None


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class ReshapeOp(_PlacementOp):
    """``nn.Flatten``, ``nn.Unflatten`` and :class:`~certdistill.bounds.layers.Reshape`: a
    change of shape only."""

    def backward(self, A, input_shape, relaxation=None, alpha=None):
        return A.reshape(*A.shape[:2], *input_shape), None


class IdentityOp(BoundOp):
    """``nn.Identity``."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def forward(self, x, update_running_stats=False):
        return x

    def interval(self, center, radius):
        return center, radius

    def backward(self, A, input_shape, relaxation=None, alpha=None):
        return A, None

    supports_patches = True

    def backward_patches(self, coeffs, geometry, relaxation=None):
        return coeffs, geometry, None


class DropoutOp(IdentityOp):
    """``nn.Dropout``: identity for certification; one thinned network per training step.

    A training pass draws one mask and applies it to the inputs, the bounds and, in the backward
    steps of the same pass (CROWN-IBP training), the linear functions: every bound of the step
    describes the same thinned network. After the last activation the training pass folds the
    remaining affine layers into one exact map, where Dropout stays the identity.
    """

    def __init__(self, layer: nn.Dropout):
        super().__init__(layer)
        self._mask: Tensor | None = None

    def propagate(self, x, center, radius, training=False, owned=False):
        layer = self.layer
        self._mask = None
        if not (training and layer.training and layer.p > 0):
            return x, center, radius
        # The same mask on the inputs and the bounds: bounds of the thinned network.
        keep = (torch.rand_like(x) >= layer.p).to(x.dtype) / (1 - layer.p)
        self._mask = keep
        return x * keep, center * keep, radius * keep

    def backward(self, A, input_shape, relaxation=None, alpha=None):
        if self._mask is None:
            return A, None
        return A * self._mask.unsqueeze(1), None

    @property
    def supports_patches(self) -> bool:
        return self._mask is None


class MergeOp(BoundOp):
    """Base of operations with several inputs (the merge of branches of a graph).

    They replace the one-input steps by ``forward_many(xs)``, ``interval_many(centers, radii)``
    and ``backward_many(A, input_shapes) -> (list of A, bias)``, one entry per input.
    """

    arity = 2

    def forward_many(self, xs: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def interval_many(self, centers: list[Tensor], radii: list[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward_many(self, A: Tensor, input_shapes) -> tuple[list[Tensor], Tensor | None]:
        raise NotImplementedError


class AddOp(MergeOp):
    """:class:`~certdistill.bounds.layers.Add` of two branches (a residual connection).

    Interval arithmetic adds centres and radii (it forgets that the branches are correlated,
    which CROWN's backward pass keeps: ``A`` reaches both branches and sums where they meet).
    """

    mixes_features = True  # the sum of correlated branches is not exact in intervals

    def __init__(self, layer: Add):
        self.layer = layer

    def forward_many(self, xs):
        return xs[0] + xs[1]

    def interval_many(self, centers, radii):
        return centers[0] + centers[1], radii[0] + radii[1]

    def backward_many(self, A, input_shapes):
        return [A, A], None


@dataclass(frozen=True)
class Relaxation:
    """Lines bounding an activation ``f`` on its input bounds, per neuron.

    ``lower_slope * z + lower_intercept <= f(z) <= upper_slope * z + upper_intercept`` for every
    ``z`` in the bounds the relaxation was made for. All tensors have the shape of the
    activation's input (batch first).

    Attributes
    ----------
    lower_slope, upper_slope, upper_intercept : Tensor
        The lines (the lower line's slope is where alpha-CROWN substitutes its own).
    unstable : BoolTensor
        Neurons whose lines are not exact (where a lower slope may be optimised).
    lower_intercept : Tensor or None
        ``None`` means zero (ReLU's lower lines go through the origin).
    """

    lower_slope: Tensor
    upper_slope: Tensor
    upper_intercept: Tensor
    unstable: Tensor
    lower_intercept: Tensor | None = None

    def rows(self, samples: Tensor) -> Relaxation:
        """The lines of the given samples (repeats allowed)."""
        return Relaxation(
            self.lower_slope[samples],
            self.upper_slope[samples],
            self.upper_intercept[samples],
            self.unstable[samples],
            None if self.lower_intercept is None else self.lower_intercept[samples],
        )

    def with_lower_slope(self, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """Lower and upper slopes with ``alpha`` (one more leading dimension, the spec rows)
        on the unstable neurons, for a backward pass of shape ``(n, S, ...)``."""
        lower = torch.where(self.unstable.unsqueeze(1), alpha, self.lower_slope.unsqueeze(1))
        return lower, self.upper_slope.unsqueeze(1)


class ActivationOp(BoundOp):
    """Base of element-wise activations bounded by a linear :class:`Relaxation`.

    A subclass gives ``forward``, ``interval``, :meth:`unstable`, :meth:`initial_lower_slope`
    and :meth:`relax`; the backward steps (dense and patches) follow from the lines.
    """

    is_activation = True
    supports_patches = True

    def backward(self, A, input_shape, relaxation=None, alpha=None):
        if alpha is None:
            lower_slope, upper_slope = (
                relaxation.lower_slope.unsqueeze(1),
                relaxation.upper_slope.unsqueeze(1),
            )
        else:
            lower_slope, upper_slope = relaxation.with_lower_slope(alpha)
        # Positive coefficients take the lower line, negative ones the upper line.
        graph = needs_graph(A, lower_slope, upper_slope)
        negative = A.clamp(max=0)
        positive = A.clamp(min=0) if relaxation.lower_intercept is not None or not graph else None
        bias = torch.einsum(
            "nsd,nd->ns", negative.flatten(2), relaxation.upper_intercept.flatten(1)
        )
        if relaxation.lower_intercept is not None:
            bias = bias + torch.einsum(
                "nsd,nd->ns", positive.flatten(2), relaxation.lower_intercept.flatten(1)
            )
        if graph:
            return A * torch.where(A >= 0, lower_slope, upper_slope), bias
        # The same products on the two temporaries (each coefficient is in exactly one of them,
        # the other holds 0), in place.
        return positive.mul_(lower_slope).add_(negative.mul_(upper_slope)), bias

    def backward_patches(self, coeffs, geometry, relaxation=None):
        def windows(line: Tensor) -> Tensor:
            return unfold_map(line, geometry).unsqueeze(1)

        lower_slope, upper_slope = windows(relaxation.lower_slope), windows(relaxation.upper_slope)
        widened = coeffs * torch.where(coeffs >= 0, lower_slope, upper_slope)
        bias = _window_sum(coeffs.clamp(max=0) * windows(relaxation.upper_intercept))
        if relaxation.lower_intercept is not None:
            bias = bias + _window_sum(coeffs.clamp(min=0) * windows(relaxation.lower_intercept))
        return widened, geometry, bias


class _ReLUInterval(torch.autograd.Function):
    """The interval step of ReLU, ``(c, r) -> ((u + l) / 2, (u - l) / 2)`` with
    ``l = relu(c - r)`` and ``u = relu(c + r)``, for certified training.

    Autograd through those eight operations keeps six full-size tensors per layer for the
    backward pass; the gradient needs only where ``c - r`` and ``c + r`` are positive (two
    masks), and the forward pass can reuse its temporaries. The gradient is autograd's:
    ``P = (g_c + g_r) / 2`` where ``c + r > 0``, ``Q = (g_c - g_r) / 2`` where ``c - r > 0``,
    ``(dc, dr) = (P + Q, P - Q)``.
    """

    @staticmethod
    def forward(ctx, center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
        lower = center - radius
        upper = center + radius
        # The masks where the gradient is zero, kept as booleans: a masked fill needs no
        # conversion to the gradient's dtype (a multiplication by a boolean mask copies it).
        lower_off, upper_off = lower <= 0, upper <= 0
        ctx.save_for_backward(lower_off, upper_off)
        lower.clamp_(min=0)
        upper.clamp_(min=0)
        new_radius = torch.sub(upper, lower).mul_(0.5)
        return upper.add_(lower).mul_(0.5), new_radius

    @staticmethod
    def backward(ctx, grad_center: Tensor, grad_radius: Tensor) -> tuple[Tensor, Tensor]:
        lower_off, upper_off = ctx.saved_tensors
        through_upper = (grad_center + grad_radius).mul_(0.5).masked_fill_(upper_off, 0.0)
        through_lower = (grad_center - grad_radius).mul_(0.5).masked_fill_(lower_off, 0.0)
        return through_upper + through_lower, through_upper.sub_(through_lower)


class ReLUOp(ActivationOp):
    """``nn.ReLU`` with the triangle relaxation of CROWN.

    For an unstable neuron (``l < 0 < u``) the upper line is the chord
    ``u / (u - l) * (z - l)`` and the lower line is ``alpha * z`` with ``alpha`` in ``[0, 1]``.
    Without an explicit ``alpha`` the adaptive choice of CROWN is used: slope 1 when ``u > -l``,
    else 0, which minimises the area between the two lines. Stable neurons get exact lines
    (slopes 1 and 1 when active, 0 and 0 when inactive).
    """

    fresh_outputs = True

    def __init__(self, layer: nn.ReLU):
        self.layer = layer

    def forward(self, x, update_running_stats=False):
        return F.relu(x)

    def propagate(self, x, center, radius, training=False, owned=False):
        if not owned or needs_graph(x, center, radius):
            return super().propagate(x, center, radius, training)
        # The arithmetic of ``interval`` on the inputs' own memory: one new tensor, not seven
        # (on the CPU a new full-size tensor costs more in page faults than the arithmetic).
        lower = (center - radius).clamp_(min=0)
        upper = center.add_(radius).clamp_(min=0)
        torch.sub(upper, lower, out=radius).mul_(0.5)
        return x.clamp_(min=0), upper.add_(lower).mul_(0.5), radius

    def interval(self, center, radius):
        if needs_graph(center, radius):
            return _ReLUInterval.apply(center, radius)
        # The same arithmetic on fresh temporaries, in place: on the CPU a new full-size tensor
        # costs its page faults, more than the arithmetic.
        lower = (center - radius).clamp_(min=0)
        upper = (center + radius).clamp_(min=0)
        new_center = (upper + lower).mul_(0.5)
        return new_center, upper.sub_(lower).mul_(0.5)

    def unstable(self, lower: Tensor, upper: Tensor) -> Tensor:
        return (lower < 0) & (upper > 0)

    def initial_lower_slope(self, lower: Tensor, upper: Tensor) -> Tensor:
        """CROWN's adaptive lower slope (1 where ``u > -l``, else 0), alpha-CROWN's start."""
        return (upper > -lower).to(lower.dtype)

    def relax(self, lower: Tensor, upper: Tensor) -> Relaxation:
        unstable = self.unstable(lower, upper)
        active = (lower >= 0).to(lower.dtype)
        # Guard the division; unstable neurons have upper - lower > 0.
        width = torch.where(unstable, upper - lower, torch.ones_like(lower))
        upper_slope = torch.where(unstable, upper / width, active)
        upper_intercept = torch.where(unstable, -upper_slope * lower, torch.zeros_like(lower))
        lower_slope = torch.where(unstable, self.initial_lower_slope(lower, upper), active)
        return Relaxation(lower_slope, upper_slope, upper_intercept, unstable)


@dataclass(frozen=True)
class _Registration:
    op_class: type[BoundOp]
    note: str


#: Layer type -> its bound operation, in registration order (see :func:`register_op`).
OP_REGISTRY: dict[type[nn.Module], _Registration] = {}


def register_op(layer_type: type[nn.Module], op_class: type[BoundOp], *, note: str = "") -> None:
    """Make the native engine bound layers of ``layer_type`` with ``op_class``.

    Matching is by exact type: a subclass of a registered layer may override ``forward`` and is
    refused until it is registered itself.

    Parameters
    ----------
    layer_type : type of torch.nn.Module
        The layer class.
    op_class : type of BoundOp
        Its bound operation; ``op_class(layer)`` wraps one layer and raises
        :class:`~certdistill.exceptions.UnsupportedLayerError` for configurations it cannot bound.
    note : str, default=""
        Restrictions shown in the supported-layer text, e.g. ``"groups=1, dilation=1"``.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type must be a torch.nn.Module class, got {layer_type!r}")
    if not (isinstance(op_class, type) and issubclass(op_class, BoundOp)):
        raise TypeError(f"op_class must be a BoundOp subclass, got {op_class!r}")
    OP_REGISTRY[layer_type] = _Registration(op_class, note)


def supported_layers_text() -> str:
    """The sentence listing the supported layers, generated from the registry."""
    names = [
        f"{layer_type.__name__} ({entry.note})" if entry.note else layer_type.__name__
        for layer_type, entry in OP_REGISTRY.items()
    ]
    return (
        f"Supported layers: {', '.join(names)}, nested Sequential, GraphNetwork and "
        "torch.fx-traceable modules of them (with + of two branches, relu and flatten). "
        "For other layers use backend='auto_lirpa'."
    )


register_op(nn.Linear, LinearOp)
register_op(nn.Conv2d, Conv2dOp, note="groups=1, dilation=1")
register_op(nn.ReLU, ReLUOp)
register_op(nn.Flatten, ReshapeOp)
register_op(nn.Unflatten, ReshapeOp)
register_op(Reshape, ReshapeOp)
register_op(nn.BatchNorm1d, ElementwiseAffineOp)
register_op(nn.BatchNorm2d, ElementwiseAffineOp)
register_op(nn.AvgPool2d, AvgPool2dOp)
register_op(nn.Identity, IdentityOp)
register_op(nn.Dropout, DropoutOp)
register_op(ConstantAffine, ConstantAffineOp, note="constants broadcast over a sample")
register_op(nn.ZeroPad2d, ZeroPad2dOp, note="non-negative padding")
register_op(Add, AddOp, note="two branches of one shape, in a GraphNetwork or a traced module")


def op_for(layer: nn.Module, name: str) -> BoundOp:
    # Exact type first, so that a user subclass overriding forward() is not silently mis-bounded.
    entry = OP_REGISTRY.get(type(layer))
    if entry is None:
        raise UnsupportedLayerError(
            f"Layer '{name}' ({layer!r}) is not supported by the native bound engine. "
            f"{supported_layers_text()}"
        )
    return entry.op_class(layer)


def build_ops(module: nn.Module) -> list[BoundOp]:
    """Flatten a (nested) ``nn.Sequential`` into a list of bound operations.

    Parameters
    ----------
    module : torch.nn.Module
        An ``nn.Sequential`` of supported layers, or a single supported layer.

    Returns
    -------
    list of BoundOp

    Raises
    ------
    UnsupportedLayerError
        If the module, or any layer in it, is not supported.
    """
    ops: list[BoundOp] = []

    def visit(layer: nn.Module, name: str) -> None:
        if type(layer) is nn.Sequential:
            for child_name, child in layer.named_children():
                visit(child, f"{name}.{child_name}" if name else child_name)
        else:
            ops.append(op_for(layer, name or type(layer).__name__))

    visit(module, "")
    if not ops:
        raise UnsupportedLayerError("The module has no layers to propagate bounds through.")
    return ops


def numel(shape: torch.Size) -> int:
    return math.prod(shape)
