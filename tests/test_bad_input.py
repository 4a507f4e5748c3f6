"""Bad input, clear errors, nothing lost: a matrix of public entry points x bad inputs.

Rows (:data:`ENTRY_POINTS`) are the public entry points: the estimators' ``fit``,
``partial_fit``, ``predict``, ``predict_proba``, ``certify``, ``certified_radius`` and
``certified_accuracy`` (of a :class:`CertifiedTeacher` and a :class:`DistilledStudent`), the
functional :func:`certdistill.certify` and :func:`certdistill.certified_radius`, and the scorer
:class:`CertifiedAccuracy`. Columns (:data:`CASES`) are bad inputs. Every pair has a verdict in
:data:`EXPECTED` (:func:`test_the_matrix_is_complete` checks that none is missing):

* :class:`Raises`: the call raises that scikit-learn-style exception class (``ValueError``,
  ``TypeError``, ``NotFittedError``) with a message naming the problem, never an error from
  torch's internals (:func:`_check_not_torch`);
* :class:`Works`: the input is valid for that entry point (one sample to ``predict``, labels
  unseen before to a fresh ``fit``...) and the call succeeds;
* :class:`NotApplicable`: the entry point does not take that input, with the reason.

A ``fit`` or ``partial_fit`` of a fitted estimator that raises must leave the old model as it was:
it predicts and certifies exactly as before (:func:`_check_unchanged`).

The command line's cells (:data:`CLI_CELLS`, checked by
:func:`test_the_command_line_cells_are_complete`) name cases of ``tests/cli/test_cli.py``'s
``ERRORS`` table, which runs them (one-line errors, no traceback), so that the matrix stays one
table and the command-line error tests one mechanism. DataFrames have their own tests at the end.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd  # in the "test" extra
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from skorch.callbacks import Callback
from torch import nn

import certdistill
from certdistill import CertifiedAccuracy, CertifiedTeacher, DistilledStudent
from certdistill.exceptions import UnsupportedLayerError

TINY = dict(
    eps=0.05,
    lower=0.0,
    upper=1.0,
    max_epochs=1,
    module__hidden_sizes=(8,),
    random_state=0,
    batch_size=64,
)
N_CLASSES = 3
CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def data():
    from digits import small_digits

    return small_digits(N_CLASSES, 90)


@pytest.fixture(scope="module")
def teacher(data):
    return CertifiedTeacher(**TINY).fit(*data)


@pytest.fixture(scope="module")
def student(data, teacher):
    return DistilledStudent(FrozenEstimator(teacher), **TINY).fit(*data)


@pytest.fixture(scope="module")
def other_teachers(data):
    """Fitted teachers that do not match the data: fewer features, other classes."""
    X, y = data
    fewer_features = CertifiedTeacher(**TINY).fit(X[:, :32], y)
    other_classes = CertifiedTeacher(**TINY).fit(X, (y + 1) % N_CLASSES + 10)
    return {"features": fewer_features, "classes": other_classes}


@dataclass
class Context:
    """What an entry point needs: the data and the fitted estimators (shared by the module)."""

    X: np.ndarray
    y: np.ndarray
    teacher: CertifiedTeacher
    student: DistilledStudent
    other_teachers: dict


@pytest.fixture(scope="module")
def ctx(data, teacher, student, other_teachers):
    return Context(*data, teacher, student, other_teachers)


# ----------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class Raises:
    """The call raises ``error`` with a message matching ``match`` (``re.search``)."""

    error: type[Exception]
    match: str


@dataclass(frozen=True)
class Works:
    """The input is valid for this entry point: the call succeeds."""

    why: str


@dataclass(frozen=True)
class NotApplicable:
    """The entry point does not take this input."""

    reason: str


# ------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """A bad input: what it changes in a call. ``X``/``y`` replace the data (functions of the
    context); ``params`` are estimator parameters set before ``fit`` (or, for the functional
    API and the scorer, the arguments of the same name); ``unfitted`` calls an unfitted
    estimator."""

    X: Callable | None = None
    y: Callable | None = None
    params: dict = field(default_factory=dict)
    unfitted: bool = False


def _with(X, index, value):
    X = X.copy()
    X[index] = value
    return X


def _tanh_network(hidden_sizes=(8,)):
    """A custom module builder (it takes ``module__hidden_sizes``) with a layer the bound engine
    does not support."""
    return nn.Sequential(
        nn.Linear(64, hidden_sizes[0]), nn.Tanh(), nn.Linear(hidden_sizes[0], N_CLASSES)
    )


def _strings(X):
    return np.where(X > 0.5, "high", "low").astype(object)


CASES: dict[str, Case] = {
    "nan X": Case(X=lambda c: _with(c.X, (1, 5), np.nan)),
    "inf X": Case(X=lambda c: _with(c.X, (2, 7), np.inf)),
    "wrong n_features": Case(X=lambda c: c.X[:, :10]),
    "X of a wrong input_shape": Case(X=lambda c: c.X.reshape(-1, 1, 8, 8)[:, :, :7, :7]),
    "wrong input_shape param": Case(params={"input_shape": (1, 7, 7)}),
    "1-d X": Case(X=lambda c: c.X[0], y=lambda c: c.y[:1]),
    "empty X": Case(X=lambda c: c.X[:0], y=lambda c: c.y[:0]),
    "one sample": Case(X=lambda c: c.X[:1], y=lambda c: c.y[:1]),
    "one class": Case(X=lambda c: c.X[c.y == 1], y=lambda c: c.y[c.y == 1]),
    "unseen labels": Case(y=lambda c: np.where(np.arange(len(c.y)) == 3, 7, c.y)),
    "y of wrong length": Case(y=lambda c: c.y[:-1]),
    "y missing": Case(y=lambda c: None),
    "non-numeric X": Case(X=lambda c: _strings(c.X)),
    "eps negative": Case(params={"eps": -0.1}),
    "eps nan": Case(params={"eps": float("nan")}),
    "eps inf": Case(params={"eps": float("inf")}),
    "eps of wrong shape": Case(params={"eps": np.full(10, 0.05)}),
    "eps non-numeric": Case(params={"eps": "small"}),
    "lower > upper": Case(params={"lower": 1.0, "upper": 0.0}),
    "X outside [lower, upper]": Case(X=lambda c: c.X * 2.0 - 0.5),
    "unknown method": Case(params={"method": "lp"}),
    "method of wrong type": Case(params={"method": 3}),
    "unknown loss": Case(params={"loss": "l2"}),
    "unfitted estimator": Case(unfitted=True),
    "unfitted frozen teacher": Case(
        params={"teacher": lambda c: FrozenEstimator(CertifiedTeacher(**TINY))}
    ),
    "teacher of other features": Case(
        params={"teacher": lambda c: FrozenEstimator(c.other_teachers["features"])}
    ),
    "teacher of other classes": Case(
        params={"teacher": lambda c: FrozenEstimator(c.other_teachers["classes"])}
    ),
    "non-estimator teacher": Case(params={"teacher": lambda c: LogisticRegression()}),
    # On an unfitted estimator: skorch's set_params(module=...) re-initialises a fitted
    # estimator's network at once, so there would be no old model left for fit to keep.
    "unsupported layer": Case(params={"module": lambda c: _tanh_network}, unfitted=True),
    "device cuda without CUDA": Case(params={"device": "cuda"}),
}


# ------------------------------------------------------------------------ entry points
def _params(case: Case, ctx: Context, names) -> dict:
    """The case's parameters among ``names``, callables evaluated on the context."""
    return {k: v(ctx) if callable(v) else v for k, v in case.params.items() if k in names}


