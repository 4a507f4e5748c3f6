"""GPU paths of streaming, memory plans and persistence (skipped without CUDA).

These tests need a CUDA device; on a CPU-only machine every one of them is skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from digits import small_digits
from networks import make_cnn, make_mlp

import certdistill
from certdistill import CertifiedTeacher, certify
from certdistill.bounds import BoundEngine, Perturbation
from certdistill.bounds.memory import default_memory_limit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EPS = 0.03


def test_stream_on_cuda_equals_cpu(tmp_path):
    net = make_mlp(64, [16], 10, seed=0)
    X = np.random.default_rng(0).random((5000, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", X)
    on_cpu = certify(net, X, EPS, method=("ibp", "crown"), lower=0.0, upper=1.0)
    X_map = np.load(tmp_path / "x.npy", mmap_mode="r")
    on_gpu = certify(
        net.cuda(), X_map, EPS, method=("ibp", "crown"), lower=0.0, upper=1.0, batch_size=1000
    )
    np.testing.assert_allclose(on_gpu.margins, on_cpu.margins, rtol=1e-4, atol=1e-4)
    assert next(net.parameters()).is_cuda


def test_memory_plan_on_cuda():
    assert 0 < default_memory_limit("cuda") <= torch.cuda.mem_get_info()[1]
    module = make_cnn((1, 8, 8), [4, 4], 10, seed=0)
    X = torch.rand(64, 1, 8, 8)
    on_cpu = certify(module, X, EPS, method="crown", lower=0.0, upper=1.0)
    module.cuda()
    engine = BoundEngine(module)
    roomy = engine.memory_plan(X.cuda(), "crown", memory_limit=2**30, max_samples=10**6)
    tight = engine.memory_plan(X.cuda(), "crown", memory_limit=256 * 1024, max_samples=10**6)
    # No CPU cap on the groups on a GPU: a large budget gives large groups.
    assert roomy.backward_elements > 2**22 > tight.backward_elements
    on_gpu = certify(
        module, X.cuda(), EPS, method="crown", lower=0.0, upper=1.0, memory_limit=256 * 1024
    )
    np.testing.assert_allclose(on_gpu.margins, on_cpu.margins, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "alpha-crown"])
def test_bound_propagation_does_not_synchronise(method):
    """No host round-trip in the sweep, the backward passes and alpha-CROWN's optimisation (one
    hidden layer: its pre-activation bounds are the interval ones, CROWN's intermediate bounds
    read unstable counts on the host and are excluded)."""
    module = make_mlp(64, [32], 10, seed=0).cuda()
    x = torch.rand(256, 64, device="cuda")
    perturbation = Perturbation.create(EPS, (64,), lower=0.0, upper=1.0, device="cuda")
    reference = torch.zeros(256, dtype=torch.long, device="cuda")
    engine = BoundEngine(module)
    with torch.no_grad():
        engine.bound(x, perturbation, reference, method=method)  # warm-up (caches, kernels)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            engine.bound(x, perturbation, reference, method=method)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_fitted_on_gpu_loads_and_certifies_on_cpu(tmp_path):
    X, y = small_digits(3, 150)
    teacher = CertifiedTeacher(
        eps=EPS,
        method="ibp",
        module__hidden_sizes=(16,),
        max_epochs=2,
        lower=0.0,
        upper=1.0,
        random_state=0,
        device="cuda",
    ).fit(X, y)
    on_gpu = teacher.certify(X, method=("ibp", "crown"))
    path = certdistill.save(teacher, tmp_path / "teacher.cdsafe")
    on_cpu = certdistill.load(path, device="cpu")
    assert next(on_cpu.module_.parameters()).device.type == "cpu"
    certificate = on_cpu.certify(X, method=("ibp", "crown"))
    np.testing.assert_allclose(certificate.margins, on_gpu.margins, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(on_cpu.predict(X), teacher.predict(X))
