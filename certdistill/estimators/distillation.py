"""The distillation losses of :class:`~certdistill.DistilledStudent`: one function each, and the
table :data:`DISTILLATION_LOSSES` that its ``loss`` parameter names.

A loss takes one :class:`DistillationBatch` (the student's IBP terms of the batch, the teacher's
outputs and the scheduled weight, temperature and kappa) and returns the scalar loss without the
warm-up regulariser, which the student adds. A new loss is one function and one table entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certdistill.estimators.losses import (
    certified_loss,
    distillation_kl,
    margin_matching,
    rival_gap,
)
from certdistill.estimators.training import IntervalTerms
from certdistill.verify.attacks import pgd_attack

__all__ = ["DISTILLATION_LOSSES", "DistillationBatch", "DistillationLoss"]


@dataclass(frozen=True)
class DistillationBatch:
    """What a distillation loss sees of one training (or validation) batch.

    Attributes
    ----------
    x, y : Tensor
        Student module inputs and encoded labels.
    terms : IntervalTerms
        The student's IBP pieces at the scheduled radius.
    teacher_logits : Tensor
        The teacher's clean logits ``t(x)``.
    teacher_worst : Tensor or None
        The teacher's worst-case logits (``None`` unless the loss needs them and the weight is
        positive).
    weight, temperature, kappa : float
        The scheduled distillation weight ``lambda``, temperature ``T`` and IBP mix ``kappa``.
    worst_case_weight : float
        Weight ``mu`` of the worst-case term of ``"baseline"`` and ``"margin"``.
    module : nn.Module
        The student's network (``"adversarial"`` attacks it).
    pgd_steps : int
        Steps of that attack.
    teacher_at : callable
        ``teacher_at(x)`` gives the teacher's clean logits at other inputs (not cached).
    """

    x: Tensor
    y: Tensor
    terms: IntervalTerms
    teacher_logits: Tensor
    teacher_worst: Tensor | None
    weight: float
    temperature: float
    kappa: float
    worst_case_weight: float
    module: nn.Module
    pgd_steps: int
    teacher_at: Callable[[Tensor], Tensor]

    def certified(self, target=None, weights: Tensor | None = None) -> Tensor:
        """The student's own certified loss (IBP mixed with the clean loss by ``kappa``)."""
        target = self.y if target is None else target
        return certified_loss(
            self.terms.logits, self.terms.worst_logits, target, self.kappa, weights
        )

    def mixed(self, term: Tensor) -> Tensor:
        """``(1 - lambda)`` times the certified loss plus ``lambda`` times ``term``."""
        return (1.0 - self.weight) * self.certified() + self.weight * term


@dataclass(frozen=True)
class DistillationLoss:
    """One entry of :data:`DISTILLATION_LOSSES`.

    Attributes
    ----------
    function : callable
        ``function(batch) -> loss``.
    needs_worst : bool
        Whether it reads the teacher's worst-case logits (computed only then).
    """

    function: Callable[[DistillationBatch], Tensor]
    needs_worst: bool


def baseline_loss(b: DistillationBatch) -> Tensor:
    """Certified loss mixed with the KL divergence to the teacher's clean (and, weighted by
    ``mu``, worst-case) soft labels."""
    if b.weight <= 0.0:
        return b.certified()
    term = distillation_kl(b.teacher_logits, b.terms.logits, b.temperature)
    if b.worst_case_weight > 0.0:
        term = term + b.worst_case_weight * distillation_kl(
            b.teacher_worst, b.terms.worst_logits, b.temperature
        )
    return b.mixed(term)


def soft_certified_loss(b: DistillationBatch) -> Tensor:
    """The certified loss against the label mixed with the teacher's soft labels."""
    logits = b.terms.logits
    target = (1.0 - b.weight) * F.one_hot(b.y, logits.shape[1]).to(logits.dtype)
    return b.certified(target + b.weight * F.softmax(b.teacher_logits / b.temperature, dim=1))


def margin_loss(b: DistillationBatch) -> Tensor:
    """Certified loss mixed with matching the teacher's clean (and worst-case) margins."""
    if b.weight <= 0.0:
        return b.certified()
    logits, y, t = b.terms.logits, b.y, b.teacher_logits
    term = margin_matching(
        t - t.gather(1, y[:, None]), logits - logits.gather(1, y[:, None]), b.temperature
    )
    if b.worst_case_weight > 0.0:
        term = term + b.worst_case_weight * margin_matching(
            b.teacher_worst, b.terms.worst_logits, b.temperature
        )
    return b.mixed(term)


def adversarial_loss(b: DistillationBatch) -> Tensor:
    """Certified loss mixed with the KL divergence to the teacher at the student's own PGD
    point (at the clean point while the radius is still 0)."""
    if b.weight <= 0.0:
        return b.certified()
    if b.terms.margins is None:
        return b.mixed(distillation_kl(b.teacher_logits, b.terms.logits, b.temperature))
    x_adv = pgd_attack(b.module, b.x, b.y, b.terms.perturbation, steps=b.pgd_steps, mode="current")
    return b.mixed(distillation_kl(b.teacher_at(x_adv), b.module(x_adv), b.temperature))


def selective_loss(b: DistillationBatch) -> Tensor:
    """The certified loss, each sample weighted down by how far the teacher is from certifying
    it: its largest worst-case logit other than the label's, softened by ``T``."""
    if b.weight <= 0.0:
        return b.certified()
    gap = rival_gap(b.teacher_worst, b.y)
    return b.certified(weights=1.0 - b.weight * torch.sigmoid(gap / b.temperature))


#: Distillation losses of :class:`~certdistill.DistilledStudent` (its ``loss`` parameter).
DISTILLATION_LOSSES: dict[str, DistillationLoss] = {
    "baseline": DistillationLoss(baseline_loss, needs_worst=True),
    "soft-certified": DistillationLoss(soft_certified_loss, needs_worst=False),
    "margin": DistillationLoss(margin_loss, needs_worst=True),
    "adversarial": DistillationLoss(adversarial_loss, needs_worst=False),
    "selective": DistillationLoss(selective_loss, needs_worst=True),
}