def _estimator(kind: str, ctx: Context, case: Case):
    fitted = ctx.teacher if kind == "teacher" else ctx.student
    return clone(fitted) if case.unfitted else copy.deepcopy(fitted)


FIT_PARAMS = {
    "eps",
    "lower",
    "upper",
    "input_shape",
    "method",
    "loss",
    "teacher",
    "module",
    "device",
}


def _fit(kind: str, partial: bool):
    def call(ctx: Context, case: Case, X, y):
        estimator = _estimator(kind, ctx, case)
        params = _params(case, ctx, FIT_PARAMS)
        if kind == "student" and "method" in params:  # the student's bound method
            params["teacher_bounds"] = params.pop("method")
        before = _outputs(estimator, ctx)
        try:
            estimator.set_params(**params)
            if partial:
                estimator.partial_fit(X, y, epochs=1)
            else:
                estimator.fit(X, y)
        except Exception:
            _check_unchanged(estimator, ctx, before)
            raise
        assert estimator.predict(X[:2]).shape == (min(len(X), 2),)

    return call


def _method(kind: str, name: str):
    def call(ctx: Context, case: Case, X, y):
        estimator = _estimator(kind, ctx, case)
        params = _params(case, ctx, {"eps", "method"})
        if name in ("predict", "predict_proba"):
            result = getattr(estimator, name)(X)
        elif name == "certify":
            result = estimator.certify(X, y=y, **params).certified
        elif name == "certified_radius":
            if "eps" in params:  # its radius parameter is the end of the search
                params["max_eps"] = params.pop("eps")
            result = estimator.certified_radius(X, y=y, **params)
        else:
            result = np.array([estimator.certified_accuracy(X, y, **params)])
        assert len(result) in (1, len(X))

    return call


