"""The in-place arithmetic of the certification paths (no autograd graph) gives exactly the bounds
of the out-of-place arithmetic that training uses, and never writes into what it does not own.

Without gradients the box, the ReLU interval step, the ReLU backward step and the concretisation
work on their own temporaries in place (fewer new tensors, fewer page faults); with gradients
they do not. Both must agree bit for bit, on chains and on graphs whose nodes are read twice
(a residual ``Add``), and the caller's inputs, the perturbation and the module must be left as
they were. Soundness of the bounds themselves is held by test_bounds_soundness.py,
test_residual.py and test_fuzz_soundness.py, which run the in-place paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from networks import around, make_cnn, make_mlp, make_residual_cnn, make_residual_mlp
from torch import nn

from certdistill import certify
from certdistill.bounds import engine_for
from certdistill.bounds.layers import Add, GraphNetwork


def _pre_activation_skip() -> GraphNetwork:
    """``head(relu(z) + z)`` with ``z = stem(x)``: the ReLU's input is read a second time."""
    torch.manual_seed(7)
    return GraphNetwork(
        [nn.Linear(6, 8), nn.ReLU(), Add(), nn.Linear(8, 3)], [(-1,), (0,), (1, 0), (2,)]
    )


def _relu_first() -> nn.Sequential:
    """A ReLU on the network input itself (the caller's tensor)."""
    torch.manual_seed(8)
    return nn.Sequential(nn.ReLU(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


METHODS = ("ibp", "crown-ibp", "crown")

NETWORKS = {
    "mlp": (lambda: make_mlp(6, (8, 8), 3, seed=1), (6,)),
    "mlp-batchnorm": (lambda: make_mlp(6, (8, 8), 3, seed=2, batchnorm=True), (6,)),
    "cnn": (lambda: make_cnn((2, 6, 6), (3, 4), 3, seed=3, batchnorm=False), (2, 6, 6)),
    "residual-mlp": (lambda: make_residual_mlp(8, 8, 2, 3, seed=4, input_skip=True), (8,)),
    "residual-cnn": (lambda: make_residual_cnn((2, 6, 6), 3, 3, seed=5), (2, 6, 6)),
    "pre-activation-skip": (_pre_activation_skip, (6,)),
    "relu-first": (_relu_first, (6,)),
}


def _bounds(engine, x, perturbation, method, *, graph: bool):
    context = torch.enable_grad() if graph else torch.no_grad()
    with context:
        result = engine.bound(x, perturbation, method=method)
    return result.logits.detach(), result.margins.detach()


@pytest.mark.parametrize("domain", [None, (0.0, 1.0)], ids=["no-domain", "unit-domain"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_in_place_and_graph_paths_give_the_same_bounds(name, method, domain):
    build, shape = NETWORKS[name]
    module = build().eval()
    x = torch.randn(7, *shape, generator=torch.Generator().manual_seed(0))
    if domain is not None:
        x = x.sigmoid()
    lower, upper = domain or (None, None)
    perturbation = around(x, 0.05, lower, upper)
    engine = engine_for(module)
    assert any(p.requires_grad for p in module.parameters())  # the graph path is taken
    logits_graph, margins_graph = _bounds(engine, x, perturbation, method, graph=True)
    x_before = x.clone()
    weights_before = [p.detach().clone() for p in module.parameters()]
    logits, margins = _bounds(engine, x, perturbation, method, graph=False)
    assert torch.equal(logits, logits_graph)
    assert torch.equal(margins, margins_graph)
    assert torch.equal(x, x_before)
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), weights_before, strict=True))
    # The perturbation's tensors are untouched: the same call again gives the same bounds.
    assert torch.equal(_bounds(engine, x, perturbation, method, graph=False)[1], margins)


def test_the_box_does_not_write_into_its_input_or_domain():
    x = torch.rand(5, 4)
    perturbation = around(x, 0.3, 0.0, 1.0)
    before = (
        x.clone(),
        perturbation.eps.clone(),
        perturbation.lower.clone(),
        perturbation.upper.clone(),
    )
    with torch.no_grad():
        center, radius = perturbation.box(x)
    lo = torch.clamp(x - 0.3, min=0.0)
    hi = torch.clamp(x + 0.3, max=1.0)
    assert torch.equal(center, (hi + lo) / 2) and torch.equal(radius, (hi - lo) / 2)
    after = (x, perturbation.eps, perturbation.lower, perturbation.upper)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert center.data_ptr() != x.data_ptr() and radius.data_ptr() != x.data_ptr()


def test_certify_leaves_x_as_it_was():
    module = make_cnn((2, 6, 6), (3, 4), 3, seed=6, batchnorm=False).eval()
    X = np.random.default_rng(0).random((9, 2, 6, 6)).astype(np.float32)
    X_tensor = torch.from_numpy(X.copy())
    before = X.copy()
    for method in (*METHODS, "complete"):
        certify(module, X, 0.1, method=method, lower=0.0, upper=1.0)
        certify(module, X_tensor, 0.1, method=method, lower=0.0, upper=1.0)
    np.testing.assert_array_equal(X, before)
    np.testing.assert_array_equal(X_tensor.numpy(), before)
