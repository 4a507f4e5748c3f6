"""The estimators' default ``certify()`` on the default digits teacher, against CROWN alone.

Trains the default ``CertifiedTeacher`` on digits (pixels / 16, stratified 75/25 split, seed 0:
450 test images; eps 0.1, ``input_shape=(1, 8, 8)``, domain [0, 1]) and times, side by side in
one run, the public ``teacher.certify(X_test, y=y_test)`` with its default cascade
``("ibp", "crown-ibp", "crown")`` and with ``method="crown"`` alone (medians of ``--repeats``
calls after one warm-up). ``--previous SRC`` also times the same network and data with the
``certify(..., method="crown")`` of another checkout of certdistill (for example the release
before the cascade, ``git worktree add /tmp/previous c03c0c3``), in a subprocess in the same run.
``--previous-teacher`` (with ``--previous``) repeats the comparison on *that* checkout's default
teacher, fitted there on the same data: the network on which the issue measured the old default
``certify()`` (one timed call of it, in the subprocess), certified here by the cascade and by
CROWN alone.

Run: python benchmarks/bench_default_certify.py [--previous SRC [--previous-teacher]]
[--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from certdistill import CertifiedTeacher, certify


def _median_seconds(call, repeats: int) -> tuple[float, object]:
    result = call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


_PREVIOUS = textwrap.dedent("""
    import statistics, sys, time
    import numpy as np, torch
    sys.path.insert(0, sys.argv[1])
    from certdistill import certify
    torch.set_num_threads(int(sys.argv[3]))
    saved = torch.load(sys.argv[2], weights_only=False)
    module, x, y = saved["module"], saved["x"], saved["y"]
    call = lambda: certify(module, x, 0.1, method="crown", y=y, lower=0.0, upper=1.0)
    cert = call()
    times = []
    for _ in range(int(sys.argv[4])):
        start = time.perf_counter(); cert = call(); times.append(time.perf_counter() - start)
    print(statistics.median(times), float(np.mean(cert.certified)))
""")


_PREVIOUS_TEACHER = textwrap.dedent("""
    import sys, time
    import numpy as np, torch
    sys.path.insert(0, sys.argv[1])
    from certdistill import CertifiedTeacher, certify
    torch.set_num_threads(int(sys.argv[3]))
    saved = torch.load(sys.argv[2], weights_only=False)
    start = time.perf_counter()
    teacher = CertifiedTeacher(eps=0.1, input_shape=(1, 8, 8), lower=0.0, upper=1.0,
                               random_state=0).fit(saved["X_train"], saved["y_train"])
    fit = time.perf_counter() - start
    start = time.perf_counter()
    cert = teacher.certify(saved["X_test"], y=saved["y_test"])  # that release's default
    seconds = time.perf_counter() - start
    torch.save({"module": teacher.module_.eval()}, sys.argv[2])
    print(fit, seconds, float(np.mean(cert.certified)))
""")


def _previous_teacher_rows(previous: str, split, threads: int, repeats: int) -> tuple:
    """The previous checkout's default teacher: its own default certify(), then ours on it."""
    X_train, X_test, y_train, y_test = split
    with tempfile.TemporaryDirectory() as folder:
        saved = Path(folder) / "previous.pt"
        torch.save(
            {"X_train": X_train, "y_train": y_train, "X_test": X_test, "y_test": y_test}, saved
        )
        output = subprocess.run(
            [sys.executable, "-c", _PREVIOUS_TEACHER, previous, str(saved), str(threads)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        fit, previous_s, previous_fraction = map(float, output.split()[-3:])
        module = torch.load(saved, weights_only=False)["module"]
    x = torch.as_tensor(X_test).reshape(-1, 1, 8, 8)
    labels = torch.as_tensor(y_test)

    def ours(method):
        return lambda: certify(module, x, 0.1, method=method, y=labels, lower=0.0, upper=1.0)

    cascade_s, cascade = _median_seconds(ours(("ibp", "crown-ibp", "crown")), repeats)
    crown_s, crown = _median_seconds(ours("crown"), repeats)
    rows = [
        ("default cascade ibp+crown-ibp+crown", cascade_s, cascade.certified_fraction),
        ("crown alone", crown_s, crown.certified_fraction),
        (
            f"previous checkout's default certify() (one call, {previous})",
            previous_s,
            previous_fraction,
        ),
    ]
    covered = bool(np.all(cascade.certified >= crown.certified))
    return fit, rows, cascade_s, covered


def _print_rows(rows, n: int, cascade_s: float) -> None:
    print("| certify | seconds | samples/s | certified % | time / default cascade |")
    print("|---|---|---|---|---|")
    for name, seconds, fraction in rows:
        print(
            f"| {name} | {seconds:.3f} | {n / seconds:,.0f} | {100 * fraction:.1f} | "
            f"{seconds / cascade_s:,.1f}x |"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--previous", help="source folder of another certdistill checkout")
    parser.add_argument(
        "--previous-teacher",
        action="store_true",
        help="also compare on the previous checkout's default teacher",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        (X / 16.0).astype(np.float32), y, test_size=0.25, stratify=y, random_state=0
    )
    start = time.perf_counter()
    teacher = CertifiedTeacher(
        eps=0.1, input_shape=(1, 8, 8), lower=0.0, upper=1.0, random_state=0
    ).fit(X_train, y_train)
    fit_seconds = time.perf_counter() - start
    rows = []
    cascade_s, cascade = _median_seconds(lambda: teacher.certify(X_test, y=y_test), args.repeats)
    rows.append(("default cascade ibp+crown-ibp+crown", cascade_s, cascade.certified_fraction))
    crown_s, crown = _median_seconds(
        lambda: teacher.certify(X_test, y=y_test, method="crown"), args.repeats
    )
    rows.append(("crown alone", crown_s, crown.certified_fraction))
    if args.previous:
        with tempfile.TemporaryDirectory() as folder:
            saved = Path(folder) / "teacher.pt"
            torch.save(
                {
                    "module": teacher.module_.eval(),
                    "x": teacher.module_input(X_test),
                    "y": torch.as_tensor(teacher._encode_labels(y_test)),
                },
                saved,
            )
            output = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _PREVIOUS,
                    args.previous,
                    str(saved),
                    str(args.threads),
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        seconds, fraction = map(float, output.split()[-2:])
        rows.append((f"crown, previous checkout ({args.previous})", seconds, fraction))
    n = len(y_test)
    print(
        f"Default CertifiedTeacher on digits: fit {fit_seconds:.1f} s, {n} test images, "
        f"eps 0.1, labels given, {torch.get_num_threads()} torch threads; median of "
        f"{args.repeats} calls after a warm-up.\n"
    )
    _print_rows(rows, n, cascade_s)
    covered = bool(np.all(cascade.certified >= crown.certified))
    print(f"\nEvery sample CROWN alone certifies is certified by the default cascade: {covered}.")
    if args.previous and args.previous_teacher:
        fit, rows, cascade_s, covered = _previous_teacher_rows(
            args.previous, (X_train, X_test, y_train, y_test), args.threads, args.repeats
        )
        print(
            f"\nThe previous checkout's default teacher (fitted there in {fit:.1f} s), "
            "certified by this checkout's certify():\n"
        )
        _print_rows(rows, n, cascade_s)
        print(
            f"\nEvery sample CROWN alone certifies is certified by the default cascade: {covered}."
        )
    print(
        "\nReproduce: python benchmarks/bench_default_certify.py "
        + " ".join(sys.argv[1:] if argv is None else argv)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
