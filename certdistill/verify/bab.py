"""Branch and bound over unstable ReLUs, batched over the subdomains of many samples.

Each open sample is first bounded by CROWN (its root: the intermediate bounds of every ReLU's
input, kept for the whole search). A subdomain is the root with some ReLUs split: the input of a
split ReLU is ``>= 0`` (active) or ``<= 0`` (inactive). A round takes the subdomains with the
lowest margin bounds (up to ``batch_size`` children, from all samples together), splits each on
one unstable ReLU and bounds all children at once with beta-CROWN
(:meth:`~certdistill.bounds.BoundEngine.bound_split_subdomains`): the split ReLU's relaxation
becomes exact on its side, the split constraints enter the bound through optimised Lagrangian
multipliers, the lower slopes are optimised as in alpha-CROWN. A child whose open margins are
all positive is closed; the input minimising each child's linear bound is tried as a
counterexample. A sample is certified when none of its subdomains is left, falsified when a
candidate flips the module's decision, unknown when its time runs out.

The ReLU to split is chosen by filtered smart branching (FSB, De Palma et al. 2021): the
``candidates`` unstable neurons whose relaxation costs the worst margin most (for a neuron with a
negative coefficient ``a`` in the bound, the upper line's intercept ``-u l / (u - l)`` loses
``|a|`` times that: the intercept score of BaBSR, Bunel et al. 2020) are each split on trial, both
children bounded by one CROWN pass (no optimisation), and the candidate whose better child has the
best bound is split (the ``max`` reduction of alpha-beta-CROWN's ``mnistfc`` configuration: on
VNN-COMP 2021 ``mnist-net_256x4`` ``prop_13_0.03`` the search closed after 147 subdomains, where
the worse child's bound took 881 and BaBSR alone 683). ``candidates=1`` is BaBSR's choice.

A subdomain with every unstable ReLU split is a linear region of the network; if its bound is
still not positive, a linear program over the region decides it exactly
(:class:`~certdistill.verify.milp.MarginMilp` without binaries), so the search is complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from certdistill.bounds.engine import BoundEngine
from certdistill.bounds.propagation import SubdomainBounds
from certdistill.verify.counterexamples import Judge
from certdistill.verify.milp import MarginMilp

__all__ = ["BabResult", "branch_and_bound"]

#: Subdomains per round whose bound minimisers start a short attack.
_SEARCHED = 64

#: Candidates scored per activation layer before the best ``candidates`` of all are tried.
_MAX_CANDIDATES = 8


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
    """Open subdomains, one row each: the sample, the splits, the bounds of the margins."""

    sample: Tensor
    splits: dict[int, Tensor]  # int8, flat per activation: +1 active, -1 inactive, 0 free
    margins: Tensor
    layer: Tensor  # activation op index of the next split, -1 when every unstable ReLU is split
    neuron: Tensor  # flat index of the next split in that layer

    def __len__(self) -> int:
        return int(self.sample.numel())

    def take(self, rows: Tensor) -> _Queue:
        return _Queue(
            self.sample[rows],
            {k: v[rows] for k, v in self.splits.items()},
            self.margins[rows],
            self.layer[rows],
            self.neuron[rows],
        )

    @staticmethod
    def concat(parts: list[_Queue]) -> _Queue:
        parts = [part for part in parts if len(part)] or parts[:1]
        return _Queue(
            torch.cat([p.sample for p in parts]),
            {k: torch.cat([p.splits[k] for p in parts]) for k in parts[0].splits},
            torch.cat([p.margins for p in parts]),
            torch.cat([p.layer for p in parts]),
            torch.cat([p.neuron for p in parts]),
        )


def _split_scores(
    result, layers: list[int], splits: dict[int, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` best-scored free unstable ReLUs of each subdomain, best first: BaBSR scores
    (negative: none left), activation op indices and flat neurons, each of shape ``(d, k)``
    with ``k`` up to ``_MAX_CANDIDATES`` per layer."""
    scores, layer_of, neuron_of = [], [], []
    for index in layers:
        relaxation = result.relaxations[index]
        coefficient = result.coefficients[index].flatten(1)
        free = relaxation.unstable.flatten(1) & (splits[index] == 0)
        lower, upper = (bound.flatten(1) for bound in result.bounds[index])
        intercept = relaxation.upper_intercept.flatten(1)
        # The upper line's loss, and a small term that prefers wide relaxations on ties.
        score = coefficient.clamp(
            max=0
        ).neg() * intercept + 1e-4 * coefficient.abs() * torch.minimum(upper, -lower).clamp(min=0)
        score = torch.where(free, score + 1e-12, torch.full_like(score, -1.0))
        value, neuron = score.topk(min(_MAX_CANDIDATES, score.shape[1]), dim=1)
        scores.append(value)
        neuron_of.append(neuron)
        layer_of.append(torch.full_like(neuron, index))
    value, order = torch.cat(scores, 1).sort(dim=1, descending=True)
    return (
        value,
        torch.cat(layer_of, 1).gather(1, order),
        torch.cat(neuron_of, 1).gather(1, order),
    )


