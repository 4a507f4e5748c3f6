"""Complete verification: attacks and counterexamples, branch and bound, LP refinement of the
per-neuron bounds, exact MILP, and the cascade that runs them after the bound methods
(``certify(..., method="complete")``).

May import: ``bounds``, ``exceptions``.
"""

from certdistill.verify.cascade import COMPLETE, STAGES, CascadeOptions, check_stages
from certdistill.verify.counterexamples import Judge, worst_margin
from certdistill.verify.milp import MILP_TOLERANCE, MarginMilp

__all__ = [
    "COMPLETE",
    "MILP_TOLERANCE",
    "STAGES",
    "CascadeOptions",
    "Judge",
    "MarginMilp",
    "check_stages",
    "worst_margin",
]
