"""Shared scikit-learn/skorch estimator base of the certified estimators.

:class:`CertifiedNetBase` turns skorch's ``NeuralNetClassifier`` into a well-behaved
scikit-learn classifier for certified training:

* input validation with :func:`sklearn.utils.validation.validate_data` (float32, finite values,
  ``n_features_in_`` and ``feature_names_in_``), labels of any type (``classes_``; ``predict``
  returns the original labels);
* reproducible fits from ``random_state`` (the torch random state is forked, so the global one is
  left untouched);
* ``input_shape`` to reshape flat rows for convolutional modules, ``lower``/``upper`` for the
  input domain;
* ``module=None`` builds a default network from the data
(:func:`certdistill.estimators.models.make_mlp`
  for flat features, :func:`certdistill.estimators.models.make_cnn` when ``input_shape`` is given);
* an eps warm-up/ramp, a step learning-rate decay and gradient clipping as skorch callbacks;
* :meth:`certify`, :meth:`certified_radius` and :meth:`certified_accuracy`.

Subclasses define the training objective by overriding :meth:`CertifiedNetBase.training_loss`
(``(x, y, training) -> (loss, clean logits)``); the training and validation steps call it.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import validate_data
from skorch import NeuralNetClassifier
from skorch.callbacks import Callback, EpochScoring
from skorch.dataset import Dataset as SkorchDataset
from skorch.dataset import unpack_data
from skorch.exceptions import NotInitializedError
from skorch.utils import to_tensor
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from certdistill.bounds import Perturbation, engine_for
from certdistill.certification.certify import DEFAULT_METHOD
from certdistill.certification.problem import Certificate, Problem, check_radius_search
from certdistill.certification.streaming import certify_stream, is_streamed
from certdistill.estimators.losses import shi_regularizer, worst_case_logits
from certdistill.estimators.models import make_cnn, make_mlp
from certdistill.estimators.schedules import EpsSchedule, StepLR
from certdistill.scale.parallel import torch_threads
from certdistill.verify.cascade import CascadeOptions, check_stages

__all__ = ["CertifiedNetBase", "Choice", "Range", "Subset"]


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

    options: tuple

    def check(self, name: str, value) -> None:
        """Raise ``ValueError`` naming ``name`` when ``value`` is not one of the options."""
        if not any(value == option for option in self.options):
            raise ValueError(f"{name} must be one of {self.options}, got {value!r}.")


#: Epochs of ``max_epochs=None``, and the fewest optimiser steps it trains for.
_DEFAULT_EPOCHS = 60
_MIN_STEPS = 500

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


def _encoded_accuracy(net, X, y) -> float:
    """Validation accuracy on encoded labels (skorch's datasets hold the encoded ``y``)."""
    proba = net.predict_proba(X)
    y = np.asarray(y).reshape(-1)
    return float(np.mean(proba.argmax(axis=1) == y))


def _writable(X: np.ndarray) -> np.ndarray:
    """``X``, copied if it is read-only (pandas' copy-on-write arrays are), which torch warns
    about when it wraps it in a tensor."""
    return X if X.flags.writeable else X.copy()


def _reject_fit_params(estimator, fit_params) -> None:
    if fit_params:
        raise TypeError(
            f"{type(estimator).__name__}.fit got unexpected keyword arguments "
            f"{sorted(fit_params)}: sample_weight and extra forward arguments are not supported."
        )


def _in_torch_threads(method):
    """Run an estimator method with the estimator's ``torch_threads`` (see
    :mod:`certdistill.scale.parallel`); estimators pickled before the parameter existed have
    none."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch_threads(getattr(self, "torch_threads", None)):
            return method(self, *args, **kwargs)

    return wrapper


def _keep_state_on_error(method):
    """Run ``fit`` or ``partial_fit`` so that, if it raises, the estimator is left as it was
    before the call: a fitted model stays usable (it predicts and certifies as before) and an
    unfitted one stays unfitted. The attributes are restored, not copied: the fitted network
    is not duplicated."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        state = dict(vars(self))
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            vars(self).clear()
            vars(self).update(state)
            raise

    return wrapper


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
                f"device={device!r} but CUDA is not available on this machine: use "
                "device='cpu'."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA "
                "device(s)."
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} but MPS is not available on this machine.")


@contextmanager
def _batchnorm_eval_for_single_sample(module: nn.Module, n: int):
    """BatchNorm cannot normalise a batch of one sample with its own statistics: use the running
    statistics for that batch (it happens for the last batch of an epoch, or tiny data sets)."""
    if n > 1:
        yield
        return
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.training]
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m in layers:
            m.train()


