"""Save and load fitted estimators in a safe single-file format that loads without unpickling code.

:func:`save` writes one file holding a JSON description of the estimator (its class, parameters,
classes, number of features, training history, and each network as a list of supported layers
with their constructor arguments) and the networks' weights, written by :func:`torch.save` and
read back with ``torch.load(..., weights_only=True)``. :func:`load` rebuilds the estimator from
fixed tables of classes and layers: nothing in the file is executed. A SHA-256 digest of the
content, checked before anything is parsed, turns a truncated or corrupted file into a clear
``ValueError``.

Use joblib (``joblib.dump``/``joblib.load``) for an exact copy of any estimator (custom layers,
callbacks, optimiser state), from files you trust; use this format for files from elsewhere and
for deployment. See the "Save, load and deploy" tutorial.

File layout::

    certdistill-safe\\n
    {"format_version": 1, "config_bytes": n, "weights_bytes": m, "sha256": "<hex>"}\\n
    <n bytes: the JSON document, UTF-8><m bytes: torch.save of a dict of tensors>

The digest covers the two blocks. It detects accidental damage, not a deliberate forgery (whoever
edits the file can recompute it); loading stays safe either way, since the content is data only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from certdistill._version import __version__
from certdistill.estimators._safe_config import from_config, to_config
from certdistill.exceptions import SafeFormatError

__all__ = ["FORMAT_VERSION", "SafeFormatError", "load", "save"]

MAGIC = b"certdistill-safe\n"
#: Version of the file layout written by :func:`save`.
FORMAT_VERSION = 1
_MAX_HEADER = 4096


def save(estimator, path) -> Path:
    """Save an estimator in the safe format (one file, loads without running code).

    Parameters
    ----------
    estimator : CertifiedTeacher or DistilledStudent
        Fitted or not. A student is saved with its teacher (``teacher`` and the fitted
        ``teacher_``, stored once when they are the same object), so the loaded student predicts,
        certifies and can be refitted.
    path : str or path-like
        File to write. It is written to a temporary file first and renamed, so an interrupted
        save never leaves a partial file under ``path``.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    SafeFormatError
        (a ``ValueError``) If the estimator holds something the format cannot store: a layer
        outside the supported list (Linear, Conv2d, ReLU, Flatten, Unflatten, BatchNorm1d/2d,
        AvgPool2d, Identity, Dropout, nested Sequential; exact types), a parameter that is not
        JSON data or a known class (custom criterion, callbacks objects, a ``RandomState``, a
        ``module`` given as a class or function), or an estimator class other than
        ``CertifiedTeacher`` and ``DistilledStudent``. Use joblib for those.

    Notes
    -----
    Not stored: the optimiser state (a loaded estimator predicts, certifies and fits from scratch;
    to resume training use skorch's ``save_params``/``load_params`` or ``Checkpoint``) and the
    caches dropped after ``fit``.
    """
    config, tensors = to_config(estimator)
    document = {"certdistill_version": __version__, "torch_version": torch.__version__, **config}
    config_bytes = json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    weights = buffer.getvalue()
    header = {
        "format_version": FORMAT_VERSION,
        "config_bytes": len(config_bytes),
        "weights_bytes": len(weights),
        "sha256": hashlib.sha256(config_bytes + weights).hexdigest(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(MAGIC)
            out.write(json.dumps(header, sort_keys=True).encode("ascii") + b"\n")
            out.write(config_bytes)
            out.write(weights)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path, *, device: str | None = None):
    """Load an estimator saved by :func:`save`, without unpickling any code.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save`.
    device : str or None, default=None
        Device of the loaded networks (and the estimators' ``device`` parameter). ``None`` keeps
        the saved device, falling back to the CPU with a warning where CUDA is not available.

    Returns
    -------
    CertifiedTeacher or DistilledStudent
        Predicts, gives probabilities, certificates and scores exactly as the saved estimator
        did (same weights, same operations).

    Raises
    ------
    ValueError
        If the file is not in this format, is truncated, has been altered (digest mismatch), was
        written by a newer format version, or describes something this version cannot build.

    Warns
    -----
    UserWarning
        If the file was written by another version of certdistill.
    """
    path = Path(path)
    data = path.read_bytes()
    header, config_bytes, weights = _split(data, path)
    try:
        document = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{str(path)!r}: the model description is not valid JSON: {error}"
        ) from None
    if not isinstance(document, dict):
        raise ValueError(f"{str(path)!r}: the model description is not a JSON object")
    saved_version = document.get("certdistill_version")
    if saved_version != __version__:
        warnings.warn(
            f"{str(path)!r} was saved with certdistill {saved_version}, this is certdistill "
            f"{__version__}: check the loaded model's predictions and certificates.",
            UserWarning,
            stacklevel=2,
        )
    try:
        tensors = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - the unpickler raises many types; report one
        raise ValueError(
            f"{str(path)!r}: cannot read the weights: {type(error).__name__}: {error}"
        ) from None
    if not (
        isinstance(tensors, dict)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())
    ):
        raise ValueError(f"{str(path)!r}: the weights are not a dict of named tensors")
    try:
        return from_config(document, tensors, device=device)
    except ValueError as error:
        raise ValueError(f"{str(path)!r}: {error}") from None


def _split(data: bytes, path: Path) -> tuple[dict, bytes, bytes]:
    """Check the magic, header, size and digest; return the header and the two blocks."""
    name = str(path)
    if not data.startswith(MAGIC):
        raise ValueError(
            f"{name!r} is not a certdistill safe file (it does not start with {MAGIC!r}); a "
            "joblib file is loaded with joblib.load (trusted files only)."
        )
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER)
    if end < 0:
        raise ValueError(f"{name!r}: truncated or corrupted file (no complete header)")
    try:
        header = json.loads(data[len(MAGIC) : end].decode("ascii"))
        version = int(header["format_version"])
        n_config, n_weights = int(header["config_bytes"]), int(header["weights_bytes"])
        digest = str(header["sha256"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ValueError(f"{name!r}: corrupted file (unreadable header)") from None
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{name!r} has format version {version}; this certdistill reads up to "
            f"{FORMAT_VERSION}: upgrade certdistill."
        )
    body = data[end + 1 :]
    expected = n_config + n_weights
    if n_config < 0 or n_weights < 0 or len(body) < expected:
        raise ValueError(
            f"{name!r} is truncated: {len(body)} bytes of content, {expected} expected"
        )
    if len(body) > expected:
        raise ValueError(
            f"{name!r} is corrupted: {len(body) - expected} unexpected bytes after the content"
        )
    if hashlib.sha256(body).hexdigest() != digest:
        raise ValueError(
            f"{name!r} is corrupted or was altered: its SHA-256 digest does not match the content"
        )
    return header, body[:n_config], body[n_config:]
