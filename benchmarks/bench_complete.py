"""Complete verification of small digits students: how much incomplete bounds miss, and speed.

For each student (MLP 64-32-10, MLP 64-64-64-10, CNN conv4-conv8/2-fc16; each trained by IBP and
by MTL-IBP with alpha 0.2 and 5 PGD steps, 60 epochs, seed 0, eps 0.1; see
``benchmarks/students.py``) it certifies the 540 digits test samples at eps 0.1 with labels,
through the public ``certify()`` of the estimator, by ``ibp``, ``crown``, ``alpha-crown`` and
``complete``, and reports certified accuracy, the share of samples decided (certified or
falsified), seconds per sample, and, on the first ``--milp-samples`` samples, the time of
``method="milp"`` alone (the exact MILP on every sample, without the cascade) beside the time of
``method="complete"`` on the same samples in the same run.

Run ``python benchmarks/bench_complete.py`` (``--help``: ``--students``, ``--trainings``,
``--samples``, ``--timeout``, ``--no-milp``); it prints a markdown table and the command that
reproduces it. ``--model DIR`` verifies an exported network instead (``model.pt`` with the
folded Linear/ReLU layers of ``benchmarks/students.folded_network`` and ``data.npz``), to compare
with an external verifier on the very same weights.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, from anywhere
from benchmarks.students import EPS, STUDENTS, TRAININGS, digits_split, train_student  # noqa: E402
from certdistill import certify  # noqa: E402


def _timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def evaluate(certify_call, n: int, milp_samples: int) -> dict:
    """Certified accuracy, decided share and seconds of each method (one call each); on the
    first ``milp_samples`` samples, the seconds of ``"milp"`` alone and of ``"complete"``."""
    row = {}
    for method in ("ibp", "crown", "alpha-crown", "complete"):
        cert, seconds = _timed(lambda method=method: certify_call(method))
        row[method] = dict(
            certified=float(cert.certified.mean()),
            decided=float(np.mean(cert.status != "unknown")),
            falsified=float(np.mean(cert.status == "falsified")),
            seconds=seconds,
        )
        if method == "complete":
            stages, counts = np.unique(cert.decided_by, return_counts=True)
            row["decided_by"] = {str(s): int(c) for s, c in zip(stages, counts, strict=True)}
            row["status"] = cert.status.tolist()
    if milp_samples:
        cert, seconds = _timed(lambda: certify_call("milp", rows=slice(0, milp_samples)))
        same, cascade_seconds = _timed(
            lambda: certify_call("complete", rows=slice(0, milp_samples))
        )
        row["milp"] = dict(
            certified=float(cert.certified.mean()),
            decided=float(np.mean(cert.status != "unknown")),
            seconds=seconds,
            cascade_seconds=cascade_seconds,
            n=milp_samples,
            agree=bool(
                np.all(
                    cert.status[cert.status != "unknown"] == same.status[cert.status != "unknown"]
                )
            ),
        )
    row["n"] = n
    return row


def _format(name: str, training: str, params: int, clean: float, row: dict) -> str:
    def cell(method):
        return f"{100 * row[method]['certified']:.1f}"

    complete = row["complete"]
    milp = row.get("milp")
    milp_text = (
        f"{milp['seconds']:.1f} s vs {milp['cascade_seconds']:.2f} s on the first "
        f"{milp['n']} ({100 * milp['decided']:.0f} % decided, same statuses: "
        f"{'yes' if milp['agree'] else 'NO'})"
        if milp
        else "-"
    )
    return (
        f"| {name} | {training} | {params:,} | {100 * clean:.1f} | {cell('ibp')} | "
        f"{cell('crown')} | {cell('alpha-crown')} | **{cell('complete')}** | "
        f"{100 * complete['decided']:.1f} | {complete['seconds']:.1f} s "
        f"({1000 * complete['seconds'] / row['n']:.1f} ms/sample) | {milp_text} |"
    )


HEADER = (
    "| student | training | parameters | clean % | IBP % | CROWN % | alpha-CROWN % | "
    "complete % | decided % | complete time | MILP alone vs complete |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def run_students(args) -> list[str]:
    _, X_test, _, y_test = digits_split()
    X_test, y_test = X_test[: args.samples], y_test[: args.samples]
    lines = []
    for name in args.students:
        for training in args.trainings:
            estimator, fit_seconds = _timed(
                functools.partial(train_student, name, training, seed=0)
            )
            clean = estimator.score(X_test, y_test)
            params = sum(p.numel() for p in estimator.module_.parameters())

            def call(method, rows=slice(None), estimator=estimator):
                return estimator.certify(
                    X_test[rows], y=y_test[rows], method=method, timeout=args.timeout
                )

            row = evaluate(call, len(y_test), 0 if args.no_milp else args.milp_samples)
            lines.append(_format(name, training, params, clean, row))
            print(
                lines[-1],
                f"(fit {fit_seconds:.0f} s; decided by {row['decided_by']})",
                file=sys.stderr,
                flush=True,
            )
    return lines


def run_exported(args) -> list[str]:
    """Verify an exported Linear/ReLU network on its exported data (see module docstring)."""
    directory = Path(args.model)
    data = np.load(directory / "data.npz")
    X, y = torch.as_tensor(data["X"]), torch.as_tensor(data["y"])
    state = torch.load(directory / "model.pt", weights_only=True)
    weights = [
        state[k] for k in sorted(state, key=lambda k: int(k.split(".")[0])) if k.endswith("weight")
    ]
    layers: list[nn.Module] = []
    for i, w in enumerate(weights):
        layers.append(nn.Linear(w.shape[1], w.shape[0]))
        if i < len(weights) - 1:
            layers.append(nn.ReLU())
    network = nn.Sequential(*layers)
    network.load_state_dict(
        {f"{2 * (int(k.split('.')[0]) // 2)}.{k.split('.')[1]}": v for k, v in state.items()}
    )
    network.eval()
    with torch.no_grad():
        clean = float((network(X).argmax(1) == y).float().mean())

    def call(method, rows=slice(None)):
        return certify(
            network,
            X[rows],
            EPS,
            method=method,
            y=y[rows],
            lower=0.0,
            upper=1.0,
            timeout=args.timeout,
        )

    row = evaluate(call, len(y), 0 if args.no_milp else args.milp_samples)
    params = sum(p.numel() for p in network.parameters())
    (directory / "certdistill_results.json").write_text(
        json.dumps(
            {
                "status": row.pop("status"),
                "decided_by": row["decided_by"],
                "seconds": row["complete"]["seconds"],
            },
            indent=1,
        )
    )
    return [_format(directory.name, "exported", params, clean, row)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--trainings", nargs="+", default=list(TRAININGS), choices=list(TRAININGS))
    parser.add_argument("--samples", type=int, default=540, help="test samples (first n)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds of branch and bound and MILP per sample",
    )
    parser.add_argument("--no-milp", action="store_true", help="skip the MILP-alone column")
    parser.add_argument(
        "--milp-samples",
        type=int,
        default=100,
        help="samples (the first n) timed by MILP alone and by the cascade",
    )
    parser.add_argument("--model", help="directory of an exported network (model.pt, data.npz)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = run_exported(args) if args.model else run_students(args)
    print(
        f"\nDigits (pixels / 16, stratified 70/30 split, seed 0), eps = {EPS}, labels given; "
        f"certified % by each method through certify(); 'decided' = certified or falsified "
        f"by complete verification (timeout {args.timeout:g} s per sample); torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, python "
        f"{platform.python_version()}.\n"
    )
    print(HEADER)
    print("\n".join(lines))
    print(
        "\nReproduce: python benchmarks/bench_complete.py "
        + " ".join(sys.argv[1:] if argv is None else argv)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
