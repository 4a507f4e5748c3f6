"""Branch and bound over unstable ReLUs, batched over subdomains of many samples.

Each open sample starts as one subdomain: its input box with the CROWN bounds of every ReLU's
input. A round takes the subdomains with the lowest margin bounds (up to ``batch_size``, from all
samples together), splits each on one unstable ReLU (its input ``>= 0`` in one child, ``<= 0``
in the other; the split sets a bound to 0, which makes that ReLU's relaxation exact) and bounds
all children at once with the engine's CROWN under their constraints
(:meth:`~certdistill.bounds.BoundEngine.bound_subdomains`). A child whose margins are all
positive, or whose bounds contradict each other (no input satisfies its splits), is closed. The
input minimising each child's linear bound is tried as a counterexample. A sample is certified
when none of its subdomains is left, falsified when a candidate flips the module's decision.

The ReLU to split is the one whose relaxation costs the worst margin most: for an unstable
neuron with a negative coefficient ``a`` in the bound, the upper line's intercept
``-u l / (u - l)`` loses ``|a|`` times that (the intercept score of BaBSR, Bunel et al. 2020).

Split constraints only enter through the relaxations (plain split fixing, no beta-CROWN
Lagrangian terms), so a subdomain whose ReLUs are all fixed may still be bounded below zero; such
a leaf is decided exactly by a linear program over its input region
(:class:`~certdistill.verify.milp.MarginMilp` with no binary left), which makes the search
complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from certdistill.bounds.engine import BoundEngine
from certdistill.verify.counterexamples import Judge
from certdistill.verify.milp import MarginMilp

__all__ = ["BabResult", "branch_and_bound"]


@dataclass
class BabResult:
    """Outcome per sample of :func:`branch_and_bound`.

    Attributes
    ----------
    certified, falsified : BoolTensor of shape (n,)
    counterexample : Tensor of shape (n, *sample_shape)
        Where falsified (NaN elsewhere).
    spent : ndarray of shape (n,)
        Seconds charged to each sample (its share of every round it took part in).
    domains : ndarray of shape (n,)
        Subdomains bounded per sample.
    """

    certified: Tensor
    falsified: Tensor
    counterexample: Tensor
    spent: np.ndarray
    domains: np.ndarray


@dataclass
class _Queue:
    """Open subdomains, one row each."""

    sample: Tensor
    bounds: dict[int, tuple[Tensor, Tensor]]
    margins: Tensor
    closed: Tensor
    layer: Tensor  # activation op index of the chosen split, -1 if none is left
    neuron: Tensor  # flat index of the chosen split in that layer
    depth: Tensor

    def __len__(self) -> int:
        return int(self.sample.numel())

    def take(self, rows: Tensor) -> _Queue:
        return _Queue(self.sample[rows], {k: (lo[rows], up[rows]) for k, (lo, up) in
                                          self.bounds.items()},
                      self.margins[rows], self.closed[rows], self.layer[rows],
                      self.neuron[rows], self.depth[rows])

    def extend(self, other: _Queue) -> _Queue:
        if len(self) == 0:
            return other
        return _Queue(
            torch.cat([self.sample, other.sample]),
            {k: (torch.cat([lo, other.bounds[k][0]]), torch.cat([up, other.bounds[k][1]]))
             for k, (lo, up) in self.bounds.items()},
            torch.cat([self.margins, other.margins]), torch.cat([self.closed, other.closed]),
            torch.cat([self.layer, other.layer]), torch.cat([self.neuron, other.neuron]),
            torch.cat([self.depth, other.depth]),
        )


@dataclass
class _Budget:
    """Per-sample seconds and overall deadline of the search."""

    timeout: float
    deadline: float
    spent: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def exhausted(self) -> np.ndarray:
        return self.spent >= self.timeout


def _scores(result, layers: list[int]) -> tuple[Tensor, Tensor]:
    """The split of each subdomain: activation op index and flat neuron (-1: none unstable)."""
    best_score, best_layer, best_neuron = None, None, None
    for index in layers:
        relaxation = result.relaxations[index]
        coefficient = result.coefficients[index].flatten(1)
        unstable = relaxation.unstable.flatten(1)
        intercept = relaxation.upper_intercept.flatten(1)
        lower, upper = result.bounds[index]
        lower, upper = lower.flatten(1), upper.flatten(1)
        # The upper line's loss, and a small term that prefers wide relaxations on ties.
        score = (coefficient.clamp(max=0).neg() * intercept
                 + 1e-4 * coefficient.abs() * torch.minimum(upper, -lower).clamp(min=0))
        score = torch.where(unstable, score + 1e-12, torch.full_like(score, -1.0))
        value, neuron = score.max(1)
        if best_score is None:
            best_score, best_neuron = value, neuron
            best_layer = torch.full_like(neuron, index)
            continue
        better = value > best_score
        best_score = torch.where(better, value, best_score)
        best_neuron = torch.where(better, neuron, best_neuron)
        best_layer = torch.where(better, torch.full_like(neuron, index), best_layer)
    none_left = best_score < 0
    return best_layer.masked_fill(none_left, -1), best_neuron


def _split(queue: _Queue) -> _Queue:
    """Two children per subdomain: the chosen ReLU's input ``>= 0`` and ``<= 0``."""
    rows = torch.arange(len(queue), device=queue.sample.device)
    children = {}
    for index, (lower, upper) in queue.bounds.items():
        lower_flat, upper_flat = lower.flatten(1), upper.flatten(1)
        active_lower, inactive_upper = lower_flat.clone(), upper_flat.clone()
        here = queue.layer == index
        neurons = queue.neuron[here]
        active_lower[rows[here], neurons] = active_lower[rows[here], neurons].clamp(min=0)
        inactive_upper[rows[here], neurons] = inactive_upper[rows[here], neurons].clamp(max=0)
        children[index] = (torch.cat([active_lower, lower_flat]).view(-1, *lower.shape[1:]),
                           torch.cat([upper_flat, inactive_upper]).view(-1, *upper.shape[1:]))
    def twice(values: Tensor) -> Tensor:
        return torch.cat([values, values])

    return _Queue(twice(queue.sample), children, twice(queue.margins), twice(queue.closed),
                  twice(queue.layer), twice(queue.neuron), twice(queue.depth) + 1)


