"""Grid search on a dask.distributed cluster, with the results of a sequential search.

A ``CertifiedTeacher`` is trained once on digits and frozen; ``GridSearchCV`` tunes a
``DistilledStudent`` (training radius and distillation weight, 3-fold cross-validation, refit by
certified accuracy at eps = 0.1). The same search runs twice: sequentially (``n_jobs=1``), then
on a local dask cluster of worker processes with one thread each, through joblib's dask backend.
The script prints both durations, checks that the two searches found the same scores and the
same best parameters, and prints the table of the search (about three minutes on 2 CPU cores).

Needs dask.distributed: pip install "certdistill[dask]".

Run: python examples/dask_grid_search.py [--epochs 30] [--workers 2]
"""

import argparse
import logging
import time

import joblib
import numpy as np
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split

from certdistill import CertifiedAccuracy, CertifiedTeacher, DistilledStudent

try:
    import dask
    from distributed import Client, LocalCluster
except ImportError:
    raise SystemExit('needs dask.distributed: pip install "certdistill[dask]"') from None

EPS = 0.1
SEED = 0


def import_libraries() -> None:
    import certdistill  # noqa: F401 - torch, skorch and scikit-learn come with it


def timed_fit(search, X, y) -> float:
    start = time.perf_counter()
    search.fit(X, y)
    return time.perf_counter() - start


def main(epochs: int = 30, workers: int = 2) -> None:
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
    ).fit(X_train, y_train)

    # Each worker receives its own pickled copy of the student, frozen teacher included: the
    # teacher is trained once, here, and never again on the workers.
    student = DistilledStudent(
        FrozenEstimator(teacher),
        module__hidden_sizes=(32,),
        lower=0.0,
        upper=1.0,
        max_epochs=epochs,
        random_state=SEED,
    )
    search = GridSearchCV(
        student,
        {"eps": [0.1, 0.15], "distill_weight": [0.5, 1.0]},
        scoring={"accuracy": "accuracy", "certified": CertifiedAccuracy(EPS, method="ibp")},
        refit="certified",
        cv=StratifiedKFold(3, shuffle=True, random_state=SEED),
    )
    n_fits = 3 * 4 + 1

    sequential = clone(search).set_params(n_jobs=1)
    print(f"sequential, n_jobs=1: {n_fits} fits in {timed_fit(sequential, X_train, y_train):.1f} s")

    start = time.perf_counter()
    # silence_logs: a worker that imported torch can take more than the nanny's 4 s to exit on a
    # loaded machine, and the nanny's warning that it then kills it is only noise here. dask's
    # nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which slows torch on the CPU (see
    # docs/scaling-out.md); unset it for them.
    with (
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}),
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        # Import the libraries on the workers now, so that the timing below is the search's.
        client.run(import_libraries)
        threads = sorted(client.run(torch.get_num_threads).values())
        print(
            f"dask cluster started in {time.perf_counter() - start:.1f} s; torch threads of "
            f"its worker processes: {threads}"
        )
        on_dask = clone(search).set_params(n_jobs=-1)
        with joblib.parallel_backend("dask"):
            seconds = timed_fit(on_dask, X_train, y_train)
    print(
        f"dask, n_jobs=-1 on {workers} x 1 thread: {n_fits} fits in {seconds:.1f} s (the "
        f"cross-validation on the workers, then the refit here)"
    )

    same = on_dask.best_params_ == sequential.best_params_ and all(
        np.array_equal(on_dask.cv_results_[key], sequential.cv_results_[key])
        for key in sequential.cv_results_
        if key.startswith(("split", "mean_test", "rank_test"))
    )
    print(f"same scores and best parameters as the sequential search: {same}\n")

    results = on_dask.cv_results_
    print(f"{'eps':>5s} {'weight':>6s} {'accuracy':>9s} {'certified':>9s} {'rank':>5s}")
    for i, params in enumerate(results["params"]):
        print(
            f"{params['eps']:5.2f} {params['distill_weight']:6.1f} "
            f"{100 * results['mean_test_accuracy'][i]:8.1f}% "
            f"{100 * results['mean_test_certified'][i]:8.1f}% "
            f"{results['rank_test_certified'][i]:5d}"
        )
    best = on_dask.best_estimator_
    certified = CertifiedAccuracy(EPS, method="ibp")(best, X_test, y_test)
    print(
        f"\nbest parameters: {on_dask.best_params_}; test accuracy "
        f"{100 * best.score(X_test, y_test):.1f} %, certified {100 * certified:.1f} %"
    )


# The guard is required: dask starts its worker processes with "spawn", which imports this
# script again in each of them.
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=30, help="training epochs of the teacher and of each student"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="dask worker processes, of one thread each (with a single worker "
        "thread in all, joblib runs the search in this process)",
    )
    args = parser.parse_args()
    main(args.epochs, args.workers)
