"""What every certification shares: the validated problem, its result, and the module's set-up.

:class:`Problem` validates the inputs of :func:`~certdistill.certify` once (module, ``X``, the
perturbation, labels) and runs the cascade of bound methods on them; :class:`Certificate` is
what it returns. The in-memory path (:mod:`certdistill.certification.certify`) and the streamed
one (:mod:`certdistill.certification.streaming`) both build on this module, which imports
neither.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from certdistill.bounds import Perturbation, engine_for
from certdistill.certification.sparse_rows import SparseRows
from certdistill.verify.cascade import CLEAN_PREDICTION, Cascade, CascadeOptions, CascadeState

__all__ = [
    "BACKENDS",
    "STATUSES",
    "Certificate",
    "Problem",
    "check_radius_search",
    "eval_mode",
    "module_device_dtype",
    "output_width",
]

#: Who computes the bounds: certdistill's own engine, or auto_LiRPA (optional).
BACKENDS = ("native", "auto_lirpa")

#: Per-sample outcomes of a certification.
STATUSES = ("certified", "falsified", "unknown")


@dataclass(frozen=True)
class Certificate:
    """Result of :func:`certify`.

    Attributes
    ----------
    prediction : ndarray of shape (n,)
        Reference class of each sample: the given label, or the clean prediction.
    margins : ndarray of shape (n, n_classes)
        Lower bound of ``z_ref - z_j`` over the perturbation set; ``+inf`` where ``j == ref``.
        With several methods, per margin the largest of the bounds computed for the sample.
    certified : ndarray of shape (n,)
        True where every margin is positive: the reference class provably wins everywhere in the
        ball (with labels given: the sample is robustly classified correctly).
    eps : float or ndarray
        Radius of the ball the certificate holds for.
    method : str
        Bound method(s) used, joined by ``"+"`` for a cascade.
    status : ndarray of shape (n,)
        ``"certified"``, ``"falsified"`` (a concrete input in the ball and the domain at which the
        module's decision differs from the reference; with labels, a wrong clean prediction) or
        ``"unknown"`` (the bounds could not decide).
    decided_by : ndarray of shape (n,)
        Which stage settled the sample: the bound method that certified it,
        ``"clean-prediction"`` for a wrong clean prediction, ``""`` where unknown.
    counterexample : ndarray or SparseRows of shape (n, *sample_shape)
        An input in the ball and the domain at which the decision differs from the reference,
        where ``status == "falsified"``; NaN elsewhere. For streamed inputs (a memory-mapped
        array, an iterable of batches) a
        :class:`~certdistill.certification.sparse_rows.SparseRows`: it
        stores the falsified rows only and is indexed like an array.
    stage_seconds : dict of str to float
        Wall-clock seconds of each stage that ran.
    """

    prediction: np.ndarray
    margins: np.ndarray
    certified: np.ndarray
    eps: float | np.ndarray
    method: str
    status: np.ndarray
    decided_by: np.ndarray
    counterexample: np.ndarray | SparseRows
    stage_seconds: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prediction)

    @property
    def certified_fraction(self) -> float:
        """Fraction of certified samples (certified accuracy when labels were given)."""
        return float(np.mean(self.certified)) if len(self.certified) else float("nan")

    @property
    def decided_fraction(self) -> float:
        """Fraction of samples certified or falsified (not unknown)."""
        return float(np.mean(self.status != "unknown")) if len(self.status) else float("nan")


def check_radius_search(max_eps, tol) -> tuple[float, float]:
    """Validate the bisection's ``max_eps`` and ``tol`` (positive finite scalars)."""
    values = []
    for name, value in (("max_eps", max_eps), ("tol", tol)):
        number = math.nan
        if np.ndim(value) == 0 and not isinstance(value, str | bytes | bool):
            try:
                number = float(value)
            except (TypeError, ValueError):
                pass
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
        values.append(number)
    return values[0], values[1]


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


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in module.parameters():
        return tensor.device, tensor.dtype
    for tensor in module.buffers():
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def _as_tensor(value, name: str, device, dtype) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(device=device, dtype=dtype)
    try:
        return torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=dtype, device=device)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numeric, got {type(value).__name__}: {error}") from None


