"""Projected-gradient attacks in the L-infinity ball.

These attacks give *upper* bounds on the worst-case loss or margin inside the
perturbation ball: a point they return is a genuine input, so its margin is a
witness that any sound certified lower bound must not exceed. They are used in
two places:

* :func:`pgd_attack` for adversarial training (e.g. MTL-IBP), so it is fully
  batched and never loops over samples in Python;
* :func:`min_margin_attack` by the soundness tests, which compare its per-class
  margins against the certified lower bounds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from certdistill.bounds.perturbation import Perturbation

__all__ = ["min_margin_attack", "pgd_attack", "targeted_attack"]

_LOSSES = ("ce", "margin")
_MODES = ("eval", "current")


def _as_tensor(value, *, like: torch.Tensor) -> torch.Tensor:
    """Convert a float, numpy array or tensor to a tensor with ``like``'s dtype and device."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype=like.dtype, device=like.device)
    array = np.asarray(value, dtype=np.float64)
    return torch.as_tensor(array, dtype=like.dtype, device=like.device)


def _module_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    for tensor in module.parameters():
        return tensor.dtype, tensor.device
    for tensor in module.buffers():
        return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def _prepare_input(module: nn.Module, x) -> torch.Tensor:
    dtype, device = _module_dtype_device(module)
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype=dtype, device=device)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def _perturbation(x: torch.Tensor, eps, lower, upper) -> Perturbation:
    """The perturbation of an attack: given, or validated from eps and the domain."""
    if isinstance(eps, Perturbation):
        if lower is not None or upper is not None:
            raise ValueError("give the domain inside the Perturbation, not as lower/upper.")
        return eps.to(device=x.device, dtype=x.dtype)
    return Perturbation.create(
        eps, x.shape[1:], lower=lower, upper=upper, dtype=x.dtype, device=x.device
    )


