"""CROWN with patches (sparse receptive-field rows) equals dense rows and stays sound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from milp import exact_min_margins
from networks import around, float64_copy
from torch import nn

from certdistill.bounds import BoundEngine


def _randomise(module: nn.Module, seed: int, sample_shape) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    module(torch.zeros(2, *sample_shape))  # materialise lazy layers
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.copy_(torch.randn(layer.num_features, generator=generator) * 0.5)
            layer.running_var.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)
            layer.weight.data.copy_(torch.randn(layer.num_features, generator=generator) * 0.3 + 1)
            layer.bias.data.copy_(torch.randn(layer.num_features, generator=generator) * 0.3)
    return module.eval()


ARCHITECTURES = {
    "strided": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 5, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.LazyLinear(8),
            nn.ReLU(),
            nn.Linear(8, 3),
        ),
        (1, 12, 12),
    ),
    "bn-avgpool": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(3, 4, 3, stride=2, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AvgPool2d(3, stride=1, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.LazyLinear(4),
        ),
        (2, 10, 10),
    ),
    "conv-conv-no-relu": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=2),
            nn.ReLU(),
            nn.Conv2d(3, 3, 2),
            nn.Identity(),
            nn.Conv2d(3, 4, 3, stride=3, padding=1),
            nn.Dropout(0.3),
            nn.ReLU(),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        (1, 9, 9),
    ),
    "asymmetric": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 0)),
            nn.ReLU(),
            nn.Conv2d(3, 3, (2, 3), stride=(2, 1), padding=(0, 1)),
            nn.ReLU(),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        (2, 8, 10),
    ),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("domain", [False, True])
def test_patches_equal_dense_rows(name, domain):
    factory, shape = ARCHITECTURES[name]
    torch.manual_seed(0)
    module = _randomise(factory(), 0, shape)
    x = torch.rand(6, *shape)
    eps = torch.rand(shape) * 0.1  # per-feature radius
    reference = module(x).argmax(1)
    kwargs = {"lower": 0.0, "upper": 1.0} if domain else {}
    with torch.no_grad():
        patched = BoundEngine(module, conv_mode="patches").margin_lower_bounds(
            x, around(x, eps, **kwargs), reference, method="crown"
        )
        dense = BoundEngine(module, conv_mode="matrix").margin_lower_bounds(
            x, around(x, eps, **kwargs), reference, method="crown"
        )
    torch.testing.assert_close(patched, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_patches_are_sound_against_sampled_points(name):
    factory, shape = ARCHITECTURES[name]
    torch.manual_seed(1)
    module = _randomise(factory(), 1, shape)
    x = torch.rand(8, *shape)
    eps = 0.08
    reference = module(x).argmax(1)
    with torch.no_grad():
        bound = BoundEngine(module, conv_mode="patches").margin_lower_bounds(
            x, around(x, eps, 0.0, 1.0), reference, method="crown"
        )
        finite = torch.isfinite(bound)
        for _ in range(30):
            points = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
            corners = (x + torch.sign(torch.rand_like(x) - 0.5) * eps).clamp(0, 1)
            for point in (points, corners):
                logits = module(point)
                margins = logits.gather(1, reference[:, None]) - logits
                assert torch.all(margins[finite] >= bound[finite] - 1e-5)


def test_patches_never_beat_the_exact_optimum():
    torch.manual_seed(2)
    module = nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 2, 2, stride=1, padding=0),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).eval()
    net64 = float64_copy(module)
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    reference = net64(x).argmax(1)
    with torch.no_grad():
        bound = (
            BoundEngine(net64, conv_mode="patches")
            .margin_lower_bounds(x, around(x, 0.1, 0.0, 1.0), reference, method="crown")
            .numpy()
        )
    exact = exact_min_margins(net64, x.numpy(), reference.numpy(), 0.1, lower=0.0, upper=1.0)
    optimum = np.stack([result.optimum for result in exact])
    finite = np.isfinite(bound)
    assert np.all(bound[finite] <= optimum[finite] + 1e-6)


def test_auto_mode_uses_patches_on_large_maps_and_matches():
    torch.manual_seed(3)
    module = nn.Sequential(
        nn.Conv2d(1, 4, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 10),
    ).eval()
    x = torch.rand(4, 1, 28, 28)
    reference = module(x).argmax(1)
    with torch.no_grad():
        auto = BoundEngine(module).margin_lower_bounds(
            x, around(x, 0.02), reference, method="crown"
        )
        dense = BoundEngine(module, conv_mode="matrix").margin_lower_bounds(
            x, around(x, 0.02), reference, method="crown"
        )
    torch.testing.assert_close(auto, dense, rtol=1e-5, atol=1e-5)


def test_unknown_conv_mode_is_rejected():
    with pytest.raises(ValueError, match="conv_mode"):
        BoundEngine(nn.Sequential(nn.Linear(2, 2)), conv_mode="sparse")
