"""Command-line interface: ``certdistill demo`` (also ``python -m certdistill demo``)."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


def _load_digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    X = (data.data / 16.0).astype(np.float32)
    return train_test_split(X, data.target, test_size=0.3, stratify=data.target, random_state=seed)


def demo(args: argparse.Namespace) -> int:
    from certdistill.attacks import pgd_attack
    from certdistill.teacher import CertifiedTeacher

    X_train, X_test, y_train, y_test = _load_digits(args.seed)
    print(f"digits: {len(X_train)} train / {len(X_test)} test samples, eps = {args.eps} "
          "(pixels scaled to [0, 1])")
    teacher = CertifiedTeacher(
        eps=args.eps, method=args.method, input_shape=(1, 8, 8), lower=0.0, upper=1.0,
        max_epochs=args.epochs, random_state=args.seed, device=args.device, verbose=1,
    )
    start = time.perf_counter()
    teacher.fit(X_train, y_train)
    fit_seconds = time.perf_counter() - start
    n_parameters = sum(p.numel() for p in teacher.module_.parameters())
    print(f"\ntrained the teacher (method {args.method}, {n_parameters:,} parameters) "
          f"for {args.epochs} epochs in {fit_seconds:.1f} s")

    clean = teacher.score(X_test, y_test)
    x = teacher.module_input(X_test)
    y = torch.as_tensor(y_test, device=x.device)
    generator = torch.Generator(device=x.device).manual_seed(args.seed)
    adversarial = pgd_attack(teacher.module_.eval(), x, y, args.eps, steps=20, restarts=2,
                             lower=0.0, upper=1.0, generator=generator)
    with torch.no_grad():
        pgd = (teacher.module_(adversarial).argmax(1) == y).float().mean().item()
    print(f"clean accuracy {100 * clean:.1f} %, PGD-20 accuracy {100 * pgd:.1f} %\n")
    print("| certification method | certified accuracy | samples / s |")
    print("|---|---|---|")
    for method in ("ibp", "crown-ibp", "crown"):
        start = time.perf_counter()
        cert = teacher.certify(X_test, method=method, y=y_test)
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
    demo_parser.add_argument("--epochs", type=int, default=60, help="training epochs")
    demo_parser.add_argument("--method", default="ibp", choices=["ibp", "crown-ibp", "mtl-ibp"],
                             help="certified training method of the teacher (default ibp)")
    demo_parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    demo_parser.add_argument("--seed", type=int, default=0, help="random seed")
    demo_parser.set_defaults(handler=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