#: module -> (sample shape, number of outputs): the one-sample shape probe of each module.
_OUTPUT_WIDTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def output_width(module: nn.Module, x: Tensor) -> int:
    """Number of logits of ``module`` for samples shaped like ``x``'s (probed once)."""
    cached = _OUTPUT_WIDTHS.get(module)
    if cached is not None and cached[0] == tuple(x.shape[1:]):
        return cached[1]
    with torch.no_grad():
        try:
            logits = module(x[:1])
        except (RuntimeError, ValueError, IndexError) as error:
            expected = _expected_input(module)
            raise ValueError(
                f"X with sample shape {tuple(x.shape[1:])} does not fit the module: "
                + (expected or f"its forward pass on one sample failed ({error})")
            ) from None
    if logits.dim() != 2:
        raise ValueError(
            f"The module must output logits of shape (n, n_classes), got {tuple(logits.shape)}."
        )
    _OUTPUT_WIDTHS[module] = (tuple(x.shape[1:]), int(logits.shape[1]))
    return int(logits.shape[1])


def _expected_input(module: nn.Module) -> str | None:
    """What the first layer of a sequential module takes, in words (None if not known)."""
    for layer in module.modules():
        if isinstance(layer, nn.Sequential | nn.Flatten | nn.Identity | nn.Dropout):
            continue
        if isinstance(layer, nn.Linear):
            return f"its first layer, Linear, takes {layer.in_features} features per sample."
        if isinstance(layer, nn.Conv2d):
            return (
                f"its first layer, Conv2d, takes samples of shape ({layer.in_channels}, "
                "height, width)."
            )
        return None
    return None


def _is_box(bound, X: Tensor) -> bool:
    """``bound`` holds one corner per sample of ``X`` (a box per sample, not a domain)."""
    return (
        bound is not None and np.ndim(bound) == X.dim() and tuple(np.shape(bound)) == tuple(X.shape)
    )


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


def _bounder(module: nn.Module, backend: str):
    if backend == "auto_lirpa":
        from certdistill.bounds.lirpa import LirpaBounds  # optional dependency, imported on use

        return LirpaBounds(module)
    return engine_for(module)


