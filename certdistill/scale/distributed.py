"""Certification of dask arrays, one task per block of rows (on a dask cluster or locally).

:func:`certify_dask` returns lazy dask arrays: nothing runs until they are computed, and then each
block of rows is certified where it lives, by a worker holding a pickled copy of the network
(or estimator), with one torch thread by default. The results are those of
:func:`certdistill.certify` on the same rows: each sample is bounded independently.

Install the optional extra: ``pip install certdistill[dask]``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from certdistill.bounds import Perturbation
from certdistill.certification.certify import DEFAULT_METHOD, certify
from certdistill.certification.problem import module_device_dtype, output_width
from certdistill.scale.parallel import torch_threads as torch_threads_context
from certdistill.verify.cascade import CascadeOptions, check_stages

__all__ = ["DaskCertificate", "certify_dask"]

#: Longest ``decided_by`` (``"clean-prediction"``) and ``status`` (``"certified"``).
_STAGE_WIDTH = 16
_STATUS_WIDTH = 9


@dataclass(frozen=True)
class DaskCertificate:
    """Lazy result of :func:`certify_dask`: the fields of a :class:`~certdistill.Certificate`
    as dask arrays with the row chunks of ``X``.

    All of them are fields of ``records``, one task per block: compute them together
    (``dask.compute(result.status, result.margins)``, or :meth:`compute`), or ``persist`` the
    records, so that each block is certified once.

    Attributes
    ----------
    prediction : dask.array.Array of shape (n,)
        Reference class of each sample.
    margins : dask.array.Array of shape (n, n_classes)
        Lower bounds of ``z_ref - z_j``.
    certified : dask.array.Array of shape (n,)
    status : dask.array.Array of shape (n,)
        ``"certified"``, ``"falsified"`` or ``"unknown"``.
    decided_by : dask.array.Array of shape (n,)
    records : dask.array.Array of shape (n,)
        Structured array with the fields above, one record per sample.
    eps : float or ndarray
        The radius.
    method : str
        The stages, joined by ``"+"``.
    """

    prediction: object
    margins: object
    certified: object
    status: object
    decided_by: object
    records: object
    eps: float | np.ndarray
    method: str

    def compute(self, **kwargs) -> dict[str, np.ndarray]:
        """Compute every field in one pass over the blocks.

        Parameters
        ----------
        **kwargs
            Passed to ``dask.compute`` (e.g. ``scheduler=``).

        Returns
        -------
        dict of str to ndarray
            ``prediction``, ``margins``, ``certified``, ``status``, ``decided_by``.
        """
        import dask

        (records,) = dask.compute(self.records, **kwargs)
        return {name: records[name] for name in records.dtype.names}


def certify_dask(
    module_or_estimator,
    X,
    eps=None,
    *,
    method: str | Sequence[str] = DEFAULT_METHOD,
    y=None,
    lower=None,
    upper=None,
    batch_size: int = 256,
    timeout: float = 10.0,
    memory_limit: int | None = None,
    torch_threads: int | None = 1,
) -> DaskCertificate:
    """Certify the rows of a dask array block by block, lazily.

    Parameters
    ----------
    module_or_estimator : torch.nn.Module or fitted estimator
        A network (as :func:`certdistill.certify` takes it, on the CPU unless every worker has
        its device) or a fitted :class:`~certdistill.CertifiedTeacher` /
        :class:`~certdistill.DistilledStudent` (as its ``certify`` takes rows). It is pickled
        into the graph, to every worker that certifies a block.
    X : dask.array.Array of shape (n, ...)
        Inputs; the rows may be chunked in any way (the other axes are merged into one chunk).
    eps : float, array-like, Perturbation or None
        Radius. For a module: as in :func:`certdistill.certify` (required). For an estimator:
        ``None`` uses the estimator's ``eps``.
    method : str or sequence of str, default=("ibp", "crown-ibp", "crown")
        As in :func:`certdistill.certify`.
    y : array-like or dask array of shape (n,), optional
        Labels; rechunked like ``X``'s rows.
    lower, upper : float or array-like, optional
        Input domain, with a module (an estimator has its own).
    batch_size : int, default=256
        Samples bounded at once at most, in each task.
    timeout : float, default=10.0
        Seconds of branch and bound and MILP per sample.
    memory_limit : int or None, default=None
        Bytes the bound stages of one task may use; ``None``: each worker's default (see
        :func:`certdistill.certify`). With several worker threads per machine, divide it.
    torch_threads : int or None, default=1
        Torch threads of each task (:func:`~certdistill.scale.parallel.torch_threads`); ``None``
        leaves the worker's setting.

    Returns
    -------
    DaskCertificate
        Lazy per-sample results. Counterexamples are not returned: certify the falsified rows
        with :func:`certdistill.certify` to get them.

    Raises
    ------
    ValueError
        At the call for what can be checked without computing ``X`` (method, eps, domain,
        timeout, memory limit, the sample shape); when computing, as
        :func:`certdistill.certify` for the values of a block.
    """
    import dask.array as da

    stages = check_stages(method)
    CascadeOptions(timeout=timeout, memory_limit=memory_limit)  # validated before any task runs
    X = da.asarray(X)
    if X.ndim < 2:
        raise ValueError(f"X must have shape (n_samples, ...), got {X.shape}.")
    # One chunk across each sample, so that every block holds whole rows.
    X = X.rechunk({axis: -1 for axis in range(1, X.ndim)})
    target, eps, n_classes = _prepare(module_or_estimator, X, eps, lower, upper)
    arrays = [X, string.ascii_letters[: X.ndim]]
    if y is not None:
        labels = da.asarray(y)
        if labels.shape != (X.shape[0],):
            raise ValueError(f"y must have shape ({X.shape[0]},), got {labels.shape}.")
        arrays += [labels.rechunk((X.chunks[0],)), "a"]
    dtype = np.dtype(
        [
            ("prediction", np.int64),
            ("margins", _margin_dtype(target), (n_classes,)),
            ("certified", np.bool_),
            ("status", f"<U{_STATUS_WIDTH}"),
            ("decided_by", f"<U{_STAGE_WIDTH}"),
        ]
    )
    records = da.blockwise(
        _certify_block,
        "a",
        *arrays,
        dtype=dtype,
        concatenate=True,
        target=target,
        eps=eps,
        stages=stages,
        record_dtype=dtype,
        options=dict(batch_size=batch_size, timeout=timeout, memory_limit=memory_limit),
        threads=torch_threads,
    )
    eps_value = eps.eps_value if isinstance(eps, Perturbation) else eps
    return DaskCertificate(
        **{name: records[name] for name in dtype.names},
        records=records,
        eps=eps_value,
        method="+".join(stages),
    )


# ---------------------------------------------------------------------------- internals
def _is_estimator(target) -> bool:
    return not isinstance(target, nn.Module) and hasattr(target, "certify")


def _prepare(target, X, eps, lower, upper):
    """Validate what is known without computing ``X``: ``(target, eps, n_classes)``."""
    if _is_estimator(target):
        if lower is not None or upper is not None:
            raise ValueError("An estimator has its own domain: give lower/upper to it, not here.")
        target._check_fitted()
        n_features = int(np.prod(X.shape[1:]))
        if n_features != target.n_features_in_:
            raise ValueError(
                f"X has {n_features} features per sample, but the estimator was "
                f"fitted on {target.n_features_in_}."
            )
        if eps is not None:
            target.perturbation_.with_eps(eps)  # raises for an invalid radius, here
        return target, eps, len(target.classes_)
    if not isinstance(target, nn.Module):
        raise TypeError(
            f"module_or_estimator must be a torch.nn.Module or a fitted estimator, "
            f"got {type(target).__name__}."
        )
    if eps is None:
        raise ValueError("eps is required with a module.")
    device, dtype = module_device_dtype(target)
    if isinstance(eps, Perturbation):
        perturbation = eps
    else:
        perturbation = Perturbation.create(
            eps, X.shape[1:], lower=lower, upper=upper, dtype=dtype, device=device
        )
    probe = torch.zeros(1, *X.shape[1:], dtype=dtype, device=device)
    training = target.training
    target.eval()
    try:
        n_classes = output_width(target, probe)
    finally:
        target.train(training)
    return target, perturbation, n_classes


def _margin_dtype(target) -> np.dtype:
    if _is_estimator(target):
        target = target.module_
    _, dtype = module_device_dtype(target)
    return torch.empty((), dtype=dtype).numpy().dtype


def _certify_block(x, labels=None, *, target, eps, stages, record_dtype, options, threads):
    """Certify one block of rows (runs on a worker) into structured records."""
    with torch_threads_context(threads):
        if _is_estimator(target):
            certificate = target.certify(x, eps=eps, method=stages, y=labels, **options)
        else:
            certificate = certify(target, x, eps, method=stages, y=labels, **options)
    records = np.empty(len(x), dtype=record_dtype)
    for name in record_dtype.names:
        records[name] = getattr(certificate, name)
    return records
