"""Research variants of :class:`~certdistill.DistilledStudent`, for the benchmarks only.

With all digits labels the student trained alone on noise and ball inputs labelled as their
source rows beat the distilled student, whose transfer inputs carry the teacher's labels. These
variants keep everything else of the distilled student (the selective loss and its teacher
worst cases, the unlabelled rows labelled by the teacher) and change only the transfer labels:

* :class:`SourceLabelledStudent`: every transfer input takes the label of the row it was made
  from (the given label, or the teacher's for an unlabelled row);
* :class:`AgreeingLabelsStudent`: the transfer inputs whose teacher label differs from their
  source row's label are dropped.

Only what wins becomes a parameter of the library.
"""

from __future__ import annotations

import numpy as np

from certdistill import DistilledStudent

__all__ = ["AgreeingLabelsStudent", "SourceLabelledStudent"]


class SourceLabelledStudent(DistilledStudent):
    """Transfer inputs labelled as their source rows (see the module docstring)."""

    _agreeing_only = False

    def _validate_fit_data(self, X, y, *, reset: bool, classes=None):
        transfer, self.transfer = self.transfer, ()
        try:  # the labelled rows, and the unlabelled rows with the teacher's labels
            X_rows, y_rows = super()._validate_fit_data(X, y, reset=reset, classes=classes)
        finally:
            self.transfer = transfer
        if not transfer:
            return X_rows, y_rows
        points, sources = self._transfer_inputs(X_rows, return_sources=True)
        labels = y_rows[sources]
        if self._agreeing_only and len(points):
            keep = self._teacher_labels(points) == labels
            points, labels = points[keep], labels[keep]
        return np.concatenate([X_rows, points]), np.concatenate([y_rows, labels])


class AgreeingLabelsStudent(SourceLabelledStudent):
    """Only the transfer inputs on which the teacher agrees with the source row's label."""

    _agreeing_only = True