class TensorBatches:
    """Training batches of a ``skorch.dataset.Dataset`` of arrays, made by indexing tensors of the
    whole data rather than row by row (``__getitem__`` and collation per row, as skorch's
    ``DataLoader`` does).

    The batches, their order and the draws from torch's global random generator are those of the
    ``DataLoader`` (its iterator draws a base seed; with ``shuffle``, its ``RandomSampler``
    draws a seed and a permutation), so training gives the same results, faster. Each batch is a
    fresh tensor (not a view of the data), as the ``DataLoader``'s are.

    Parameters
    ----------
    X, y : ndarray or Tensor
        The dataset's inputs and targets (same length).
    batch_size : int
        Rows per batch (the last batch may be smaller).
    shuffle : bool, default=False
        A new random order every epoch.

    Attributes
    ----------
    source : ndarray or Tensor
        ``X`` as given (for a step to check which data its batch comes from).
    """

    def __init__(self, X, y, batch_size: int, shuffle: bool = False):
        self.source = X
        self.X = torch.as_tensor(X)
        self.y = torch.as_tensor(y)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self._last = None

    @classmethod
    def for_dataset(cls, net, dataset) -> TensorBatches | None:
        """The batches ``net.get_iterator(dataset, training=True)`` would make with skorch's
        ``DataLoader``, or None where they cannot be made by indexing (another iterator or
        dataset class, iterator options beyond ``batch_size`` and ``shuffle``, data that are
        not arrays)."""
        if net.iterator_train is not DataLoader or type(dataset) is not SkorchDataset:
            return None
        kwargs = net.get_params_for("iterator_train")
        if not set(kwargs) <= {"batch_size", "shuffle"}:
            return None
        X, y = dataset.X, dataset.y
        arrays = (np.ndarray, Tensor)
        if not (isinstance(X, arrays) and isinstance(y, arrays)) or X.ndim < 1:
            return None
        if isinstance(X, np.ndarray) and (X.dtype.hasobject or not X.flags.writeable):
            return None
        n = len(dataset)
        if n == 0 or len(X) != n or len(y) != n:
            return None
        batch_size = kwargs.get("batch_size", net.batch_size)
        if batch_size == -1:
            batch_size = n
        if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            return None
        return cls(X, y, batch_size, shuffle=bool(kwargs.get("shuffle", False)))

    def __len__(self) -> int:
        return math.ceil(len(self.X) / self.batch_size)

    def __iter__(self):
        n = len(self.X)
        # What DataLoader's iterator and RandomSampler draw from the global generator.
        torch.empty((), dtype=torch.int64).random_()
        order = None
        if self.shuffle:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        try:
            for start in range(0, n, self.batch_size):
                if order is None:
                    rows = torch.arange(start, min(start + self.batch_size, n))
                    batch = (self.X[start:start + self.batch_size].clone(),
                             self.y[start:start + self.batch_size].clone())
                else:
                    rows = order[start:start + self.batch_size]
                    batch = (self.X[rows], self.y[rows])
                self._last = (batch[0], rows)
                yield batch
        finally:
            self._last = None

    def rows_of(self, X_batch) -> Tensor | None:
        """Row indices into ``X`` of the batch just yielded, if ``X_batch`` is its input tensor
        (None otherwise)."""
        last = self._last
        if last is None or last[0] is not X_batch:
            return None
        return last[1]


class _GradClip(Callback):
    """Clip the gradient norm to ``net.grad_clip`` (nothing when it is None)."""

    def on_grad_computed(self, net, named_parameters, **kwargs):
        if net.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for _, p in named_parameters], max_norm=float(net.grad_clip)
            )


@dataclass
class IntervalTerms:
    """IBP pieces of a certified loss for one batch (see :meth:`CertifiedNetBase.interval_terms`).

    Attributes
    ----------
    logits : Tensor
        Clean logits.
    worst_logits : Tensor
        Worst-case logits ``-m_j`` (0 for the label) from the IBP margin bounds ``m``; at eps 0,
        the clean logits shifted so that the label's is 0.
    margins : Tensor or None
        IBP margin lower bounds (``None`` at eps 0).
    perturbation : Perturbation
        The scheduled training perturbation of the batch.
    regularizer : Tensor
        Warm-up regulariser of Shi et al. (2021), already weighted (0 when it does not apply).
    interval_pass : IntervalPass or None
        The engine's sweep (``None`` at eps 0); with ``keep_state`` it can be bounded again by
        CROWN-IBP without a second sweep.
    """

    logits: Tensor
    worst_logits: Tensor
    margins: Tensor | None
    perturbation: Perturbation
    regularizer: Tensor
    interval_pass: object = None


