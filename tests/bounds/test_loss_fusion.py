"""Loss fusion: the CROWN-IBP bound of the worst-case cross-entropy by one backward row.

It is a training loss, not a certificate, but it is still claimed to be an upper bound of the
worst-case cross-entropy over the ball, so it is tested like the certificates: never below the
cross-entropy at sampled points, at points found by an attack, or at the exact minimisers of
every margin (MILP witnesses); equal to IBP's loss at ``mix = 0``; and the chord of ``exp``
above ``exp`` wherever it is used.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from milp import exact_min_margins
from networks import around, make_cnn, make_mlp

from certdistill.bounds import BoundEngine
from certdistill.bounds import method_steps as method_steps_module
from certdistill.bounds.training_passes import exp_chord
from certdistill.estimators.losses import worst_case_logits

EPS = (0.02, 0.1, 0.3)


def _networks():
    return {
        "mlp": (make_mlp(6, (12, 10), 5, seed=1, dtype=torch.float64), (6,)),
        "mlp-bn": (make_mlp(6, (12, 10), 5, seed=2, batchnorm=True, dtype=torch.float64), (6,)),
        "cnn": (make_cnn((1, 6, 6), (3,), 4, seed=3, dtype=torch.float64), (1, 6, 6)),
    }


def _pass(net, x, y, eps):
    engine = BoundEngine(net)
    return engine, engine.interval_pass(x, around(x, eps, 0.0, 1.0), y, keep_state=True)


def _worst_seen(net, x, y, eps, *, samples=300, steps=30, seed=0) -> torch.Tensor:
    """Largest cross-entropy per sample at random points and after PGD on the cross-entropy."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    worst = torch.full((len(x),), -torch.inf, dtype=x.dtype)
    with torch.no_grad():
        for _ in range(samples):
            point = lo + (hi - lo) * torch.rand(x.shape, generator=gen, dtype=x.dtype)
            worst = torch.maximum(worst, F.cross_entropy(net(point), y, reduction="none"))
    point = (lo + hi) / 2
    for _ in range(steps):
        point = point.detach().requires_grad_(True)
        loss = F.cross_entropy(net(point), y, reduction="none")
        worst = torch.maximum(worst, loss.detach())
        (grad,) = torch.autograd.grad(loss.sum(), point)
        point = torch.minimum(torch.maximum(point + 0.25 * eps * grad.sign(), lo), hi)
    with torch.no_grad():
        return torch.maximum(worst, F.cross_entropy(net(point), y, reduction="none"))


@pytest.mark.parametrize("width", [0.0, 1e-9, 1e-5, 1e-3, 0.5, 5.0, 80.0, 1e4])
@pytest.mark.parametrize("high", [0.0, -3.0, -200.0])
def test_the_chord_of_exp_lies_above_exp_on_its_interval(width, high):
    high = torch.tensor([high], dtype=torch.float64)
    low = high - width
    slope, intercept = exp_chord(low, high)
    assert torch.isfinite(slope).all() and torch.isfinite(intercept).all()
    t = low + (high - low) * torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert torch.all(slope * t + intercept >= t.exp() - 1e-15 * (1 + t.exp()))
    # It is the chord (not just any line above): it meets exp at the upper end.
    torch.testing.assert_close(slope * high + intercept, high.exp())


