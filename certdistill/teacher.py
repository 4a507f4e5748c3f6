"""``CertifiedTeacher``: a certifiably robust classifier trained with IBP, CROWN-IBP or MTL-IBP."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from certdistill.attacks import pgd_attack
from certdistill.base import UNIT, CertifiedNetBase, Choice, Range
from certdistill.bounds import METHOD_TABLE
from certdistill.losses import certified_loss, worst_case_logits
from certdistill.schedules import AlphaSchedule, BetaSchedule, KappaSchedule

__all__ = ["TRAINING_METHODS", "CertifiedTeacher"]

#: Certified training methods of :class:`CertifiedTeacher`: the engine's trainable bound methods
#: and MTL-IBP (IBP bounds mixed with a PGD attack).
TRAINING_METHODS = (*(m.name for m in METHOD_TABLE.values() if m.trainable), "mtl-ibp")


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
    method : {"ibp", "crown-ibp", "mtl-ibp"}, default="ibp"
        Certified training method. IBP is the default: on the digits benchmark it certified as
        much as CROWN-IBP at less than half the cost per step (README, training benchmark).
    beta_start, beta_end : float, default=(1.0, 0.0)
        CROWN-IBP mixing weight, interpolated over the ramp (``crown-ibp`` only).
    alpha : float, default=0.5
        Weight of the certified term of MTL-IBP (``mtl-ibp`` only).
    pgd_steps : int, default=1
        PGD steps of the MTL-IBP attack.
    pgd_step_size : float or None, default=None
        PGD step length (``None``: ``2.5 * eps / steps``).
    **kwargs
        The parameters every certified estimator shares, with their defaults, documented in
        :class:`~certdistill.base.CertifiedNetBase`: ``eps`` (0.1), ``eps_train_ratio`` (1.5),
        ``warmup`` (0.05), ``ramp`` (0.5), ``kappa_start``/``kappa_end`` (1 -> 0, ``ibp`` and
        ``crown-ibp``), ``reg_lambda`` (0.5), ``reg_tol`` (0.5), ``input_shape``, ``lower``,
        ``upper``, ``random_state``, ``lr_milestones``, ``lr_gamma``, ``grad_clip``,
        ``torch_threads``, ``max_epochs`` (None: 60 epochs, or at least 500 optimiser steps on
        small data); and skorch's (``optimizer``, ``lr`` 5e-3, ``batch_size`` 128,
        ``train_split`` None, ``verbose`` 0, ``device``, ``module__*``, ``callbacks__*``, ...).
        ``criterion`` must stay ``torch.nn.CrossEntropyLoss`` without ``criterion__*`` options
        (the certified losses compute their cross-entropies directly): ``fit`` raises otherwise.

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

    _parameter_ranges = {
        "method": Choice(TRAINING_METHODS),
        "beta_start": UNIT,
        "beta_end": UNIT,
        "alpha": UNIT,
        "pgd_steps": Range(0, integer=True),
        "pgd_step_size": Range(0.0, low_open=True, optional=True),
    }

    def __init__(
        self,
        module=None,
        *,
        method: str = "ibp",
        beta_start: float = 1.0,
        beta_end: float = 0.0,
        alpha: float = 0.5,
        pgd_steps: int = 1,
        pgd_step_size: float | None = None,
        **kwargs,
    ):
        super().__init__(module, **kwargs)
        self.method = method
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.alpha = alpha
        self.pgd_steps = pgd_steps
        self.pgd_step_size = pgd_step_size

    # ------------------------------------------------------------ schedules
    #: The certified losses compute their cross-entropies directly (``criterion`` is refused).
    _uses_criterion = False

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
        beta = float(getattr(self, "current_beta_", self.beta_end))
        crown_ibp = self.method == "crown-ibp" and beta > 0.0
        terms = self.interval_terms(x, y, training, keep_state=crown_ibp)
        logits = terms.logits
        if terms.margins is None:
            return F.cross_entropy(logits, y), logits

        if self.method == "mtl-ibp":
            alpha = float(getattr(self, "current_alpha_", self.alpha))
            loss = alpha * F.cross_entropy(terms.worst_logits, y)
            if alpha < 1.0:
                x_adv = pgd_attack(
                    self.module_, x, y, terms.perturbation, steps=int(self.pgd_steps),
                    step_size=self.pgd_step_size, mode="current",
                )
                loss = loss + (1.0 - alpha) * F.cross_entropy(self.module_(x_adv), y)
            return loss + terms.regularizer, logits
        worst = terms.worst_logits
        if crown_ibp:
            # The same sweep (one Dropout mask, one set of batch statistics) bounded again.
            margins = self.bound_engine().crown_ibp_margins(terms.interval_pass)
            worst = (1.0 - beta) * worst + beta * worst_case_logits(margins)
        kappa = float(getattr(self, "current_kappa_", self.kappa_end))
        return certified_loss(logits, worst, y, kappa) + terms.regularizer, logits
