"""Scorers for model selection by certified accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.pipeline import Pipeline

from certdistill.certification.certify import DEFAULT_METHOD

__all__ = ["CertifiedAccuracy"]


class CertifiedAccuracy:
    """Scorer: fraction of samples certified robustly correct at radius ``eps``.

    A callable ``scorer(estimator, X, y)`` usable wherever scikit-learn accepts a scorer, e.g.
    ``GridSearchCV(..., scoring={"accuracy": "accuracy", "certified": CertifiedAccuracy(0.1)},
    refit="certified")``. Greater is better.

    Parameters
    ----------
    eps : float or array-like
        Radius of the L-infinity ball.
    method : str or sequence of str, default=("ibp", "crown-ibp", "crown")
        Stage or cascade of :meth:`~certdistill.estimators.base.CertifiedNetBase.certify`;
        ``"complete"``
        scores by complete verification (samples left unknown count as not certified).
    timeout : float, default=10.0
        Seconds of branch and bound and MILP per sample (search stages only).
    budget : float or None, default=None
        Seconds per scoring call (search stages only).

    Notes
    -----
    The estimator must provide ``certified_accuracy(X, y, eps=..., method=...)`` (the certdistill
    estimators do), or be a :class:`~sklearn.pipeline.Pipeline` whose last step does. For a
    pipeline, the preceding steps transform ``X`` and the ball is taken around the transformed
    input, i.e. ``eps`` is measured in the space the network sees (for instance after a
    ``MinMaxScaler``).
    """

    def __init__(
        self,
        eps,
        method: str | Sequence[str] = DEFAULT_METHOD,
        *,
        timeout: float = 10.0,
        budget: float | None = None,
    ):
        self.eps = eps
        self.method = method
        self.timeout = timeout
        self.budget = budget

    def __call__(self, estimator, X, y, sample_weight=None) -> float:
        """Certified accuracy of ``estimator`` on ``X``, ``y``.

        Parameters
        ----------
        estimator : estimator
            A fitted certdistill estimator or a pipeline ending in one.
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        sample_weight : array-like of shape (n_samples,) or None, default=None
            Optional weights of the samples.

        Returns
        -------
        float
        """
        if y is None:
            raise ValueError("CertifiedAccuracy requires y (the true labels).")
        final = estimator
        if isinstance(estimator, Pipeline):
            Xt = X
            for _, step in estimator.steps[:-1]:
                if step is None or step == "passthrough":
                    continue
                Xt = step.transform(Xt)
            X, final = Xt, estimator.steps[-1][1]
        if not hasattr(final, "certify"):
            raise TypeError(
                f"CertifiedAccuracy needs an estimator with a 'certify' method, got "
                f"{type(final).__name__}"
            )
        certified = final.certify(
            X, eps=self.eps, method=self.method, y=y, timeout=self.timeout, budget=self.budget
        ).certified
        if sample_weight is None:
            return float(np.mean(certified))
        return float(np.average(certified, weights=np.asarray(sample_weight)))

    def __repr__(self) -> str:
        return (
            f"CertifiedAccuracy(eps={self.eps!r}, method={self.method!r}, "
            f"timeout={self.timeout!r}, budget={self.budget!r})"
        )
