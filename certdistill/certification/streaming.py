"""Certification of data that does not fit in memory, chunk by chunk.

:func:`certdistill.certify` and the estimators' ``certify`` stream two kinds of ``X`` through
this module instead of converting it to one tensor (:func:`is_streamed` tells them apart from
in-memory data, which keeps the direct path):

* arrays stored outside memory: :class:`numpy.memmap`, and dask, h5py and zarr arrays, read
  ``batch_size`` rows at a time (labels ``y``, if given, are sliced alongside);
* iterables of batches that are not arrays (generators, iterators, a
  ``torch.utils.data.DataLoader``): each batch an array or tensor of rows, or a pair ``(X, y)``
  (a tuple or a list, as a DataLoader yields), certified as it comes.

Every chunk is validated as in-memory data is, by the same code (sample shape, finite values,
the domain, labels), and certified by the same cascade, so a chunk's margins equal those of the
same rows certified in memory. The radius and the domain are validated once, on the first
chunk, and passed on as a :class:`~certdistill.bounds.Perturbation`; a ``budget`` is shared by
all chunks (each runs at least its first stage, which gives the reference class).

Only the per-sample results are kept (prediction, margins, status, stage: tens of bytes per
sample plus four or eight per class); the counterexamples are kept for the falsified samples
only, in a :class:`~certdistill.certification.sparse_rows.SparseRows` that reads as an array of NaN
rows
elsewhere, so memory does not grow with the size of a sample either.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from torch import Tensor, nn

from certdistill.bounds import Perturbation
from certdistill.bounds.memory import default_memory_limit
from certdistill.certification.problem import Certificate, Problem, module_device_dtype
from certdistill.certification.sparse_rows import SparseRows
from certdistill.verify.cascade_state import CascadeOptions, Progress

__all__ = ["certify_stream", "is_streamed"]

#: Packages whose arrays live outside memory (or are lazy) and are read chunk by chunk.
_CHUNKED_ARRAY_PACKAGES = ("dask", "h5py", "zarr")


def is_streamed(X) -> bool:
    """Whether :func:`certdistill.certify` reads ``X`` chunk by chunk.

    True for a :class:`numpy.memmap`, a dask, h5py or zarr array, and an iterable that is not an
    array (a generator, an iterator, a DataLoader: an iterable of batches); False for NumPy
    arrays in memory, tensors, lists and tuples (and anything else with ``__array__``).
    """
    if isinstance(X, np.memmap):
        return True
    if isinstance(X, np.ndarray | Tensor | list | tuple | str | bytes | dict):
        return False
    if type(X).__module__.split(".")[0] in _CHUNKED_ARRAY_PACKAGES and hasattr(X, "shape"):
        return True
    return isinstance(X, Iterable) and not hasattr(X, "__array__")


def certify_stream(
    module: nn.Module,
    X,
    eps,
    *,
    stages: Sequence[str],
    options: CascadeOptions,
    y=None,
    lower=None,
    upper=None,
    batch_size: int = 256,
    backend: str = "native",
    prepare: Callable | None = None,
) -> Certificate:
    """Certify streamed ``X`` chunk by chunk into one :class:`~certdistill.Certificate`.

    Parameters
    ----------
    module : torch.nn.Module
        The network.
    X : array stored outside memory or iterable of batches
        See the module docstring.
    eps : float, array-like or Perturbation
        As in :func:`certdistill.certify`.
    stages : sequence of str
        Validated stages (:func:`~certdistill.verify.cascade.check_stages`).
    options : CascadeOptions
        Validated options; ``budget`` is for the whole stream.
    y : array-like of shape (n,), optional
        Labels of an array ``X`` (an iterable's batches carry their own).
    lower, upper : float or array-like, optional
        Input domain (with a scalar or array ``eps``).
    batch_size : int, default=256
        Rows read at a time from an array; samples bounded at once at most.
    backend : {"native", "auto_lirpa"}, default="native"
    prepare : callable, optional
        ``prepare(rows, labels) -> (rows, labels)`` applied to each chunk before its validation
        (the estimators turn their rows into the module's input and encode the labels).

    Returns
    -------
    Certificate
        ``counterexample`` is a :class:`~certdistill.certification.sparse_rows.SparseRows`.

    Raises
    ------
    ValueError
        As :func:`certdistill.certify`, naming the rows of the chunk at fault; also for an empty
        stream, labels whose length differs from the array's, labels given both ways, or
        batches some with and some without labels.
    """
    if options.memory_limit is None:  # one plan for every chunk, from the memory free now
        device, _ = module_device_dtype(module)
        options = dataclasses.replace(options, memory_limit=default_memory_limit(device))
    deadline = None if options.budget is None else time.perf_counter() + options.budget
    results = _Results(_length(X))
    with Progress(_length(X), "certify", options.verbose) as progress:
        for first, rows, labels in _chunks(X, y, batch_size):
            try:
                if prepare is not None:
                    rows, labels = prepare(rows, labels)
                problem = Problem.create(
                    module,
                    rows,
                    eps,
                    y=labels,
                    lower=lower,
                    upper=upper,
                    batch_size=batch_size,
                    backend=backend,
                )
            except ValueError as error:
                raise ValueError(f"rows {first} to {first + len(rows) - 1}: {error}") from None
            # Validated once: the next chunks get the perturbation as it is.
            eps, lower, upper = problem.perturbation, None, None
            results.add(problem.certify(stages, options, deadline=deadline))
            progress(results.n)
    if not results.n:
        raise ValueError("X must hold at least one sample; the stream was empty.")
    return results.certificate(eps)


# ---------------------------------------------------------------------------- internals
def _length(X) -> int | None:
    shape = getattr(X, "shape", None)
    return int(shape[0]) if shape is not None else None


def _chunks(X, y, batch_size: int) -> Iterator[tuple[int, object, object]]:
    """``(index of the first row, rows, labels or None)`` of each non-empty chunk of ``X``."""
    n = _length(X)
    if n is not None:  # an array: slices of batch_size rows
        if y is not None and len(y) != n:
            raise ValueError(f"y must have {n} labels (one per row of X), got {len(y)}.")
        for first in range(0, n, batch_size):
            stop = min(n, first + batch_size)
            # A copy in memory: a view into a read-only map cannot become a writable tensor.
            rows = np.array(X[first:stop])
            yield first, rows, None if y is None else np.array(y[first:stop])
        return
    if y is not None:
        raise ValueError(
            "With an iterable of batches, give the labels inside the batches as "
            "(X, y) pairs, not as y."
        )
    first, labelled = 0, None
    for batch in X:
        pair = isinstance(batch, tuple | list) and len(batch) == 2
        rows, labels = batch if pair else (batch, None)
        if labelled is not None and labelled != pair:
            raise ValueError(
                "Some batches are (X, y) pairs and some are not: label all of them or none."
            )
        labelled = pair
        if len(rows) == 0:
            continue
        yield first, rows, labels
        first += len(rows)


class _Column:
    """Per-sample values filled chunk by chunk: in one array allocated for ``total`` rows when
    that is known (no copy at the end), else in a list of chunks joined at the end."""

    def __init__(self, total: int | None):
        self.total, self.parts, self.array, self.n = total, [], None, 0

    def add(self, values: np.ndarray) -> None:
        if self.total is None:
            self.parts.append(values)
        else:
            if self.array is None:
                self.array = np.empty((self.total, *values.shape[1:]), dtype=values.dtype)
            self.array[self.n : self.n + len(values)] = values
        self.n += len(values)

    def values(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.total is None else self.array[: self.n]


class _Labels(_Column):
    """A column of short strings (status, stage) kept as one byte per sample."""

    def __init__(self, total: int | None):
        super().__init__(total)
        self.names: dict[str, int] = {}

    def add(self, values: np.ndarray) -> None:
        names, inverse = np.unique(values, return_inverse=True)
        codes = np.array(
            [self.names.setdefault(str(name), len(self.names)) for name in names], dtype=np.int8
        )
        super().add(codes[inverse.reshape(-1)])

    def values(self) -> np.ndarray:
        # As wide as the longest name that occurs, as the in-memory path's strings.
        return np.array(list(self.names))[super().values()]


class _Results:
    """The per-sample results of the chunks so far, and the falsified samples' points.

    While streaming, 11 bytes per sample and one margin per class; at the end the
    certificate's strings (``status``, ``decided_by``: 4 bytes a character) are built from
    their one-byte codes.
    """

    def __init__(self, total: int | None):
        self.columns = {
            "prediction": _Column(total),
            "margins": _Column(total),
            "certified": _Column(total),
            "status": _Labels(total),
            "decided_by": _Labels(total),
        }
        self.rows: list[np.ndarray] = []
        self.points: list[np.ndarray] = []
        self.seconds: dict[str, float] = {}
        self.n = 0
        self.method = ""
        self.sample_shape: tuple[int, ...] = ()

    def add(self, certificate: Certificate) -> None:
        for name, column in self.columns.items():
            column.add(getattr(certificate, name))
        falsified = np.flatnonzero(certificate.status == "falsified")
        self.rows.append(falsified + self.n)
        self.points.append(np.asarray(certificate.counterexample[falsified]))
        for stage, seconds in certificate.stage_seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.n += len(certificate)
        self.method = certificate.method
        self.sample_shape = certificate.counterexample.shape[1:]

    def certificate(self, perturbation: Perturbation) -> Certificate:
        return Certificate(
            **{name: column.values() for name, column in self.columns.items()},
            eps=perturbation.eps_value,
            method=self.method,
            counterexample=SparseRows(
                (self.n, *self.sample_shape), np.concatenate(self.rows), np.concatenate(self.points)
            ),
            stage_seconds=self.seconds,
        )
