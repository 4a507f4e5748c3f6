"""Certification throughput of the public ``certify()``: native vs plain forward vs auto_LiRPA.

Run::

    python benchmarks/bench_certify.py --threads 2            # CPU, batch 256, eps 0.05
    python benchmarks/bench_certify.py --device cuda          # GPU

Networks (randomly initialised, seed 0; inputs uniform in [0, 1], domain [0, 1]):

* MLP: Linear 784-256-256-10 with ReLU;
* CNN: Conv 1->16 4x4/2 pad 1, ReLU, Conv 16->32 4x4/2 pad 1, ReLU, Flatten, Linear 1568->100,
  ReLU, Linear 100->10.

What is timed, per call on ``batch_size`` samples at once:

* **native**: one public ``certdistill.certify(module, X, eps, method=..., lower=0, upper=1)``
  call (validation, clean prediction, input box and bounds, as a user calls it);
* **auto_LiRPA direct**: auto_LiRPA used as its own documentation shows. The ``BoundedModule``
  is built once per network and device, outside the timing. Each timed call then runs, under
  ``torch.no_grad()``, the clean forward pass and its argmax (inside the timing, since
  ``certify()`` computes the clean prediction too), the K-1 margin specification ``C`` of shape
  (batch, K-1, K) (row j is ``e_pred - e_other``), the input
  ``BoundedTensor(x, PerturbationLpNorm(norm=inf, x_L=clamp(x - eps, 0, 1),
  x_U=clamp(x + eps, 0, 1)))`` (the clipped box ``certify()`` bounds) and
  ``compute_bounds(x=(bounded_x,), C=C, method="IBP" | "CROWN-IBP" | "CROWN",
  bound_upper=False)``. For ``alpha-crown`` the module is built with
  ``bound_opts={"optimize_bound_args": {"iteration": 20, "lr_alpha": 0.1}}`` (the native
  engine's steps and learning rate) and called with ``method="CROWN-Optimized"``, gradients
  enabled;
* **via certdistill adapter** (``--adapter``): the old baseline, ``certify(...,
  backend="auto_lirpa")``, which adds a K-row specification, a separate forward pass and
  ``torch.enable_grad()`` even for IBP;
* **plain forward**: ``module(X)`` under ``torch.no_grad()``.

Calls alternate, one of each per round (forward, native, auto_LiRPA direct[, adapter]), for
``--pairs`` rounds after one untimed warm-up round, so that load on a shared machine hits all
alike; each cell is the median of its rounds, and "x plain forward" divides by the forward
pass's median of the same rounds (the "plain forward" row shows the first method's rounds).
``max |diff|`` is the largest absolute difference between the native and the direct auto_LiRPA
margin lower bounds (float32) over the batch, checking that both do the same work. The
auto_LiRPA columns appear when auto_LiRPA is importable.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from functools import partial

import numpy as np
import torch
from torch import nn

from certdistill import certify
from certdistill.bounds import METHODS, Perturbation, engine_for

#: auto_LiRPA's names of the non-optimising methods.
LIRPA_METHODS = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN"}
#: alpha-CROWN options matching the native defaults (``alpha_steps=20``, ``alpha_lr=0.1``).
ALPHA_OPTS = {"optimize_bound_args": {"iteration": 20, "lr_alpha": 0.1}}


def build_networks() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(1568, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )
    return {
        "MLP 784-256-256-10": (mlp.eval(), (784,)),
        "CNN conv16-conv32-fc100": (cnn.eval(), (1, 28, 28)),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_alternating(
    fns: dict, device: torch.device, rounds: int, budget_s: float | None
) -> tuple[dict[str, float], dict, int]:
    """Median seconds of each of ``fns``, called in turn, one of each per round.

    One untimed warm-up round first. Stops after ``rounds`` rounds, or earlier once the timed
    rounds exceed ``budget_s`` (at least three rounds). Returns the medians, the warm-up
    round's results and the number of timed rounds.
    """
    results = {}
    for name, fn in fns.items():
        results[name] = fn()
        _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    done = 0
    while done < rounds and (budget_s is None or done < 3 or spent < budget_s):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _synchronize(device)
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            spent += elapsed
        done += 1
    return {name: statistics.median(values) for name, values in times.items()}, results, done


def unstable_fraction(module: nn.Module, x, eps) -> float:
    """Fraction of ReLU inputs whose IBP interval contains zero (drives CROWN's cost)."""
    perturbation = Perturbation.create(eps, x.shape[1:], lower=0.0, upper=1.0, device=x.device)
    with torch.no_grad():
        bounds = engine_for(module).activation_interval_bounds(x, perturbation)
    unstable = sum(int(((low < 0) & (up > 0)).sum()) for low, up in bounds)
    return unstable / max(1, sum(low.numel() for low, _ in bounds))


def certify_call(module: nn.Module, x, eps: float, method: str, backend: str):
    """A no-argument call of the public ``certify`` on ``x``."""
    return partial(
        certify,
        module,
        x,
        eps,
        method=method,
        lower=0.0,
        upper=1.0,
        batch_size=x.shape[0],
        backend=backend,
    )


def others_specification(prediction: torch.Tensor, n_classes: int, dtype) -> torch.Tensor:
    """The K-1 margin specification: ``C[i, j] = e_pred - e_other_j``, others in class order."""
    k = torch.arange(n_classes - 1, device=prediction.device)
    others = k + (k >= prediction[:, None]).long()
    eye = torch.eye(n_classes, dtype=dtype, device=prediction.device)
    return eye[prediction].unsqueeze(1) - eye[others]


def lirpa_direct_call(lirpa, bounded, module: nn.Module, x, eps: float, method: str):
    """A no-argument call of auto_LiRPA as documented; returns (prediction, (n, K-1) bounds)."""

    with torch.no_grad():
        n_classes = module(x[:1]).shape[1]

    def bounds(prediction):
        spec = others_specification(prediction, n_classes, x.dtype)
        box = lirpa.PerturbationLpNorm(
            norm=float("inf"), x_L=(x - eps).clamp(0.0, 1.0), x_U=(x + eps).clamp(0.0, 1.0)
        )
        bounded_x = lirpa.BoundedTensor(x, box)
        name = "CROWN-Optimized" if method == "alpha-crown" else LIRPA_METHODS[method]
        lower, _ = bounded.compute_bounds(x=(bounded_x,), C=spec, method=name, bound_upper=False)
        return lower

    def call():
        with torch.no_grad():
            prediction = module(x).argmax(1)
            if method != "alpha-crown":
                return prediction, bounds(prediction)
        # alpha-CROWN optimises its slopes by gradient descent.
        with torch.enable_grad():
            return prediction, bounds(prediction).detach()

    return call


def native_others(margins: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """The (n, K-1) non-reference columns of ``Certificate.margins``, in class order."""
    keep = np.arange(margins.shape[1])[None, :] != prediction[:, None]
    return margins[keep].reshape(margins.shape[0], margins.shape[1] - 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument(
        "--pairs",
        "--repeats",
        dest="pairs",
        type=int,
        default=15,
        help="timed rounds per cell (one call of each contender per round)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="stop a cell's rounds after this many seconds (at least 3 rounds)",
    )
    parser.add_argument(
        "--methods", nargs="+", default=["ibp", "crown-ibp", "crown"], choices=METHODS
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-lirpa", action="store_true", help="skip auto_LiRPA")
    parser.add_argument(
        "--adapter",
        action="store_true",
        help="also time auto_LiRPA via certdistill's adapter (the old baseline)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    lirpa = None
    if not args.no_lirpa:
        try:
            from certdistill.bounds.lirpa import import_auto_lirpa

            lirpa = import_auto_lirpa()
        except ImportError as error:
            print(f"(auto_LiRPA not importable, its columns are skipped: {error})\n")
    adapter = args.adapter and lirpa is not None

    version = f", auto_LiRPA {lirpa.__version__}" if lirpa is not None else ""
    print(
        f"# bench_certify: device={device}, batch={args.batch_size}, eps={args.eps}, "
        f"torch {torch.__version__}{version}, {torch.get_num_threads()} threads, "
        f"python {platform.python_version()}, {args.pairs} alternating rounds per cell"
    )
    command = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(f"# command: python benchmarks/bench_certify.py {command}".rstrip() + "\n")
    header = "| network | method | native samples/s | x plain forward |"
    rule = "|---|---|---|---|"
    if lirpa is not None:
        header += " auto_LiRPA direct samples/s | native / auto_LiRPA direct | max \\|diff\\| |"
        rule += "---|---|---|"
    if adapter:
        header += " via certdistill adapter samples/s | native / adapter |"
        rule += "---|---|"
    header += " rounds |"
    rule += "---|"
    rows = [header, rule]
    for name, (module, shape) in build_networks().items():
        module = module.to(device)
        x = torch.rand(args.batch_size, *shape, device=device)
        bounded = {}
        if lirpa is not None:
            # Built once per network and device, outside the timing, as documented.
            bounded["plain"] = lirpa.BoundedModule(module, torch.empty_like(x), device=device)
            if "alpha-crown" in args.methods:
                bounded["alpha"] = lirpa.BoundedModule(
                    module, torch.empty_like(x), bound_opts=ALPHA_OPTS, device=device
                )
            for model in bounded.values():
                model.eval()
        forward_rate = None
        fraction = unstable_fraction(module, x, args.eps)
        for method in args.methods:
            fns = {
                "forward": torch.no_grad()(partial(module, x)),
                "native": certify_call(module, x, args.eps, method, "native"),
            }
            if lirpa is not None:
                model = bounded["alpha" if method == "alpha-crown" else "plain"]
                fns["direct"] = lirpa_direct_call(lirpa, model, module, x, args.eps, method)
            if adapter:
                fns["adapter"] = certify_call(module, x, args.eps, method, "auto_lirpa")
            medians, results, done = time_alternating(fns, device, args.pairs, args.budget)
            rate = {key: args.batch_size / seconds for key, seconds in medians.items()}
            if forward_rate is None:
                forward_rate = rate["forward"]
                rows.append(
                    f"| {name} | plain forward | {forward_rate:,.0f} | 1.0 |"
                    + (" | | |" if lirpa is not None else "")
                    + (" | |" if adapter else "")
                    + f" {done} |"
                )
            row = (
                f"| {name} | {method} | {rate['native']:,.1f} | "
                f"{medians['native'] / medians['forward']:,.1f}x slower |"
            )
            if lirpa is not None:
                certificate = results["native"]
                prediction, theirs = results["direct"]
                prediction = prediction.cpu().numpy()
                if not np.array_equal(prediction, certificate.prediction):
                    raise AssertionError(f"{name} {method}: predictions differ")
                ours = native_others(certificate.margins, prediction)
                diff = float(np.max(np.abs(ours - theirs.cpu().numpy())))
                row += (
                    f" {rate['direct']:,.1f} | {medians['direct'] / medians['native']:.2f}"
                    f" | {diff:.1e} |"
                )
            if adapter:
                row += f" {rate['adapter']:,.1f} | {medians['adapter'] / medians['native']:.2f} |"
            row += f" {done} |"
            rows.append(row)
            print(row, flush=True)
        print(
            f"# {name}: {100 * fraction:.0f} % of ReLU inputs unstable under IBP at eps {args.eps}",
            flush=True,
        )
    print()
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
