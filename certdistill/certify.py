"""Certification of trained networks: per-sample certificates and certified radii."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from certdistill.bounds import METHODS, BoundEngine

BACKENDS = ("native", "auto_lirpa")


@dataclass(frozen=True)
class Certificate:
    """Result of :func:`certify`.

    Attributes
    ----------
    prediction : ndarray of shape (n,)
        Reference class of each sample: the given label, or the clean prediction.
    margins : ndarray of shape (n, n_classes)
        Lower bound of ``z_ref - z_j`` over the perturbation set; ``+inf`` where ``j == ref``.
    certified : ndarray of shape (n,)
        True where every margin is positive: the reference class provably wins everywhere in the
        ball (with labels given: the sample is robustly classified correctly).
    eps : float or ndarray
        Radius of the ball the certificate holds for.
    method : str
        Bound method used.
    """

    prediction: np.ndarray
    margins: np.ndarray
    certified: np.ndarray
    eps: float | np.ndarray
    method: str

    def __len__(self) -> int:
        return len(self.prediction)

    @property
    def certified_fraction(self) -> float:
        """Fraction of certified samples (certified accuracy when labels were given)."""
        return float(np.mean(self.certified)) if len(self.certified) else float("nan")


def certify(
    module: nn.Module,
    X,
    eps,
    *,
    method: str = "crown",
    y=None,
    lower=None,
    upper=None,
    batch_size: int = 256,
    backend: str = "native",
) -> Certificate:
    """Certify that each sample's reference class wins everywhere in an L-infinity ball.

    Parameters
    ----------
    module : torch.nn.Module
        An ``nn.Sequential`` of supported layers (any module with ``backend="auto_lirpa"``).
        It is evaluated in eval mode; its train/eval state is restored afterwards.
    X : array-like or Tensor of shape (n, ...)
        Inputs, shaped as the module expects them.
    eps : float or array-like
        Radius of the ball: a scalar or an array broadcastable to one sample (per feature).
    method : {"crown", "ibp", "crown-ibp", "alpha-crown"}, default="crown"
    y : array-like of shape (n,), optional
        Integer labels in ``[0, n_classes)``. When given, the certificate says the sample is
        robustly *correct*; otherwise that the clean prediction is robust.
    lower, upper : float or array-like, optional
        Input domain (e.g. ``0`` and ``1`` for images) intersected with the ball.
    batch_size : int, default=256
        Samples bounded at once; bounds memory use.
    backend : {"native", "auto_lirpa"}, default="native"

    Returns
    -------
    Certificate

    Raises
    ------
    ValueError
        For NaN or infinite inputs, a negative or non-finite eps, a shape that does not fit the
        module, ``lower > upper``, inputs outside the domain, or labels outside the classes.
    UnsupportedLayerError
        If the native engine cannot handle a layer of the module.
    """
    problem = _validate(module, X, method=method, y=y, lower=lower, upper=upper,
                        batch_size=batch_size, backend=backend)
    eps_tensor = _validate_eps(eps, problem.X)
    margins = _margins(problem, eps_tensor, problem.reference, method)
    margins_np = margins.cpu().numpy()
    eps_out = float(eps_tensor) if eps_tensor.dim() == 0 else eps_tensor.cpu().numpy()
    return Certificate(
        prediction=problem.reference.cpu().numpy(),
        margins=margins_np,
        certified=np.all(margins_np > 0, axis=1),
        eps=eps_out,
        method=method,
    )


def certified_radius(
    module: nn.Module,
    X,
    *,
    method: str = "crown",
    y=None,
    lower=None,
    upper=None,
    max_eps: float = 1.0,
    tol: float = 1e-3,
    batch_size: int = 256,
    backend: str = "native",
) -> np.ndarray:
    """Largest certified L-infinity radius of each sample, by bisection on eps.

    Parameters
    ----------
    module : torch.nn.Module
        As in :func:`certify`.
    X : array-like or Tensor of shape (n, ...)
        As in :func:`certify`.
    method : {"crown", "ibp", "crown-ibp", "alpha-crown"}, default="crown"
        As in :func:`certify`.
    y : array-like of shape (n,), optional
        As in :func:`certify`; with labels the radius is 0 for misclassified samples.
    lower, upper : float or array-like, optional
        As in :func:`certify`.
    max_eps : float, default=1.0
        Upper end of the search interval; samples certified there get ``max_eps``.
    tol : float, default=1e-3
        Width of the final bisection interval.
    batch_size : int, default=256
        As in :func:`certify`.
    backend : {"native", "auto_lirpa"}, default="native"
        As in :func:`certify`.

    Returns
    -------
    ndarray of shape (n,)
        A radius at which each sample is certified (0 where not even the clean point is: a
        misclassified or tied sample). The true certifiable radius of the method lies within
        ``tol`` above it.
    """
    if not (np.isfinite(max_eps) and max_eps > 0):
        raise ValueError(f"max_eps must be a positive finite number, got {max_eps!r}.")
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}.")
    problem = _validate(module, X, method=method, y=y, lower=lower, upper=upper,
                        batch_size=batch_size, backend=backend)
    n = problem.X.shape[0]
    ones = (1,) * (problem.X.dim() - 1)
    dtype, device = problem.X.dtype, problem.X.device

    def certified_at(eps_values: Tensor, rows: Tensor) -> Tensor:
        sub = problem.subset(rows)
        margins = _margins(sub, eps_values.view(-1, *ones), sub.reference, method)
        return (margins > 0).all(dim=1)

    low = torch.zeros(n, dtype=dtype, device=device)
    high = torch.full((n,), float(max_eps), dtype=dtype, device=device)
    everyone = torch.arange(n, device=device)
    at_max = certified_at(high, everyone)
    low[at_max] = max_eps
    at_zero = certified_at(low.new_zeros(n), everyone)
    active = everyone[~at_max & at_zero]
    for _ in range(max(1, math.ceil(math.log2(max_eps / tol)))):
        if active.numel() == 0:
            break
        middle = (low[active] + high[active]) / 2
        ok = certified_at(middle, active)
        low[active[ok]] = middle[ok]
        high[active[~ok]] = middle[~ok]
    return low.cpu().numpy().astype(np.float64)


# ---------------------------------------------------------------------------- internals
@dataclass
class _Problem:
    """Validated inputs of a certification call, on the module's device."""

    module: nn.Module
    X: Tensor
    reference: Tensor
    lower: Tensor | None
    upper: Tensor | None
    batch_size: int
    backend: str

    def subset(self, rows: Tensor) -> _Problem:
        return _Problem(self.module, self.X[rows], self.reference[rows], self.lower,
                        self.upper, self.batch_size, self.backend)


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in module.parameters():
        return tensor.device, tensor.dtype
    for tensor in module.buffers():
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's previous state."""
    states = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for submodule, training in states:
            submodule.training = training


