"""Default networks, IBP initialisation, the fused IBP training pass, losses and schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from networks import around
from torch import nn

from certdistill.bounds import BoundEngine, Perturbation
from certdistill.estimators.losses import certified_loss, shi_regularizer, worst_case_logits
from certdistill.estimators.models import ibp_init_, make_cnn, make_mlp
from certdistill.estimators.schedules import (
    AlphaSchedule,
    BetaSchedule,
    DistillWeightSchedule,
    EpsSchedule,
    KappaSchedule,
    LinearSchedule,
    TemperatureSchedule,
)

SUPPORTED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d)


# ----------------------------------------------------------------------------- builders
def test_mlp_structure():
    net = make_mlp(30, 3, (64, 32))
    kinds = [type(m) for m in net]
    assert kinds == [
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
        nn.Linear,
    ]
    assert net(torch.zeros(5, 30)).shape == (5, 3)
    assert [type(m) for m in make_mlp(4, 2, (8,), batch_norm=False)] == [
        nn.Linear,
        nn.ReLU,
        nn.Linear,
    ]


def test_cnn_structure_digits():
    net = make_cnn((1, 8, 8), 10)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [32, 64]
    assert convs[1].stride == (2, 2)
    assert [lin.out_features for lin in linears] == [256, 10]
    assert linears[0].in_features == 64 * 4 * 4
    assert all(isinstance(m, SUPPORTED) for m in net)
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_cnn_downsamples_large_images():
    net = make_cnn((3, 28, 28), 4)
    out = net(torch.zeros(2, 3, 28, 28))
    assert out.shape == (2, 4)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and convs[0].stride == (2, 2)  # 28 -> 14 -> 7, no full-res layer
    small = [m for m in make_cnn((1, 8, 8), 4) if isinstance(m, nn.Conv2d)]
    assert small[0].stride == (1, 1) and small[0].kernel_size == (3, 3)  # 8x8 keeps it


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(input_shape=(8, 8)),
        dict(input_shape=(1, 8, 8), channels=()),
        dict(input_shape=(1, 8, 8), hidden_sizes=(0,)),
        dict(input_shape=(1, 1, 1), channels=(4, 4)),
    ],
)
def test_cnn_rejects_bad_arguments(kwargs):
    shape = kwargs.pop("input_shape")
    with pytest.raises(ValueError):
        make_cnn(shape, 2, **kwargs)


def test_unknown_init_rejected():
    with pytest.raises(ValueError, match="init"):
        make_mlp(3, 2, (4,), init="xavier")


def test_ibp_init_statistics():
    torch.manual_seed(0)
    net = make_mlp(400, 10, (300,))
    first = net[0]
    assert torch.all(first.bias == 0)
    expected = math.sqrt(2 * math.pi) / 400
    assert first.weight.std().item() == pytest.approx(expected, rel=0.02)
    conv = make_cnn((2, 8, 8), 3)[0]
    fan_in = 2 * 3 * 3
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 * math.pi) / fan_in, rel=0.2)
    bn = net[1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_ibp_init_keeps_interval_width():
    """The point of the IBP initialisation (Shi et al. 2021): E|w| = 2 / fan_in, so an affine
    layer doubles the mean interval radius and the following ReLU halves it back (in
    expectation), whatever the width, so bounds neither explode nor vanish with depth."""
    torch.manual_seed(0)
    for width in (64, 512):
        layer = ibp_init_(nn.Linear(width, width))
        radius = torch.full((8, width), 0.1)
        ratio = F.linear(radius, layer.weight.abs()).mean().item() / 0.1
        assert ratio == pytest.approx(2.0, rel=0.1)


# ----------------------------------------------------------------------------- training pass
def _random_batch(shape, n=16, n_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.randint(0, n_classes, (n,), generator=g)


@pytest.mark.parametrize("training", [False, True])
def test_default_networks_run_through_the_training_pass(training):
    """The default networks use only layers the engine's training pass supports."""
    for net, shape in (
        (make_mlp(12, 5, (16, 16)), (12,)),
        (make_cnn((1, 8, 8), 5, channels=(4, 6), hidden_sizes=(12,)), (1, 8, 8)),
    ):
        net.train(training)
        x, y = _random_batch(shape)
        out = BoundEngine(net).interval_pass(
            x, around(x, 0.05, 0.0, 1.0), y, record_activations=True
        )
        with torch.no_grad():
            torch.testing.assert_close(out.logits, net(x), rtol=1e-4, atol=1e-5)
        loss = certified_loss(out.logits, worst_case_logits(out.margins), y) + shi_regularizer(
            out.activation_bounds, out.input_radius
        )
        loss.backward()
        assert len(out.activation_bounds) == sum(isinstance(m, nn.ReLU) for m in net)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# ----------------------------------------------------------------------------- losses
