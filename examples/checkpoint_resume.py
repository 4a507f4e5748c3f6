"""Checkpoint a fit, interrupt it, and resume it from the checkpoint in a new estimator.

A ``CertifiedTeacher`` trains on digits with skorch's ``Checkpoint`` callback, which saves the
weights, the optimiser state and the history after every epoch. Halfway, training is interrupted
as Ctrl-C would interrupt it (a callback raises ``KeyboardInterrupt``): skorch ends the fit, and
the estimator keeps the weights it reached, ready to predict and certify. A new estimator, as a
new Python process would create it, then loads the checkpoint with ``LoadInitState`` and trains
the remaining epochs with ``partial_fit(epochs=...)``: the eps ramp, the kappa schedule and the
learning-rate decay carry on from the steps recorded in the history (about 15 s on one CPU core).

Run: python examples/checkpoint_resume.py [--epochs 12]
"""

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from skorch.callbacks import Callback, Checkpoint, LoadInitState

from certdistill import CertifiedTeacher

EPS = 0.1
SEED = 0


class InterruptAt(Callback):
    """Raise KeyboardInterrupt at the start of epoch ``epoch`` (1-based), as Ctrl-C would."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_begin(self, net, **kwargs):
        if len(net.history) == self.epoch:
            raise KeyboardInterrupt


def report(what: str, model, X_test, y_test) -> None:
    completed = [row for row in model.history if "train_loss" in row]
    certified = model.certified_accuracy(X_test, y_test, eps=EPS, method="crown")
    print(
        f"{what:34s} epochs {len(completed):2d}, eps {completed[-1]['eps']:.3f}: "
        f"accuracy {100 * model.score(X_test, y_test):5.1f} %, "
        f"certified {100 * certified:5.1f} %"
    )


def main(epochs: int = 12) -> None:
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(
        X, digits.target, test_size=0.3, stratify=digits.target, random_state=SEED
    )
    params = dict(
        eps=EPS,
        method="ibp",
        lower=0.0,
        upper=1.0,
        module__hidden_sizes=(128,),
        max_epochs=epochs,
        random_state=SEED,
    )

    with tempfile.TemporaryDirectory() as tmp:
        # Saved after every epoch (monitor=None): weights, optimiser state and history.
        checkpoint = Checkpoint(dirname=str(Path(tmp) / "checkpoint"), monitor=None)
        stop = max(2, epochs // 2)
        teacher = CertifiedTeacher(
            **params, callbacks=[("checkpoint", checkpoint), ("interrupt", InterruptAt(stop))]
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            teacher.fit(X_train, y_train)
        print(f"fit interrupted: {caught[-1].message}")
        report("interrupted model (usable as is)", teacher, X_test, y_test)

        # A new estimator, as a new process would build it, resumes from the checkpoint: the
        # first partial_fit loads it (LoadInitState) and trains the epochs that are left.
        with open(Path(checkpoint.dirname) / "history.json") as handle:
            done = len(json.load(handle))
        resumed = CertifiedTeacher(**params, callbacks=[("resume", LoadInitState(checkpoint))])
        resumed.partial_fit(X_train, y_train, epochs=epochs - done)
        report(f"resumed after {done} epochs", resumed, X_test, y_test)

    uninterrupted = CertifiedTeacher(**params).fit(X_train, y_train)
    report("uninterrupted run, for comparison", uninterrupted, X_test, y_test)
    # Same schedules: the resumed run ends at the final eps and learning rate of a full run.
    for key in ("eps", "kappa", "lr"):
        if not np.isclose(resumed.history[-1, key], uninterrupted.history[-1, key]):
            raise SystemExit(f"the resumed run ends with another {key} than a full run")
    print("schedules at the end of the resumed run equal those of the uninterrupted run")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12, help="training epochs in all")
    main(parser.parse_args().epochs)
