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

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from certdistill.bounds import METHODS, BoundEngine, Perturbation
from certdistill.bounds.memory import MemoryPlan, default_memory_limit
from certdistill.bounds.ops import ReLUOp
from certdistill.verify.cascade_state import CascadeOptions, CascadeState, Progress
from certdistill.verify.counterexamples import Judge
from certdistill.verify.search_stages import SEARCH_STAGES, SearchStages

__all__ = [
    "COMPLETE",
    "STAGES",
    "Cascade",
    "CascadeOptions",
    "CascadeState",
    "Progress",
    "check_stages",
]

#: The complete cascade of ``method="complete"``.
COMPLETE: tuple[str, ...] = ("ibp", "crown", "attack", "alpha-crown", "refine", "bab", "milp")

#: Every stage a cascade may name, cheapest first.
STAGES: tuple[str, ...] = (*METHODS, *SEARCH_STAGES)

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


class Cascade(SearchStages):
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

    def __init__(
        self, module: nn.Module, bounder, batch_size: int, options: CascadeOptions | None = None
    ):
        self.module = module
        self.bounder = bounder
        self.batch_size = batch_size
        self.options = options or CascadeOptions()
        self.judge = Judge(module)
        self._milp = None

    def run(
        self,
        stages: Sequence[str],
        X: Tensor,
        perturbation: Perturbation,
        labels: Tensor | None,
        n_classes: int,
        *,
        deadline: float | None = None,
    ) -> CascadeState:
        """Run ``stages`` on the samples ``X``.

        ``deadline`` (a ``time.perf_counter()`` time) ends the call instead of ``start +
        options.budget`` (for a budget shared by several calls); the first stage always runs.
        """
        n, device = X.shape[0], X.device
        self._check_search_stages(stages)
        state = CascadeState(
            reference=labels.clone()
            if labels is not None
            else torch.empty(n, dtype=torch.long, device=device),
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
            state.extras.setdefault("stage_seconds", {})[name] = time.perf_counter() - stage_start
            still_open = (state.decided[state.open_rows] < 0) & ~state.falsified[state.open_rows]
            state.open_rows = state.open_rows[still_open]
        return state

    # ------------------------------------------------------------ stages
    def _clean_stage(self, X: Tensor, labels: Tensor | None, state: CascadeState) -> None:
        """The clean prediction, when the first stage is not a bound method (whose sweep gives
        it)."""
        logits = torch.cat(
            [
                self.module(X[begin : begin + self.batch_size])
                for begin in range(0, X.shape[0], self.batch_size)
            ]
        )
        self._record_clean(torch.arange(X.shape[0], device=X.device), logits, X, labels, state)

    @staticmethod
    def _record_clean(
        rows: Tensor,
        logits: Tensor,
        X: Tensor,
        labels: Tensor | None,
        state: CascadeState,
        prune: bool = True,
    ) -> None:
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

    def _bound_stage(
        self,
        stage: int,
        name: str,
        X: Tensor,
        perturbation: Perturbation,
        labels: Tensor | None,
        state: CascadeState,
    ) -> None:
        rows_open = state.open_rows
        plan = self.memory_plan(name, X)
        # While every sample is open (open_rows is still arange(n)), chunks are slices: views of
        # X, not gathered copies.
        every = rows_open.numel() == X.shape[0]
        for begin in range(0, rows_open.numel(), plan.samples):
            rows = rows_open[begin : begin + plan.samples]
            take = slice(begin, begin + rows.numel()) if every else rows
            result = self.bounder.bound(
                X[take],
                perturbation.for_rows(take),
                None if stage == 0 and labels is None else state.reference[take],
                method=name,
                backward_elements=plan.backward_elements,
            )
            if stage == 0:
                self._record_clean(rows, result.logits, X, labels, state, prune=False)
            state.margins[take] = torch.maximum(state.margins[take], result.margins)
        now = (state.margins[rows_open] > 0).all(1) & ~state.falsified[rows_open]
        state.decided[rows_open[now]] = stage

    # ------------------------------------------------------------ helpers
    def memory_plan(self, method: str, X: Tensor) -> MemoryPlan:
        """Samples per chunk and backward group size of a bound stage on samples like ``X``'s,
        within ``options.memory_limit`` (the device's default when None)."""
        limit = self.options.memory_limit
        if limit is None:
            limit = default_memory_limit(X.device)
        if not isinstance(self.bounder, BoundEngine):  # auto_LiRPA plans its own memory
            return MemoryPlan(self.batch_size, 0, limit)
        return self.bounder.memory_plan(X, method, memory_limit=limit, max_samples=self.batch_size)

    def _check_search_stages(self, stages: Sequence[str]) -> None:
        if not any(name in ("refine", "bab", "milp") for name in stages):
            return
        engine = self._engine()
        others = sorted(
            {
                type(op.layer).__name__
                for op in engine.ops
                if op.is_activation and not isinstance(op, ReLUOp)
            }
        )
        if others:
            raise ValueError(
                f"Complete verification (bound refinement, branch and bound, MILP) handles "
                f"ReLU activations only; the module also has {', '.join(others)}. Use the "
                f"bound methods {METHODS} for it."
            )
