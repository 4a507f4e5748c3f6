"""``CertifiedTeacher``: a certifiably robust classifier trained with IBP, CROWN-IBP or MTL-IBP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certdistill.base import CertifiedNetBase
from certdistill.losses import worst_case_logits
from certdistill.schedules import AlphaSchedule, BetaSchedule, KappaSchedule

__all__ = ["TRAINING_METHODS", "CertifiedTeacher"]

#: Certified training methods of :class:`CertifiedTeacher`.
TRAINING_METHODS = ("ibp", "crown-ibp", "mtl-ibp")


class CertifiedTeacher(CertifiedNetBase):
    """Classifier trained to be certifiably robust in an L-infinity ball (skorch/scikit-learn).

    Worst-case logits come from lower bounds ``m_j`` of the margins ``z_y - z_j`` over the ball:
    ``zhat_j = -m_j``, ``zhat_y = 0``. The training objective depends on ``method``:

    * ``"ibp"`` (Gowal et al. 2018): ``kappa CE(z, y) + (1 - kappa) CE(zhat_IBP, y)``;
    * ``"crown-ibp"`` (Zhang et al. 2020): as IBP with
      ``zhat = -[(1 - beta) m_IBP + beta m_CROWN-IBP]``, ``beta`` going from ``beta_start`` to
      ``beta_end`` (CROWN-IBP bounds are not computed once ``beta`` reaches 0);
    * ``"mtl-ibp"`` (De Palma et al. 2024): ``(1 - alpha) CE(z(x_adv), y) + alpha CE(zhat_IBP, y)``
      with ``x_adv`` from a short PGD attack inside the ball.

    All methods use the recipe of Shi et al. (2021) by default: IBP initialisation and BatchNorm in
    the default networks, a warm-up and an eps ramp (``warmup``, ``ramp``), and, while eps ramps,
    the bound-tightness and ReLU-balance regularisers weighted by
    ``reg_lambda * (1 - eps_t / eps_train)``. The schedules are skorch callbacks
    (``eps_schedule``, ``kappa_schedule``, ``beta_schedule``, ``alpha_schedule``,
    ``lr_schedule``); their values are recorded in ``history`` (``history[:, "eps"]`` ...) and
    their parameters can be changed with ``callbacks__<name>__<param>``.

    Parameters
    ----------
    module : torch.nn.Module, class or None, default=None
        The network (see :class:`~certdistill.base.CertifiedNetBase`). ``None`` builds an MLP for
        flat features or, with ``input_shape``, a small CNN.
    eps : float, default=0.1
        Radius the teacher is evaluated and certified at.
    method : {"crown-ibp", "ibp", "mtl-ibp"}, default="crown-ibp"
        Certified training method.
    eps_train_ratio : float, default=1.5
        Training radius as a multiple of ``eps`` (on digits at eps = 0.1, 1.3 to 1.5 certified
        about two points more than 1.0).
    warmup : float, default=0.05
        Fraction of ``max_epochs`` of clean training before the eps ramp.
    ramp : float, default=0.5
        Fraction of ``max_epochs`` over which eps grows to ``eps * eps_train_ratio``.
    kappa_start, kappa_end : float, default=(1.0, 0.0)
        Weight of the clean cross-entropy, interpolated over the ramp (``ibp`` and ``crown-ibp``).
    beta_start, beta_end : float, default=(1.0, 0.0)
        CROWN-IBP mixing weight, interpolated over the ramp (``crown-ibp`` only).
    alpha : float, default=0.5
        Weight of the certified term of MTL-IBP (``mtl-ibp`` only).
    pgd_steps : int, default=1
        PGD steps of the MTL-IBP attack.
    pgd_step_size : float or None, default=None
        PGD step length (``None``: ``2.5 * eps / steps``).
    reg_lambda : float, default=0.5
        Weight of the Shi et al. warm-up regularisers (0 disables them).
    reg_tol : float, default=0.5
        Tolerance of the Shi et al. regularisers.
    input_shape, lower, upper, random_state
        See :class:`~certdistill.base.CertifiedNetBase`.
    lr_milestones, lr_gamma, grad_clip
        Step learning-rate decay and gradient clipping.
    criterion, optimizer, lr, max_epochs, batch_size, train_split, verbose, **kwargs
        skorch parameters (defaults: cross-entropy, Adam, 5e-3, 60 epochs, batch 128, no
        internal validation split, silent). ``criterion`` must stay
        ``torch.nn.CrossEntropyLoss`` without ``criterion__*`` options (the certified losses
        compute their cross-entropies directly): ``fit`` raises a ``ValueError`` otherwise.

    Attributes
    ----------
    classes_ : ndarray
        Class labels.
    n_features_in_ : int
        Number of features seen in ``fit``.
    module_ : torch.nn.Module
        The trained network.
    history_ : skorch.History
        Losses and schedule values per epoch (and per batch).

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from certdistill import CertifiedTeacher
    >>> X, y = load_digits(return_X_y=True)
    >>> teacher = CertifiedTeacher(eps=0.1, input_shape=(1, 8, 8), lower=0.0, upper=1.0,
    ...                            max_epochs=2, random_state=0).fit(X / 16, y)
    >>> teacher.certify(X[:5] / 16).certified.shape
    (5,)
    """

    def __init__(
        self,
        module=None,
        *,
        eps: float = 0.1,
        method: str = "crown-ibp",
        eps_train_ratio: float = 1.5,
        warmup: float = 0.05,
        ramp: float = 0.5,
        kappa_start: float = 1.0,
        kappa_end: float = 0.0,
        beta_start: float = 1.0,
        beta_end: float = 0.0,
        alpha: float = 0.5,
        pgd_steps: int = 1,
        pgd_step_size: float | None = None,
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
        self.method = method
        self.kappa_start = kappa_start
        self.kappa_end = kappa_end
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.alpha = alpha
        self.pgd_steps = pgd_steps
        self.pgd_step_size = pgd_step_size
        self.reg_lambda = reg_lambda
        self.reg_tol = reg_tol

    # ------------------------------------------------------------ schedules
    _uses_criterion = False

    def _check_params(self) -> None:
        super()._check_params()
        if self.method not in TRAINING_METHODS:
            raise ValueError(
                f"method must be one of {TRAINING_METHODS}, got {self.method!r}"
            )
        for name in ("kappa_start", "kappa_end", "beta_start", "beta_end", "alpha"):
            value = getattr(self, name)
            if not (0.0 <= float(value) <= 1.0):
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        if int(self.pgd_steps) < 0:
            raise ValueError(f"pgd_steps must be >= 0, got {self.pgd_steps!r}")
        if float(self.reg_lambda) < 0:
            raise ValueError(f"reg_lambda must be >= 0, got {self.reg_lambda!r}")

    def _schedule_callbacks(self) -> list:
        return [
            ("kappa_schedule", KappaSchedule()),
            ("beta_schedule", BetaSchedule()),
            ("alpha_schedule", AlphaSchedule()),
        ]

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        """Final schedule values, used when a schedule callback is removed."""
        self.current_kappa_ = float(self.kappa_end)
        self.current_beta_ = float(self.beta_end)
        self.current_alpha_ = float(self.alpha)
        super().on_train_begin(net, X=X, y=y, **kwargs)

    # ----------------------------------------------------------------- loss
    def _schedule_value(self, name: str, default):
        return getattr(self, name, default)

    def training_loss(self, x: Tensor, y: Tensor, training: bool = True) -> tuple[Tensor, Tensor]:
        """Certified training loss of one batch (see the class docstring).

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
            Clean logits.
        """
        if self.method not in TRAINING_METHODS:
            raise ValueError(f"method must be one of {TRAINING_METHODS}, got {self.method!r}")
        terms = self.interval_terms(x, y, training)
        logits = terms.logits
        if terms.margins is None:
            return F.cross_entropy(logits, y), logits

        if self.method == "mtl-ibp":
            alpha = float(self._schedule_value("current_alpha_", self.alpha))
            loss = alpha * F.cross_entropy(terms.worst_logits, y)
            if alpha < 1.0:
                from certdistill.attacks import pgd_attack

                x_adv = pgd_attack(
                    self.module_, x, y, terms.eps_tensor, steps=int(self.pgd_steps),
                    step_size=self.pgd_step_size, lower=terms.lower, upper=terms.upper,
                    mode="current",
                )
                loss = loss + (1.0 - alpha) * F.cross_entropy(self.module_(x_adv), y)
        else:
            kappa = float(self._schedule_value("current_kappa_", self.kappa_end))
            zhat = terms.worst_logits
            if self.method == "crown-ibp":
                beta = float(self._schedule_value("current_beta_", self.beta_end))
                if beta > 0.0:
                    margins_crown = self.bound_engine().margin_lower_bounds(
                        x, terms.eps_tensor, y, method="crown-ibp", lower=terms.lower,
                        upper=terms.upper,
                    )
                    zhat = (1.0 - beta) * zhat + beta * worst_case_logits(margins_crown)
            loss = (1.0 - kappa) * F.cross_entropy(zhat, y)
            if kappa > 0.0:
                loss = loss + kappa * F.cross_entropy(logits, y)
        return loss + terms.regularizer, logits
