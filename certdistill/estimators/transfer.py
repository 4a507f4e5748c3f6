"""Transfer sets: inputs a teacher labels for its student, beyond the labelled training data.

A certified teacher can label any input, so a student need not learn from the labelled rows
alone. :func:`transfer_inputs` makes new inputs from the training inputs (the teacher labels
them in :class:`~certdistill.DistilledStudent`); unlabelled rows given to ``fit`` with the label
``-1`` (scikit-learn's semi-supervised convention) are labelled the same way.

Kinds (``transfer=`` of the student):

* ``"noise"``: uniform noise of amplitude ``2 * eps`` per feature;
* ``"ball"``: points of the eps ball and just outside it, uniform in ``x +- 1.5 * eps``;
* ``"shift"``: images shifted by one pixel in a random direction (needs ``input_shape``);
* ``"mixup"``: convex combinations ``t x_i + (1 - t) x_j`` of two training inputs, ``t`` uniform.

Every point is clipped into the input domain.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["TRANSFER_KINDS", "transfer_inputs"]

#: Kinds of generated transfer inputs.
TRANSFER_KINDS = ("noise", "ball", "shift", "mixup")


def transfer_inputs(
    X: np.ndarray,
    kinds: Sequence[str],
    size: float,
    eps: np.ndarray,
    *,
    lower: np.ndarray | None,
    upper: np.ndarray | None,
    input_shape: Sequence[int] | None,
    random_state: np.random.RandomState,
    return_sources: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """New inputs made from ``X`` for the teacher to label.

    Parameters
    ----------
    X : ndarray of shape (n, n_features)
        Training inputs (flat rows).
    kinds : sequence of str
        Kinds of :data:`TRANSFER_KINDS`, each making ``round(size * n)`` inputs.
    size : float
        Inputs per kind, as a multiple of ``n``.
    eps : ndarray
        Radius per feature (flat, or a scalar array).
    lower, upper : ndarray or None
        The input domain per feature (flat), or unbounded.
    input_shape : sequence of int or None
        Shape of one sample, for ``"shift"``.
    random_state : numpy.random.RandomState
        Source of randomness.
    return_sources : bool, default=False
        Also return, per input made, the row of ``X`` it was made from (for ``"mixup"``, the
        first of its two rows).

    Returns
    -------
    points : ndarray of shape (m, n_features), float32
    sources : ndarray of shape (m,), int
        Only with ``return_sources``.
    """
    n, n_features = X.shape
    count = int(round(float(size) * n))
    eps = np.broadcast_to(
        np.asarray(eps, dtype=np.float32).reshape(-1) if np.ndim(eps) else np.float32(eps),
        (n_features,),
    )
    made, sources = [], []
    for kind in kinds:
        chosen = random_state.randint(0, n, size=count)
        sources.append(chosen)
        rows = X[chosen]
        if kind == "noise":
            made.append(rows + random_state.uniform(-2.0, 2.0, rows.shape) * eps)
        elif kind == "ball":
            made.append(rows + random_state.uniform(-1.5, 1.5, rows.shape) * eps)
        elif kind == "mixup":
            others = X[random_state.randint(0, n, size=count)]
            t = random_state.uniform(0.0, 1.0, (count, 1))
            made.append(t * rows + (1 - t) * others)
        elif kind == "shift":
            made.append(_shifted(rows, tuple(input_shape), random_state))
        else:  # validated by the estimator
            raise ValueError(f"unknown transfer kind {kind!r}")
    if not made:
        points, rows = np.empty((0, n_features), dtype=np.float32), np.empty(0, dtype=int)
    else:
        points, rows = np.concatenate(made).astype(np.float32), np.concatenate(sources)
    if lower is not None:
        points = np.maximum(points, lower)
    if upper is not None:
        points = np.minimum(points, upper)
    return (points, rows) if return_sources else points


def _shifted(rows: np.ndarray, input_shape: tuple[int, ...], random_state) -> np.ndarray:
    """Each image moved by one pixel up, down, left or right (zeros enter at the edge)."""
    images = rows.reshape(len(rows), *input_shape)
    out = np.zeros_like(images)
    direction = random_state.randint(0, 4, size=len(rows))
    for code, (dy, dx) in enumerate(((-1, 0), (1, 0), (0, -1), (0, 1))):
        chosen = direction == code
        source = images[chosen]
        target = np.zeros_like(source)
        height, width = input_shape[-2:]
        ys, yt = (
            (slice(1, height), slice(0, height - 1))
            if dy < 0
            else (
                (slice(0, height - 1), slice(1, height)) if dy > 0 else (slice(None), slice(None))
            )
        )
        xs, xt = (
            (slice(1, width), slice(0, width - 1))
            if dx < 0
            else ((slice(0, width - 1), slice(1, width)) if dx > 0 else (slice(None), slice(None)))
        )
        target[..., yt, xt] = source[..., ys, xs]
        out[chosen] = target
    return out.reshape(len(rows), -1)
