"""Benchmark of certified training on the digits data.

For every training method of ``CertifiedTeacher`` it reports, on a stratified 70/30 split of the
digits images (pixels / 16, seed 0) at eps = 0.1: clean accuracy, PGD accuracy, certified accuracy
(IBP, CROWN, and the default cascade IBP -> CROWN-IBP -> CROWN of ``certify()``), the wall time
of ``fit`` and of ``certify()``, and the cost of one certified training step relative to one
plain (cross-entropy) step on the same network and batch (and, for CROWN-IBP, relative to an IBP
step).

``--data digits28`` trains on MNIST-sized images instead: 8,000 training and 2,000 test images of
28x28 pixels made by :func:`certdistill.datasets.make_digits28` (no download), with the default
teacher for ``input_shape=(1, 28, 28)``.

Run ``python benchmarks/bench_train.py`` (``--help`` for options); it prints a markdown table and
the command that reproduces it.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from certdistill.datasets import make_digits28
from certdistill.estimators.teacher import CertifiedTeacher
from certdistill.scale.allocator import retain_freed_memory
from certdistill.verify.attacks import pgd_attack

#: Benchmark names of the teacher's configurations beyond its ``method`` values.
VARIANTS = {"crown-ibp-per-margin": {"method": "crown-ibp", "loss_fusion": False}}

#: Data set name -> (loader, input_shape).
DATA = {
    "digits": (lambda: load_digits(return_X_y=True), (1, 8, 8)),
    "digits28": (lambda: make_digits28(10_000, random_state=0), (1, 28, 28)),
}


def load_data(name: str = "digits", seed: int = 0):
    X, y = DATA[name][0]()
    if name == "digits":
        X = X / 16.0
    X = X.astype(np.float32)
    test_size = 0.3 if name == "digits" else 0.2
    return train_test_split(X, y, test_size=test_size, stratify=y, random_state=seed)


def pgd_accuracy(teacher, X, y, eps, steps=20, restarts=2, seed=0) -> float:
    x = teacher.module_input(X)
    y_enc = torch.as_tensor(teacher._encode_labels(y))
    gen = torch.Generator().manual_seed(seed)
    x_adv = pgd_attack(
        teacher.module_,
        x,
        y_enc,
        teacher.perturbation_.with_eps(eps),
        steps=steps,
        restarts=restarts,
        generator=gen,
    )
    was_training = teacher.module_.training
    teacher.module_.eval()
    with torch.no_grad():
        pred = teacher.module_(x_adv).argmax(1)
    teacher.module_.train(was_training)
    return float((pred == y_enc).float().mean())


def _synchronize(net) -> None:
    if str(net.device).startswith("cuda"):
        torch.cuda.synchronize()


def _time_steps(net, batch, n_steps: int) -> float:
    _synchronize(net)
    start = time.perf_counter()
    for _ in range(n_steps):
        net.train_step(batch)
    _synchronize(net)
    return (time.perf_counter() - start) / n_steps


def step_cost(teacher, X, y, n_steps: int = 5, rounds: int = 7) -> dict[str, float]:
    """Median seconds per training step at full training eps: plain CE, IBP and the method's own.

    All three run on a copy of the fitted network, on the same batch, through the estimator's
    own ``train_step`` (forward, loss, backward, gradient clipping, optimiser step); the plain
    step is the same machinery at eps = 0 (clean cross-entropy only). Rounds are interleaved so
    that a change in machine load affects all three alike.
    """
    net = copy.deepcopy(teacher)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(X), size=min(net.batch_size, len(X)), replace=False)
    batch = (torch.as_tensor(X[idx]), torch.as_tensor(net._encode_labels(y[idx])))
    net.current_kappa_ = float(net.kappa_end)  # the steady state after the ramp
    net.current_beta_ = 1.0
    net.current_alpha_ = float(net.alpha)
    method = net.method
    full = net.training_perturbation()
    settings = {"plain": (full.scaled(0.0), method), "ibp": (full, "ibp"), "own": (full, method)}
    times: dict[str, list[float]] = {k: [] for k in settings}
    for r in range(rounds + 1):
        for key, (perturbation, m) in settings.items():
            net.current_perturbation_, net.method = perturbation, m
            t = _time_steps(net, batch, n_steps)
            if r > 0:  # the first round warms up
                times[key].append(t)
    net.method = method
    return {k: float(np.median(v)) for k, v in times.items()}


def run(args) -> list[dict]:
    Xtr, Xte, ytr, yte = load_data(args.data, 0)
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            params = dict(
                eps=args.eps,
                input_shape=DATA[args.data][1],
                lower=0.0,
                upper=1.0,
                random_state=seed,
                device=args.device,
                **VARIANTS.get(method, {"method": method}),
            )
            if args.batch_size is not None:
                params["batch_size"] = args.batch_size
            if args.epochs is not None:
                params["max_epochs"] = args.epochs
            if args.flat:
                params["input_shape"] = None
            teacher = CertifiedTeacher(**params)
            start = time.perf_counter()
            teacher.fit(Xtr, ytr)
            fit_time = time.perf_counter() - start
            ibp = teacher.certify(Xte, y=yte, method="ibp")
            cert_start = time.perf_counter()
            best = teacher.certify(Xte, y=yte).certified  # the default cascade
            cert_time = time.perf_counter() - cert_start
            crown = teacher.certify(Xte, y=yte, method="crown") if not args.no_crown else None
            cost = step_cost(teacher, Xtr, ytr) if not args.no_step_cost else {}
            rows.append(
                dict(
                    method=method,
                    seed=seed,
                    clean=teacher.score(Xte, yte),
                    pgd=pgd_accuracy(teacher, Xte, yte, args.eps, seed=seed),
                    crown=np.nan if crown is None else crown.certified.mean(),
                    ibp=ibp.certified.mean(),
                    best=best.mean(),
                    epoch_s=fit_time / teacher.n_epochs_,
                    fit_s=fit_time,
                    certify_s=cert_time,
                    ibp_ratio=cost.get("ibp", np.nan) / cost.get("plain", np.nan),
                    own_ratio=cost.get("own", np.nan) / cost.get("ibp", np.nan),
                    epochs=teacher.n_epochs_,
                )
            )
            print(_format_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _format_row(r: dict) -> str:
    return (
        f"| {r['method']} | {r['seed']} | {r['epochs']} | {100 * r['clean']:.1f} | "
        f"{100 * r['pgd']:.1f} | {100 * r['crown']:.1f} | {100 * r['ibp']:.1f} | "
        f"{100 * r['best']:.1f} | {r['epoch_s']:.2f} | {r['fit_s']:.1f} | {r['certify_s']:.2f} | "
        f"{r['ibp_ratio']:.2f} | {r['own_ratio']:.2f} |"
    )


HEADER = (
    "| method | seed | epochs | clean % | PGD % | certified CROWN % | certified IBP % | "
    "certified (default cascade) % | s / epoch | fit s | certify s | IBP step / plain step | "
    "method step / IBP step |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["ibp", "crown-ibp", "crown-ibp-per-margin", "mtl-ibp"],
        help="training methods, or " + ", ".join(VARIANTS),
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument(
        "--epochs", type=int, default=None, help="max_epochs (default: the teacher's default)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--flat",
        action="store_true",
        help="flat features (default MLP) instead of input_shape=(1, 8, 8)",
    )
    parser.add_argument("--no-step-cost", action="store_true")
    parser.add_argument(
        "--no-crown", action="store_true", help="skip the CROWN-alone column (slow on large images)"
    )
    parser.add_argument("--device", default="cpu", help="the estimators' device (cpu, cuda)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="training batch size (default: the teacher's, 128)",
    )
    parser.add_argument(
        "--data",
        choices=sorted(DATA),
        default="digits",
        help="digits (8x8) or digits28 (MNIST-sized, generated)",
    )
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="call certdistill.scale.allocator.retain_freed_memory() first (glibc)",
    )
    args = parser.parse_args(argv)
    if args.retain_freed_memory:
        print("retain_freed_memory():", retain_freed_memory())
    torch.set_num_threads(args.threads)
    rows = run(args)
    print()
    shape = DATA[args.data][1]
    print(
        f"Data {args.data} ({len(load_data(args.data)[0])} training images), stratified split "
        f"(seed 0), eps = {args.eps}, {'flat MLP' if args.flat else f'input_shape={shape} CNN'}"
        f" default teacher, device {args.device}, {args.threads} torch threads"
        f"{', freed memory retained' if args.retain_freed_memory else ''}. Certified by "
        "the default cascade of certify() (IBP, then CROWN-IBP and CROWN on the samples "
        "still open), timed in "
        "'certify s'. Step ratios at full training eps (CROWN-IBP with beta = 1)."
    )
    print()
    print(HEADER)
    for r in rows:
        print(_format_row(r))
    print()
    print(
        "Reproduce: python benchmarks/bench_train.py "
        + " ".join(sys.argv[1:] if argv is None else argv)
    )


if __name__ == "__main__":
    main()
