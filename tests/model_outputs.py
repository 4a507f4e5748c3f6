"""What a fitted model computes, gathered for bit-for-bit comparisons across processes.

Run as a script (``python tests/model_outputs.py MODEL DATA.npz OUT.npz {safe,joblib}``) it
loads a saved model in a fresh interpreter, which shares nothing with the caller but the files,
and writes :func:`model_outputs` of the data to ``OUT.npz``.
"""

from __future__ import annotations

import sys

import numpy as np


def model_outputs(model, X, y) -> dict[str, np.ndarray]:
    """Predictions, probabilities, score, certificates and radii of ``model`` (and its teacher)."""
    results = {
        "predict": model.predict(X),
        "proba": model.predict_proba(X),
        "score": np.array(model.score(X, y)),
    }
    for method in ("ibp", "crown"):
        cert = model.certify(X, method=method, y=y)
        results[f"margins_{method}"] = cert.margins
        results[f"certified_{method}"] = cert.certified
    results["radius"] = model.certified_radius(X[:8], y=y[:8], method="ibp", max_eps=0.3)
    teacher = getattr(model, "teacher_", None)
    if teacher is not None:
        results["teacher_proba"] = teacher.predict_proba(X)
        results["teacher_margins"] = teacher.certify(X, method="crown").margins
    return results


def main(path: str, data: str, out: str, fmt: str) -> None:
    if fmt == "safe":
        import certdistill

        model = certdistill.load(path)
    else:
        import joblib

        model = joblib.load(path)
    test = np.load(data, allow_pickle=False)
    np.savez(out, **model_outputs(model, test["X"], test["y"]))


if __name__ == "__main__":
    main(*sys.argv[1:])