def _choose_splits(
    engine: BoundEngine,
    result,
    layers: list[int],
    splits: dict[int, Tensor],
    boxes: tuple[Tensor, Tensor, Tensor],
    open_rows: Tensor,
    candidates: int,
) -> tuple[Tensor, Tensor]:
    """The ReLU each subdomain splits next (activation op index, flat neuron; -1: none left),
    by filtered smart branching over ``candidates`` (see the module docstring) for the
    subdomains ``open_rows`` (the others get BaBSR's choice: they are not split).

    ``boxes`` is ``(center, radius, reference)`` of every subdomain of ``result``.
    """
    score, layer, neuron = _split_scores(result, layers, splits)
    chosen_layer = layer[:, 0].masked_fill(score[:, 0] < 0, -1)
    chosen_neuron = neuron[:, 0].clone()
    k = min(int(candidates), score.shape[1])
    if k <= 1 or open_rows.numel() == 0:
        return chosen_layer, chosen_neuron
    score, layer, neuron = score[open_rows, :k], layer[open_rows, :k], neuron[open_rows, :k]
    center, radius, reference = (values[open_rows] for values in boxes)
    bounds = {index: tuple(b[open_rows] for b in result.bounds[index]) for index in layers}
    splits = {index: split[open_rows] for index, split in splits.items()}
    d = score.shape[0]
    # Trial children: candidate c of subdomain i, active then inactive, row (2 * c + side) * d + i.
    trial_layer, trial_neuron = layer.T.repeat_interleave(2, 0), neuron.T.repeat_interleave(2, 0)
    side = torch.tensor([1, -1], dtype=torch.int8, device=score.device).repeat(k)[:, None]
    rows = torch.arange(d, device=score.device).repeat(2 * k)
    trial_bounds, trial_splits = {}, {}
    for index in layers:
        lower, upper = (b.flatten(1)[rows] for b in bounds[index])
        here = trial_layer == index
        chosen = torch.zeros_like(lower, dtype=torch.bool)
        # Rows whose candidate lies in another layer write False at neuron 0.
        chosen.view(2 * k, d, -1).scatter_(2, (trial_neuron * here)[..., None], here[..., None])
        sign = (side.expand(-1, d) * here).reshape(-1, 1)
        shape = bounds[index][0].shape[1:]
        trial_bounds[index] = (
            torch.where(chosen & (sign > 0), lower.clamp(min=0), lower).view(-1, *shape),
            torch.where(chosen & (sign < 0), upper.clamp(max=0), upper).view(-1, *shape),
        )
        trial_splits[index] = torch.where(chosen, sign, splits[index][rows]).view(-1, *shape)
    trial = engine.bound_split_subdomains(
        center[rows],
        radius[rows],
        trial_bounds,
        trial_splits,
        reference[rows],
        closed=(result.margins[open_rows] > 0)[rows],
        steps=0,
    )
    worst = trial.margins.min(1).values.view(k, 2, d)
    # A candidate is as good as its better child (one side nearly closed is worth more than
    # two halves of an improvement); a negative score is no candidate.
    value = worst.max(1).values.T.masked_fill(score < 0, float("-inf"))
    best = value.argmax(1, keepdim=True)
    chosen_layer[open_rows] = layer.gather(1, best).squeeze(1).masked_fill(score[:, 0] < 0, -1)
    chosen_neuron[open_rows] = neuron.gather(1, best).squeeze(1)
    return chosen_layer, chosen_neuron


def _children(queue: _Queue) -> _Queue:
    """Two children per subdomain: the chosen ReLU's input ``>= 0`` and ``<= 0``."""
    rows = torch.arange(len(queue), device=queue.sample.device)
    splits = {}
    for index, split in queue.splits.items():
        active, inactive = split.clone(), split.clone()
        here = queue.layer == index
        active[rows[here], queue.neuron[here]] = 1
        inactive[rows[here], queue.neuron[here]] = -1
        splits[index] = torch.cat([active, inactive])

    def twice(values: Tensor) -> Tensor:
        return torch.cat([values, values])

    return _Queue(
        twice(queue.sample), splits, twice(queue.margins), twice(queue.layer), twice(queue.neuron)
    )


