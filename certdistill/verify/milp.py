"""Exact minimum margins of a ReLU network by mixed-integer linear programming (HiGHS).

The network is lowered to its affine maps between activations (:meth:`BoundEngine.affine_segments`
of a float64 copy) and every ReLU is encoded by the big-M formulation of Tjeng et al. (2019) with
the pre-activation bounds the bound engine computed (CROWN, or those of a branch-and-bound
subdomain): a neuron stable on its bounds is an equality or a zero, an unstable one gets a binary.
Tight bounds make small big-M constants and few binaries, which is what makes the problem small.

``scipy.optimize.milp`` minimises ``z_ref - z_j`` for each open class ``j``. Its dual bound is a
valid lower bound of the float64 minimum even when the time limit stops the search; a margin
counts as proven when that bound exceeds :data:`MILP_TOLERANCE` (which covers HiGHS's feasibility
tolerances and the difference between the float64 problem and the float32 module). The optimal
input is returned as a candidate counterexample, to be checked against the module itself.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix, csr_matrix, vstack

__all__ = ["BOUND_SLACK", "MILP_TOLERANCE", "MarginMilp", "MilpOutcome", "quiet_native_stdout"]

#: A margin is proven by the MILP when its dual (lower) bound exceeds this.
MILP_TOLERANCE = 1e-5

#: Slack added to the engine's bounds in the big-M constants: they were computed in the module's
#: precision, the MILP describes the float64 network.
BOUND_SLACK = 1e-6


@dataclass
class MilpOutcome:
    """What the MILP established for one sample (or subdomain).

    Attributes
    ----------
    proven : bool
        Every open margin's dual bound exceeds :data:`MILP_TOLERANCE`.
    lower : ndarray of shape (n_classes,)
        Lower bound of each margin (``+inf`` where not solved: the reference, closed classes).
    candidate : ndarray or None
        The input at which the smallest margin found is attained, when it is below the
        tolerance (a candidate counterexample).
    complete : bool
        Every open margin was solved or bounded (False when time ran out first).
    """

    proven: bool
    lower: np.ndarray
    candidate: np.ndarray | None
    complete: bool


class MarginMilp:
    """The MILP of one network, reused for many samples.

    Parameters
    ----------
    segments : list of (ndarray, ndarray)
        Float64 ``(W, b)`` of the affine maps between activations (the engine's
        ``affine_segments``); ReLU between consecutive maps.
    wide : bool, default=False
        Map ``k`` reads the input and every earlier activation's output, concatenated (networks
        with skip connections, ``segments_are_wide``), instead of the previous one's only.
    """

    def __init__(self, segments: list[tuple[np.ndarray, np.ndarray]], *, wide: bool = False):
        self.weights = [np.asarray(w, dtype=np.float64) for w, _ in segments]
        self.biases = [np.asarray(b, dtype=np.float64) for _, b in segments]
        self.wide = wide

    def solve(
        self,
        lower: np.ndarray,
        upper: np.ndarray,
        bounds: list[tuple[np.ndarray, np.ndarray]],
        reference: int,
        classes,
        *,
        deadline: float,
    ) -> MilpOutcome:
        """Minimise ``z_ref - z_j`` over the box for each class ``j`` of ``classes``.

        Parameters
        ----------
        lower, upper : ndarray
            Corners of the input box (flattened or not).
        bounds : list of (ndarray, ndarray)
            Bounds of each activation's input (flattened), valid on the box.
        reference : int
            Reference class.
        classes : iterable of int
            Classes whose margins to minimise, most threatening first (the search stops at the
            first margin that is negative).
        deadline : float
            ``time.perf_counter()`` value after which no new solve starts and a running one
            stops (its dual bound is still used).
        """
        model = self.model(lower.reshape(-1), upper.reshape(-1), bounds)
        last_w, last_b = self.weights[-1], self.biases[-1]
        n_classes = last_w.shape[0]
        margin_lower = np.full(n_classes, np.inf)
        candidate, complete = None, True
        for j in classes:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                complete = False
                break
            cost = np.zeros(model.n_variables)
            first = 0 if self.wide else model.last_offset
            cost[first : first + last_w.shape[1]] = last_w[reference] - last_w[j]
            constant = last_b[reference] - last_b[j]
            with quiet_native_stdout():
                result = milp(
                    cost,
                    integrality=model.integrality,
                    bounds=model.variable_bounds,
                    constraints=model.constraints,
                    options={"time_limit": max(remaining, 1e-3), "mip_rel_gap": 1e-6},
                )
            dual = getattr(result, "mip_dual_bound", None)
            if result.status == 0 and result.x is not None:
                value = result.fun + constant
                dual_value = value if dual is None or not np.isfinite(dual) else dual + constant
            elif dual is not None and np.isfinite(dual):
                value, dual_value = np.inf, dual + constant
                complete = False
            else:
                complete = False
                margin_lower[j] = -np.inf
                break
            margin_lower[j] = min(value, dual_value)
            if result.x is not None and value <= MILP_TOLERANCE:
                candidate = result.x[: model.input_size].copy()
                break
        proven = complete and bool(np.all(margin_lower[list(classes)] > MILP_TOLERANCE))
        return MilpOutcome(proven, margin_lower, candidate, complete)

    # ------------------------------------------------------------------ model
    def model(self, lower, upper, bounds):
        """Variables ``x | a_1 | ... | a_L | delta``; one binary per unstable neuron."""
        widths = [lower.size] + [w.shape[0] for w in self.weights[:-1]]
        offsets = np.concatenate([[0], np.cumsum(widths)])
        relu_lower, relu_upper = _widened(bounds)
        unstable = [(lo < 0) & (up > 0) for lo, up in zip(relu_lower, relu_upper, strict=True)]
        n_binary = int(sum(mask.sum() for mask in unstable))
        n_variables = int(offsets[-1]) + n_binary
        var_lower = np.zeros(n_variables)
        var_upper = np.ones(n_variables)
        var_lower[: lower.size], var_upper[: lower.size] = lower, upper
        rows, row_lower, row_upper = [], [], []
        binary = int(offsets[-1])
        for k, (lo, up, mask) in enumerate(zip(relu_lower, relu_upper, unstable, strict=True)):
            previous, current = 0 if self.wide else int(offsets[k]), int(offsets[k + 1])
            var_upper[current : current + len(up)] = np.maximum(up, 0.0)
            var_lower[current : current + len(up)] = 0.0
            for block, low_side, high_side in self._layer_rows(
                k, lo, up, mask, previous, current, binary, n_variables
            ):
                rows.append(block)
                row_lower.append(low_side)
                row_upper.append(high_side)
            binary += int(mask.sum())
        integrality = np.zeros(n_variables)
        integrality[int(offsets[-1]) :] = 1
        matrix = vstack(rows).tocsr() if rows else csr_matrix((0, n_variables))
        constraints = (
            [LinearConstraint(matrix, np.concatenate(row_lower), np.concatenate(row_upper))]
            if matrix.shape[0]
            else []
        )
        return _Model(
            n_variables,
            int(offsets[len(bounds)]),
            lower.size,
            integrality,
            Bounds(var_lower, var_upper),
            constraints,
        )

    def _layer_rows(self, k, lo, up, mask, previous, current, binary, n_variables):
        """The constraint blocks ``(rows, lower side, upper side)`` of ReLU layer ``k``: the
        equality of its active neurons and the big-M encoding of its unstable ones, whose
        binaries start at column ``binary``."""
        w, b = self.weights[k], self.biases[k]
        active = lo >= 0
        # a - W a_prev (against b) in every constraint of an active or unstable neuron.
        for selected, low_side, high_side in (
            (active, b[active], b[active]),  # a = z
            (mask, b[mask], np.full(mask.sum(), np.inf)),  # a >= z
        ):
            block = self._row_block(
                w[selected], np.flatnonzero(selected), previous, current, n_variables
            )
            yield block, low_side, high_side
        index = np.flatnonzero(mask)
        count = len(index)
        deltas = binary + np.arange(count)
        # a - W a_prev - l delta <= b - l
        block = self._row_block(w[mask], index, previous, current, n_variables)
        block = (
            block
            + coo_matrix(
                (-lo[mask], (np.arange(count), deltas)), shape=(count, n_variables)
            ).tocsr()
        )
        yield block, np.full(count, -np.inf), b[mask] - lo[mask]
        # a - u delta <= 0
        block = coo_matrix(
            (
                np.concatenate([np.ones(count), -up[mask]]),
                (np.tile(np.arange(count), 2), np.concatenate([current + index, deltas])),
            ),
            shape=(count, n_variables),
        ).tocsr()
        yield block, np.full(count, -np.inf), np.zeros(count)

    @staticmethod
    def _row_block(
        w_rows: np.ndarray, neurons: np.ndarray, previous: int, current: int, n_variables: int
    ) -> csr_matrix:
        """Rows ``a_i - W_i a_prev`` for the given neurons."""
        count = w_rows.shape[0]
        if count == 0:
            return csr_matrix((0, n_variables))
        dense = coo_matrix(-w_rows)
        block = coo_matrix(
            (dense.data, (dense.row, dense.col + previous)), shape=(count, n_variables)
        )
        own = coo_matrix(
            (np.ones(count), (np.arange(count), current + neurons)), shape=(count, n_variables)
        )
        return (block + own).tocsr()


@contextmanager
def quiet_native_stdout():
    """Silence what HiGHS's C++ code prints to the process's stdout (a debug line it writes
    on some solves even with display off), restoring it afterwards."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no file descriptor 1 (e.g. some embedded interpreters)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@dataclass
class _Model:
    n_variables: int
    last_offset: int
    input_size: int
    integrality: np.ndarray
    variable_bounds: Bounds
    constraints: list


def _widened(bounds) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The bounds of every ReLU's input as flat float64 arrays, widened by ``BOUND_SLACK``
    (relative): they were computed in the module's precision, the MILP is of the float64
    network."""
    lower = [np.asarray(lo, np.float64).reshape(-1) for lo, _ in bounds]
    upper = [np.asarray(up, np.float64).reshape(-1) for _, up in bounds]
    slack = [
        BOUND_SLACK * (1 + np.abs(lo) + np.abs(up)) for lo, up in zip(lower, upper, strict=True)
    ]
    return (
        [lo - s for lo, s in zip(lower, slack, strict=True)],
        [up + s for up, s in zip(upper, slack, strict=True)],
    )
