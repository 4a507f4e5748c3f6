"""Residual networks: the engine walks graphs with skip connections soundly and exactly.

Networks are :class:`~certdistill.bounds.layers.GraphNetwork` (what ONNX files with skip
connections load as) and ``torch.fx``-traceable modules written with ``+``. Every bound method is
checked against sampled and attacked points, and against the exact optimum of the independent
MILP oracle of ``tests/milp.py``, which lowers the graph on its own; complete verification must
agree with that oracle on every sample.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from milp import exact_min_margins
from networks import (
    TracedResidualNet,
    make_random_residual_network,
    make_residual_cnn,
    make_residual_mlp,
    random_inputs,
)
from torch import nn
from witnesses import assert_below, reference_of, sampled_min_margins

from certdistill import UnsupportedLayerError, certify
from certdistill.bounds import Perturbation, engine_for
from certdistill.bounds.layers import Add, GraphNetwork
from certdistill.verify.attacks import min_margin_attack

METHODS = ["ibp", "crown-ibp", "crown", "alpha-crown"]

NETWORKS = {
    "mlp": lambda: (make_residual_mlp(5, 8, 2, 3, seed=1, weight_scale=1.4), (5,)),
    "mlp-bn-input-skip": lambda: (
        make_residual_mlp(6, 6, 1, 4, seed=2, batchnorm=True, input_skip=True),
        (6,),
    ),
    "cnn": lambda: (make_residual_cnn((2, 6, 6), 3, 3, seed=3), (2, 6, 6)),
    "cnn-downsample": lambda: (
        make_residual_cnn((1, 7, 7), 2, 3, seed=4, downsample=True),
        (1, 7, 7),
    ),
    "traced": lambda: (TracedResidualNet(seed=5).eval(), (5,)),
}


@pytest.fixture(scope="module", params=sorted(NETWORKS))
def network(request):
    return NETWORKS[request.param]()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("domain", [False, True], ids=["no-domain", "unit-domain"])
def test_sampled_points_never_beat_the_bound(network, method, domain):
    net, shape = network
    rng = np.random.default_rng(7)
    x = random_inputs(rng, 4, shape, unit=domain)
    kw = dict(lower=0.0, upper=1.0) if domain else {}
    eps = 0.15 if len(shape) == 1 else 0.05
    cert = certify(net, x, eps, method=method, **kw)
    np.testing.assert_array_equal(cert.prediction, reference_of(net, x))
    witness = sampled_min_margins(net, x, cert.prediction, eps, **kw)
    assert_below(cert.margins, witness, what=f"sampled margin ({method})")


def test_attack_never_beats_the_bound(network):
    net, shape = network
    rng = np.random.default_rng(8)
    x = torch.as_tensor(random_inputs(rng, 4, shape), dtype=torch.float32)
    eps = 0.2 if len(shape) == 1 else 0.08
    ref = torch.as_tensor(reference_of(net, x.numpy()))
    perturbation = Perturbation.create(eps, shape)
    attacked = min_margin_attack(net, x, ref, perturbation, steps=30, restarts=2).numpy()
    for method in METHODS:
        cert = certify(net, x.numpy(), eps, method=method)
        assert_below(cert.margins, attacked, what=f"attacked margin ({method})")


def test_tighter_methods_are_tighter(network):
    net, shape = network
    x = random_inputs(np.random.default_rng(9), 5, shape)
    eps = 0.1 if len(shape) == 1 else 0.04
    margins = {m: certify(net, x, eps, method=m).margins for m in METHODS}
    finite = np.isfinite(margins["ibp"])
    assert (margins["alpha-crown"][finite] >= margins["crown"][finite] - 1e-5).all()


def _tiny_cases(count: int = 8):
    rng = np.random.default_rng(2025)
    cases = []
    for i in range(count):
        net, shape, _ = make_random_residual_network(rng, max_relus=24, dtype=torch.float64)
        cases.append(pytest.param(net, shape, id=f"tiny{i}-{'mlp' if len(shape) == 1 else 'cnn'}"))
    return cases


@pytest.mark.parametrize(("net", "shape"), _tiny_cases())
def test_milp_optimum_is_never_below_the_bound(net, shape):
    rng = np.random.default_rng(16)
    x = random_inputs(rng, 3, shape).astype(np.float64)
    eps = 0.3 if len(shape) == 1 else 0.15
    ref = reference_of(net, x)
    exact = exact_min_margins(net, x, ref, eps)
    optimum = np.stack([r.optimum for r in exact])
    witness = np.stack([r.witness_margin for r in exact])
    np.testing.assert_allclose(optimum, witness, atol=1e-6)
    for method in METHODS:
        bounds = certify(net, x, eps, method=method).margins
        assert_below(bounds, witness, atol=1e-6, rtol=0, what=f"MILP optimum ({method})")


@pytest.mark.parametrize(("net", "shape"), _tiny_cases())
@pytest.mark.parametrize(
    "stages",
    ["complete", ("ibp", "milp"), ("crown", "attack", "bab")],
    ids=["complete", "milp", "bab"],
)
def test_complete_verification_agrees_with_the_milp_oracle(net, shape, stages):
    rng = np.random.default_rng(17)
    x = random_inputs(rng, 6, shape).astype(np.float64)
    ref = reference_of(net, x)
    for eps in (0.05, 0.3) if len(shape) == 1 else (0.03, 0.15):
        exact = exact_min_margins(net, x, ref, eps)
        worst = np.array([np.min(np.delete(r.optimum, k)) for r, k in zip(exact, ref, strict=True)])
        cert = certify(net, x, eps, method=stages, y=ref, timeout=20)
        decided = cert.status != "unknown"
        if stages != ("crown", "attack", "bab"):
            assert decided.all(), (eps, cert.status)
        clear = np.abs(worst) > 1e-6  # the oracle's optimum is not within its tolerance of 0
        np.testing.assert_array_equal(cert.certified[decided & clear], (worst > 0)[decided & clear])
        falsified = cert.status == "falsified"
        if falsified.any():
            with torch.no_grad():
                logits = net(torch.as_tensor(cert.counterexample[falsified])).numpy()
            assert (logits.argmax(1) != ref[falsified]).all()
            lo, hi = x[falsified] - eps, x[falsified] + eps
            assert (cert.counterexample[falsified] >= lo - 1e-12).all()
            assert (cert.counterexample[falsified] <= hi + 1e-12).all()


def test_traced_module_bounds_equal_its_graph_twin():
    net = TracedResidualNet(seed=11).eval()
    twin = net.as_graph()
    x = random_inputs(np.random.default_rng(12), 6, (5,))
    for method in METHODS:
        a = certify(net, x, 0.1, method=method).margins
        b = certify(twin, x, 0.1, method=method).margins
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert not engine_for(net).graph.is_chain


def test_a_chain_as_graph_network_bounds_like_the_sequential():
    torch.manual_seed(0)
    layers = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)]
    sequential = nn.Sequential(*layers).eval()
    graph = GraphNetwork(layers, [(-1,), (0,), (1,), (2,), (3,)]).eval()
    x = random_inputs(np.random.default_rng(1), 5, (4,))
    for method in METHODS:
        np.testing.assert_allclose(
            certify(graph, x, 0.1, method=method).margins,
            certify(sequential, x, 0.1, method=method).margins,
            rtol=1e-6,
            atol=1e-6,
        )


def test_skip_connections_keep_crown_tighter_than_intervals():
    """x + W x: intervals add the two boxes, the backward pass keeps their correlation."""
    torch.manual_seed(3)
    net = GraphNetwork(
        [nn.Linear(4, 4), Add(), nn.ReLU(), nn.Linear(4, 2)], [(-1,), (0, -1), (1,), (2,)]
    ).eval()
    x = random_inputs(np.random.default_rng(2), 8, (4,))
    ibp = certify(net, x, 0.2, method="ibp").margins
    crown = certify(net, x, 0.2, method="crown").margins
    finite = np.isfinite(ibp)
    assert (crown[finite] >= ibp[finite] - 1e-6).all()
    assert (crown[finite] > ibp[finite] + 1e-4).any()


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.linear(x)
        return -self.linear(x)


class _Sigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return torch.sigmoid(self.linear(x))


class _ConstantShift(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x) + 1.0


class _TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x), x


@pytest.mark.parametrize(
    ("module", "pattern"),
    [
        (_Untraceable(), r"_Untraceable is neither an nn.Sequential .* nor a torch.fx-traceable"),
        (_Sigmoid(), r"_Sigmoid: call_function <built-in method sigmoid.* is not supported"),
        (_ConstantShift(), r"only the sum of two computed tensors"),
        (_TwoOutputs(), r"the output must be the last computed tensor"),
        (
            GraphNetwork([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)], [(-1,), (0,), (0,)]),
            r"compute outputs that nothing reads",
        ),
        (nn.Sequential(nn.Linear(4, 4), Add()), r"takes 2 inputs, it is given 1"),
    ],
)
def test_graphs_the_engine_refuses(module, pattern):
    with pytest.raises(UnsupportedLayerError, match=pattern):
        certify(module, np.zeros((2, 4)), 0.1)


def test_graph_network_validates_its_edges():
    with pytest.raises(ValueError, match="every input must be an earlier layer"):
        GraphNetwork([nn.Linear(4, 4), nn.ReLU()], [(-1,), (1,)])
    with pytest.raises(ValueError, match="one input list per layer"):
        GraphNetwork([nn.Linear(4, 4)], [(-1,), (0,)])


def test_estimators_fit_and_certify_residual_modules():
    from sklearn.datasets import load_digits

    from certdistill import CertifiedTeacher, DistilledStudent

    X, y = load_digits(return_X_y=True)
    X, y = (X[:300] / 16).astype(np.float32), y[:300]
    teacher = CertifiedTeacher(
        module=TracedResidualNet(d_in=64, width=32, n_classes=10),
        eps=0.05,
        max_epochs=10,
        random_state=0,
    ).fit(X, y)
    assert teacher.score(X, y) > 0.2  # certified training through the skip connection learns
    cert = teacher.certify(X[:20], method="crown")
    witness = sampled_min_margins(
        teacher.module_, X[:20], cert.prediction, 0.05, lower=teacher.lower, upper=teacher.upper
    )
    assert_below(cert.margins, witness, what="sampled margin (fitted residual teacher)")
    student = DistilledStudent(
        teacher,
        module=make_residual_mlp(64, 16, 1, 10, seed=0),
        max_epochs=2,
        random_state=0,
        transfer_size=0.0,
    ).fit(X, y)
    assert student.certify(X[:10], method="crown-ibp").margins.shape == (10, 10)
