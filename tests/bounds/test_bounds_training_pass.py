"""The certified-training pass: clean logits and IBP margins in one sweep."""

from __future__ import annotations

import copy

import pytest
import torch
from networks import around
from torch import nn

from certdistill.bounds import BoundEngine


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Dropout(0.0),
        nn.Linear(32, 10),
        nn.BatchNorm1d(10),
    )


@pytest.mark.parametrize("training", [True, False])
def test_logits_and_running_stats_match_the_module_forward(training):
    module = _cnn().train(training)
    twin = copy.deepcopy(module)
    x = torch.rand(16, 1, 16, 16)
    y = torch.randint(0, 10, (16,))
    result = BoundEngine(module).interval_pass(x, around(x, 0.05, 0.0, 1.0), y)
    expected = twin(x)
    torch.testing.assert_close(result.logits, expected, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(module.modules(), twin.modules(), strict=True):
        if isinstance(ours, nn.modules.batchnorm._BatchNorm):
            torch.testing.assert_close(ours.running_mean, theirs.running_mean)
            torch.testing.assert_close(ours.running_var, theirs.running_var)
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def test_margins_equal_the_ibp_method_in_eval_mode_and_are_sound():
    module = _cnn().eval()
    x = torch.rand(16, 1, 16, 16)
    y = torch.randint(0, 10, (16,))
    engine = BoundEngine(module)
    with torch.no_grad():
        result = engine.interval_pass(x, around(x, 0.05, 0.0, 1.0), y)
        direct = engine.margin_lower_bounds(x, around(x, 0.05, 0.0, 1.0), y, method="ibp")
        torch.testing.assert_close(result.margins, direct)
        finite = torch.isfinite(result.margins)
        for _ in range(20):
            point = (x + (torch.rand_like(x) * 2 - 1) * 0.05).clamp(0, 1)
            logits = module(point)
            margins = logits.gather(1, y[:, None]) - logits
            assert torch.all(margins[finite] >= result.margins[finite] - 1e-5)


def test_train_mode_margins_bound_the_network_with_clean_batch_statistics():
    module = _cnn().train()
    x = torch.rand(32, 1, 16, 16)
    y = torch.randint(0, 10, (32,))
    frozen = copy.deepcopy(module)
    result = BoundEngine(module).interval_pass(x, around(x, 0.05, 0.0, 1.0), y)
    # The bounded network normalises with the clean batch's statistics: put them in an eval copy.
    with torch.no_grad():
        h = x
        for layer in frozen:
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                dims = [0, *range(2, h.dim())]
                var, mean = torch.var_mean(h, dim=dims, unbiased=False)
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
                layer.eval()
            h = layer(h)
        frozen.eval()
        finite = torch.isfinite(result.margins)
        for _ in range(20):
            point = (x + (torch.rand_like(x) * 2 - 1) * 0.05).clamp(0, 1)
            logits = frozen(point)
            margins = logits.gather(1, y[:, None]) - logits
            assert torch.all(margins[finite] >= result.margins[finite] - 1e-4)


def test_gradients_reach_every_parameter_and_activations_are_recorded():
    module = _cnn().train()
    x = torch.rand(8, 1, 16, 16)
    y = torch.randint(0, 10, (8,))
    result = BoundEngine(module).interval_pass(x, around(x, 0.05), y, record_activations=True)
    assert len(result.activation_bounds) == 2
    loss = result.logits.sum() + result.margins.masked_fill(torch.isinf(result.margins), 0).sum()
    loss.backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name


def test_dropout_in_training_thins_inputs_and_bounds_alike():
    torch.manual_seed(4)
    module = nn.Sequential(
        nn.Linear(12, 64),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(64, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ).train()
    x = torch.rand(64, 12)
    y = torch.randint(0, 5, (64,))
    result = BoundEngine(module).interval_pass(x, around(x, 0.02), y)
    # The clean point lies in the ball and sees the same mask: its margins respect the bound.
    clean_margins = result.logits.gather(1, y[:, None]) - result.logits
    finite = torch.isfinite(result.margins)
    assert torch.all(clean_margins[finite] >= result.margins[finite] - 1e-5)
    # A thinned network differs from the full one on some sample.
    assert not torch.allclose(result.logits, module.eval()(x))


def test_the_relu_interval_step_of_training_has_autograd_values_and_gradients():
    """The training pass's ReLU interval step is one autograd Function: the same values and
    gradients as autograd through ``relu(c - r)`` and ``relu(c + r)``, ties at 0 included."""
    from certdistill.bounds.ops import _ReLUInterval

    gen = torch.Generator().manual_seed(0)
    center = torch.randn(32, 12, generator=gen, dtype=torch.float64)
    radius = torch.rand(32, 12, generator=gen, dtype=torch.float64)
    center[0, :4] = radius[0, :4]  # c - r = 0 exactly
    center[1, :4] = -radius[1, :4]  # c + r = 0 exactly
    # Finite differences only away from the kinks (rows 2 onwards).
    assert torch.autograd.gradcheck(
        _ReLUInterval.apply,
        (center[2:].clone().requires_grad_(True), radius[2:].clone().requires_grad_(True)),
    )
    center.requires_grad_(True)
    radius.requires_grad_(True)
    lower, upper = torch.relu(center - radius), torch.relu(center + radius)
    expected = ((upper + lower) / 2, (upper - lower) / 2)
    ours = _ReLUInterval.apply(center, radius)
    grads = [torch.randn(32, 12, generator=gen, dtype=torch.float64) for _ in range(2)]
    for a, b in zip(ours, expected, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(
        torch.autograd.grad(ours, (center, radius), grads),
        torch.autograd.grad(expected, (center, radius), grads),
        strict=True,
    ):
        assert torch.equal(a, b)


def _reference_interval_pass(module: nn.Sequential, x, lower, upper, y):
    """IBP of a training step by plain autograd arithmetic, layer by layer: clean batch,
    centres and radii, BatchNorm with the clean batch's statistics."""
    center, radius = (upper + lower) / 2, (upper - lower) / 2
    layers = list(module)
    for layer in layers[:-1]:
        if isinstance(layer, nn.Conv2d):
            conv = torch.nn.functional.conv2d
            args = (layer.stride, layer.padding)
            x = conv(x, layer.weight, layer.bias, *args)
            center = conv(center, layer.weight, layer.bias, *args)
            radius = conv(radius, layer.weight.abs(), None, *args)
        elif isinstance(layer, nn.Linear):
            x, center = layer(x), layer(center)
            radius = radius @ layer.weight.abs().T
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x, dim=dims, unbiased=False)
            scale = layer.weight / torch.sqrt(var + layer.eps)
            shift = layer.bias - mean * scale
            view = (-1,) + (1,) * (x.dim() - 2)
            scale, shift = scale.view(view), shift.view(view)
            x, center, radius = x * scale + shift, center * scale + shift, radius * scale.abs()
        elif isinstance(layer, nn.ReLU):
            low, high = torch.relu(center - radius), torch.relu(center + radius)
            x, center, radius = torch.relu(x), (high + low) / 2, (high - low) / 2
        else:  # AvgPool2d, Flatten: linear maps with non-negative weights
            x, center, radius = layer(x), layer(center), layer(radius)
    last = layers[-1]
    rows = last.weight[y][:, None, :] - last.weight[None, :, :]  # (n, classes, features)
    offsets = last.bias[y][:, None] - last.bias[None, :]
    margins = (
        torch.einsum("ncf,nf->nc", rows, center)
        - torch.einsum("ncf,nf->nc", rows.abs(), radius)
        + offsets
    )
    return last(x), margins.scatter(1, y[:, None], float("inf"))


def test_training_pass_values_and_gradients_equal_plain_autograd_arithmetic():
    """The fused training steps (stacked clean and centre rows through affine layers,
    BatchNorm and ReLU) compute IBP's values and parameter gradients exactly."""
    torch.manual_seed(3)
    module = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ).double()
    for layer in module:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(layer.weight)  # negative scales too
            nn.init.normal_(layer.bias)
    reference = copy.deepcopy(module)
    x = torch.rand(12, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (12,))
    box = around(x, 0.05, 0.0, 1.0)
    result = BoundEngine(module.train()).interval_pass(x, box, y)
    lower, upper = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    logits, margins = _reference_interval_pass(reference, x, lower, upper, y)
    torch.testing.assert_close(result.logits, logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(result.margins, margins, rtol=0, atol=1e-12)
    finite = torch.isfinite(margins)
    weights = torch.randn(12, 5, dtype=torch.float64)
    for clean, bounds in ((result.logits, result.margins), (logits, margins)):
        ((clean + torch.where(finite, bounds, 0.0)) * weights).sum().backward()
    for (name, ours), theirs in zip(module.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-11, msg=name)
