"""Save a fitted model (joblib and the safe format), load it in a fresh Python process, move it
between devices.

A ``DistilledStudent`` (with the ``CertifiedTeacher`` it learnt from) is trained on digits and
saved twice: with ``joblib.dump`` and with ``certdistill.save``, the safe single-file format. A
new Python interpreter, which shares nothing with this one but the file, loads each and computes
predictions and certificates of the test set; the script checks that they are identical to those
of the original model. It then shows how to choose the device a saved model is loaded on (about
25 s on one CPU core).

Only load joblib files you trust: unpickling can run arbitrary code. ``certdistill.load`` runs
no code from the file.

Run: python examples/persistence.py [--epochs 30]
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import joblib
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import certdistill
from certdistill import CertifiedTeacher, DistilledStudent

EPS = 0.1
SEED = 0

# Runs in a separate interpreter: nothing of this process (imports, random state, the model
# object) can leak into it, so agreement shows that the file alone is enough.
LOAD_AND_CERTIFY = """
import sys
import numpy as np

if sys.argv[1].endswith(".cdsafe"):
    import certdistill

    model = certdistill.load(sys.argv[1])  # safe format: no code from the file runs
else:
    import joblib

    model = joblib.load(sys.argv[1])  # a pickle: trusted files only
test = np.load(sys.argv[2])
X_test, y_test = test["X"], test["y"]
cert = model.certify(X_test, eps=0.1, method="crown", y=y_test)
np.savez(sys.argv[3], prediction=model.predict(X_test), proba=model.predict_proba(X_test),
         margins=cert.margins, certified=cert.certified)
print(f"fresh process: loaded {type(model).__name__} from {sys.argv[1].rsplit('/', 1)[-1]}, "
      f"certified accuracy {100 * cert.certified_fraction:.1f} %")
"""


def check_in_fresh_process(student, path: Path, folder: Path, X_test, cert) -> None:
    """Load ``path`` in a new interpreter and check that it computes what ``student`` does."""
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_AND_CERTIFY,
            str(path),
            str(folder / "test.npz"),
            str(folder / "out.npz"),
        ],
        capture_output=True,
        text=True,
    )
    if fresh.returncode != 0:
        raise SystemExit(f"loading in a fresh process failed:\n{fresh.stderr}")
    print(fresh.stdout.strip())
    reloaded = np.load(folder / "out.npz")
    # Same weights, same operations, same inputs: the results agree bit for bit.
    same = {
        "predictions": np.array_equal(reloaded["prediction"], student.predict(X_test)),
        "probabilities": np.array_equal(reloaded["proba"], student.predict_proba(X_test)),
        "margin bounds": np.array_equal(reloaded["margins"], cert.margins),
        "certificates": np.array_equal(reloaded["certified"], cert.certified),
    }
    for what, equal in same.items():
        print(f"  {what:14s} identical: {equal}")
    if not all(same.values()):
        raise SystemExit(f"the model reloaded from {path.name} differs from the original")


def main(epochs: int = 30) -> None:
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(
        X, digits.target, test_size=0.3, stratify=digits.target, random_state=SEED
    )
    teacher = CertifiedTeacher(
        eps=EPS,
        method="ibp",
        lower=0.0,
        upper=1.0,
        module__hidden_sizes=(256,),
        max_epochs=epochs,
        random_state=SEED,
    )
    student = DistilledStudent(
        teacher.fit(X_train, y_train),
        module__hidden_sizes=(32,),
        eps=EPS,
        lower=0.0,
        upper=1.0,
        max_epochs=epochs,
        random_state=SEED,
    ).fit(X_train, y_train)
    cert = student.certify(X_test, eps=EPS, method="crown", y=y_test)
    print(
        f"trained student: accuracy {100 * student.score(X_test, y_test):.1f} %, "
        f"certified accuracy {100 * cert.certified_fraction:.1f} %"
    )

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.savez(folder / "test.npz", X=X_test, y=y_test)
        path = folder / "student.joblib"
        # The student keeps its fitted teacher (teacher_): one file holds both networks.
        joblib.dump(student, path)
        safe_path = certdistill.save(student, folder / "student.cdsafe")
        for saved in (path, safe_path):
            print(f"saved to {saved.name} ({saved.stat().st_size / 1024:.0f} KiB)")
            check_in_fresh_process(student, saved, folder, X_test, cert)

        # skorch loads the weights onto the device the model was saved with (falling back to
        # the CPU, with a warning, where CUDA is missing). Setting the device before saving thus
        # picks where the file loads: device="cpu" for CPU-only servers, "cuda" to deploy on a
        # GPU. set_params(device=...) also moves the fitted network in memory.
        expected = student.predict(X_test)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        student.set_params(device=device)
        joblib.dump(student, path)
        deployed = joblib.load(path)
        where = next(deployed.module_.parameters()).device
        # On another device, rounding may differ slightly: count agreements, not bit equality.
        agree = np.mean(deployed.predict(X_test) == expected)
        print(
            f"saved with device={device!r}: loaded onto {where}, "
            f"predictions as before for {100 * agree:.1f} % of the test set"
        )
        # The safe format takes the device when loading (default: the saved one, or the CPU
        # with a warning where CUDA is missing).
        served = certdistill.load(safe_path, device=device)
        print(
            f"safe format loaded with device={device!r}: "
            f"on {next(served.module_.parameters()).device}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=30, help="training epochs of the teacher and of the student"
    )
    main(parser.parse_args().epochs)
