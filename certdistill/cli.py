"""Command-line interface: ``certdistill demo`` (also ``python -m certdistill demo``)."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch import nn

from certdistill.bounds import METHODS, margin_lower_bounds
from certdistill.certify import certify


def _load_digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    X = (data.data / 16.0).astype(np.float32)
    return train_test_split(X, data.target, test_size=0.3, stratify=data.target, random_state=seed)


def _train_ibp(X, y, eps: float, epochs: int, seed: int) -> nn.Module:
    """A small IBP-trained MLP (stand-in until the estimators exist)."""
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(X.shape[1], 256), nn.ReLU(), nn.Linear(256, 256),
                           nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    X_t, y_t = torch.as_tensor(X), torch.as_tensor(y, dtype=torch.long)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        ramp = min(1.0, epoch / max(1, epochs // 2))
        for batch in torch.randperm(len(X_t)).split(64):
            x, target = X_t[batch], y_t[batch]
            margins = margin_lower_bounds(module, x, eps * ramp, target, method="ibp",
                                          lower=0.0, upper=1.0)
            worst = -margins.masked_fill(torch.isinf(margins), 0.0)
            loss = 0.5 * loss_fn(module(x), target) + 0.5 * loss_fn(worst, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return module.eval()


def demo(args: argparse.Namespace) -> int:
    X_train, X_test, y_train, y_test = _load_digits(args.seed)
    print(f"digits: {len(X_train)} train / {len(X_test)} test samples, eps = {args.eps}")
    start = time.perf_counter()
    module = _train_ibp(X_train, y_train, args.eps, args.epochs, args.seed)
    print(f"trained an IBP MLP 64-256-256-10 for {args.epochs} epochs "
          f"in {time.perf_counter() - start:.1f} s")
    with torch.no_grad():
        clean = (module(torch.as_tensor(X_test)).argmax(1).numpy() == y_test).mean()
    print(f"\nclean accuracy: {100 * clean:.1f} %\n")
    print("| method | certified accuracy | samples / s |")
    print("|---|---|---|")
    for method in METHODS:
        start = time.perf_counter()
        cert = certify(module, X_test, args.eps, method=method, y=y_test, lower=0.0, upper=1.0)
        elapsed = time.perf_counter() - start
        print(f"| {method} | {100 * cert.certified_fraction:.1f} % | {len(cert) / elapsed:,.0f} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certdistill", description="Certified robustness and certified distillation."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="train and certify a network on scikit-learn's bundled digits data"
    )
    demo_parser.add_argument("--eps", type=float, default=0.1,
                             help="L-infinity radius on pixels scaled to [0, 1] (default 0.1)")
    demo_parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    demo_parser.add_argument("--seed", type=int, default=0, help="random seed")
    demo_parser.set_defaults(handler=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
