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

import math
import numbers
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import ClassVar

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from skorch import NeuralNetClassifier
from skorch.exceptions import NotInitializedError
from torch import nn
from torch.utils.data import Dataset

from certdistill.estimators.batches import TensorBatches
from certdistill.estimators.calls import in_torch_threads, keep_state_on_error, reject_fit_params
from certdistill.estimators.certifying import CertificationAPI
from certdistill.estimators.data import DataChecks
from certdistill.estimators.models import make_cnn, make_mlp
from certdistill.estimators.params import (
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Choice,
    ParameterChecks,
    Range,
    Subset,
    check_device,
)
from certdistill.estimators.training import CertifiedTraining, IntervalTerms

__all__ = [
    "NON_NEGATIVE",
    "POSITIVE",
    "UNIT",
    "CertifiedNetBase",
    "Choice",
    "IntervalTerms",
    "Range",
    "Subset",
    "TensorBatches",
    "check_device",
]


#: Epochs of ``max_epochs=None``, and the fewest optimiser steps it trains for.
_DEFAULT_EPOCHS = 60
_MIN_STEPS = 500


class CertifiedNetBase(
    CertificationAPI, CertifiedTraining, DataChecks, ParameterChecks, NeuralNetClassifier
):
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
    @in_torch_threads
    @keep_state_on_error
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
        reject_fit_params(self, fit_params)
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
                ConvergenceWarning,
                stacklevel=3,
            )

    @in_torch_threads
    @keep_state_on_error
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
        reject_fit_params(self, fit_params)
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
            super().partial_fit(
                X, y_enc, epochs=self._epochs_for(len(X)) if epochs is None else int(epochs)
            )
        return self

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
        self.module_ = self.build_default_module(self.n_features_in_, len(self.classes_), **kwargs)
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

    # ----------------------------------------------------------- prediction
    @in_torch_threads
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
