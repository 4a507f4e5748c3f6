"""Certification of trained networks: per-sample certificates and certified radii.

A certification is a cascade of bound methods, cheapest first: every sample is bounded by the
first method, and each later method runs only on the samples still open (not yet certified, and
not already refuted by a wrong clean prediction). Per margin, the largest of the (all sound)
lower bounds computed for a sample is kept. The clean logits, hence the reference class when no
label is given, come from the first method's own forward sweep.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from torch import nn

from certdistill.certification.problem import (
    BACKENDS,
    STATUSES,
    Certificate,
    Problem,
    check_radius_search,
    eval_mode,
)
from certdistill.verify.cascade import CascadeOptions, check_stages

__all__ = [
    "BACKENDS",
    "DEFAULT_METHOD",
    "STATUSES",
    "Certificate",
    "certified_radius",
    "certify",
    "eval_mode",
]

#: The default cascade: IBP on every sample, CROWN-IBP and CROWN on the samples still open.
DEFAULT_METHOD: tuple[str, ...] = ("ibp", "crown-ibp", "crown")


def certify(
    module: nn.Module,
    X,
    eps,
    *,
    method: str | Sequence[str] = DEFAULT_METHOD,
    y=None,
    lower=None,
    upper=None,
    batch_size: int = 256,
    backend: str = "native",
    timeout: float = 10.0,
    budget: float | None = None,
    verbose: int = 0,
    memory_limit: int | None = None,
) -> Certificate:
    """Certify that each sample's reference class wins everywhere in an L-infinity ball.

    Parameters
    ----------
    module : torch.nn.Module or path
        An ``nn.Sequential`` of supported layers (any module with ``backend="auto_lirpa"``),
        or the path of an ``.onnx`` file (read by :func:`~certdistill.load_onnx`). It is
        evaluated in eval mode; its train/eval state is restored afterwards.
    X : array-like or Tensor of shape (n, ...), or iterable of batches
        Inputs, shaped as the module expects them. Arrays stored outside memory (a
        :class:`numpy.memmap`, a dask, h5py or zarr array) are read ``batch_size`` rows at a
        time, and an iterable of batches (a generator, a DataLoader; each batch an array of rows
        or an ``(X, y)`` pair) is certified batch by batch, with memory independent of the
        number of samples (:mod:`certdistill.certification.streaming`).
    eps : float, array-like, Perturbation or None
        Radius of the ball: a scalar or an array broadcastable to one sample (per feature); or a
        :class:`~certdistill.bounds.Perturbation` (then ``lower`` and ``upper`` must be None);
        or ``None`` with one box per sample in ``lower`` and ``upper`` (VNN-LIB's form).
    method : str or sequence of str, default=("ibp", "crown-ibp", "crown")
        A stage or a cascade of stages tried in order, each on the samples the previous ones
        left open: the bound methods ``"ibp"``, ``"crown-ibp"``, ``"crown"``, ``"alpha-crown"``
        (incomplete: they certify or leave the sample ``unknown``), ``"attack"`` (PGD towards
        every class; falsifies), ``"refine"`` (intermediate bounds tightened by linear
        programming; certifies), ``"bab"`` (branch and bound over ReLUs) and ``"milp"`` (exact
        mixed-integer program). ``"complete"`` is the whole cascade
        (:data:`~certdistill.verify.cascade.COMPLETE`): every sample is certified or falsified
        unless its ``timeout`` or the ``budget`` runs out.
    y : array-like of shape (n,), optional
        Integer labels in ``[0, n_classes)``. When given, the certificate says the sample is
        robustly *correct* (a wrong clean prediction falsifies it); otherwise that the clean
        prediction is robust.
    lower, upper : float or array-like, optional
        Input domain (e.g. ``0`` and ``1`` for images) intersected with the ball: scalars or
        arrays broadcastable to one sample; or arrays of the shape of ``X``, one box per sample
        (with ``eps=None`` the whole box, else the box intersected with the ball). Each sample
        must lie inside its box.
    batch_size : int, default=256
        Samples bounded at once at most (fewer when ``memory_limit`` requires it); rows read at
        a time from an array stored outside memory.
    backend : {"native", "auto_lirpa"}, default="native"
        Engine of the bound stages.
    timeout : float, default=10.0
        Seconds of branch and bound and MILP per sample (ReLU networks only).
    budget : float or None, default=None
        Seconds for the whole call; samples still open when it runs out stay ``unknown``.
    verbose : int, default=0
        A progress bar on stderr for the search stages (and of the rows of streamed inputs)
        when > 0.
    memory_limit : int or None, default=None
        Bytes the bound stages may use: the samples bounded at once and the groups of CROWN's
        backward passes are planned from it (:mod:`certdistill.bounds.memory`), so a large
        network is bounded in smaller pieces instead of running out of memory. ``None``: half
        of the free memory on a GPU, a quarter of the RAM (at most 8 GiB) on the CPU.

    Returns
    -------
    Certificate
        Per sample: ``status`` certified / falsified / unknown, the ``margins`` lower bounds,
        the stage that ``decided_by`` it and a ``counterexample`` for falsified samples.

    Raises
    ------
    ValueError
        For NaN or infinite inputs, a negative or non-finite eps, a shape that does not fit the
        module, ``lower > upper``, inputs outside the domain, labels outside the classes, an
        unknown method, a non-positive timeout or budget, or complete verification of a module
        with non-ReLU activations.
    UnsupportedLayerError
        If the native engine cannot handle a layer of the module.

    Notes
    -----
    A sample is ``certified`` only by lower bounds that are positive, or by a MILP whose dual
    bound exceeds :data:`~certdistill.verify.milp.MILP_TOLERANCE`; it is ``falsified`` only by an
    input of the ball and the domain at which the module (its own precision, eval mode) and a
    float64 copy of it both prefer another class.
    """
    # Imported here: the streaming path builds on this module's Problem.
    from certdistill.certification.streaming import certify_stream, is_streamed

    module = as_module(module)
    stages = check_stages(method)
    options = CascadeOptions(
        timeout=timeout, budget=budget, verbose=verbose, memory_limit=memory_limit
    )
    if is_streamed(X):
        if eps is None:
            raise ValueError("a box per sample (eps=None) needs X in memory, not streamed.")
        return certify_stream(
            module,
            X,
            eps,
            y=y,
            stages=stages,
            options=options,
            lower=lower,
            upper=upper,
            batch_size=batch_size,
            backend=backend,
        )
    problem = Problem.create(
        module, X, eps, y=y, lower=lower, upper=upper, batch_size=batch_size, backend=backend
    )
    return problem.certify(stages, options)


def certified_radius(
    module: nn.Module,
    X,
    *,
    method: str | Sequence[str] = DEFAULT_METHOD,
    y=None,
    lower=None,
    upper=None,
    max_eps: float = 1.0,
    tol: float = 1e-3,
    batch_size: int = 256,
    backend: str = "native",
    timeout: float = 10.0,
) -> np.ndarray:
    """Largest certified L-infinity radius of each sample, by bisection on eps.

    Parameters
    ----------
    module : torch.nn.Module
        As in :func:`certify`.
    X : array-like or Tensor of shape (n, ...)
        As in :func:`certify`.
    method : str or sequence of str, default=("ibp", "crown-ibp", "crown")
        As in :func:`certify`.
    y : array-like of shape (n,), optional
        As in :func:`certify`; with labels the radius is 0 for misclassified samples.
    lower, upper : float or array-like, optional
        As in :func:`certify`.
    max_eps : float, default=1.0
        Upper end of the search interval; samples certified there get ``max_eps``.
    tol : float, default=1e-3
        Width of the final bisection interval.
    batch_size : int, default=256
        As in :func:`certify`.
    backend : {"native", "auto_lirpa"}, default="native"
        As in :func:`certify`.
    timeout : float, default=10.0
        As in :func:`certify`, at each radius tried.

    Returns
    -------
    ndarray of shape (n,)
        A radius at which each sample is certified (0 where not even the clean point is: a
        misclassified or tied sample). The true certifiable radius of the method lies within
        ``tol`` above it; with ``method="complete"``, unless a sample's timeout ran out, the
        bisection brackets the sample's exact robust radius.
    """
    module = as_module(module)
    max_eps, tol = check_radius_search(max_eps, tol)
    stages = check_stages(method)
    options = CascadeOptions(timeout=timeout)
    problem = Problem.create(
        module, X, 0.0, y=y, lower=lower, upper=upper, batch_size=batch_size, backend=backend
    )
    return problem.radius(stages, max_eps=max_eps, tol=tol, options=options)


def as_module(model) -> nn.Module:
    """``model`` itself, or the network of an ONNX file path (:func:`~certdistill.load_onnx`)."""
    if isinstance(model, str | os.PathLike):
        from certdistill.io.onnx_import import load_onnx  # optional dependency, read on use

        return load_onnx(model)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"module must be a torch.nn.Module or the path of an .onnx file, got "
            f"{type(model).__name__}."
        )
    return model
