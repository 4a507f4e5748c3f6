"""Certified accuracy against student size, training epochs and transfer set, alone and distilled.

Five studies on digits (eps 0.1; or ``--data breast_cancer``, eps 0.05), judged by complete
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
  trained alone of the same hidden widths;
* ``--study budget``: equal time (``--teacher-method`` trains the teacher by another method,
  and ``alone teacher's method, equal time`` the student alone by that method at equal time).
  Per seed the teacher is fitted once (its fit time T_teacher),
  the 32-unit distilled student with its defaults on all rows (its fit time T_d), and the 32-unit
  student trained alone (``alone ibp``'s estimator, on the labelled rows) gets as many epochs as
  fit in T_d (``alone ibp, equal time``) or in T_d + T_teacher / N (``alone ibp, equal time incl.
  teacher/N``, N = ``--grid-size``, default 8: the teacher's cost shared by a grid of N
  students). Its cost per epoch is calibrated by a short fit (``CALIBRATION_EPOCHS``) and its
  ``max_epochs`` set to ``max(1, round(budget / epoch cost))``, at most ``MAX_EPOCHS``; the
  epochs it got (``n_epochs_``: the estimators have no early stopping and no internal
  validation split, ``train_split=None``, so every epoch is a full pass over the labelled rows
  and the eps ramp and learning-rate steps are fractions of them) and its actual fit time are
  reported beside the budget. Fit times are process CPU time (``time.process_time()``, with
  ``--threads 1``: one torch thread), so that load from other processes on the machine does not
  skew the budgets; wall time is printed too. Gains are paired per seed against ``distilled``
  (its lead over each contender, mean and smallest over the seeds).

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
as their source rows, or only those the teacher labels so). The baselines a user would try first
with unlabelled rows (shares below 1 only; with their default epochs): ``self-training``,
``sklearn.semi_supervised.SelfTrainingClassifier`` around ``alone ibp``'s estimator, fitted on
all rows (the unlabelled ones -1; certified through its ``estimator_``), and ``alone ibp,
teacher labels``, ``alone ibp`` on the labelled rows plus the unlabelled ones labelled by the
teacher (``teacher.predict``). ``alone ibp, equal time`` and ``alone ibp, equal time incl.
teacher/N`` belong to the budget study only. ``--labelled 0.3`` gives the other
70 % of the training rows unlabelled (label -1) to the distilled student. Gains are paired per
seed against ``alone ibp``.

Run: python benchmarks/bench_distill_front.py --study width [--labelled 1.0 0.3]
[--seeds 0 1 2] [--contenders ...] [--distilled NAME=VALUE ...] [--plot DIR] [--grid-size 8]
[--threads 1]. Prints a markdown table and the command that reproduces it.
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
from sklearn.semi_supervised import SelfTrainingClassifier  # noqa: E402

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
from certdistill.estimators.teacher_outputs import clear_shared_cache  # noqa: E402

#: Distilled contender -> its class (the research variants of ``distill_variants``).
DISTILLED = {
    "distilled": DistilledStudent,
    "distilled, exact teacher radius": DistilledStudent,
    "distilled, source labels": SourceLabelledStudent,
    "distilled, agreeing labels": AgreeingLabelsStudent,
}
#: Students trained alone given the distilled student's fit time (budget study only).
EQUAL_TIME = (
    "alone ibp, equal time",
    "alone ibp, equal time incl. teacher/N",
    "alone teacher's method, equal time",
)
#: Baselines that use the unlabelled rows (shares below 1 only).
SEMI_SUPERVISED = ("self-training", "alone ibp, teacher labels")
CONTENDERS = ("alone ibp", "alone ibp, augmented", *DISTILLED, *EQUAL_TIME, *SEMI_SUPERVISED)
#: Epochs of the short fit that calibrates an epoch's cost, and the most epochs of a budget.
CALIBRATION_EPOCHS = 10
MAX_EPOCHS = 3000


#: Study -> the key of its table and plot.
STUDY_KEYS = {
    "width": "width",
    "epochs": "epochs",
    "transfer": "transfer_size",
    "default": "hidden",
    "budget": "contender",
}


def network(estimator):
    """The certified estimator (a ``SelfTrainingClassifier``'s fitted ``estimator_``)."""
    return estimator.estimator_ if isinstance(estimator, SelfTrainingClassifier) else estimator


def hidden_sizes(estimator) -> tuple[int, ...]:
    """Widths of the hidden ``Linear`` layers of a fitted MLP."""
    linear = [m for m in network(estimator).module_.modules() if isinstance(m, torch.nn.Linear)]
    return tuple(m.out_features for m in linear[:-1])


def make(
    contender: str,
    teacher,
    *,
    width,
    epochs: int | None,
    transfer_size: float,
    eps: float,
    seed: int,
    distilled: dict | None = None,
):
    """``width``: hidden units of one layer, a tuple of widths, or ``None`` (the distilled
    student's size rule)."""
    hidden = (
        {}
        if width is None
        else {"module__hidden_sizes": tuple(width) if isinstance(width, tuple) else (width,)}
    )
    common = dict(eps=eps, lower=0.0, upper=1.0, random_state=seed, max_epochs=epochs, **hidden)
    if contender == "alone teacher's method, equal time":
        return CertifiedTeacher(method=teacher.method, **common)
    if contender.startswith("alone"):
        return CertifiedTeacher(method="ibp", **common)
    if contender == "self-training":
        return SelfTrainingClassifier(estimator=CertifiedTeacher(method="ibp", **common))
    if contender == "distilled, exact teacher radius":
        common["teacher_radius_levels"] = None
    return DISTILLED[contender](
        FrozenEstimator(teacher),
        unlabeled_label=-1,
        **{"transfer_size": transfer_size, **common, **(distilled or {})},
    )


def fit(
    contender: str,
    estimator,
    X,
    y,
    mask,
    *,
    teacher=None,
    eps: float = 0.0,
    seed: int = 0,
    size: float = TRANSFER_SIZE,
) -> None:
    """Fit on the labelled rows (alone), on them plus the teacher-labelled rest, or on every
    row with the unlabelled ones marked -1 (distilled, self-training)."""
    if contender == "alone ibp, augmented":
        estimator.fit(*augmented(X[mask], y[mask], eps, seed, size))
    elif contender == "alone ibp, teacher labels":
        estimator.fit(X, np.where(mask, y, teacher.predict(X)))
    elif contender.startswith("alone"):
        estimator.fit(X[mask], y[mask])
    else:
        estimator.fit(X, np.where(mask, y, -1))


def timed(function, *args, **kwargs):
    """``function(*args, **kwargs)``, its process CPU seconds and its wall seconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.process_time() - cpu, time.perf_counter() - wall


def judge(estimator, X_test, y_test) -> dict:
    """Clean accuracy, and the certified and decided fractions of complete verification."""
    complete = network(estimator).certify(X_test, y=y_test, method="complete")
    return dict(
        clean=estimator.score(X_test, y_test),
        complete=complete.certified_fraction,
        decided=complete.decided_fraction,
    )


def needs_teacher(contenders) -> bool:
    return any(c.startswith("distilled") or c == "alone ibp, teacher labels" for c in contenders)


def run(
    study: str,
    share: float,
    seeds,
    grids: dict,
    contenders,
    data: str = "digits",
    distilled: dict | None = None,
) -> list[dict]:
    X, X_test, y, y_test, eps, input_shape = load(data)
    mask = labelled_mask(y, share)
    if share >= 1.0:  # no unlabelled rows to use
        contenders = [c for c in contenders if c not in SEMI_SUPERVISED]
    settings = {
        "width": [(w, None, TRANSFER_SIZE) for w in grids["width"]],
        "epochs": [(32, e, TRANSFER_SIZE) for e in grids["epochs"]],
        "transfer": [(32, None, t) for t in grids["transfer"]],
        "default": [(None, None, TRANSFER_SIZE)],
    }[study]
    if study == "default":  # the distilled students first: the others copy their size
        contenders = sorted(contenders, key=lambda c: not c.startswith("distilled"))
    rows = []
    for seed in seeds:
        teacher = (
            teacher_for(X, y, mask, eps=eps, input_shape=input_shape, seed=seed)
            if needs_teacher(contenders)
            else None
        )
        default_size = None
        for (width, epochs, size), contender in itertools.product(settings, contenders):
            if width is None and contender.startswith("alone"):
                width = default_size
            estimator = make(
                contender,
                teacher,
                width=width,
                epochs=epochs,
                transfer_size=size,
                eps=eps,
                seed=seed,
                distilled=distilled,
            )
            start = time.perf_counter()
            fit(contender, estimator, X, y, mask, teacher=teacher, eps=eps, seed=seed, size=size)
            seconds = time.perf_counter() - start
            if width is None:
                default_size = hidden_sizes(estimator)
            row = dict(
                contender=contender,
                width=width,
                hidden="-".join(map(str, hidden_sizes(estimator))),
                epochs=epochs or network(estimator).n_epochs_,
                transfer_size=size,
                seed=seed,
                seconds=seconds,
                parameters=sum(p.numel() for p in network(estimator).module_.parameters()),
                **judge(estimator, X_test, y_test),
            )
            rows.append(row)
            print(f"  {study} {share:.0%} {row}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], study: str, contenders) -> str:
    key = STUDY_KEYS[study]
    lines = [
        f"| {key} | parameters | contender | clean % | certified % (complete) | "
        "gain (per-seed range) | decided % | fit s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for value in sorted({r[key] for r in rows}):
        alone = [r for r in rows if r[key] == value and r["contender"] == "alone ibp"]
        for contender in contenders:
            mine = [r for r in rows if r[key] == value and r["contender"] == contender]
            if not mine:  # a baseline of unlabelled rows with all the labels
                continue
            gains = (
                [100 * (m["complete"] - a["complete"]) for m, a in zip(mine, alone, strict=True)]
                if alone
                else [np.nan]
            )
            gain = (
                ""
                if contender == "alone ibp" or not alone
                else f"{np.mean(gains):+.1f} ({min(gains):+.1f} to {max(gains):+.1f})"
            )
            clean = 100 * np.array([r["clean"] for r in mine])
            cert = 100 * np.array([r["complete"] for r in mine])
            lines.append(
                f"| {value} | {mine[0]['parameters']:,} | {contender} | "
                f"{clean.mean():.1f} ± {clean.std():.1f} | {cert.mean():.1f} ± {cert.std():.1f}"
                f" | {gain} | {100 * np.mean([r['decided'] for r in mine]):.1f} | "
                f"{np.mean([r['seconds'] for r in mine]):.1f} |"
            )
    return "\n".join(lines)


def run_budget(
    share: float,
    seeds,
    contenders,
    data: str = "digits",
    distilled: dict | None = None,
    grid_size: int = 8,
    teacher_method: str | None = None,
) -> tuple[list[dict], list]:
    """The budget study: per seed the teacher, the 32-unit distilled student, then the other
    contenders, the equal-time ones given the distilled student's fit time (CPU seconds).
    Returns the rows and, per seed, (teacher CPU s, teacher wall s, alone CPU s per epoch)."""
    X, X_test, y, y_test, eps, input_shape = load(data)
    mask = labelled_mask(y, share)
    contenders = ["distilled", *(c for c in contenders if c != "distilled")]  # T_d first
    if share >= 1.0:
        contenders = [c for c in contenders if c not in SEMI_SUPERVISED]
    rows, costs = [], []
    for seed in seeds:
        teacher, teacher_cpu, teacher_wall = timed(
            teacher_for,
            X,
            y,
            mask,
            eps=eps,
            input_shape=input_shape,
            seed=seed,
            method=teacher_method,
        )
        epoch_costs: dict[str, float] = {}
        for contender in contenders:
            epochs, budget = None, None
            if contender in EQUAL_TIME:
                if contender not in epoch_costs:  # a short fit of the same estimator
                    probe = make(
                        contender,
                        teacher,
                        width=32,
                        epochs=CALIBRATION_EPOCHS,
                        transfer_size=TRANSFER_SIZE,
                        eps=eps,
                        seed=seed,
                    )
                    _, probe_cpu, _ = timed(fit, contender, probe, X, y, mask)
                    epoch_costs[contender] = probe_cpu / CALIBRATION_EPOCHS
                epoch_cost = epoch_costs[contender]
                distilled_cpu = next(
                    r["seconds"]
                    for r in rows
                    if r["seed"] == seed and r["contender"] == "distilled"
                )
                budget = distilled_cpu + (
                    teacher_cpu / grid_size if contender.endswith("teacher/N") else 0.0
                )
                epochs = min(MAX_EPOCHS, max(1, round(budget / epoch_cost)))
            estimator = make(
                contender,
                teacher,
                width=32,
                epochs=epochs,
                transfer_size=TRANSFER_SIZE,
                eps=eps,
                seed=seed,
                distilled=distilled,
            )
            if contender.startswith("distilled"):
                clear_shared_cache()  # the fit pays for its teacher outputs
            _, cpu, wall = timed(
                fit, contender, estimator, X, y, mask, teacher=teacher, eps=eps, seed=seed
            )
            fits = estimator.n_iter_ + 1 if contender == "self-training" else 1
            row = dict(
                contender=contender,
                seed=seed,
                epochs=network(estimator).n_epochs_,
                fits=fits,
                budget=budget,
                seconds=cpu,
                wall=wall,
                **judge(estimator, X_test, y_test),
            )
            rows.append(row)
            print(f"  budget {data} {share:.0%} {row}", file=sys.stderr, flush=True)
        costs.append((teacher_cpu, teacher_wall, epoch_costs.get("alone ibp, equal time")))
    return rows, costs


def _spread(values, digits: int = 0) -> str:
    """The mean, with the range over the seeds when they differ."""
    values = np.asarray(values, dtype=float)
    if np.ptp(values) == 0:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ({values.min():.{digits}f}-{values.max():.{digits}f})"


def budget_table(rows: list[dict], contenders) -> str:
    lines = [
        "| contender | epochs | budget s (CPU) | fit s (CPU) | fit s (wall) | certified % "
        "(complete) | clean % | decided % | distilled's lead, certified pts: mean (min) "
        "| distilled's lead, clean pts: mean (min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ours = [r for r in rows if r["contender"] == "distilled"]
    for contender in ["distilled", *(c for c in contenders if c != "distilled")]:
        mine = [r for r in rows if r["contender"] == contender]
        if not mine:
            continue
        epochs = _spread([r["epochs"] for r in mine])
        if contender == "self-training":  # n_epochs_ of its last fit (fewer on more rows)
            epochs = f"{_spread([r['fits'] for r in mine], 1)} fits, the last {epochs}"
        budget = _spread([r["budget"] for r in mine], 1) if mine[0]["budget"] is not None else ""
        leads = {
            key: [100 * (d[key] - m[key]) for d, m in zip(ours, mine, strict=True)]
            for key in ("complete", "clean")
        }
        lead = {
            key: "" if contender == "distilled" else f"{np.mean(v):+.1f} ({min(v):+.1f})"
            for key, v in leads.items()
        }
        cert = 100 * np.array([r["complete"] for r in mine])
        clean = 100 * np.array([r["clean"] for r in mine])
        lines.append(
            f"| {contender} | {epochs} | {budget} | {_spread([r['seconds'] for r in mine], 1)}"
            f" | {np.mean([r['wall'] for r in mine]):.1f} | {cert.mean():.1f} ± {cert.std():.1f}"
            f" | {clean.mean():.1f} ± {clean.std():.1f} | "
            f"{100 * np.mean([r['decided'] for r in mine]):.1f} | {lead['complete']} | "
            f"{lead['clean']} |"
        )
    return "\n".join(lines)


def plot(
    rows: list[dict], study: str, share: float, folder: Path, contenders, data: str = "digits"
) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, PercentFormatter

    x_key = "parameters" if study == "width" else STUDY_KEYS[study]
    ax = Figure(figsize=(5.0, 3.5)).subplots()
    for contender in contenders:
        mine = [r for r in rows if r["contender"] == contender]
        xs = sorted({r[x_key] for r in mine})
        ax.plot(
            xs,
            [np.mean([r["complete"] for r in mine if r[x_key] == x]) for x in xs],
            marker="o",
            label=contender,
        )
    ax.set_xscale("symlog" if study == "transfer" else "log")
    ticks = sorted({r[x_key] for r in rows})
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(
        {
            "width": "student parameters",
            "epochs": "training epochs",
            "transfer": "transfer inputs per kind (x training rows)",
        }[study]
    )
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
    parser.add_argument(
        "--contenders", nargs="+", default=["alone ibp", "distilled"], choices=CONTENDERS
    )
    parser.add_argument("--plot", help="folder for the PNG files")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--distilled",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="DistilledStudent parameters of the distilled contenders, e.g. "
        "teacher_bounds='best' transfer_size=4.0 (Python literals)",
    )
    parser.add_argument(
        "--teacher-method",
        default=None,
        help="budget study: the teacher's training method (default: CertifiedTeacher's); "
        '"alone teacher\'s method, equal time" trains the student alone by it',
    )
    parser.add_argument(
        "--grid-size",
        type=int,
        default=8,
        help="budget study: the students N that share one teacher's fit time",
    )
    args = parser.parse_args(argv)
    if args.study != "budget" and set(args.contenders) & set(EQUAL_TIME):
        parser.error(f"{' and '.join(EQUAL_TIME)} belong to --study budget")
    torch.set_num_threads(args.threads)
    distilled = {
        name: ast.literal_eval(value)
        for name, value in (item.split("=", 1) for item in args.distilled)
    }
    for share in args.labelled:
        if args.study == "budget":
            start = time.perf_counter()
            rows, costs = run_budget(
                share,
                args.seeds,
                args.contenders,
                args.data,
                distilled,
                args.grid_size,
                args.teacher_method,
            )
            teacher_cpu, teacher_wall, epoch_cost = np.array(
                [(t, w, np.nan if e is None else e) for t, w, e in costs], dtype=float
            ).T
            print(
                f"\n### {args.data}, {share:.0%} of the training labels, study budget, "
                f"seeds {args.seeds}, {args.threads} torch thread(s), grid of "
                f"N = {args.grid_size}, teacher trained by {args.teacher_method or 'default'}"
                + (f", distilled with {distilled}" if distilled else "")
                + "\n"
            )
            print(
                f"Teacher fit: {teacher_cpu.mean():.1f} s CPU ({teacher_wall.mean():.1f} s "
                f"wall), mean of seeds; the student alone: {1e3 * np.nanmean(epoch_cost):.1f}"
                f" ms CPU per epoch ({CALIBRATION_EPOCHS}-epoch calibration fit); "
                f"{time.perf_counter() - start:.0f} s wall for this table.\n"
            )
            print(budget_table(rows, args.contenders))
            continue
        grids = {"width": args.widths, "epochs": args.epochs, "transfer": args.transfer_sizes}
        rows = run(args.study, share, args.seeds, grids, args.contenders, args.data, distilled)
        print(
            f"\n### {args.data}, {share:.0%} of the training labels, study {args.study}, "
            f"seeds {args.seeds}, {args.threads} torch thread(s)"
            + (f", distilled with {distilled}" if distilled else "")
            + "\n"
        )
        print(table(rows, args.study, args.contenders))
        if args.plot and args.study != "default":
            path = plot(rows, args.study, share, Path(args.plot), args.contenders, args.data)
            print(f"\nplot: {path}")
    print(
        "\nReproduce: python benchmarks/bench_distill_front.py "
        + shlex.join(sys.argv[1:] if argv is None else argv)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