def _functional(name: str):
    def call(ctx: Context, case: Case, X, y):
        module = copy.deepcopy(ctx.teacher.module_)
        params = {
            "lower": 0.0,
            "upper": 1.0,
            **_params(case, ctx, {"eps", "lower", "upper", "method", "module"}),
        }
        module = params.pop("module", lambda: module)()
        if name == "certify":
            result = certdistill.certify(module, X, params.pop("eps", 0.05), y=y, **params)
        else:
            if "eps" in params:
                params["max_eps"] = params.pop("eps")
            result = certdistill.certified_radius(module, X, y=y, **params)
        assert len(result) == len(X)

    return call


def _scorer(pipeline: bool):
    def call(ctx: Context, case: Case, X, y):
        estimator = _estimator("teacher", ctx, case)
        if pipeline:
            estimator = make_pipeline(FunctionTransformer().fit(ctx.X), estimator)
        params = {"eps": 0.05, **_params(case, ctx, {"eps", "method"})}
        score = CertifiedAccuracy(params.pop("eps"), **params)(estimator, X, y)
        assert 0.0 <= score <= 1.0

    return call


ENTRY_POINTS: dict[str, Callable] = {
    **{
        f"{kind}.{name}": _fit(kind, name == "partial_fit")
        for kind in ("teacher", "student")
        for name in ("fit", "partial_fit")
    },
    **{
        f"{kind}.{name}": _method(kind, name)
        for kind in ("teacher", "student")
        for name in (
            "predict",
            "predict_proba",
            "certify",
            "certified_radius",
            "certified_accuracy",
        )
    },
    "certify()": _functional("certify"),
    "certified_radius()": _functional("certified_radius"),
    "CertifiedAccuracy": _scorer(pipeline=False),
    "CertifiedAccuracy(pipeline)": _scorer(pipeline=True),
}

FITS = [f"{kind}.{name}" for kind in ("teacher", "student") for name in ("fit", "partial_fit")]
PREDICTS = [
    f"{kind}.{name}" for kind in ("teacher", "student") for name in ("predict", "predict_proba")
]
CERTIFIES = [
    f"{kind}.{name}"
    for kind in ("teacher", "student")
    for name in ("certify", "certified_radius", "certified_accuracy")
]
FUNCTIONAL = ["certify()", "certified_radius()"]
SCORERS = ["CertifiedAccuracy", "CertifiedAccuracy(pipeline)"]
ESTIMATOR_METHODS = PREDICTS + CERTIFIES + SCORERS
RADIUS = ["teacher.certified_radius", "student.certified_radius", "certified_radius()"]
WITH_EPS = [e for e in CERTIFIES + FUNCTIONAL + SCORERS if e not in RADIUS]
STUDENT_FITS = ["student.fit", "student.partial_fit"]
FRESH_FITS = ["teacher.fit", "student.fit"]


# ----------------------------------------------------------------------------- expected
def _row(verdict, entry_points) -> dict:
    return dict.fromkeys(entry_points, verdict)


NO_LABELS = NotApplicable("takes no labels")
FIT_ONLY = NotApplicable("an estimator parameter, validated in fit")
NOT_FUNCTIONAL = NotApplicable("the functional API takes a module, not an estimator")
NON_FINITE = Raises(ValueError, r"(?i)NaN|infinity|infinite")
FEATURES = Raises(ValueError, r"X has 10 features, but \w+ is expecting 64 features")
OUTSIDE = Raises(ValueError, r"X has values (below `lower`|above `upper`)")
RADIUS_VALUE = Raises(ValueError, r"max_eps must be a positive finite number")
NOT_FITTED = Raises(NotFittedError, r"not fitted")
TEACHER_ONLY = NotApplicable("only DistilledStudent takes a teacher")


