"""Validation of the data the certified estimators take, and their module inputs
(:class:`DataChecks`)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import validate_data
from skorch.exceptions import NotInitializedError
from skorch.utils import to_tensor
from torch import Tensor
from torch.utils.data import Dataset

from certdistill.bounds import Perturbation
from certdistill.estimators.batches import TensorBatches

__all__ = ["DataChecks", "writable"]


def writable(X: np.ndarray) -> np.ndarray:
    """``X``, copied if it is read-only (pandas' copy-on-write arrays are), which torch warns
    about when it wraps it in a tensor."""
    return X if X.flags.writeable else X.copy()


class DataChecks:
    """Validation of the data the estimators take (``fit``, ``predict``, ``certify``), the
    shape of one sample, and batches of module inputs."""

    def _sample_shape(self, n_features: int) -> tuple[int, ...]:
        return tuple(self.input_shape) if self.input_shape is not None else (int(n_features),)

    def _set_perturbation(self, n_features: int) -> None:
        """Validate ``eps`` and the domain into ``perturbation_`` (in ``fit``, or on loading)."""
        self.perturbation_ = Perturbation.create(
            self.eps, self._sample_shape(n_features), lower=self.lower, upper=self.upper
        )

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
        X = writable(X)
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
        x = torch.from_numpy(np.ascontiguousarray(X)).reshape(
            X.shape[0], *self.perturbation_.sample_shape
        )
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
        return writable(validate_data(self, X, reset=False, dtype=np.float32))

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
