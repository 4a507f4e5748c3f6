"""Native bound propagation (IBP, CROWN-IBP, CROWN, alpha-CROWN) for ``nn.Sequential`` nets."""

from certdistill.bounds.engine import (
    METHOD_TABLE,
    METHODS,
    BoundEngine,
    BoundMethod,
    BoundResult,
    IntervalPass,
    check_method,
    engine_for,
    margin_lower_bounds,
)
from certdistill.bounds.ops import (
    OP_REGISTRY,
    ActivationOp,
    BoundOp,
    Relaxation,
    build_ops,
    register_op,
    supported_layers_text,
)
from certdistill.bounds.perturbation import Perturbation
from certdistill.bounds.specification import margin_specification

__all__ = [
    "METHODS",
    "METHOD_TABLE",
    "OP_REGISTRY",
    "ActivationOp",
    "BoundEngine",
    "BoundMethod",
    "BoundOp",
    "BoundResult",
    "IntervalPass",
    "Perturbation",
    "Relaxation",
    "build_ops",
    "check_method",
    "engine_for",
    "margin_lower_bounds",
    "margin_specification",
    "register_op",
    "supported_layers_text",
]
