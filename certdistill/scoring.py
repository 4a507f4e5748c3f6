"""Scorers for model selection by certified accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.pipeline import Pipeline

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
    method : str or sequence of str, default="crown"
        Bound method(s) of :meth:`~certdistill.base.CertifiedNetBase.certify`; with several,
        each sample keeps the largest of their sound lower bounds.

    Notes
    -----
    The estimator must provide ``certified_accuracy(X, y, eps=..., method=...)`` (the certdistill
    estimators do), or be a :class:`~sklearn.pipeline.Pipeline` whose last step does. For a
    pipeline, the preceding steps transform ``X`` and the ball is taken around the transformed
    input, i.e. ``eps`` is measured in the space the network sees (for instance after a
    ``MinMaxScaler``).
    """

    def __init__(self, eps, method: str | Sequence[str] = "crown"):
        self.eps = eps
        self.method = method

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
        if sample_weight is None:
            return float(final.certified_accuracy(X, y, eps=self.eps, method=self.method))
        certified = final.certify(X, eps=self.eps, method=self.method, y=y).certified
        return float(np.average(certified, weights=np.asarray(sample_weight)))

    def __repr__(self) -> str:
        return f"CertifiedAccuracy(eps={self.eps!r}, method={self.method!r})"
