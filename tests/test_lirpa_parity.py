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
