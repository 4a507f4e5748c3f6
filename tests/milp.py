"""Exact minimum margins of tiny ReLU networks by mixed-integer linear programming.

This is the independent oracle of the soundness tests: it shares no code with
the bound engine. A network is first lowered to a chain of dense affine maps
separated by ReLUs (every supported non-ReLU layer is affine in eval mode, so
its matrix is read off by applying it to basis vectors), then each ReLU is
encoded with the standard big-M formulation (Tjeng et al., 2019) using interval
bounds computed here in float64, and ``scipy.optimize.milp`` (HiGHS) solves
``min_{x in box} z_ref(x) - z_j(x)`` for every class ``j``.

The solver's optimum can be off by its feasibility/integrality tolerances, so
besides the optimum the oracle returns the optimal input and the margin a
float64 forward pass gives there: that *witness* value is the margin of a real
point of the box, hence a guaranteed upper bound on the true minimum, and is
what soundness assertions should compare against.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix
from torch import nn

from certdistill.bounds.layers import Add, ConstantAffine, GraphNetwork, Reshape

_AFFINE = (
    nn.Linear,
    nn.Conv2d,
    nn.AvgPool2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.Flatten,
    nn.Unflatten,
    nn.ZeroPad2d,
    ConstantAffine,
    Reshape,
)
_NO_OP = (nn.Identity, nn.Dropout)


@dataclass
class AffineReluChain:
    """``A_L(relu(A_{L-1}(... relu(A_0(x)))))`` with ``A_k(v) = W_k v + b_k`` on flat vectors.

    With ``wide`` (networks with skip connections), ``A_k`` reads the concatenation of the input
    and the outputs of every earlier ReLU layer instead of the previous one's only.
    """

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    input_shape: tuple[int, ...]
    wide: bool = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Evaluate on a batch ``(n, *input_shape)`` in float64; returns ``(n, n_out)``."""
        v = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        seen = v
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            v = (seen if self.wide else v) @ w.T + b
            if k < len(self.weights) - 1:
                v = np.maximum(v, 0.0)
                seen = np.concatenate([seen, v], axis=1)
        return v


