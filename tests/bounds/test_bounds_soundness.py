"""Soundness of the bound engine against independent witnesses.

A certified margin is a *lower* bound of ``z_ref - z_j`` over the ball, so it
must never exceed the margin of any point of the ball. Three independent
sources of such points are used, none sharing code with the engine:

* sampling: random points and box corners, evaluated by a float64 copy;
* attacks: targeted PGD (:func:`certdistill.verify.attacks.min_margin_attack`);
* exactness: the MILP oracle of ``tests/milp.py`` on tiny networks.

Tolerances: float32 modules are checked with ``1e-5`` relative + absolute slack
(the engine rounds in float32, witnesses are evaluated in float64); float64
modules, used for the MILP comparisons, with ``1e-6`` absolute.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from milp import exact_min_margins
from milp import feasible_box as box
from networks import (
    around,
    float64_copy,
    make_cnn,
    make_linear_net,
    make_mlp,
    make_random_network,
    random_inputs,
    randomize_batchnorm,
)
from torch import nn
from witnesses import (
    ATOL,
    assert_below,
    logits64,
    reference_of,
    sampled_min_margins,
)

from certdistill import UnsupportedLayerError, certified_radius, certify
from certdistill.bounds import margin_lower_bounds
from certdistill.verify.attacks import min_margin_attack

METHODS = ["ibp", "crown-ibp", "crown", "alpha-crown"]


# ---------------------------------------------------------------------- the networks

NETWORKS = {
    "mlp": lambda: (make_mlp(6, [12, 10], 4, seed=1, weight_scale=1.5), (6,)),
    "mlp-bn-dropout-nested": lambda: (
        make_mlp(5, [8, 8, 6], 3, seed=2, batchnorm=True, dropout=True, identity=True, nested=True),
        (5,),
    ),
    "mlp-2d-inputs": lambda: (make_mlp(3, [16], 2, seed=3, weight_scale=2.0), (3,)),
    "cnn-bn-avgpool": lambda: (make_cnn((2, 6, 6), (4, 3), 3, seed=4), (2, 6, 6)),
    "cnn-stride2-nested-dropout": lambda: (
        make_cnn(
            (3, 7, 7), (4,), 5, seed=5, stride=2, padding=1, hidden=6, dropout=True, nested=True
        ),
        (3, 7, 7),
    ),
    "cnn-overlapping-padded-pool": lambda: (
        make_cnn(
            (2, 6, 6),
            (3,),
            3,
            seed=8,
            avgpool={"kernel_size": 3, "stride": 2, "padding": 1, "count_include_pad": False},
        ),
        (2, 6, 6),
    ),
    "cnn-bn-without-affine": lambda: (
        make_cnn(
            (2, 5, 5),
            (3,),
            3,
            seed=9,
            bn_affine=False,
            avgpool={"kernel_size": 2, "ceil_mode": True},
        ),
        (2, 5, 5),
    ),
    "cnn-k1-no-pool": lambda: (
        make_cnn((1, 5, 5), (2, 2), 3, seed=6, kernel_size=1, padding=0, avgpool=False),
        (1, 5, 5),
    ),
}


@pytest.fixture(scope="module", params=sorted(NETWORKS))
def network(request):
    net, shape = NETWORKS[request.param]()
    return net, shape


# ------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("domain", [False, True], ids=["no-domain", "unit-domain"])
def test_sampled_points_never_beat_the_bound(network, method, domain):
    net, shape = network
    rng = np.random.default_rng(11)
    x = random_inputs(rng, 4, shape, unit=domain)
    kw = dict(lower=0.0, upper=1.0) if domain else {}
    eps = 0.15 if len(shape) == 1 else 0.05
    cert = certify(net, x, eps, method=method, **kw)
    ref = cert.prediction
    np.testing.assert_array_equal(ref, reference_of(net, x))
    witness = sampled_min_margins(net, x, ref, eps, **kw)
    assert_below(cert.margins, witness, what="sampled margin")
    np.testing.assert_array_equal(cert.certified, (cert.margins > 0).all(axis=1))


@pytest.mark.parametrize("method", METHODS)
def test_per_feature_eps_and_domain_arrays(network, method):
    net, shape = network
    rng = np.random.default_rng(12)
    x = random_inputs(rng, 3, shape, unit=True)
    eps = (0.2 if len(shape) == 1 else 0.08) * rng.random(shape)
    eps.flat[0] = 0.0  # a frozen feature
    lower = np.zeros(shape)
    upper = np.ones(shape)
    upper.flat[-1] = x.reshape(3, -1)[:, -1].max()  # a tight upper edge on one feature
    cert = certify(net, x, eps, method=method, lower=lower, upper=upper)
    witness = sampled_min_margins(net, x, cert.prediction, eps, lower=lower, upper=upper)
    assert_below(cert.margins, witness, what="sampled margin")


@pytest.mark.parametrize("method", METHODS)
def test_per_channel_eps_on_a_cnn(method):
    net = make_cnn((3, 5, 5), (3,), 4, seed=7)
    rng = np.random.default_rng(13)
    x = random_inputs(rng, 3, (3, 5, 5))
    eps = np.array([0.1, 0.0, 0.03]).reshape(3, 1, 1)
    cert = certify(net, torch.from_numpy(x), eps, method=method)
    witness = sampled_min_margins(net, x, cert.prediction, eps)
    assert_below(cert.margins, witness, what="sampled margin")


# -------------------------------------------------------------------------- attacks


@pytest.mark.parametrize("domain", [False, True], ids=["no-domain", "unit-domain"])
def test_attack_never_beats_the_bound(network, domain):
    net, shape = network
    rng = np.random.default_rng(14)
    x = random_inputs(rng, 4, shape, unit=domain)
    kw = dict(lower=0.0, upper=1.0) if domain else {}
    eps = 0.15 if len(shape) == 1 else 0.05
    attacked = min_margin_attack(
        float64_copy(net),
        x,
        reference_of(net, x),
        eps,
        steps=30,
        restarts=3,
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).numpy()
    for method in METHODS:
        cert = certify(net, x, eps, method=method, **kw)
        assert_below(cert.margins, attacked, what=f"attacked margin ({method})")


# ------------------------------------------------------------------------ exactness


def _tiny_cases():
    rng = np.random.default_rng(2024)
    cases = []
    for i in range(8):
        net, shape, _ = make_random_network(
            rng, kind="mlp" if i % 2 else "cnn", max_relus=28, dtype=torch.float64
        )
        cases.append(pytest.param(net, shape, id=f"tiny{i}-{'mlp' if i % 2 else 'cnn'}"))
    return cases


@pytest.mark.parametrize(("net", "shape"), _tiny_cases())
@pytest.mark.parametrize("domain", [False, True], ids=["no-domain", "unit-domain"])
def test_milp_optimum_is_never_below_the_bound(net, shape, domain):
    rng = np.random.default_rng(15)
    x = random_inputs(rng, 3, shape, unit=domain).astype(np.float64)
    kw = dict(lower=0.0, upper=1.0) if domain else {}
    eps = 0.3 if len(shape) == 1 else 0.15
    ref = reference_of(net, x)
    exact = exact_min_margins(net, x, ref, eps, **kw)
    optimum = np.stack([r.optimum for r in exact])
    witness = np.stack([r.witness_margin for r in exact])
    # The oracle itself: its optimum is attained (up to solver tolerance) by its witness.
    np.testing.assert_allclose(optimum, witness, atol=1e-6)
    bounds = {}
    for method in METHODS:
        bounds[method] = certify(net, x, eps, method=method, **kw).margins
        assert_below(bounds[method], witness, atol=1e-6, rtol=0, what=f"MILP optimum ({method})")
    finite = np.isfinite(witness)
    assert (bounds["alpha-crown"][finite] >= bounds["crown"][finite] - 1e-6).all()


@pytest.mark.parametrize(("net", "shape"), _tiny_cases()[:4])
@pytest.mark.parametrize("method", METHODS)
def test_bounds_are_exact_at_zero_eps(net, shape, method):
    # At eps = 0 the ball is a point: every method must give the clean margins.
    rng = np.random.default_rng(16)
    x = random_inputs(rng, 3, shape).astype(np.float64)
    ref = reference_of(net, x)
    cert0 = certify(net, x, 0.0, method=method)
    z = logits64(net, x)
    clean = z[np.arange(3), ref][:, None] - z
    clean[np.arange(3), ref] = np.inf
    np.testing.assert_allclose(cert0.margins, clean, atol=1e-9, rtol=1e-9)


def stable_relu_net(x: np.ndarray, eps: float, widths, n_classes: int, seed: int):
    """A float64 MLP whose every ReLU is stable (always on or always off) on the balls around
    ``x``, even according to interval bounds, so the network is affine there.

    Returns the network (Linear-BatchNorm-ReLU-Dropout blocks, nested) and the affine map
    ``(M, m)`` it computes on the balls, ``f(v) = M v + m``.
    """
    rng = np.random.default_rng(seed)
    lo, hi = x - eps, x + eps
    M, m = np.eye(x.shape[1]), np.zeros(x.shape[1])
    blocks = []
    for width in widths:
        linear = nn.Linear(M.shape[0], width).double()
        bn = nn.BatchNorm1d(width).double().eval()
        w = rng.standard_normal((width, M.shape[0])) / np.sqrt(M.shape[0])
        scale = rng.uniform(0.5, 1.5, width) * rng.choice([-1.0, 1.0], width, p=[0.2, 0.8])
        mean, var = rng.normal(0, 0.5, width), rng.uniform(0.5, 2.0, width)
        s = scale / np.sqrt(var + bn.eps)
        # interval of the BatchNorm output without its shift; the shift then places the interval
        # clear of zero: above for the units chosen active, below for the others
        center = ((lo + hi) / 2 @ w.T - mean) * s
        radius = ((hi - lo) / 2 @ np.abs(w).T) * np.abs(s)
        active = rng.random(width) < 0.75
        shift = np.where(active, 0.5 - (center - radius).min(0), -0.5 - (center + radius).max(0))
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w))
            linear.bias.zero_()
            bn.running_mean.copy_(torch.from_numpy(mean))
            bn.running_var.copy_(torch.from_numpy(var))
            bn.weight.copy_(torch.from_numpy(scale))
            bn.bias.copy_(torch.from_numpy(shift))
        lo = np.maximum(center + shift - radius, 0.0)
        hi = np.maximum(center + shift + radius, 0.0)
        gate = active.astype(np.float64)[:, None]
        M, m = gate * (s[:, None] * w @ M), gate[:, 0] * (s * (w @ m - mean) + shift)
        blocks.append(nn.Sequential(linear, bn, nn.ReLU(), nn.Dropout(0.3)))
    head = nn.Linear(M.shape[0], n_classes).double()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(rng.standard_normal((n_classes, M.shape[0]))))
        head.bias.copy_(torch.from_numpy(rng.standard_normal(n_classes)))
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    return nn.Sequential(*blocks, head).eval(), (w @ M, w @ m + b)


@pytest.mark.parametrize("seed", range(4))
def test_linear_relaxations_are_exact_where_the_net_is_affine_and_ibp_is_not(seed):
    # Every ReLU is stable on the ball, so the margin is affine there and its minimum has the
    # closed form c.x0 + d - |c|.eps. The linear relaxations (CROWN-IBP, CROWN, alpha-CROWN)
    # lose nothing on a stable ReLU and must attain it; IBP, which bounds |W2||W1| instead of
    # |W2 W1|, must be strictly looser: a test IBP-quality bounds cannot pass.
    rng = np.random.default_rng(100 + seed)
    x = rng.standard_normal((4, 5))
    eps = 0.15
    net, (M, m) = stable_relu_net(x, eps, (8, 6), 4, seed)
    z = x @ M.T + m
    np.testing.assert_allclose(logits64(net, x), z, rtol=1e-10, atol=1e-10)  # the affine map
    ref = z.argmax(1)
    c = M[ref][:, None, :] - M[None]  # (n, C, d)
    exact = (c * x[:, None]).sum(2) + (m[ref][:, None] - m) - eps * np.abs(c).sum(2)
    exact[np.arange(4), ref] = np.inf
    finite = np.isfinite(exact)
    # the closed form is attained: the corner x0 - eps sign(c) of the ball reaches it
    corner = x[:, None] - eps * np.sign(c)
    zc = logits64(net, corner.reshape(-1, 5)).reshape(4, 4, 4)
    attained = (
        np.take_along_axis(zc, ref[:, None, None].repeat(4, 1), 2)[..., 0]
        - zc[:, np.arange(4), np.arange(4)]
    )
    np.testing.assert_allclose(attained[finite], exact[finite], rtol=1e-9, atol=1e-9)
    for method in ("crown-ibp", "crown", "alpha-crown"):
        margins = certify(net, x, eps, method=method).margins
        np.testing.assert_allclose(margins, exact, rtol=1e-9, atol=1e-9, err_msg=method)
    ibp = certify(net, x, eps, method="ibp").margins
    assert_below(ibp, exact, atol=1e-9, rtol=0, what="exact optimum (ibp)")
    assert np.all(ibp[finite] < exact[finite] - 1e-3), (exact - ibp)[finite].min()


def test_milp_oracle_matches_brute_force():
    # Check the oracle on a case small enough to grid-search: 2 inputs, 14 ReLUs.
    net = make_mlp(2, [8, 6], 3, seed=1, batchnorm=True, weight_scale=1.5, dtype=torch.float64)
    x = np.array([[0.1, -0.3]])
    eps = 0.5
    res = exact_min_margins(net, x, np.array([0]), eps)[0]
    g = np.linspace(-eps, eps, 401)
    grid = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2) + x[0]
    z = logits64(net, grid)
    brute = (z[:, [0]] - z).min(0)
    assert (res.optimum[1:] <= brute[1:] + 1e-9).all()
    # The grid spacing bounds how far the grid can be above the optimum.
    np.testing.assert_allclose(res.optimum[1:], brute[1:], atol=0.05)
    np.testing.assert_allclose(res.optimum[1:], res.witness_margin[1:], atol=1e-9)


@pytest.mark.parametrize("kind", ["single", "mlp", "cnn"])
@pytest.mark.parametrize("method", METHODS)
def test_all_linear_net_is_exact(kind, method):
    # Without ReLUs the margin is affine: min over the box is c.x0 + d - |c|.eps in closed form.
    net, shape = make_linear_net(kind, seed=3, dtype=torch.float64)
    rng = np.random.default_rng(17)
    x = random_inputs(rng, 5, shape, unit=True).astype(np.float64)
    eps = 0.1 * (1 + rng.random(shape))
    lo, hi = box(x, eps, 0.0, 1.0)
    d = int(np.prod(shape))
    with torch.no_grad():
        b = net(torch.zeros((1, *shape), dtype=torch.float64)).numpy()[0]
        w = (net(torch.eye(d, dtype=torch.float64).reshape(d, *shape)).numpy() - b).T  # (C, d)
    ref = reference_of(net, x)
    c = w[ref][:, None, :] - w[None]  # (n, C, d)
    mid, rad = ((lo + hi) / 2).reshape(5, -1), ((hi - lo) / 2).reshape(5, -1)
    exact = (c * mid[:, None]).sum(2) + b[ref][:, None] - b - (np.abs(c) * rad[:, None]).sum(2)
    exact[np.arange(5), ref] = np.inf
    margins = certify(net, x, eps, method=method, lower=0.0, upper=1.0).margins
    assert_below(margins, exact, atol=1e-9, rtol=1e-9, what="exact linear optimum")
    # For IBP this needs the specification folded into the trailing affine layers (plain
    # interval arithmetic through two affine layers gives |W2||W1| instead of |W2 W1|).
    np.testing.assert_allclose(margins, exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "layers",
    [
        lambda: [nn.BatchNorm2d(2), nn.AvgPool2d(2), nn.Flatten(), nn.ReLU(), nn.Linear(8, 3)],
        lambda: [nn.AvgPool2d(2), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)],
        lambda: [nn.Flatten(), nn.BatchNorm1d(32), nn.ReLU(), nn.Identity(), nn.Linear(32, 3)],
    ],
    ids=["bn-pool-relu", "pool-bn-relu", "bn1d-relu"],
)
def test_ibp_is_exact_when_every_layer_before_the_last_keeps_boxes_exact(layers):
    # Element-wise maps and non-overlapping pooling send a box onto a box, and the last
    # Linear (with the margin folded in) is exact on a box, so IBP must equal the MILP
    # optimum here. This checks the interval rules of BatchNorm, AvgPool2d and ReLU, which
    # IBP's looseness hides elsewhere.
    torch.manual_seed(33)
    net = nn.Sequential(*layers()).double()
    randomize_batchnorm(net, torch.Generator().manual_seed(1)).eval()
    x = random_inputs(np.random.default_rng(34), 3, (2, 4, 4)).astype(np.float64)
    ref = reference_of(net, x)
    for kw in ({}, {"lower": -0.5, "upper": 0.8}):
        xx = np.clip(x, kw.get("lower"), kw.get("upper"))
        exact = np.stack([r.witness_margin for r in exact_min_margins(net, xx, ref, 0.4, **kw)])
        margins = certify(net, xx, 0.4, method="ibp", y=ref, **kw).margins
        np.testing.assert_allclose(margins, exact, atol=1e-6, rtol=0)


# ------------------------------------------------------------ hypothesis: tiny nets vs MILP
# (random architectures against sampled points and PGD: tests/bounds/test_fuzz_soundness.py)


@settings(max_examples=60, deadline=20_000)
@given(st.integers(0, 2**16), st.booleans(), st.floats(0.01, 0.4))
def test_property_tiny_nets_against_milp(seed, domain, eps):
    rng = np.random.default_rng(seed)
    net, shape, _ = make_random_network(rng, max_relus=20, dtype=torch.float64)
    x = random_inputs(rng, 2, shape, unit=domain).astype(np.float64)
    kw = dict(lower=0.0, upper=1.0) if domain else {}
    ref = reference_of(net, x)
    witness = np.stack([r.witness_margin for r in exact_min_margins(net, x, ref, eps, **kw)])
    crown = None
    for method in METHODS:
        margins = certify(net, x, eps, method=method, **kw).margins
        assert_below(margins, witness, atol=1e-6, rtol=0, what=f"MILP optimum ({method})")
        if method == "crown":
            crown = margins
        if method == "alpha-crown":
            finite = np.isfinite(witness)
            assert (margins[finite] >= crown[finite] - 1e-6).all()


# --------------------------------------------------- margin_lower_bounds in train mode


def _batch_stat_copy(net: nn.Module, x: torch.Tensor) -> nn.Module:
    """Eval-mode float64 copy whose BatchNorm running stats are the clean batch's statistics.

    In train mode BatchNorm normalises with the batch mean and the *biased* batch
    variance, so this copy computes, for every input, the function the bounds
    of a train-mode module are about.
    """
    probe = copy.deepcopy(net).double().train()
    stats = {}

    def hook(name):
        def fn(module, inputs, _out):
            v = inputs[0].detach().double()
            dims = [0] if v.dim() == 2 else [0, 2, 3]
            stats[name] = (v.mean(dims), v.var(dims, unbiased=False))

        return fn

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in probe.named_modules()
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)
    ]
    with torch.no_grad():
        probe(x.double())
    for h in handles:
        h.remove()
    frozen = copy.deepcopy(net).double().eval()
    with torch.no_grad():
        for name, m in frozen.named_modules():
            if name in stats:
                m.running_mean.copy_(stats[name][0])
                m.running_var.copy_(stats[name][1])
    return frozen


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: (make_mlp(5, [8, 6], 3, seed=21, batchnorm=True, nested=True), (5,)),
        lambda: (make_cnn((2, 5, 5), (3, 2), 3, seed=22), (2, 5, 5)),
    ],
    ids=["mlp-bn", "cnn-bn"],
)
def test_margin_lower_bounds_train_mode_uses_clean_batch_statistics(make, method):
    net, shape = make()
    net.train()
    rng = np.random.default_rng(23)
    x = torch.from_numpy(random_inputs(rng, 16, shape))
    frozen = _batch_stat_copy(net, x)
    with torch.no_grad():
        # Oracle sanity: the frozen copy reproduces the train-mode forward on the clean batch.
        torch.testing.assert_close(
            frozen(x.double()), copy.deepcopy(net).double()(x.double()), atol=1e-9, rtol=1e-9
        )
        ref = frozen(x.double()).argmax(1)
    eps = 0.05
    bounds = margin_lower_bounds(net, x, eps, ref, method=method)
    assert bounds.shape == (16, 3)
    assert all(m.training for m in net.modules())  # the mode is the caller's business
    witness = sampled_min_margins(frozen, x.numpy(), ref.numpy(), eps, n_random=200)
    assert_below(bounds.detach().numpy(), witness, what="batch-statistics margin")

    # The bounds depend on the batch statistics, not on the (random) running statistics.
    eval_bounds = margin_lower_bounds(copy.deepcopy(net).eval(), x, eps, ref, method=method)
    finite = torch.isfinite(bounds)
    assert not torch.allclose(bounds[finite], eval_bounds[finite])

    # Differentiable: gradients reach every parameter.
    net.zero_grad(set_to_none=True)
    bounds[finite].sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_margin_lower_bounds_in_eval_mode_matches_certify(network, method):
    net, shape = network
    rng = np.random.default_rng(24)
    x = random_inputs(rng, 5, shape)
    cert = certify(net, x, 0.05, method=method)
    got = margin_lower_bounds(
        net, torch.from_numpy(x), 0.05, torch.from_numpy(cert.prediction).long(), method=method
    )
    np.testing.assert_allclose(got.detach().numpy(), cert.margins, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ certified radius


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("domain", [False, True], ids=["no-domain", "unit-domain"])
def test_certified_radius_is_certified_maximal_and_in_range(network, method, domain):
    net, shape = network
    rng = np.random.default_rng(25)
    # Some random nets predict one class on the whole unit box (radius max_eps there); without
    # a domain a large max_eps leaves every net a finite radius to check for maximality.
    n, max_eps, tol = 6, (0.5 if domain else 4.0), 1e-3
    x = random_inputs(rng, n, shape, unit=True)
    domain_kw = dict(lower=0.0, upper=1.0) if domain else {}
    kw = dict(method=method, **domain_kw)
    radius = certified_radius(net, x, max_eps=max_eps, tol=tol, **kw)
    assert radius.shape == (n,)
    assert ((radius >= 0) & (radius <= max_eps)).all()
    assert (radius > 0).any()
    if not domain:
        assert (radius < max_eps).all()  # the maximality check below has work to do
    for i in range(n):
        row = x[i : i + 1]
        cert = certify(net, row, float(radius[i]), **kw)
        assert cert.certified[0] == (radius[i] > 0), (i, radius[i])
        # Near-maximal: a little above the radius the method no longer certifies (bisection
        # leaves the true radius of the method within tol above the returned one).
        if radius[i] < max_eps:
            above = certify(net, row, float(radius[i]) + 2 * tol, **kw)
            assert not above.certified[0], (i, radius[i])
        if radius[i] > 0:
            # Soundness of the radius: an attack at that radius finds no counterexample.
            attacked = min_margin_attack(
                float64_copy(net),
                row,
                cert.prediction,
                float(radius[i]),
                steps=20,
                restarts=2,
                generator=torch.Generator().manual_seed(0),
                **domain_kw,
            )
            assert (attacked.numpy() > -ATOL).all()


def test_certified_radius_edge_cases():
    # Logits independent of the input: certified at every radius, so radius == max_eps.
    net = make_mlp(3, [4], 3, seed=26)
    with torch.no_grad():
        net[-1].weight.zero_()
        net[-1].bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    x = random_inputs(np.random.default_rng(0), 4, (3,))
    for method in METHODS:
        r = certified_radius(net, x, method=method, max_eps=0.7, tol=1e-3)
        np.testing.assert_allclose(r, 0.7, atol=1e-3)
        # A wrong label has a negative clean margin: nothing is certified.
        r = certified_radius(net, x, method=method, y=np.full(4, 2), max_eps=0.7)
        np.testing.assert_array_equal(r, 0.0)


# ------------------------------------------------------- unusual but valid layer configs


class _DoubledReLU(nn.ReLU):
    """A ReLU subclass whose forward is *not* a ReLU: must not be bounded as one."""

    def forward(self, x):
        return 2.0 * super().forward(x) - 0.5


def _conv_net(**conv) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 3, 3, **conv), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))


#: Unusual but supported configurations: bounded soundly.
UNUSUAL = {
    "conv-padding-same": lambda: _conv_net(padding="same"),
    "conv-asymmetric": lambda: nn.Sequential(
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(18, 3),
    ),
    "relu-inplace": lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(32, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)
    ),
    "flatten-first": lambda: nn.Sequential(
        nn.Flatten(), nn.BatchNorm1d(32), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 3)
    ),
}

#: Configurations the engine must reject, and a pattern naming the offending layer.
REJECTED = {
    "conv-padding-reflect": (
        lambda: _conv_net(padding=1, padding_mode="reflect"),
        r"Conv2d\(2, 3.*padding_mode=reflect",
    ),
    "conv-padding-circular": (
        lambda: _conv_net(padding=1, padding_mode="circular"),
        r"Conv2d\(2, 3.*padding_mode=circular",
    ),
    "conv-padding-same-even-kernel": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 2, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)
        ),
        r"Conv2d\(2, 3, kernel_size=\(2, 2\).*padding='same' with an even kernel",
    ),
    "conv-dilation": (lambda: _conv_net(padding=2, dilation=2), r"Conv2d\(2, 3.*dilation"),
    "relu-subclass": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(32, 8), _DoubledReLU(), nn.Linear(8, 3)),
        r"Layer '2' \(_DoubledReLU\(\)\) is not supported",
    ),
}


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_supported_layers_are_sound(name):
    torch.manual_seed(31)
    net = UNUSUAL[name]()
    randomize_batchnorm(net, torch.Generator().manual_seed(0)).eval()
    x = random_inputs(np.random.default_rng(32), 3, (2, 4, 4))
    for method in METHODS:
        cert = certify(net, x, 0.1, method=method)
        witness = sampled_min_margins(net, x, cert.prediction, 0.1)
        assert_below(cert.margins, witness, what=f"sampled margin ({method})")


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_unsupported_layer_configurations_are_rejected(name):
    # Silently wrong bounds are the one outcome that is not acceptable: these must be refused,
    # by every method, with a message that names the layer.
    make, pattern = REJECTED[name]
    torch.manual_seed(31)
    net = make().eval()
    x = random_inputs(np.random.default_rng(32), 3, (2, 4, 4))
    with torch.no_grad():
        net(torch.from_numpy(x))  # the network itself runs: only the engine refuses it
    for method in METHODS:
        with pytest.raises(UnsupportedLayerError, match=pattern):
            certify(net, x, 0.1, method=method)
        with pytest.raises(UnsupportedLayerError, match=pattern):
            certified_radius(net, x, method=method)


# --------------------------------------------------------------- state and gradients


def test_certify_restores_modes_buffers_and_leaves_no_grads():
    net = make_cnn((2, 5, 5), (3,), 3, seed=27, dropout=True, nested=True)
    net.train()
    net[0].eval()  # mixed: one nested block in eval mode, the rest training
    modes = {name: m.training for name, m in net.named_modules()}
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    x = random_inputs(np.random.default_rng(28), 4, (2, 5, 5))
    results = []
    with torch.enable_grad():
        for method in METHODS:
            results.append(certify(net, x, 0.02, method=method))
            assert {name: m.training for name, m in net.named_modules()} == modes, method
            for name, b in net.named_buffers():
                torch.testing.assert_close(b, buffers[name], rtol=0, atol=0)
            assert all(p.grad is None for p in net.parameters()), method
    # certify evaluates in eval mode: same result as the module put in eval mode.
    eval_net = copy.deepcopy(net).eval()
    for method, cert in zip(METHODS, results, strict=True):
        again = certify(eval_net, x, 0.02, method=method)
        np.testing.assert_allclose(cert.margins, again.margins, rtol=1e-6, atol=1e-6)
        assert isinstance(cert.margins, np.ndarray) and isinstance(cert.certified, np.ndarray)


@pytest.mark.parametrize("method", METHODS)
def test_certify_is_invariant_to_batching_and_input_type(method):
    net = make_mlp(4, [8, 8], 3, seed=29, batchnorm=True)
    x = random_inputs(np.random.default_rng(30), 11, (4,))
    y = np.arange(11) % 3
    full = certify(net, x, 0.1, method=method, y=y)
    np.testing.assert_array_equal(full.prediction, y)
    assert full.margins.shape == (11, 3)
    assert np.isposinf(full.margins[np.arange(11), y]).all()
    small = certify(
        net, torch.from_numpy(x), 0.1, method=method, y=torch.from_numpy(y), batch_size=3
    )
    np.testing.assert_allclose(small.margins, full.margins, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(small.certified, full.certified)


def test_engine_follows_in_place_weight_updates_under_no_grad():
    """A reused engine must not keep bounds of weights that changed since its last call."""
    from certdistill.bounds import BoundEngine

    torch.manual_seed(3)
    module = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)).eval()
    x = torch.rand(5, 1, 4, 4)
    reference = torch.zeros(5, dtype=torch.long)
    engine = BoundEngine(module)
    with torch.no_grad():
        engine.margin_lower_bounds(x, around(x, 0.1), reference, method="ibp")
        module[0].weight.mul_(-2.0)
        module[3].weight.add_(0.5)
        reused = engine.margin_lower_bounds(x, around(x, 0.1), reference, method="ibp")
        fresh = BoundEngine(module).margin_lower_bounds(x, around(x, 0.1), reference, method="ibp")
    torch.testing.assert_close(reused, fresh)


# ------------------------------------------------------------------- a box per sample
def _boxes(rng: np.random.Generator, x: np.ndarray, width: float):
    """Boxes of random, uneven widths around each sample, the sample inside but off-centre."""
    below = width * rng.random(x.shape)
    above = width * rng.random(x.shape)
    return x - below, x + above


@pytest.mark.parametrize("method", METHODS)
def test_a_box_per_sample_is_bounded_soundly(network, method):
    net, shape = network
    rng = np.random.default_rng(21)
    x = random_inputs(rng, 4, shape)
    lower, upper = _boxes(rng, x, 0.2 if len(shape) == 1 else 0.08)
    cert = certify(net, x, None, lower=lower, upper=upper, method=method)
    witness = sampled_min_margins(net, x, cert.prediction, 1e3, lower=lower, upper=upper)
    assert_below(cert.margins, witness, what=f"sampled margin in the box ({method})")
    # The same boxes as a ball intersected with per-sample domains give the same bounds.
    wide = certify(net, x, 1e3, lower=lower, upper=upper, method=method)
    np.testing.assert_allclose(wide.margins, cert.margins, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("net", "shape"), _tiny_cases()[:4])
def test_a_box_per_sample_against_the_milp(net, shape):
    rng = np.random.default_rng(22)
    x = random_inputs(rng, 3, shape).astype(np.float64)
    lower, upper = _boxes(rng, x, 0.4 if len(shape) == 1 else 0.2)
    ref = reference_of(net, x)
    exact = exact_min_margins(net, x, ref, 1e3, lower=lower, upper=upper)
    witness = np.stack([r.witness_margin for r in exact])
    for method in METHODS:
        bounds = certify(net, x, None, lower=lower, upper=upper, method=method, y=ref).margins
        assert_below(bounds, witness, atol=1e-6, rtol=0, what=f"MILP optimum ({method})")
    complete = certify(net, x, None, lower=lower, upper=upper, method="complete", y=ref)
    optimum = np.stack([np.min(np.delete(r.optimum, k)) for r, k in zip(exact, ref, strict=True)])
    decided = complete.status != "unknown"
    np.testing.assert_array_equal(complete.certified[decided], (optimum > 0)[decided])
    assert decided.all()


def test_box_corners_are_rounded_outwards():
    """float64 corners that float32 cannot hold are widened, never narrowed."""
    from certdistill.bounds import Perturbation

    lower = np.array([[0.1, -0.3]])
    upper = np.array([[0.2, 1 / 3]])
    box = Perturbation.from_boxes(lower, upper, (2,))
    assert (box.lower.double().numpy() <= lower).all()
    assert (box.upper.double().numpy() >= upper).all()
    assert (box.lower.double().numpy() > lower - 1e-7).all()
