"""When the certification paths may overwrite their own temporaries.

Without an autograd graph, arithmetic on tensors a step has just made can be done in place: on
the CPU a new full-size tensor costs its page faults, more than the arithmetic. With a graph
(certified training, alpha-CROWN's slopes) the steps keep their out-of-place form, which
autograd needs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["needs_graph"]


def needs_graph(*tensors: Tensor) -> bool:
    """Whether autograd records operations on ``tensors`` (then no in-place arithmetic)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
