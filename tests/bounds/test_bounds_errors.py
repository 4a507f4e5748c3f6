"""Input validation of certify / certified_radius / margin_lower_bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from networks import make_cnn, make_mlp
from torch import nn

from certdistill import UnsupportedLayerError, certified_radius, certify
from certdistill.bounds import margin_lower_bounds

METHODS = ["ibp", "crown-ibp", "crown", "alpha-crown"]


@pytest.fixture
def mlp():
    return make_mlp(4, [6], 3, seed=0)


@pytest.fixture
def x():
    return np.random.default_rng(0).random((5, 4)).astype(np.float32)


# ------------------------------------------------------------------------------ eps


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "eps",
    [-0.1, float("nan"), float("inf"), float("-inf"), -1e-12],
    ids=["negative", "nan", "inf", "-inf", "tiny-negative"],
)
def test_bad_scalar_eps(mlp, x, method, eps):
    with pytest.raises(ValueError, match="eps"):
        certify(mlp, x, eps, method=method)


@pytest.mark.parametrize("bad", [-0.1, np.nan, np.inf])
def test_bad_entry_in_per_feature_eps(mlp, x, bad):
    eps = np.full(4, 0.1)
    eps[2] = bad
    with pytest.raises(ValueError, match="eps"):
        certify(mlp, x, eps)
    with pytest.raises(ValueError, match="eps"):
        certify(mlp, x, torch.from_numpy(eps))


@pytest.mark.parametrize("method", METHODS)
def test_zero_eps_is_allowed(mlp, x, method):
    # A ball of radius 0 is the point itself: the margins are the clean ones.
    with torch.no_grad():
        z = mlp(torch.from_numpy(x)).double().numpy()
    reference = z.argmax(1)
    clean = z[np.arange(5), reference][:, None] - z
    clean[np.arange(5), reference] = np.inf
    for eps in (0.0, np.zeros(4)):
        cert = certify(mlp, x, eps, method=method)
        np.testing.assert_array_equal(cert.prediction, reference)
        np.testing.assert_allclose(cert.margins, clean, rtol=1e-6, atol=1e-6)


def test_bad_max_eps_in_certified_radius(mlp, x):
    with pytest.raises(ValueError):
        certified_radius(mlp, x, max_eps=-1.0)
    with pytest.raises(ValueError):
        certified_radius(mlp, x, max_eps=float("nan"))


# -------------------------------------------------------------------------------- X


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_non_finite_x(mlp, x, bad, as_tensor):
    x = x.copy()
    x[3, 1] = bad
    with pytest.raises(ValueError, match="X"):
        certify(mlp, torch.from_numpy(x) if as_tensor else x, 0.1)
    with pytest.raises(ValueError, match="X"):
        certified_radius(mlp, x)


@pytest.mark.parametrize("shape", [(5, 5), (5, 3), (5, 2, 2), (5, 4, 1)])
def test_x_shape_that_does_not_fit_an_mlp(mlp, shape):
    with pytest.raises(ValueError):
        certify(mlp, np.zeros(shape, dtype=np.float32), 0.1)


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (2, 2, 5), (2, 50), (2, 2, 6, 6)])
def test_x_shape_that_does_not_fit_a_cnn(shape):
    # (2, 2, 6, 6) has the right channels but a flattened size the first Linear rejects.
    net = make_cnn((2, 5, 5), (3,), 3, seed=0, avgpool=False)
    certify(net, np.zeros((2, 2, 5, 5), dtype=np.float32), 0.1)  # the right shape works
    with pytest.raises(ValueError):
        certify(net, np.zeros(shape, dtype=np.float32), 0.1)


# --------------------------------------------------------------------------- domain


@pytest.mark.parametrize(
    ("lower", "upper"),
    [(1.0, 0.0), (0.5, 0.4999), (np.zeros(4), np.array([1.0, 1.0, -0.1, 1.0]))],
    ids=["floats", "close-floats", "one-feature"],
)
def test_lower_above_upper(mlp, x, lower, upper):
    with pytest.raises(ValueError):
        certify(mlp, x, 0.1, lower=lower, upper=upper)
    with pytest.raises(ValueError):
        certified_radius(mlp, x, lower=lower, upper=upper)


@pytest.mark.parametrize("method", METHODS)
def test_x_outside_the_domain(mlp, x, method):
    outside = x.copy()
    outside[0, 0] = 1.5
    with pytest.raises(ValueError):
        certify(mlp, outside, 0.1, method=method, lower=0.0, upper=1.0)
    outside = x.copy()
    outside[4, 3] = -0.01
    with pytest.raises(ValueError):
        certify(mlp, outside, 0.1, method=method, lower=0.0, upper=1.0)
    with pytest.raises(ValueError):
        certify(mlp, x, 0.1, method=method, lower=np.array([0.0, 0.0, 0.0, 0.99]))


@pytest.mark.parametrize("method", METHODS)
def test_x_on_the_domain_boundary_is_fine(mlp, x, method):
    # On the boundary, the ball cut by the domain is the box [0, 0.1] (or [0.9, 1]): exactly the
    # ball of radius 0.05 around 0.05 (or 0.95), so the certificates must be the same.
    x = x.copy()
    x[0, :] = 0.0
    x[1, :] = 1.0
    reference = certify(mlp, x, 0.0).prediction
    cut = certify(mlp, x, 0.1, method=method, lower=0.0, upper=1.0, y=reference)
    moved = x.copy()
    moved[0, :], moved[1, :] = 0.05, 0.95
    inner = certify(mlp, moved[:2], 0.05, method=method, y=reference[:2])
    np.testing.assert_allclose(cut.margins[:2], inner.margins, rtol=1e-5, atol=1e-5)
    only_lower = certify(mlp, x[:1], 0.1, method=method, lower=0.0, y=reference[:1])
    only_upper = certify(mlp, x[1:2], 0.1, method=method, upper=1.0, y=reference[1:2])
    np.testing.assert_allclose(only_lower.margins, inner.margins[:1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(only_upper.margins, inner.margins[1:], rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- y


@pytest.mark.parametrize(
    "y",
    [[0, 1, 2, 3, 0], [0, -1, 2, 1, 0], [0, 1, 2], [0, 1, 2, 0, 1, 2]],
    ids=["too-large", "negative", "too-short", "too-long"],
)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_bad_labels(mlp, x, y, as_tensor):
    y = torch.tensor(y) if as_tensor else np.array(y)
    with pytest.raises(ValueError, match="y"):
        certify(mlp, x, 0.1, y=y)
    with pytest.raises(ValueError, match="y"):
        certified_radius(mlp, x, y=y)


def test_good_labels_are_used_as_reference(mlp, x):
    y = np.array([2, 2, 0, 1, 0])
    cert = certify(mlp, x, 0.1, y=y)
    np.testing.assert_array_equal(cert.prediction, y)
    assert np.isposinf(cert.margins[np.arange(5), y]).all()


def test_unknown_method(mlp, x):
    with pytest.raises(ValueError, match="method"):
        certify(mlp, x, 0.1, method="deepz")


# ------------------------------------------------------------------ unsupported layers

UNSUPPORTED = {
    "Tanh": lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
    "Sigmoid": lambda: nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)),
    "LeakyReLU": lambda: nn.Sequential(nn.Linear(4, 5), nn.LeakyReLU(), nn.Linear(5, 3)),
    "MaxPool2d": lambda: nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ),
    "Conv2d-groups": lambda: nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)
    ),
    "Conv2d-dilation": lambda: nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=2, dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)
    ),
    "Tanh-nested": lambda: nn.Sequential(
        nn.Linear(4, 5), nn.Sequential(nn.ReLU(), nn.Sequential(nn.Tanh())), nn.Linear(5, 3)
    ),
}


def _input_for(name: str) -> np.ndarray:
    if name.startswith(("MaxPool2d", "Conv2d")):
        return np.zeros((2, 2, 4, 4), dtype=np.float32)
    return np.zeros((2, 4), dtype=np.float32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_layers(name, method):
    net = UNSUPPORTED[name]().eval()
    layer = name.split("-")[0]
    x = _input_for(name)
    with pytest.raises(UnsupportedLayerError, match=layer) as info:
        certify(net, x, 0.1, method=method)
    message = str(info.value)
    # The message lists what *is* supported, so the user knows what to replace the layer by.
    for supported in ("Linear", "Conv2d", "ReLU", "BatchNorm", "AvgPool2d"):
        assert supported in message, (supported, message)
    assert isinstance(info.value, TypeError)  # UnsupportedLayerError is a TypeError
    with pytest.raises(UnsupportedLayerError, match=layer):
        margin_lower_bounds(net, torch.from_numpy(x), 0.1, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("name", ["Conv2d-groups", "Conv2d-dilation"])
def test_unsupported_conv_message_says_why(name):
    net = UNSUPPORTED[name]().eval()
    attribute = name.split("-")[1]
    with pytest.raises(UnsupportedLayerError, match=attribute):
        certify(net, _input_for(name), 0.1)


def test_unsupported_layer_in_certified_radius():
    with pytest.raises(UnsupportedLayerError, match="Tanh"):
        certified_radius(UNSUPPORTED["Tanh"](), np.zeros((2, 4), dtype=np.float32))


def test_errors_leave_the_module_untouched():
    net = make_mlp(4, [6], 3, seed=1, batchnorm=True, dropout=True).train()
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError):
        certify(net, np.full((2, 4), np.nan, dtype=np.float32), 0.1)
    with pytest.raises(ValueError):
        certify(net, np.zeros((2, 4), dtype=np.float32), -1.0)
    assert all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, buffers[k], rtol=0, atol=0)
