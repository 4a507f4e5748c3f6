"""Data sets made from what scikit-learn ships, so that examples, tests and benchmarks need no
download."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.utils import check_random_state

__all__ = ["make_digits28"]


def make_digits28(n_samples: int = 10_000, *, side: int = 28, random_state=None):
    """MNIST-sized images of handwritten digits, generated from scikit-learn's 8x8 digits.

    Each image is one of the 1,797 digits of :func:`sklearn.datasets.load_digits`, scaled to
    ``[0, 1]``, enlarged to ``side - 8`` pixels a side by bilinear interpolation, placed at a
    random offset of up to 4 pixels on a ``side`` x ``side`` black canvas (MNIST's digits sit in a
    20x20 box inside 28x28), with uniform noise of amplitude 0.05, clipped to ``[0, 1]``. The data
    set has the size and shape of MNIST without a download; it is easier than MNIST (the strokes
    are smooth upsampled blocks).

    Parameters
    ----------
    n_samples : int, default=10000
        Number of images (the source digits are drawn with replacement).
    side : int, default=28
        Height and width of the images (at least 12).
    random_state : int, RandomState or None, default=None
        Seeds the choice of digits, the offsets and the noise.

    Returns
    -------
    X : ndarray of shape (n_samples, side * side), float32
        Flat images, values in ``[0, 1]``; reshape to ``(n, 1, side, side)`` for a CNN (or pass
        ``input_shape=(1, side, side)`` to the estimators).
    y : ndarray of shape (n_samples,), int64
        Digit labels 0-9.
    """
    if not (isinstance(n_samples, int | np.integer) and n_samples > 0):
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
    if not (isinstance(side, int | np.integer) and side >= 12):
        raise ValueError(f"side must be an integer of at least 12, got {side!r}.")
    rng = check_random_state(random_state)
    digits, labels = load_digits(return_X_y=True)
    chosen = rng.randint(0, len(digits), size=n_samples)
    small = torch.as_tensor(digits[chosen] / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    inner = side - 8
    enlarged = F.interpolate(small, size=(inner, inner), mode="bilinear", align_corners=False)
    canvas = torch.zeros(n_samples, 1, side, side)
    rows, cols = rng.randint(0, 9, size=n_samples), rng.randint(0, 9, size=n_samples)
    for i in range(n_samples):
        canvas[i, :, rows[i] : rows[i] + inner, cols[i] : cols[i] + inner] = enlarged[i]
    noise = torch.as_tensor(rng.uniform(-0.05, 0.05, size=canvas.shape), dtype=torch.float32)
    X = (canvas + noise).clamp(0.0, 1.0).view(n_samples, -1).numpy()
    return X, labels[chosen].astype(np.int64)