def _expected() -> dict[tuple[str, str], object]:
    every = list(ENTRY_POINTS)
    x_entries = [e for e in every if e not in FUNCTIONAL]
    table: dict[str, dict] = {
        "nan X": _row(NON_FINITE, every),
        "inf X": _row(NON_FINITE, every),
        "wrong n_features": {
            **_row(FEATURES, [e for e in x_entries if e not in FRESH_FITS]),
            **_row(Works("a fresh fit learns the number of features"), FRESH_FITS[:1]),
            "student.fit": Raises(
                ValueError,
                r"teacher was fitted on 64 features, but the "
                r"student's X has 10",
            ),
            **_row(Raises(ValueError, r"sample shape \(10,\) does not fit the module"), FUNCTIONAL),
        },
        "X of a wrong input_shape": {
            **_row(Raises(ValueError, r"Found array with dim 4"), x_entries),
            **_row(
                Raises(ValueError, r"sample shape \(1, 7, 7\) does not fit the module"), FUNCTIONAL
            ),
        },
        "wrong input_shape param": {
            **_row(FIT_ONLY, ESTIMATOR_METHODS),
            **_row(
                Raises(
                    ValueError,
                    r"input_shape=\(1, 7, 7\) needs 49 features per row, "
                    r"but X has 64",
                ),
                FITS,
            ),
            **_row(NotApplicable("the module's input shape is the one of X"), FUNCTIONAL),
        },
        "1-d X": {
            **_row(Raises(ValueError, r"Expected 2D array, got 1D array"), x_entries),
            **_row(Raises(ValueError, r"X must have shape \(n_samples, \.\.\.\)"), FUNCTIONAL),
        },
        "empty X": {
            **_row(Raises(ValueError, r"0 sample\(s\)"), x_entries),
            **_row(Raises(ValueError, r"at least one sample"), FUNCTIONAL),
        },
        "one sample": {
            **_row(Works("one sample is a valid batch"), every),
            **_row(Raises(ValueError, r"at least 2 classes"), FRESH_FITS),
        },
        "one class": {
            **_row(Works("labels of one known class are valid"), every),
            **_row(Raises(ValueError, r"at least 2 classes"), FRESH_FITS),
            **_row(NO_LABELS, PREDICTS),
        },
        "unseen labels": {
            **_row(
                Raises(ValueError, r"labels not seen in fit: array\(\[7\]\)"),
                [e for e in every if e not in FITS + FUNCTIONAL],
            ),
            "teacher.fit": Works("a fresh fit learns the classes"),
            "student.fit": Raises(ValueError, r"teacher's classes .* differ from the student's"),
            **_row(
                Raises(ValueError, r"labels not seen in fit: array\(\[7\]\)"),
                ["teacher.partial_fit", "student.partial_fit"],
            ),
            **_row(Raises(ValueError, r"y holds classes outside \[0, 3\)"), FUNCTIONAL),
            **_row(NO_LABELS, PREDICTS),
        },
        "y of wrong length": {
            **_row(Raises(ValueError, r"inconsistent numbers of samples"), FITS),
            **_row(
                Raises(ValueError, r"y must have shape \(90,\), got \(89,\)"),
                CERTIFIES + FUNCTIONAL + SCORERS,
            ),
            **_row(NO_LABELS, PREDICTS),
        },
        "y missing": {
            **_row(Raises(ValueError, r"requires y to be passed"), FITS),
            **_row(
                Works("without labels the prediction is certified"),
                [
                    "teacher.certify",
                    "student.certify",
                    "teacher.certified_radius",
                    "student.certified_radius",
                    *FUNCTIONAL,
                ],
            ),
            **_row(
                Raises(ValueError, r"requires y"),
                ["teacher.certified_accuracy", "student.certified_accuracy", *SCORERS],
            ),
            **_row(NO_LABELS, PREDICTS),
        },
        "non-numeric X": {
            **_row(
                Raises(ValueError, r"could not convert string to float: '(low|high)'"), x_entries
            ),
            **_row(Raises(ValueError, r"X must be numeric"), FUNCTIONAL),
        },
        "eps negative": {
            **_row(Raises(ValueError, r"eps must be non-negative, got -0\.1"), FITS + WITH_EPS),
            **_row(RADIUS_VALUE, RADIUS),
            **_row(NotApplicable("predictions do not depend on eps"), PREDICTS),
        },
        "eps nan": {
            **_row(Raises(ValueError, r"eps must be finite, got nan"), FITS + WITH_EPS),
            **_row(RADIUS_VALUE, RADIUS),
            **_row(NotApplicable("predictions do not depend on eps"), PREDICTS),
        },
        "eps inf": {
            **_row(Raises(ValueError, r"eps must be finite, got inf"), FITS + WITH_EPS),
            **_row(RADIUS_VALUE, RADIUS),
            **_row(NotApplicable("predictions do not depend on eps"), PREDICTS),
        },
        "eps of wrong shape": {
            **_row(
                Raises(
                    ValueError,
                    r"eps of shape \(10,\) does not broadcast to one sample "
                    r"of shape \(64,\)",
                ),
                FITS + WITH_EPS,
            ),
            **_row(RADIUS_VALUE, RADIUS),
            **_row(NotApplicable("predictions do not depend on eps"), PREDICTS),
        },
        "eps non-numeric": {
            **_row(Raises(ValueError, r"eps must be numeric, got str"), FITS + WITH_EPS),
            **_row(RADIUS_VALUE, RADIUS),
            **_row(NotApplicable("predictions do not depend on eps"), PREDICTS),
        },
        "lower > upper": {
            **_row(Raises(ValueError, r"lower must not exceed upper"), FITS + FUNCTIONAL),
            **_row(FIT_ONLY, ESTIMATOR_METHODS),
        },
        "X outside [lower, upper]": {
            **_row(OUTSIDE, every),
            **_row(Works("predictions need no domain"), PREDICTS),
        },
        "unknown method": {
            "teacher.fit": Raises(ValueError, r"method must be one of .*got 'lp'"),
            "teacher.partial_fit": Raises(ValueError, r"method must be one of .*got 'lp'"),
            **_row(Raises(ValueError, r"teacher_bounds must be one of .*got 'lp'"), STUDENT_FITS),
            **_row(Raises(ValueError, r"Unknown method 'lp'"), CERTIFIES + FUNCTIONAL + SCORERS),
            **_row(NotApplicable("predictions use no bound method"), PREDICTS),
        },
        "method of wrong type": {
            "teacher.fit": Raises(ValueError, r"method must be one of .*got 3"),
            "teacher.partial_fit": Raises(ValueError, r"method must be one of .*got 3"),
            **_row(Raises(ValueError, r"teacher_bounds must be one of .*got 3"), STUDENT_FITS),
            **_row(
                Raises(TypeError, r"method must be a stage name or a sequence of them, got 3"),
                CERTIFIES + FUNCTIONAL + SCORERS,
            ),
            **_row(NotApplicable("predictions use no bound method"), PREDICTS),
        },
        "unknown loss": {
            **_row(Raises(ValueError, r"loss must be one of .*got 'l2'"), STUDENT_FITS),
            **_row(
                NotApplicable(
                    "the teacher's loss is its method (and criterion is refused, "
                    "see test_training_safety.py)"
                ),
                ["teacher.fit", "teacher.partial_fit"],
            ),
            **_row(NotApplicable("takes no loss"), ESTIMATOR_METHODS + FUNCTIONAL),
        },
        "unfitted estimator": {
            **_row(NOT_FITTED, ESTIMATOR_METHODS),
            **_row(Works("fit and a first partial_fit are what fit it"), FITS),
            **_row(NOT_FUNCTIONAL, FUNCTIONAL),
        },
        "unfitted frozen teacher": {
            **_row(TEACHER_ONLY, [e for e in every if e not in STUDENT_FITS]),
            "student.fit": Raises(
                NotFittedError,
                r"FrozenEstimator .* wraps an unfitted "
                r"teacher",
            ),
            "student.partial_fit": NotApplicable("the teacher is taken on the first call"),
        },
        "teacher of other features": {
            **_row(TEACHER_ONLY, [e for e in every if e not in STUDENT_FITS]),
            "student.fit": Raises(
                ValueError,
                r"teacher was fitted on 32 features, but the "
                r"student's X has 64",
            ),
            "student.partial_fit": NotApplicable("the teacher is taken on the first call"),
        },
        "teacher of other classes": {
            **_row(TEACHER_ONLY, [e for e in every if e not in STUDENT_FITS]),
            "student.fit": Raises(ValueError, r"teacher's classes .* differ from the student's"),
            "student.partial_fit": NotApplicable("the teacher is taken on the first call"),
        },
        "non-estimator teacher": {
            **_row(TEACHER_ONLY, [e for e in every if e not in STUDENT_FITS]),
            "student.fit": Raises(
                TypeError,
                r"teacher must be a certdistill estimator .*got "
                r"LogisticRegression",
            ),
            "student.partial_fit": NotApplicable("the teacher is taken on the first call"),
        },
        "unsupported layer": {
            **_row(Raises(UnsupportedLayerError, r"Tanh"), FRESH_FITS + FUNCTIONAL),
            **_row(
                NotApplicable("partial_fit trains the module it has"),
                ["teacher.partial_fit", "student.partial_fit"],
            ),
            **_row(FIT_ONLY, ESTIMATOR_METHODS),
        },
        "device cuda without CUDA": {
            **_row(
                NotApplicable("CUDA is available on this machine")
                if CUDA
                else Raises(ValueError, r"device='cuda' .*CUDA is not available"),
                FITS,
            ),
            **_row(FIT_ONLY, ESTIMATOR_METHODS),
            **_row(NotApplicable("the functional API runs on the module's device"), FUNCTIONAL),
        },
    }
    return {(entry, case): verdict for case, row in table.items() for entry, verdict in row.items()}


