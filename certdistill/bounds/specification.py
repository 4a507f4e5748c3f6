"""The margin specification ``z_ref - z_j``, as a matrix applied to the logits."""

from __future__ import annotations

import torch
from torch import Tensor


def margin_specification(reference: Tensor, n_classes: int, dtype=torch.float32) -> Tensor:
    """Matrix ``C`` of shape (n, n_classes, n_classes) with rows ``e_ref - e_j``.

    Row ``j`` of sample ``i`` maps the logits ``z`` to ``z[ref_i] - z[j]``; the row of the
    reference class itself is zero. The engine propagates ``C`` backwards, which folds it into
    the last affine layers (as CROWN-IBP does): bounding the margins directly is much tighter than
    subtracting separately bounded logits.

    Parameters
    ----------
    reference : LongTensor of shape (n,)
    n_classes : int
    dtype : torch.dtype

    Returns
    -------
    Tensor of shape (n, n_classes, n_classes)
    """
    eye = torch.eye(n_classes, dtype=dtype, device=reference.device)
    return eye[reference].unsqueeze(1) - eye.unsqueeze(0)