@dataclass
class Problem:
    """Validated inputs of a certification, on the module's device."""

    module: nn.Module
    X: Tensor
    perturbation: Perturbation
    labels: Tensor | None
    n_classes: int
    batch_size: int = 256
    backend: str = "native"

    @classmethod
    def create(
        cls, module, X, eps, *, y=None, lower=None, upper=None, batch_size=256, backend="native"
    ) -> Problem:
        """Validate the inputs of :func:`certify` (a constant number of passes over ``X``)."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}; choose one of {BACKENDS}.")
        if not (isinstance(batch_size, int | np.integer) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        device, dtype = module_device_dtype(module)
        X = _as_tensor(X, "X", device, dtype)
        if X.dim() < 2 or X.shape[0] == 0:
            raise ValueError(
                "X must have shape (n_samples, ...) with at least one sample, got "
                f"{tuple(X.shape)}."
            )
        # One pass without a full-size mask: NaN propagates into the extremes, and an
        # infinite value is one of them.
        low, high = torch.aminmax(X)
        if not math.isfinite(float(low) + float(high)):
            raise ValueError("X contains NaN or infinite values.")
        if backend == "native":
            # Layers first: an unsupported one must be named before a forward pass trips on it.
            engine_for(module)
        if eps is None or _is_box(lower, X) or _is_box(upper, X):
            if lower is None or upper is None:
                raise ValueError(
                    "a box per sample needs both lower and upper of the shape of X "
                    f"{tuple(X.shape)} (eps=None certifies the whole box)."
                )
            perturbation = Perturbation.from_boxes(
                lower, upper, X.shape[1:], eps=eps, dtype=dtype, device=device
            )
            if perturbation.lower.shape[0] != X.shape[0]:
                raise ValueError(
                    f"lower and upper hold {perturbation.lower.shape[0]} boxes for "
                    f"{X.shape[0]} samples of X: give one box per sample."
                )
        elif isinstance(eps, Perturbation):
            if lower is not None or upper is not None:
                raise ValueError("give the domain inside the Perturbation, not as lower/upper.")
            if tuple(eps.sample_shape) != tuple(X.shape[1:]):
                raise ValueError(
                    f"the perturbation is for samples of shape {eps.sample_shape}, X has "
                    f"samples of shape {tuple(X.shape[1:])}."
                )
            perturbation = eps.to(device=device, dtype=dtype)
        else:
            perturbation = Perturbation.create(
                eps, X.shape[1:], lower=lower, upper=upper, dtype=dtype, device=device
            )
        problem = perturbation.outside_domain(X)
        if problem is not None:
            raise ValueError(problem)
        with eval_mode(module):
            n_classes = output_width(module, X)
        labels = None if y is None else _validate_labels(y, X.shape[0], n_classes, device)
        return cls(module, X, perturbation, labels, n_classes, int(batch_size), backend)

    # ------------------------------------------------------------- cascade
    def _cascade(self, options: CascadeOptions | None) -> Cascade:
        return Cascade(self.module, _bounder(self.module, self.backend), self.batch_size, options)

    def _run(
        self,
        stages: Sequence[str],
        X: Tensor,
        perturbation: Perturbation,
        labels: Tensor | None,
        options: CascadeOptions | None,
        deadline: float | None = None,
    ) -> CascadeState:
        with torch.no_grad(), eval_mode(self.module):
            return self._cascade(options).run(
                stages, X, perturbation, labels, self.n_classes, deadline=deadline
            )

    def certify(
        self,
        stages: Sequence[str],
        options: CascadeOptions | None = None,
        *,
        deadline: float | None = None,
    ) -> Certificate:
        state = self._run(stages, self.X, self.perturbation, self.labels, options, deadline)
        certified = state.certified.cpu().numpy()
        falsified = state.falsified.cpu().numpy()
        status = np.full(len(certified), "unknown", dtype=object)
        status[certified] = "certified"
        status[falsified] = "falsified"
        names = np.array([*stages, ""], dtype=object)
        decided_by = names[state.decided.cpu().numpy()]  # -1 picks ""
        clean = state.extras.get("clean")
        if clean is not None:
            decided_by[clean.cpu().numpy()] = CLEAN_PREDICTION
        return Certificate(
            prediction=state.reference.cpu().numpy(),
            margins=state.margins.cpu().numpy(),
            certified=certified,
            eps=self.perturbation.eps_value,
            method="+".join(stages),
            status=status.astype(str),
            decided_by=decided_by.astype(str),
            counterexample=state.counterexample.cpu().double().numpy(),
            stage_seconds=dict(state.extras.get("stage_seconds", {})),
        )

    def radius(
        self,
        stages: Sequence[str],
        *,
        max_eps: float,
        tol: float,
        options: CascadeOptions | None = None,
    ) -> np.ndarray:
        n = self.X.shape[0]
        dtype, device = self.X.dtype, self.X.device

        def certified_at(radii: Tensor, rows: Tensor) -> Tensor:
            perturbation = self.perturbation.with_sample_radii(radii)
            labels = None if self.labels is None else self.labels[rows]
            return self._run(stages, self.X[rows], perturbation, labels, options).certified

        low = torch.zeros(n, dtype=dtype, device=device)
        high = torch.full((n,), max_eps, dtype=dtype, device=device)
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
