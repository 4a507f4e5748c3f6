"""Grid search over a student's hyperparameters, selected by certified accuracy.

A ``CertifiedTeacher`` is trained once on digits (pixels scaled to [0, 1]). ``GridSearchCV``
then tunes a ``DistilledStudent``'s training radius (``eps``) and distillation ``temperature``
with 3-fold cross-validation, scoring each candidate by its clean accuracy and by its certified
accuracy at eps = 0.1 (``CertifiedAccuracy``), and refits the candidate with the best certified
accuracy. The teacher is wrapped in ``sklearn.frozen.FrozenEstimator``: ``GridSearchCV`` clones
the student for every fit, and cloning leaves a frozen estimator as it is, so every student
distils from the same fitted teacher instead of training a teacher of its own. The script
prints the ``cv_results_`` table, checks that the teacher was not retrained and reports the
refitted student's test scores (under a minute on one CPU core).

Run: python examples/grid_search.py [--epochs 30]
"""

import argparse
import time

import numpy as np
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split

from certdistill import CertifiedAccuracy, CertifiedTeacher, DistilledStudent

EPS = 0.1
SEED = 0


def _mean_std(results: dict, metric: str, i: int) -> str:
    mean, std = results[f"mean_test_{metric}"][i], results[f"std_test_{metric}"][i]
    return f"{100 * mean:6.1f} ± {100 * std:4.1f} %"


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
    start = time.perf_counter()
    teacher.fit(X_train, y_train)
    print(f"teacher trained once, in {time.perf_counter() - start:.1f} s")
    epochs_trained = len(teacher.history_)

    # The temperature softens how the default "selective" loss picks the samples on which the
    # student trains for robustness (those the teacher certifies).
    student = DistilledStudent(
        FrozenEstimator(teacher),
        module__hidden_sizes=(32,),
        lower=0.0,
        upper=1.0,
        max_epochs=epochs,
        random_state=SEED,
    )
    # The candidates differ in the radius they are trained at, but all are scored at the same
    # radius EPS: the question is which training radius certifies best at the radius we report.
    search = GridSearchCV(
        student,
        {"eps": [0.1, 0.15], "temperature": [1.0, 4.0]},
        scoring={"accuracy": "accuracy", "certified": CertifiedAccuracy(EPS, method="ibp")},
        refit="certified",
        cv=StratifiedKFold(3, shuffle=True, random_state=SEED),
    )
    start = time.perf_counter()
    search.fit(X_train, y_train)
    n_fits = 3 * len(search.cv_results_["params"]) + 1
    print(f"grid search: {n_fits} student fits in {time.perf_counter() - start:.1f} s\n")

    results = search.cv_results_
    print(f"{'eps':>5s} {'T':>4s} {'accuracy':>15s} {'certified acc.':>15s} {'rank':>5s}")
    for i, params in enumerate(results["params"]):
        accuracy = _mean_std(results, "accuracy", i)
        certified = _mean_std(results, "certified", i)
        rank = results["rank_test_certified"][i]
        print(f"{params['eps']:5.2f} {params['temperature']:4.1f} {accuracy} {certified} {rank:5d}")

    best = search.best_estimator_
    # clone() returns a FrozenEstimator itself, so every candidate of the search shares the one
    # fitted teacher. Passed unfrozen, the fitted teacher would be cloned into an unfitted copy,
    # which each of the student fits would train again.
    print(
        f"\nteacher trained once: clones of the student share it: "
        f"{clone(student).teacher is student.teacher}; the refitted student uses it: "
        f"{best.teacher_ is teacher}; its epochs: {len(teacher.history_)} (was {epochs_trained})"
    )
    print(f"best parameters: {search.best_params_}")
    certified = CertifiedAccuracy(EPS, method="ibp")(best, X_test, y_test)
    print(
        f"refitted student on the test set: accuracy {100 * best.score(X_test, y_test):.1f} %, "
        f"certified accuracy at eps = {EPS}: {100 * certified:.1f} %"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=30, help="training epochs of the teacher and of each student"
    )
    main(parser.parse_args().epochs)
