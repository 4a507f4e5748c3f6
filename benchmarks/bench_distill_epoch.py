"""Cost of a distilled epoch against an epoch of the same student trained alone.

On digits (sklearn's ``load_digits``, pixels / 16, the 70 % training split of
``benchmarks/bench_distill.py``, eps 0.1), a 64-32-10 student (``module__hidden_sizes=(32,)``)
is fitted through the public ``fit``:

* ``distilled``: ``DistilledStudent`` with its defaults (selective loss, the ``("noise", "ball")``
  transfer set of ``transfer_size`` 4, so nine training rows per labelled row), its teacher the
  default certified CNN of ``benchmarks/bench_distill_fair.py`` (``input_shape=(1, 8, 8)``),
  fitted once before any timing and passed as a ``FrozenEstimator``;
* ``alone, same rows``: ``CertifiedTeacher(method="ibp")`` on the same network, fitted on as many
  rows (the labelled rows plus as many noise and ball inputs, labelled as their source row);
* ``alone``: the same, on the labelled rows only (the issue's "network trained alone").

Each contender is fitted ``--runs`` times (interleaved, so that a load change on the machine hits
all of them alike); the per-epoch time is the fit's wall time over its epochs, and the ratios are
medians of the runs' ratios. The target of issue 22 is ``distilled / alone, same rows <= 1.5``.

Run: python benchmarks/bench_distill_epoch.py [--epochs 60] [--runs 3] [--teacher-epochs 20]
[--threads 1]. Prints a markdown table and the command that reproduces it.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, from anywhere
from sklearn.frozen import FrozenEstimator  # noqa: E402

from benchmarks.bench_distill import load  # noqa: E402
from benchmarks.bench_distill_fair import TRANSFER_SIZE, augmented  # noqa: E402
from certdistill import CertifiedTeacher, DistilledStudent  # noqa: E402

CONTENDERS = ("distilled", "alone, same rows", "alone")


def make_teacher(X, y, eps: float, epochs: int | None, seed: int = 0) -> CertifiedTeacher:
    return CertifiedTeacher(
        eps=eps, lower=0.0, upper=1.0, input_shape=(1, 8, 8), max_epochs=epochs, random_state=seed
    ).fit(X, y)


def fit_seconds(contender: str, teacher, X, y, *, eps: float, epochs: int, seed: int):
    """Wall seconds of one public ``fit`` and the epochs it ran."""
    common = dict(
        eps=eps,
        lower=0.0,
        upper=1.0,
        random_state=seed,
        max_epochs=epochs,
        module__hidden_sizes=(32,),
    )
    if contender == "distilled":
        estimator, data = DistilledStudent(FrozenEstimator(teacher), **common), (X, y)
    elif contender == "alone, same rows":
        estimator = CertifiedTeacher(method="ibp", **common)
        data = augmented(X, y, eps, seed, TRANSFER_SIZE)
    else:
        estimator, data = CertifiedTeacher(method="ibp", **common), (X, y)
    start = time.perf_counter()
    estimator.fit(*data)
    return time.perf_counter() - start, estimator.n_epochs_


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60, help="student epochs per fit")
    parser.add_argument("--runs", type=int, default=3, help="fits per contender (median)")
    parser.add_argument(
        "--teacher-epochs",
        type=int,
        default=20,
        help="epochs of the teacher (fitted once, outside the timing)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: steady timings on a shared machine; 0: torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    X, _, y, _, eps = load("digits", 0)
    start = time.perf_counter()
    teacher = make_teacher(X, y, eps, args.teacher_epochs, args.seed)
    print(
        f"teacher fitted in {time.perf_counter() - start:.1f} s (not timed below)",
        file=sys.stderr,
        flush=True,
    )

    per_epoch = {c: [] for c in CONTENDERS}
    for run in range(args.runs):
        for contender in CONTENDERS:
            seconds, epochs = fit_seconds(
                contender, teacher, X, y, eps=eps, epochs=args.epochs, seed=args.seed
            )
            per_epoch[contender].append(seconds / max(epochs, 1))
            print(
                f"  run {run}: {contender}: {seconds:.2f} s for {epochs} epochs",
                file=sys.stderr,
                flush=True,
            )

    def ratio(a: str, b: str) -> float:
        return statistics.median(np.divide(per_epoch[a], per_epoch[b]).tolist())

    rows = len(X)
    print(
        f"\n### Epoch cost on digits ({rows} labelled rows, {args.epochs} epochs, "
        f"{torch.get_num_threads()} torch threads, median of {args.runs} runs)\n"
    )
    print("| contender | training rows | s / epoch (median) |")
    print("|---|---:|---:|")
    rows_of = {
        "distilled": rows * (1 + 2 * TRANSFER_SIZE),
        "alone, same rows": rows * (1 + 2 * TRANSFER_SIZE),
        "alone": rows,
    }
    for contender in CONTENDERS:
        print(
            f"| {contender} | {int(rows_of[contender])} | "
            f"{statistics.median(per_epoch[contender]):.3f} |"
        )
    print(
        f"\ndistilled / alone, same rows: {ratio('distilled', 'alone, same rows'):.2f}x "
        "(target <= 1.5x)"
    )
    print(f"distilled / alone (labelled rows only): {ratio('distilled', 'alone'):.2f}x")
    print(
        "\nCommand: python "
        + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    )


if __name__ == "__main__":
    main()
