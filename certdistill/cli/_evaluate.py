"""Evaluation of a fitted estimator for the command line: size, PGD and certified accuracy."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "certified_accuracy_timed",
    "encode_labels",
    "n_parameters",
    "pgd_accuracy",
]


def n_parameters(model) -> int:
    """Number of trainable parameters of a fitted estimator's network."""
    return sum(p.numel() for p in model.module_.parameters() if p.requires_grad)


def encode_labels(model, y) -> np.ndarray:
    """Indices of the labels ``y`` in ``model.classes_``.

    Raises
    ------
    ValueError
        If ``y`` holds a label the model was not trained on.
    """
    classes = np.asarray(model.classes_)
    y = np.asarray(y)
    lookup = {label: i for i, label in enumerate(classes.tolist())}
    try:
        return np.array([lookup[label] for label in y.tolist()], dtype=np.int64)
    except KeyError as error:
        raise ValueError(
            f"the data have the label {error.args[0]!r}, which the model was not trained on "
            f"(its classes: {classes.tolist()!r})"
        ) from None


def _sample_bound(bound, sample_shape: torch.Size):
    """A domain bound as the attack needs it: a float, or an array shaped like one sample."""
    if bound is None or np.ndim(bound) == 0:
        return None if bound is None else float(bound)
    return np.asarray(bound, dtype=np.float32).reshape(tuple(sample_shape))


def pgd_accuracy(
    model,
    X: np.ndarray,
    y,
    eps: float,
    *,
    steps: int = 20,
    restarts: int = 1,
    seed: int = 0,
    batch_size: int = 512,
) -> float:
    """Accuracy under a seeded PGD attack (cross-entropy, L-infinity ball of radius ``eps``).

    A sample counts as robust when it is classified correctly both at the clean input and at
    the attack's point, so the result never exceeds the clean accuracy. This is an *upper*
    bound of the true robust accuracy (a stronger attack may find more), unlike the certified
    accuracy, which is a lower bound.

    Parameters
    ----------
    model : certdistill.estimators.base.CertifiedNetBase
        Fitted estimator; the attack respects its input domain ``lower``/``upper``.
    X : ndarray of shape (n_samples, n_features)
    y : array-like of shape (n_samples,)
        Labels, as the model's ``classes_``.
    eps : float
        Radius of the ball.
    steps, restarts : int, default=20, 1
        PGD steps and random restarts.
    seed : int, default=0
        Seed of the random starts.
    batch_size : int, default=512
        Samples attacked at once.

    Returns
    -------
    float
    """
    from certdistill.certification.certify import eval_mode
    from certdistill.verify.attacks import pgd_attack

    target = encode_labels(model, y)
    module = model.module_
    generator = None
    correct = []
    with eval_mode(module):
        for start in range(0, len(target), batch_size):
            x = model.module_input(X[start : start + batch_size])
            labels = torch.as_tensor(target[start : start + batch_size], device=x.device)
            with torch.no_grad():
                robust = module(x).argmax(1) == labels
            if eps > 0:
                if generator is None:
                    generator = torch.Generator(device=x.device).manual_seed(int(seed))
                adversarial = pgd_attack(
                    module,
                    x,
                    labels,
                    float(eps),
                    steps=steps,
                    restarts=restarts,
                    lower=_sample_bound(model.lower, x.shape[1:]),
                    upper=_sample_bound(model.upper, x.shape[1:]),
                    generator=generator,
                )
                with torch.no_grad():
                    robust &= module(adversarial).argmax(1) == labels
            correct.append(robust.cpu().numpy())
    return float(np.concatenate(correct).mean())


def certified_accuracy_timed(
    model,
    X: np.ndarray,
    y,
    eps: float,
    methods: Sequence[str],
    *,
    batch_size: int = 256,
    timeout: float = 10.0,
) -> tuple[float, float]:
    """Certified accuracy at ``eps`` (by the cascade of ``methods``) and its throughput.

    Returns
    -------
    accuracy : float
        Fraction of samples certified robustly correct.
    samples_per_second : float
        Samples certified per second of wall-clock time (all methods together).
    """
    # Untimed warm-up: the first call pays one-time costs (allocator, kernel selection) that
    # would understate the steady-state throughput.
    method = methods[0] if len(methods) == 1 else tuple(methods)
    model.certify(X[:2], eps=eps, method=method, y=np.asarray(y)[:2], timeout=timeout)
    start = time.perf_counter()
    certificate = model.certify(
        X, eps=eps, method=method, y=y, batch_size=batch_size, timeout=timeout
    )
    seconds = time.perf_counter() - start
    return certificate.certified_fraction, len(certificate) / max(seconds, 1e-9)
