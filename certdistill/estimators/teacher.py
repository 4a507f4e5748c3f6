"""``CertifiedTeacher``: a certifiably robust classifier trained with IBP, CROWN-IBP or MTL-IBP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from certdistill.estimators.base import UNIT, CertifiedNetBase, Choice, Range
from certdistill.estimators.losses import certified_loss, with_clean_term, worst_case_logits
from certdistill.estimators.schedules import AlphaSchedule, BetaSchedule, KappaSchedule
from certdistill.verify.attacks import pgd_attack

__all__ = ["TRAINING_LOSSES", "TRAINING_METHODS", "CertifiedTeacher", "sabr_center"]


def _kappa(net: CertifiedTeacher) -> float:
    return float(getattr(net, "current_kappa_", net.kappa_end))


def _ibp_loss(net: CertifiedTeacher, x: Tensor, y: Tensor, training: bool):
    """``kappa CE(z, y) + (1 - kappa) CE(zhat_IBP, y)``."""
    terms = net.interval_terms(x, y, training)
    if terms.margins is None:
        return F.cross_entropy(terms.logits, y), terms.logits
    return (
        certified_loss(terms.logits, terms.worst_logits, y, _kappa(net)) + terms.regularizer,
        terms.logits,
    )


def _crown_ibp_loss(net: CertifiedTeacher, x: Tensor, y: Tensor, training: bool):
    """IBP's loss with the worst case mixed with CROWN-IBP's, ``beta`` of the way."""
    beta = float(getattr(net, "current_beta_", net.beta_end))
    if beta <= 0.0:
        return _ibp_loss(net, x, y, training)
    terms = net.interval_terms(x, y, training, keep_state=True)
    if terms.margins is None:
        return F.cross_entropy(terms.logits, y), terms.logits
    # The same sweep (one Dropout mask, one set of batch statistics) bounded again.
    if net.loss_fusion:
        worst_ce = net.bound_engine().crown_ibp_cross_entropy(terms.interval_pass, mix=beta)
        loss = with_clean_term(worst_ce.mean(), terms.logits, y, _kappa(net))
        return loss + terms.regularizer, terms.logits
    margins = net.bound_engine().crown_ibp_margins(terms.interval_pass)
    worst = (1.0 - beta) * terms.worst_logits + beta * worst_case_logits(margins)
    return certified_loss(terms.logits, worst, y, _kappa(net)) + terms.regularizer, terms.logits


def _mtl_ibp_loss(net: CertifiedTeacher, x: Tensor, y: Tensor, training: bool):
    """``(1 - alpha) CE(z(x_adv), y) + alpha CE(zhat_IBP, y)``."""
    terms = net.interval_terms(x, y, training)
    if terms.margins is None:
        return F.cross_entropy(terms.logits, y), terms.logits
    alpha = float(getattr(net, "current_alpha_", net.alpha))
    loss = alpha * F.cross_entropy(terms.worst_logits, y)
    if alpha < 1.0:
        x_adv = net._attack(x, y, terms.perturbation)
        loss = loss + (1.0 - alpha) * F.cross_entropy(net.module_(x_adv), y)
    return loss + terms.regularizer, terms.logits


def sabr_center(x: Tensor, x_adv: Tensor, eps: Tensor, fraction: float) -> Tensor:
    """The center of SABR's small box: ``x_adv`` moved towards ``x`` until the box of radius
    ``fraction * eps`` around it lies inside the ball of radius ``eps`` around ``x``."""
    reach = (1.0 - float(fraction)) * eps
    return x + torch.maximum(torch.minimum(x_adv - x, reach), -reach)


def _sabr_loss(net: CertifiedTeacher, x: Tensor, y: Tensor, training: bool):
    """IBP's loss on a box of ``sabr_lambda`` times the radius around a PGD point, inside the
    ball (Mueller et al. 2023)."""
    perturbation = getattr(net, "current_perturbation_", None)
    if perturbation is None:
        perturbation = net.training_perturbation()
    if perturbation.level <= 0.0:
        return _ibp_loss(net, x, y, training)
    eps = perturbation.reshaped(x.shape[1:]).eps.to(device=x.device, dtype=x.dtype)
    center = sabr_center(x, net._attack(x, y, perturbation).detach(), eps, net.sabr_lambda)
    terms = net.interval_terms(x, y, training, center=center, scale=float(net.sabr_lambda))
    logits = net.module_(x)
    return (certified_loss(logits, terms.worst_logits, y, _kappa(net)) + terms.regularizer, logits)


#: Training method -> its loss ``(net, x, y, training) -> (loss, clean logits)``: a new
#: method is one function and one entry here.
TRAINING_LOSSES = {
    "ibp": _ibp_loss,
    "crown-ibp": _crown_ibp_loss,
    "mtl-ibp": _mtl_ibp_loss,
    "sabr": _sabr_loss,
}

#: Certified training methods of :class:`CertifiedTeacher`: the names of ``TRAINING_LOSSES``.
TRAINING_METHODS = tuple(TRAINING_LOSSES)


class CertifiedTeacher(CertifiedNetBase):
    """Classifier trained to be certifiably robust in an L-infinity ball (skorch/scikit-learn).

    Worst-case logits come from lower bounds ``m_j`` of the margins ``z_y - z_j`` over the ball:
    ``zhat_j = -m_j``, ``zhat_y = 0``. The training objective depends on ``method``:

    * ``"ibp"`` (Gowal et al. 2018): ``kappa CE(z, y) + (1 - kappa) CE(zhat_IBP, y)``;
    * ``"crown-ibp"`` (Zhang et al. 2020): as IBP with
      ``zhat = -[(1 - beta) m_IBP + beta m_CROWN-IBP]``, ``beta`` going from ``beta_start`` to
      ``beta_end`` (CROWN-IBP bounds are not computed once ``beta`` reaches 0); by default the
      CROWN-IBP term bounds the cross-entropy as a whole instead (``loss_fusion``);
    * ``"mtl-ibp"`` (De Palma et al. 2024): ``(1 - alpha) CE(z(x_adv), y) + alpha CE(zhat_IBP, y)``
      with ``x_adv`` from a short PGD attack inside the ball;
    * ``"sabr"`` (Mueller et al. 2023): IBP's loss with ``zhat`` bounded over a small box, of
      radius ``sabr_lambda * eps``, around the PGD point ``x_adv`` moved just enough towards
      ``x`` that the box lies inside the ball (:func:`sabr_center`): tighter bounds on a box that
      still contains the likely worst case. The network is certified on the whole ball as any
      other.

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
        The network (see :class:`~certdistill.estimators.base.CertifiedNetBase`). ``None`` builds
        an MLP for
        flat features or, with ``input_shape``, a small CNN.
    method : {"ibp", "crown-ibp", "mtl-ibp", "sabr"}, default="ibp"
        Certified training method. IBP is the default: on the digits benchmark it certified as
        much as CROWN-IBP at less than half the cost per step (docs/benchmarks.md).
    beta_start, beta_end : float, default=(1.0, 0.0)
        CROWN-IBP mixing weight, interpolated over the ramp (``crown-ibp`` only).
    loss_fusion : bool, default=True
        ``crown-ibp`` only. True: bound the worst-case cross-entropy itself by one backward row
        (Xu et al. 2020, :meth:`~certdistill.bounds.BoundEngine.crown_ibp_cross_entropy`) and
        train on ``kappa CE(z, y) + (1 - kappa) [s + log((1 - beta) S_IBP + beta S_CROWN-IBP)]``,
        an upper bound of the worst-case cross-entropy (``S`` bounds
        ``sum_j exp(z_j - z_y - s)``). False: bound every margin by its own row, the loss of
        Zhang et al. (2020) above. On the digits benchmark (3 seeds) both certified as much,
        and a fused step cost 1.74-1.77 IBP steps where the per-margin one cost 5.3-5.9
        (docs/benchmarks.md).
    alpha : float, default=0.5
        Weight of the certified term of MTL-IBP (``mtl-ibp`` only).
    sabr_lambda : float, default=0.4
        Radius of SABR's small box as a fraction of eps, in (0, 1] (``sabr`` only; 1 is IBP
        on the whole ball).
    pgd_steps : int, default=1
        PGD steps of the MTL-IBP and SABR attack.
    pgd_step_size : float or None, default=None
        PGD step length (``None``: ``2.5 * eps / steps``).
    **kwargs
        The parameters every certified estimator shares, with their defaults, documented in
        :class:`~certdistill.estimators.base.CertifiedNetBase`: ``eps`` (0.1), ``eps_train_ratio``
        (1.5),
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
        "method": Choice(TRAINING_LOSSES),
        "beta_start": UNIT,
        "beta_end": UNIT,
        "loss_fusion": Choice((False, True)),
        "alpha": UNIT,
        "sabr_lambda": Range(0.0, 1.0, low_open=True),
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
        loss_fusion: bool = True,
        alpha: float = 0.5,
        sabr_lambda: float = 0.4,
        pgd_steps: int = 1,
        pgd_step_size: float | None = None,
        **kwargs,
    ):
        super().__init__(module, **kwargs)
        self.method = method
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.loss_fusion = loss_fusion
        self.alpha = alpha
        self.sabr_lambda = sabr_lambda
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
        return TRAINING_LOSSES[self.method](self, x, y, training)

    def _attack(self, x: Tensor, y: Tensor, perturbation) -> Tensor:
        """The short PGD attack of MTL-IBP and SABR inside the batch's ball."""
        return pgd_attack(
            self.module_,
            x,
            y,
            perturbation,
            steps=int(self.pgd_steps),
            step_size=self.pgd_step_size,
            mode="current",
        )
