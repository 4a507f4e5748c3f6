"""Certification throughput: native engine vs plain forward vs auto_LiRPA, measured side by side.

Run::

    python benchmarks/bench_certify.py                 # CPU, batch 256
    python benchmarks/bench_certify.py --device cuda   # GPU

Networks (randomly initialised, seed 0; inputs uniform in [0, 1], domain [0, 1]):

* MLP: Linear 784-256-256-10 with ReLU;
* CNN: Conv 1->16 4x4/2 pad 1, ReLU, Conv 16->32 4x4/2 pad 1, ReLU, Flatten, Linear 1568->100,
  ReLU, Linear 100->10.

Each cell is the median over repeats of one call bounding ``batch_size`` samples (the first call
is a warm-up and not timed). auto_LiRPA columns appear when it is importable.
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

from certdistill.bounds import METHODS, BoundEngine


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


def unstable_fraction(engine: BoundEngine, x, eps) -> float:
    """Fraction of ReLU inputs whose IBP interval contains zero (drives CROWN's cost)."""
    bounds = engine.activation_interval_bounds(x, eps, lower=0.0, upper=1.0)
    unstable = sum(int(((low < 0) & (up > 0)).sum()) for low, up in bounds)
    return unstable / max(1, sum(low.numel() for low, _ in bounds))


def bound_call(bounder, x, eps: float, reference, method: str):
    """A no-argument call bounding the margins of ``x`` with ``bounder`` (engine or adapter)."""

    def call():
        with torch.no_grad():
            bounder.margin_lower_bounds(x, eps, reference, method=method, lower=0.0, upper=1.0)

    return call


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

    lirpa_factory = None
    if not args.no_lirpa:
        try:
            from certdistill.bounds.lirpa import LirpaBounds, import_auto_lirpa

            import_auto_lirpa()
            lirpa_factory = LirpaBounds
        except ImportError as error:
            print(f"(auto_LiRPA not importable, its columns are skipped: {error})\n")

    print(f"# bench_certify: device={device}, batch={args.batch_size}, eps={args.eps}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"python {platform.python_version()}")
    print(f"# command: python {' '.join(sys.argv)}\n")
    header = "| network | method | native samples/s | x plain forward |"
    rule = "|---|---|---|---|"
    if lirpa_factory is not None:
        header += " auto_LiRPA samples/s | native / auto_LiRPA |"
        rule += "---|---|"
    rows = [header, rule]
    for name, (module, shape) in build_networks().items():
        module = module.to(device)
        x = torch.rand(args.batch_size, *shape, device=device)
        with torch.no_grad():
            reference = module(x).argmax(1)
        engine = BoundEngine(module)
        lirpa = lirpa_factory(module) if lirpa_factory is not None else None
        with torch.no_grad():
            forward_s = time_call(partial(module, x), device, args.repeats * 4, args.budget)
        forward_rate = args.batch_size / forward_s
        rows.append(f"| {name} | plain forward | {forward_rate:,.0f} | 1.0 |"
                    + (" | |" if lirpa is not None else ""))
        fraction = unstable_fraction(engine, x, args.eps)
        for method in args.methods:
            native = bound_call(engine, x, args.eps, reference, method)
            native_rate = args.batch_size / time_call(native, device, args.repeats, args.budget)
            row = (f"| {name} | {method} | {native_rate:,.1f} | "
                   f"{forward_rate / native_rate:,.1f}x slower |")
            if lirpa is not None:
                theirs = bound_call(lirpa, x, args.eps, reference, method)
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
