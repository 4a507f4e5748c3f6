"""The certification API of the fitted estimators (:class:`CertificationAPI`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from certdistill.bounds import Perturbation
from certdistill.certification.certify import DEFAULT_METHOD
from certdistill.certification.problem import Certificate, Problem, check_radius_search
from certdistill.certification.streaming import certify_stream, is_streamed
from certdistill.estimators.calls import in_torch_threads
from certdistill.verify.cascade import CascadeOptions, check_stages

__all__ = ["CertificationAPI"]


class CertificationAPI:
    """What both estimators certify with: :meth:`certify`, :meth:`certified_radius` and
    :meth:`certified_accuracy` on the fitted network, through
    :class:`~certdistill.certification.problem.Problem`."""

    # -------------------------------------------------------- certification
    def _certification_inputs(self, X, y) -> tuple[Tensor, np.ndarray | None]:
        """Validated rows as the module's input, and encoded labels (of one chunk, streamed)."""
        x = self.module_input(self._validate_predict_data(X))
        return x, None if y is None else self._encode_labels(np.asarray(y).reshape(-1))

    def _certification_perturbation(self, eps) -> Perturbation:
        return self.perturbation_ if eps is None else self.perturbation_.with_eps(eps)

    def _certification_problem(self, X, y, eps, batch_size: int = 256) -> Problem:
        x, labels = self._certification_inputs(X, y)
        return Problem.create(
            self.module_, x, self._certification_perturbation(eps), y=labels, batch_size=batch_size
        )

    @in_torch_threads
    def certify(
        self,
        X,
        eps=None,
        method: str | Sequence[str] = DEFAULT_METHOD,
        *,
        y=None,
        batch_size: int = 256,
        timeout: float = 10.0,
        budget: float | None = None,
        verbose: int = 0,
        memory_limit: int | None = None,
    ) -> Certificate:
        """Certify each sample's prediction (or label) in the L-infinity ball of radius eps.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), or iterable of batches
            Inputs. A :class:`numpy.memmap` (or a dask, h5py or zarr array) is validated and
            certified ``batch_size`` rows at a time, an iterable of batches (arrays of rows or
            ``(X, y)`` pairs) batch by batch (see :func:`certdistill.certify`).
        eps : float, array-like or None, default=None
            Radius; ``None`` uses the estimator's ``eps``.
        method : str or sequence of str, default=("ibp", "crown-ibp", "crown")
            A stage or a cascade of stages, each run on the samples the previous ones left
            open: the bound methods ``"ibp"``, ``"crown-ibp"``, ``"crown"``, ``"alpha-crown"``,
            and ``"attack"``, ``"refine"``, ``"bab"``, ``"milp"``; ``"complete"`` decides every
            sample (certified or falsified) within its ``timeout`` (see
            :func:`certdistill.certify`).
        y : array-like of shape (n_samples,) or None, default=None
            Labels (of the type seen in ``fit``): the certificate then says the sample is
            robustly classified *correctly*.
        batch_size : int, default=256
            Samples bounded at once at most; rows read at a time from a memory-mapped ``X``.
        timeout : float, default=10.0
            Seconds of branch and bound and MILP per sample.
        budget : float or None, default=None
            Seconds for the whole call.
        verbose : int, default=0
            A progress bar for the search stages (and the rows of streamed inputs) when > 0.
        memory_limit : int or None, default=None
            Bytes the bound stages may use (see :func:`certdistill.certify`).

        Returns
        -------
        certdistill.Certificate
            ``prediction`` holds class indices into ``classes_`` (``classes_[prediction]`` are the
            labels); ``margins`` columns follow ``classes_``.
        """
        stages = check_stages(method)
        options = CascadeOptions(
            timeout=timeout, budget=budget, verbose=verbose, memory_limit=memory_limit
        )
        if is_streamed(X):
            self._check_fitted()
            return certify_stream(
                self.module_,
                X,
                self._certification_perturbation(eps),
                y=y,
                stages=stages,
                options=options,
                batch_size=batch_size,
                prepare=self._certification_inputs,
            )
        return self._certification_problem(X, y, eps, batch_size).certify(stages, options)

    @in_torch_threads
    def certified_radius(
        self,
        X,
        *,
        y=None,
        method: str | Sequence[str] = DEFAULT_METHOD,
        max_eps: float = 1.0,
        tol: float = 1e-3,
        timeout: float = 10.0,
    ) -> np.ndarray:
        """Largest certified L-infinity radius of each sample (bisection on eps).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or None, default=None
            Labels; with them the radius is 0 for misclassified samples.
        method : str or sequence of str, default=("ibp", "crown-ibp", "crown")
            Bound method(s), as in :meth:`certify`.
        max_eps : float, default=1.0
            Upper end of the search.
        tol : float, default=1e-3
            Bisection tolerance.
        timeout : float, default=10.0
            Seconds of branch and bound and MILP per sample and radius tried.

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        max_eps, tol = check_radius_search(max_eps, tol)
        stages = check_stages(method)
        problem = self._certification_problem(X, y, 0.0)
        return problem.radius(
            stages, max_eps=max_eps, tol=tol, options=CascadeOptions(timeout=timeout)
        )

    def certified_accuracy(
        self,
        X,
        y,
        eps=None,
        method: str | Sequence[str] = DEFAULT_METHOD,
        *,
        timeout: float = 10.0,
        budget: float | None = None,
    ) -> float:
        """Fraction of samples certified robustly correct at radius ``eps``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            True labels.
        eps : float or None, default=None
            Radius; ``None`` uses the estimator's ``eps``.
        method : str or sequence of str, default=("ibp", "crown-ibp", "crown")
            Stage(s), as in :meth:`certify` (``"complete"`` for complete verification).
        timeout, budget : float
            As in :meth:`certify`.

        Returns
        -------
        float
        """
        if y is None:
            raise ValueError(
                f"{type(self).__name__}.certified_accuracy requires y (the true labels): the "
                "fraction of robust predictions is certify(X).certified_fraction."
            )
        return float(
            np.mean(
                self.certify(
                    X, eps=eps, method=method, y=y, timeout=timeout, budget=budget
                ).certified
            )
        )
