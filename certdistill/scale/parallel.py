"""Torch threads of parallel fits (grid searches on joblib or dask workers).

PyTorch runs a CPU operation on all cores by default. Parallel fits, e.g. ``GridSearchCV(...,
n_jobs=-1)`` on joblib's process workers or on a dask cluster, would then each start as many
threads as there are cores and oversubscribe them; the small networks of certified training
lose far more to that than they gain from intra-op threads. The parallel backends already
limit the threads of the processes they start, through environment variables that torch reads
when it starts:

* a dask worker started by a nanny (``LocalCluster(processes=True)``, ``dask worker``) gets
  ``OMP_NUM_THREADS=1`` (dask's ``distributed.nanny.pre-spawn-environ`` configuration);
* a joblib ``loky`` worker (the default backend of ``n_jobs``) gets ``cpu_count() // n_jobs``;
* a variable already set in the environment wins in both.

The estimators leave this as it is. Their ``torch_threads`` parameter sets the number of threads
explicitly while they fit, predict and certify (:func:`torch_threads`).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(n_threads: int | None) -> Iterator[None]:
    """Run a block with ``n_threads`` torch intra-op threads, then restore the previous number.

    Parameters
    ----------
    n_threads : int or None
        Number of threads (>= 1); ``None`` changes nothing.

    Raises
    ------
    ValueError
        If ``n_threads`` is neither None nor a positive integer.

    Notes
    -----
    With torch's OpenMP parallel backend (``torch.__config__.parallel_info()`` names it), the
    number of threads belongs to the calling thread once that thread has run a parallel
    operation: the setting and its restoration apply to the thread running the block, so fits
    running at the same time in several threads of one process (e.g. a dask worker with
    ``threads_per_worker > 1``) do not change each other's setting. For the same reason,
    ``torch.set_num_threads`` called in another thread (e.g. with dask's ``Client.run``) does not
    reach the threads that run the fits, whereas an estimator's ``torch_threads`` does.

    Examples
    --------
    >>> import torch
    >>> from certdistill.scale.parallel import torch_threads
    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    if n_threads is None:
        yield
        return
    if isinstance(n_threads, bool) or not isinstance(n_threads, numbers.Integral) or n_threads < 1:
        raise ValueError(f"torch_threads must be None or a positive int, got {n_threads!r}")
    previous = torch.get_num_threads()
    if previous == n_threads:
        yield
        return
    torch.set_num_threads(int(n_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
