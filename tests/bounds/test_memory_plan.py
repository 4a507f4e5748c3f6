"""The memory planner: a smaller budget bounds fewer samples and fewer backward rows at once, and
the bounds do not change."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from digits import small_digits
from networks import make_cnn, make_mlp

from certdistill import CertifiedTeacher, certify
from certdistill.bounds import BoundEngine, Perturbation, engine_for
from certdistill.bounds.memory import (
    FALLBACK_CPU_LIMIT,
    check_memory_limit,
    default_memory_limit,
    plan_memory,
)
from certdistill.verify.cascade import CascadeOptions

MiB = 2**20


def _cnn():
    return make_cnn((1, 8, 8), [4, 4], 10, seed=0)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "alpha-crown"])
def test_a_smaller_budget_plans_smaller_chunks(method):
    engine = engine_for(_cnn())
    x = torch.rand(2, 1, 8, 8)
    plans = [
        engine.memory_plan(x, method, memory_limit=limit, max_samples=10**6)
        for limit in (64 * MiB, 4 * MiB, MiB)
    ]
    samples = [plan.samples for plan in plans]
    backward = [plan.backward_elements for plan in plans]
    assert samples == sorted(samples, reverse=True) and samples[0] > samples[-1] >= 1
    assert backward == sorted(backward, reverse=True)
    # The batch size caps the samples; the budget is kept.
    capped = engine.memory_plan(x, method, memory_limit=64 * MiB, max_samples=7)
    assert capped.samples == 7 and capped.memory_limit == 64 * MiB
    # The dearer the method, the fewer samples in the same budget.
    assert engine.memory_plan(x, "ibp", memory_limit=MiB, max_samples=10**6).samples >= (
        engine.memory_plan(x, "alpha-crown", memory_limit=MiB, max_samples=10**6).samples
    )


def test_plan_fits_the_budget_by_its_own_estimate():
    shapes = [(1, 28, 28), (16, 14, 14), (16, 14, 14), (3136,), (100,), (100,), (10,)]
    activations = [2, 5]
    for limit in (16 * MiB, 256 * MiB):
        plan = plan_memory(
            shapes, activations, "crown", memory_limit=limit, itemsize=4, max_samples=10**6
        )
        # One group of one neuron per sample through the largest layer fits what is left.
        assert plan.backward_elements >= plan.samples * 2 * 16 * 14 * 14
        assert plan.backward_elements * 4 * 4 <= limit


def test_one_sample_over_the_budget_warns_and_goes_one_by_one():
    with pytest.warns(UserWarning, match="bounding one sample and one neuron at a time"):
        plan = plan_memory(
            [(784,), (4096,), (4096,), (10,)],
            [2],
            "crown",
            memory_limit=1000,
            itemsize=4,
            max_samples=256,
        )
    assert plan.samples == 1 and plan.backward_elements >= 1


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
@pytest.mark.parametrize("net", ["mlp", "cnn-patches", "cnn-matrix"])
def test_one_row_per_backward_group_gives_the_same_bounds(method, net):
    """The smallest groups (one neuron per pass) on the padded, ragged and patches paths."""
    if net == "mlp":
        module, x = make_mlp(6, [16, 16, 16], 4, seed=3), torch.rand(12, 6)
        # Very different numbers of unstable neurons per sample: the ragged path.
        eps = torch.linspace(0.0, 0.3, 12).view(12, 1)
        perturbation = Perturbation.create(0.1, (6,)).with_sample_radii(eps.view(-1))
    else:
        module, x = _cnn(), torch.rand(6, 1, 8, 8)
        perturbation = Perturbation.create(0.05, (1, 8, 8), lower=0.0, upper=1.0)
    engine = BoundEngine(module, conv_mode="matrix" if net == "cnn-matrix" else "patches")
    with torch.no_grad():
        whole = engine.bound(x, perturbation, method=method).margins
        one_by_one = engine.bound(x, perturbation, method=method, backward_elements=1).margins
    torch.testing.assert_close(one_by_one, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["crown", ("ibp", "crown-ibp", "alpha-crown")])
def test_certify_with_a_tiny_budget_gives_the_same_margins(method, monkeypatch):
    module = _cnn()
    X = torch.rand(64, 1, 8, 8)
    calls = []
    bound = BoundEngine.bound

    def spy(self, x, *args, **kwargs):
        calls.append((x.shape[0], kwargs.get("backward_elements")))
        return bound(self, x, *args, **kwargs)

    monkeypatch.setattr(BoundEngine, "bound", spy)
    roomy = certify(module, X, 0.03, method=method, lower=0.0, upper=1.0, memory_limit=2**30)
    roomy_calls, calls[:] = list(calls), []
    tight = certify(module, X, 0.03, method=method, lower=0.0, upper=1.0, memory_limit=256 * 1024)
    np.testing.assert_allclose(tight.margins, roomy.margins, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tight.status, roomy.status)
    assert max(n for n, _ in calls) < max(n for n, _ in roomy_calls)
    assert max(b for _, b in calls) < min(b for _, b in roomy_calls)


def test_estimators_pass_the_budget_on():
    X, y = small_digits(3, 120)
    teacher = CertifiedTeacher(
        eps=0.05,
        method="ibp",
        module__hidden_sizes=(16,),
        max_epochs=1,
        lower=0.0,
        upper=1.0,
        random_state=0,
    ).fit(X, y)
    roomy = teacher.certify(X, method="crown", memory_limit=2**30)
    tight = teacher.certify(X, method="crown", memory_limit=64 * 1024)
    np.testing.assert_allclose(tight.margins, roomy.margins, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="memory_limit"):
        teacher.certify(X, memory_limit=-1)


@pytest.mark.parametrize("value", [0, -5, 0.5, float("nan"), float("inf"), True, "1GB"])
def test_bad_memory_limits_are_refused_where_they_enter(value):
    with pytest.raises(ValueError, match="memory_limit must be None or a positive number"):
        check_memory_limit(value)
    with pytest.raises(ValueError, match="memory_limit"):
        CascadeOptions(memory_limit=value)
    with pytest.raises(ValueError, match="memory_limit"):
        certify(make_mlp(2, [3], 2), torch.rand(2, 2), 0.1, memory_limit=value)


def test_memory_limit_is_kept_as_bytes():
    assert CascadeOptions(memory_limit=2e9).memory_limit == 2_000_000_000
    assert CascadeOptions().memory_limit is None


def test_default_budget_on_the_cpu(monkeypatch):
    limit = default_memory_limit("cpu")
    assert 0 < limit <= 8 * 2**30
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed
    assert default_memory_limit(torch.device("cpu")) == FALLBACK_CPU_LIMIT