def _feasible_box(x: torch.Tensor, perturbation: Perturbation) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the elementwise bounds of the perturbation set around ``x``."""
    lo, hi = perturbation.bounds(x)
    if bool((lo > hi).any()):
        raise ValueError(
            "The ball around x does not meet the domain [lower, upper]; is x outside the domain?"
        )
    return lo, hi


@contextlib.contextmanager
def _attack_mode(module: nn.Module, mode: str) -> Iterator[None]:
    """Temporarily put ``module`` in the mode the attack runs in, then restore it.

    In ``"current"`` mode a module in training mode would update BatchNorm
    running statistics on every attack step, which would leak adversarial
    points into the statistics used at test time, so all buffers are
    snapshotted and restored.
    """
    states = [(m, m.training) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()] if mode == "current" else []
    try:
        if mode == "eval":
            module.eval()
        yield
    finally:
        for m, training in states:
            m.training = training
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)


def _margin_objective(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ``z_y - max_{j != y} z_j``."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.max(dim=1).values


def _uniform_in_box(
    lo: torch.Tensor, hi: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    # Draw on the generator's own device (a CPU generator cannot fill a CUDA tensor).
    device = generator.device if generator is not None else lo.device
    u = torch.rand(lo.shape, generator=generator, dtype=lo.dtype, device=device).to(lo.device)
    # min() guards against rounding pushing lo + (hi - lo) * u past hi.
    return torch.minimum(lo + (hi - lo) * u, hi)


def pgd_attack(
    module: nn.Module,
    x,
    y,
    eps,
    *,
    steps: int = 10,
    step_size=None,
    restarts: int = 1,
    lower=None,
    upper=None,
    loss: str = "ce",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    mode: str = "eval",
) -> torch.Tensor:
    """Find, per sample, the worst point of an L-infinity ball by projected gradient ascent.

    Parameters
    ----------
    module : torch.nn.Module
        Classifier returning logits of shape ``(n, n_classes)``.
    x : torch.Tensor or numpy.ndarray
        Clean inputs, shape ``(n, *input_shape)``.
    y : torch.Tensor or numpy.ndarray
        Integer labels, shape ``(n,)``.
    eps : float, numpy.ndarray, torch.Tensor or Perturbation
        Radius of the ball, non-negative, broadcastable to one sample (e.g. one radius per
        feature); or a whole :class:`~certdistill.bounds.Perturbation` (then ``lower`` and
        ``upper`` must be None).
    steps : int, default=10
        Number of signed-gradient steps per restart.
    step_size : float or torch.Tensor, optional
        Step length; defaults to ``2.5 * eps / steps`` (Madry et al.), so a
        walk can cross the whole ball.
    restarts : int, default=1
        Independent runs; the worst point per sample over all of them (and all
        their iterates) is kept.
    lower, upper : float or array-like, optional
        Input domain; the attack is confined to the ball intersected with it.
    loss : {"ce", "margin"}, default="ce"
        ``"ce"`` maximises the cross-entropy, ``"margin"`` minimises
        ``z_y - max_{j != y} z_j``.
    random_start : bool, default=True
        Start each restart from a uniform point of the feasible box instead of ``x``.
    generator : torch.Generator, optional
        Source of randomness for the random starts.
    mode : {"eval", "current"}, default="eval"
        ``"eval"`` attacks the module in eval mode (BatchNorm running statistics,
        no dropout); ``"current"`` keeps its present mode. Either way the
        module's modes and buffers are unchanged on return.

    Returns
    -------
    torch.Tensor
        Adversarial inputs, same shape, dtype and device as the module's
        parameters, detached and inside the feasible box.
    """
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}.")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    if steps < 0 or restarts < 1:
        raise ValueError("steps must be >= 0 and restarts >= 1.")
    x = _prepare_input(module, x)
    y = torch.as_tensor(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y))
    y = y.to(device=x.device, dtype=torch.long).reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} labels for {x.shape[0]} inputs.")
    perturbation = _perturbation(x, eps, lower, upper)
    lo, hi = _feasible_box(x, perturbation)
    if step_size is None:
        step = 2.5 * perturbation.eps / max(steps, 1)
    else:
        step = _as_tensor(step_size, like=x)

    def objective(logits: torch.Tensor) -> torch.Tensor:
        # Larger is worse for the classifier in both cases.
        if loss == "ce":
            return nn.functional.cross_entropy(logits, y, reduction="none")
        return -_margin_objective(logits, y)

    def start(restart: int) -> torch.Tensor:
        return _uniform_in_box(lo, hi, generator) if random_start else x.clone()

    with _attack_mode(module, mode):
        _, best_x = _signed_gradient_ascent(
            module, objective, start, lo, hi, step, steps=steps, restarts=restarts, initial=x
        )
    return best_x.detach()


def min_margin_attack(
    module: nn.Module,
    x,
    reference,
    eps,
    *,
    steps: int = 50,
    restarts: int = 5,
    lower=None,
    upper=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Smallest margin ``z_ref - z_j`` found by targeted PGD, for every class ``j``.

    All ``n * n_classes`` targeted attacks run as one batch (the input is
    repeated once per class). The module is attacked in eval mode, like
    :func:`certdistill.certify` evaluates it, and its modes are restored.

    Parameters
    ----------
    module : torch.nn.Module
        Classifier returning logits of shape ``(n, n_classes)``.
    x : torch.Tensor or numpy.ndarray
        Clean inputs, shape ``(n, *input_shape)``.
    reference : torch.Tensor or numpy.ndarray
        Reference class per sample, shape ``(n,)``.
    eps : float, numpy.ndarray, torch.Tensor or Perturbation
        Radius of the L-infinity ball, broadcastable to one sample, or a whole perturbation.
    steps : int, default=50
        Signed-gradient steps per restart.
    restarts : int, default=5
        The first restart starts at ``x``, the others uniformly in the box.
    lower, upper : float or array-like, optional
        Input domain intersected with the ball.
    generator : torch.Generator, optional
        Source of randomness for the random starts.

    Returns
    -------
    torch.Tensor
        Shape ``(n, n_classes)``: the smallest margin found (an upper bound on
        the true minimum), ``+inf`` in the reference column.
    """
    x = _prepare_input(module, x)
    perturbation = _perturbation(x, eps, lower, upper)
    margins, _ = targeted_attack(
        module, x, reference, perturbation, steps=steps, restarts=restarts, generator=generator
    )
    return margins


