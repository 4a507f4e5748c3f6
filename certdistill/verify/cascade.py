"""The certification cascade: stages run cheapest first, each on the samples still open.

Stages (:data:`STAGES`):

* the engine's bound methods (``"ibp"``, ``"crown-ibp"``, ``"crown"``, ``"alpha-crown"``):
  a sample is certified when every margin's lower bound is positive; per margin, the largest
  bound of the stages run so far is kept;
* ``"attack"``: targeted PGD with restarts towards every class; a point of the set at which the
  module's decision changes (checked in float64 too) falsifies the sample;
* ``"refine"``: the bounds of every activation's input tightened layer by layer by linear
  programming (:mod:`certdistill.verify.refine`); the later search stages start from them;
* ``"bab"``: branch and bound over unstable ReLUs (:mod:`certdistill.verify.bab`), batched over
  the subdomains of all open samples;
* ``"milp"``: the exact mixed-integer program of each open sample with its CROWN bounds
  (:mod:`certdistill.verify.milp`).

``method="complete"`` is the whole cascade (:data:`COMPLETE`); any other sequence of stage names
is a cascade stopped early. The first stage also gives the clean logits (the reference class
without labels; with labels, a wrong clean prediction falsifies the sample at once).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from certdistill.bounds import METHODS, BoundEngine, Perturbation, engine_for
from certdistill.bounds.memory import (
    MemoryPlan,
    check_memory_limit,
    default_memory_limit,
)
from certdistill.bounds.ops import ReLUOp
from certdistill.verify.attacks import targeted_attack
from certdistill.verify.bab import branch_and_bound
from certdistill.verify.counterexamples import Judge, inner_box
from certdistill.verify.milp import MarginMilp
from certdistill.verify.refine import refine_bounds

__all__ = ["COMPLETE", "STAGES", "CascadeOptions", "check_stages"]

#: The complete cascade of ``method="complete"``.
COMPLETE: tuple[str, ...] = ("ibp", "crown", "attack", "alpha-crown", "refine", "bab", "milp")

#: Stage names that are not bound methods.
_SEARCH_STAGES = ("attack", "refine", "bab", "milp")

#: Every stage a cascade may name, cheapest first.
STAGES: tuple[str, ...] = (*METHODS, *_SEARCH_STAGES)

#: Share of a sample's ``timeout`` that bound refinement may use at most.
_REFINE_SHARE = 0.3

#: Share of a sample's ``timeout`` that branch and bound may use (refinement included); the
#: exact MILP gets the rest.
_BAB_SHARE = 0.7

#: ``decided_by`` of a sample refuted by its clean prediction (wrong against the label).
CLEAN_PREDICTION = "clean-prediction"


def check_stages(method: str | Sequence[str]) -> tuple[str, ...]:
    """Validate a stage name, ``"complete"``, or a sequence of stage names.

    Returns
    -------
    tuple of str
        The stages, in order.

    Raises
    ------
    ValueError
        For an unknown or repeated name, an empty sequence, or ``"complete"`` inside a sequence.
    TypeError
        For a method that is neither a string nor a sequence.
    """
    if isinstance(method, str) and method == "complete":
        return COMPLETE
    try:
        stages = (method,) if isinstance(method, str) else tuple(method)
    except TypeError:
        raise TypeError(
            f"method must be a stage name or a sequence of them, got {method!r}."
        ) from None
    if not stages:
        raise ValueError(f"method must name at least one stage of {STAGES} or 'complete'.")
    for name in stages:
        if name == "complete":
            raise ValueError("'complete' is a whole cascade: give it alone, not in a sequence.")
        if name not in STAGES:
            raise ValueError(
                f"Unknown method {name!r}; choose one of {STAGES}, a sequence of them, or "
                "'complete'."
            )
    if len(set(stages)) != len(stages):
        raise ValueError(f"method names a stage twice: {stages!r}.")
    return stages


@dataclass(frozen=True)
class CascadeOptions:
    """Budgets and settings of the stages (validated where they enter).

    Attributes
    ----------
    timeout : float
        Seconds of branch and bound and MILP per sample; past it a sample stays ``unknown``.
    budget : float or None
        Seconds for the whole call; samples open when it runs out stay ``unknown``.
    attack_steps, attack_restarts : int
        PGD steps per restart and restarts of the ``"attack"`` stage.
    domain_batch : int
        Subdomains bounded at once by branch and bound (memory grows with it).
    max_domains : int
        Open subdomains kept at most by branch and bound.
    verbose : int
        A progress bar on stderr for the search stages when > 0.
    random_state : int
        Seed of the attack's random starts.
    memory_limit : int or None
        Bytes the bound stages may use: their samples per chunk (at most the cascade's batch
        size) and the groups of their backward passes are planned from it
        (:mod:`certdistill.bounds.memory`). ``None``: the device's default
        (:func:`~certdistill.bounds.memory.default_memory_limit`).
    """

    timeout: float = 10.0
    budget: float | None = None
    attack_steps: int = 50
    attack_restarts: int = 5
    domain_batch: int = 512
    max_domains: int = 200_000
    verbose: int = 0
    random_state: int = 0
    memory_limit: int | None = None

    def __post_init__(self):
        if not (isinstance(self.timeout, int | float) and math.isfinite(self.timeout)
                and self.timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got "
                             f"{self.timeout!r}.")
        if self.budget is not None and not (
                isinstance(self.budget, int | float) and self.budget > 0):
            raise ValueError(f"budget must be a positive number of seconds or None, got "
                             f"{self.budget!r}.")
        for name in ("attack_steps", "attack_restarts", "domain_batch", "max_domains"):
            value = getattr(self, name)
            if not (isinstance(value, int | np.integer) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        object.__setattr__(self, "memory_limit", check_memory_limit(self.memory_limit))


@dataclass
class CascadeState:
    """Per-sample results of a cascade, filled stage by stage."""

    reference: Tensor
    margins: Tensor
    decided: Tensor  # stage index that settled the sample, -1 if none
    falsified: Tensor
    counterexample: Tensor
    open_rows: Tensor
    extras: dict = field(default_factory=dict)

    @property
    def certified(self) -> Tensor:
        return (self.decided >= 0) & ~self.falsified


class Cascade:
    """Runs the stages of a cascade on one batch of samples (see the module docstring).

    Parameters
    ----------
    module : torch.nn.Module
        The network (the caller keeps it in eval mode and disables gradients).
    bounder : object
        The engine (or the auto_LiRPA adapter) for the bound stages.
    batch_size : int
        Samples bounded at once by the bound stages.
    options : CascadeOptions
        Budgets of the search stages.
    """

    def __init__(self, module: nn.Module, bounder, batch_size: int,
                 options: CascadeOptions | None = None):
        self.module = module
        self.bounder = bounder
        self.batch_size = batch_size
        self.options = options or CascadeOptions()
        self.judge = Judge(module)
        self._milp: MarginMilp | None = None

    def run(self, stages: Sequence[str], X: Tensor, perturbation: Perturbation,
            labels: Tensor | None, n_classes: int, *, deadline: float | None = None
            ) -> CascadeState:
        """Run ``stages`` on the samples ``X``.

        ``deadline`` (a ``time.perf_counter()`` time) ends the call instead of ``start +
        options.budget`` (for a budget shared by several calls); the first stage always runs.
        """
        n, device = X.shape[0], X.device
        self._check_search_stages(stages)
        state = CascadeState(
            reference=labels.clone() if labels is not None else torch.empty(
                n, dtype=torch.long, device=device),
            margins=torch.full((n, n_classes), float("-inf"), dtype=X.dtype, device=device),
            decided=torch.full((n,), -1, dtype=torch.long, device=device),
            falsified=torch.zeros(n, dtype=torch.bool, device=device),
            counterexample=torch.full_like(X, float("nan")),
            open_rows=torch.arange(n, device=device),
        )
        start = time.perf_counter()
        if deadline is None:
            deadline = math.inf if self.options.budget is None else start + self.options.budget
        if stages[0] not in METHODS:
            self._clean_stage(X, labels, state)
        for stage, name in enumerate(stages):
            if stage > 0 and state.open_rows.numel() == 0:
                break
            # The first stage always runs: it gives the reference class of every sample.
            if stage > 0 and time.perf_counter() >= deadline:
                break
            stage_start = time.perf_counter()
            if name in METHODS:
                self._bound_stage(stage, name, X, perturbation, labels, state)
            else:
                getattr(self, f"_{name}_stage")(stage, X, perturbation, state, deadline)
            state.extras.setdefault("stage_seconds", {})[name] = (time.perf_counter()
                                                                  - stage_start)
            still_open = (state.decided[state.open_rows] < 0) & ~state.falsified[state.open_rows]
            state.open_rows = state.open_rows[still_open]
        return state

    # ------------------------------------------------------------ stages
    def _clean_stage(self, X: Tensor, labels: Tensor | None, state: CascadeState) -> None:
        """The clean prediction, when the first stage is not a bound method (whose sweep gives
        it)."""
        logits = torch.cat([self.module(X[begin:begin + self.batch_size])
                            for begin in range(0, X.shape[0], self.batch_size)])
        self._record_clean(torch.arange(X.shape[0], device=X.device), logits, X, labels, state)

    @staticmethod
    def _record_clean(rows: Tensor, logits: Tensor, X: Tensor, labels: Tensor | None,
                      state: CascadeState, prune: bool = True) -> None:
        if labels is None:
            state.reference[rows] = logits.argmax(1)
            return
        wrong = logits.argmax(1) != labels[rows]
        state.falsified[rows] = wrong
        state.counterexample[rows[wrong]] = X[rows[wrong]]
        state.extras.setdefault("clean", torch.zeros_like(state.falsified))
        state.extras["clean"][rows] = wrong
        if prune:
            state.open_rows = state.open_rows[~state.falsified[state.open_rows]]

    def _bound_stage(self, stage: int, name: str, X: Tensor, perturbation: Perturbation,
                     labels: Tensor | None, state: CascadeState) -> None:
        rows_open = state.open_rows
        plan = self.memory_plan(name, X)
        # While every sample is open (open_rows is still arange(n)), chunks are slices: views of
        # X, not gathered copies.
        every = rows_open.numel() == X.shape[0]
        for begin in range(0, rows_open.numel(), plan.samples):
            rows = rows_open[begin:begin + plan.samples]
            take = slice(begin, begin + rows.numel()) if every else rows
            result = self.bounder.bound(
                X[take], perturbation.for_rows(take),
                None if stage == 0 and labels is None else state.reference[take], method=name,
                backward_elements=plan.backward_elements,
            )
            if stage == 0:
                self._record_clean(rows, result.logits, X, labels, state, prune=False)
            state.margins[take] = torch.maximum(state.margins[take], result.margins)
        now = (state.margins[rows_open] > 0).all(1) & ~state.falsified[rows_open]
        state.decided[rows_open[now]] = stage

    def _attack_stage(self, stage: int, X: Tensor, perturbation: Perturbation,
                      state: CascadeState, deadline: float) -> None:
        generator = torch.Generator(device=X.device).manual_seed(self.options.random_state)
        rows_open = state.open_rows
        chunk = max(1, self.batch_size // 4)
        for begin in range(0, rows_open.numel(), chunk):
            if time.perf_counter() >= deadline:
                return
            rows = rows_open[begin:begin + chunk]
            # Only the classes no bound has ruled out yet (all of them before any bound).
            targets = ~(state.margins[rows] > 0)
            margins, points = targeted_attack(
                self.module, X[rows], state.reference[rows], perturbation.for_rows(rows),
                steps=self.options.attack_steps, restarts=self.options.attack_restarts,
                generator=generator, targets=targets,
            )
            best = margins.argmin(1)
            candidates = points[torch.arange(rows.numel(), device=X.device), best]
            lower, upper = inner_box(X[rows], perturbation.for_rows(rows))
            self._falsify(stage, rows, candidates, lower, upper, state)

    def _bab_stage(self, stage: int, X: Tensor, perturbation: Perturbation,
                   state: CascadeState, deadline: float) -> None:
        rows = state.open_rows
        if rows.numel() == 0:
            return
        engine = self._engine()
        sub = perturbation.for_rows(rows)
        center, radius = sub.box(X[rows])
        lower, upper = inner_box(X[rows], sub)
        root = self._root_bounds(engine, X, rows, sub, state)
        generator = torch.Generator(device=X.device).manual_seed(self.options.random_state)

        def search(samples: Tensor, starts: Tensor, targets: Tensor) -> Tensor:
            chosen = rows[samples]
            _, points = targeted_attack(
                self.module, X[chosen], state.reference[chosen],
                perturbation.for_rows(chosen), steps=10, restarts=1, generator=generator,
                targets=targets, start=starts)
            return points[torch.arange(samples.numel(), device=X.device), targets.int().argmax(1)]

        spent = state.extras.setdefault("spent", np.zeros(state.decided.numel()))
        # Each sample's refinement counts against its branch and bound time (the share of the
        # most refined sample, as the search charges all samples together).
        already = float(spent[rows.cpu().numpy()].max()) if rows.numel() else 0.0
        with self._progress(rows.numel(), "branch and bound") as progress:
            result = branch_and_bound(
                engine, self.judge, self._exact(X), center, radius, (lower, upper),
                state.reference[rows], root,
                timeout=max(self.options.timeout * _BAB_SHARE - already, 1e-3),
                deadline=deadline,
                batch_size=self.options.domain_batch, max_domains=self.options.max_domains,
                search=search, on_round=progress,
            )
        spent[rows.cpu().numpy()] += result.spent
        state.decided[rows[result.certified]] = stage
        falsified = rows[result.falsified]
        state.falsified[falsified] = True
        state.decided[falsified] = stage
        state.counterexample[falsified] = result.counterexample[result.falsified]

    def _milp_stage(self, stage: int, X: Tensor, perturbation: Perturbation,
                    state: CascadeState, deadline: float) -> None:
        rows_open = state.open_rows
        if rows_open.numel() == 0:
            return
        engine = self._engine()
        milp = self._exact(X)
        spent = state.extras.setdefault("spent", np.zeros(state.decided.numel()))
        with self._progress(rows_open.numel(), "MILP") as progress:
            for count, row in enumerate(rows_open.tolist()):
                remaining = self.options.timeout - spent[row]
                if remaining <= 0 or time.perf_counter() >= deadline:
                    continue
                started = time.perf_counter()
                sub = perturbation.for_rows(torch.tensor([row], device=X.device))
                x = X[row:row + 1]
                center, radius = sub.box(x)
                interval = self._root_bounds(engine, X, torch.tensor([row], device=X.device),
                                             sub, state)
                reference = state.reference[row:row + 1]
                root = engine.bound_subdomains(center, radius, interval, reference)
                bounds = [(lo[0].flatten().double().cpu().numpy(),
                           up[0].flatten().double().cpu().numpy())
                          for lo, up in (root.bounds[k] for k in sorted(root.bounds))]
                margins = state.margins[row]
                ref = int(reference)
                classes = sorted((j for j in range(margins.numel())
                                  if j != ref and not bool(margins[j] > 0)),
                                 key=lambda j: float(margins[j]))
                lower, upper = inner_box(x, sub)
                outcome = milp.solve(
                    lower[0].double().cpu().numpy(), upper[0].double().cpu().numpy(), bounds,
                    ref, classes, deadline=min(deadline, started + remaining))
                if outcome.proven:
                    state.decided[row] = stage
                    proven = torch.as_tensor(outcome.lower, dtype=state.margins.dtype,
                                             device=X.device)
                    state.margins[row] = torch.maximum(state.margins[row], proven)
                elif outcome.candidate is not None:
                    point = torch.as_tensor(outcome.candidate, dtype=X.dtype,
                                            device=X.device).view_as(x)
                    self._falsify(stage, torch.tensor([row], device=X.device), point, lower,
                                  upper, state)
                spent[row] += time.perf_counter() - started
                progress(count + 1)

    def _refine_stage(self, stage: int, X: Tensor, perturbation: Perturbation,
                      state: CascadeState, deadline: float) -> None:
        rows_open = state.open_rows
        if rows_open.numel() == 0:
            return
        engine = self._engine()
        milp = self._exact(X)
        refined = state.extras.setdefault("refined_bounds", {})
        spent = state.extras.setdefault("spent", np.zeros(state.decided.numel()))
        with self._progress(rows_open.numel(), "refining bounds") as progress:
            for count, row in enumerate(rows_open.tolist()):
                started = time.perf_counter()
                share = self.options.timeout * _REFINE_SHARE - spent[row]
                if share <= 0 or started >= deadline:
                    continue
                index = torch.tensor([row], device=X.device)
                sub = perturbation.for_rows(index)
                center, radius = sub.box(X[row:row + 1])
                interval = dict(zip(engine._activation_indices,
                                    engine.activation_interval_bounds(X[row:row + 1], sub),
                                    strict=True))
                result = refine_bounds(engine, milp, center, radius, interval,
                                       state.reference[index],
                                       deadline=min(deadline, started + share))
                refined[row] = result.bounds
                margins = result.margins.to(state.margins.dtype)
                state.margins[row] = torch.maximum(state.margins[row], margins)
                if bool((state.margins[row] > 0).all()):
                    state.decided[row] = stage
                spent[row] += time.perf_counter() - started
                progress(count + 1)

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _root_bounds(engine: BoundEngine, X: Tensor, rows: Tensor, sub: Perturbation,
                     state: CascadeState) -> dict[int, tuple[Tensor, Tensor]]:
        """Bounds of every activation's input on the boxes of ``rows``: IBP's, replaced by the
        refined ones where the ``"refine"`` stage ran."""
        root = dict(zip(engine._activation_indices,
                        engine.activation_interval_bounds(X[rows], sub), strict=True))
        refined = state.extras.get("refined_bounds", {})
        for position, row in enumerate(rows.tolist()):
            if row not in refined:
                continue
            for index, (lower, upper) in refined[row].items():
                root[index][0][position] = torch.maximum(root[index][0][position], lower[0])
                root[index][1][position] = torch.minimum(root[index][1][position], upper[0])
        return root

    def memory_plan(self, method: str, X: Tensor) -> MemoryPlan:
        """Samples per chunk and backward group size of a bound stage on samples like ``X``'s,
        within ``options.memory_limit`` (the device's default when None)."""
        limit = self.options.memory_limit
        if limit is None:
            limit = default_memory_limit(X.device)
        if not isinstance(self.bounder, BoundEngine):  # auto_LiRPA plans its own memory
            return MemoryPlan(self.batch_size, 0, limit)
        return self.bounder.memory_plan(X, method, memory_limit=limit,
                                        max_samples=self.batch_size)

    def _falsify(self, stage: int, rows: Tensor, candidates: Tensor, lower: Tensor,
                 upper: Tensor, state: CascadeState) -> None:
        flipped, points = self.judge.flips(candidates, state.reference[rows], lower, upper)
        hit = rows[flipped]
        state.falsified[hit] = True
        state.decided[hit] = stage
        state.counterexample[hit] = points[flipped]

    def _engine(self) -> BoundEngine:
        return engine_for(self.module)

    def _exact(self, X: Tensor) -> MarginMilp:
        if self._milp is None:
            float64 = BoundEngine(copy.deepcopy(self.module).double().eval())
            segments = float64.affine_segments(tuple(X.shape[1:]))
            self._milp = MarginMilp([(w.detach().cpu().numpy(), b.detach().cpu().numpy())
                                     for w, b in segments], wide=float64.segments_are_wide)
        return self._milp

    def _check_search_stages(self, stages: Sequence[str]) -> None:
        if not any(name in ("refine", "bab", "milp") for name in stages):
            return
        engine = self._engine()
        others = sorted({type(op.layer).__name__ for op in engine.ops
                         if op.is_activation and not isinstance(op, ReLUOp)})
        if others:
            raise ValueError(
                f"Complete verification (bound refinement, branch and bound, MILP) handles "
                f"ReLU activations only; the module also has {', '.join(others)}. Use the "
                f"bound methods {METHODS} for it."
            )

    def _progress(self, total: int, description: str):
        return Progress(total, description, self.options.verbose)


class Progress:
    """A tqdm bar of decided samples (nothing when ``verbose`` is 0)."""

    def __init__(self, total: int, description: str, verbose: int):
        self.total, self.description, self.verbose = total, description, verbose
        self.bar = None

    def __enter__(self):
        if self.verbose > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.description, unit="sample",
                            leave=False, dynamic_ncols=True)
        return self

    def __call__(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(max(0, done - self.bar.n))

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
