"""``certdistill demo``: teacher, distilled student and student alone on scikit-learn's digits."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from certdistill.cli._args import CLIError, device, positive_float, positive_int
from certdistill.cli._data_io import markdown_table, save_model, write_json, write_table
from certdistill.cli._evaluate import certified_accuracy_timed, n_parameters, pgd_accuracy
from certdistill.cli._progress import fit_with_progress

__all__ = ["add_demo_parser", "build_demo_models", "load_demo_data", "run_demo"]

#: A sample counts as certified when any of these bounds proves it (IBP is tight for IBP-trained
#: networks, CROWN-IBP sometimes tighter; both are fast enough for the curve's 10 radii).
CERTIFY_METHODS = ("ibp", "crown-ibp")
PGD_STEPS = 20
PGD_RESTARTS = 1
CURVE_POINTS = 11

#: File stem and table label of each model, in training order (the student needs the teacher).
MODEL_LABELS = {
    "teacher": "teacher CNN (IBP)",
    "student": "distilled student MLP 64-32-10",
    "student_alone": "same MLP trained alone (IBP)",
}

TABLE_COLUMNS = {
    "model": ("model", "{}"),
    "parameters": ("parameters", "{:,}"),
    "train_seconds": ("train (s)", "{:.1f}"),
    "clean_accuracy": ("clean", "{:.1%}"),
    "pgd_accuracy": ("PGD", "{:.1%}"),
    "certified_accuracy": ("certified", "{:.1%}"),
    "certify_samples_per_second": ("certify (samples/s)", "{:,.0f}"),
}


def build_demo_models(eps: float, epochs: int, student_epochs: int, seed: int, device: str) -> dict:
    """The demo's three unfitted models; the one place to change their hyperparameters.

    Parameters
    ----------
    eps : float
        Radius every model is trained and certified for.
    epochs : int
        Training epochs of the teacher.
    student_epochs : int
        Training epochs of the distilled student and of the same-size student trained alone.
    seed : int
        ``random_state`` of every model.
    device : str
        Torch device.

    Returns
    -------
    dict of str to estimator
        ``"teacher"`` (a CNN), ``"student"`` (an MLP 64-32-10 distilled from that teacher) and
        ``"student_alone"`` (the same MLP trained by IBP without a teacher), in the order to
        fit them: the student uses the teacher object as it is once it is fitted.
    """
    from certdistill.estimators.student import DistilledStudent
    from certdistill.estimators.teacher import CertifiedTeacher

    teacher = CertifiedTeacher(
        method="ibp",
        input_shape=(1, 8, 8),
        lower=0.0,
        upper=1.0,
        eps=eps,
        max_epochs=epochs,
        random_state=seed,
        device=device,
    )
    student = DistilledStudent(
        teacher,
        module__hidden_sizes=(32,),
        lower=0.0,
        upper=1.0,
        eps=eps,
        max_epochs=student_epochs,
        random_state=seed,
        device=device,
    )
    student_alone = CertifiedTeacher(
        method="ibp",
        module__hidden_sizes=(32,),
        lower=0.0,
        upper=1.0,
        eps=eps,
        max_epochs=student_epochs,
        random_state=seed,
        device=device,
    )
    return {"teacher": teacher, "student": student, "student_alone": student_alone}


def load_demo_data(seed: int):
    """Digits with pixels in [0, 1], split 70/30 stratified by ``seed``.

    Returns
    -------
    X_train, X_test, y_train, y_test : ndarray
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    X = (data.data / 16.0).astype(np.float32)
    return train_test_split(X, data.target, test_size=0.3, stratify=data.target, random_state=seed)


def _certified_curve(model, X, y, eps_grid: np.ndarray) -> np.ndarray:
    # certify() at each radius (rather than a certified-radius bisection) so that the curve
    # passes exactly through the table's value at eps.
    return np.array(
        [
            model.score(X, y)
            if e == 0
            else model.certified_accuracy(X, y, eps=e, method=list(CERTIFY_METHODS))
            for e in eps_grid
        ]
    )