EXPECTED = _expected()

#: The command line's cells: a key of ``tests/cli/test_cli.py``'s ``ERRORS`` (a one-line error
#: without traceback, exit status 1 or 2), a valid input that ``test_cli.py`` runs, or the reason
#: the case does not apply.
CLI_COMMANDS = ("train", "distill", "certify", "report")
CLI_VALID = Works("test_cli.py::test_files_that_are_small_or_have_new_labels_are_accepted")
NO_TEACHER = NotApplicable("only distill takes a teacher")
SAME_EPS_OPTION = NotApplicable(
    "every --eps is parsed by cli._args.nonnegative_float, run on another command"
)


def _per_command(key: str) -> dict:
    return {command: f"{key} ({command})" for command in CLI_COMMANDS}


def _commands(default, **cells) -> dict:
    return {command: cells.get(command, default) for command in CLI_COMMANDS}


CLI_CELLS: dict[str, dict[str, str | Works | NotApplicable]] = {
    "nan X": _per_command("nan"),
    "inf X": _per_command("inf"),
    "wrong n_features": {
        **_per_command("few features"),
        "train": NotApplicable("train learns the number of features"),
    },
    "X of a wrong input_shape": _commands(
        NotApplicable(
            "data files are flattened to rows: a wrong sample shape is a wrong number of features"
        )
    ),
    "wrong input_shape param": _commands(
        NotApplicable("no --input-shape: the model's shape"),
        train="bad input shape",
        distill="distill bad input shape",
    ),
    "1-d X": _per_command("1-d X"),
    "empty X": _per_command("empty"),
    "one sample": _commands(CLI_VALID, train="one sample (train)", distill="one sample (distill)"),
    "one class": _commands(CLI_VALID, train="one class (train)", distill="one class (distill)"),
    "unseen labels": {**_per_command("unknown label"), "train": CLI_VALID},
    "y of wrong length": _per_command("short y"),
    "y missing": _per_command("missing y key"),
    "non-numeric X": _per_command("text csv"),
    "eps negative": {
        "train": "negative eps",
        "distill": "negative distill eps",
        "certify": "negative certify eps",
        "report": "negative report eps",
    },
    "eps nan": _commands(SAME_EPS_OPTION, certify="nan eps"),
    "eps inf": _commands(SAME_EPS_OPTION, train="inf eps"),
    "eps of wrong shape": _commands(NotApplicable("--eps takes numbers, one per radius")),
    "eps non-numeric": _commands(SAME_EPS_OPTION, report="text eps"),
    "lower > upper": _commands(
        NotApplicable("no --lower/--upper: the model's domain"),
        train="lower above upper",
        distill="distill lower above upper",
    ),
    "X outside [lower, upper]": _per_command("outside the domain"),
    "unknown method": _commands(
        "unknown method",
        train="unknown training method",
        report="unknown report method",
        distill=NotApplicable("the student trains by IBP: no --method"),
    ),
    "method of wrong type": _commands(NotApplicable("--method takes names (unknown method)")),
    "unknown loss": _commands(NotApplicable("only distill has --loss"), distill="unknown loss"),
    "unfitted estimator": _commands(
        NotApplicable("train and distill fit the model"),
        certify="unfitted model",
        report="unfitted report model",
    ),
    "unfitted frozen teacher": _commands(NO_TEACHER, distill="unfitted teacher"),
    "teacher of other features": _commands(NO_TEACHER, distill="few features (distill)"),
    "teacher of other classes": _commands(NO_TEACHER, distill="unknown label (distill)"),
    "non-estimator teacher": _commands(NO_TEACHER, distill="teacher not a model"),
    "unsupported layer": _commands(NotApplicable("the command line builds its own networks")),
    "device cuda without CUDA": _commands(
        NotApplicable("no --device: models are certified where they are"),
        **({} if CUDA else {"train": "cuda", "distill": "distill cuda"}),
    ),
}
if CUDA:
    CLI_CELLS["device cuda without CUDA"].update(
        dict.fromkeys(("train", "distill"), NotApplicable("CUDA is available on this machine"))
    )


