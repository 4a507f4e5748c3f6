"""``certdistill train`` and ``certdistill distill``: fit a model on the user's data, save it."""

from __future__ import annotations

import argparse

from certdistill.cli._args import (
    UsageError,
    add_data_arguments,
    check_suffix,
    device,
    finite_float,
    int_tuple,
    library_default,
    nonnegative_float,
    positive_float,
    positive_int,
    unit_float,
)
from certdistill.cli._data_io import (
    MODEL_SUFFIXES,
    check_features,
    load_data,
    load_model,
    save_model,
)
from certdistill.cli._evaluate import n_parameters
from certdistill.cli._progress import fit_with_progress

__all__ = ["add_distill_parser", "add_train_parser", "run_distill", "run_train"]


def _load(args: argparse.Namespace):
    return load_data(args.data, x_key=args.x_key, y_key=args.y_key, label_column=args.label_column)


def _network_params(args: argparse.Namespace, sample_shape) -> dict:
    """``input_shape`` and ``module__*`` parameters from the network options."""
    input_shape = args.input_shape
    if input_shape is None and sample_shape is not None:
        # Images stored as (n, c, h, w) or (n, h, w) get a CNN without --input-shape.
        if len(sample_shape) == 3:
            input_shape = sample_shape
        elif len(sample_shape) == 2:
            input_shape = (1, *sample_shape)
    if args.channels is not None and (input_shape is None or len(input_shape) != 3):
        raise UsageError("--channels needs a convolutional network: give --input-shape C,H,W")
    return {
        "input_shape": input_shape,
        "module__hidden_sizes": args.hidden_sizes,
        "module__channels": args.channels,
    }


def _without_none(params: dict) -> dict:
    # Options left out are not passed, so the estimator's own defaults apply.
    return {key: value for key, value in params.items() if value is not None}


def _report_fit(model, data, seconds: float, output) -> None:
    kind = "CNN" if model.input_shape is not None else "MLP"
    print(
        f"trained {type(model).__name__} ({kind}, {n_parameters(model):,} parameters) on "
        f"{len(data.y):,} samples with {data.X.shape[1]} features and "
        f"{len(model.classes_)} classes in {seconds:.1f} s"
    )
    certified = model.certified_accuracy(data.X, data.y, method="ibp")
    print(
        f"on the training data: accuracy {model.score(data.X, data.y):.1%}, IBP-certified "
        f"at eps {model.eps:g}: {certified:.1%} (evaluate held-out data with certdistill "
        "certify or report)"
    )
    print(f"saved to {output}")


def run_train(args: argparse.Namespace) -> int:
    """Run ``certdistill train``."""
    from certdistill.estimators.teacher import CertifiedTeacher

    output = check_suffix(args.output, MODEL_SUFFIXES, "--output")
    data = _load(args)
    params = _without_none(
        {
            "eps": args.eps,
            "method": args.method,
            "max_epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "lower": args.lower,
            "upper": args.upper,
            "random_state": args.seed,
            "device": args.device,
            **_network_params(args, data.sample_shape),
        }
    )
    model = CertifiedTeacher(**params)
    seconds = fit_with_progress(model, data.X, data.y, "train", quiet=args.quiet)
    save_model(model, output)
    _report_fit(model, data, seconds, output)
    return 0


def run_distill(args: argparse.Namespace) -> int:
    """Run ``certdistill distill``."""
    from certdistill.estimators.student import DistilledStudent

    output = check_suffix(args.output, MODEL_SUFFIXES, "--output")
    teacher = load_model(args.teacher)
    data = _load(args)
    check_features(teacher, data, args.teacher)
    params = _without_none(
        {
            "eps": teacher.eps if args.eps is None else args.eps,
            "lower": teacher.lower if args.lower is None else args.lower,
            "upper": teacher.upper if args.upper is None else args.upper,
            "temperature": args.temperature,
            "distill_weight": args.distill_weight,
            "loss": args.loss,
            "max_epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "random_state": args.seed,
            "device": args.device,
            **_network_params(args, None),
        }
    )
    student = DistilledStudent(teacher, **params)
    seconds = fit_with_progress(student, data.X, data.y, "distill", quiet=args.quiet)
    save_model(student, output)
    _report_fit(student, data, seconds, output)
    return 0


