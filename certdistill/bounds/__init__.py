"""Native bound propagation (IBP, CROWN-IBP, CROWN, alpha-CROWN) for ``nn.Sequential`` nets."""

from certdistill.bounds.engine import METHODS, BoundEngine, IntervalPass, margin_lower_bounds
from certdistill.bounds.ops import OP_REGISTRY, SUPPORTED_LAYERS_TEXT, BoundOp, build_ops
from certdistill.bounds.perturbation import input_box
from certdistill.bounds.specification import margin_specification

__all__ = [
    "METHODS",
    "OP_REGISTRY",
    "SUPPORTED_LAYERS_TEXT",
    "BoundEngine",
    "BoundOp",
    "IntervalPass",
    "build_ops",
    "input_box",
    "margin_lower_bounds",
    "margin_specification",
]
