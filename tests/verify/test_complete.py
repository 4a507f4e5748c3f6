"""Complete verification (``method="complete"``): every sample certified or falsified, in
agreement with the independent MILP oracle of ``tests/milp.py``; counterexamples that really flip
the decision; budgets; errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from milp import exact_min_margins
from networks import float64_copy, make_cnn, make_mlp
from torch import nn

from certdistill import certified_radius, certify
from certdistill.verify.cascade import COMPLETE, CascadeOptions, check_stages
from certdistill.verify.counterexamples import worst_margin

#: The oracle's exact minimum margin decides a sample when it is this far from zero.
ORACLE_TOL = 1e-5


def _oracle(net, x, reference, eps, lower, upper) -> np.ndarray:
    exact = exact_min_margins(
        net, x.numpy().astype(np.float64), reference, eps, lower=lower, upper=upper
    )
    return np.array([result.optimum.min() for result in exact])


def _check_against_oracle(net, x, cert, eps, lower, upper, *, spot_checks: int = 2):
    """Every certified (or unknown) sample and a few falsified ones against the MILP oracle;
    every counterexample against the module itself (a real flip is what the oracle's negative
    minimum means, so a checked counterexample is agreement)."""
    _check_counterexamples(
        net, x, cert, eps, -np.inf if lower is None else lower, np.inf if upper is None else upper
    )
    falsified = np.flatnonzero(cert.status == "falsified")
    rows = np.concatenate([np.flatnonzero(cert.status != "falsified"), falsified[:spot_checks]])
    if not len(rows):
        return
    minimum = _oracle(net, x[torch.as_tensor(rows)], cert.prediction[rows], eps, lower, upper)
    expected = _expected_status(minimum)
    decided = expected != "either"
    assert np.all(cert.status[rows][decided] == expected[decided]), (rows, minimum)


def _expected_status(minimum: np.ndarray) -> np.ndarray:
    return np.where(
        minimum > ORACLE_TOL, "certified", np.where(minimum < -ORACLE_TOL, "falsified", "either")
    )


def _check_counterexamples(net, x, cert, eps, lower, upper):
    falsified = cert.status == "falsified"
    points = torch.as_tensor(cert.counterexample[falsified], dtype=x.dtype)
    assert np.isnan(cert.counterexample[~falsified]).all()
    if not falsified.any():
        return
    centers = x[torch.as_tensor(falsified)]
    eps = torch.as_tensor(eps, dtype=x.dtype)
    lo = torch.clamp(centers - eps, min=lower)
    hi = torch.clamp(centers + eps, max=upper)
    assert torch.all(points >= lo) and torch.all(points <= hi)
    reference = torch.as_tensor(cert.prediction[falsified])
    with torch.no_grad():
        assert torch.all(worst_margin(net(points), reference) < 0)
        assert torch.all(worst_margin(float64_copy(net)(points.double()), reference) < 0)


NETWORKS = {
    "mlp": lambda: (make_mlp(4, [12, 12], 3, seed=1), (4,)),
    "mlp-bn-dropout": lambda: (make_mlp(5, [10, 8], 4, seed=2, batchnorm=True, dropout=True), (5,)),
    "cnn-bn-avgpool": lambda: (make_cnn((1, 6, 6), (3,), 3, seed=1), (1, 6, 6)),
    "cnn-stride2": lambda: (
        make_cnn((2, 6, 6), (3, 4), 3, seed=4, stride=2, avgpool=False, hidden=6),
        (2, 6, 6),
    ),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("eps", [0.05, 0.12])
def test_complete_agrees_with_the_milp_oracle(name, eps):
    net, shape = NETWORKS[name]()
    generator = torch.Generator().manual_seed(7)
    x = torch.rand(16, *shape, generator=generator)
    cert = certify(net, x, eps, method="complete", lower=0.0, upper=1.0, timeout=20.0)
    assert np.all(cert.status != "unknown")
    assert set(cert.decided_by) <= set(COMPLETE)
    _check_against_oracle(net, x, cert, eps, 0.0, 1.0)


def test_complete_with_labels_per_feature_eps_and_no_domain():
    net, shape = NETWORKS["mlp"]()
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(20, *shape, generator=generator)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:4] = (y[:4] + 1) % 3
    eps = torch.tensor([0.02, 0.2, 0.05, 0.1])
    cert = certify(net, x, eps, method="complete", y=y, timeout=20.0)
    assert np.all(cert.status[:4] == "falsified")
    assert np.all(cert.decided_by[:4] == "clean-prediction")
    _check_against_oracle(net, x, cert, eps.numpy(), None, None)


def test_each_search_stage_alone_is_sound():
    """Stopped early, a cascade leaves samples unknown but never contradicts the oracle."""
    net, shape = NETWORKS["cnn-bn-avgpool"]()
    generator = torch.Generator().manual_seed(11)
    x = torch.rand(24, *shape, generator=generator)
    for stages in [("ibp", "attack"), ("ibp", "bab"), ("crown", "milp"), ("attack",)]:
        cert = certify(net, x, 0.1, method=stages, lower=0.0, upper=1.0, timeout=20.0)
        certified = np.flatnonzero(cert.status == "certified")
        if len(certified):
            minimum = _oracle(
                net, x[torch.as_tensor(certified)], cert.prediction[certified], 0.1, 0.0, 1.0
            )
            assert np.all(minimum > -ORACLE_TOL)
        _check_counterexamples(net, x, cert, 0.1, 0.0, 1.0)
    incomplete = certify(net, x, 0.1, method=("ibp", "crown"), lower=0.0, upper=1.0)
    assert set(incomplete.status) <= {"certified", "unknown"}


def test_complete_on_2d_inputs_agrees_with_a_dense_grid():
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    ).eval()
    x = torch.rand(12, 2)
    eps = 0.08
    cert = certify(net, x, eps, method="complete", lower=0.0, upper=1.0, timeout=20.0)
    steps = torch.linspace(-1, 1, 201)
    grid = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), -1).view(-1, 2)
    for i in range(len(x)):
        points = (x[i] + eps * grid).clamp(0, 1)
        with torch.no_grad():
            flips = (
                worst_margin(net(points), torch.full((len(points),), int(cert.prediction[i]))) < 0
            )
        if bool(flips.any()):
            assert cert.status[i] == "falsified", i  # the grid found a flip: never certified
        else:
            # No grid point flips: certified, or a flip region thinner than the grid spacing.
            assert cert.status[i] in ("certified", "falsified")


def test_timeout_and_budget_leave_samples_unknown_never_guessed():
    net, shape = NETWORKS["cnn-stride2"]()
    x = torch.rand(16, *shape, generator=torch.Generator().manual_seed(1))
    quick = certify(net, x, 0.12, method=("ibp", "bab", "milp"), lower=0.0, upper=1.0, timeout=1e-6)
    full = certify(net, x, 0.12, method="complete", lower=0.0, upper=1.0, timeout=20.0)
    decided = quick.status != "unknown"
    assert np.all(quick.status[decided] == full.status[decided])
    budget = certify(net, x, 0.12, method="complete", lower=0.0, upper=1.0, budget=1e-6)
    assert set(budget.status) <= {"certified", "unknown", "falsified"}


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_timeout_is_rejected(bad):
    net, shape = NETWORKS["mlp"]()
    with pytest.raises(ValueError, match="timeout"):
        certify(net, torch.rand(2, *shape), 0.1, method="complete", timeout=bad)


def test_bad_budget_and_methods_are_rejected():
    net, shape = NETWORKS["mlp"]()
    x = torch.rand(2, *shape)
    with pytest.raises(ValueError, match="budget"):
        certify(net, x, 0.1, method="complete", budget=0)
    with pytest.raises(ValueError, match="alone"):
        certify(net, x, 0.1, method=("ibp", "complete"))
    with pytest.raises(ValueError, match="Unknown method"):
        certify(net, x, 0.1, method="exhaustive")
    with pytest.raises(ValueError, match="twice"):
        check_stages(("bab", "bab"))
    assert check_stages("complete") == COMPLETE
    with pytest.raises(ValueError, match="attack_steps"):
        CascadeOptions(attack_steps=0)


def test_non_relu_activations_get_a_clear_message():
    from certdistill.bounds import ActivationOp, register_op
    from certdistill.bounds.ops import OP_REGISTRY, ReLUOp

    class LeakyOp(ActivationOp):  # a stand-in activation registered by a user
        def __init__(self, layer):
            self.layer = layer

        forward, interval, unstable = ReLUOp.forward, ReLUOp.interval, ReLUOp.unstable
        initial_lower_slope, relax = ReLUOp.initial_lower_slope, ReLUOp.relax

    register_op(nn.Hardtanh, LeakyOp)
    try:
        net = nn.Sequential(nn.Linear(3, 4), nn.Hardtanh(), nn.Linear(4, 2)).eval()
        with pytest.raises(ValueError, match="ReLU activations only.*Hardtanh"):
            certify(net, torch.rand(2, 3), 0.1, method="complete")
    finally:
        del OP_REGISTRY[nn.Hardtanh]


def test_certified_radius_by_complete_verification_brackets_the_exact_radius():
    net, shape = NETWORKS["mlp"]()
    x = torch.rand(6, *shape, generator=torch.Generator().manual_seed(2))
    radius = certified_radius(
        net, x, method="complete", lower=0.0, upper=1.0, max_eps=0.4, tol=0.01, timeout=20.0
    )
    crown = certified_radius(net, x, method="crown", lower=0.0, upper=1.0, max_eps=0.4, tol=0.01)
    assert np.all(radius >= crown - 1e-9)  # complete is never below an incomplete method
    with torch.no_grad():
        reference = net(x).argmax(1).numpy()
    for i, r in enumerate(radius):
        if r <= 0 or r >= 0.4:
            continue
        inside = _oracle(net, x[i : i + 1], reference[i : i + 1], r, 0.0, 1.0)[0]
        outside = _oracle(net, x[i : i + 1], reference[i : i + 1], r + 0.01, 0.0, 1.0)[0]
        assert inside > -ORACLE_TOL and outside < ORACLE_TOL


def test_complete_verification_is_exposed_on_the_estimators():
    from sklearn.datasets import load_digits

    from certdistill import CertifiedAccuracy, CertifiedTeacher

    X, y = load_digits(return_X_y=True)
    X, y = X[:200] / 16.0, y[:200]
    net = CertifiedTeacher(
        method="ibp",
        eps=0.1,
        lower=0.0,
        upper=1.0,
        max_epochs=3,
        module__hidden_sizes=(16,),
        random_state=0,
    ).fit(X, y)
    cert = net.certify(X[:60], y=y[:60], method="complete", timeout=20.0)
    assert np.all(cert.status != "unknown")
    incomplete = net.certify(X[:60], y=y[:60])
    assert np.all(cert.certified >= incomplete.certified)
    assert net.certified_accuracy(X[:60], y[:60], method="complete") == pytest.approx(
        cert.certified_fraction
    )
    scorer = CertifiedAccuracy(0.1, method="complete", timeout=20.0)
    assert scorer(net, X[:60], y[:60]) == pytest.approx(cert.certified_fraction)


def test_every_supported_layer_combination_in_tiny_networks():
    """Random tiny networks with BN, AvgPool, Dropout, conv, Identity against the oracle."""
    for seed, (batchnorm, dropout) in enumerate(itertools.product([False, True], repeat=2)):
        net = make_mlp(
            3,
            [6, 6],
            3,
            seed=20 + seed,
            batchnorm=batchnorm,
            dropout=dropout,
            identity=True,
            nested=True,
        )
        x = torch.rand(10, 3, generator=torch.Generator().manual_seed(seed))
        cert = certify(net, x, 0.15, method="complete", lower=0.0, upper=1.0, timeout=20.0)
        assert np.all(cert.status != "unknown")
        _check_against_oracle(net, x, cert, 0.15, 0.0, 1.0)


def test_filtered_smart_branching_picks_free_unstable_neurons_with_the_best_child():
    """FSB's choice is a free unstable ReLU, and its better trial child is bounded at least as
    well as that of BaBSR's choice (the first candidate FSB tries)."""
    from certdistill.bounds import BoundEngine, Perturbation
    from certdistill.verify.bab import _choose_splits

    net, shape = NETWORKS["mlp"]()
    engine = BoundEngine(net.eval())
    generator = torch.Generator().manual_seed(5)
    center = torch.rand(12, *shape, generator=generator)
    radius = torch.full_like(center, 0.15)
    perturbation = Perturbation.create(0.15, shape)
    interval = dict(
        zip(
            engine._activation_indices,
            engine.activation_interval_bounds(center, perturbation),
            strict=True,
        )
    )
    with torch.no_grad():
        reference = net(center).argmax(1)
    root = engine.bound_subdomains(center, radius, interval, reference)
    layers = sorted(root.bounds)
    splits = {
        k: torch.zeros(len(center), lower[0].numel(), dtype=torch.int8)
        for k, (lower, _) in root.bounds.items()
    }
    rows = torch.arange(len(center))
    boxes = (center, radius, reference)

    def better_child(layer, neuron):
        best = torch.full((len(center),), float("-inf"))
        for sign in (1, -1):
            child_bounds, child_splits = {}, {}
            for k in layers:
                lower, upper = (b.flatten(1).clone() for b in root.bounds[k])
                split = splits[k].clone()
                here = rows[layer == k]
                split[here, neuron[here]] = sign
                if sign > 0:
                    lower[here, neuron[here]] = lower[here, neuron[here]].clamp(min=0)
                else:
                    upper[here, neuron[here]] = upper[here, neuron[here]].clamp(max=0)
                child_bounds[k] = (
                    lower.view_as(root.bounds[k][0]),
                    upper.view_as(root.bounds[k][1]),
                )
                child_splits[k] = split.view_as(root.bounds[k][0])
            child = engine.bound_split_subdomains(
                center,
                radius,
                child_bounds,
                child_splits,
                reference,
                closed=root.margins > 0,
                steps=0,
            )
            best = torch.maximum(best, child.margins.min(1).values)
        return best

    babsr = _choose_splits(engine, root, layers, splits, boxes, rows, candidates=1)
    fsb = _choose_splits(engine, root, layers, splits, boxes, rows, candidates=4)
    assert bool((fsb[0] >= 0).any())
    for layer, neuron in (babsr, fsb):
        for row in rows[layer >= 0].tolist():
            assert bool(root.relaxations[int(layer[row])].unstable.flatten(1)[row, neuron[row]])
    has_choice = babsr[0] >= 0
    assert torch.all(better_child(*fsb)[has_choice] >= better_child(*babsr)[has_choice] - 1e-6)