def targeted_attack(
    module: nn.Module,
    x: torch.Tensor,
    reference,
    perturbation: Perturbation,
    *,
    steps: int = 50,
    restarts: int = 5,
    generator: torch.Generator | None = None,
    targets: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targeted PGD towards every class: the smallest margins found and where.

    The attacks (one per sample and target class) run as one batch in eval mode (the module's
    modes are restored). Restart 0 starts at ``x`` (or ``start``), the others uniformly in the
    set.

    Parameters
    ----------
    module : torch.nn.Module
        Classifier returning logits of shape ``(n, n_classes)``.
    x : torch.Tensor
        Clean inputs of the module's dtype and device, shape ``(n, *input_shape)``.
    reference : torch.Tensor or numpy.ndarray
        Reference class per sample, shape ``(n,)``.
    perturbation : Perturbation
        The set around each input.
    steps, restarts : int
        Signed-gradient steps per restart, and restarts.
    generator : torch.Generator, optional
        Source of randomness for the random starts.
    targets : BoolTensor of shape (n, n_classes), optional
        The classes to attack towards per sample (default: all but the reference).
    start : torch.Tensor of shape (n, *input_shape), optional
        Starting point of the first restart instead of ``x`` (e.g. a bound's minimiser).

    Returns
    -------
    margins : torch.Tensor of shape (n, n_classes)
        Smallest ``z_ref - z_j`` found per target ``j`` (``+inf`` at the reference and the
        classes not attacked).
    points : torch.Tensor of shape (n, n_classes, *input_shape)
        Where each was found (inside the set; ``x`` where not attacked).
    """
    n = x.shape[0]
    ref = (
        torch.as_tensor(
            np.asarray(reference.cpu() if isinstance(reference, torch.Tensor) else reference)
        )
        .to(device=x.device, dtype=torch.long)
        .reshape(-1)
    )
    if ref.shape[0] != n:
        raise ValueError(f"reference has {ref.shape[0]} entries for {n} inputs.")
    lo, hi = _feasible_box(x, perturbation)
    step = (2.5 * perturbation.eps / max(steps, 1)).expand_as(x)

    with _attack_mode(module, "eval"):
        with torch.no_grad():
            n_classes = module(x[:1]).shape[1]
        if targets is None:
            targets = torch.ones(n, n_classes, dtype=torch.bool, device=x.device)
        targets = targets.clone()
        targets[torch.arange(n, device=x.device), ref] = False
        # One row per attacked (sample, class) pair.
        sample, target = targets.nonzero(as_tuple=True)
        first = (x if start is None else start.detach().to(x))[sample]
        best, best_x = _targeted_pgd(
            module,
            first,
            lo[sample],
            hi[sample],
            ref[sample],
            target,
            step[sample],
            steps=steps,
            restarts=restarts,
            generator=generator,
        )

    margins = torch.full((n, n_classes), float("inf"), dtype=x.dtype, device=x.device)
    margins[sample, target] = best.detach()
    points = x.detach().unsqueeze(1).repeat(1, n_classes, *([1] * (x.dim() - 1)))
    points[sample, target] = best_x.detach()
    return margins, points


def _targeted_pgd(
    module: nn.Module,
    first: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    reference: torch.Tensor,
    target: torch.Tensor,
    step: torch.Tensor,
    *,
    steps: int,
    restarts: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed-gradient descent of ``z_reference - z_target``, one attack per row in the box
    ``[lo, hi]``: restart 0 from ``first`` (clipped into the box), the others uniform. The
    smallest margin per row and where (``first`` where no restart ran)."""

    def negative_margin(z: torch.Tensor) -> torch.Tensor:
        return z.gather(1, target[:, None]).squeeze(1) - z.gather(1, reference[:, None]).squeeze(1)

    def start(restart: int) -> torch.Tensor:
        if restart == 0:
            return torch.minimum(torch.maximum(first, lo), hi)
        return _uniform_in_box(lo, hi, generator)

    worst, best_x = _signed_gradient_ascent(
        module,
        negative_margin,
        start,
        lo,
        hi,
        step,
        steps=steps,
        restarts=restarts if first.shape[0] else 0,
        initial=first,
    )
    return -worst, best_x


def _signed_gradient_ascent(
    module: nn.Module,
    objective: Callable[[torch.Tensor], torch.Tensor],
    start: Callable[[int], torch.Tensor],
    lo: torch.Tensor,
    hi: torch.Tensor,
    step: torch.Tensor,
    *,
    steps: int,
    restarts: int,
    initial: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PGD loop shared by every attack: from ``start(restart)``, ``steps`` signed-gradient
    steps up ``objective(module(x))`` (one value per row) projected into ``[lo, hi]``. Returns
    the largest value per row over all restarts and iterates and where it was reached
    (``initial`` and ``-inf`` where no restart ran)."""
    best = torch.full(
        (initial.shape[0],), float("-inf"), dtype=initial.dtype, device=initial.device
    )
    best_x = initial.clone()
    view = (-1,) + (1,) * (initial.dim() - 1)
    with torch.enable_grad():
        for restart in range(restarts):
            x_adv = start(restart)
            for it in range(steps + 1):
                x_adv.requires_grad_(True)
                value = objective(module(x_adv))
                with torch.no_grad():
                    better = value > best
                    best = torch.where(better, value, best)
                    best_x = torch.where(better.view(view), x_adv, best_x)
                if it == steps:
                    break
                # Gradient w.r.t. the input only: parameters' .grad stay untouched.
                (grad,) = torch.autograd.grad(value.sum(), x_adv)
                with torch.no_grad():
                    x_adv = torch.minimum(torch.maximum(x_adv + step * grad.sign(), lo), hi)
    return best, best_x
