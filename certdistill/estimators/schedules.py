"""Schedules of certified training as skorch callbacks.

Each schedule sets one attribute of the net before every training batch (``current_eps_``,
``current_kappa_``, ...) from the training progress, and records the value in ``net.history``:
per batch under ``history[-1, "batches", i, key]`` and per epoch (its value at the end of the
epoch) under ``history[:, key]``.

Progress is measured in optimisation steps: ``t = step / (epochs * batches_per_epoch)``, with
``epochs`` the net's ``n_epochs_`` (``max_epochs``, or more to reach ``min_steps``), so a
schedule is expressed in fractions of the whole run and is independent of the data size. Steps
count over the whole history, so training continued with ``partial_fit`` carries on from where it
stopped (and stays at the final value past the end).

A schedule parameter left at ``None`` is read from the net's hyperparameter of the same meaning
at the start of every epoch (``eps`` from ``net.eps_train``, the window from ``net.warmup`` and
``net.ramp``, kappa from ``net.kappa_start``/``net.kappa_end`` ...). The estimators create their
schedules this way, so ``set_params`` on the estimator is all a user needs; a value given to the
callback (for instance ``callbacks__kappa_schedule__end=0.5``) takes precedence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from skorch.callbacks import Callback

__all__ = [
    "AlphaSchedule",
    "BetaSchedule",
    "DistillWeightSchedule",
    "EpsSchedule",
    "KappaSchedule",
    "LinearSchedule",
    "StepLR",
    "TemperatureSchedule",
]


def _validate_window(begin: float, end: float) -> None:
    if not (0.0 <= begin <= end):
        raise ValueError(f"schedule window must satisfy 0 <= begin <= end, got {begin}, {end}")


def _epochs(net) -> int:
    """Epochs of the run: the estimator's ``n_epochs_`` (``max_epochs`` raised to reach its
    ``min_steps``), or skorch's ``max_epochs``."""
    return int(getattr(net, "n_epochs_", net.max_epochs))


def _net_window(net) -> tuple[float, float]:
    warmup = float(getattr(net, "warmup", 0.0))
    ramp = float(getattr(net, "ramp", 0.5))
    return warmup, warmup + ramp


class _ProgressCallback(Callback):
    """Base class: tracks the optimisation step and sets one attribute of the net per batch."""

    attribute: str = ""
    key: str = ""

    def resolve(self, net) -> None:
        """Read the parameters left at None from the net (called at every epoch start)."""

    def value_at(self, t: float):  # pragma: no cover - abstract
        raise NotImplementedError

    def on_epoch_begin(self, net, dataset_train=None, dataset_valid=None, **kwargs):
        self.resolve(net)
        n = len(dataset_train) if dataset_train is not None else 0
        batch_size = net.batch_size if net.batch_size and net.batch_size > 0 else max(n, 1)
        self.batches_per_epoch_ = max(1, math.ceil(n / batch_size))
        self.step_ = sum(row.get("train_batch_count", 0) for row in net.history[:-1])
        self._set(net, self.step_)

    def _progress(self, net, step: int) -> float:
        total = max(1, _epochs(net) * self.batches_per_epoch_)
        return min(1.0, step / total)

    def _set(self, net, step: int) -> float:
        value = self.value_at(self._progress(net, step))
        setattr(net, self.attribute, value)
        return float(np.mean(value))

    def on_batch_begin(self, net, batch=None, training=False, **kwargs):
        if not training:
            return
        value = self._set(net, self.step_)
        net.history.record_batch(self.key, value)
        self.step_ += 1

    def on_epoch_end(self, net, dataset_train=None, dataset_valid=None, **kwargs):
        net.history.record(self.key, float(np.mean(getattr(net, self.attribute))))


