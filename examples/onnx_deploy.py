"""Deploy a certified model as ONNX, certify the file, and verify a VNN-LIB property of it.

A ``CertifiedTeacher`` is trained on digits and written with ``certdistill.export_onnx``; the
script checks that onnxruntime computes the estimator's probabilities, that certifying the file
(``certdistill.certify`` takes its path) gives the estimator's certificates, and then writes a
VNN-LIB robustness property for one test image and decides it with
``certdistill.certification.vnncomp.verify`` (what ``certdistill verify`` runs), as VNN-COMP tools
do.
About 20 s on one CPU core.

Run: python examples/onnx_deploy.py [--epochs 20]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import certdistill
from certdistill import CertifiedTeacher
from certdistill.certification.vnncomp import verify

EPS = 0.1


def robustness_property(x: np.ndarray, label: int, eps: float, n_classes: int) -> str:
    """VNN-LIB text: an input in the box around ``x`` where another class scores as high."""
    lines = [f"(declare-const X_{i} Real)" for i in range(x.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_classes)]
    for i, value in enumerate(x.ravel().tolist()):
        lines.append(f"(assert (>= X_{i} {max(0.0, value - eps)!r}))")
        lines.append(f"(assert (<= X_{i} {min(1.0, value + eps)!r}))")
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(n_classes) if j != label)
    lines.append(f"(assert (or {others}))")
    return "\n".join(lines) + "\n"


def main(epochs: int) -> None:
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        (X / 16.0).astype(np.float32), y, test_size=0.3, stratify=y, random_state=0
    )
    model = CertifiedTeacher(eps=EPS, lower=0.0, upper=1.0, max_epochs=epochs, random_state=0).fit(
        X_train, y_train
    )

    folder = Path(tempfile.mkdtemp())
    path = certdistill.export_onnx(model, folder / "model.onnx")

    # 1. The file computes what the estimator computes.
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, proba = session.run(None, {"input": X_test})
    gap = np.abs(proba - model.predict_proba(X_test)).max()
    print(f"onnxruntime vs predict_proba: largest difference {gap:.1e}")

    # 2. The certificate holds for the deployed artifact.
    by_file = certdistill.certify(
        str(path), X_test, EPS, y=y_test, lower=0.0, upper=1.0, method="crown"
    )
    by_model = model.certify(X_test, eps=EPS, y=y_test, method="crown")
    same = np.array_equal(by_file.certified, by_model.certified)
    print(
        f"certified accuracy at eps {EPS}: file {by_file.certified_fraction:.1%}, estimator "
        f"{by_model.certified_fraction:.1%} (same samples: {same})"
    )

    # 3. A VNN-LIB property of the file, decided as a VNN-COMP tool would.
    label = int(model.predict(X_test[:1])[0])
    prop = folder / "robustness.vnnlib"
    prop.write_text(robustness_property(X_test[0], label, EPS, len(model.classes_)))
    outcome = verify(path, prop, timeout=30)
    print(
        f"VNN-LIB property of test image 0 (class {label}, eps {EPS}): {outcome.result} in "
        f"{outcome.seconds:.2f} s"
    )
    print(outcome.results_text().splitlines()[0])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    main(parser.parse_args().epochs)