@pytest.mark.parametrize("name", ["mlp", "mlp-bn", "cnn"])
@pytest.mark.parametrize("eps", EPS)
def test_mix_zero_is_the_cross_entropy_of_ibp_worst_case_logits(name, eps):
    net, shape = _networks()[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((12, *shape), generator=gen, dtype=torch.float64)
    y = torch.randint(0, net(x).shape[1], (12,), generator=gen)
    engine, interval_pass = _pass(net, x, y, eps)
    expected = F.cross_entropy(worst_case_logits(interval_pass.margins), y, reduction="none")
    torch.testing.assert_close(
        engine.crown_ibp_cross_entropy(interval_pass, mix=0.0), expected, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("name", ["mlp", "mlp-bn", "cnn"])
@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("mix", [0.5, 1.0])
def test_the_fused_bound_is_never_below_the_cross_entropy_inside_the_ball(name, eps, mix):
    net, shape = _networks()[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((10, *shape), generator=gen, dtype=torch.float64)
    y = torch.randint(0, net(x).shape[1], (10,), generator=gen)
    engine, interval_pass = _pass(net, x, y, eps)
    with torch.no_grad():
        bound = engine.crown_ibp_cross_entropy(interval_pass, mix=mix)
    assert torch.isfinite(bound).all()
    worst = _worst_seen(net, x, y, eps)
    assert torch.all(bound >= worst - 1e-9), (bound - worst).min()


@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_the_fused_bound_is_above_the_cross_entropy_at_every_exact_margin_minimiser(eps):
    net = make_mlp(4, (6, 5), 3, seed=4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand((6, 4), generator=gen, dtype=torch.float64)
    y = net(x).argmax(1)
    engine, interval_pass = _pass(net, x, y, eps)
    with torch.no_grad():
        bound = engine.crown_ibp_cross_entropy(interval_pass)
    results = exact_min_margins(net, x.numpy(), y.numpy(), eps, lower=0.0, upper=1.0)
    for i, result in enumerate(results):
        witnesses = torch.as_tensor(result.witness, dtype=torch.float64)
        with torch.no_grad():
            loss = F.cross_entropy(net(witnesses), y[i].expand(len(witnesses)), reduction="none")
        assert float(bound[i]) >= float(loss.max()) - 1e-9


def test_the_fused_bound_is_close_to_the_per_margin_crown_ibp_loss():
    """Both bound the same quantity; the fused one trades a little tightness for one row."""
    net, shape = _networks()["mlp"]
    gen = torch.Generator().manual_seed(3)
    x = torch.rand((32, *shape), generator=gen, dtype=torch.float64)
    y = net(x).argmax(1)
    engine, interval_pass = _pass(net, x, y, 0.1)
    with torch.no_grad():
        fused = engine.crown_ibp_cross_entropy(interval_pass)
        margins = engine.crown_ibp_margins(interval_pass)
        per_margin = F.cross_entropy(worst_case_logits(margins), y, reduction="none")
        ibp = engine.crown_ibp_cross_entropy(interval_pass, mix=0.0)
    assert float(fused.mean()) < float(ibp.mean())
    assert float(fused.mean()) < 1.1 * float(per_margin.mean())


def test_both_tail_paths_give_the_same_margin_bounds(monkeypatch):
    net, shape = _networks()["cnn"]
    x = torch.rand((8, *shape), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(5))
    engine, interval_pass = _pass(net, x, y, 0.1)
    pairwise = engine._tail_margin_bounds(interval_pass._state, y)
    monkeypatch.setattr(method_steps_module, "PAIRWISE_ELEMENT_BUDGET", 0)
    by_rows = engine._tail_margin_bounds(interval_pass._state, y)
    for a, b in zip(pairwise, by_rows, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.all(pairwise[0] <= pairwise[1])


def test_the_fused_loss_trains_every_parameter_in_train_mode():
    net = make_mlp(6, (12, 10), 5, seed=6, batchnorm=True, dropout=True).train()
    x = torch.rand((16, 6), generator=torch.Generator().manual_seed(6))
    y = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(7))
    engine, interval_pass = _pass(net, x, y, 0.1)
    engine.crown_ibp_cross_entropy(interval_pass, mix=0.7).mean().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_a_pass_without_kept_state_is_refused():
    net, shape = _networks()["mlp"]
    x = torch.rand((4, *shape), dtype=torch.float64)
    engine = BoundEngine(net)
    interval_pass = engine.interval_pass(x, around(x, 0.1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="keep_state=True"):
        engine.crown_ibp_cross_entropy(interval_pass)


def test_large_radii_stay_finite():
    net, shape = _networks()["mlp"]
    x = torch.rand((8, *shape), dtype=torch.float64) * 0 + 0.5
    engine = BoundEngine(net)
    interval_pass = engine.interval_pass(
        x, around(x, 50.0), torch.zeros(8, dtype=torch.long), keep_state=True
    )
    bound = engine.crown_ibp_cross_entropy(interval_pass)
    assert torch.isfinite(bound).all() and np.all(bound.detach().numpy() > 0)
