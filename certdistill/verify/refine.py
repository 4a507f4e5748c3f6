"""Tighter bounds of every activation's input, one layer after another, by linear programming.

CROWN bounds a hidden neuron through one fixed linear relaxation per earlier ReLU. The linear
program over the triangle relaxation of every earlier ReLU (the LP relaxation of
:class:`~certdistill.verify.milp.MarginMilp`) is the tightest bound any such single-neuron
relaxation can give, and on deep fully connected networks it is far tighter: on VNN-COMP 2021's
``mnist-net_256x4`` it leaves about a third of the last layer's neurons unstable that CROWN
leaves open. Tighter intermediate bounds make every later bound tighter and every subdomain of
branch and bound cheaper to close (alpha-beta-CROWN's ``bab-refine`` does the same with MIPs).

:func:`refine_bounds` walks the activations in order. For each one it recomputes the CROWN bounds
of the activation's input from the earlier, refined ones, then minimises and maximises every
neuron those bounds leave unstable over the LP of the network up to that activation. Each LP is
solved by HiGHS from the previous solution's basis (only the objective changes), and the bound
kept is not the solver's objective value but the value of its dual solution made rigorous
(Neumaier and Shcherbina, 2004): for any multipliers ``y`` of the rows ``lo <= M v <= hi``,

    c @ v  >=  sum_r (y_r lo_r if y_r > 0 else y_r hi_r)  +  sum_i min(r_i vl_i, r_i vu_i),

with ``r = c - M.T @ y`` over the variables' box ``[vl, vu]``. The inequality holds for every
``y``, so the bound is sound whatever the solver's tolerances, and equals the LP optimum up to
them when ``y`` is optimal. Finally the margins themselves are minimised over the whole LP.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from certdistill.bounds.engine import BoundEngine
from certdistill.verify.milp import BOUND_SLACK, MarginMilp, quiet_native_stdout

__all__ = ["RefinedBounds", "refine_bounds"]


@dataclass
class RefinedBounds:
    """Outcome of :func:`refine_bounds` for one sample.

    Attributes
    ----------
    bounds : dict of int to (Tensor, Tensor)
        Activation op index -> ``(lower, upper)`` of shape ``(1, *input_shape)``, valid on the
        box, at least as tight as the ones given.
    margins : Tensor of shape (n_classes,)
        Lower bounds of ``z_ref - z_j`` (``+inf`` for the reference class); ``-inf`` for the
        classes not reached before the deadline.
    complete : bool
        Every layer and every margin was refined before the deadline.
    """

    bounds: dict[int, tuple[Tensor, Tensor]]
    margins: Tensor
    complete: bool


class _LinearProgram:
    """One HiGHS LP with a changing objective; its minima made rigorous from its duals."""

    def __init__(self, matrix, row_lower, row_upper, var_lower, var_upper):
        import highspy

        self.matrix = matrix.tocsr()
        self.row_lower, self.row_upper = row_lower, row_upper
        self.var_lower, self.var_upper = var_lower, var_upper
        infinity = highspy.kHighsInf
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = matrix.shape[1], matrix.shape[0]
        lp.col_cost_ = np.zeros(matrix.shape[1])
        lp.col_lower_, lp.col_upper_ = var_lower, var_upper
        lp.row_lower_ = np.where(np.isinf(row_lower), -infinity, row_lower)
        lp.row_upper_ = np.where(np.isinf(row_upper), infinity, row_upper)
        columns = matrix.tocsc()
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = columns.indptr
        lp.a_matrix_.index_ = columns.indices
        lp.a_matrix_.value_ = columns.data
        with quiet_native_stdout():  # HiGHS prints its banner before any option is read
            self.highs = highspy.Highs()
        self.highs.setOptionValue("output_flag", False)
        self.highs.passModel(lp)
        self._columns = np.arange(matrix.shape[1], dtype=np.int32)

    def set_time_limit(self, seconds: float) -> None:
        self.highs.setOptionValue("time_limit", max(float(seconds), 1e-3))

    def minimum(self, cost: np.ndarray) -> float:
        """A rigorous lower bound of ``min cost @ v`` over the LP (``-inf`` if none)."""
        self.highs.changeColsCost(len(self._columns), self._columns, cost)
        self.highs.run()
        duals = np.asarray(self.highs.getSolution().row_dual, dtype=np.float64)
        if duals.shape != self.row_lower.shape or not np.all(np.isfinite(duals)):
            return -np.inf
        return _dual_bound(
            cost, duals, self.matrix, self.row_lower, self.row_upper, self.var_lower, self.var_upper
        )


def _dual_bound(cost, duals, matrix, row_lower, row_upper, var_lower, var_upper) -> float:
    """``min cost @ v`` over ``row_lower <= matrix @ v <= row_upper``, ``v`` in its box, bounded
    below through the multipliers ``duals`` (any multipliers give a valid bound)."""
    duals = np.where((duals > 0) & np.isinf(row_lower), 0.0, duals)
    duals = np.where((duals < 0) & np.isinf(row_upper), 0.0, duals)
    side = np.where(
        duals > 0,
        np.where(np.isinf(row_lower), 0.0, row_lower),
        np.where(np.isinf(row_upper), 0.0, row_upper),
    )
    reduced = cost - matrix.T @ duals
    return float(duals @ side + np.minimum(reduced * var_lower, reduced * var_upper).sum())


def refine_bounds(
    engine: BoundEngine,
    milp: MarginMilp,
    center: Tensor,
    radius: Tensor,
    bounds: dict[int, tuple[Tensor, Tensor]],
    reference: Tensor,
    *,
    deadline: float,
) -> RefinedBounds:
    """Refine the bounds of every activation's input of one sample (see the module docstring).

    Parameters
    ----------
    engine : BoundEngine
        The engine of the module (in eval mode).
    milp : MarginMilp
        The same network's affine segments in float64.
    center, radius : Tensor of shape (1, *sample_shape)
        The input box.
    bounds : dict of int to (Tensor, Tensor)
        Valid bounds of every activation's input on the box (IBP's, for example).
    reference : LongTensor of shape (1,)
        The class whose margins are bounded.
    deadline : float
        ``time.perf_counter()`` value at which refinement stops (what is refined by then is
        kept).

    Returns
    -------
    RefinedBounds
    """
    with torch.no_grad():
        return _refine(engine, milp, center, radius, bounds, reference, deadline)


def _refine(engine, milp, center, radius, bounds, reference, deadline) -> RefinedBounds:
    indices = sorted(bounds)
    lower_box = (center - radius).flatten().double().cpu().numpy()
    upper_box = (center + radius).flatten().double().cpu().numpy()
    current = dict(bounds)
    complete = True
    for position, index in enumerate(indices):
        current = dict(engine.bound_subdomains(center, radius, current, reference).bounds)
        if position == 0:
            continue  # the first layer's bounds are exact already
        if time.perf_counter() >= deadline:
            complete = False
            break
        lower, upper = (
            bound.detach().flatten().double().cpu().numpy().copy() for bound in current[index]
        )
        flat = [
            tuple(b.detach().flatten().double().cpu().numpy() for b in current[k])
            for k in indices[:position]
        ]
        program = _prefix_program(milp, lower_box, upper_box, flat)
        weight, bias = milp.weights[position], milp.biases[position]
        first = 0 if milp.wide else program.last_offset
        for neuron in np.flatnonzero((lower < 0) & (upper > 0)):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                complete = False
                break
            program.lp.set_time_limit(remaining)
            cost = np.zeros(program.n_variables)
            cost[first : first + weight.shape[1]] = -weight[neuron]
            upper[neuron] = min(upper[neuron], bias[neuron] - program.lp.minimum(cost))
            if upper[neuron] <= 0:
                continue
            cost[first : first + weight.shape[1]] = weight[neuron]
            lower[neuron] = max(lower[neuron], bias[neuron] + program.lp.minimum(cost))
        slack = BOUND_SLACK * (1 + np.abs(lower) + np.abs(upper))
        old_lower, old_upper = current[index]
        current[index] = (
            torch.maximum(old_lower, _like(lower - slack, old_lower)),
            torch.minimum(old_upper, _like(upper + slack, old_upper)),
        )
        if not complete:
            break
    final = engine.bound_subdomains(center, radius, current, reference)
    margins = final.margins[0].clone()
    if complete and time.perf_counter() < deadline:
        flat = [
            tuple(b.detach().flatten().double().cpu().numpy() for b in final.bounds[k])
            for k in indices
        ]
        margins, complete = _lp_margins(
            milp, lower_box, upper_box, flat, int(reference), margins, deadline
        )
    return RefinedBounds(dict(final.bounds), margins, complete)


def _lp_margins(
    milp: MarginMilp, lower_box, upper_box, flat, reference: int, margins: Tensor, deadline: float
) -> tuple[Tensor, bool]:
    """The margins' minima over the LP of the whole network (kept where above CROWN's)."""
    program = _prefix_program(milp, lower_box, upper_box, flat)
    weight, bias = milp.weights[-1], milp.biases[-1]
    first = 0 if milp.wide else program.last_offset
    margins = margins.clone()
    for j in range(weight.shape[0]):
        if j == reference or bool(margins[j] > 0):
            continue
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return margins, False
        program.lp.set_time_limit(remaining)
        cost = np.zeros(program.n_variables)
        cost[first : first + weight.shape[1]] = weight[reference] - weight[j]
        value = bias[reference] - bias[j] + program.lp.minimum(cost)
        margins[j] = max(float(margins[j]), value - BOUND_SLACK * (1 + abs(value)))
    return margins, True


@dataclass
class _PrefixProgram:
    lp: _LinearProgram
    n_variables: int
    last_offset: int


def _prefix_program(milp: MarginMilp, lower_box, upper_box, flat) -> _PrefixProgram:
    """The LP relaxation of the network up to the input of activation ``len(flat)``."""
    prefix = MarginMilp(
        [
            (w, b)
            for w, b in zip(
                milp.weights[: len(flat) + 1], milp.biases[: len(flat) + 1], strict=True
            )
        ],
        wide=milp.wide,
    )
    model = prefix.model(lower_box, upper_box, flat)
    if model.constraints:
        constraint = model.constraints[0]
        matrix, row_lower, row_upper = constraint.A, constraint.lb, constraint.ub
    else:
        from scipy.sparse import csr_matrix

        matrix = csr_matrix((0, model.n_variables))
        row_lower = row_upper = np.zeros(0)
    lp = _LinearProgram(
        matrix,
        np.asarray(row_lower, np.float64),
        np.asarray(row_upper, np.float64),
        np.asarray(model.variable_bounds.lb, np.float64),
        np.asarray(model.variable_bounds.ub, np.float64),
    )
    return _PrefixProgram(lp, model.n_variables, model.last_offset)


def _like(values: np.ndarray, reference: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=reference.dtype, device=reference.device).view_as(
        reference
    )
