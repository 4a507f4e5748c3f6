"""The engine's core values: Perturbation, the method table, the op registry, the engine cache,
the cascade of ``certify`` and the single-sweep CROWN-IBP of certified training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from networks import around, float64_copy, make_cnn, make_mlp
from torch import nn

from certdistill import UnsupportedLayerError, certify
from certdistill.bounds import (
    METHOD_TABLE,
    METHODS,
    BoundEngine,
    BoundOp,
    Perturbation,
    check_method,
    engine_for,
    register_op,
    supported_layers_text,
)
from certdistill.bounds.ops import OP_REGISTRY, LinearOp
from certdistill.exceptions import UnsupportedLayerError as ExceptionsUnsupported

# ---------------------------------------------------------------------------- perturbation


def test_perturbation_validates_once_and_gives_the_box():
    p = Perturbation.create(0.1, (2, 3), lower=0.0, upper=1.0)
    assert p.sample_shape == (2, 3) and p.eps_value == pytest.approx(0.1)
    x = torch.tensor([[[0.05, 0.5, 0.95], [0.0, 1.0, 0.3]]])
    lo, hi = p.bounds(x)
    torch.testing.assert_close(lo, torch.tensor([[[0.0, 0.4, 0.85], [0.0, 0.9, 0.2]]]))
    torch.testing.assert_close(hi, torch.tensor([[[0.15, 0.6, 1.0], [0.1, 1.0, 0.4]]]))
    center, radius = p.box(x)
    torch.testing.assert_close(center - radius, lo)
    torch.testing.assert_close(center + radius, hi)


def test_flat_per_feature_values_are_reshaped_to_the_sample():
    eps = np.arange(6, dtype=np.float32) / 100
    p = Perturbation.create(eps, (1, 2, 3), upper=np.ones(6))
    assert tuple(p.eps.shape) == (1, 2, 3) and tuple(p.upper.shape) == (1, 2, 3)
    flat = p.reshaped((6,))
    torch.testing.assert_close(flat.eps, torch.as_tensor(eps))
    assert flat.reshaped((1, 2, 3)).eps.shape == (1, 2, 3)


@pytest.mark.parametrize(
    "eps, match",
    [
        (-0.1, "non-negative"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (np.ones(5), "broadcast"),
        ("a", "numeric"),
        (np.ones((2, 2, 3)), "broadcast"),
    ],
)
def test_bad_eps_names_the_problem(eps, match):
    with pytest.raises(ValueError, match=match):
        Perturbation.create(eps, (2, 3))


def test_bad_domain_names_the_problem():
    with pytest.raises(ValueError, match="lower must not exceed upper"):
        Perturbation.create(0.1, (3,), lower=1.0, upper=0.0)
    with pytest.raises(ValueError, match="lower contains NaN"):
        Perturbation.create(0.1, (3,), lower=np.array([0.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match="upper of shape"):
        Perturbation.create(0.1, (3,), upper=np.ones(4))
    with pytest.raises(TypeError, match="already a Perturbation"):
        Perturbation.create(Perturbation.create(0.1, (3,)), (3,))


def test_derived_perturbations():
    p = Perturbation.create(0.2, (3,), lower=0.0)
    assert p.scaled(0.5).eps_value == pytest.approx(0.1)
    assert p.with_eps(0.3).eps_value == pytest.approx(0.3)
    with pytest.raises(ValueError, match="non-negative"):
        p.with_eps(-1.0)
    radii = p.with_sample_radii(torch.tensor([0.0, 0.5]))
    assert radii.per_sample and radii.for_rows(torch.tensor([1])).eps.item() == 0.5
    x = torch.full((2, 3), 0.5)
    lo, hi = radii.bounds(x)
    torch.testing.assert_close(hi - lo, torch.tensor([[0.0] * 3, [1.0] * 3]))
    assert p.outside_domain(torch.tensor([[-0.1, 0.0, 0.0]])) is not None
    assert p.outside_domain(torch.zeros(1, 3)) is None


def test_certify_accepts_a_perturbation():
    net = make_mlp(4, [6], 3, seed=0)
    x = torch.rand(5, 4)
    p = Perturbation.create(0.05, (4,), lower=0.0, upper=1.0)
    from_value = certify(net, x, p, method="crown")
    from_numbers = certify(net, x, 0.05, method="crown", lower=0.0, upper=1.0)
    np.testing.assert_array_equal(from_value.margins, from_numbers.margins)
    with pytest.raises(ValueError, match="inside the Perturbation"):
        certify(net, x, p, lower=0.0)
    with pytest.raises(ValueError, match="samples of shape"):
        certify(net, x, Perturbation.create(0.05, (2, 2)))


# ---------------------------------------------------------------------------- methods


def test_one_method_table():
    assert METHODS == tuple(METHOD_TABLE) == ("ibp", "crown-ibp", "crown", "alpha-crown")
    assert {m for m in METHODS if METHOD_TABLE[m].trainable} == {"ibp", "crown-ibp"}
    assert check_method("crown") == ("crown",)
    assert check_method(["ibp", "crown"]) == ("ibp", "crown")
    for bad, match in [("ibpp", "Unknown"), ([], "at least one"), (("ibp", "ibp"), "twice")]:
        with pytest.raises(ValueError, match=match):
            check_method(bad)


def test_training_methods_and_teacher_bounds_derive_from_the_table():
    from certdistill.estimators.teacher import TRAINING_LOSSES, TRAINING_METHODS
    from certdistill.estimators.teacher_outputs import TEACHER_BOUNDS

    assert TRAINING_METHODS == ("ibp", "crown-ibp", "mtl-ibp", "sabr") == tuple(TRAINING_LOSSES)
    assert TEACHER_BOUNDS == (*METHODS, "best", "pgd")


# ---------------------------------------------------------------------------- registry


class _Scale(nn.Module):
    """A layer the engine does not know: multiplies by a fixed positive factor."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class _ScaleOp(BoundOp):
    def __init__(self, layer):
        self.layer = layer

    def forward(self, x, update_running_stats=False):
        return self.layer(x)

    def interval(self, center, radius):
        return center * self.layer.factor, radius * abs(self.layer.factor)

    def backward(self, A, input_shape, relaxation=None, alpha=None):
        return A * self.layer.factor, None


