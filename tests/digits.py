"""Small slices of scikit-learn's digits data for fast estimator tests."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits


def small_digits(n_classes: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images of the digits ``0 .. n_classes - 1``, scaled to [0, 1].

    Returns
    -------
    X : ndarray of shape (n, 64), float32
    y : ndarray of shape (n,), int
    """
    X, y = load_digits(return_X_y=True)
    keep = y < n_classes
    return (X[keep] / 16.0).astype(np.float32)[:n], y[keep][:n]


#: Fit settings the estimator tests share: a small box on [0, 1] and three quick epochs.
SMALL_FIT = dict(eps=0.05, lower=0.0, upper=1.0, max_epochs=3, lr=1e-2, random_state=0)