# --------------------------------------------------------------------------------- checks
TORCH_PHRASES = (
    "mat1 and mat2",
    "size mismatch",
    "Expected all tensors",
    "shapes cannot be",
    "Torch not compiled",
    "must match the size of tensor",
    "CUDA driver",
    "Expected input batch_size",
    "not implemented for",
    "result type Float can't",
)


def _check_not_torch(error: BaseException) -> None:
    """The error is not one of torch's internals: not a RuntimeError, not raised inside torch,
    and its message has none of torch's phrases."""
    assert not isinstance(error, RuntimeError | AssertionError | IndexError | KeyError), error
    innermost = traceback.extract_tb(error.__traceback__)[-1].filename.replace("\\", "/")
    assert "/torch/" not in innermost, (innermost, error)
    message = str(error)
    assert not any(phrase in message for phrase in TORCH_PHRASES), message


def _outputs(estimator, ctx: Context):
    if not (getattr(estimator, "initialized_", False) and hasattr(estimator, "n_features_in_")):
        return None
    X = ctx.X[:10]
    certificate = estimator.certify(X, method="ibp")
    return estimator.predict_proba(X), certificate.margins, estimator.get_params()["eps"]


def _check_unchanged(estimator, ctx: Context, before) -> None:
    """A failed fit leaves the fitted model as it was: same probabilities and certificates."""
    if before is None:
        return
    proba, margins, _ = before
    X = ctx.X[:10]
    np.testing.assert_array_equal(estimator.predict_proba(X), proba)
    np.testing.assert_array_equal(estimator.certify(X, method="ibp").margins, margins)


def _cells():
    for (entry, case), verdict in EXPECTED.items():
        if not isinstance(verdict, NotApplicable):
            yield pytest.param(entry, case, verdict, id=f"{entry}-{case}")