def branch_and_bound(
    engine: BoundEngine,
    judge: Judge,
    milp: MarginMilp,
    center: Tensor,
    radius: Tensor,
    corners: tuple[Tensor, Tensor],
    reference: Tensor,
    root_bounds: dict[int, tuple[Tensor, Tensor]],
    *,
    timeout: float,
    deadline: float,
    batch_size: int = 512,
    max_domains: int = 200_000,
    on_round=None,
) -> BabResult:
    """Decide the samples by branch and bound (see the module docstring).

    Parameters
    ----------
    engine : BoundEngine
        The engine of the module (in eval mode).
    judge : Judge
        Checks candidate counterexamples on the module.
    milp : MarginMilp
        Decides the leaves exactly.
    center, radius : Tensor of shape (n, *sample_shape)
        The input box of each sample (for bounds).
    corners : (Tensor, Tensor)
        The same box's corners rounded inwards (for counterexamples,
        :func:`~certdistill.verify.counterexamples.inner_box`).
    reference : LongTensor of shape (n,)
        Class each sample must keep.
    root_bounds : dict of int to (Tensor, Tensor)
        Bounds of every activation's input on each box (the CROWN stage's).
    timeout : float
        Seconds of search per sample (its share of the rounds); past it the sample stays open.
    deadline : float
        ``time.perf_counter()`` value at which the whole search stops.
    batch_size : int, default=512
        Subdomains bounded at once (memory grows with it).
    max_domains : int, default=200000
        Open subdomains kept at most; past it the samples with the most are given up.
    on_round : callable, optional
        Called after every round with the number of samples decided so far.

    Returns
    -------
    BabResult
    """
    n = center.shape[0]
    device = center.device
    certified = torch.zeros(n, dtype=torch.bool, device=device)
    falsified = torch.zeros(n, dtype=torch.bool, device=device)
    given_up = torch.zeros(n, dtype=torch.bool, device=device)
    counterexample = torch.full_like(center, float("nan"))
    spent = np.zeros(n)
    domains = np.zeros(n, dtype=np.int64)
    lower_box, upper_box = corners
    layers = sorted(root_bounds)

    def bound(children: _Queue) -> _Queue:
        rows = children.sample
        result = engine.bound_subdomains(center[rows], radius[rows], children.bounds,
                                         reference[rows], closed=children.closed)
        np.add.at(domains, rows.cpu().numpy(), 1)
        flipped, points = judge.flips(result.candidate, reference[rows], lower_box[rows],
                                      upper_box[rows])
        for row in flipped.nonzero().squeeze(1).tolist():
            sample = int(rows[row])
            if not falsified[sample]:
                falsified[sample] = True
                counterexample[sample] = points[row]
        layer, neuron = _scores(result, layers)
        closed = result.margins > 0
        done = closed.all(1) | result.infeasible
        return _Queue(rows, result.bounds, result.margins, closed, layer, neuron,
                      children.depth).take((~done).nonzero().squeeze(1))

    start = time.perf_counter()
    n_classes = engine._n_classes(center)
    root = _Queue(
        torch.arange(n, device=device), dict(root_bounds),
        torch.zeros(n, n_classes, dtype=center.dtype, device=device),
        torch.zeros(n, n_classes, dtype=torch.bool, device=device),
        torch.zeros(n, dtype=torch.long, device=device),
        torch.zeros(n, dtype=torch.long, device=device),
        torch.zeros(n, dtype=torch.long, device=device),
    )
    queue = bound(root)
    spent += (time.perf_counter() - start) / max(n, 1)

    while True:
        alive = ~(falsified | given_up)
        queue = queue.take(alive[queue.sample].nonzero().squeeze(1))
        counts = torch.bincount(queue.sample, minlength=n)
        certified |= (counts == 0) & alive
        over = torch.as_tensor(spent >= timeout, device=device) & (counts > 0)
        given_up |= over
        if on_round is not None:
            on_round(int((certified | falsified).sum()))
        if len(queue) == 0 or bool(over.all()) or time.perf_counter() >= deadline:
            break
        queue = queue.take((~given_up[queue.sample]).nonzero().squeeze(1))
        if len(queue) == 0:
            break
        if len(queue) > max_domains:
            # Give up the samples with the most subdomains until the queue fits.
            order = torch.argsort(torch.bincount(queue.sample, minlength=n), descending=True)
            while len(queue) > max_domains:
                given_up[order[0]] = True
                order = order[1:]
                queue = queue.take((~given_up[queue.sample]).nonzero().squeeze(1))
            continue
        round_start = time.perf_counter()
        worst = queue.margins.min(1).values
        picked = torch.argsort(worst)[: max(1, batch_size // 2)]
        batch = queue.take(picked)
        rest = torch.ones(len(queue), dtype=torch.bool, device=device)
        rest[picked] = False
        queue = queue.take(rest.nonzero().squeeze(1))
        leaves = batch.layer < 0
        if bool(leaves.any()):
            _decide_leaves(batch.take(leaves.nonzero().squeeze(1)), judge, milp, lower_box,
                           upper_box, reference, falsified, given_up, counterexample,
                           deadline)
            batch = batch.take((~leaves).nonzero().squeeze(1))
        if len(batch):
            queue = queue.extend(bound(_split(batch)))
        share = np.bincount(batch.sample.cpu().numpy(), minlength=n) if len(batch) else 0
        elapsed = time.perf_counter() - round_start
        spent += elapsed * share / max(np.sum(share), 1)
    return BabResult(certified & ~falsified, falsified, counterexample, spent, domains)


def _decide_leaves(leaves: _Queue, judge: Judge, milp: MarginMilp, lower_box: Tensor,
                   upper_box: Tensor, reference: Tensor, falsified: Tensor, given_up: Tensor,
                   counterexample: Tensor, deadline: float) -> None:
    """Subdomains with every ReLU fixed: one linear program each (exact on the region)."""
    for row in range(len(leaves)):
        sample = int(leaves.sample[row])
        if falsified[sample] or given_up[sample]:
            continue
        bounds = [_numpy_bounds(*leaves.bounds[k], row) for k in sorted(leaves.bounds)]
        open_classes = (~leaves.closed[row]).nonzero().squeeze(1).tolist()
        open_classes = [j for j in open_classes if j != int(reference[sample])]
        order = sorted(open_classes, key=lambda j: float(leaves.margins[row, j]))
        outcome = milp.solve(lower_box[sample].double().cpu().numpy(),
                             upper_box[sample].double().cpu().numpy(), bounds,
                             int(reference[sample]), order, deadline=deadline)
        if outcome.proven:
            continue
        if outcome.candidate is not None:
            point = torch.as_tensor(outcome.candidate, dtype=lower_box.dtype,
                                    device=lower_box.device).view_as(lower_box[sample])
            flipped, points = judge.flips(point[None], reference[sample:sample + 1],
                                          lower_box[sample:sample + 1],
                                          upper_box[sample:sample + 1])
            if bool(flipped[0]):
                falsified[sample] = True
                counterexample[sample] = points[0]
                continue
        given_up[sample] = True  # an undecided leaf: the sample stays unknown


def _numpy_bounds(lower: Tensor, upper: Tensor, row: int) -> tuple[np.ndarray, np.ndarray]:
    """One subdomain's bounds of one activation, flat float64 arrays (for the MILP)."""
    return (lower[row].flatten().double().cpu().numpy(),
            upper[row].flatten().double().cpu().numpy())
