"""The search stages of the cascade (attack, bound refinement, branch and bound, MILP).

:class:`SearchStages` is a mixin of :class:`~certdistill.verify.cascade.Cascade`: one method
``_<name>_stage`` per stage, which the cascade's ``run`` calls by the stage's name, and the
helpers they share (the float64 MILP of the network, the root bounds, falsification).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import Tensor, nn

from certdistill.bounds import BoundEngine, Perturbation, engine_for
from certdistill.verify.attacks import targeted_attack
from certdistill.verify.bab import branch_and_bound
from certdistill.verify.cascade_state import CascadeOptions, CascadeState, Progress
from certdistill.verify.counterexamples import Judge, inner_box
from certdistill.verify.milp import MarginMilp
from certdistill.verify.refine import refine_bounds

__all__ = ["SEARCH_STAGES", "SearchStages"]

#: Stage names that are not bound methods, each a ``_<name>_stage`` method of SearchStages.
SEARCH_STAGES = ("attack", "refine", "bab", "milp")

#: Share of a sample's ``timeout`` that bound refinement may use at most.
_REFINE_SHARE = 0.3

#: Share of a sample's ``timeout`` that branch and bound may use (refinement included); the
#: exact MILP gets the rest.
_BAB_SHARE = 0.7


class SearchStages:
    """The search stages of a cascade; a mixin of ``Cascade``, whose attributes it uses.

    Attributes used
    ---------------
    module : torch.nn.Module
    options : CascadeOptions
    judge : Judge
    batch_size : int
    """

    module: nn.Module
    options: CascadeOptions
    judge: Judge
    batch_size: int
    _milp: MarginMilp | None = None

    def _attack_stage(
        self,
        stage: int,
        X: Tensor,
        perturbation: Perturbation,
        state: CascadeState,
        deadline: float,
    ) -> None:
        generator = torch.Generator(device=X.device).manual_seed(self.options.random_state)
        rows_open = state.open_rows
        chunk = max(1, self.batch_size // 4)
        for begin in range(0, rows_open.numel(), chunk):
            if time.perf_counter() >= deadline:
                return
            rows = rows_open[begin : begin + chunk]
            # Only the classes no bound has ruled out yet (all of them before any bound).
            targets = ~(state.margins[rows] > 0)
            margins, points = targeted_attack(
                self.module,
                X[rows],
                state.reference[rows],
                perturbation.for_rows(rows),
                steps=self.options.attack_steps,
                restarts=self.options.attack_restarts,
                generator=generator,
                targets=targets,
            )
            best = margins.argmin(1)
            candidates = points[torch.arange(rows.numel(), device=X.device), best]
            lower, upper = inner_box(X[rows], perturbation.for_rows(rows))
            self._falsify(stage, rows, candidates, lower, upper, state)

    def _bab_stage(
        self,
        stage: int,
        X: Tensor,
        perturbation: Perturbation,
        state: CascadeState,
        deadline: float,
    ) -> None:
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
                self.module,
                X[chosen],
                state.reference[chosen],
                perturbation.for_rows(chosen),
                steps=10,
                restarts=1,
                generator=generator,
                targets=targets,
                start=starts,
            )
            return points[torch.arange(samples.numel(), device=X.device), targets.int().argmax(1)]

        spent = state.extras.setdefault("spent", np.zeros(state.decided.numel()))
        # Each sample's refinement counts against its branch and bound time (the share of the
        # most refined sample, as the search charges all samples together).
        already = float(spent[rows.cpu().numpy()].max()) if rows.numel() else 0.0
        with self._progress(rows.numel(), "branch and bound") as progress:
            result = branch_and_bound(
                engine,
                self.judge,
                self._exact(X),
                center,
                radius,
                (lower, upper),
                state.reference[rows],
                root,
                timeout=max(self.options.timeout * _BAB_SHARE - already, 1e-3),
                deadline=deadline,
                batch_size=self.options.domain_batch,
                max_domains=self.options.max_domains,
                search=search,
                on_round=progress,
            )
        spent[rows.cpu().numpy()] += result.spent
        state.decided[rows[result.certified]] = stage
        falsified = rows[result.falsified]
        state.falsified[falsified] = True
        state.decided[falsified] = stage
        state.counterexample[falsified] = result.counterexample[result.falsified]

    def _milp_stage(
        self,
        stage: int,
        X: Tensor,
        perturbation: Perturbation,
        state: CascadeState,
        deadline: float,
    ) -> None:
        rows_open = state.open_rows
        if rows_open.numel() == 0:
            return
        spent = state.extras.setdefault("spent", np.zeros(state.decided.numel()))
        with self._progress(rows_open.numel(), "MILP") as progress:
            for count, row in enumerate(rows_open.tolist()):
                remaining = self.options.timeout - spent[row]
                if remaining <= 0 or time.perf_counter() >= deadline:
                    continue
                started = time.perf_counter()
                self._milp_row(
                    stage, row, X, perturbation, state, min(deadline, started + remaining)
                )
                spent[row] += time.perf_counter() - started
                progress(count + 1)

    def _milp_row(
        self,
        stage: int,
        row: int,
        X: Tensor,
        perturbation: Perturbation,
        state: CascadeState,
        deadline: float,
    ) -> None:
        """The exact MILP of sample ``row`` over the classes no bound has ruled out yet."""
        engine = self._engine()
        index = torch.tensor([row], device=X.device)
        sub = perturbation.for_rows(index)
        x = X[row : row + 1]
        center, radius = sub.box(x)
        interval = self._root_bounds(engine, X, index, sub, state)
        reference = state.reference[row : row + 1]
        root = engine.bound_subdomains(center, radius, interval, reference)
        bounds = [
            (lo[0].flatten().double().cpu().numpy(), up[0].flatten().double().cpu().numpy())
            for lo, up in (root.bounds[k] for k in sorted(root.bounds))
        ]
        margins = state.margins[row]
        ref = int(reference)
        classes = sorted(
            (j for j in range(margins.numel()) if j != ref and not bool(margins[j] > 0)),
            key=lambda j: float(margins[j]),
        )
        lower, upper = inner_box(x, sub)
        outcome = self._exact(X).solve(
            lower[0].double().cpu().numpy(),
            upper[0].double().cpu().numpy(),
            bounds,
            ref,
            classes,
            deadline=deadline,
        )
        if outcome.proven:
            state.decided[row] = stage
            proven = torch.as_tensor(outcome.lower, dtype=state.margins.dtype, device=X.device)
            state.margins[row] = torch.maximum(state.margins[row], proven)
        elif outcome.candidate is not None:
            point = torch.as_tensor(outcome.candidate, dtype=X.dtype, device=X.device)
            self._falsify(stage, index, point.view_as(x), lower, upper, state)

    def _refine_stage(
        self,
        stage: int,
        X: Tensor,
        perturbation: Perturbation,
        state: CascadeState,
        deadline: float,
    ) -> None:
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
                center, radius = sub.box(X[row : row + 1])
                interval = dict(
                    zip(
                        engine._activation_indices,
                        engine.activation_interval_bounds(X[row : row + 1], sub),
                        strict=True,
                    )
                )
                result = refine_bounds(
                    engine,
                    milp,
                    center,
                    radius,
                    interval,
                    state.reference[index],
                    deadline=min(deadline, started + share),
                )
                refined[row] = result.bounds
                margins = result.margins.to(state.margins.dtype)
                state.margins[row] = torch.maximum(state.margins[row], margins)
                if bool((state.margins[row] > 0).all()):
                    state.decided[row] = stage
                spent[row] += time.perf_counter() - started
                progress(count + 1)

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _root_bounds(
        engine: BoundEngine, X: Tensor, rows: Tensor, sub: Perturbation, state: CascadeState
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """Bounds of every activation's input on the boxes of ``rows``: IBP's, replaced by the
        refined ones where the ``"refine"`` stage ran."""
        root = dict(
            zip(
                engine._activation_indices,
                engine.activation_interval_bounds(X[rows], sub),
                strict=True,
            )
        )
        refined = state.extras.get("refined_bounds", {})
        for position, row in enumerate(rows.tolist()):
            if row not in refined:
                continue
            for index, (lower, upper) in refined[row].items():
                root[index][0][position] = torch.maximum(root[index][0][position], lower[0])
                root[index][1][position] = torch.minimum(root[index][1][position], upper[0])
        return root

    def _falsify(
        self,
        stage: int,
        rows: Tensor,
        candidates: Tensor,
        lower: Tensor,
        upper: Tensor,
        state: CascadeState,
    ) -> None:
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
            self._milp = MarginMilp(
                [(w.detach().cpu().numpy(), b.detach().cpu().numpy()) for w, b in segments],
                wide=float64.segments_are_wide,
            )
        return self._milp

    def _progress(self, total: int, description: str):
        return Progress(total, description, self.options.verbose)
