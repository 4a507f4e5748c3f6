"""Memory plans of bound computations: samples per chunk and backward rows per group.

Certification bounds a chunk of samples at a time. Its memory is dominated by tensors whose
sizes follow from the layer shapes alone:

* the forward sweep's: per sample, a few tensors the size of each layer's input (the clean input,
  the interval's centre and radius) and, for the methods that need them, the interval bounds and
  relaxation lines of every activation's input;
* the backward passes' coefficients ``A`` of shape ``(n, rows, *layer_shape)``: one row per
  class for the final bound, and, for CROWN's pre-activation bounds, two rows per neuron whose
  bounds are computed (``n_neurons`` rows in all, propagated in groups);
* alpha-CROWN's optimisation: the autograd graph of a final backward pass and the slopes with
  their Adam moments.

:func:`plan_memory` turns a budget in bytes into a :class:`MemoryPlan`: as many samples as fit in
half of the budget (at most the caller's batch size) with their sweep, final backward pass and
smallest intermediate group, and the rest of the budget for the groups of the intermediate
backward passes (on the CPU at most ``2**22`` elements per group, which run fastest there). A
network whose single sample does not fit is planned at one sample and one neuron at a time,
with a warning. The plan is an estimate: the constants below count the live copies of each
tensor at the peak of a step, rounded up.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["MemoryPlan", "check_memory_limit", "default_memory_limit", "plan_memory"]

#: Budget on the CPU when the available memory cannot be read (psutil is not installed).
FALLBACK_CPU_LIMIT = 2 * 2**30
#: Share of the RAM that a certification plans for by default on the CPU ...
_CPU_SHARE = 0.25
#: ... and at most this much: bigger chunks gain nothing on a CPU.
_CPU_CEILING = 8 * 2**30
#: Share of the free device memory (free plus cached by torch) planned for on CUDA.
_CUDA_SHARE = 0.5
#: On the CPU, larger backward groups than this many elements are slower, not faster (out of
#: cache): CROWN on 256 samples of the certification benchmark's CNN took 11.9 s with 2**22,
#: 15.0 s with 2**24 and 20.8 s with 2**26 elements (one thread, 2-core machine).
_CPU_BACKWARD_ELEMENTS = 2**22

#: Live copies of a backward coefficient tensor at the peak of a step: ``A``, the slopes picked
#: for it, the step's result and a clamped copy for the bias (activation steps are the largest).
BACKWARD_COPIES = 4
#: Tensors the sweep keeps per element of each layer's input: clean input, centre, radius.
_SWEEP_COPIES = 3
#: Tensors kept per element of each activation's input by the methods that relax it: interval
#: and tightened bounds (two each) and the relaxation's lines and mask.
_ACTIVATION_COPIES = 8
#: alpha-CROWN: tensors of its autograd graph per element of the ``A`` of each layer, and per
#: optimised slope (value, gradient, two Adam moments).
_ALPHA_GRAPH_COPIES = 3
_ALPHA_SLOPE_COPIES = 4

#: Methods that compute CROWN pre-activation bounds, and those with a backward final bound.
_INTERMEDIATE = ("crown", "alpha-crown")
_BACKWARD_FINAL = ("crown-ibp", "crown", "alpha-crown")


@dataclass(frozen=True)
class MemoryPlan:
    """How much of a bound computation runs at once.

    Attributes
    ----------
    samples : int
        Samples bounded together (the chunk of the cascade's bound stages).
    backward_elements : int
        Elements of one coefficient tensor ``A`` of the intermediate backward passes; the rows
        (neurons) of those passes are grouped to stay under it.
    memory_limit : int
        The budget in bytes the plan was made for.
    """

    samples: int
    backward_elements: int
    memory_limit: int


def check_memory_limit(memory_limit) -> int | None:
    """Validate a memory budget: ``None`` (the device's default) or a positive number of bytes.

    Returns
    -------
    int or None

    Raises
    ------
    ValueError
        For anything else (booleans, NaN, infinities, zero or negative numbers).
    """
    if memory_limit is None:
        return None
    if (
        isinstance(memory_limit, bool)
        or not isinstance(memory_limit, numbers.Real)
        or not math.isfinite(memory_limit)
        or memory_limit < 1
    ):
        raise ValueError(
            f"memory_limit must be None or a positive number of bytes, got {memory_limit!r}."
        )
    return int(memory_limit)


#: (time, total, available) of the last reading of the CPU's memory, and its lifetime.
_CPU_READING: tuple[float, int, int] | None = None
_CPU_READING_SECONDS = 1.0


def default_memory_limit(device: torch.device | str) -> int:
    """The budget of a certification on ``device`` when none is given.

    On CUDA, half of the device's free memory (including what torch's allocator holds unused);
    on the CPU, a quarter of the RAM, at most 8 GiB and at most half of the RAM available now
    (``psutil`` reads them; without it, 2 GiB).

    Parameters
    ----------
    device : torch.device or str

    Returns
    -------
    int
        Bytes.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(1, int(_CUDA_SHARE * (free + cached)))
    try:
        import psutil  # optional (a dependency of dask.distributed)
    except ImportError:
        return FALLBACK_CPU_LIMIT
    # A share of the total, not of what is free now, so that the plan (hence the rounding of
    # the bounds) does not change from call to call; but never more than half of what is free.
    # Read at most once a second: a small certify() call should not wait on /proc/meminfo.
    global _CPU_READING
    now = time.monotonic()
    if _CPU_READING is None or now - _CPU_READING[0] > _CPU_READING_SECONDS:
        memory = psutil.virtual_memory()
        _CPU_READING = (now, memory.total, memory.available)
    _, total, available = _CPU_READING
    limit = min(_CPU_CEILING, _CPU_SHARE * total, available / 2)
    return max(1, int(limit))


def plan_memory(
    layer_shapes: Sequence[Sequence[int]],
    activations: Sequence[int],
    method: str,
    *,
    memory_limit: int,
    itemsize: int,
    max_samples: int,
    device: torch.device | str = "cpu",
) -> MemoryPlan:
    """Plan a bound computation of ``method`` within ``memory_limit`` bytes.

    Parameters
    ----------
    layer_shapes : sequence of shapes
        Input shape of every operation of the network (one sample), then the logits' shape.
    activations : sequence of int
        Indices (into ``layer_shapes``) of the activation operations.
    method : str
        A bound method (:data:`~certdistill.bounds.METHODS`).
    memory_limit : int
        Bytes the computation may use.
    itemsize : int
        Bytes per element (the module's dtype).
    max_samples : int
        Samples at most (the caller's batch size).
    device : torch.device or str, default="cpu"
        Where the computation runs (the CPU caps the backward groups for speed).

    Returns
    -------
    MemoryPlan
    """
    sizes = [math.prod(shape) for shape in layer_shapes]
    n_classes = sizes[-1]
    act_sizes = [sizes[i] for i in activations]
    per_sample = _SWEEP_COPIES * sum(sizes)
    if method != "ibp":
        per_sample += _ACTIVATION_COPIES * sum(act_sizes)
    if method in _BACKWARD_FINAL:
        per_sample += BACKWARD_COPIES * n_classes * max(sizes)
    else:  # IBP folds the specification into the last affine map: (n, classes, classes)
        per_sample += n_classes * n_classes
    if method == "alpha-crown":
        per_sample += _ALPHA_GRAPH_COPIES * n_classes * sum(
            sizes
        ) + _ALPHA_SLOPE_COPIES * n_classes * sum(act_sizes)
    # The smallest intermediate group: one neuron (two rows) through the largest layer.
    smallest_group = 0
    if method in _INTERMEDIATE and activations:
        largest = max(sizes[: max(activations) + 1])
        smallest_group = BACKWARD_COPIES * 2 * largest
    elements = memory_limit // itemsize
    samples = min(max_samples, elements // 2 // (per_sample + smallest_group))
    if samples < 1:
        warnings.warn(
            f"memory_limit={memory_limit:,} bytes is below the estimated "
            f"{(per_sample + smallest_group) * itemsize * 2:,} bytes that bounding one sample "
            f"by {method} needs; bounding one sample and one neuron at a time.",
            stacklevel=2,
        )
        samples = 1
    backward = max(0, elements - samples * per_sample) // BACKWARD_COPIES
    if torch.device(device).type == "cpu":
        backward = min(backward, _CPU_BACKWARD_ELEMENTS)
    return MemoryPlan(
        samples=int(samples),
        backward_elements=int(max(1, backward)),
        memory_limit=int(memory_limit),
    )