class EpsSchedule(_ProgressCallback):
    """Perturbation radius used by the certified loss: warm-up at 0, then a ramp to ``eps``.

    Parameters
    ----------
    eps : float, array-like or None, default=None
        Final training radius (``None``: the net's ``eps_train``).
    warmup : float or None, default=None
        Fraction of the run trained at ``eps = 0`` (clean training); ``None``: ``net.warmup``.
    ramp : float or None, default=None
        Fraction of the run over which eps grows from 0 to ``eps`` after the warm-up;
        ``None``: ``net.ramp``.
    shape : {"smooth", "linear"}, default="smooth"
        ``"linear"`` grows linearly. ``"smooth"`` is the schedule of Shi et al. (2021) and
        auto_LiRPA's ``SmoothedScheduler``: polynomial (degree 4) growth over the first quarter of
        the ramp, then linear, with continuous value and slope.
    """

    attribute = "current_eps_"
    key = "eps"

    def __init__(
        self,
        eps=None,
        warmup: float | None = None,
        ramp: float | None = None,
        shape: str = "smooth",
    ):
        self.eps = eps
        self.warmup = warmup
        self.ramp = ramp
        self.shape = shape

    def resolve(self, net) -> None:
        """Read the parameters left at None from the net and validate them."""
        if self.shape not in ("smooth", "linear"):
            raise ValueError(f"shape must be 'smooth' or 'linear', got {self.shape!r}")
        # The final training perturbation, validated here where a callback's own eps enters.
        final = (
            net.training_perturbation()
            if self.eps is None
            else net.perturbation_.with_eps(self.eps).to(device=net.device)
        )
        self.perturbation_ = final
        self.eps_ = final.eps_value
        self.warmup_ = float(getattr(net, "warmup", 0.0) if self.warmup is None else self.warmup)
        self.ramp_ = float(getattr(net, "ramp", 0.5) if self.ramp is None else self.ramp)
        if self.ramp_ < 0:
            raise ValueError(f"ramp must be >= 0, got {self.ramp_}")
        _validate_window(self.warmup_, self.warmup_ + self.ramp_)

    def fraction_at(self, t: float) -> float:
        """Fraction of the final eps at progress ``t`` in [0, 1] (after :meth:`resolve`)."""
        if t < self.warmup_:
            return 0.0
        if self.ramp_ <= 0:
            return 1.0
        s = min(1.0, (t - self.warmup_) / self.ramp_)
        if self.shape == "linear":
            return s
        mid, degree = 0.25, 4.0
        # v(s) = c s^d for s <= mid, then linear to 1 with matching value and slope.
        c = 1.0 / (mid ** (degree - 1) * (mid + degree * (1 - mid)))
        if s <= mid:
            return c * s**degree
        slope = degree * c * mid ** (degree - 1)
        return 1.0 - slope * (1 - s)

    def value_at(self, t: float):
        """Training eps at progress ``t`` (a float, or an array for per-feature eps)."""
        fraction = self.fraction_at(t)
        if np.ndim(self.eps_) == 0:
            return float(self.eps_) * fraction
        return np.asarray(self.eps_, dtype=np.float32) * np.float32(fraction)

    def _set(self, net, step: int) -> float:
        # The batch's perturbation, derived from the validated one (no per-batch validation).
        fraction = self.fraction_at(self._progress(net, step))
        net.current_perturbation_ = self.perturbation_.scaled(fraction)
        return super()._set(net, step)


class LinearSchedule(_ProgressCallback):
    """A value moving linearly from ``start`` to ``end`` between two fractions of the run.

    Parameters
    ----------
    attribute : str
        Attribute of the net to set (should end with ``_``).
    key : str
        History key under which the value is recorded.
    start, end : float or None
        Values before ``begin`` and after ``stop`` (``None``: the net's ``<key>_start`` and
        ``<key>_end`` attributes).
    begin, stop : float or None, default=None
        Fractions of the run where the change starts and ends (``None``: the net's eps ramp,
        ``warmup`` and ``warmup + ramp``).
    """

    def __init__(
        self,
        attribute: str,
        key: str,
        start: float | None = None,
        end: float | None = None,
        begin: float | None = None,
        stop: float | None = None,
    ):
        self.attribute = attribute
        self.key = key
        self.start = start
        self.end = end
        self.begin = begin
        self.stop = stop

    def _default_values(self, net) -> tuple[float, float]:
        return getattr(net, f"{self.key}_start"), getattr(net, f"{self.key}_end")

    def resolve(self, net) -> None:
        start, end = self._default_values(net) if None in (self.start, self.end) else (0, 0)
        self.start_ = float(start if self.start is None else self.start)
        self.end_ = float(end if self.end is None else self.end)
        begin, stop = _net_window(net)
        self.begin_ = float(begin if self.begin is None else self.begin)
        self.stop_ = float(stop if self.stop is None else self.stop)
        _validate_window(self.begin_, self.stop_)

    def value_at(self, t: float) -> float:
        if t <= self.begin_:
            return self.start_
        if t >= self.stop_:
            return self.end_
        s = (t - self.begin_) / (self.stop_ - self.begin_)
        return self.start_ + s * (self.end_ - self.start_)