class CertifiedNetBase(NeuralNetClassifier):
    """Base of the certified estimators (a skorch ``NeuralNetClassifier``).

    Parameters
    ----------
    module : torch.nn.Module, class or None, default=None
        The network. ``None`` builds one from the data in ``fit``: an MLP
        (:func:`certdistill.estimators.models.make_mlp`) for flat features, a small CNN
        (:func:`certdistill.estimators.models.make_cnn`) when ``input_shape`` is given, both with
        the IBP
        initialisation; ``module__*`` parameters are passed to the builder (e.g.
        ``module__hidden_sizes=(256,)``). A custom module must be an ``nn.Sequential`` of supported
        layers to be trained with certified losses and certified.
    eps : float or array-like, default=0.1
        L-infinity radius the estimator is evaluated (certified) at: a scalar or one value per
        feature. Validated once in ``fit`` (see :class:`~certdistill.bounds.Perturbation`).
    eps_train_ratio : float, default=1.5
        Training radius as a multiple of ``eps`` (on digits at eps = 0.1, 1.3 to 1.5 certified
        about two points more than 1.0).
    warmup : float, default=0.05
        Fraction of ``max_epochs`` of clean training before the eps ramp.
    ramp : float, default=0.5
        Fraction of ``max_epochs`` over which the training eps grows to ``eps * eps_train_ratio``.
    kappa_start, kappa_end : float, default=(1.0, 0.0)
        Weight of the clean cross-entropy in the certified loss, interpolated over the ramp.
    reg_lambda : float, default=0.5
        Weight of the Shi et al. (2021) warm-up regularisers (0 disables them), applied as
        ``reg_lambda * (1 - eps_t / eps_train)`` while eps ramps.
    reg_tol : float, default=0.5
        Tolerance of the Shi et al. regularisers.
    input_shape : tuple of int or None, default=None
        Shape of one sample as the module expects it, e.g. ``(1, 8, 8)``; rows of ``X`` (flat,
        ``prod(input_shape)`` features) are reshaped to it. ``None`` feeds rows as they are.
    lower, upper : float, array-like or None, default=None
        Input domain (e.g. 0 and 1 for images) intersected with the perturbation ball in training
        and certification; arrays have one value per feature. ``None`` means unbounded.
    random_state : int, RandomState or None, default=None
        Seeds weight initialisation, shuffling and random starts. An int gives identical weights
        for identical data. The global torch random state is not changed.
    lr_milestones : sequence of float, default=(0.7, 0.9)
        Fractions of ``max_epochs`` after which the learning rate is multiplied by ``lr_gamma``.
    lr_gamma : float, default=0.2
        Learning-rate decay factor (1 disables the decay).
    grad_clip : float or None, default=10.0
        Maximum gradient norm (``None`` disables clipping).
    torch_threads : int or None, default=None
        Torch intra-op CPU threads while the estimator fits, predicts and certifies; the previous
        number is restored afterwards. ``None`` leaves torch's setting as it is: all cores in a
        plain Python process, but one in a dask worker process and ``cpu_count() // n_jobs`` in a
        joblib worker process, so that parallel fits do not oversubscribe the cores (see
        :mod:`certdistill.scale.parallel`).
    max_epochs : int or None, default=None
        Training epochs per ``fit``. ``None`` trains 60 epochs, or more on a small data set, so
        that training takes at least 500 optimiser steps: the warm-up, the eps ramp and the
        learning-rate decay are fractions of the run, and on a few dozen samples 60 epochs are
        too few steps to train at all. The epochs run are ``n_epochs_``.
    criterion, optimizer, lr, batch_size, train_split, verbose
        As in skorch (defaults: cross-entropy, Adam, 5e-3, batch 128, no internal validation
        split, silent).
    **kwargs
        Further skorch parameters (``device``, ``callbacks``, ``module__*``, ``optimizer__*``,
        ``callbacks__*``, ...).

    Attributes
    ----------
    classes_ : ndarray
        Class labels seen in ``fit``.
    n_features_in_ : int
        Number of features seen in ``fit``.
    module_ : torch.nn.Module
        The trained network.
    history_ : skorch.History
        Training history, including the schedule values (``eps``, ``lr`` ...).
    n_epochs_ : int
        Epochs of the last ``fit`` (``max_epochs``, or the number chosen for ``None``).
    perturbation_ : Perturbation
        The validated perturbation at ``eps`` (with ``lower``/``upper``), for one sample.
    """

    #: Marks certdistill's estimators for the modules below them (ONNX export) without an import.
    _certdistill_estimator: ClassVar[bool] = True

    #: Allowed values of hyperparameters, checked once in ``fit``; subclasses add their own.
    _parameter_ranges: ClassVar[dict] = {
        "eps_train_ratio": NON_NEGATIVE,
        "warmup": NON_NEGATIVE,
        "ramp": NON_NEGATIVE,
        "kappa_start": UNIT,
        "kappa_end": UNIT,
        "reg_lambda": NON_NEGATIVE,
        "reg_tol": POSITIVE,
        "lr_gamma": POSITIVE,
        "grad_clip": Range(0.0, low_open=True, optional=True),
        "max_epochs": Range(0, integer=True, optional=True),
    }

    def __init__(
        self,
        module=None,
        *,
        eps: float = 0.1,
        eps_train_ratio: float = 1.5,
        warmup: float = 0.05,
        ramp: float = 0.5,
        kappa_start: float = 1.0,
        kappa_end: float = 0.0,
        reg_lambda: float = 0.5,
        reg_tol: float = 0.5,
        input_shape: Sequence[int] | None = None,
        lower=None,
        upper=None,
        random_state=None,
        lr_milestones: Sequence[float] = (0.7, 0.9),
        lr_gamma: float = 0.2,
        grad_clip: float | None = 10.0,
        torch_threads: int | None = None,
        criterion=nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr: float = 5e-3,
        max_epochs: int | None = None,
        batch_size: int = 128,
        train_split=None,
        verbose: int = 0,
        **kwargs,
    ):
        super().__init__(
            module,
            criterion=criterion,
            optimizer=optimizer,
            lr=lr,
            max_epochs=max_epochs,
            batch_size=batch_size,
            train_split=train_split,
            verbose=verbose,
            **kwargs,
        )
        self.eps = eps
        self.eps_train_ratio = eps_train_ratio
        self.warmup = warmup
        self.ramp = ramp
        self.kappa_start = kappa_start
        self.kappa_end = kappa_end
        self.reg_lambda = reg_lambda
        self.reg_tol = reg_tol
        self.input_shape = input_shape
        self.lower = lower
        self.upper = upper
        self.random_state = random_state
        self.lr_milestones = lr_milestones
        self.lr_gamma = lr_gamma
        self.grad_clip = grad_clip
        self.torch_threads = torch_threads

    # ------------------------------------------------------------------ tags
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.poor_score = True
        tags.input_tags.allow_nan = False
        return tags

    # ------------------------------------------------------------ callbacks
    @property
    def _default_callbacks(self):
        # Callbacks read the hyperparameters from the net when training starts, so that building
        # them (get_params does) never evaluates parameter values.
        callbacks = [cb for cb in super()._default_callbacks if cb[0] != "valid_acc"]
        print_log = callbacks.pop()
        callbacks.append(
            ("valid_acc", EpochScoring(_encoded_accuracy, name="valid_acc",
                                       lower_is_better=False))
        )
        callbacks.append(("eps_schedule", EpsSchedule()))
        callbacks += self._schedule_callbacks()
        callbacks.append(("lr_schedule", StepLR()))
        callbacks.append(("grad_clip", _GradClip()))
        return callbacks + [print_log]

    def _schedule_callbacks(self) -> list:
        """Extra ``(name, callback)`` schedules of a subclass (none here)."""
        return []

    @property
    def eps_train(self) -> float | np.ndarray:
        """Largest training radius, ``eps * eps_train_ratio`` (float or per-feature array)."""
        return self.perturbation_.scaled(self.eps_train_ratio).eps_value

    def training_perturbation(self) -> Perturbation:
        """The perturbation at the largest training radius, on ``device``."""
        return self.perturbation_.scaled(self.eps_train_ratio).to(device=self.device)

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
                f" with criterion__* options {sorted(options)}" if options else "")
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

    def _sample_shape(self, n_features: int) -> tuple[int, ...]:
        return tuple(self.input_shape) if self.input_shape is not None else (int(n_features),)

    def _set_perturbation(self, n_features: int) -> None:
        """Validate ``eps`` and the domain into ``perturbation_`` (in ``fit``, or on loading)."""
        self.perturbation_ = Perturbation.create(self.eps, self._sample_shape(n_features),
                                                 lower=self.lower, upper=self.upper)

    def _module_sample_shape(self) -> tuple[int, ...] | None:
        """Shape of one sample as the module sees it: the fitted one (``perturbation_``) once
        fitted, so that changing ``input_shape`` without refitting (or a fit that failed on it)
        does not change how the fitted network reads rows; ``input_shape`` before."""
        perturbation = getattr(self, "perturbation_", None)
        if perturbation is not None:
            return tuple(perturbation.sample_shape)
        return None if self.input_shape is None else tuple(self.input_shape)

    def _flatten_nd(self, X, shape: tuple[int, ...] | None = None):
        """Accept ``(n, *shape)`` arrays (``shape``: ``input_shape``) by flattening them to rows."""
        if shape is None:
            shape = None if self.input_shape is None else tuple(self.input_shape)
        if shape is not None and hasattr(X, "ndim") and hasattr(X, "reshape"):
            if X.ndim == 1 + len(shape) and X.ndim > 2:
                return X.reshape(X.shape[0], -1)
        return X

    def _check_n_features(self, n_features: int) -> None:
        if self.input_shape is not None:
            expected = int(np.prod(tuple(self.input_shape)))
            if n_features != expected:
                raise ValueError(
                    f"input_shape={tuple(self.input_shape)!r} needs {expected} features per row, "
                    f"but X has {n_features} features."
                )

    def _validate_fit_data(self, X, y, *, reset: bool, classes=None):
        """Validate ``X`` and ``y`` for training; return ``X`` as float32 and ``y`` encoded."""
        self._check_params()
        X = self._flatten_nd(X)
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None."
            )
        X, y = validate_data(self, X, y, reset=reset, dtype=np.float32)
        X = _writable(X)
        self._check_n_features(X.shape[1])
        check_classification_targets(y)
        self._set_perturbation(X.shape[1])
        self._check_domain(X)
        if reset:
            if classes is not None:
                encoder = LabelEncoder().fit(np.asarray(classes))
            elif self.classes is not None:
                encoder = LabelEncoder().fit(np.asarray(self.classes))
            else:
                encoder = LabelEncoder().fit(y)
            if len(encoder.classes_) < 2:
                raise ValueError(
                    f"{type(self).__name__} needs samples of at least 2 classes in the data, "
                    f"but the data contains only one class: {encoder.classes_[0]!r} (pass all "
                    "classes with `classes` to partial_fit when a batch has one)."
                )
            self.classes_inferred_ = encoder.classes_
        return X, self._encode_labels(y)

    def _check_domain(self, X: np.ndarray) -> None:
        x = torch.from_numpy(np.ascontiguousarray(X)).reshape(X.shape[0],
                                                                *self.perturbation_.sample_shape)
        problem = self.perturbation_.outside_domain(x)
        if problem is not None:
            raise ValueError(
                f"{problem} (lower={self.lower!r}, upper={self.upper!r}; clip or rescale the "
                "inputs, e.g. MinMaxScaler(clip=True))."
            )

    def _encode_labels(self, y) -> np.ndarray:
        classes = np.asarray(self.classes_)
        y = np.asarray(y)
        order = np.argsort(classes, kind="stable")
        sorted_classes = classes[order]
        try:
            pos = np.searchsorted(sorted_classes, y)
        except TypeError as exc:
            raise ValueError(f"y has labels not seen in fit: {exc}") from None
        pos_clipped = np.clip(pos, 0, len(classes) - 1)
        unknown = (pos >= len(classes)) | (sorted_classes[pos_clipped] != y)
        if np.any(unknown):
            raise ValueError(
                f"y contains labels not seen in fit: {np.unique(y[unknown])[:5]!r}; "
                f"known classes: {classes!r}"
            )
        return order[pos_clipped].astype(np.int64)

    def _validate_predict_data(self, X) -> np.ndarray:
        self._check_fitted()
        X = self._flatten_nd(X, self._module_sample_shape())
        return _writable(validate_data(self, X, reset=False, dtype=np.float32))

    def _check_fitted(self) -> None:
        try:
            self.check_is_fitted()
        except NotInitializedError as exc:
            raise NotInitializedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with "
                "appropriate arguments before using this estimator."
            ) from exc
        if not hasattr(self, "n_features_in_"):
            raise NotInitializedError(
                f"This {type(self).__name__} instance was initialized but not fitted on data; "
                "call 'fit' first."
            )

    def check_data(self, X, y):
        """Data are validated in ``fit``/``partial_fit``; skorch's class inference is skipped."""
        if y is None and not isinstance(X, Dataset):
            raise ValueError("y is required")

    # -------------------------------------------------------------- seeding
    def _seed(self, offset: int = 0) -> int | None:
        rs = self.random_state
        if rs is None:
            return None
        if isinstance(rs, numbers.Integral):
            return (int(rs) + offset) % (2**63)
        return int(check_random_state(rs).randint(0, 2**31 - 1))

    @contextmanager
    def _rng(self, offset: int = 0):
        seed = self._seed(offset)
        if seed is None:
            yield
            return
        use_cuda = str(self.device).startswith("cuda") and torch.cuda.is_available()
        with torch.random.fork_rng(devices=None if use_cuda else []):
            torch.manual_seed(seed)
            yield

    # ------------------------------------------------------------------ fit
    @_in_torch_threads
    @_keep_state_on_error
    def fit(self, X, y, **fit_params):
        """Validate the data, build the network and train it from scratch.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training inputs (flat rows; with ``input_shape``, arrays of shape
            ``(n_samples, *input_shape)`` are accepted too).
        y : array-like of shape (n_samples,)
            Class labels of any type.
        **fit_params : dict
            Passed to skorch.

        Returns
        -------
        self

        Notes
        -----
        A ``fit`` that raises (bad data or parameters, an unsupported layer...) leaves the
        estimator as it was before the call: a fitted model keeps predicting and certifying as
        before. ``partial_fit`` does the same.
        """
        _reject_fit_params(self, fit_params)
        reset = not (self.warm_start and self.initialized_)
        X, y_enc = self._validate_fit_data(X, y, reset=reset)
        self.n_epochs_ = self._epochs_for(len(X))
        with self._rng():
            super().fit(X, y_enc, epochs=self.n_epochs_)
            self._warn_if_single_class(X)  # predicting draws a DataLoader seed: inside _rng
        return self

    def _epochs_for(self, n_samples: int) -> int:
        """``max_epochs``, or for ``None`` the default that reaches ``_MIN_STEPS`` steps."""
        if self.max_epochs is not None:
            return int(self.max_epochs)
        batch_size = self.batch_size if self.batch_size and self.batch_size > 0 else n_samples
        steps_per_epoch = max(1, math.ceil(n_samples / batch_size))
        return max(_DEFAULT_EPOCHS, math.ceil(_MIN_STEPS / steps_per_epoch))

    def _warn_if_single_class(self, X: np.ndarray) -> None:
        """A fit whose network predicts one class for all its training data has collapsed."""
        if len(self.classes_) < 2:
            return
        # skorch's prediction on the validated array: validating it again would warn that it
        # has no feature names after a fit on a DataFrame
        predicted = np.unique(NeuralNetClassifier.predict_proba(self, X).argmax(axis=1))
        if predicted.size == 1:
            warnings.warn(
                f"{type(self).__name__} predicts the single class {self.classes_[predicted[0]]} "
                "for all its training data: the fit collapsed (too few optimiser steps, a "
                "learning rate too high, or a radius eps too large for the data).",
                ConvergenceWarning, stacklevel=3,
            )

    @_in_torch_threads
    @_keep_state_on_error
    def partial_fit(self, X, y=None, classes=None, **fit_params):
        """Continue training on ``X``, ``y`` (initialising on the first call).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training inputs.
        y : array-like of shape (n_samples,)
            Class labels; they must be among ``classes_`` after the first call.
        classes : array-like or None, default=None
            All classes, needed on the first call when ``y`` does not contain every class.
        **fit_params : dict
            ``epochs``: number of epochs to train (default ``max_epochs``), e.g. the epochs left
            when resuming an interrupted run; the schedules continue from the number of steps in
            ``history`` either way.

        Returns
        -------
        self
        """
        if "_routing_method" in fit_params:
            # Called by fit(): the data were validated and encoded there.
            return super().partial_fit(X, y, classes=classes, **fit_params)
        epochs = fit_params.pop("epochs", None)
        _reject_fit_params(self, fit_params)
        if epochs is not None and not (isinstance(epochs, numbers.Integral) and epochs >= 0):
            raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
        first = not (self.initialized_ and hasattr(self, "n_features_in_"))
        X, y_enc = self._validate_fit_data(X, y, reset=first, classes=classes)
        offset = 0 if first else len(self.history_)
        if first or not hasattr(self, "n_epochs_"):
            # The planned length of the run, over which the schedules move.
            self.n_epochs_ = self._epochs_for(len(X))
        with self._rng(offset):
            if first:
                self.initialize()
            super().partial_fit(X, y_enc, epochs=self._epochs_for(len(X)) if epochs is None
                                else int(epochs))
        return self

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        """Set the schedule attributes to their final values (callbacks override them); check
        that the bound engine supports the module before the first epoch when training bounds
        it (the warm-up epochs do not)."""
        if self.training_perturbation().level > 0:
            self.bound_engine()  # UnsupportedLayerError now rather than after the warm-up
        self.current_perturbation_ = self.training_perturbation()
        self.current_eps_ = self.current_perturbation_.eps_value
        super().on_train_begin(net, X=X, y=y, **kwargs)

    def fit_loop(self, X, y=None, epochs=None, **fit_params):
        """skorch's training loop; an interruption (Ctrl-C) is recorded and reported.

        skorch ends training quietly on ``KeyboardInterrupt`` and keeps the weights reached, so
        the estimator predicts and certifies with them. Here the last history row also gets
        ``interrupted=True`` and a warning says how far training went.
        """
        try:
            return super().fit_loop(X, y, epochs=epochs, **fit_params)
        except KeyboardInterrupt:
            if len(self.history):
                self.history.record("interrupted", True)
            warnings.warn(
                f"{type(self).__name__} training was interrupted (KeyboardInterrupt) in epoch "
                f"{len(self.history)}, after {max(len(self.history) - 1, 0)} complete epochs: "
                "the estimator keeps the weights reached so far (its history ends with the "
                "interrupted epoch, marked interrupted=True).",
                UserWarning,
                stacklevel=2,
            )
            raise  # skorch's partial_fit catches it and ends training (on_train_end)

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

    # ------------------------------------------------------------- batches
    #: Make training batches by indexing tensors of the whole data (:class:`TensorBatches`:
    #: the same batches as skorch's ``DataLoader``, without its per-row loading) where the data
    #: allow it.
    _tensor_batches: ClassVar[bool] = True

    def get_iterator(self, dataset, training=False):
        """skorch's batch iterator; for training, :class:`TensorBatches` when the class sets
        ``_tensor_batches`` and the dataset allows it (the same batches)."""
        if training and self._tensor_batches:
            batches = TensorBatches.for_dataset(self, dataset)
            if batches is not None:
                return batches
        return super().get_iterator(dataset, training=training)

    # --------------------------------------------------------------- module
    def initialize_module(self):
        """Build the default network from the data when ``module`` is None."""
        if self.module is not None:
            return super().initialize_module()
        if not hasattr(self, "n_features_in_") or not hasattr(self, "classes_inferred_"):
            raise NotInitializedError(
                f"{type(self).__name__}(module=None) builds its network from the data: call fit "
                "(or pass a module)."
            )
        kwargs = self.get_params_for("module")
        self.module_ = self.build_default_module(
            self.n_features_in_, len(self.classes_), **kwargs
        )
        return self

    def build_default_module(self, n_features: int, n_classes: int, **kwargs) -> nn.Module:
        """Default network: a CNN when ``input_shape`` is set, an MLP otherwise.

        Parameters
        ----------
        n_features : int
            Number of features of one (flat) sample.
        n_classes : int
            Number of classes.
        **kwargs
            ``module__*`` parameters, forwarded to :func:`certdistill.estimators.models.make_cnn` or
            :func:`certdistill.estimators.models.make_mlp`.

        Returns
        -------
        torch.nn.Module
        """
        if self.input_shape is not None and len(tuple(self.input_shape)) == 3:
            return make_cnn(tuple(self.input_shape), n_classes, **kwargs)
        return make_mlp(n_features, n_classes, **kwargs)

    def interval_terms(
        self, x: Tensor, y: Tensor, training: bool = True, *, keep_state: bool = False,
        center: Tensor | None = None, scale: float = 1.0,
    ) -> IntervalTerms:
        """The IBP pieces of a certified training loss for one batch, at the scheduled eps.

        Parameters
        ----------
        x : Tensor
            Module inputs of the batch.
        y : LongTensor
            Encoded labels.
        training : bool, default=True
            Training step (the warm-up regulariser applies) or validation step.
        keep_state : bool, default=False
            Keep the sweep's state so that CROWN-IBP can bound the same network again
            (:meth:`~certdistill.bounds.BoundEngine.crown_ibp_margins`).
        center : Tensor or None, default=None
            Bound the box of radius ``scale * eps`` around ``center`` instead of the ball
            around ``x`` (SABR's small box; the caller keeps it inside the ball). The terms'
            ``logits`` are then those at ``center``.
        scale : float, default=1.0
            Fraction of the scheduled radius bounded around ``center``.

        Returns
        -------
        IntervalTerms
        """
        perturbation = getattr(self, "current_perturbation_", None)
        if perturbation is None:
            perturbation = self.training_perturbation()
        eps_level = perturbation.level
        if eps_level <= 0.0:
            logits = self.module_(x)
            return IntervalTerms(logits, logits - logits.gather(1, y[:, None]), None,
                                 perturbation, logits.new_zeros(()))
        eps_max_level = float(np.mean(self.eps_train))
        reg_lambda = float(self.reg_lambda)
        reg_weight = 0.0
        if training and reg_lambda > 0 and eps_level < eps_max_level:
            reg_weight = reg_lambda * (1.0 - eps_level / eps_max_level)
        bounded = perturbation if scale == 1.0 else perturbation.scaled(scale)
        out = self.bound_engine().interval_pass(
            x if center is None else center, bounded, y, record_activations=reg_weight > 0,
            keep_state=keep_state,
        )
        regularizer = out.logits.new_zeros(())
        if reg_weight > 0 and out.activation_bounds:
            regularizer = reg_weight * shi_regularizer(
                out.activation_bounds, out.input_radius, tol=float(self.reg_tol)
            )
        return IntervalTerms(out.logits, worst_case_logits(out.margins), out.margins,
                             perturbation, regularizer, out)

    def bound_engine(self):
        """The bound engine over ``module_`` (built once per module, see
        :func:`~certdistill.bounds.engine_for`).

        Raises
        ------
        UnsupportedLayerError
            If ``module_`` is not an ``nn.Sequential`` of layers the engine supports.
        """
        return engine_for(self.module_)

    # ---------------------------------------------------------------- input
    def _reshape(self, x: Tensor) -> Tensor:
        shape = self._module_sample_shape()
        if shape is not None:
            return x.reshape(x.shape[0], *shape)
        return x

    def module_input(self, X) -> Tensor:
        """Turn a batch (numpy or tensor of flat rows) into the module's input tensor.

        Parameters
        ----------
        X : array-like or Tensor of shape (n, n_features)

        Returns
        -------
        Tensor
            Float tensor on ``device``, reshaped to ``(n, *input_shape)`` if set.
        """
        x = to_tensor(X, device=self.device)
        if x.dtype != torch.float32 and x.is_floating_point():
            x = x.float()
        return self._reshape(x)

    def infer(self, x, **fit_params):
        """Forward pass of one batch, reshaping flat rows to ``input_shape``."""
        x = self.module_input(x)
        return self.module_(x, **fit_params)

    # --------------------------------------------------------------- steps
    def training_loss(self, x: Tensor, y: Tensor, training: bool = True) -> tuple[Tensor, Tensor]:
        """Loss of one batch; the hook that subclasses override.

        Parameters
        ----------
        x : Tensor
            Batch of module inputs (already reshaped to ``input_shape``), on ``device``.
        y : LongTensor
            Encoded labels.
        training : bool, default=True
            True in the training step (module in train mode, gradients on), False in the
            validation step (eval mode, no gradients).

        Returns
        -------
        loss : Tensor
            Scalar loss.
        logits : Tensor
            Clean logits of the batch (used for the reported predictions).
        """
        logits = self.module_(x)
        return self.get_loss(logits, y, X=x, training=training), logits

    def train_step_single(self, batch, **fit_params):
        """Forward, training loss and backward of one batch (no optimiser step)."""
        self._set_training(True)
        Xi, yi = unpack_data(batch)
        x = self.module_input(Xi)
        y = to_tensor(yi, device=self.device).long()
        with _batchnorm_eval_for_single_sample(self.module_, x.shape[0]):
            loss, logits = self.training_loss(x, y, training=True)
        loss.backward()
        return {"loss": loss, "y_pred": logits}

    def validation_step(self, batch, **fit_params):
        """Training loss of one batch in eval mode, without gradients."""
        self._set_training(False)
        Xi, yi = unpack_data(batch)
        x = self.module_input(Xi)
        y = to_tensor(yi, device=self.device).long()
        with torch.no_grad():
            loss, logits = self.training_loss(x, y, training=False)
        return {"loss": loss, "y_pred": logits}

    # ----------------------------------------------------------- prediction
    @_in_torch_threads
    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (softmax of the logits), columns in the order of ``classes_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        if isinstance(X, Dataset):  # skorch's internal scoring on its own datasets
            return super().predict_proba(X)
        X = self._validate_predict_data(X)
        proba = super().predict_proba(X).astype(np.float64)
        proba /= proba.sum(axis=1, keepdims=True)
        return proba

    def predict(self, X) -> np.ndarray:
        """Predicted class labels (of the type seen in ``fit``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        proba = self.predict_proba(X)
        return np.asarray(self.classes_)[proba.argmax(axis=1)]

    # -------------------------------------------------------- certification
    def _certification_inputs(self, X, y) -> tuple[Tensor, np.ndarray | None]:
        """Validated rows as the module's input, and encoded labels (of one chunk, streamed)."""
        x = self.module_input(self._validate_predict_data(X))
        return x, None if y is None else self._encode_labels(np.asarray(y).reshape(-1))

    def _certification_perturbation(self, eps) -> Perturbation:
        return self.perturbation_ if eps is None else self.perturbation_.with_eps(eps)

    def _certification_problem(self, X, y, eps, batch_size: int = 256) -> Problem:
        x, labels = self._certification_inputs(X, y)
        return Problem.create(self.module_, x, self._certification_perturbation(eps), y=labels,
                               batch_size=batch_size)

    @_in_torch_threads
    def certify(
        self, X, eps=None, method: str | Sequence[str] = DEFAULT_METHOD, *, y=None,
        batch_size: int = 256, timeout: float = 10.0, budget: float | None = None,
        verbose: int = 0, memory_limit: int | None = None,
    ) -> Certificate:
        """Certify each sample's prediction (or label) in the L-infinity ball of radius eps.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), or iterable of batches
            Inputs. A :class:`numpy.memmap` (or a dask, h5py or zarr array) is validated and
            certified ``batch_size`` rows at a time, an iterable of batches (arrays of rows or
            ``(X, y)`` pairs) batch by batch (see :func:`certdistill.certify`).
        eps : float, array-like or None, default=None
            Radius; ``None`` uses the estimator's ``eps``.
        method : str or sequence of str, default=("ibp", "crown-ibp", "crown")
            A stage or a cascade of stages, each run on the samples the previous ones left
            open: the bound methods ``"ibp"``, ``"crown-ibp"``, ``"crown"``, ``"alpha-crown"``,
            and ``"attack"``, ``"refine"``, ``"bab"``, ``"milp"``; ``"complete"`` decides every
            sample (certified or falsified) within its ``timeout`` (see
            :func:`certdistill.certify`).
        y : array-like of shape (n_samples,) or None, default=None
            Labels (of the type seen in ``fit``): the certificate then says the sample is
            robustly classified *correctly*.
        batch_size : int, default=256
            Samples bounded at once at most; rows read at a time from a memory-mapped ``X``.
        timeout : float, default=10.0
            Seconds of branch and bound and MILP per sample.
        budget : float or None, default=None
            Seconds for the whole call.
        verbose : int, default=0
            A progress bar for the search stages (and the rows of streamed inputs) when > 0.
        memory_limit : int or None, default=None
            Bytes the bound stages may use (see :func:`certdistill.certify`).

        Returns
        -------
        certdistill.Certificate
            ``prediction`` holds class indices into ``classes_`` (``classes_[prediction]`` are the
            labels); ``margins`` columns follow ``classes_``.
        """
        stages = check_stages(method)
        options = CascadeOptions(timeout=timeout, budget=budget, verbose=verbose,
                                 memory_limit=memory_limit)
        if is_streamed(X):
            self._check_fitted()
            return certify_stream(self.module_, X, self._certification_perturbation(eps), y=y,
                                  stages=stages, options=options, batch_size=batch_size,
                                  prepare=self._certification_inputs)
        return self._certification_problem(X, y, eps, batch_size).certify(stages, options)

    @_in_torch_threads
    def certified_radius(
        self, X, *, y=None, method: str | Sequence[str] = DEFAULT_METHOD, max_eps: float = 1.0,
        tol: float = 1e-3, timeout: float = 10.0,
    ) -> np.ndarray:
        """Largest certified L-infinity radius of each sample (bisection on eps).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or None, default=None
            Labels; with them the radius is 0 for misclassified samples.
        method : str or sequence of str, default=("ibp", "crown-ibp", "crown")
            Bound method(s), as in :meth:`certify`.
        max_eps : float, default=1.0
            Upper end of the search.
        tol : float, default=1e-3
            Bisection tolerance.
        timeout : float, default=10.0
            Seconds of branch and bound and MILP per sample and radius tried.

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        max_eps, tol = check_radius_search(max_eps, tol)
        stages = check_stages(method)
        problem = self._certification_problem(X, y, 0.0)
        return problem.radius(stages, max_eps=max_eps, tol=tol,
                              options=CascadeOptions(timeout=timeout))

    def certified_accuracy(
        self, X, y, eps=None, method: str | Sequence[str] = DEFAULT_METHOD, *,
        timeout: float = 10.0, budget: float | None = None,
    ) -> float:
        """Fraction of samples certified robustly correct at radius ``eps``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            True labels.
        eps : float or None, default=None
            Radius; ``None`` uses the estimator's ``eps``.
        method : str or sequence of str, default=("ibp", "crown-ibp", "crown")
            Stage(s), as in :meth:`certify` (``"complete"`` for complete verification).
        timeout, budget : float
            As in :meth:`certify`.

        Returns
        -------
        float
        """
        if y is None:
            raise ValueError(
                f"{type(self).__name__}.certified_accuracy requires y (the true labels): the "
                "fraction of robust predictions is certify(X).certified_fraction."
            )
        return float(np.mean(self.certify(X, eps=eps, method=method, y=y, timeout=timeout,
                                          budget=budget).certified))
