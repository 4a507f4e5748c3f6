"""Training batches made by indexing whole-data tensors (:class:`TensorBatches`)."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from skorch.dataset import Dataset as SkorchDataset
from torch import Tensor
from torch.utils.data import DataLoader

__all__ = ["TensorBatches"]


class TensorBatches:
    """Training batches of a ``skorch.dataset.Dataset`` of arrays, made by indexing tensors of the
    whole data rather than row by row (``__getitem__`` and collation per row, as skorch's
    ``DataLoader`` does).

    The batches, their order and the draws from torch's global random generator are those of the
    ``DataLoader`` (its iterator draws a base seed; with ``shuffle``, its ``RandomSampler``
    draws a seed and a permutation), so training gives the same results, faster. Each batch is a
    fresh tensor (not a view of the data), as the ``DataLoader``'s are.

    Parameters
    ----------
    X, y : ndarray or Tensor
        The dataset's inputs and targets (same length).
    batch_size : int
        Rows per batch (the last batch may be smaller).
    shuffle : bool, default=False
        A new random order every epoch.

    Attributes
    ----------
    source : ndarray or Tensor
        ``X`` as given (for a step to check which data its batch comes from).
    """

    def __init__(self, X, y, batch_size: int, shuffle: bool = False):
        self.source = X
        self.X = torch.as_tensor(X)
        self.y = torch.as_tensor(y)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self._last = None

    @classmethod
    def for_dataset(cls, net, dataset) -> TensorBatches | None:
        """The batches ``net.get_iterator(dataset, training=True)`` would make with skorch's
        ``DataLoader``, or None where they cannot be made by indexing (another iterator or
        dataset class, iterator options beyond ``batch_size`` and ``shuffle``, data that are
        not arrays)."""
        if net.iterator_train is not DataLoader or type(dataset) is not SkorchDataset:
            return None
        kwargs = net.get_params_for("iterator_train")
        if not set(kwargs) <= {"batch_size", "shuffle"}:
            return None
        X, y = dataset.X, dataset.y
        arrays = (np.ndarray, Tensor)
        if not (isinstance(X, arrays) and isinstance(y, arrays)) or X.ndim < 1:
            return None
        if isinstance(X, np.ndarray) and (X.dtype.hasobject or not X.flags.writeable):
            return None
        n = len(dataset)
        if n == 0 or len(X) != n or len(y) != n:
            return None
        batch_size = kwargs.get("batch_size", net.batch_size)
        if batch_size == -1:
            batch_size = n
        if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            return None
        return cls(X, y, batch_size, shuffle=bool(kwargs.get("shuffle", False)))

    def __len__(self) -> int:
        return math.ceil(len(self.X) / self.batch_size)

    def __iter__(self):
        n = len(self.X)
        # What DataLoader's iterator and RandomSampler draw from the global generator.
        torch.empty((), dtype=torch.int64).random_()
        order = None
        if self.shuffle:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        try:
            for start in range(0, n, self.batch_size):
                if order is None:
                    rows = torch.arange(start, min(start + self.batch_size, n))
                    batch = (
                        self.X[start : start + self.batch_size].clone(),
                        self.y[start : start + self.batch_size].clone(),
                    )
                else:
                    rows = order[start : start + self.batch_size]
                    batch = (self.X[rows], self.y[rows])
                self._last = (batch[0], rows)
                yield batch
        finally:
            self._last = None

    def rows_of(self, X_batch) -> Tensor | None:
        """Row indices into ``X`` of the batch just yielded, if ``X_batch`` is its input tensor
        (None otherwise)."""
        last = self._last
        if last is None or last[0] is not X_batch:
            return None
        return last[1]
