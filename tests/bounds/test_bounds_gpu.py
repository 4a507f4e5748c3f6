"""GPU certification gives the CPU's bounds (skipped without CUDA)."""

import numpy as np
import pytest
import torch
from torch import nn

from certdistill import certified_radius, certify

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    module[1].running_mean.normal_(0, 0.5)
    module[1].running_var.uniform_(0.5, 2.0)
    return module.eval()


@cuda
@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "alpha-crown"])
def test_cuda_margins_match_cpu(method):
    module = _cnn()
    X = torch.rand(64, 1, 16, 16)
    on_cpu = certify(module, X, 0.02, method=method, lower=0.0, upper=1.0)
    module.cuda()
    on_gpu = certify(module, X.cuda(), 0.02, method=method, lower=0.0, upper=1.0)
    np.testing.assert_allclose(on_gpu.margins, on_cpu.margins, rtol=1e-4, atol=1e-4)
    assert next(module.parameters()).is_cuda


@cuda
def test_cuda_sampled_points_respect_bounds():
    module = _cnn().cuda()
    X = torch.rand(32, 1, 16, 16, device="cuda")
    cert = certify(module, X, 0.03, method="crown", lower=0.0, upper=1.0)
    reference = torch.as_tensor(cert.prediction, device="cuda")
    with torch.no_grad():
        for _ in range(20):
            noise = (torch.rand_like(X) * 2 - 1) * 0.03
            logits = module((X + noise).clamp(0, 1))
            margins = logits.gather(1, reference[:, None]) - logits
            finite = np.isfinite(cert.margins)
            assert np.all(margins.cpu().numpy()[finite] >= cert.margins[finite] - 1e-5)


@cuda
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_cuda_certified_radius_runs_on_device_and_matches_cpu(method):
    module = _cnn()
    X = torch.rand(8, 1, 16, 16)
    kw = dict(method=method, lower=0.0, upper=1.0, max_eps=0.05, tol=1e-4)
    on_cpu = certified_radius(module, X, **kw)
    module.cuda()
    X_gpu = X.cuda()
    seen = []
    hook = module[0].register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].device))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    try:
        on_gpu = certified_radius(module, X_gpu, **kw)
    finally:
        hook.remove()
    # The inputs reached the module on the GPU, and the bounds were computed there.
    assert seen and all(device.type == "cuda" for device in seen)
    assert torch.cuda.max_memory_allocated() > baseline
    assert next(module.parameters()).is_cuda and X_gpu.is_cuda
    assert isinstance(on_gpu, np.ndarray) and on_gpu.shape == (8,)
    assert (on_cpu > 0).any()  # the comparison is not between two arrays of zeros
    # Rounding differs between devices: a bisection step may go the other way near the radius.
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=0, atol=2 * kw["tol"])
