"""Bound refinement by linear programming (:mod:`certdistill.verify.refine`).

Refined bounds must hold at every point of the box (sampled pre-activations stay inside them),
never exceed the exact optimum of each neuron and margin (the MILP oracle of ``tests/milp.py``),
and never be looser than the CROWN bounds they start from. The rigorous dual bound must stay
below the LP's optimum for any multipliers, optimal or not.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from milp import exact_min_margins
from networks import make_mlp, make_residual_mlp
from scipy.optimize import linprog
from scipy.sparse import csr_matrix
from torch import nn

from certdistill import certify
from certdistill.bounds import BoundEngine, Perturbation
from certdistill.verify.milp import MarginMilp
from certdistill.verify.refine import _dual_bound, refine_bounds

pytest.importorskip("highspy")


def _setup(net: nn.Module, x: torch.Tensor, eps: float):
    net = net.double().eval()
    engine = BoundEngine(net)
    perturbation = Perturbation.create(eps, tuple(x.shape[1:]), dtype=torch.float64)
    center, radius = perturbation.box(x)
    with torch.no_grad():
        interval = dict(
            zip(
                engine._activation_indices,
                engine.activation_interval_bounds(x, perturbation),
                strict=True,
            )
        )
    segments = engine.affine_segments(tuple(x.shape[1:]))
    milp = MarginMilp(
        [(w.detach().numpy(), b.detach().numpy()) for w, b in segments],
        wide=engine.segments_are_wide,
    )
    with torch.no_grad():
        reference = net(x).argmax(1)
    return net, engine, center, radius, interval, milp, reference


def _activation_inputs(net: nn.Module, points: torch.Tensor) -> list[torch.Tensor]:
    seen = []
    hooks = [
        m.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach()))
        for m in net.modules()
        if isinstance(m, nn.ReLU)
    ]
    with torch.no_grad():
        net(points)
    for hook in hooks:
        hook.remove()
    return seen


NETWORKS = {
    "mlp": lambda: make_mlp(4, [10, 10, 8], 3, seed=3, weight_scale=1.4),
    "batchnorm-mlp": lambda: make_mlp(5, [8, 8], 4, seed=5, batchnorm=True),
    "residual": lambda: make_residual_mlp(4, 6, 2, 3, seed=1, weight_scale=1.3),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_refined_bounds_hold_at_sampled_points_and_are_tighter(name):
    torch.manual_seed(0)
    x = torch.rand(1, 4 if name != "batchnorm-mlp" else 5, dtype=torch.float64)
    net, engine, center, radius, interval, milp, reference = _setup(NETWORKS[name](), x, 0.25)
    with torch.no_grad():
        crown = engine.bound_subdomains(center, radius, interval, reference)
    refined = refine_bounds(
        engine, milp, center, radius, interval, reference, deadline=float("inf")
    )
    assert refined.complete
    points = center + (torch.rand(4000, *center.shape[1:], dtype=torch.float64) * 2 - 1) * radius
    corners = center + torch.sign(torch.randn(500, *center.shape[1:], dtype=torch.float64)) * radius
    points = torch.cat([points, corners])
    tighter = 0.0
    for index, seen in zip(
        engine._activation_indices, _activation_inputs(net, points), strict=True
    ):
        lower, upper = refined.bounds[index]
        assert (seen >= lower - 1e-9).all() and (seen <= upper + 1e-9).all()
        crown_lower, crown_upper = crown.bounds[index]
        assert (lower >= crown_lower - 1e-12).all() and (upper <= crown_upper + 1e-12).all()
        tighter += float((upper - lower).sum() - (crown_upper - crown_lower).sum())
    assert tighter < 0  # these nets are deep enough for the LP to gain somewhere
    with torch.no_grad():
        logits = net(points)
    sampled = logits[:, reference] - logits
    finite = torch.isfinite(refined.margins)
    assert (sampled.min(0).values[finite] >= refined.margins[finite] - 1e-9).all()
    assert (refined.margins[finite] >= crown.margins[0][finite] - 1e-9).all()


def _neuron_head(net: nn.Sequential, layer: int, neuron: int) -> nn.Sequential:
    """The network up to the input of ReLU ``layer``, with a head whose class 0 is that neuron
    and class 1 is 0 (so margins give its minimum and maximum)."""
    relus = [position for position, module in enumerate(net) if isinstance(module, nn.ReLU)]
    prefix = copy.deepcopy(net[: relus[layer]])
    width = [m for m in prefix if isinstance(m, nn.Linear)][-1].out_features
    head = nn.Linear(width, 2).double()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[0, neuron] = 1.0
    return nn.Sequential(*prefix, head).eval()


def test_refined_bounds_never_exceed_the_exact_optimum():
    net = make_mlp(3, [6, 6, 5], 3, seed=7, weight_scale=1.5)
    x = torch.tensor([[0.4, 0.6, 0.5]], dtype=torch.float64)
    eps = 0.3
    net, engine, center, radius, interval, milp, reference = _setup(net, x, eps)
    refined = refine_bounds(
        engine, milp, center, radius, interval, reference, deadline=float("inf")
    )
    for layer, index in enumerate(engine._activation_indices):
        lower, upper = (b[0].numpy() for b in refined.bounds[index])
        for neuron in range(lower.size):
            head = _neuron_head(net, layer, neuron)
            low = exact_min_margins(head, x.numpy(), np.array([0]), eps)[0].optimum[1]
            high = -exact_min_margins(head, x.numpy(), np.array([1]), eps)[0].optimum[0]
            assert lower[neuron] <= low + 1e-7
            assert upper[neuron] >= high - 1e-7
    exact = exact_min_margins(net, x.numpy(), reference.numpy(), eps)[0].optimum
    finite = np.isfinite(refined.margins.numpy())
    assert np.all(refined.margins.numpy()[finite] <= exact[finite] + 1e-7)


def test_the_dual_bound_holds_for_any_multipliers():
    rng = np.random.default_rng(0)
    n_rows, n_vars = 12, 7
    matrix = rng.normal(size=(n_rows, n_vars))
    point = rng.uniform(-1, 1, n_vars)  # a feasible point
    values = matrix @ point
    row_lower = np.where(rng.random(n_rows) < 0.5, values - rng.uniform(0, 1, n_rows), -np.inf)
    row_upper = np.where(
        np.isinf(row_lower) | (rng.random(n_rows) < 0.5), values + rng.uniform(0, 1, n_rows), np.inf
    )
    var_lower, var_upper = np.full(n_vars, -1.0), np.full(n_vars, 1.0)
    cost = rng.normal(size=n_vars)
    finite_upper = np.isfinite(row_upper)
    finite_lower = np.isfinite(row_lower)
    optimum = linprog(
        cost,
        A_ub=np.vstack([matrix[finite_upper], -matrix[finite_lower]]),
        b_ub=np.concatenate([row_upper[finite_upper], -row_lower[finite_lower]]),
        bounds=list(zip(var_lower, var_upper, strict=True)),
        method="highs",
    ).fun
    sparse = csr_matrix(matrix)
    for _ in range(200):
        duals = rng.normal(size=n_rows) * rng.choice([0.0, 0.1, 1.0, 10.0])
        bound = _dual_bound(cost, duals, sparse, row_lower, row_upper, var_lower, var_upper)
        assert bound <= optimum + 1e-9


def test_the_refine_stage_tightens_margins_and_agrees_with_the_milp():
    net = make_mlp(6, [16, 16, 16], 3, seed=1, weight_scale=1.3).eval()
    x = torch.rand(8, 6, generator=torch.Generator().manual_seed(2))
    eps = 0.15
    crown = certify(net, x, eps, method="crown")
    refined = certify(net, x, eps, method=("crown", "refine"))
    complete = certify(net, x, eps, method="complete", timeout=30)
    exact = certify(net, x, eps, method=("crown", "milp"), timeout=30)
    finite = np.isfinite(refined.margins)
    gain = refined.margins[finite] - crown.margins[finite]
    assert gain.min() >= -1e-5 and gain.max() > 1e-3
    # Nothing the refinement certifies is falsified by the exact MILP, and the complete
    # cascade (refinement included) decides every sample as the MILP alone does.
    assert not np.any(refined.certified & (exact.status == "falsified"))
    assert set(exact.status) <= {"certified", "falsified"}
    np.testing.assert_array_equal(complete.status, exact.status)