def _as_tensor(value, name: str, device, dtype) -> Tensor:
    if isinstance(value, Tensor):
        tensor = value.detach().to(device=device, dtype=dtype)
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=dtype,
                                     device=device)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{name} must be numeric, got {type(value).__name__}: {error}"
            ) from None
    return tensor


def _validate(module, X, *, method, y, lower, upper, batch_size, backend) -> _Problem:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {BACKENDS}.")
    if not (isinstance(batch_size, int | np.integer) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    device, dtype = _module_device_dtype(module)
    X = _as_tensor(X, "X", device, dtype)
    if X.dim() < 2 or X.shape[0] == 0:
        raise ValueError(
            f"X must have shape (n_samples, ...) with at least one sample, got {tuple(X.shape)}."
        )
    if not torch.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values.")
    domain = []
    for name, bound in (("lower", lower), ("upper", upper)):
        if bound is None:
            domain.append(None)
            continue
        tensor = _as_tensor(bound, name, device, dtype)
        _check_broadcast(tensor, X, name)
        if torch.isnan(tensor).any():
            raise ValueError(f"{name} contains NaN.")
        domain.append(tensor)
    lower_t, upper_t = domain
    if lower_t is not None and upper_t is not None and (lower_t > upper_t).any():
        raise ValueError("lower must not exceed upper anywhere.")
    if lower_t is not None and (X < lower_t).any():
        raise ValueError("X has values below `lower`: inputs must lie inside the domain.")
    if upper_t is not None and (X > upper_t).any():
        raise ValueError("X has values above `upper`: inputs must lie inside the domain.")

    with torch.no_grad(), eval_mode(module):
        try:
            logits = module(X[:1])
        except (RuntimeError, ValueError, IndexError) as error:
            raise ValueError(
                f"X with sample shape {tuple(X.shape[1:])} does not fit the module: {error}"
            ) from None
        if logits.dim() != 2:
            raise ValueError(
                f"The module must output logits of shape (n, n_classes), got {tuple(logits.shape)}."
            )
        n_classes = logits.shape[1]
        if y is None:
            reference = _predict(module, X, batch_size)
        else:
            reference = _validate_labels(y, X.shape[0], n_classes, device)
    return _Problem(module, X, reference, lower_t, upper_t, int(batch_size), backend)


def _check_broadcast(tensor: Tensor, X: Tensor, name: str) -> None:
    try:
        shape = torch.broadcast_shapes(tensor.shape, X.shape[1:])
    except RuntimeError:
        shape = None
    if shape != X.shape[1:]:
        raise ValueError(
            f"{name} of shape {tuple(tensor.shape)} does not broadcast to one sample of shape "
            f"{tuple(X.shape[1:])}."
        )


def _validate_eps(eps, X: Tensor) -> Tensor:
    tensor = _as_tensor(eps, "eps", X.device, X.dtype)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"eps must be finite, got {eps!r}.")
    if (tensor < 0).any():
        raise ValueError(f"eps must be non-negative, got {eps!r}.")
    _check_broadcast(tensor, X, "eps")
    return tensor