def _split_bounds(
    root: dict[int, tuple[Tensor, Tensor]], samples: Tensor, splits: dict[int, Tensor]
) -> dict[int, tuple[Tensor, Tensor]]:
    """The root bounds of each subdomain's sample with its split ReLUs bounded by 0."""
    bounds = {}
    for index, (lower, upper) in root.items():
        lower, upper = lower[samples], upper[samples]
        split = splits[index].view_as(lower)
        bounds[index] = (
            torch.where(split > 0, lower.clamp(min=0), lower),
            torch.where(split < 0, upper.clamp(max=0), upper),
        )
    return bounds


def branch_and_bound(
    engine: BoundEngine,
    judge: Judge,
    milp: MarginMilp,
    center: Tensor,
    radius: Tensor,
    corners: tuple[Tensor, Tensor],
    reference: Tensor,
    interval_bounds: dict[int, tuple[Tensor, Tensor]],
    *,
    timeout: float,
    deadline: float,
    batch_size: int = 512,
    max_domains: int = 200_000,
    steps: int = 20,
    candidates: int = 4,
    search=None,
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
        Decides the fully split subdomains exactly.
    center, radius : Tensor of shape (n, *sample_shape)
        The input box of each sample (for bounds).
    corners : (Tensor, Tensor)
        The same box's corners rounded inwards (for counterexamples,
        :func:`~certdistill.verify.counterexamples.inner_box`).
    reference : LongTensor of shape (n,)
        Class each sample must keep.
    interval_bounds : dict of int to (Tensor, Tensor)
        IBP bounds of every activation's input on each box (the root's CROWN bounds start
        from them).
    timeout : float
        Seconds of search per sample (its share of the rounds); past it the sample stays open.
    deadline : float
        ``time.perf_counter()`` value at which the whole search stops.
    batch_size : int, default=512
        Subdomains bounded at once (memory grows with it).
    max_domains : int, default=200000
        Open subdomains kept at most; past it the samples with the most are given up.
    steps : int, default=20
        Optimisation steps of alpha and beta per bound.
    candidates : int, default=4
        ReLUs tried per subdomain by filtered smart branching (1: BaBSR's choice, no trials).
    search : callable, optional
        ``search(samples, starts, targets) -> points``: a short attack from the minimisers of
        the worst subdomains' bounds towards their worst class (``targets``, a boolean mask of
        shape ``(k, n_classes)``); its points are tried as counterexamples.
    on_round : callable, optional
        Called after every round with the number of samples decided so far.

    Returns
    -------
    BabResult
    """
    state = _Search(
        engine,
        judge,
        milp,
        center,
        radius,
        corners,
        reference,
        sorted(interval_bounds),
        steps=steps,
        candidates=candidates,
        attack=search,
    )
    queue = state.open_roots(interval_bounds)
    while True:
        queue = state.settle(queue, timeout)
        if on_round is not None:
            on_round(state.decided)
        if len(queue) == 0 or time.perf_counter() >= deadline:
            break
        if len(queue) > max_domains:
            # Settle again before bounding: the given up samples' subdomains leave the queue.
            state.give_up_largest(queue, max_domains)
            continue
        round_start = time.perf_counter()
        batch, queue = _pick_worst(queue, batch_size)
        batch = state.decide_leaves(batch, deadline)
        if len(batch):
            queue = _Queue.concat([queue, state.branch(batch)])
        state.charge(batch, round_start)
    return state.result()


def _pick_worst(queue: _Queue, batch_size: int) -> tuple[_Queue, _Queue]:
    """The subdomains to split this round (the lowest worst margins, two children each within
    ``batch_size``) and the rest of the queue."""
    worst = queue.margins.min(1).values
    picked = torch.zeros(len(queue), dtype=torch.bool, device=queue.sample.device)
    picked[torch.argsort(worst)[: max(1, batch_size // 2)]] = True
    return (queue.take(picked.nonzero().squeeze(1)), queue.take((~picked).nonzero().squeeze(1)))


class _Search:
    """The state of one :func:`branch_and_bound` call: the problem, its options and each
    sample's outcome so far, shared by the steps of the search loop."""

    def __init__(
        self,
        engine: BoundEngine,
        judge: Judge,
        milp: MarginMilp,
        center: Tensor,
        radius: Tensor,
        corners: tuple[Tensor, Tensor],
        reference: Tensor,
        layers: list[int],
        *,
        steps: int,
        candidates: int,
        attack: Callable[[Tensor, Tensor, Tensor], Tensor] | None,
    ) -> None:
        n = center.shape[0]
        device = center.device
        self.engine, self.judge, self.milp = engine, judge, milp
        self.center, self.radius, self.corners, self.reference = center, radius, corners, reference
        self.layers, self.steps, self.candidates, self.attack = layers, steps, candidates, attack
        self.certified = torch.zeros(n, dtype=torch.bool, device=device)
        self.falsified = torch.zeros(n, dtype=torch.bool, device=device)
        self.given_up = torch.zeros(n, dtype=torch.bool, device=device)
        self.counterexample = torch.full_like(center, float("nan"))
        self.spent = np.zeros(n)
        self.domains = np.zeros(n, dtype=np.int64)
        self.root_bounds: dict[int, tuple[Tensor, Tensor]] = {}

    @property
    def n(self) -> int:
        """Number of samples."""
        return int(self.center.shape[0])

    @property
    def decided(self) -> int:
        """Samples certified or falsified so far."""
        return int((self.certified | self.falsified).sum())

    def result(self) -> BabResult:
        """The outcome per sample (a falsified sample is never reported certified)."""
        return BabResult(
            self.certified & ~self.falsified,
            self.falsified,
            self.counterexample,
            self.spent,
            self.domains,
        )

    def open_roots(self, interval_bounds: dict[int, tuple[Tensor, Tensor]]) -> _Queue:
        """Bound every sample's root by CROWN (kept for the whole search); the roots left open
        are the first queue."""
        start = time.perf_counter()
        n, device = self.n, self.center.device
        everyone = torch.arange(n, device=device)
        root = self.engine.bound_subdomains(
            self.center, self.radius, interval_bounds, self.reference
        )
        self.root_bounds = root.bounds
        no_splits = {
            k: torch.zeros(n, lower[0].numel(), dtype=torch.int8, device=device)
            for k, (lower, _) in self.root_bounds.items()
        }
        queue = self._keep_open(everyone, root, no_splits)
        self.spent += (time.perf_counter() - start) / max(n, 1)
        return queue

    def settle(self, queue: _Queue, timeout: float) -> _Queue:
        """Drop the subdomains of decided samples, certify the samples with none left and give
        up those past ``timeout``; the queue of the samples still open."""
        alive = ~(self.falsified | self.given_up)
        queue = queue.take(alive[queue.sample].nonzero().squeeze(1))
        counts = torch.bincount(queue.sample, minlength=self.n)
        self.certified |= (counts == 0) & alive
        over = torch.as_tensor(self.spent >= timeout, device=self.center.device) & (counts > 0)
        self.given_up |= over
        return queue.take((~self.given_up[queue.sample]).nonzero().squeeze(1))

    def give_up_largest(self, queue: _Queue, max_domains: int) -> None:
        """Give up the samples with the most subdomains until the queue fits
        ``max_domains``."""
        counts = torch.bincount(queue.sample, minlength=self.n)
        remaining = len(queue)
        for sample in torch.argsort(counts, descending=True).tolist():
            if remaining <= max_domains:
                break
            self.given_up[sample] = True
            remaining -= int(counts[sample])

    def decide_leaves(self, batch: _Queue, deadline: float) -> _Queue:
        """Decide the fully split subdomains of ``batch`` exactly; the others, to split."""
        leaves = batch.layer < 0
        if not bool(leaves.any()):
            return batch
        _decide_leaves(
            batch.take(leaves.nonzero().squeeze(1)),
            self.root_bounds,
            self.judge,
            self.milp,
            self.corners,
            self.reference,
            self.falsified,
            self.given_up,
            self.counterexample,
            deadline,
        )
        return batch.take((~leaves).nonzero().squeeze(1))

    def branch(self, batch: _Queue) -> _Queue:
        """Split each subdomain of ``batch`` on its chosen ReLU and bound both children by
        beta-CROWN; the children left open."""
        children = _children(batch)
        rows = children.sample
        result = self.engine.bound_split_subdomains(
            self.center[rows],
            self.radius[rows],
            _split_bounds(self.root_bounds, rows, children.splits),
            {
                k: v.view(len(children), *self.root_bounds[k][0].shape[1:])
                for k, v in children.splits.items()
            },
            self.reference[rows],
            closed=children.margins > 0,
            steps=self.steps,
        )
        return self._keep_open(rows, result, children.splits)

    def charge(self, batch: _Queue, round_start: float) -> None:
        """Charge the round's time to the samples of ``batch``, each its share of the
        subdomains (a round bounds many samples at once)."""
        share = np.bincount(batch.sample.cpu().numpy(), minlength=self.n) if len(batch) else 0
        elapsed = time.perf_counter() - round_start
        self.spent += elapsed * share / max(np.sum(share), 1)

    def _keep_open(
        self, rows: Tensor, result: SubdomainBounds, splits: dict[int, Tensor]
    ) -> _Queue:
        """Count the bounded subdomains (of samples ``rows``), try their candidates and choose
        the next split of each open one; the subdomains not closed."""
        np.add.at(self.domains, rows.cpu().numpy(), 1)
        self._check(rows, result.candidate)
        if self.attack is not None:
            self._attack_worst(rows, result)
        done = (result.margins > 0).all(1) | result.infeasible
        open_rows = (~done & ~self.falsified[rows]).nonzero().squeeze(1)
        layer, neuron = _choose_splits(
            self.engine,
            result,
            self.layers,
            splits,
            (self.center[rows], self.radius[rows], self.reference[rows]),
            open_rows,
            self.candidates,
        )
        return _Queue(rows, splits, result.margins, layer, neuron).take(
            (~done).nonzero().squeeze(1)
        )

    def _attack_worst(self, rows: Tensor, result: SubdomainBounds) -> None:
        """A few attack steps from the bounds' minimisers of the most promising subdomains
        (the ``_SEARCHED`` lowest worst margins still negative), their points tried."""
        worst = result.margins.min(1).values
        chosen = torch.argsort(worst)[:_SEARCHED]
        chosen = chosen[(worst[chosen] < 0) & ~self.falsified[rows[chosen]]]
        if chosen.numel():
            targets = torch.nn.functional.one_hot(
                result.margins[chosen].argmin(1), result.margins.shape[1]
            ).bool()
            self._check(rows[chosen], self.attack(rows[chosen], result.candidate[chosen], targets))

    def _check(self, rows: Tensor, candidates: Tensor) -> None:
        """Falsify the samples ``rows`` whose candidate flips the decision (the first
        counterexample found is kept)."""
        lower_box, upper_box = self.corners
        flipped, points = self.judge.flips(
            candidates, self.reference[rows], lower_box[rows], upper_box[rows]
        )
        for row in flipped.nonzero().squeeze(1).tolist():
            sample = int(rows[row])
            if not self.falsified[sample]:
                self.falsified[sample] = True
                self.counterexample[sample] = points[row]


