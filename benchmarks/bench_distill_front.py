"""Certified accuracy against student size, training epochs and transfer set, alone and distilled.

Four studies on digits (eps 0.1; or ``--data breast_cancer``, eps 0.05), judged by complete
verification on the test samples:

* ``--study width``: one hidden layer of 16, 32, 64, 128 or 256 units (``--widths``), the front
  of certified accuracy against the student's parameters;
* ``--study epochs``: the 32-unit student trained for 10 to 200 epochs (``--epochs``): does the
  teacher let the student reach a given certified accuracy sooner? Fit seconds are reported
  beside the epochs, since the distilled student's epochs also cover its transfer rows;
* ``--study transfer``: the 32-unit distilled student with ``transfer_size`` 0 to 4
  (``--transfer-sizes``: teacher-labelled noise and ball inputs per kind, as a multiple of the
  training rows); ``alone ibp, augmented`` gets as many inputs, ``alone ibp`` does not depend on
  it;
* ``--study default``: the distilled student of the default size (no ``module``: the size rule
  of ``DistilledStudent``, ``student_size=0.1`` of the teacher's parameters), the students
  trained alone of the same hidden widths.

The width and epochs studies use the distilled student's default ``transfer_size``.

Contenders (``--contenders``), with their defaults (no tuning: the question is what a user
gets): ``alone ibp``, ``CertifiedTeacher(method="ibp")`` trained alone on the labelled rows;
``alone ibp, augmented``, the same on the labelled rows plus as many noise and ball inputs as
the distilled student gets, each labelled as its source row (is a gain the teacher's or the
augmentation's?); and ``distilled``, ``DistilledStudent`` (selective loss, transfer set,
unlabelled rows labelled by the teacher) with the default ``CertifiedTeacher`` fitted on the
labelled rows of the run; ``distilled, exact teacher radius``, the same with
``teacher_radius_levels=None`` (the teacher's worst case at each batch's radius during the eps
ramp instead of at 8 rounded-up steps); ``distilled, source labels`` and ``distilled, agreeing
labels``, the research variants of ``benchmarks/distill_variants.py`` (transfer inputs labelled
as their source rows, or only those the teacher labels so). ``--labelled 0.3`` gives the other
70 % of the training rows unlabelled (label -1) to the distilled student. Gains are paired per
seed against ``alone ibp``.

Run: python benchmarks/bench_distill_front.py --study width [--labelled 1.0 0.3]
[--seeds 0 1 2] [--contenders ...] [--distilled NAME=VALUE ...] [--plot DIR]. Prints a markdown
table and the command that reproduces it.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, from anywhere
from sklearn.frozen import FrozenEstimator  # noqa: E402

from benchmarks.bench_distill_fair import (  # noqa: E402
    TRANSFER_SIZE,
    augmented,
    labelled_mask,
    load,
    teacher_for,
)
from benchmarks.distill_variants import (  # noqa: E402
    AgreeingLabelsStudent,
    SourceLabelledStudent,
)
from certdistill import CertifiedTeacher, DistilledStudent  # noqa: E402

#: Distilled contender -> its class (the research variants of ``distill_variants``).
DISTILLED = {"distilled": DistilledStudent, "distilled, exact teacher radius": DistilledStudent,
             "distilled, source labels": SourceLabelledStudent,
             "distilled, agreeing labels": AgreeingLabelsStudent}
CONTENDERS = ("alone ibp", "alone ibp, augmented", *DISTILLED)


#: Study -> the key of its table and plot.
STUDY_KEYS = {"width": "width", "epochs": "epochs", "transfer": "transfer_size",
              "default": "hidden"}


def hidden_sizes(estimator) -> tuple[int, ...]:
    """Widths of the hidden ``Linear`` layers of a fitted MLP."""
    linear = [m for m in estimator.module_.modules() if isinstance(m, torch.nn.Linear)]
    return tuple(m.out_features for m in linear[:-1])


def make(contender: str, teacher, *, width, epochs: int | None, transfer_size: float,
         eps: float, seed: int, distilled: dict | None = None):
    """``width``: hidden units of one layer, a tuple of widths, or ``None`` (the distilled
    student's size rule)."""
    hidden = {} if width is None else {
        "module__hidden_sizes": tuple(width) if isinstance(width, tuple) else (width,)}
    common = dict(eps=eps, lower=0.0, upper=1.0, random_state=seed, max_epochs=epochs,
                  **hidden)
    if contender.startswith("alone"):
        return CertifiedTeacher(method="ibp", **common)
    if contender == "distilled, exact teacher radius":
        common["teacher_radius_levels"] = None
    return DISTILLED[contender](FrozenEstimator(teacher), unlabeled_label=-1,
                                **{"transfer_size": transfer_size, **common,
                                   **(distilled or {})})


def run(study: str, share: float, seeds, grids: dict, contenders,
        data: str = "digits", distilled: dict | None = None) -> list[dict]:
    X, X_test, y, y_test, eps, input_shape = load(data)
    mask = labelled_mask(y, share)
    settings = {"width": [(w, None, TRANSFER_SIZE) for w in grids["width"]],
                "epochs": [(32, e, TRANSFER_SIZE) for e in grids["epochs"]],
                "transfer": [(32, None, t) for t in grids["transfer"]],
                "default": [(None, None, TRANSFER_SIZE)]}[study]
    if study == "default":  # the distilled students first: the others copy their size
        contenders = sorted(contenders, key=lambda c: not c.startswith("distilled"))
    rows = []
    for seed in seeds:
        teacher = (teacher_for(X, y, mask, eps=eps, input_shape=input_shape, seed=seed)
                   if any(c.startswith("distilled") for c in contenders) else None)
        default_size = None
        for (width, epochs, size), contender in itertools.product(settings, contenders):
            if width is None and contender.startswith("alone"):
                width = default_size
            estimator = make(contender, teacher, width=width, epochs=epochs, transfer_size=size,
                             eps=eps, seed=seed, distilled=distilled)
            start = time.perf_counter()
            if contender == "alone ibp, augmented":
                estimator.fit(*augmented(X[mask], y[mask], eps, seed, size))
            elif contender == "alone ibp":
                estimator.fit(X[mask], y[mask])
            else:
                estimator.fit(X, np.where(mask, y, -1))
            seconds = time.perf_counter() - start
            if width is None:
                default_size = hidden_sizes(estimator)
            complete = estimator.certify(X_test, y=y_test, method="complete")
            row = dict(contender=contender, width=width, hidden="-".join(
                           map(str, hidden_sizes(estimator))),
                       epochs=epochs or estimator.n_epochs_,
                       transfer_size=size, seed=seed, seconds=seconds,
                       parameters=sum(p.numel() for p in estimator.module_.parameters()),
                       clean=estimator.score(X_test, y_test),
                       complete=complete.certified_fraction,
                       decided=complete.decided_fraction)
            rows.append(row)
            print(f"  {study} {share:.0%} {row}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], study: str, contenders) -> str:
    key = STUDY_KEYS[study]
    lines = [f"| {key} | parameters | contender | clean % | certified % (complete) | "
             "gain (per-seed range) | decided % | fit s |",
             "|---|---|---|---|---|---|---|---|"]
    for value in sorted({r[key] for r in rows}):
        alone = [r for r in rows if r[key] == value and r["contender"] == "alone ibp"]
        for contender in contenders:
            mine = [r for r in rows if r[key] == value and r["contender"] == contender]
            gains = [100 * (m["complete"] - a["complete"]) for m, a in
                     zip(mine, alone, strict=True)] if alone else [np.nan]
            gain = ("" if contender == "alone ibp" or not alone else
                    f"{np.mean(gains):+.1f} ({min(gains):+.1f} to {max(gains):+.1f})")
            clean = 100 * np.array([r["clean"] for r in mine])
            cert = 100 * np.array([r["complete"] for r in mine])
            lines.append(
                f"| {value} | {mine[0]['parameters']:,} | {contender} | "
                f"{clean.mean():.1f} ± {clean.std():.1f} | {cert.mean():.1f} ± {cert.std():.1f}"
                f" | {gain} | {100 * np.mean([r['decided'] for r in mine]):.1f} | "
                f"{np.mean([r['seconds'] for r in mine]):.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], study: str, share: float, folder: Path, contenders,
         data: str = "digits") -> Path:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, PercentFormatter

    x_key = "parameters" if study == "width" else STUDY_KEYS[study]
    ax = Figure(figsize=(5.0, 3.5)).subplots()
    for contender in contenders:
        mine = [r for r in rows if r["contender"] == contender]
        xs = sorted({r[x_key] for r in mine})
        ax.plot(xs, [np.mean([r["complete"] for r in mine if r[x_key] == x]) for x in xs],
                marker="o", label=contender)
    ax.set_xscale("symlog" if study == "transfer" else "log")
    ticks = sorted({r[x_key] for r in rows})
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel({"width": "student parameters", "epochs": "training epochs",
                   "transfer": "transfer inputs per kind (x training rows)"}[study])
    ax.set_ylabel("certified accuracy (complete)")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title(f"{data}, {share:.0%} labels, mean of seeds")
    ax.grid(True, alpha=0.3)
    ax.legend()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{study}_{data}_{int(round(100 * share))}.png"
    ax.figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=list(STUDY_KEYS), required=True)
    parser.add_argument("--data", choices=["digits", "breast_cancer"], default="digits")
    parser.add_argument("--labelled", nargs="+", type=float, default=[1.0, 0.3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--widths", nargs="+", type=int, default=[16, 32, 64, 128, 256])
    parser.add_argument("--epochs", nargs="+", type=int, default=[10, 25, 50, 100, 200])
    parser.add_argument("--transfer-sizes", nargs="+", type=float, default=[0.0, 1.0, 2.0, 4.0])
    parser.add_argument("--contenders", nargs="+", default=["alone ibp", "distilled"],
                        choices=CONTENDERS)
    parser.add_argument("--plot", help="folder for the PNG files")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--distilled", nargs="+", default=[], metavar="NAME=VALUE",
                        help="DistilledStudent parameters of the distilled contenders, e.g. "
                             "teacher_bounds='best' transfer_size=4.0 (Python literals)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for share in args.labelled:
        grids = {"width": args.widths, "epochs": args.epochs, "transfer": args.transfer_sizes}
        distilled = {name: ast.literal_eval(value) for name, value in
                     (item.split("=", 1) for item in args.distilled)}
        rows = run(args.study, share, args.seeds, grids, args.contenders, args.data, distilled)
        print(f"\n### {args.data}, {share:.0%} of the training labels, study {args.study}, "
              f"seeds {args.seeds}, {args.threads} torch thread(s)"
              + (f", distilled with {distilled}" if distilled else "") + "\n")
        print(table(rows, args.study, args.contenders))
        if args.plot and args.study != "default":
            path = plot(rows, args.study, share, Path(args.plot), args.contenders, args.data)
            print(f"\nplot: {path}")
    print("\nReproduce: python benchmarks/bench_distill_front.py " + shlex.join(
        sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
