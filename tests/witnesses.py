"""Witnesses for soundness tests: margins of real points of the perturbation box.

A certified margin is a lower bound of ``z_ref - z_j`` over the box, so it must never exceed the
margin of any point of the box. These helpers evaluate such points (centres, uniform samples and
corners) with a float64 copy of the network, sharing no code with the bound engine, and compare.
Tolerances: float32 modules are checked with ``1e-5`` relative + absolute slack.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from milp import feasible_box as box
from networks import float64_copy
from torch import nn

RTOL = ATOL = 1e-5


def logits64(net64: nn.Module, points: np.ndarray) -> np.ndarray:
    """Float64 logits of a float64 eval-mode network on a batch of points."""
    with torch.no_grad():
        return net64(torch.as_tensor(points, dtype=torch.float64)).numpy()


def sample_box(
    lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator, n_random: int, n_corners: int
) -> np.ndarray:
    """Points of the box: centers, uniform samples and corners; shape ``(k, n, *shape)``.

    All corners are taken when there are at most ``n_corners`` of them, random
    corners otherwise. Corners matter: for a net that is affine on the box the
    worst point is a corner.
    """
    d = lo[0].size
    u = rng.random((n_random, *lo.shape))
    points = [(lo + hi)[None] / 2, lo + (hi - lo) * u]
    if 2**d <= n_corners:
        signs = np.array(list(itertools.product([0.0, 1.0], repeat=d)))
        signs = np.broadcast_to(signs[:, None, :], (len(signs), lo.shape[0], d))
    else:
        signs = rng.integers(0, 2, size=(n_corners, lo.shape[0], d)).astype(np.float64)
    signs = signs.reshape((-1, *lo.shape))
    points.append(lo + (hi - lo) * signs)
    return np.concatenate(points, axis=0)


def sampled_min_margins(
    net: nn.Module,
    x: np.ndarray,
    reference: np.ndarray,
    eps,
    *,
    lower=None,
    upper=None,
    seed: int = 0,
    n_random: int = 300,
    n_corners: int = 256,
) -> np.ndarray:
    """Smallest float64 margin ``z_ref - z_j`` over sampled points, ``(n, C)``, +inf at ref."""
    net64 = float64_copy(net)
    lo, hi = box(x, eps, lower, upper)
    pts = sample_box(lo, hi, np.random.default_rng(seed), n_random, n_corners)
    k, n = pts.shape[:2]
    z = logits64(net64, pts.reshape(k * n, *pts.shape[2:])).reshape(k, n, -1)
    zr = np.take_along_axis(z, np.broadcast_to(reference[None, :, None], (k, n, 1)), axis=2)
    worst = (zr - z).min(axis=0)
    worst[np.arange(n), reference] = np.inf
    return worst


def assert_below(bounds, witness, *, atol=ATOL, rtol=RTOL, what="witness") -> None:
    """Assert ``bounds <= witness`` elementwise up to tolerance, with a precise message."""
    bounds = np.asarray(bounds, dtype=np.float64)
    witness = np.asarray(witness, dtype=np.float64)
    assert bounds.shape == witness.shape, (bounds.shape, witness.shape)
    finite = np.isfinite(witness)
    # The reference column is +inf in both; elsewhere the bound must be finite-or-below.
    assert np.array_equal(np.isinf(witness) & (witness > 0), np.isinf(bounds) & (bounds > 0))
    slack = atol + rtol * np.abs(np.where(finite, witness, 0.0))
    bad = finite & ~(bounds <= witness + slack)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise AssertionError(
            f"unsound bound at sample {i}, class {j}: bound {bounds[i, j]:.9g} > "
            f"{what} {witness[i, j]:.9g} ({bad.sum()} violations)"
        )


def reference_of(net: nn.Module, x: np.ndarray) -> np.ndarray:
    return logits64(float64_copy(net), x).argmax(1)