def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def _affine_of(layer: nn.Module, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Dense ``(W, b)`` of an affine layer acting on inputs of ``shape`` (one sample)."""
    d = int(np.prod(shape))
    with torch.no_grad():
        base = layer(torch.zeros((1, *shape), dtype=torch.float64))
        out_shape = tuple(base.shape[1:])
        b = base.reshape(-1).numpy().copy()
        basis = torch.eye(d, dtype=torch.float64).reshape((d, *shape))
        cols = layer(basis).reshape(d, -1).numpy() - b
    return cols.T.copy(), b, out_shape


def to_chain(net: nn.Module, input_shape: tuple[int, ...]) -> AffineReluChain:
    """Lower a (nested) ``nn.Sequential`` of supported layers to an affine/ReLU chain.

    Parameters
    ----------
    net : torch.nn.Module
        Network; it is copied to float64 and eval mode, the original is untouched.
    input_shape : tuple of int
        Shape of one sample.

    Returns
    -------
    AffineReluChain
        Consecutive affine layers are merged, consecutive ReLUs are separated by
        identity maps, so ``len(weights) == number of ReLU layers + 1``.
    """
    net = copy.deepcopy(net).double().eval()
    if isinstance(net, GraphNetwork):
        return _to_wide_chain(net, tuple(input_shape))
    shape = tuple(input_shape)
    dim = int(np.prod(shape))
    weights: list[np.ndarray] = []
    biases: list[np.ndarray] = []
    w_acc, b_acc = np.eye(dim), np.zeros(dim)
    for layer in _leaves(net):
        if isinstance(layer, _NO_OP):
            continue
        if isinstance(layer, nn.ReLU):
            weights.append(w_acc)
            biases.append(b_acc)
            w_acc, b_acc = np.eye(w_acc.shape[0]), np.zeros(w_acc.shape[0])
        elif isinstance(layer, _AFFINE):
            w, b, shape = _affine_of(layer, shape)
            w_acc, b_acc = w @ w_acc, w @ b_acc + b
        else:
            raise TypeError(f"milp oracle does not handle {type(layer).__name__}")
    weights.append(w_acc)
    biases.append(b_acc)
    return AffineReluChain(weights, biases, tuple(input_shape))


def _to_wide_chain(net: GraphNetwork, input_shape: tuple[int, ...]) -> AffineReluChain:
    """Each node's output as an affine function of ``[x, a_0, ..., a_{k-1}]`` (the input and
    the ReLU outputs so far), by composing the dense maps of the layers along the graph."""
    dim = int(np.prod(input_shape))
    # node -> (M, c, shape): output = M @ basis + c; the basis grows by each ReLU's output.
    values = {-1: (np.eye(dim), np.zeros(dim), input_shape)}
    width = dim
    weights, biases = [], []

    def widened(m: np.ndarray) -> np.ndarray:
        return np.pad(m, ((0, 0), (0, width - m.shape[1])))

    for index, (layer, reads) in enumerate(zip(net.layers, net.inputs, strict=True)):
        leaves = _leaves(layer) if isinstance(layer, nn.Sequential) else [layer]
        m, c, shape = values[reads[0]]
        if isinstance(layer, Add):
            m2, c2, _ = values[reads[1]]
            values[index] = (widened(m) + widened(m2), c + c2, shape)
            continue
        for leaf in leaves:
            if isinstance(leaf, _NO_OP):
                continue
            if isinstance(leaf, nn.ReLU):
                weights.append(widened(m))
                biases.append(c)
                size = m.shape[0]
                m = np.zeros((size, width + size))
                m[:, width:] = np.eye(size)
                c = np.zeros(size)
                width += size
            elif isinstance(leaf, _AFFINE):
                w, b, shape = _affine_of(leaf, shape)
                m, c = w @ m, w @ c + b
            else:
                raise TypeError(f"milp oracle does not handle {type(leaf).__name__}")
        values[index] = (m, c, shape)
    m, c, _ = values[len(net.layers) - 1]
    weights.append(widened(m))
    biases.append(c)
    return AffineReluChain(weights, biases, input_shape, wide=True)


def interval_bounds(
    chain: AffineReluChain, lo: np.ndarray, hi: np.ndarray, widen: float = 1e-7
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Float64 interval bounds on the pre-activations of every ReLU layer, widened slightly.

    Widening only loosens big-M constants and may call a stable neuron unstable,
    both of which keep the MILP exact.
    """
    a_lo, a_hi = lo.reshape(-1).astype(np.float64), hi.reshape(-1).astype(np.float64)
    seen_lo, seen_hi = a_lo, a_hi
    out = []
    for w, b in zip(chain.weights[:-1], chain.biases[:-1], strict=True):
        if chain.wide:
            a_lo, a_hi = seen_lo, seen_hi
        mid, rad = (a_hi + a_lo) / 2, (a_hi - a_lo) / 2
        c, r = w @ mid + b, np.abs(w) @ rad
        z_lo, z_hi = c - r, c + r
        slack = widen * (1.0 + np.abs(z_lo) + np.abs(z_hi))
        z_lo, z_hi = z_lo - slack, z_hi + slack
        out.append((z_lo, z_hi))
        a_lo, a_hi = np.maximum(z_lo, 0.0), np.maximum(z_hi, 0.0)
        seen_lo, seen_hi = np.concatenate([seen_lo, a_lo]), np.concatenate([seen_hi, a_hi])
    return out


@dataclass
class MarginResult:
    """Result of :func:`exact_min_margins` for one sample."""

    optimum: np.ndarray  # (C,) solver optimum, +inf at the reference
    witness: np.ndarray  # (C, *input_shape) optimal inputs (reference row: the center)
    witness_margin: np.ndarray  # (C,) float64 forward margin at the witness, +inf at reference


