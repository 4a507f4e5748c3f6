"""Certification throughput of the public ``certify()``: native vs plain forward vs auto_LiRPA.

Run::

    python benchmarks/bench_certify.py                 # CPU, batch 256
    python benchmarks/bench_certify.py --device cuda   # GPU

Networks (randomly initialised, seed 0; inputs uniform in [0, 1], domain [0, 1]):

* MLP: Linear 784-256-256-10 with ReLU;
* CNN: Conv 1->16 4x4/2 pad 1, ReLU, Conv 16->32 4x4/2 pad 1, ReLU, Flatten, Linear 1568->100,
  ReLU, Linear 100->10.

Each cell is the median over repeats of one public ``certdistill.certify(module, X, eps,
method=..., lower=0, upper=1)`` call on ``batch_size`` samples, validation and the reference
prediction included (the first call is a warm-up and not timed); auto_LiRPA runs through the same
call with ``backend="auto_lirpa"``, so both pay the same validation. auto_LiRPA columns appear
when it is importable.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from functools import partial

import torch
from torch import nn

from certdistill import certify
from certdistill.bounds import METHODS, Perturbation, engine_for


def build_networks() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10))
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(1568, 100), nn.ReLU(), nn.Linear(100, 10),
    )
    return {
        "MLP 784-256-256-10": (mlp.eval(), (784,)),
        "CNN conv16-conv32-fc100": (cnn.eval(), (1, 28, 28)),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: torch.device, repeats: int, budget_s: float) -> float:
    """Median seconds of ``fn()`` over at most ``repeats`` runs (fewer if over ``budget_s``)."""
    fn()
    _synchronize(device)
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unstable_fraction(module: nn.Module, x, eps) -> float:
    """Fraction of ReLU inputs whose IBP interval contains zero (drives CROWN's cost)."""
    perturbation = Perturbation.create(eps, x.shape[1:], lower=0.0, upper=1.0, device=x.device)
    with torch.no_grad():
        bounds = engine_for(module).activation_interval_bounds(x, perturbation)
    unstable = sum(int(((low < 0) & (up > 0)).sum()) for low, up in bounds)
    return unstable / max(1, sum(low.numel() for low, _ in bounds))


def certify_call(module: nn.Module, x, eps: float, method: str, backend: str):
    """A no-argument call of the public ``certify`` on ``x``."""
    return partial(certify, module, x, eps, method=method, lower=0.0, upper=1.0,
                   batch_size=x.shape[0], backend=backend)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0,
                        help="stop repeating a cell after this many seconds")
    parser.add_argument("--methods", nargs="+", default=["ibp", "crown-ibp", "crown"],
                        choices=METHODS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-lirpa", action="store_true", help="skip auto_LiRPA")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    lirpa = False
    if not args.no_lirpa:
        try:
            from certdistill.bounds.lirpa import import_auto_lirpa

            import_auto_lirpa()
            lirpa = True
        except ImportError as error:
            print(f"(auto_LiRPA not importable, its columns are skipped: {error})\n")

    print(f"# bench_certify: device={device}, batch={args.batch_size}, eps={args.eps}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"python {platform.python_version()}")
    print(f"# command: python {' '.join(sys.argv)}\n")
    header = "| network | method | native samples/s | x plain forward |"
    rule = "|---|---|---|---|"
    if lirpa:
        header += " auto_LiRPA samples/s | native / auto_LiRPA |"
        rule += "---|---|"
    rows = [header, rule]
    for name, (module, shape) in build_networks().items():
        module = module.to(device)
        x = torch.rand(args.batch_size, *shape, device=device)
        with torch.no_grad():
            forward_s = time_call(partial(module, x), device, args.repeats * 4, args.budget)
        forward_rate = args.batch_size / forward_s
        rows.append(f"| {name} | plain forward | {forward_rate:,.0f} | 1.0 |"
                    + (" | |" if lirpa else ""))
        fraction = unstable_fraction(module, x, args.eps)
        for method in args.methods:
            native = certify_call(module, x, args.eps, method, "native")
            native_rate = args.batch_size / time_call(native, device, args.repeats, args.budget)
            row = (f"| {name} | {method} | {native_rate:,.1f} | "
                   f"{forward_rate / native_rate:,.1f}x slower |")
            if lirpa:
                theirs = certify_call(module, x, args.eps, method, "auto_lirpa")
                lirpa_rate = args.batch_size / time_call(theirs, device, args.repeats,
                                                         args.budget)
                row += f" {lirpa_rate:,.1f} | {native_rate / lirpa_rate:.2f} |"
            rows.append(row)
            print(row, flush=True)
        print(f"# {name}: {100 * fraction:.0f} % of ReLU inputs unstable under IBP at eps "
              f"{args.eps}", flush=True)
    print()
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
