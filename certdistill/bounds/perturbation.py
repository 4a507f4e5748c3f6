"""The perturbation set: an L-infinity ball intersected with the input domain.

:class:`Perturbation` is the one home of the radius ``eps`` and the domain ``[lower, upper]``.
It is validated once, where a value enters the library (an estimator's ``fit``, the functional
:func:`~certdistill.certify`, an attack), against the shape of one sample, and then travels as a
typed value: the engine, the estimators' training steps, the teacher's outputs and the attacks
only ask it for the input box of a batch and never check eps again.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from certdistill.bounds.inplace import needs_graph

__all__ = ["Perturbation"]


def _as_tensor(value, name: str, dtype: torch.dtype, device) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(device=device, dtype=dtype)
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numeric, got {type(value).__name__}: {error}") from None
    return torch.as_tensor(array, dtype=dtype, device=device)


def _fit_to_sample(tensor: Tensor, name: str, sample_shape: tuple[int, ...]) -> Tensor:
    """Return ``tensor`` broadcastable to one sample; a flat array with one value per feature is
    reshaped to the sample shape (estimators see flat rows, their modules shaped inputs)."""
    if tensor.dim() == 0:
        return tensor
    if tensor.numel() == math.prod(sample_shape) and tensor.dim() == 1 and len(sample_shape) > 1:
        return tensor.reshape(sample_shape)
    try:
        shape = torch.broadcast_shapes(tensor.shape, sample_shape)
    except RuntimeError:
        shape = None
    if tensor.dim() > len(sample_shape) or shape != tuple(sample_shape):
        raise ValueError(
            f"{name} of shape {tuple(tensor.shape)} does not broadcast to one sample of shape "
            f"{tuple(sample_shape)}: give a scalar or one value per feature."
        )
    return tensor


@dataclass(frozen=True, eq=False)
class Perturbation:
    """The set ``{x' : |x' - x|_inf <= eps} ∩ [lower, upper]`` around each sample ``x``.

    Build it with :meth:`create`, which validates every value once; the other constructors
    (:meth:`with_eps`, :meth:`scaled`, :meth:`for_rows`, :meth:`to`) derive new values from a
    validated one without checking again.

    Attributes
    ----------
    eps : Tensor
        Radius: a scalar tensor, one value per feature (shape broadcastable to one sample), or,
        with ``per_sample``, one row per sample (shape ``(n, ...)``).
    lower, upper : Tensor or None
        Input domain, broadcastable to one sample (``None``: unbounded on that side), or, with
        ``per_sample`` from :meth:`from_boxes`, one box per sample (shape ``(n, ...)``).
    sample_shape : tuple of int
        Shape of one sample as the module sees it.
    per_sample : bool
        True when ``eps`` (and, for boxes, ``lower`` and ``upper``) have a leading batch
        dimension (one set per sample).
    """

    eps: Tensor
    lower: Tensor | None
    upper: Tensor | None
    sample_shape: tuple[int, ...]
    per_sample: bool = False

    # ------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        eps,
        sample_shape: Sequence[int],
        *,
        lower=None,
        upper=None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Perturbation:
        """Validate ``eps`` and the domain against the shape of one sample.

        Parameters
        ----------
        eps : float, array-like or Tensor
            Radius: a scalar or one value per feature (an array broadcastable to one sample,
            or flat with one value per feature). Must be finite and non-negative.
        sample_shape : sequence of int
            Shape of one sample as the module expects it.
        lower, upper : float, array-like, Tensor or None
            Input domain, scalars or one value per feature; ``lower <= upper`` everywhere.
        dtype : torch.dtype, default=torch.float32
            Floating-point type of the bounds (the module's).
        device : torch.device or str, default="cpu"
            Device of the bounds (the module's).

        Returns
        -------
        Perturbation

        Raises
        ------
        ValueError
            For a non-numeric, NaN, infinite or negative eps, a shape that does not fit one
            sample, a NaN domain bound, or ``lower > upper`` somewhere.
        """
        if isinstance(eps, Perturbation):
            raise TypeError("eps is already a Perturbation: pass it on as it is.")
        sample_shape = tuple(int(s) for s in sample_shape)
        eps_t = _radius(eps, sample_shape, dtype, device)
        domain = []
        for name, bound in (("lower", lower), ("upper", upper)):
            if bound is None:
                domain.append(None)
                continue
            tensor = _fit_to_sample(_as_tensor(bound, name, dtype, device), name, sample_shape)
            if bool(torch.isnan(tensor).any()):
                raise ValueError(f"{name} contains NaN.")
            domain.append(tensor)
        lower_t, upper_t = domain
        if lower_t is not None and upper_t is not None and bool((lower_t > upper_t).any()):
            raise ValueError("lower must not exceed upper anywhere.")
        return cls(eps_t, lower_t, upper_t, sample_shape)

    @classmethod
    def from_boxes(
        cls,
        lower,
        upper,
        sample_shape: Sequence[int],
        *,
        eps=None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Perturbation:
        """One box ``[lower[i], upper[i]]`` per sample (VNN-LIB's input constraints), optionally
        intersected with the ball of radius ``eps`` around each sample.

        The corners are rounded outwards to ``dtype``, so the box the bounds hold for contains
        the one given in any precision.

        Parameters
        ----------
        lower, upper : array-like or Tensor of shape (n, *sample_shape)
            Finite corners, ``lower <= upper`` everywhere.
        sample_shape : sequence of int
            Shape of one sample as the module expects it.
        eps : float or array-like, optional
            Radius of a ball around each sample intersected with its box (validated as in
            :meth:`create`); by default the whole box.
        dtype, device
            As in :meth:`create`.

        Returns
        -------
        Perturbation
            With ``per_sample`` set; :meth:`bounds` of the samples give their boxes (for samples
            inside their boxes: ``certify`` checks that).

        Raises
        ------
        ValueError
            For a shape other than ``(n, *sample_shape)``, NaN or infinite corners, or
            ``lower > upper`` somewhere.
        """
        sample_shape = tuple(int(s) for s in sample_shape)
        corners = []
        for name, bound in (("lower", lower), ("upper", upper)):
            tensor = _as_tensor(bound, name, torch.float64, device)
            if tensor.dim() != len(sample_shape) + 1 or tuple(tensor.shape[1:]) != sample_shape:
                raise ValueError(
                    f"{name} of shape {tuple(tensor.shape)} is not one box corner per sample: "
                    f"expected (n, *{sample_shape})."
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name} must be finite (NaN or infinite corner found).")
            corners.append(tensor)
        lo, hi = corners
        if lo.shape != hi.shape:
            raise ValueError(
                f"lower {tuple(lo.shape)} and upper {tuple(hi.shape)} differ in shape."
            )
        if bool((lo > hi).any()):
            raise ValueError("lower must not exceed upper anywhere.")
        lo_r, hi_r = _round_outwards(lo, hi, dtype)
        if eps is None:
            radius = _round_outwards(lo, hi - lo, dtype)[1]  # covers the box from any inner x
        else:
            radius = _radius(eps, sample_shape, dtype, device)
        return cls(radius, lo_r, hi_r, sample_shape, per_sample=True)

    def with_eps(self, eps) -> Perturbation:
        """The same domain with another radius, validated as in :meth:`create`."""
        if isinstance(eps, Perturbation):
            raise TypeError("eps is already a Perturbation: pass it on as it is.")
        eps_t = _radius(eps, self.sample_shape, self.eps.dtype, self.eps.device)
        return replace(self, eps=eps_t, per_sample=False)

    def scaled(self, factor: float) -> Perturbation:
        """The same domain with the radius multiplied by ``factor >= 0`` (not re-validated: for
        schedules that move between 0 and a validated radius)."""
        return replace(self, eps=self.eps * float(factor))

    def with_sample_radii(self, radii: Tensor) -> Perturbation:
        """One scalar radius per sample (``radii`` of shape ``(n,)``), same domain (the boxes of
        :meth:`from_boxes` included: the rows must be the same samples)."""
        eps = radii.to(device=self.eps.device, dtype=self.eps.dtype)
        return replace(self, eps=eps.view(-1, *([1] * len(self.sample_shape))), per_sample=True)

    def for_rows(self, rows) -> Perturbation:
        """The perturbation of a subset of the samples (only per-sample sets change)."""
        if not self.per_sample:
            return self

        def pick(tensor: Tensor | None) -> Tensor | None:
            if tensor is None or tensor.dim() <= len(self.sample_shape):
                return tensor
            return tensor[rows]

        return replace(self, eps=pick(self.eps), lower=pick(self.lower), upper=pick(self.upper))

    @property
    def has_boxes(self) -> bool:
        """True when the domain is one box per sample (:meth:`from_boxes`)."""
        return (
            self.per_sample
            and self.lower is not None
            and (self.lower.dim() > len(self.sample_shape))
        )

    def reshaped(self, sample_shape: Sequence[int]) -> Perturbation:
        """The same set for samples reshaped to ``sample_shape`` (same number of features)."""
        sample_shape = tuple(int(s) for s in sample_shape)
        if sample_shape == self.sample_shape:
            return self
        if self.per_sample or math.prod(sample_shape) != math.prod(self.sample_shape):
            raise ValueError(
                f"cannot reshape a perturbation of samples {self.sample_shape} to {sample_shape}"
            )

        def fit(tensor: Tensor | None) -> Tensor | None:
            if tensor is None or tensor.dim() == 0:
                return tensor
            return tensor.expand(self.sample_shape).reshape(sample_shape)

        return replace(
            self,
            eps=fit(self.eps),
            lower=fit(self.lower),
            upper=fit(self.upper),
            sample_shape=sample_shape,
        )

    def to(self, device=None, dtype: torch.dtype | None = None) -> Perturbation:
        """The same perturbation with its tensors on ``device`` and of ``dtype``."""

        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(device=device, dtype=dtype)

        return replace(self, eps=move(self.eps), lower=move(self.lower), upper=move(self.upper))

    # ------------------------------------------------------------------ use
    def box(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Centre and radius of the set around each sample of ``x`` (shape ``(n, *sample)``).

        Returns
        -------
        center, radius : Tensor
            Of the shape of ``x``: the set is ``center - radius <= x' <= center + radius``.
        """
        if self.lower is None and self.upper is None:
            return x, self.eps.expand_as(x)
        lo, hi = self.bounds(x)
        if needs_graph(lo, hi):
            return (hi + lo) / 2, (hi - lo) / 2
        # In place on the fresh corners (a new full-size tensor costs its page faults).
        center = (hi + lo).mul_(0.5)
        return center, hi.sub_(lo).mul_(0.5)

    def bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Lower and upper corners of the set around each sample of ``x``."""
        lo, hi = x - self.eps, x + self.eps
        if needs_graph(lo, hi):
            if self.lower is not None:
                lo = torch.maximum(lo, self.lower)
            if self.upper is not None:
                hi = torch.minimum(hi, self.upper)
            return lo, hi
        if self.lower is not None:
            lo = torch.maximum(lo, self.lower, out=lo)
        if self.upper is not None:
            hi = torch.minimum(hi, self.upper, out=hi)
        return lo, hi

    def outside_domain(self, x: Tensor) -> str | None:
        """A message if some value of ``x`` lies outside ``[lower, upper]``, else None."""
        if self.lower is None and self.upper is None:
            return None
        low = high = x
        if x.dim() > len(self.sample_shape) and not self.per_sample:
            # A domain shared by all samples: compare each feature's extremes (one pass, no
            # full-size mask).
            low, high = torch.aminmax(x, dim=0)
        if self.lower is not None and bool((low < self.lower).any()):
            return "X has values below `lower`: inputs must lie inside the domain."
        if self.upper is not None and bool((high > self.upper).any()):
            return "X has values above `upper`: inputs must lie inside the domain."
        return None

    @property
    def eps_value(self) -> float | np.ndarray:
        """The radius as a Python float (scalar eps) or a NumPy array."""
        if self.eps.dim() == 0:
            return float(self.eps)
        return self.eps.detach().cpu().numpy()

    @property
    def level(self) -> float:
        """Mean radius (0 means no perturbation: the clean input only)."""
        return float(self.eps.mean()) if self.eps.numel() else 0.0

    def __repr__(self) -> str:
        def text(tensor):
            if tensor is None:
                return "None"
            return f"{float(tensor):g}" if tensor.numel() == 1 else f"<{tuple(tensor.shape)}>"

        return (
            f"Perturbation(eps={text(self.eps)}, lower={text(self.lower)}, "
            f"upper={text(self.upper)}, sample_shape={self.sample_shape})"
        )


def _round_outwards(lower: Tensor, upper: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``lower`` rounded down and ``upper`` rounded up to ``dtype`` (from float64)."""
    lo, hi = lower.to(dtype), upper.to(dtype)
    lo = torch.where(lo.double() > lower, torch.nextafter(lo, torch.full_like(lo, -math.inf)), lo)
    hi = torch.where(hi.double() < upper, torch.nextafter(hi, torch.full_like(hi, math.inf)), hi)
    return lo, hi


def _radius(eps, sample_shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    eps_t = _fit_to_sample(_as_tensor(eps, "eps", dtype, device), "eps", sample_shape)
    if not bool(torch.isfinite(eps_t).all()):
        raise ValueError(f"eps must be finite, got {_short(eps)}.")
    if bool((eps_t < 0).any()):
        raise ValueError(f"eps must be non-negative, got {_short(eps)}.")
    return eps_t


def _short(value) -> str:
    if isinstance(value, numbers.Real):
        return repr(value)
    array = np.asarray(value.detach().cpu() if isinstance(value, Tensor) else value)
    return repr(value) if array.size <= 4 else f"an array of shape {array.shape}"
