"""Files of the command line: data (``.npz``, ``.csv``), models (joblib or the safe format) and
result tables."""

from __future__ import annotations

import csv
import json
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from certdistill.cli._args import CLIError

__all__ = [
    "DATA_SUFFIXES",
    "MODEL_SUFFIXES",
    "NETWORK_SUFFIXES",
    "OnnxModel",
    "SAFE_SUFFIX",
    "TABLE_SUFFIXES",
    "Dataset",
    "check_features",
    "load_data",
    "load_model",
    "markdown_table",
    "save_model",
    "write_json",
    "write_table",
]

DATA_SUFFIXES = (".npz", ".csv")
MODEL_SUFFIXES = (".joblib", ".pkl", ".pickle", ".cdsafe")

#: Networks ``certdistill certify`` also reads (no estimator: labels are output indices).
NETWORK_SUFFIXES = (".onnx",)
#: Suffix of models in the safe format (:mod:`certdistill.estimators.persistence`), which loads
# without
#: running code from the file.
SAFE_SUFFIX = ".cdsafe"
TABLE_SUFFIXES = (".csv", ".json", ".md")


@dataclass
class Dataset:
    """Labelled data read from a file.

    Attributes
    ----------
    X : ndarray of shape (n_samples, n_features)
        Features as float32 rows (images are flattened).
    y : ndarray of shape (n_samples,)
        Labels (integers, floats or strings as stored).
    sample_shape : tuple of int or None
        Shape of one sample when the file stores more than 2-D ``X`` (e.g. ``(1, 8, 8)``).
    path : Path
        The file read.
    """

    X: np.ndarray
    y: np.ndarray
    sample_shape: tuple[int, ...] | None
    path: Path


def _existing_file(path: str | Path, suffixes: tuple[str, ...], what: str) -> Path:
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise CLIError(
            f"{what} {str(path)!r}: unsupported extension {path.suffix or '(none)'!r}; "
            f"use {', '.join(suffixes)}"
        )
    if not path.exists():
        raise CLIError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise CLIError(f"{what} {str(path)!r} is not a file")
    return path


def load_data(
    path: str | Path, *, x_key: str = "X", y_key: str = "y", label_column: str = "label"
) -> Dataset:
    """Read labelled data from a ``.npz`` file (arrays ``x_key``, ``y_key``) or a ``.csv`` file.

    Parameters
    ----------
    path : str or Path
        The file; its extension selects the format.
    x_key, y_key : str, default="X", "y"
        Names of the feature and label arrays in a ``.npz`` file.
    label_column : str, default="label"
        Name of the label column of a ``.csv`` file (with a header row); every other column
        is a numeric feature.

    Returns
    -------
    Dataset

    Raises
    ------
    CLIError
        For a missing file, another extension, a missing array or column, non-numeric or
        non-finite features, or labels that do not match the rows.
    """
    path = _existing_file(path, DATA_SUFFIXES, "data file")
    if path.suffix.lower() == ".npz":
        X, y = _read_npz(path, x_key, y_key)
    else:
        X, y = _read_csv(path, label_column)
    return _checked(X, y, path)


