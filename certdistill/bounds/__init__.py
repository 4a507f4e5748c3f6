"""Native bound propagation (IBP, CROWN-IBP, CROWN, alpha-CROWN) over a network's graph.

``perturbation`` (the input domain), ``specification`` (the margins bounded), ``layers`` (the
extra layer types: residual ``Add``, ``Reshape``, ...), ``graph`` (a network as a graph of
operations), ``ops`` (one class per layer type: its interval step and its backward relaxation),
``patches`` (convolutions' backward step), ``memory`` (the memory plan of a pass), ``engine``
(the walk over the graph) and ``lirpa`` (the optional auto_LiRPA backend).

May import: ``exceptions`` only; everything else in the package builds on it.
"""

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
