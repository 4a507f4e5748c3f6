"""``certdistill certify`` and ``certdistill report``: evaluate saved models on the user's data."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from certdistill.certification.certify import DEFAULT_METHOD
from certdistill.cli._args import (
    CLIError,
    UsageError,
    add_data_arguments,
    check_suffix,
    nonnegative_float,
    positive_float,
    positive_int,
)
from certdistill.cli._data_io import (
    TABLE_SUFFIXES,
    OnnxModel,
    check_features,
    load_data,
    load_model,
    markdown_table,
    write_json,
    write_table,
)
from certdistill.cli._evaluate import (
    certified_accuracy_timed,
    encode_labels,
    n_parameters,
    pgd_accuracy,
)

__all__ = ["add_certify_parser", "add_report_parser", "run_certify", "run_report"]

#: Bound methods of the ``--method`` options (a cascade: certified by any of those given).
DEFAULT_METHODS = DEFAULT_METHOD

REPORT_COLUMNS = {
    "model": ("model", "{}"),
    "estimator": ("estimator", "{}"),
    "parameters": ("parameters", "{:,}"),
    "eps": ("eps", "{:g}"),
    "clean_accuracy": ("clean", "{:.1%}"),
    "pgd_accuracy": ("PGD", "{:.1%}"),
    "certified_accuracy": ("certified", "{:.1%}"),
    "certify_samples_per_second": ("certify (samples/s)", "{:,.0f}"),
}


def _load_checked(args: argparse.Namespace, model_paths, *, networks: bool = False):
    """The models and the data, checked against each other (features and labels)."""
    models = [(path, load_model(path, networks=networks)) for path in model_paths]
    data = load_data(args.data, x_key=args.x_key, y_key=args.y_key, label_column=args.label_column)
    for path, model in models:
        check_features(model, data, path)
        try:
            encode_labels(model, data.y)
        except ValueError as error:
            raise CLIError(
                f"{str(data.path)!r} does not fit the model {str(path)!r}: {error}"
            ) from None
    return models, data


def _scalar_eps(model, path) -> float:
    if model.eps is None:
        raise CLIError(f"the model {str(path)!r} holds no eps: give --eps")
    if np.ndim(model.eps) != 0:
        raise CLIError(f"the model {str(path)!r} has a per-feature eps: give --eps")
    return float(model.eps)


def _methods_text(methods) -> str:
    if list(methods) == ["complete"]:
        return "complete verification"
    return methods[0] if len(methods) == 1 else " or ".join(methods) + " (either suffices)"


def _method(methods: list[str]):
    """The ``method`` argument of ``certify``: one name, or the cascade as a tuple."""
    return methods[0] if len(methods) == 1 else tuple(methods)


def run_certify(args: argparse.Namespace) -> int:
    """Run ``certdistill certify``."""
    output = (
        None if args.output is None else check_suffix(args.output, (".csv", ".json"), "--output")
    )
    methods = _unique_methods(args.method)
    method = _method(methods)
    [(_, model)], data = _load_checked(args, [args.model], networks=True)
    eps = _scalar_eps(model, args.model) if args.eps is None else args.eps
    if args.radius and args.max_eps < eps:
        raise UsageError(f"--max-eps {args.max_eps:g} must be at least eps {eps:g}")

    prediction = model.predict(data.X)
    certificate, seconds = _timed_certificate(model, data, eps, method, args)
    records = _sample_records(data, prediction, certificate)
    radius = None
    if args.radius:
        radius = model.certified_radius(
            data.X,
            y=data.y,
            method=method,
            max_eps=args.max_eps,
            tol=args.tol,
            timeout=args.timeout,
        )
        for record, r in zip(records, radius.tolist(), strict=True):
            record["certified_radius"] = r

    n = len(records)
    clean = float(np.mean(prediction == data.y))
    _print_certify_summary(
        args,
        model,
        n=n,
        eps=eps,
        methods=methods,
        clean=clean,
        certificate=certificate,
        seconds=seconds,
        radius=radius,
    )
    if output is not None:
        if output.suffix.lower() == ".json":
            write_json(
                {
                    "model": str(args.model),
                    "data": str(args.data),
                    "eps": eps,
                    "method": "+".join(methods),
                    "n_samples": n,
                    "clean_accuracy": clean,
                    "certified_accuracy": certificate.certified_fraction,
                    "samples": records,
                },
                output,
            )
        else:
            write_table(records, output)
        print(f"per-sample results: {output}")
    return 0


def _unique_methods(given: list[str]) -> list[str]:
    """The ``--method`` values without repeats, in order; ``complete`` only alone."""
    methods = list(dict.fromkeys(given))
    if "complete" in methods and len(methods) > 1:
        raise UsageError("--method complete is a whole cascade: give it alone")
    return methods


def _timed_certificate(model, data, eps: float, method, args: argparse.Namespace):
    """The certificate of every sample, and the seconds it took."""
    model.certify(
        data.X[:2], eps=eps, method=method, y=data.y[:2], timeout=args.timeout
    )  # untimed warm-up
    start = time.perf_counter()
    certificate = model.certify(
        data.X,
        eps=eps,
        method=method,
        y=data.y,
        batch_size=args.batch_size,
        timeout=args.timeout,
        verbose=int(not args.quiet),
    )
    return certificate, time.perf_counter() - start


def _sample_records(data, prediction: np.ndarray, certificate) -> list[dict]:
    """One row per sample: label, prediction, verdict and worst margin."""
    # The label's logit minus the largest other logit, bounded below over the ball.
    margin = certificate.margins.min(axis=1)
    return [
        {
            "index": i,
            "label": label,
            "prediction": predicted,
            "certified": bool(certified),
            "status": status,
            "decided_by": stage,
            "margin": float(m),
        }
        for i, (label, predicted, certified, status, stage, m) in enumerate(
            zip(
                data.y.tolist(),
                prediction.tolist(),
                certificate.certified,
                certificate.status.tolist(),
                certificate.decided_by.tolist(),
                margin,
                strict=True,
            )
        )
    ]


def _print_certify_summary(
    args: argparse.Namespace,
    model,
    *,
    n: int,
    eps: float,
    methods: list[str],
    clean: float,
    certificate,
    seconds: float,
    radius: np.ndarray | None,
) -> None:
    """Print the model, the accuracies, the verdict counts and the radius statistics."""
    kind = "ONNX network" if isinstance(model, OnnxModel) else type(model).__name__
    print(
        f"{n:,} samples of {args.data}, model {args.model} ({kind}, "
        f"{n_parameters(model):,} parameters)"
    )
    print(f"clean accuracy {clean:.1%}")
    print(
        f"certified accuracy at eps {eps:g} by {_methods_text(methods)}: "
        f"{certificate.certified_fraction:.1%} ({int(certificate.certified.sum()):,} / {n:,}; "
        f"{n / max(seconds, 1e-9):,.0f} samples/s)"
    )
    falsified = int(np.sum(certificate.status == "falsified"))
    unknown = int(np.sum(certificate.status == "unknown"))
    print(
        f"falsified (a counterexample in the ball, or a wrong clean prediction): {falsified:,}"
        f"; undecided: {unknown:,}"
    )
    if radius is not None:
        print(
            f"certified radius ({_methods_text(methods)}, searched up to {args.max_eps:g}): "
            f"median "
            f"{np.median(radius):.3g}, mean {np.mean(radius):.3g}"
        )


def _model_names(paths) -> list[str]:
    stems = [Path(p).stem for p in paths]
    # File stems read best; full paths only where two stems coincide.
    return [
        stem if stems.count(stem) == 1 else str(p) for stem, p in zip(stems, paths, strict=True)
    ]


def run_report(args: argparse.Namespace) -> int:
    """Run ``certdistill report``."""
    output = None if args.output is None else check_suffix(args.output, TABLE_SUFFIXES, "--output")
    methods = list(dict.fromkeys(args.method))
    models, data = _load_checked(args, args.models)
    eps_values = args.eps or sorted({_scalar_eps(model, path) for path, model in models})
    rows = []
    for name, (_, model) in zip(_model_names(args.models), models, strict=True):
        clean = model.score(data.X, data.y)
        for eps in eps_values:
            certified, throughput = certified_accuracy_timed(
                model,
                data.X,
                data.y,
                eps,
                methods,
                batch_size=args.batch_size,
                timeout=args.timeout,
            )
            rows.append(
                {
                    "model": name,
                    "estimator": type(model).__name__,
                    "parameters": n_parameters(model),
                    "eps": eps,
                    "clean_accuracy": clean,
                    "pgd_accuracy": pgd_accuracy(
                        model,
                        data.X,
                        data.y,
                        eps,
                        steps=args.pgd_steps,
                        restarts=args.pgd_restarts,
                        seed=args.seed,
                    ),
                    "certified_accuracy": certified,
                    "certify_samples_per_second": throughput,
                    "certify_methods": "+".join(methods),
                }
            )
    print(markdown_table(rows, REPORT_COLUMNS))
    print(
        f"\n{len(data.y):,} samples of {args.data}. Certified: proven robust and correct by "
        f"{_methods_text(methods)}; PGD: {args.pgd_steps}-step attack, {args.pgd_restarts} "
        f"random start(s), seed {args.seed}."
    )
    if output is not None:
        write_table(rows, output, REPORT_COLUMNS)
        print(f"table: {output}")
    return 0


def _add_method_argument(parser: argparse.ArgumentParser) -> None:
    from certdistill.verify import STAGES

    parser.add_argument(
        "--method",
        nargs="+",
        choices=[*STAGES, "complete"],
        default=list(DEFAULT_METHODS),
        metavar="METHOD",
        help="stage(s) of the certificate; with several, a cascade: each runs on "
        "the samples the previous ones left open. Bound methods "
        "(ibp, crown-ibp, crown, alpha-crown) and refine certify, attack "
        "falsifies, bab and milp decide; 'complete' (alone) is the whole "
        "cascade, which certifies or falsifies every sample within --timeout. "
        f"Default: {' '.join(DEFAULT_METHODS)}",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=10.0,
        help="seconds of branch and bound and MILP per sample (default 10)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        help="samples bounded at once; lower it if memory runs out (default 256)",
    )


def add_certify_parser(commands, parents) -> None:
    """Add the ``certify`` command."""
    parser = commands.add_parser(
        "certify",
        parents=parents,
        help="certify each sample of a file with a saved model; write per-sample results",
        description=(
            "Certify, for each sample of a labelled data file, that a saved model classifies "
            "it correctly everywhere in the L-infinity ball of radius eps. Print the clean and "
            "certified accuracy and, with --output, write one row per sample: index, label, "
            "prediction, certified, status (certified, falsified or unknown), decided_by (the "
            "stage that settled it), margin (a lower bound of the label's logit minus the "
            "largest other logit over the ball; positive means certified) and, with --radius, "
            "certified_radius."
        ),
    )
    parser.add_argument(
        "model",
        help="model .joblib or .cdsafe file (from certdistill train "
        "or distill; joblib files can run code: load only "
        "trusted files, .cdsafe files run none), or an .onnx "
        "network (labels: its output indices, or the classes "
        "certdistill export stored)",
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--eps",
        type=nonnegative_float,
        help="radius of the ball, in feature units (default: the model's eps)",
    )
    _add_method_argument(parser)
    parser.add_argument(
        "--radius",
        action="store_true",
        help="also compute each sample's largest certified radius by "
        "bisection (with --method; 0 for misclassified samples)",
    )
    parser.add_argument(
        "--max-eps",
        type=positive_float,
        default=1.0,
        help="upper end of the radius search (default 1.0)",
    )
    parser.add_argument(
        "--tol",
        type=positive_float,
        default=1e-3,
        help="precision of the radius search (default 0.001)",
    )
    parser.add_argument(
        "--output",
        help="per-sample results file, .csv or .json (by extension; default: "
        "print the summary only)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar for branch and bound and MILP"
    )
    parser.set_defaults(handler=run_certify)


def add_report_parser(commands, parents) -> None:
    """Add the ``report`` command."""
    parser = commands.add_parser(
        "report",
        parents=parents,
        help="compare saved models: clean, PGD and certified accuracy at one or more eps",
        description=(
            "Evaluate one or more saved models on a labelled data file: parameters, clean "
            "accuracy, accuracy under a PGD attack (an upper bound of the robust accuracy) and "
            "certified accuracy (a lower bound) at each eps, and certification speed. Prints a "
            "markdown table; --output also writes it as .csv, .json or .md."
        ),
    )
    parser.add_argument(
        "models",
        nargs="+",
        metavar="model",
        help="model .joblib or .cdsafe files (from certdistill train or "
        "distill); joblib files can run code: load only trusted files "
        "(.cdsafe files run none)",
    )
    add_data_arguments(parser, flag=True)
    parser.add_argument(
        "--eps",
        type=nonnegative_float,
        nargs="+",
        help="radii to evaluate at, e.g. --eps 0.05 0.1 (default: the models' eps)",
    )
    _add_method_argument(parser)
    parser.add_argument(
        "--pgd-steps", type=positive_int, default=20, help="steps of the PGD attack (default 20)"
    )
    parser.add_argument(
        "--pgd-restarts",
        type=positive_int,
        default=1,
        help="random restarts of the PGD attack (default 1)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the attack's random starts (default 0)"
    )
    parser.add_argument("--output", help="table file, .csv, .json or .md (by extension)")
    parser.set_defaults(handler=run_report)