def _decide_leaves(
    leaves: _Queue,
    root_bounds: dict[int, tuple[Tensor, Tensor]],
    judge: Judge,
    milp: MarginMilp,
    corners: tuple[Tensor, Tensor],
    reference: Tensor,
    falsified: Tensor,
    given_up: Tensor,
    counterexample: Tensor,
    deadline: float,
) -> None:
    """Subdomains with every unstable ReLU split: one linear program each (exact there)."""
    lower_box, upper_box = corners
    bounds = _split_bounds(root_bounds, leaves.sample, leaves.splits)
    for row in range(len(leaves)):
        sample = int(leaves.sample[row])
        if falsified[sample] or given_up[sample]:
            continue
        leaf_bounds = [
            (
                lower[row].flatten().double().cpu().numpy(),
                upper[row].flatten().double().cpu().numpy(),
            )
            for lower, upper in (bounds[k] for k in sorted(bounds))
        ]
        ref = int(reference[sample])
        margins = leaves.margins[row]
        classes = sorted(
            (j for j in range(margins.numel()) if j != ref and margins[j] <= 0),
            key=lambda j: float(margins[j]),
        )
        outcome = milp.solve(
            lower_box[sample].double().cpu().numpy(),
            upper_box[sample].double().cpu().numpy(),
            leaf_bounds,
            ref,
            classes,
            deadline=deadline,
        )
        if outcome.proven:
            continue
        if outcome.candidate is not None:
            point = torch.as_tensor(
                outcome.candidate, dtype=lower_box.dtype, device=lower_box.device
            ).view_as(lower_box[sample])
            flipped, points = judge.flips(
                point[None],
                reference[sample : sample + 1],
                lower_box[sample : sample + 1],
                upper_box[sample : sample + 1],
            )
            if bool(flipped[0]):
                falsified[sample] = True
                counterexample[sample] = points[0]
                continue
        given_up[sample] = True  # an undecided leaf: the sample stays unknown