@pytest.mark.parametrize(("entry", "case", "verdict"), list(_cells()))
def test_bad_input(entry, case, verdict, ctx):
    spec = CASES[case]
    X = ctx.X if spec.X is None else spec.X(ctx)
    y = ctx.y if spec.y is None else spec.y(ctx)
    call = ENTRY_POINTS[entry]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tiny fits may warn (collapsed fit)
        if isinstance(verdict, Works):
            call(ctx, spec, X, y)
            return
        with pytest.raises(verdict.error, match=verdict.match) as info:
            call(ctx, spec, X, y)
    _check_not_torch(info.value)


def test_the_matrix_is_complete():
    """Every entry point has a verdict for every bad input, and every verdict says why."""
    missing = [(e, c) for e in ENTRY_POINTS for c in CASES if (e, c) not in EXPECTED]
    assert not missing
    assert set(EXPECTED) == {(e, c) for e in ENTRY_POINTS for c in CASES}
    for verdict in EXPECTED.values():
        if isinstance(verdict, NotApplicable):
            assert verdict.reason


def _test_cli_module():
    """tests/cli/test_cli.py as a module (pytest imports it only when it collects that folder)."""
    module = sys.modules.get("test_cli")
    if module is None:
        path = Path(__file__).parent / "cli" / "test_cli.py"
        spec = importlib.util.spec_from_file_location("test_cli", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def test_the_command_line_cells_are_complete():
    """Every command has a verdict for every bad input; the errors are cases of test_cli.py."""
    ERRORS = _test_cli_module().ERRORS

    assert set(CLI_CELLS) == set(CASES)
    for case, cells in CLI_CELLS.items():
        assert set(cells) == set(CLI_COMMANDS), case
        for command, cell in cells.items():
            if isinstance(cell, str):
                assert cell in ERRORS, (case, command, cell)
                assert ERRORS[cell][0][0] == command, (case, command, cell)


@pytest.mark.skipif(CUDA, reason="CUDA is available on this machine")
def test_set_params_device_cuda_without_cuda_changes_nothing(ctx):
    """Moving a fitted estimator to a device it cannot use fails before anything moves."""
    estimator = copy.deepcopy(ctx.teacher)
    before = _outputs(estimator, ctx)
    with pytest.raises(ValueError, match=r"device='cuda' but CUDA is not available") as info:
        estimator.set_params(device="cuda")
    _check_not_torch(info.value)
    assert estimator.device == "cpu"
    _check_unchanged(estimator, ctx, before)


def test_an_unsupported_layer_raises_before_the_first_epoch(data):
    """Not after the clean warm-up epochs, which do not bound the network."""
    epochs = []

    class Count(Callback):
        def on_epoch_begin(self, net, **kwargs):
            epochs.append(len(net.history))

    teacher = CertifiedTeacher(
        _tanh_network,
        warmup=0.5,
        max_epochs=4,
        callbacks=[("count", Count())],
        **{k: v for k, v in TINY.items() if k != "max_epochs"},
    )
    with pytest.raises(UnsupportedLayerError, match="Tanh"):
        teacher.fit(*data)
    assert epochs == []
    assert not teacher.initialized_  # the failed fit left it unfitted


def test_changing_input_shape_without_refitting_keeps_the_fitted_reading(ctx):
    """The fitted network reads rows with the shape it was fitted with (``input_shape`` is a
    parameter of the next fit)."""
    estimator = copy.deepcopy(ctx.teacher)
    before = _outputs(estimator, ctx)
    estimator.set_params(input_shape=(1, 7, 7))
    _check_unchanged(estimator, ctx, before)


# --------------------------------------------------------------------------- DataFrames
COLUMNS = [f"pixel{i}" for i in range(64)]


@pytest.fixture(scope="module")
def frame(data):
    return pd.DataFrame(data[0], columns=COLUMNS)


@pytest.fixture(scope="module")
def frame_teacher(frame, data):
    return CertifiedTeacher(**TINY).fit(frame, pd.Series(data[1], name="digit"))


FRAME_CALLS = {
    "predict": lambda est, X, y: est.predict(X),
    "predict_proba": lambda est, X, y: est.predict_proba(X),
    "score": lambda est, X, y: est.score(X, y),
    "certify": lambda est, X, y: est.certify(X, y=y).certified,
    "certified_radius": lambda est, X, y: est.certified_radius(X, y=y, method="ibp"),
    "certified_accuracy": lambda est, X, y: est.certified_accuracy(X, y),
    "CertifiedAccuracy": lambda est, X, y: CertifiedAccuracy(0.05)(est, X, y),
    "partial_fit": lambda est, X, y: copy.deepcopy(est).partial_fit(X, y, epochs=1),
}


def test_a_dataframe_fit_records_the_feature_names(frame_teacher, frame, data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CertifiedTeacher(**TINY).fit(frame, data[1])
    # neither scikit-learn's feature-name warning nor torch's about read-only arrays
    assert not [
        w for w in caught if "feature names" in str(w.message) or "not writable" in str(w.message)
    ]
    assert list(frame_teacher.feature_names_in_) == COLUMNS
    assert frame_teacher.n_features_in_ == 64
    # the same model as a fit on the array: the names are checked, not used
    array_teacher = CertifiedTeacher(**TINY).fit(*data)
    np.testing.assert_allclose(
        frame_teacher.predict_proba(frame), array_teacher.predict_proba(data[0]), rtol=1e-6
    )
    assert not hasattr(array_teacher, "feature_names_in_")


@pytest.mark.parametrize("name", list(FRAME_CALLS))
def test_dataframes_work_end_to_end(name, frame_teacher, frame, data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no feature-name warning either
        FRAME_CALLS[name](frame_teacher, frame, pd.Series(data[1]))


@pytest.mark.parametrize("name", list(FRAME_CALLS))
@pytest.mark.parametrize("change", ["renamed", "reordered"])
def test_dataframes_with_other_columns_raise(name, change, frame_teacher, frame, data):
    """As in scikit-learn: fitted with feature names, X with other names (or order) raises."""
    if change == "renamed":
        other = frame.rename(columns={"pixel3": "pixel_3"})
    else:
        other = frame[COLUMNS[::-1]]
    with pytest.raises(
        ValueError, match="feature names should match those that were passed during fit"
    ) as info:
        FRAME_CALLS[name](frame_teacher, other, data[1])
    _check_not_torch(info.value)


def test_feature_name_warnings_as_in_scikit_learn(frame_teacher, frame, ctx):
    with pytest.warns(
        UserWarning,
        match="X does not have valid feature names, but "
        "CertifiedTeacher was fitted with feature names",
    ):
        frame_teacher.certify(frame.to_numpy()[:5])
    with pytest.warns(
        UserWarning,
        match="X has feature names, but CertifiedTeacher was fitted without feature names",
    ):
        ctx.teacher.certify(frame.iloc[:5])


def test_a_student_distils_on_dataframes(frame_teacher, frame, data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        student = DistilledStudent(FrozenEstimator(frame_teacher), **TINY).fit(frame, data[1])
    assert not [w for w in caught if "feature names" in str(w.message)]
    assert list(student.feature_names_in_) == COLUMNS
    assert student.certified_accuracy(frame, data[1]) >= 0.0
    with pytest.raises(ValueError, match="feature names should match"):
        student.certify(frame.rename(columns={"pixel0": "x"}))


def test_a_dataframe_with_text_raises(frame, data):
    text = frame.assign(pixel5=np.where(frame["pixel5"] > 0.5, "high", "low"))
    with pytest.raises(ValueError, match="could not convert string to float"):
        CertifiedTeacher(**TINY).fit(text, data[1])


def test_a_failing_fit_keeps_the_feature_names(frame_teacher, frame, data):
    """scikit-learn's validation resets the feature names before it checks the values: the
    failing fit must not leave the model without them."""
    estimator = copy.deepcopy(frame_teacher)
    expected = estimator.predict_proba(frame)
    with pytest.raises(ValueError, match="NaN"):
        estimator.fit(_with(data[0], (0, 0), np.nan), data[1])  # an array: no names
    assert list(estimator.feature_names_in_) == COLUMNS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(estimator.predict_proba(frame), expected)


# ------------------------------------------------------------------- a box per sample
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lower": None, "upper": np.ones((3, 4))}, "needs both lower and upper"),
        ({"lower": np.zeros((3, 4)), "upper": np.ones((2, 4))}, "differ in shape"),
        ({"lower": np.zeros((2, 4)), "upper": np.ones((2, 4))}, "2 boxes for 3 samples"),
        ({"lower": np.zeros((3, 2, 2)), "upper": np.ones((3, 2, 2))}, "not one box corner per"),
        ({"lower": np.ones((3, 4)), "upper": np.zeros((3, 4))}, "lower must not exceed upper"),
        ({"lower": np.full((3, 4), np.nan), "upper": np.ones((3, 4))}, "must be finite"),
        ({"lower": np.full((3, 4), 0.6), "upper": np.ones((3, 4))}, "below `lower`"),
    ],
)
def test_bad_boxes_per_sample(kwargs, message):
    import torch

    from certdistill import certify

    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=message):
        certify(net, np.full((3, 4), 0.5), None, **kwargs)


def test_boxes_need_samples_in_memory():
    import torch

    from certdistill import certify

    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    batches = (np.zeros((2, 4)) for _ in range(2))
    with pytest.raises(ValueError, match="needs X in memory"):
        certify(net, batches, None, lower=np.zeros((2, 4)), upper=np.ones((2, 4)))
