"""Argument parsing for the command line: one-line errors and typed option values."""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "ArgumentParser",
    "CLIError",
    "add_data_arguments",
    "UsageError",
    "check_suffix",
    "device",
    "finite_float",
    "int_tuple",
    "library_default",
    "nonnegative_float",
    "positive_float",
    "positive_int",
    "unit_float",
]


class CLIError(Exception):
    """A problem with the user's files or data, reported as one line (exit status 1)."""


class UsageError(CLIError):
    """Options that do not go together or an unusable output name (exit status 2, as argparse)."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str):
        # argparse prints the whole usage before the message; a single line naming the
        # problem and pointing to --help is easier to read, the usage is in --help.
        self.exit(2, f"certdistill: error: {message} (see '{self.prog} --help')\n")


def _number(text: str, convert: Callable[[str], float | int], what: str):
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (an eps, a bound)."""
    value = _number(text, float, "a non-negative number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(text, float, "a positive number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def unit_float(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text, float, "a number in [0, 1]")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def finite_float(text: str) -> float:
    """Any finite number."""
    return _number(text, float, "a number")


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def int_tuple(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, e.g. ``1,8,8``; an empty string gives ``()``."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    if parts == [""]:
        return ()
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 1,8,8, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return values


def device(text: str) -> str:
    """A torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:1``), checked as
    the estimators' ``fit`` checks ``device``."""
    from certdistill.estimators.base import check_device

    try:
        check_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def library_default(cls: type, name: str):
    """Default value of a constructor parameter, so help texts follow the library's defaults."""
    parameter = inspect.signature(cls.__init__).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return f"{cls.__name__}'s"
    return parameter.default


def check_suffix(path: str | Path, suffixes: tuple[str, ...], option: str) -> Path:
    """``path`` as a Path if its extension is one of ``suffixes``, else a :class:`CLIError`.

    Output paths are checked before any training, so that a typo does not cost a fit.
    """
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise UsageError(
            f"{option} {str(path)!r}: unsupported extension {path.suffix or '(none)'!r}; "
            f"use {', '.join(suffixes)}"
        )
    return path


def add_data_arguments(parser: argparse.ArgumentParser, *, flag: bool = False) -> None:
    """Add the data file argument (positional ``data``, or ``--data`` if ``flag``) and its keys."""
    help_text = (
        ".npz file with arrays X (one row per sample; images of shape (n, c, h, w) "
        "are flattened) and y, or .csv file with a header, a label column and numeric "
        "feature columns"
    )
    if flag:
        parser.add_argument("--data", required=True, help=help_text)
    else:
        parser.add_argument("data", help=help_text)
    parser.add_argument(
        "--x-key", default="X", help="name of the feature array in a .npz file (default X)"
    )
    parser.add_argument(
        "--y-key", default="y", help="name of the label array in a .npz file (default y)"
    )
    parser.add_argument(
        "--label-column",
        default="label",
        help="name of the label column of a .csv file (default label); every "
        "other column is a feature",
    )
