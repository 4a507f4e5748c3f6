"""Soundness fuzzing through the public API: random networks, inputs, radii and domains.

Hypothesis draws a network of supported layers (MLPs of any depth and width, CNNs with strided
and padded convolutions, BatchNorm with random statistics, AvgPool2d, Dropout, Unflatten, nested
Sequential), a batch of inputs, a radius (zero, scalar, per feature, per channel) and an input
domain (none, scalars, per-feature arrays, one side only). Every bound method of
``certdistill.certify`` must give margins that no witness beats: sampled points and corners of
the box, and a targeted PGD attack (``certdistill.verify.attacks.min_margin_attack``), all
evaluated in
float64 (tolerance ``1e-5`` relative + absolute, the modules being float32); alpha-CROWN must
also never be looser than CROWN.

Profiles, chosen by the environment variable ``CERTDISTILL_FUZZ``:

* unset or ``small``: 80 examples, part of the normal test suite (about 15 s);
* ``large``: thousands of examples, run by CI as a separate, time-capped step::

      CERTDISTILL_FUZZ=large timeout 600 python -m pytest -q tests/bounds/test_fuzz_soundness.py

  The large profile also stops drawing new checks after ``CERTDISTILL_FUZZ_SECONDS`` (default
  480) so that it ends by itself within the cap; a summary line reports how many examples ran.

A failure is shrunk by hypothesis to a minimal network and input; it is an unsoundness of the
engine (a certificate that a real point contradicts).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from networks import (
    POOLS,
    float64_copy,
    make_cnn,
    make_mlp,
    make_unflatten_net,
    random_inputs,
)
from torch import nn
from witnesses import assert_below, sampled_min_margins

from certdistill import certify
from certdistill.verify.attacks import min_margin_attack

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
PROFILE = os.environ.get("CERTDISTILL_FUZZ", "small").strip().lower()
if PROFILE not in ("small", "large"):
    raise ValueError(f"CERTDISTILL_FUZZ must be 'small' or 'large', got {PROFILE!r}")
LARGE = PROFILE == "large"
MAX_EXAMPLES = 4000 if LARGE else 80
TIME_BUDGET = float(os.environ.get("CERTDISTILL_FUZZ_SECONDS", "480")) if LARGE else None

pytestmark = pytest.mark.fuzz

#: Examples checked and certificates compared (one per example, method and sample), reported at
#: the end of the module.
COUNTS = {"examples": 0, "certificates": 0, "skipped_after_budget": 0}
#: When the first example started (the budget counts from there, not from collection).
_START: list[float] = []


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    line = (
        f"fuzz soundness ({PROFILE} profile): {COUNTS['examples']} examples, "
        f"{COUNTS['certificates']} certificates (example x method x sample) checked against "
        f"sampled points, corners and PGD; {COUNTS['skipped_after_budget']} examples drawn "
        "after the time budget were not checked"
    )
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{line}")


# ------------------------------------------------------------------------ strategies
@st.composite
def networks(draw):
    """A random float32 network in eval mode and the shape of one of its samples."""
    seed = draw(st.integers(0, 2**20))
    n_classes = draw(st.integers(2, 5))
    family = draw(st.sampled_from(["mlp", "cnn", "unflatten"]))
    if family == "mlp":
        d = draw(st.integers(1, 8))
        net = make_mlp(
            d,
            draw(st.lists(st.integers(1, 10), min_size=0, max_size=4)),
            n_classes,
            seed=seed,
            batchnorm=draw(st.booleans()),
            dropout=draw(st.booleans()),
            identity=draw(st.booleans()),
            nested=draw(st.booleans()),
            weight_scale=draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])),
            bn_affine=draw(st.booleans()),
        )
        shape: tuple[int, ...] = (d,)
    elif family == "cnn":
        shape = (draw(st.integers(1, 3)), draw(st.integers(2, 7)), draw(st.integers(2, 7)))
        net = make_cnn(
            shape,
            draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)),
            n_classes,
            seed=seed,
            kernel_size=draw(st.integers(1, 3)),
            stride=draw(st.integers(1, 2)),
            padding=draw(st.integers(0, 1)),
            batchnorm=draw(st.booleans()),
            avgpool=draw(st.sampled_from(POOLS)),
            dropout=draw(st.booleans()),
            hidden=draw(st.sampled_from([None, 3, 8])),
            nested=draw(st.booleans()),
            bn_affine=draw(st.booleans()),
        )
    else:
        d = draw(st.integers(1, 6))
        net = make_unflatten_net(
            d,
            (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))),
            draw(st.integers(1, 4)),
            n_classes,
            seed=seed,
            kernel_size=draw(st.integers(1, 3)),
            batchnorm=draw(st.booleans()),
        )
        shape = (d,)
    if draw(st.booleans()):  # one more level of nesting around everything
        net = nn.Sequential(nn.Identity(), net).eval()
    return net, shape


@st.composite
def problems(draw):
    """A network, inputs, a radius and an input domain that contains the inputs."""
    net, shape = draw(networks())
    rng = np.random.default_rng(draw(st.integers(0, 2**20)))
    n = draw(st.integers(1, 4))
    domain = draw(
        st.sampled_from(["none", "unit", "scalars", "arrays", "lower-only", "upper-only"])
    )
    x = random_inputs(rng, n, shape, unit=domain != "none")
    lower = upper = None
    if domain == "unit":
        lower, upper = 0.0, 1.0
    elif domain == "scalars":
        lower = float(x.min()) - draw(st.floats(0.0, 0.3))
        upper = float(x.max()) + draw(st.floats(0.0, 0.3))
    elif domain in ("arrays", "lower-only", "upper-only"):
        # per feature, some edges touching the data (a feature pinned at its bound)
        slack = rng.random(shape) * rng.integers(0, 2, shape) * 0.3
        lower = (x.min(0) - slack).astype(np.float32)
        upper = (x.max(0) + rng.random(shape) * 0.3).astype(np.float32)
        if domain == "lower-only":
            upper = None
        elif domain == "upper-only":
            lower = None
    kind = draw(st.sampled_from(["zero", "tiny", "scalar", "per-feature", "per-channel"]))
    if kind == "zero":
        eps = 0.0
    elif kind == "tiny":
        eps = draw(st.floats(1e-7, 1e-4))
    elif kind == "scalar":
        eps = draw(st.floats(1e-3, 0.5))
    elif kind == "per-channel" and len(shape) == 3:
        eps = (0.3 * rng.random((shape[0], 1, 1))).astype(np.float32)
    else:
        eps = (0.3 * rng.random(shape) * rng.integers(0, 2, shape)).astype(np.float32)
    return net, x, eps, lower, upper


# ----------------------------------------------------------------------------- test
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(problems())
def test_no_witness_beats_a_certified_margin(problem):
    if not _START:
        _START.append(time.monotonic())
    if TIME_BUDGET is not None and time.monotonic() - _START[0] > TIME_BUDGET:
        COUNTS["skipped_after_budget"] += 1
        return
    net, x, eps, lower, upper = problem
    domain = dict(lower=lower, upper=upper)
    certificates = {method: certify(net, x, eps, method=method, **domain) for method in METHODS}
    reference = certificates["ibp"].prediction
    for method, cert in certificates.items():
        np.testing.assert_array_equal(cert.prediction, reference, err_msg=method)
        assert not np.isnan(cert.margins).any(), method
        np.testing.assert_array_equal(cert.certified, (cert.margins > 0).all(1), err_msg=method)

    sampled = sampled_min_margins(
        net,
        x,
        reference,
        eps,
        n_random=64 if LARGE else 100,
        n_corners=32 if LARGE else 64,
        **domain,
    )
    attacked = min_margin_attack(
        float64_copy(net),
        x,
        reference,
        eps,
        steps=15 if LARGE else 20,
        restarts=2,
        generator=torch.Generator().manual_seed(0),
        **domain,
    ).numpy()
    for method, cert in certificates.items():
        assert_below(cert.margins, sampled, what=f"sampled margin ({method})")
        assert_below(cert.margins, attacked, what=f"attacked margin ({method})")
    # alpha-CROWN starts from CROWN's slopes and keeps the best bound: never looser
    finite = np.isfinite(sampled)
    crown, alpha = certificates["crown"].margins, certificates["alpha-crown"].margins
    assert (alpha[finite] >= crown[finite] - 1e-5 * (1 + np.abs(crown[finite]))).all()
    # Complete verification: never certifies a sample a witness breaks, proves at least what
    # every bound method proves, and falsifies only with a real counterexample.
    complete = certify(net, x, eps, method="complete", timeout=5.0, **domain)
    np.testing.assert_array_equal(complete.prediction, reference)
    broken = (np.minimum(sampled, attacked) < -1e-5).any(1)
    assert not (complete.certified & broken).any(), "complete certified a broken sample"
    for method, cert in certificates.items():
        assert not (cert.certified & (complete.status == "falsified")).any(), method
        assert (complete.certified >= cert.certified).all(), method
    falsified = complete.status == "falsified"
    if falsified.any():
        points = torch.as_tensor(complete.counterexample[falsified], dtype=torch.float32)
        with torch.no_grad():
            logits = net(points)
        rows = torch.as_tensor(reference[falsified])
        assert (logits.gather(1, rows[:, None]).squeeze(1) < logits.max(1).values).all()
    COUNTS["examples"] += 1
    COUNTS["certificates"] += len(METHODS) * len(x)