def test_register_op_adds_a_layer_everywhere():
    net = nn.Sequential(nn.Linear(3, 5), _Scale(2.0), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = torch.rand(7, 3)
    with pytest.raises(UnsupportedLayerError, match="_Scale"):
        certify(net, x, 0.1)
    assert "_Scale" not in supported_layers_text()
    register_op(_Scale, _ScaleOp, note="positive factors")
    try:
        assert "_Scale (positive factors)" in supported_layers_text()
        for method in METHODS:
            cert = certify(net, x, 0.1, method=method)
            # The same network written with the factor folded into the first layer.
            folded = copy.deepcopy(nn.Sequential(net[0], net[2], net[3]))
            with torch.no_grad():
                folded[0].weight.mul_(2.0)
                folded[0].bias.mul_(2.0)
            np.testing.assert_allclose(
                cert.margins, certify(folded, x, 0.1, method=method).margins, rtol=1e-5, atol=1e-5
            )
    finally:
        del OP_REGISTRY[_Scale]


def test_register_op_checks_its_arguments():
    with pytest.raises(TypeError, match="layer_type"):
        register_op("Linear", LinearOp)
    with pytest.raises(TypeError, match="op_class"):
        register_op(nn.Linear, object)
    assert UnsupportedLayerError is ExceptionsUnsupported


def test_subclasses_of_registered_layers_are_refused():
    class MyReLU(nn.ReLU):
        def forward(self, x):
            return super().forward(x) + 1.0

    with pytest.raises(UnsupportedLayerError, match="MyReLU"):
        BoundEngine(nn.Sequential(nn.Linear(2, 2), MyReLU(), nn.Linear(2, 2)))


# ---------------------------------------------------------------------------- engine cache


def test_engine_is_built_once_per_module_and_rebuilt_when_a_layer_changes():
    net = make_mlp(4, [6], 3, seed=0)
    first = engine_for(net)
    assert engine_for(net) is first
    net[0] = nn.Linear(4, 6)
    rebuilt = engine_for(net)
    assert rebuilt is not first and rebuilt.ops[0].layer is net[0]


# ---------------------------------------------------------------------------- cascade


def test_reference_comes_from_the_bound_sweep_and_matches_predict():
    net = make_cnn((1, 6, 6), [3], 4, seed=1)
    x = torch.rand(20, 1, 6, 6)
    cert = certify(net, x, 0.02)
    with torch.no_grad():
        np.testing.assert_array_equal(cert.prediction, net(x).argmax(1).numpy())


def test_cascade_statuses_and_counterexamples():
    net = make_mlp(4, [8, 8], 3, seed=2)
    x = torch.rand(40, 4)
    with torch.no_grad():
        predicted = net(x).argmax(1)
    y = predicted.clone()
    y[:10] = (y[:10] + 1) % 3  # wrong labels: refuted by the clean prediction
    cert = certify(net, x, 0.05, y=y, method=("ibp", "crown"))
    falsified = cert.status == "falsified"
    assert falsified[:10].all() and not falsified[10:].any()
    assert set(cert.decided_by[falsified]) == {"clean-prediction"}
    np.testing.assert_array_equal(cert.counterexample[falsified], x[:10].double().numpy())
    assert np.isnan(cert.counterexample[~falsified]).all()
    certified = cert.status == "certified"
    np.testing.assert_array_equal(certified, cert.certified)
    assert set(cert.decided_by[certified]) <= {"ibp", "crown"}
    assert (cert.decided_by[cert.status == "unknown"] == "").all()
    assert cert.decided_fraction == pytest.approx(np.mean(certified | falsified))
    # Each stage sees only the samples still open: CROWN alone certifies no more.
    alone = certify(net, x, 0.05, y=y, method="crown")
    assert np.all(cert.certified >= alone.certified)


def test_ragged_and_padded_crown_rows_give_the_same_bounds():
    """Samples with very different numbers of unstable neurons are bounded row by row."""
    net = make_mlp(6, [16, 16, 16], 4, seed=3)
    net64 = float64_copy(net)
    x = torch.rand(12, 6, dtype=torch.float64)
    radii = torch.tensor([0.0, 0.3] * 6, dtype=torch.float64)
    batch = around(x, 0.0).with_sample_radii(radii)
    engine = BoundEngine(net64)
    with torch.no_grad():
        reference = net64(x).argmax(1)
        together = engine.margin_lower_bounds(x, batch, reference, method="crown")
        for i in range(12):
            alone = engine.margin_lower_bounds(
                x[i : i + 1],
                around(x[i : i + 1], float(radii[i])),
                reference[i : i + 1],
                method="crown",
            )
            torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- training pass


def _dropout_net() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Linear(5, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


@pytest.mark.parametrize("training", [False, True])
def test_single_sweep_crown_ibp_equals_a_separate_crown_ibp_call(training):
    module = _dropout_net()
    module[3].p = 0.0  # no mask: the separate call bounds the same network
    module.train(training)
    x, y = torch.rand(32, 5), torch.randint(0, 3, (32,))
    engine = BoundEngine(module)
    swept = engine.interval_pass(x, around(x, 0.05, 0.0, 1.0), y, keep_state=True)
    fused = engine.crown_ibp_margins(swept)
    separate = engine.margin_lower_bounds(x, around(x, 0.05, 0.0, 1.0), y, method="crown-ibp")
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    fused.masked_fill(torch.isinf(fused), 0).sum().backward()
    assert all(p.grad is not None for p in module.parameters())


def test_single_sweep_crown_ibp_bounds_the_thinned_network_of_its_mask():
    module = _dropout_net().train()
    x, y = torch.rand(16, 5), torch.randint(0, 3, (16,))
    engine = BoundEngine(module)
    with torch.no_grad():
        swept = engine.interval_pass(x, around(x, 0.05, 0.0, 1.0), y, keep_state=True)
        margins = engine.crown_ibp_margins(swept)
        mask = engine.ops[3]._mask
        assert mask is not None and (mask == 0).any()
        scale, shift = engine.ops[1].affine()  # the clean batch's statistics

        def thinned(points):
            h = torch.relu(module[0](points) * scale + shift) * mask
            return module[6](torch.relu(module[4](h)))

        generator = torch.Generator().manual_seed(0)
        for _ in range(50):
            points = (x + (torch.rand(x.shape, generator=generator) * 2 - 1) * 0.05).clamp(0, 1)
            z = thinned(points)
            true = z.gather(1, y[:, None]) - z
            finite = torch.isfinite(margins)
            assert torch.all(true[finite] >= margins[finite] - 1e-5)
        assert torch.all(margins.gather(1, y[:, None]) == float("inf"))


def test_crown_ibp_margins_need_the_kept_state():
    module = _dropout_net().eval()
    x, y = torch.rand(4, 5), torch.zeros(4, dtype=torch.long)
    engine = BoundEngine(module)
    swept = engine.interval_pass(x, around(x, 0.05), y)
    with pytest.raises(ValueError, match="keep_state"):
        engine.crown_ibp_margins(swept)