def _plot(curves: dict, eps: float, path: Path) -> bool:
    """Write the certified-accuracy plot; False if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure

        from certdistill.plotting import plot_certified_accuracy_curve
    except ImportError:
        return False
    ax = Figure(figsize=(7.0, 4.5), layout="constrained").add_subplot()
    plot_certified_accuracy_curve(curves, ax=ax, title="Certified accuracy on digits (test set)")
    ax.axvline(eps, color="grey", linestyle=":", linewidth=1, label=f"eps = {eps:g} (table)")
    ax.legend()
    ax.figure.savefig(path, dpi=120)
    return True


def _result_row(model, label: str, seconds: float, X_test, y_test, args) -> dict:
    """The table's row of one fitted model: size, fit time, clean, PGD, certified accuracy."""
    certified, throughput = certified_accuracy_timed(
        model, X_test, y_test, args.eps, CERTIFY_METHODS
    )
    pgd = pgd_accuracy(
        model, X_test, y_test, args.eps, steps=PGD_STEPS, restarts=PGD_RESTARTS, seed=args.seed
    )
    return {
        "model": label,
        "parameters": n_parameters(model),
        "train_seconds": seconds,
        "clean_accuracy": model.score(X_test, y_test),
        "pgd_accuracy": pgd,
        "certified_accuracy": certified,
        "certify_samples_per_second": throughput,
        "eps": args.eps,
        "certify_methods": "+".join(CERTIFY_METHODS),
    }


def run_demo(args: argparse.Namespace) -> int:
    """Run ``certdistill demo`` (see :func:`add_demo_parser` for the options)."""
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {str(output)!r} exists and is not a folder")
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    X_train, X_test, y_train, y_test = load_demo_data(args.seed)
    print(
        f"digits: {len(X_train)} train / {len(X_test)} test samples, pixels in [0, 1], "
        f"eps = {args.eps:g}; training 3 models (progress on stderr)",
        flush=True,
    )
    models = build_demo_models(args.eps, args.epochs, args.student_epochs, args.seed, args.device)
    rows = []
    for key, model in models.items():
        seconds = fit_with_progress(model, X_train, y_train, MODEL_LABELS[key], quiet=args.quiet)
        save_model(model, output / f"{key}.joblib")
        rows.append(_result_row(model, MODEL_LABELS[key], seconds, X_test, y_test, args))

    print()
    print(markdown_table(rows, TABLE_COLUMNS))
    print(
        f"\nOn the {len(X_test)} test samples at eps = {args.eps:g} (L-infinity, pixels in "
        f"[0, 1]). Certified: proven robust and correct by IBP or CROWN-IBP bounds (either "
        f"suffices); PGD: {PGD_STEPS}-step attack, {PGD_RESTARTS} random start, seed "
        f"{args.seed} (an upper bound of the robust accuracy)."
    )
    write_table(rows, output / "results.csv")
    write_json(rows, output / "results.json")

    eps_grid = np.linspace(0.0, 2.0 * args.eps, CURVE_POINTS)
    curves = {
        MODEL_LABELS[key]: (eps_grid, _certified_curve(model, X_test, y_test, eps_grid))
        for key, model in models.items()
    }
    plot_path = output / "certified_accuracy.png"
    if _plot(curves, args.eps, plot_path):
        print(f"\nplot of certified accuracy versus eps: {plot_path}")
    else:
        print("\nno plot: matplotlib is not installed (pip install 'certdistill[plot]')")
    print(f"models: {', '.join(str(output / f'{key}.joblib') for key in models)}")
    print(f"table: {output / 'results.csv'}, {output / 'results.json'}")
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0


def add_demo_parser(commands, parents) -> None:
    """Add the ``demo`` command to the subparsers ``commands``."""
    parser = commands.add_parser(
        "demo",
        parents=parents,
        help="train a teacher, a distilled student and the student alone on digits; compare",
        description=(
            "On scikit-learn's bundled digits (pixels scaled to [0, 1], 70/30 split), train a "
            "certified teacher CNN with IBP, a small MLP student (64-32-10) distilled from it, "
            "and the same MLP trained alone with IBP. Print a table of parameters, training "
            "time, clean, PGD and certified accuracy at eps and certification speed, and write "
            "a plot of certified accuracy versus eps, the three models (joblib) and the table "
            "(results.csv, results.json) to the output folder."
        ),
    )
    parser.add_argument(
        "--eps",
        type=positive_float,
        default=0.1,
        help="L-infinity radius on pixels in [0, 1] that the models are trained "
        "and certified for (default 0.1)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=60,
        help="training epochs of the teacher CNN (default 60)",
    )
    parser.add_argument(
        "--student-epochs",
        type=positive_int,
        default=100,
        help="training epochs of the two students (default 100)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data split, the models and the attack (default 0)",
    )
    parser.add_argument(
        "--output",
        default="certdistill-demo",
        metavar="FOLDER",
        help="folder for the plot, models and table (default certdistill-demo)",
    )
    parser.add_argument(
        "--device", type=device, default="cpu", help="torch device, e.g. cuda (default cpu)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_demo)
