"""``DistilledStudent``: a certified student trained by IBP with a certified teacher's guidance."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from torch import Tensor, nn

from certdistill.base import CertifiedNetBase
from certdistill.certify import eval_mode
from certdistill.losses import worst_case_logits
from certdistill.schedules import KappaSchedule

__all__ = ["DISTILLATION_LOSSES", "DistilledStudent"]

#: Distillation losses of :class:`DistilledStudent`.
DISTILLATION_LOSSES = ("baseline", "soft-certified")


def _is_fitted(net) -> bool:
    return bool(getattr(net, "initialized_", False)) and hasattr(net, "n_features_in_")


def _kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(t / T) || softmax(s / T))``, averaged over the batch."""
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )


def _shifted_worst_case(logits: Tensor, y: Tensor) -> Tensor:
    """Worst-case logits at radius 0: ``z_j - z_y`` (0 in the reference column)."""
    return logits - logits.gather(1, y[:, None])


class DistilledStudent(CertifiedNetBase):
    """Certifiably robust student trained by IBP and distillation from a certified teacher.

    The student is trained as :class:`~certdistill.CertifiedTeacher` with ``method="ibp"`` (same
    eps warm-up and ramp, kappa schedule, Shi et al. regularisers, learning-rate decay), with a
    distillation term from the teacher. The teacher's outputs are computed in eval mode without
    gradients: its clean logits ``t(x)`` and its worst-case logits ``that(x, eps)`` from its IBP
    margin bounds at the student's current training radius (``that_j = -m_j``, ``that_y = 0``).
    With the student's clean logits ``s`` and worst-case logits ``shat`` (one interval pass), the
    certified term is ``L_cert = kappa CE(s, y) + (1 - kappa) CE(shat, y)`` and ``loss`` selects:

    * ``"baseline"``: ``(1 - lam) L_cert + lam T^2 [KL(softmax(t/T) || softmax(s/T))
      + mu KL(softmax(that/T) || softmax(shat/T))]``;
    * ``"soft-certified"``: ``L_cert`` with the soft target ``(1 - lam) onehot(y) +
      lam softmax(t/T)`` in place of the label,

    where ``lam = distill_weight``, ``mu = worst_case_weight`` and ``T = temperature``.

    Parameters
    ----------
    teacher : CertifiedNetBase or sklearn.frozen.FrozenEstimator
        The teacher. A fitted certdistill estimator (e.g. :class:`~certdistill.CertifiedTeacher`)
        is used as it is; a ``FrozenEstimator`` wrapping a fitted one is used as it is and
        survives :func:`~sklearn.base.clone` (the way to share one teacher across a grid search);
        an unfitted one is cloned and fitted on the student's data in ``fit``. The teacher's
        classes and number of features must match the student's data.
    module : torch.nn.Module, class or None, default=None
        The student network (see :class:`~certdistill.base.CertifiedNetBase`).
    eps : float, default=0.1
        Radius the student is evaluated and certified at.
    temperature : float, default=4.0
        Distillation temperature ``T`` (> 0).
    distill_weight : float, default=0.5
        Weight ``lam`` of the distillation term (``"baseline"``) or of the teacher's distribution
        in the target (``"soft-certified"``), in [0, 1].
    worst_case_weight : float, default=1.0
        Weight ``mu`` of the worst-case KL term of ``"baseline"`` (>= 0).
    loss : {"baseline", "soft-certified"}, default="baseline"
        Distillation loss.
    eps_train_ratio : float, default=1.5
        Training radius as a multiple of ``eps``.
    warmup : float, default=0.05
        Fraction of ``max_epochs`` of clean training before the eps ramp.
    ramp : float, default=0.5
        Fraction of ``max_epochs`` over which eps grows to ``eps * eps_train_ratio``.
    kappa_start, kappa_end : float, default=(1.0, 0.0)
        Weight of the clean cross-entropy in ``L_cert``, interpolated over the ramp.
    reg_lambda : float, default=0.5
        Weight of the Shi et al. warm-up regularisers (0 disables them).
    reg_tol : float, default=0.5
        Tolerance of the Shi et al. regularisers.
    input_shape, lower, upper, random_state
        See :class:`~certdistill.base.CertifiedNetBase` (they concern the student; the teacher
        reshapes flat rows with its own ``input_shape``).
    lr_milestones, lr_gamma, grad_clip
        Step learning-rate decay and gradient clipping.
    criterion, optimizer, lr, max_epochs, batch_size, train_split, verbose, **kwargs
        skorch parameters (defaults as :class:`~certdistill.CertifiedTeacher`).

    Attributes
    ----------
    teacher_ : CertifiedNetBase
        The fitted teacher used in training.
    classes_ : ndarray
        Class labels.
    n_features_in_ : int
        Number of features seen in ``fit``.
    module_ : torch.nn.Module
        The trained student network.
    history_ : skorch.History
        Losses and schedule values per epoch (and per batch).

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.frozen import FrozenEstimator
    >>> from certdistill import CertifiedTeacher, DistilledStudent
    >>> X, y = load_digits(return_X_y=True)
    >>> X, y = X[:300] / 16, y[:300]
    >>> teacher = CertifiedTeacher(method="ibp", lower=0.0, upper=1.0, max_epochs=2,
    ...                            module__hidden_sizes=(64,), random_state=0).fit(X, y)
    >>> student = DistilledStudent(FrozenEstimator(teacher), lower=0.0, upper=1.0,
    ...                            module__hidden_sizes=(32,), max_epochs=2,
    ...                            random_state=0).fit(X, y)
    >>> student.certify(X[:5], method="ibp").certified.shape
    (5,)
    """

    def __init__(
        self,
        teacher,
        module=None,
        *,
        eps: float = 0.1,
        temperature: float = 4.0,
        distill_weight: float = 0.5,
        worst_case_weight: float = 1.0,
        loss: str = "baseline",
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
        criterion=nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr: float = 5e-3,
        max_epochs: int = 60,
        batch_size: int = 128,
        train_split=None,
        verbose: int = 0,
        **kwargs,
    ):
        super().__init__(
            module,
            eps=eps,
            eps_train_ratio=eps_train_ratio,
            warmup=warmup,
            ramp=ramp,
            input_shape=input_shape,
            lower=lower,
            upper=upper,
            random_state=random_state,
            lr_milestones=lr_milestones,
            lr_gamma=lr_gamma,
            grad_clip=grad_clip,
            criterion=criterion,
            optimizer=optimizer,
            lr=lr,
            max_epochs=max_epochs,
            batch_size=batch_size,
            train_split=train_split,
            verbose=verbose,
            **kwargs,
        )
        self.teacher = teacher
        self.temperature = temperature
        self.distill_weight = distill_weight
        self.worst_case_weight = worst_case_weight
        self.loss = loss
        self.kappa_start = kappa_start
        self.kappa_end = kappa_end
        self.reg_lambda = reg_lambda
        self.reg_tol = reg_tol

    # ------------------------------------------------------------ parameters
    def _check_params(self) -> None:
        super()._check_params()
        if self.loss not in DISTILLATION_LOSSES:
            raise ValueError(f"loss must be one of {DISTILLATION_LOSSES}, got {self.loss!r}")
        for name in ("kappa_start", "kappa_end", "distill_weight"):
            value = getattr(self, name)
            if not (0.0 <= float(value) <= 1.0):
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        if not float(self.temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if float(self.worst_case_weight) < 0:
            raise ValueError(f"worst_case_weight must be >= 0, got {self.worst_case_weight!r}")
        if float(self.reg_lambda) < 0:
            raise ValueError(f"reg_lambda must be >= 0, got {self.reg_lambda!r}")

    def _schedule_callbacks(self) -> list:
        return [("kappa_schedule", KappaSchedule())]

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        """Final schedule values, used when a schedule callback is removed."""
        self.current_kappa_ = float(self.kappa_end)
        super().on_train_begin(net, X=X, y=y, **kwargs)

    # --------------------------------------------------------------- teacher
    def _validate_fit_data(self, X, y, *, reset: bool, classes=None):
        X, y_enc = super()._validate_fit_data(X, y, reset=reset, classes=classes)
        if reset or not hasattr(self, "teacher_"):
            y_orig = np.asarray(self.classes_)[y_enc]
            self.teacher_ = self._fitted_teacher(X, y_orig)
        return X, y_enc

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

    def teacher_logits(self, x: Tensor, y: Tensor, eps, *, worst_case: bool = True):
        """Clean and worst-case logits of ``teacher_``, without gradients.

        Parameters
        ----------
        x : Tensor
            Student module inputs of the batch (flattened and reshaped to the teacher's input).
        y : LongTensor
            Encoded labels (reference class of the margins).
        eps : float or ndarray
            Radius of the ball (0 gives ``t - t_y``).
        worst_case : bool, default=True
            Compute the worst-case logits (``None`` is returned otherwise).

        Returns
        -------
        logits : Tensor
            Clean teacher logits ``t(x)``, on ``x``'s device.
        worst : Tensor or None
            Worst-case logits from the teacher's IBP margin bounds (0 in the reference column).
        """
        teacher = self.teacher_
        module = teacher.module_
        xt = teacher.module_input(x.detach().reshape(x.shape[0], -1))
        yt = y.to(xt.device)
        with eval_mode(module), torch.no_grad():
            logits = module(xt)
            worst = None
            if worst_case:
                if float(np.mean(eps)) <= 0.0:
                    worst = _shifted_worst_case(logits, yt)
                else:
                    margins = teacher.bound_engine().margin_lower_bounds(
                        xt, self._eps_tensor(eps, xt), yt, method="ibp",
                        lower=self._domain(self.lower, xt),
                        upper=self._domain(self.upper, xt),
                    )
                    worst = worst_case_logits(margins)
        return logits.to(x.device), None if worst is None else worst.to(x.device)

    # ----------------------------------------------------------------- loss
    def training_loss(self, x: Tensor, y: Tensor, training: bool = True) -> tuple[Tensor, Tensor]:
        """Distillation loss of one batch (see the class docstring).

        Parameters
        ----------
        x : Tensor
            Module inputs of the batch.
        y : LongTensor
            Encoded labels.
        training : bool, default=True
            Training (train mode, gradients) or validation step.

        Returns
        -------
        loss : Tensor
            Scalar loss.
        logits : Tensor
            Clean student logits.
        """
        if self.loss not in DISTILLATION_LOSSES:
            raise ValueError(f"loss must be one of {DISTILLATION_LOSSES}, got {self.loss!r}")
        lam = float(self.distill_weight)
        temp = float(self.temperature)
        kappa = float(getattr(self, "current_kappa_", self.kappa_end))
        terms = self.interval_terms(x, y, training)
        logits, worst = terms.logits, terms.worst_logits

        baseline = self.loss == "baseline"
        t, that = self.teacher_logits(x, y, terms.eps, worst_case=baseline and lam > 0)
        if baseline:
            target = y
        else:
            target = (1.0 - lam) * F.one_hot(y, logits.shape[1]).to(logits.dtype)
            target = target + lam * F.softmax(t / temp, dim=1)
        loss = (1.0 - kappa) * F.cross_entropy(worst, target)
        if kappa > 0.0:
            loss = loss + kappa * F.cross_entropy(logits, target)
        if baseline and lam > 0.0:
            kd = _kl(t, logits, temp)
            if float(self.worst_case_weight) > 0.0:
                kd = kd + float(self.worst_case_weight) * _kl(that, worst, temp)
            loss = (1.0 - lam) * loss + lam * temp**2 * kd
        return loss + terms.regularizer, logits