def _add_fit_arguments(parser: argparse.ArgumentParser, cls: type, default_output: str) -> None:
    """Options shared by train and distill; defaults left out follow the estimator ``cls``."""
    parser.add_argument(
        "--epochs",
        type=positive_int,
        help=f"training epochs (default {library_default(cls, 'max_epochs')})",
    )
    parser.add_argument(
        "--hidden-sizes",
        type=int_tuple,
        metavar="N,N,...",
        help="widths of the hidden fully connected layers, e.g. 512,512 "
        "(default: the library's network; '' for none)",
    )
    parser.add_argument(
        "--input-shape",
        type=int_tuple,
        metavar="C,H,W",
        help="shape of one sample, e.g. 1,28,28, to train a CNN on flat rows "
        "(rows are reshaped to it); without it an MLP is trained",
    )
    parser.add_argument(
        "--channels",
        type=int_tuple,
        metavar="N,N,...",
        help="output channels of the CNN's convolutions (default 32,64; needs --input-shape)",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        help=f"Adam learning rate (default {library_default(cls, 'lr')})",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"batch size (default {library_default(cls, 'batch_size')})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of initialisation and shuffling (default 0)",
    )
    parser.add_argument(
        "--device", type=device, default="cpu", help="torch device, e.g. cuda (default cpu)"
    )
    parser.add_argument(
        "--output",
        default=default_output,
        help=f"where to save the fitted model: .joblib or .pkl with joblib, "
        f".cdsafe in the safe format that loads without running code "
        f"(default {default_output})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_train_parser(commands, parents) -> None:
    """Add the ``train`` command."""
    from certdistill.estimators.teacher import TRAINING_METHODS, CertifiedTeacher

    parser = commands.add_parser(
        "train",
        parents=parents,
        help="train a certified model (CertifiedTeacher) on a file",
        description=(
            "Train a certifiably robust classifier (CertifiedTeacher) on labelled data from a "
            ".npz or .csv file and save it with joblib. Scale the features first (e.g. to "
            "[0, 1]): eps is measured in the units of the features."
        ),
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--eps",
        type=nonnegative_float,
        help="L-infinity radius to train and certify for, in feature units "
        f"(default {library_default(CertifiedTeacher, 'eps')})",
    )
    parser.add_argument(
        "--method",
        choices=TRAINING_METHODS,
        help=f"certified training method (default {library_default(CertifiedTeacher, 'method')})",
    )
    parser.add_argument(
        "--lower",
        type=finite_float,
        help="smallest value of every feature, e.g. 0 for pixels in [0, 1]; "
        "the perturbation ball is cut to [lower, upper] (default: "
        "unbounded)",
    )
    parser.add_argument(
        "--upper",
        type=finite_float,
        help="largest value of every feature, e.g. 1 (default: unbounded)",
    )
    _add_fit_arguments(parser, CertifiedTeacher, "model.joblib")
    parser.set_defaults(handler=run_train)


def add_distill_parser(commands, parents) -> None:
    """Add the ``distill`` command."""
    from certdistill.estimators.student import DISTILLATION_LOSSES, DistilledStudent

    parser = commands.add_parser(
        "distill",
        parents=parents,
        help="train a certified student (DistilledStudent) from a saved teacher",
        description=(
            "Train a certifiably robust student (DistilledStudent) on labelled data with a "
            "teacher saved by certdistill train, and save it with joblib. The data must have "
            "the teacher's features and classes. The student is an MLP unless --input-shape "
            "is given."
        ),
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--teacher",
        required=True,
        help="the teacher's .joblib or .cdsafe file (from certdistill train)",
    )
    parser.add_argument(
        "--eps",
        type=nonnegative_float,
        help="L-infinity radius to train and certify for (default: the teacher's)",
    )
    parser.add_argument(
        "--temperature",
        type=positive_float,
        help="distillation temperature "
        f"(default {library_default(DistilledStudent, 'temperature')})",
    )
    parser.add_argument(
        "--distill-weight",
        type=unit_float,
        help="weight of the teacher in the loss, in [0, 1] "
        f"(default {library_default(DistilledStudent, 'distill_weight')})",
    )
    parser.add_argument(
        "--loss",
        choices=tuple(DISTILLATION_LOSSES),
        help=f"distillation loss (default {library_default(DistilledStudent, 'loss')})",
    )
    parser.add_argument(
        "--lower",
        type=finite_float,
        help="smallest value of every feature (default: the teacher's)",
    )
    parser.add_argument(
        "--upper", type=finite_float, help="largest value of every feature (default: the teacher's)"
    )
    _add_fit_arguments(parser, DistilledStudent, "student.joblib")
    parser.set_defaults(handler=run_distill)
