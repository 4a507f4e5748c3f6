"""What a student sees of its teacher: clean logits and worst-case logits, cached per sample.

The teacher is fixed while a student trains, so its outputs on a training sample depend only on
the sample and, for the worst case, on the radius. :class:`TeacherOutputs` computes them without
gradients in eval mode and keeps them per sample (keyed by the sample's bytes, so no index has to
travel through skorch's data loader): clean logits for the whole fit, worst-case logits for as
long as the radius stays the same (after the eps ramp, every epoch reuses them). While eps ramps,
the radius changes at every batch; :meth:`TeacherOutputs.rounded_up` gives the radius rounded up
to one of ``levels`` equal steps of a ceiling radius, at which each step is computed once per
sample, and whose ball still contains the student's (the teacher's worst case over it bounds the
teacher's worst case over the student's ball).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from certdistill.attacks import pgd_attack
from certdistill.bounds import METHODS, Perturbation, engine_for
from certdistill.certify import eval_mode
from certdistill.losses import worst_case_logits

__all__ = ["TEACHER_BOUNDS", "TeacherOutputs"]

#: ``"best"``: per margin, the larger of these sound bounds.
_BEST = ("ibp", "crown-ibp")

TEACHER_BOUNDS = (*METHODS, "best", "pgd")
"""Ways of computing the teacher's worst-case logits: a bound method of the engine (a certified
teacher; ``"best"`` is the larger of the IBP and CROWN-IBP margin bounds, both sound) or a PGD
attack on the teacher (an adversarially trained teacher, whose bounds are vacuous)."""


def _radius_key(perturbation: Perturbation) -> bytes:
    return perturbation.eps.detach().cpu().numpy().tobytes()


def _sample_keys(x: Tensor, y: Tensor) -> list[int]:
    rows = x.detach().reshape(x.shape[0], -1).cpu().numpy()
    return [hash((row.tobytes(), label)) for row, label in zip(rows, y.tolist(), strict=True)]


@dataclass
class TeacherOutputs:
    """Clean and worst-case logits of a fitted teacher, computed without gradients and cached.

    Parameters
    ----------
    teacher : CertifiedNetBase
        The fitted teacher.
    bounds : str
        How the worst-case logits are computed (one of :data:`TEACHER_BOUNDS`).
    pgd_steps : int, default=10
        Steps of the attack when ``bounds="pgd"``.
    cache : bool, default=True
        Keep outputs per sample (clean logits always, worst-case logits while the radius does not
        change).
    ceiling : Perturbation or None, default=None
        The largest radius (the student's final training perturbation); with ``levels``,
        :meth:`rounded_up` rounds radii up to it to ``levels`` equal steps of it.
    levels : int or None, default=None
        Number of steps of ``ceiling`` (``None``: the worst case at each batch's exact radius).

    Attributes
    ----------
    hits, misses : int
        Batches served from the cache and computed.
    """

    teacher: object
    bounds: str
    pgd_steps: int = 10
    cache: bool = True
    ceiling: Perturbation | None = None
    levels: int | None = None
    hits: int = 0
    misses: int = 0
    _clean: dict = field(default_factory=dict, repr=False)
    _worst: dict = field(default_factory=dict, repr=False)
    _worst_radius: object = field(default=None, repr=False)

    def __call__(self, x: Tensor, y: Tensor, perturbation: Perturbation, *,
                 worst_case: bool = True, cache: bool = True):
        """Teacher logits of a batch of student inputs.

        Parameters
        ----------
        x : Tensor
            Student module inputs (flattened and reshaped to the teacher's input).
        y : LongTensor
            Encoded labels (reference class of the worst case).
        perturbation : Perturbation
            The student's perturbation of the batch (its samples, its domain); radius 0 gives
            ``t - t_y``.
        worst_case : bool, default=True
            Also compute the worst-case logits (``None`` is returned otherwise).
        cache : bool, default=True
            Look the batch up in (and add it to) the cache; False for inputs seen once, such as
            attacked points.

        Returns
        -------
        logits : Tensor
            Clean teacher logits ``t(x)`` on ``x``'s device.
        worst : Tensor or None
            Worst-case logits: minus the teacher's margin lower bounds (``bounds`` a bound
            method) or the attacked logits shifted so that the label's is 0 (``"pgd"``).
        """
        keys = _sample_keys(x, y) if self.cache and cache else None
        logits = self._lookup(self._clean, keys)
        worst = None
        radius = _radius_key(perturbation)
        want_worst = worst_case and perturbation.level > 0.0
        if want_worst:
            if self._worst_radius != radius:
                self._worst, self._worst_radius = {}, radius
            worst = self._lookup(self._worst, keys)
        if logits is None or (want_worst and worst is None):
            self.misses += 1
            logits, worst = self._compute(x, y, perturbation, want_worst)
            if keys is not None:
                self._clean.update(zip(keys, logits.cpu(), strict=True))
                if want_worst:
                    self._worst.update(zip(keys, worst.cpu(), strict=True))
        else:
            self.hits += 1
        logits = logits.to(x.device)
        if worst is not None:
            worst = worst.to(x.device)
        elif worst_case:
            worst = logits - logits.gather(1, y[:, None])
        return logits, worst

    def rounded_up(self, perturbation: Perturbation) -> Perturbation:
        """The perturbation the worst case is computed at: ``perturbation`` itself, or (with
        ``levels``) the smallest of the steps ``k / levels * ceiling`` whose radius is at least
        the batch's everywhere (checked per feature, so the step's ball contains the batch's)."""
        if self.levels is None or self.ceiling is None or perturbation.per_sample:
            return perturbation
        top = self.ceiling.level
        fraction = perturbation.level / top if top > 0.0 else math.inf
        if not 0.0 < fraction <= 1.0:
            return perturbation
        eps = perturbation.eps.to(self.ceiling.eps.device)
        # The first candidate is right unless float error made it one step too low.
        for step in range(max(1, math.ceil(fraction * self.levels)), self.levels + 1):
            rounded = self.ceiling.scaled(step / self.levels)
            if bool((rounded.eps >= eps).all()):
                return rounded.to(device=perturbation.eps.device)
        return perturbation

    @staticmethod
    def _lookup(store: dict, keys) -> Tensor | None:
        if keys is None or not store:
            return None
        try:
            return torch.stack([store[key] for key in keys])
        except KeyError:
            return None

    def _compute(self, x: Tensor, y: Tensor, perturbation: Perturbation, want_worst: bool):
        teacher = self.teacher
        module = teacher.module_
        xt = teacher.module_input(x.detach().reshape(x.shape[0], -1))
        yt = y.to(xt.device)
        around = perturbation.reshaped(xt.shape[1:]).to(device=xt.device, dtype=xt.dtype)
        with eval_mode(module):
            with torch.no_grad():
                logits = module(xt)
            worst = None
            if want_worst and self.bounds == "pgd":
                x_adv = pgd_attack(module, xt, yt, around, steps=int(self.pgd_steps))
                with torch.no_grad():
                    attacked = module(x_adv)
                worst = attacked - attacked.gather(1, yt[:, None])
            elif want_worst:
                engine = engine_for(module)
                methods = _BEST if self.bounds == "best" else (self.bounds,)
                with torch.no_grad():
                    margins = torch.stack([
                        engine.margin_lower_bounds(xt, around, yt, method=method)
                        for method in methods
                    ]).amax(0)
                worst = worst_case_logits(margins)
        return logits, worst