class KappaSchedule(LinearSchedule):
    """Weight ``kappa`` of the clean cross-entropy (``1 - kappa`` on the certified term).

    Parameters
    ----------
    start, end : float or None, default=None
        Values before ``begin`` and after ``stop`` (``None``: ``net.kappa_start``,
        ``net.kappa_end``).
    begin, stop : float or None, default=None
        Fractions of the run where the change starts and ends (``None``: the eps ramp).
    """

    def __init__(self, start=None, end=None, begin=None, stop=None):
        super().__init__("current_kappa_", "kappa", start, end, begin, stop)


class BetaSchedule(LinearSchedule):
    """CROWN-IBP mixing weight ``beta`` (1: CROWN-IBP bounds, 0: IBP bounds).

    Parameters
    ----------
    start, end : float or None, default=None
        Values before ``begin`` and after ``stop`` (``None``: ``net.beta_start``,
        ``net.beta_end``).
    begin, stop : float or None, default=None
        Fractions of the run where the change starts and ends (``None``: the eps ramp).
    """

    def __init__(self, start=None, end=None, begin=None, stop=None):
        super().__init__("current_beta_", "beta", start, end, begin, stop)


class AlphaSchedule(LinearSchedule):
    """MTL-IBP weight ``alpha`` of the certified term (``1 - alpha`` on the adversarial term).

    Parameters
    ----------
    start, end : float or None, default=None
        Values before ``begin`` and after ``stop`` (``None``: ``net.alpha`` for both, a constant).
    begin, stop : float or None, default=None
        Fractions of the run where the change starts and ends (``None``: the eps ramp).
    """

    def __init__(self, start=None, end=None, begin=None, stop=None):
        super().__init__("current_alpha_", "alpha", start, end, begin, stop)

    def _default_values(self, net) -> tuple[float, float]:
        return net.alpha, net.alpha


class StepLR(Callback):
    """Multiply the learning rate by ``gamma`` at fractions of the run's epochs.

    Parameters
    ----------
    milestones : sequence of float or None, default=None
        Fractions of the run (in epochs) after which the rate is multiplied by ``gamma``
        (``None``: ``net.lr_milestones``).
    gamma : float or None, default=None
        Decay factor (``None``: ``net.lr_gamma``).

    Notes
    -----
    The rate of epoch ``e`` (0-based, counted over the whole history) is ``lr * gamma ** k``,
    with ``k`` the number of milestones ``m`` such that ``e >= round(m * epochs)`` (``epochs``:
    the net's ``n_epochs_``, see :class:`~certdistill.estimators.base.CertifiedNetBase`'s
    ``min_steps``).
    The value is recorded as ``history[:, "lr"]``.
    """

    def __init__(self, milestones: Sequence[float] | None = None, gamma: float | None = None):
        self.milestones = milestones
        self.gamma = gamma

    def on_epoch_begin(self, net, **kwargs):
        milestones = net.lr_milestones if self.milestones is None else self.milestones
        gamma = float(net.lr_gamma if self.gamma is None else self.gamma)
        epoch = len(net.history) - 1
        passed = sum(epoch >= round(float(m) * _epochs(net)) for m in (milestones or ()))
        lr = net.lr * gamma**passed
        for name in net._optimizers:
            optimizer = getattr(net, name + "_")
            for group in optimizer.param_groups:
                group["lr"] = lr
        net.history.record("lr", lr)


class DistillWeightSchedule(LinearSchedule):
    """Weight ``lam`` of a student's distillation term.

    Parameters
    ----------
    start, end : float or None, default=None
        Values before ``begin`` and after ``stop`` (``None``: ``net.distill_weight`` and
        ``net.distill_weight_end``, the latter defaulting to the former: a constant).
    begin, stop : float or None, default=None
        Fractions of the run where the change starts and ends (``None``: the eps ramp).
    """

    def __init__(self, start=None, end=None, begin=None, stop=None):
        super().__init__("current_distill_weight_", "distill_weight", start, end, begin, stop)

    def _default_values(self, net) -> tuple[float, float]:
        end = net.distill_weight if net.distill_weight_end is None else net.distill_weight_end
        return net.distill_weight, end


class TemperatureSchedule(LinearSchedule):
    """Distillation temperature ``T`` of a student.

    Parameters
    ----------
    start, end : float or None, default=None
        Values before ``begin`` and after ``stop`` (``None``: ``net.temperature`` and
        ``net.temperature_end``, the latter defaulting to the former: a constant).
    begin, stop : float or None, default=None
        Fractions of the run where the change starts and ends (``None``: the eps ramp).
    """

    def __init__(self, start=None, end=None, begin=None, stop=None):
        super().__init__("current_temperature_", "temperature", start, end, begin, stop)

    def _default_values(self, net) -> tuple[float, float]:
        end = net.temperature if net.temperature_end is None else net.temperature_end
        return net.temperature, end