def _solve_sample(
    chain: AffineReluChain, lo: np.ndarray, hi: np.ndarray, ref: int, time_limit: float
) -> MarginResult:
    bounds = interval_bounds(chain, lo, hi)
    d0 = lo.size
    # Variable layout: x | a_1 | ... | a_L | one binary per unstable neuron.
    offsets = [0]
    sizes = [d0] + [len(zl) for zl, _ in bounds]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    unstable = [np.flatnonzero((zl < 0) & (zu > 0)) for zl, zu in bounds]
    n_bin = sum(len(u) for u in unstable)
    n_var = offsets[-1] + n_bin
    var_lo = np.zeros(n_var)
    var_hi = np.zeros(n_var)
    var_lo[:d0], var_hi[:d0] = lo.reshape(-1), hi.reshape(-1)
    integrality = np.zeros(n_var)
    integrality[offsets[-1] :] = 1
    var_hi[offsets[-1] :] = 1

    rows = sum(int((zl >= 0).sum()) + 3 * int(((zl < 0) & (zu > 0)).sum()) for zl, zu in bounds)
    a_mat = lil_matrix((max(rows, 1), n_var))
    row_lo, row_hi = np.full(max(rows, 1), -np.inf), np.full(max(rows, 1), np.inf)
    r = 0
    bin_idx = offsets[-1]
    for k, (zl, zu) in enumerate(bounds):
        w, b = chain.weights[k], chain.biases[k]
        prev, cur = (0 if chain.wide else offsets[k]), offsets[k + 1]
        var_lo[cur : cur + len(zl)] = 0.0
        var_hi[cur : cur + len(zl)] = np.maximum(zu, 0.0)
        for i in range(len(zl)):
            if zu[i] <= 0:
                continue  # always inactive: a = 0 through its bounds
            # a_i - W_i a_prev (compared against b_i) appears in every constraint.
            a_mat[r, cur + i] = 1.0
            a_mat[r, prev : prev + w.shape[1]] = -w[i]
            if zl[i] >= 0:  # always active: a = z
                row_lo[r] = row_hi[r] = b[i]
                r += 1
                continue
            row_lo[r] = b[i]  # a >= z
            r += 1
            a_mat[r, cur + i] = 1.0  # a <= z - l (1 - delta)
            a_mat[r, prev : prev + w.shape[1]] = -w[i]
            a_mat[r, bin_idx] = -zl[i]
            row_hi[r] = b[i] - zl[i]
            r += 1
            a_mat[r, cur + i] = 1.0  # a <= u delta
            a_mat[r, bin_idx] = -zu[i]
            row_hi[r] = 0.0
            r += 1
            bin_idx += 1
    constraints = [LinearConstraint(a_mat.tocsr(), row_lo, row_hi)] if rows else []

    n_out = chain.weights[-1].shape[0]
    w_last, b_last = chain.weights[-1], chain.biases[-1]
    last_off = 0 if chain.wide else offsets[len(bounds)]
    optimum = np.full(n_out, np.inf)
    witness = np.repeat(((lo + hi) / 2)[None], n_out, axis=0)
    for j in range(n_out):
        if j == ref:
            continue
        spec = w_last[ref] - w_last[j]
        cost = np.zeros(n_var)
        cost[last_off : last_off + len(spec)] = spec
        res = milp(
            cost,
            integrality=integrality,
            bounds=Bounds(var_lo, var_hi),
            constraints=constraints,
            options={"mip_rel_gap": 1e-9, "time_limit": time_limit},
        )
        if res.status != 0:
            raise RuntimeError(f"MILP not solved to optimality: {res.message}")
        optimum[j] = res.fun + b_last[ref] - b_last[j]
        witness[j] = np.clip(res.x[:d0].reshape(lo.shape), lo, hi)
    logits = chain.forward(witness)
    witness_margin = logits[:, ref] - logits[np.arange(n_out), np.arange(n_out)]
    witness_margin[ref] = np.inf
    return MarginResult(optimum, witness, witness_margin)


def feasible_box(x: np.ndarray, eps, lower=None, upper=None) -> tuple[np.ndarray, np.ndarray]:
    """Float64 bounds of ``ball(x, eps) ∩ [lower, upper]``, ``x`` of shape ``(n, *shape)``."""
    x = np.asarray(x, dtype=np.float64)
    eps = np.broadcast_to(np.asarray(eps, dtype=np.float64), x.shape[1:])
    lo, hi = x - eps, x + eps
    if lower is not None:
        lo = np.maximum(lo, np.asarray(lower, dtype=np.float64))
    if upper is not None:
        hi = np.minimum(hi, np.asarray(upper, dtype=np.float64))
    return lo, hi


def exact_min_margins(
    net: nn.Module,
    x: np.ndarray,
    reference: np.ndarray,
    eps,
    *,
    lower=None,
    upper=None,
    time_limit: float = 20.0,
) -> list[MarginResult]:
    """Exact ``min_{x' in ball(x, eps) ∩ [lower, upper]} z_ref(x') - z_j(x')`` per sample and class.

    Parameters
    ----------
    net : torch.nn.Module
        Small network of supported layers (keep it below ~30 ReLUs).
    x : numpy.ndarray
        Centers, shape ``(n, *input_shape)``.
    reference : numpy.ndarray
        Reference class per sample.
    eps : float or numpy.ndarray
        L-infinity radius, broadcastable to one sample.
    lower, upper : float or numpy.ndarray, optional
        Domain.
    time_limit : float, default=20.0
        Seconds per MILP; hitting it raises instead of returning a non-optimum.

    Returns
    -------
    list of MarginResult
        One per sample.
    """
    x = np.asarray(x, dtype=np.float64)
    chain = to_chain(net, x.shape[1:])
    lo, hi = feasible_box(x, eps, lower, upper)
    return [
        _solve_sample(chain, lo[i], hi[i], int(reference[i]), time_limit) for i in range(len(x))
    ]