def test_certified_loss_formula():
    margins = torch.tensor([[math.inf, 1.0, -0.5], [2.0, math.inf, 3.0]])
    target = torch.tensor([0, 1])
    zhat = worst_case_logits(margins)
    torch.testing.assert_close(zhat, torch.tensor([[0.0, -1.0, 0.5], [-2.0, 0.0, -3.0]]))
    expected = (
        math.log(1 + math.exp(-1.0) + math.exp(0.5)) + math.log(1 + math.exp(-2.0) + math.exp(-3.0))
    ) / 2
    assert certified_loss(
        torch.zeros_like(margins), worst_case_logits(margins), target
    ).item() == pytest.approx(expected, rel=1e-6)


def test_certified_loss_upper_bounds_clean_loss():
    torch.manual_seed(0)
    net = make_mlp(8, 4, (16,)).eval()
    x, y = _random_batch((8,), n=32, n_classes=4)
    out = BoundEngine(net).interval_pass(x, around(x, 0.05), y)
    clean = F.cross_entropy(out.logits, y, reduction="none")
    cert = F.cross_entropy(worst_case_logits(out.margins), y, reduction="none")
    assert torch.all(cert >= clean - 1e-5)


def test_shi_regularizer_zero_without_relus():
    assert shi_regularizer([], torch.ones(2, 3)).item() == 0.0


# ----------------------------------------------------------------------------- schedules
class _FakeNet:
    eps_train = 0.2
    warmup = 0.1
    ramp = 0.5
    kappa_start = 1.0
    kappa_end = 0.0
    device = "cpu"
    perturbation_ = Perturbation.create(0.1, (3,))

    def training_perturbation(self):
        return self.perturbation_.with_eps(self.eps_train)


def test_eps_schedule_shape():
    cb = EpsSchedule()
    cb.resolve(_FakeNet())
    ts = np.linspace(0, 1, 201)
    values = np.array([cb.value_at(t) for t in ts])
    assert np.all(values[ts < 0.1] == 0)
    assert np.all(np.diff(values) >= -1e-12)
    assert values[-1] == pytest.approx(0.2)
    assert np.all(values[ts >= 0.6] == pytest.approx(0.2))
    # continuity of the smooth schedule at the switch from polynomial to linear
    mid = 0.1 + 0.25 * 0.5
    assert cb.value_at(mid - 1e-6) == pytest.approx(cb.value_at(mid + 1e-6), abs=1e-6)
    linear = EpsSchedule(eps=1.0, warmup=0.0, ramp=1.0, shape="linear")
    linear.resolve(_FakeNet())
    assert linear.value_at(0.3) == pytest.approx(0.3)


def test_eps_schedule_rejects_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        EpsSchedule(shape="cubic").resolve(_FakeNet())


def test_linear_schedules():
    kappa = KappaSchedule()
    kappa.resolve(_FakeNet())
    assert kappa.value_at(0.0) == 1.0
    assert kappa.value_at(0.35) == pytest.approx(0.5)
    assert kappa.value_at(0.9) == 0.0
    custom = LinearSchedule("x_", "x", start=2.0, end=4.0, begin=0.0, stop=1.0)
    custom.resolve(_FakeNet())
    assert custom.value_at(0.25) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="window"):
        LinearSchedule("x_", "x", 0, 1, begin=0.8, stop=0.2).resolve(_FakeNet())


# ----------------------------------------------------------------- values at known points
def test_shi_regularizer_values_by_hand():
    tol = 0.5
    # One ReLU layer, input radius 0.1. Tightness: mean radius 2.05 / 4 = 0.5125, so
    # relu(0.5 - 0.1 / 0.5125) / 0.5 = 0.609756. Units: active (c - r > 0) = {0}, inactive
    # (c + r < 0) = {1, 3}. Mean ratio (1.0 / 4) / (2.1 / 4) = 0.476190; with mean(c) = -0.15 the
    # variance ratio is 1.15^2 / (1.85^2 + 0.05^2) = 1.3225 / 3.425 = 0.386131; balance term
    # (0.5 - 0.476190 + 0.5 - 0.386131) / 0.5 = 0.275358.
    layer_a = (torch.tensor([[1.0, -2.0, 0.5, -0.1]]), torch.tensor([[0.5, 0.5, 1.0, 0.05]]))
    r0 = torch.full((1, 2), 0.1)
    assert shi_regularizer([layer_a], r0, tol).item() == pytest.approx(
        0.609756 + 0.275358, abs=1e-5
    )
    # A layer with no inactive unit adds no balance term (its ratios are undefined) and, as
    # tight as the input (0.1 / 0.1 = 1 > tol), no tightness term: the mean halves.
    layer_b = (torch.tensor([[1.0, 2.0]]), torch.tensor([[0.1, 0.1]]))
    assert shi_regularizer([layer_a, layer_b], r0, tol).item() == pytest.approx(
        (0.609756 + 0.275358) / 2, abs=1e-5
    )
    # Ratios above one are folded to 1/q: mean ratio (3 / 2) / (1 / 2) = 3 -> 1/3, variance
    # ratio 4 / 4 = 1; tightness off (1.0 / 0.1 = 10): (0.5 - 1/3) / 0.5.
    layer_c = (torch.tensor([[3.0, -1.0]]), torch.tensor([[0.1, 0.1]]))
    value = shi_regularizer([layer_c], torch.ones(1, 2), tol).item()
    assert value == pytest.approx((0.5 - 1 / 3) / 0.5, abs=1e-6)
    # Balanced, tight layers cost nothing.
    layer_d = (torch.tensor([[1.0, -1.0]]), torch.tensor([[0.1, 0.1]]))
    assert shi_regularizer([layer_d], torch.full((1, 2), 0.1), tol).item() == 0.0