def _read_npz(path: Path, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        # No pickles: a data file must not be able to run code.
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            missing = [k for k in (x_key, y_key) if k not in names]
            if missing:
                option = "--x-key" if missing[0] == x_key else "--y-key"
                raise CLIError(
                    f"{str(path)!r} has no array {missing[0]!r} (it has "
                    f"{', '.join(map(repr, names)) or 'none'}); choose it with {option}"
                )
            return archive[x_key], archive[y_key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise CLIError(f"cannot read {str(path)!r} as .npz: {error}") from None


def _parse_labels(values: list[str]) -> np.ndarray:
    """Labels as integers if they all are, else floats, else strings."""
    for kind in (int, float):
        try:
            return np.array([kind(v) for v in values])
        except ValueError:
            continue
    return np.array(values)


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise CLIError(f"cannot read {str(path)!r} as .csv: {error}") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise CLIError(f"{str(path)!r} is empty: expected a header row and data rows")
    header = [name.strip() for name in rows[0]]
    if label_column not in header:
        shown = ", ".join(map(repr, header[:10])) + (", ..." if len(header) > 10 else "")
        raise CLIError(
            f"{str(path)!r} has no column {label_column!r} (columns: {shown}); "
            "choose the label column with --label-column"
        )
    if len(rows) < 2:
        raise CLIError(f"{str(path)!r} has a header but no data rows")
    label_at = header.index(label_column)
    features = [i for i in range(len(header)) if i != label_at]
    if not features:
        raise CLIError(f"{str(path)!r} has no feature columns besides {label_column!r}")
    X = np.empty((len(rows) - 1, len(features)), dtype=np.float64)
    labels = []
    for r, row in enumerate(rows[1:]):
        line = r + 2  # 1-based, after the header
        if len(row) != len(header):
            raise CLIError(
                f"{str(path)!r} line {line}: {len(row)} fields, the header has {len(header)}"
            )
        labels.append(row[label_at].strip())
        for c, i in enumerate(features):
            try:
                X[r, c] = float(row[i]) if row[i].strip() else math.nan
            except ValueError:
                raise CLIError(
                    f"{str(path)!r} line {line}, column {header[i]!r}: {row[i]!r} is not a "
                    "number (every column but the label must be numeric)"
                ) from None
    return X, _parse_labels(labels)


def _checked(X, y, path: Path) -> Dataset:
    X, y = np.asarray(X), np.asarray(y)
    if X.dtype.kind not in "biuf":
        raise CLIError(f"X in {str(path)!r} must be numeric, got dtype {X.dtype}")
    if X.ndim < 2 or X.shape[0] == 0:
        raise CLIError(
            f"X in {str(path)!r} must have one row per sample (at least 2-D, not empty), "
            f"got shape {X.shape}"
        )
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise CLIError(
            f"the labels in {str(path)!r} must be one per sample ({X.shape[0]}), got shape "
            f"{y.shape}"
        )
    sample_shape = tuple(int(s) for s in X.shape[1:]) if X.ndim > 2 else None
    X = X.reshape(X.shape[0], -1).astype(np.float32)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise CLIError(
            f"X in {str(path)!r} has NaN or infinite values in {len(rows)} sample(s) "
            f"(first at index {rows[0]}); remove or impute them"
        )
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise CLIError(f"the labels in {str(path)!r} contain NaN or infinite values")
    return Dataset(X=X, y=y, sample_shape=sample_shape, path=path)


# -------------------------------------------------------------------------------- models
def load_model(path: str | Path, *, networks: bool = False):
    """Load a fitted certdistill estimator saved with joblib (or in the safe format: ``.cdsafe``).

    With ``networks``, an ``.onnx`` file is read too, as an :class:`OnnxModel`.

    joblib files are pickles: loading one can run code, so load only files you trust. ``.cdsafe``
    files (:func:`certdistill.save`) load without running code from the file.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    certdistill.estimators.base.CertifiedNetBase
        The fitted estimator.

    Raises
    ------
    CLIError
        For a missing or unreadable file, or one that does not hold a fitted certdistill model.
    """
    import joblib

    from certdistill.estimators.base import CertifiedNetBase

    if Path(path).suffix.lower() in NETWORK_SUFFIXES and networks:
        return OnnxModel(_existing_file(path, NETWORK_SUFFIXES, "model file"))
    path = _existing_file(path, MODEL_SUFFIXES, "model file")
    try:
        model = _load(path) if path.suffix.lower() == SAFE_SUFFIX else joblib.load(path)
    except Exception as error:  # noqa: BLE001 - unpickling raises anything; report it as one line
        raise CLIError(
            f"cannot read model {str(path)!r}: {type(error).__name__}: {error}"
        ) from None
    if not isinstance(model, CertifiedNetBase):
        raise CLIError(
            f"{str(path)!r} holds a {type(model).__name__}, not a certdistill model "
            "(save one with certdistill train or distill, or joblib.dump a fitted "
            "CertifiedTeacher or DistilledStudent)"
        )
    if not (getattr(model, "initialized_", False) and hasattr(model, "n_features_in_")):
        raise CLIError(f"the model in {str(path)!r} is not fitted")
    return model


class OnnxModel:
    """An ONNX network read for ``certdistill certify``: what the command asks of an estimator.

    Classes are the network's output indices (the labels must be ``0 .. n_outputs - 1``, or the
    ``classes_`` a certdistill export stored in the file); rows are reshaped to the network's
    sample shape. ``eps``, ``lower`` and ``upper`` come from the file's certdistill metadata
    when it has them (files written by ``certdistill export``), else ``eps`` must be given.
    """

    def __init__(self, path: Path):
        import json

        import onnx

        from certdistill.io.onnx_import import load_onnx

        self.path = path
        self.module_ = load_onnx(path)
        metadata = {
            p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
        }

        def meta(key, default=None):
            value = metadata.get(f"certdistill.{key}")
            return default if value is None else json.loads(value)

        self.input_shape = self.module_.input_shape
        self.n_features_in_ = int(np.prod(self.input_shape))
        if meta("input_shape") is not None and meta("n_features_in") is not None:
            # An exported estimator: flat rows, reshaped inside the file.
            self.n_features_in_ = int(meta("n_features_in"))
        probe = self._logits(np.zeros((1, self.n_features_in_)))
        self.classes_ = np.asarray(meta("classes", list(range(probe.shape[1]))))
        self.eps, self.lower, self.upper = meta("eps"), meta("lower"), meta("upper")

    def _inputs(self, X) -> np.ndarray:
        return np.asarray(X, dtype=np.float64).reshape(len(X), *self.input_shape)

    def _logits(self, X) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.as_tensor(self._inputs(X), dtype=torch.float32)
            return self.module_(x).numpy()

    def predict(self, X) -> np.ndarray:
        return self.classes_[self._logits(X).argmax(1)]

    def _labels(self, y):
        from certdistill.cli._evaluate import encode_labels

        return None if y is None else encode_labels(self, y)

    def certify(self, X, *, eps, y=None, **options):
        from certdistill.certification.certify import certify

        return certify(
            self.module_,
            self._inputs(X),
            eps,
            y=self._labels(y),
            lower=self.lower,
            upper=self.upper,
            **options,
        )

    def certified_radius(self, X, *, y=None, **options):
        from certdistill.certification.certify import certified_radius

        return certified_radius(
            self.module_,
            self._inputs(X),
            y=self._labels(y),
            lower=self.lower,
            upper=self.upper,
            **options,
        )


def _load(path: Path):
    from certdistill.estimators.persistence import load

    return load(path)


def save_model(model, path: Path) -> None:
    """Save ``model`` (joblib, or the safe format for ``.cdsafe``), creating the folder if
    needed.

    Raises
    ------
    CLIError
        If the model holds something the safe format cannot store.
    """
    import joblib

    from certdistill.estimators.persistence import SafeFormatError, save

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() != SAFE_SUFFIX:
        joblib.dump(model, path)
        return
    try:
        save(model, path)
    except SafeFormatError as error:
        raise CLIError(f"cannot save {str(path)!r} in the safe format: {error}") from None


def check_features(model, data: Dataset, model_path) -> None:
    """Raise a :class:`CLIError` if ``data`` does not have the model's number of features."""
    expected = int(model.n_features_in_)
    if data.X.shape[1] != expected:
        raise CLIError(
            f"{str(data.path)!r} has {data.X.shape[1]} features per sample, but the model "
            f"{str(model_path)!r} was trained on {expected}"
        )


# -------------------------------------------------------------------------------- tables
def _plain(value):
    """A JSON/CSV friendly Python value (numpy scalars become Python numbers, NaN None)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def markdown_table(rows: Sequence[Mapping], columns: Mapping[str, tuple[str, str]]) -> str:
    """A markdown table of ``rows``.

    Parameters
    ----------
    rows : sequence of mapping
        One mapping per row.
    columns : mapping of str to (str, str)
        For each key to show, its header and a format spec (``"{:.1%}"``, ``"{:,}"``, ``"{}"``).

    Returns
    -------
    str
    """
    lines = [
        "| " + " | ".join(header for header, _ in columns.values()) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = []
        for key, (_, spec) in columns.items():
            value = row.get(key)
            cells.append("n/a" if value is None else spec.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(
    rows: Sequence[Mapping], path: Path, columns: Mapping[str, tuple[str, str]] | None = None
) -> None:
    """Write ``rows`` to ``path`` as CSV, JSON (a list of records) or markdown, by extension.

    ``columns`` (as in :func:`markdown_table`) is needed for markdown only.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".json":
        write_json([{k: _plain(v) for k, v in row.items()} for row in rows], path)
    elif suffix == ".md":
        if columns is None:
            columns = {key: (key, "{}") for key in rows[0]} if rows else {}
        path.write_text(markdown_table(rows, columns) + "\n", encoding="utf-8")
    else:
        keys = list(rows[0]) if rows else []
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows({k: _plain(row.get(k)) for k in keys} for row in rows)


def write_json(data, path: Path) -> None:
    """Write ``data`` as indented JSON (numpy values converted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=_plain)
        handle.write("\n")
