"""Hyperparameters of the certified estimators: allowed ranges and choices, the device, and
the checks that ``fit`` runs once (:class:`ParameterChecks`)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "check_device",
    "Choice",
    "NON_NEGATIVE",
    "ParameterChecks",
    "POSITIVE",
    "Range",
    "Subset",
    "UNIT",
]


@dataclass(frozen=True)
class Range:
    """A numeric hyperparameter's allowed values, for a class's ``_parameter_ranges`` table.

    Attributes
    ----------
    low, high : float or None
        Bounds (``None``: unbounded on that side).
    low_open, high_open : bool
        Exclude the bound itself.
    integer : bool
        Only integers.
    optional : bool
        ``None`` is allowed too.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def check(self, name: str, value) -> None:
        """Raise ``ValueError`` naming ``name`` when ``value`` is not allowed."""
        if value is None and self.optional:
            return
        kind = numbers.Integral if self.integer else numbers.Real
        ok = isinstance(value, kind) and not isinstance(value, bool) and np.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}.")

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = kind + (" " + " and ".join(parts) if parts else "")
        return text + (" or None" if self.optional else "")


@dataclass(frozen=True)
class Choice:
    """A hyperparameter taking one of a fixed set of values."""

    #: The values, or a table whose keys are (read at each check: an entry added to the table
    #: is accepted at once).
    options: tuple | Mapping

    def check(self, name: str, value) -> None:
        """Raise ``ValueError`` naming ``name`` when ``value`` is not one of the options."""
        if not any(value == option for option in self.options):
            raise ValueError(f"{name} must be one of {tuple(self.options)}, got {value!r}.")


@dataclass(frozen=True)
class Subset:
    """A hyperparameter naming none, one or several of a fixed set of options (a string or a
    sequence of strings)."""

    options: tuple

    def check(self, name: str, value) -> None:
        """Raise ``ValueError`` naming ``name`` when ``value`` holds anything else."""
        values = (value,) if isinstance(value, str) else value
        try:
            unknown = [v for v in values if v not in self.options]
        except TypeError:
            unknown = [value]
        if unknown:
            raise ValueError(f"{name} must name some of {self.options}, got {value!r}.")


UNIT = Range(0.0, 1.0)


NON_NEGATIVE = Range(0.0)


POSITIVE = Range(0.0, low_open=True)


def check_device(device) -> None:
    """Raise ``ValueError`` unless ``device`` is None or a torch device this machine has."""
    if device is None:  # skorch: leave the tensors where they are
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"device={device!r} is not a torch device such as 'cpu' or 'cuda'."
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but CUDA is not available on this machine: use device='cpu'."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA "
                "device(s)."
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} but MPS is not available on this machine.")


class ParameterChecks:
    """Hyperparameter checks of the certified estimators (once, in ``fit``), and
    ``set_params`` that moves a fitted network with ``device``."""

    # ------------------------------------------------------------ validation
    #: Whether the training objective uses ``criterion``. The certified losses of the teacher and
    #: the student compute their cross-entropies themselves, so they refuse any other criterion
    #: rather than ignore it.
    _uses_criterion = True

    def _check_criterion(self) -> None:
        if self._uses_criterion:
            return
        options = self.get_params_for("criterion")
        if self.criterion is not nn.CrossEntropyLoss or options:
            given = f"criterion={self.criterion!r}" + (
                f" with criterion__* options {sorted(options)}" if options else ""
            )
            raise ValueError(
                f"{type(self).__name__} does not use `criterion`: its certified losses are "
                f"cross-entropies of clean and worst-case logits computed directly. Got {given}; "
                "leave criterion at its default (torch.nn.CrossEntropyLoss) and drop the "
                "criterion__* options."
            )

    @classmethod
    def _all_parameter_ranges(cls) -> dict:
        ranges = {}
        for klass in reversed(cls.__mro__):
            ranges.update(vars(klass).get("_parameter_ranges", {}))
        return ranges

    def _check_params(self) -> None:
        """Check every hyperparameter of the class's range tables (once, in ``fit``)."""
        self._check_criterion()
        check_device(self.device)
        for name, allowed in self._all_parameter_ranges().items():
            allowed.check(name, getattr(self, name))
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if not shape or any(not isinstance(s, numbers.Integral) or s < 1 for s in shape):
                raise ValueError(
                    f"input_shape must be a tuple of positive ints, got {self.input_shape!r}"
                )

    # --------------------------------------------------------------- device
    def set_params(self, **kwargs):
        """Set parameters; changing ``device`` of a fitted estimator also moves its networks.

        skorch stores ``device`` as a plain attribute, which would leave the fitted module on
        its old device; here the module, the criterion and the optimiser state follow. A
        student's teacher stays where it is (its outputs are moved to the student's device).

        Returns
        -------
        self
        """
        moves = "device" in kwargs and getattr(self, "initialized_", False)
        if moves:
            check_device(kwargs["device"])  # before anything changes
        super().set_params(**kwargs)
        if moves:
            self._move_to(self.device)
        return self

    def _move_to(self, device) -> None:
        for name in self._modules + self._criteria:
            component = getattr(self, name + "_", None)
            if isinstance(component, nn.Module):
                component.to(device)
        for name in self._optimizers:
            optimizer = getattr(self, name + "_", None)
            for state in getattr(optimizer, "state", {}).values():
                for key, value in state.items():
                    if isinstance(value, Tensor) and value.dim() > 0:
                        state[key] = value.to(device)