def test_eps_schedule_values():
    # Smooth shape: v(s) = (256/13) s^4 up to s = 1/4, then 1 - (16/13)(1 - s).
    cb = EpsSchedule()
    cb.resolve(_FakeNet())  # eps 0.2, warm-up 0.1, ramp 0.5
    assert cb.value_at(0.05) == 0.0
    assert cb.value_at(0.1 + 0.5 / 8) == pytest.approx(0.2 / 208)  # s = 1/8
    assert cb.value_at(0.1 + 0.5 / 4) == pytest.approx(0.2 / 13)  # s = 1/4
    assert cb.value_at(0.1 + 0.5 / 2) == pytest.approx(0.2 * 5 / 13)  # s = 1/2
    assert cb.value_at(0.6) == pytest.approx(0.2)
    per_feature = EpsSchedule(eps=np.array([0.1, 0.0, 0.3]), warmup=0.0, ramp=1.0, shape="linear")
    per_feature.resolve(_FakeNet())
    np.testing.assert_allclose(per_feature.value_at(0.25), [0.025, 0.0, 0.075], rtol=1e-6)
    assert per_feature.value_at(0.25).dtype == np.float32


class _FakeStudent(_FakeNet):
    beta_start, beta_end = 1.0, 0.2
    alpha = 0.3
    distill_weight, distill_weight_end = 0.8, None
    temperature, temperature_end = 6.0, 2.0


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # window = eps ramp [0.1, 0.6]; values at t = 0, 0.1, 0.35 (middle), 0.475, 0.6, 1
        (BetaSchedule(), [1.0, 1.0, 0.6, 0.4, 0.2, 0.2]),
        (AlphaSchedule(), [0.3] * 6),
        (AlphaSchedule(start=1.0, end=0.0), [1.0, 1.0, 0.5, 0.25, 0.0, 0.0]),
        (DistillWeightSchedule(), [0.8] * 6),
        (TemperatureSchedule(), [6.0, 6.0, 4.0, 3.0, 2.0, 2.0]),
        (KappaSchedule(begin=0.0, stop=1.0), [1.0, 0.9, 0.65, 0.525, 0.4, 0.0]),
    ],
    ids=[
        "beta",
        "alpha-constant",
        "alpha-given",
        "distill-weight-constant",
        "temperature",
        "kappa-own-window",
    ],
)
def test_linear_schedule_values(schedule, expected):
    schedule.resolve(_FakeStudent())
    got = [schedule.value_at(t) for t in (0.0, 0.1, 0.35, 0.475, 0.6, 1.0)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_schedules_in_a_fit_follow_the_optimisation_steps():
    """Batch k of a run of S steps gets the value at progress k / S; the learning rate of epoch
    e is lr * gamma ** (milestones passed)."""
    from sklearn.datasets import load_digits

    from certdistill import CertifiedTeacher

    X, y = load_digits(return_X_y=True)
    X, y = (X[:90] / 16).astype(np.float32), y[:90]
    teacher = CertifiedTeacher(
        eps=0.2,
        eps_train_ratio=1.0,
        warmup=0.25,
        ramp=0.5,
        max_epochs=4,
        batch_size=30,
        lr=0.1,
        lr_milestones=(0.5, 0.75),
        lr_gamma=0.5,
        module__hidden_sizes=(8,),
        random_state=0,
    ).fit(X, y)
    reference = EpsSchedule()
    reference.resolve(teacher)
    kappa = KappaSchedule()
    kappa.resolve(teacher)
    steps = 4 * 3
    eps = [v for e in range(4) for v in teacher.history[e, "batches", :, "eps"]]
    np.testing.assert_allclose(eps, [reference.value_at(k / steps) for k in range(steps)])
    kappas = [v for e in range(4) for v in teacher.history[e, "batches", :, "kappa"]]
    np.testing.assert_allclose(kappas, [kappa.value_at(k / steps) for k in range(steps)])
    assert teacher.history[:, "lr"] == pytest.approx([0.1, 0.1, 0.05, 0.025])
