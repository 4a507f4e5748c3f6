"""The certified training step shared by the teacher and the student (:class:`CertifiedTraining`):
schedules, the IBP pieces of a loss, training and validation steps."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from skorch.callbacks import Callback, EpochScoring
from skorch.dataset import unpack_data
from skorch.utils import to_tensor
from torch import Tensor, nn

from certdistill.bounds import Perturbation, engine_for
from certdistill.estimators.losses import shi_regularizer, worst_case_logits
from certdistill.estimators.schedules import EpsSchedule, StepLR

__all__ = ["CertifiedTraining", "IntervalTerms"]


def _encoded_accuracy(net, X, y) -> float:
    """Validation accuracy on encoded labels (skorch's datasets hold the encoded ``y``)."""
    proba = net.predict_proba(X)
    y = np.asarray(y).reshape(-1)
    return float(np.mean(proba.argmax(axis=1) == y))


@contextmanager
def _batchnorm_eval_for_single_sample(module: nn.Module, n: int):
    """BatchNorm cannot normalise a batch of one sample with its own statistics: use the running
    statistics for that batch (it happens for the last batch of an epoch, or tiny data sets)."""
    if n > 1:
        yield
        return
    layers = [
        m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m in layers:
            m.train()


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


class CertifiedTraining:
    """The certified training step: the schedules' callbacks, the radius trained at, the
    IBP pieces of a loss (:meth:`interval_terms`), and the training and validation steps that call
    :meth:`training_loss`, the hook of each estimator."""

    # ------------------------------------------------------------ callbacks
    @property
    def _default_callbacks(self):
        # Callbacks read the hyperparameters from the net when training starts, so that building
        # them (get_params does) never evaluates parameter values.
        callbacks = [cb for cb in super()._default_callbacks if cb[0] != "valid_acc"]
        print_log = callbacks.pop()
        callbacks.append(
            ("valid_acc", EpochScoring(_encoded_accuracy, name="valid_acc", lower_is_better=False))
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

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        """Set the schedule attributes to their final values (callbacks override them); check
        that the bound engine supports the module before the first epoch when training bounds
        it (the warm-up epochs do not)."""
        if self.training_perturbation().level > 0:
            self.bound_engine()  # UnsupportedLayerError now rather than after the warm-up
        self.current_perturbation_ = self.training_perturbation()
        self.current_eps_ = self.current_perturbation_.eps_value
        super().on_train_begin(net, X=X, y=y, **kwargs)

    def interval_terms(
        self,
        x: Tensor,
        y: Tensor,
        training: bool = True,
        *,
        keep_state: bool = False,
        center: Tensor | None = None,
        scale: float = 1.0,
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
            return IntervalTerms(
                logits,
                logits - logits.gather(1, y[:, None]),
                None,
                perturbation,
                logits.new_zeros(()),
            )
        eps_max_level = float(np.mean(self.eps_train))
        reg_lambda = float(self.reg_lambda)
        reg_weight = 0.0
        if training and reg_lambda > 0 and eps_level < eps_max_level:
            reg_weight = reg_lambda * (1.0 - eps_level / eps_max_level)
        bounded = perturbation if scale == 1.0 else perturbation.scaled(scale)
        out = self.bound_engine().interval_pass(
            x if center is None else center,
            bounded,
            y,
            record_activations=reg_weight > 0,
            keep_state=keep_state,
        )
        regularizer = out.logits.new_zeros(())
        if reg_weight > 0 and out.activation_bounds:
            regularizer = reg_weight * shi_regularizer(
                out.activation_bounds, out.input_radius, tol=float(self.reg_tol)
            )
        return IntervalTerms(
            out.logits, worst_case_logits(out.margins), out.margins, perturbation, regularizer, out
        )

    def bound_engine(self):
        """The bound engine over ``module_`` (built once per module, see
        :func:`~certdistill.bounds.engine_for`).

        Raises
        ------
        UnsupportedLayerError
            If ``module_`` is not an ``nn.Sequential`` of layers the engine supports.
        """
        return engine_for(self.module_)

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
