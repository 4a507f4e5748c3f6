"""An array of NaN rows but a few: the counterexamples of a streamed certification."""

from __future__ import annotations

import numpy as np

__all__ = ["SparseRows"]


class SparseRows:
    """A read-only float64 array of shape ``(n, *row_shape)``, NaN except at some rows.

    A certificate of many samples (:func:`certdistill.certify` on streamed data) has a
    counterexample only for its falsified samples; storing the others as NaN rows would take as
    much memory as the data. This array stores the given rows only. Index it like a NumPy array
    (the first index picks rows: an integer, a slice, a boolean mask or integer indices; further
    indices apply within them): only the rows picked are built. ``np.asarray`` builds the whole
    dense array.

    Parameters
    ----------
    shape : tuple of int
        Shape of the dense array.
    rows : array-like of int
        Indices of the stored rows, distinct.
    values : array-like of shape (len(rows), *shape[1:])
        Their values.

    Examples
    --------
    >>> import numpy as np
    >>> from certdistill.certification.sparse_rows import SparseRows
    >>> points = SparseRows((4, 2), rows=[2], values=[[0.5, 1.0]])
    >>> points[2]
    array([0.5, 1. ])
    >>> bool(np.isnan(points[[0, 1, 3]]).all())
    True
    >>> points.shape, len(points)
    ((4, 2), 4)
    """

    dtype = np.dtype(np.float64)

    def __init__(self, shape, rows, values):
        self.shape = tuple(int(s) for s in shape)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        values = np.asarray(values, dtype=np.float64).reshape(len(rows), *self.shape[1:])
        order = np.argsort(rows, kind="stable")
        self.rows, self.values = rows[order], values[order]
        if len(self.rows) and (
            self.rows[0] < 0 or self.rows[-1] >= self.shape[0] or np.any(np.diff(self.rows) == 0)
        ):
            raise ValueError(f"rows must be distinct indices in [0, {self.shape[0]}).")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"SparseRows(shape={self.shape}, stored rows={len(self.rows)})"

    def _build(self, selected: np.ndarray) -> np.ndarray:
        """The dense rows ``selected`` (an integer array of row indices)."""
        out = np.full((len(selected), *self.shape[1:]), np.nan)
        position = np.searchsorted(self.rows, selected)
        found = position < len(self.rows)
        found[found] = self.rows[position[found]] == selected[found]
        out[found] = self.values[position[found]]
        return out

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if first is Ellipsis or first is None:
            return np.asarray(self)[key]
        selected = np.arange(self.shape[0])[first]
        if np.ndim(selected) == 0:
            return self._build(np.reshape(selected, 1))[0][rest]
        return self._build(selected.reshape(-1)).reshape(*selected.shape, *self.shape[1:])[
            (slice(None),) * selected.ndim + tuple(rest)
        ]

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("SparseRows builds a new array: it cannot be viewed without a copy.")
        dense = self._build(np.arange(self.shape[0]))
        return dense if dtype is None else dense.astype(dtype)