def _validate_labels(y, n: int, n_classes: int, device) -> Tensor:
    labels = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y)
    if labels.shape != (n,):
        raise ValueError(f"y must have shape ({n},), got {labels.shape}.")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError("y must hold integer class indices.")
    elif labels.dtype.kind not in "iub":
        raise ValueError(
            f"y must hold integer class indices in [0, {n_classes}), got dtype {labels.dtype}."
        )
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"y holds classes outside [0, {n_classes}) (the module has {n_classes} outputs): "
            f"found {labels.min()}..{labels.max()}."
        )
    return torch.as_tensor(labels.astype(np.int64), device=device)


def _predict(module: nn.Module, X: Tensor, batch_size: int) -> Tensor:
    return torch.cat([module(X[i : i + batch_size]).argmax(1)
                      for i in range(0, X.shape[0], batch_size)])


def _margins(problem: _Problem, eps: Tensor, reference: Tensor, method: str) -> Tensor:
    """Margin lower bounds in chunks of ``batch_size``, in eval mode, without gradients."""
    per_sample = eps.dim() == problem.X.dim() and eps.shape[0] == problem.X.shape[0]
    chunks = []
    with torch.no_grad(), eval_mode(problem.module):
        engine = _BACKEND_FACTORIES[problem.backend](problem.module)
        for start in range(0, problem.X.shape[0], problem.batch_size):
            rows = slice(start, start + problem.batch_size)
            chunks.append(
                engine.margin_lower_bounds(
                    problem.X[rows], eps[rows] if per_sample else eps, reference[rows],
                    method=method, lower=problem.lower, upper=problem.upper,
                )
            )
    return torch.cat(chunks)


def _lirpa_bounds(module: nn.Module):
    from certdistill.bounds.lirpa import LirpaBounds  # optional dependency, imported on use

    return LirpaBounds(module)


#: Backend name -> factory of an object with ``margin_lower_bounds`` (the engine's signature).
_BACKEND_FACTORIES = {"native": BoundEngine, "auto_lirpa": _lirpa_bounds}
