"""How a student learns from its teacher (:class:`TeacherGuidance`): the fitted teacher,
its cached outputs, its labels for unlabelled rows and transfer inputs, and the row indices
of each training batch that let the cache be looked up."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.utils import check_random_state
from sklearn.utils.validation import validate_data
from torch import Tensor

from certdistill.bounds import Perturbation
from certdistill.certification.certify import eval_mode
from certdistill.estimators.base import (
    CertifiedNetBase,
    TensorBatches,
)
from certdistill.estimators.losses import rival_gap
from certdistill.estimators.teacher_outputs import TeacherOutputs
from certdistill.estimators.transfer import transfer_inputs

__all__ = ["AUTO_SHARE", "TeacherGuidance"]

#: ``transfer_keep="auto"`` keeps every transfer input when the teacher certifies at least this
#: share of them, else only those it certifies (see :class:`~certdistill.DistilledStudent`).
AUTO_SHARE = 0.5


def _unlabeled_rows(y, marker) -> np.ndarray | None:
    """Rows whose label is ``marker`` (e.g. -1, scikit-learn's semi-supervised convention)."""
    if y is None or marker is None:
        return None
    mask = np.asarray(y).reshape(-1) == marker
    if not mask.any():
        return None
    if mask.all():
        raise ValueError(
            f"Every row of y is {marker!r} (unlabelled): the teacher and the student "
            "need labelled rows too."
        )
    return mask


def _split_rows(X, mask: np.ndarray):
    if hasattr(X, "iloc"):  # pandas
        return X.iloc[np.flatnonzero(mask)]
    return np.asarray(X)[mask]


def _is_fitted(net) -> bool:
    return bool(getattr(net, "initialized_", False)) and hasattr(net, "n_features_in_")


class TeacherGuidance:
    """The teacher side of :class:`~certdistill.DistilledStudent` (a mixin of it)."""

    # ---------------------------------------------------------------- batches
    def get_iterator(self, dataset, training=False):
        """skorch's iterator, or for training :class:`~certdistill.estimators.base.TensorBatches`
        (kept
        for the steps to find each batch's rows)."""
        iterator = super().get_iterator(dataset, training=training)
        if training:
            self._train_batches = iterator if isinstance(iterator, TensorBatches) else None
        return iterator

    def train_step_single(self, batch, **fit_params):
        """The base training step; the batch's row indices are known to the loss meanwhile."""
        batches = getattr(self, "_train_batches", None)
        rows = None
        if batches is not None and isinstance(batch, (tuple, list)) and batch:
            outputs = getattr(self, "teacher_outputs_", None)
            bound = (
                outputs is not None
                and outputs.teacher is getattr(self, "teacher_", None)
                and outputs.is_bound_to(batches.source)
            )
            rows = batches.rows_of(batch[0]) if bound else None
        self._batch_rows = rows
        try:
            return super().train_step_single(batch, **fit_params)
        finally:
            self._batch_rows = None

    # --------------------------------------------------------------- teacher
    def _validate_fit_data(self, X, y, *, reset: bool, classes=None):
        unlabeled = _unlabeled_rows(y, self.unlabeled_label)
        X_unlabeled = None
        if unlabeled is not None:
            X_unlabeled, X = _split_rows(X, unlabeled), _split_rows(X, ~unlabeled)
            y = np.asarray(y).reshape(-1)[~unlabeled]
        X, y_enc = super()._validate_fit_data(X, y, reset=reset, classes=classes)
        if reset or not hasattr(self, "teacher_"):
            y_orig = np.asarray(self.classes_)[y_enc]
            self.teacher_ = self._fitted_teacher(X, y_orig)
        # The teacher labels every row that has no label of its own.
        X_parts, y_parts = [X], [y_enc]
        self.transfer_kept_, self.transfer_certified_ = 0, None
        if X_unlabeled is not None:
            X_unlabeled = self._validate_unlabeled(X_unlabeled)
            X_parts.append(X_unlabeled)
            y_parts.append(self._teacher_labels(X_unlabeled))
        if self.transfer:
            transfer = self._transfer_inputs(np.concatenate(X_parts))
            labels = self._teacher_labels(transfer)
            if self.transfer_keep != "all" and len(transfer):
                proven = self._teacher_certifies(transfer, labels)
                self.transfer_certified_ = float(proven.mean())
                if self.transfer_keep == "certified" or self.transfer_certified_ < AUTO_SHARE:
                    transfer, labels = transfer[proven], labels[proven]
            self.transfer_kept_ = len(transfer)
            if len(transfer):
                X_parts.append(transfer)
                y_parts.append(labels)
        if len(X_parts) > 1:
            X, y_enc = np.concatenate(X_parts), np.concatenate(y_parts)
        return X, y_enc

    def _teacher_certifies(self, X: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Whether the teacher's bound (``teacher_bounds``; for ``"pgd"``, its attack) proves
        each row's label within the student's eps ball (a boolean mask)."""
        perturbation = self.perturbation_.to(device=self.device)
        if len(X) == 0 or perturbation.level <= 0.0:
            return np.ones(len(X), dtype=bool)
        outputs = self._teacher_outputs()
        kept = []
        for start in range(0, len(X), 1024):
            x = self.module_input(X[start : start + 1024])
            y = torch.as_tensor(labels[start : start + 1024], device=x.device)
            _, worst = outputs(x, y, perturbation, cache=False)
            kept.append((rival_gap(worst, y) < 0).cpu().numpy())
        return np.concatenate(kept)

    def _teacher_labels(self, X: np.ndarray) -> np.ndarray:
        """The teacher's predicted class index of each (validated, flat) row."""
        if len(X) == 0:  # a small transfer_size may make no transfer inputs
            return np.empty(0, dtype=np.int64)
        module = self.teacher_.module_
        with torch.no_grad(), eval_mode(module):
            logits = [
                module(self.teacher_.module_input(X[start : start + 1024]))
                for start in range(0, len(X), 1024)
            ]
        return torch.cat(logits).argmax(1).cpu().numpy().astype(np.int64)

    def _validate_unlabeled(self, X: np.ndarray) -> np.ndarray:
        X = validate_data(self, self._flatten_nd(X), reset=False, dtype=np.float32)
        self._check_domain(X)
        return X

    def _transfer_inputs(self, X: np.ndarray, return_sources: bool = False):
        """Transfer inputs made from the rows ``X`` (and, with ``return_sources``, the row each
        was made from; see :func:`~certdistill.estimators.transfer.transfer_inputs`)."""
        perturbation = self.perturbation_.reshaped((X.shape[1],))
        flat = [
            None if t is None else t.cpu().numpy() for t in (perturbation.lower, perturbation.upper)
        ]
        kinds = (self.transfer,) if isinstance(self.transfer, str) else tuple(self.transfer)
        if "shift" in kinds and (self.input_shape is None or len(self.input_shape) != 3):
            raise ValueError("transfer='shift' moves images: it needs input_shape=(C, H, W).")
        return transfer_inputs(
            X,
            kinds,
            self.transfer_size,
            perturbation.eps.cpu().numpy(),
            lower=flat[0],
            upper=flat[1],
            input_shape=self.input_shape,
            random_state=check_random_state(self._seed()),
            return_sources=return_sources,
        )

    def _fitted_teacher(self, X: np.ndarray, y: np.ndarray) -> CertifiedNetBase:
        """The teacher to distil from: as given if fitted, else a clone fitted on ``X``, ``y``."""
        teacher = self.teacher
        frozen = isinstance(teacher, FrozenEstimator)
        if frozen:
            teacher = teacher.estimator
        if not isinstance(teacher, CertifiedNetBase):
            raise TypeError(
                "teacher must be a certdistill estimator (e.g. CertifiedTeacher) or a "
                f"FrozenEstimator wrapping one, got {type(teacher).__name__}."
            )
        if not _is_fitted(teacher):
            if frozen:
                raise NotFittedError(
                    "The FrozenEstimator passed as teacher wraps an unfitted teacher: fit the "
                    "teacher before freezing it (or pass the unfitted teacher itself)."
                )
            teacher = clone(teacher).fit(X, y)
        if int(teacher.n_features_in_) != X.shape[1]:
            raise ValueError(
                f"The teacher was fitted on {teacher.n_features_in_} features, but the student's "
                f"X has {X.shape[1]} features."
            )
        if not np.array_equal(np.asarray(teacher.classes_), np.asarray(self.classes_)):
            raise ValueError(
                f"The teacher's classes {np.asarray(teacher.classes_)!r} differ from the "
                f"student's classes {np.asarray(self.classes_)!r}: distil on data with the "
                "teacher's classes."
            )
        return teacher

    # ----------------------------------------------------------------- loss
    def _teacher_outputs(self) -> TeacherOutputs:
        outputs = getattr(self, "teacher_outputs_", None)
        if outputs is None or outputs.teacher is not self.teacher_:
            levels = self.teacher_radius_levels
            outputs = TeacherOutputs(
                self.teacher_,
                self.teacher_bounds,
                cache=bool(self.cache_teacher),
                ceiling=self.training_perturbation(),
                levels=None if levels is None else int(levels),
            )
            self.teacher_outputs_ = outputs
        return outputs

    def teacher_logits(self, x: Tensor, y: Tensor, eps, *, worst_case: bool = True):
        """Clean and worst-case logits of ``teacher_`` (no gradients; cached, see
        :class:`~certdistill.estimators.teacher_outputs.TeacherOutputs`).

        Parameters
        ----------
        x : Tensor
            Student module inputs of the batch.
        y : LongTensor
            Encoded labels (reference class of the worst case).
        eps : float, array-like or Perturbation
            Radius of the ball around the student's inputs (0 gives ``t - t_y``), or the
            student's perturbation of the batch.
        worst_case : bool, default=True
            Compute the worst-case logits (``None`` is returned otherwise).

        Returns
        -------
        logits : Tensor
            Clean teacher logits ``t(x)``, on ``x``'s device.
        worst : Tensor or None
            Worst-case logits from ``teacher_bounds`` (0 in the label's column).
        """
        if not isinstance(eps, Perturbation):
            eps = self.perturbation_.with_eps(eps).to(device=x.device)
        return self._teacher_outputs()(x, y, eps, worst_case=worst_case)
