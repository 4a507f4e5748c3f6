"""Searches on a dask.distributed cluster: the estimators travel to the workers, each fit runs
with one torch thread, and the results are those of the same search with ``n_jobs=1``."""

from __future__ import annotations

import logging
import os

import joblib
import numpy as np
import pytest
import torch
from scipy.stats import uniform
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, RandomizedSearchCV, StratifiedKFold
from skorch.callbacks import Callback

from certdistill import CertifiedAccuracy, CertifiedTeacher, DistilledStudent

distributed = pytest.importorskip(
    "distributed", reason="needs dask.distributed (pip install 'certdistill[dask]')"
)
psutil = pytest.importorskip("psutil")  # a dependency of distributed

pytestmark = pytest.mark.timeout(300)  # a stuck cluster fails the test instead of hanging CI

EPS = 0.05
SEED = 0
# Tiny networks and few epochs: a fit takes a fraction of a second, the test seconds.
TINY = dict(
    module__hidden_sizes=(16,), max_epochs=3, batch_size=64, lower=0.0, upper=1.0, random_state=SEED
)


class _RecordThreads(Callback):
    """Record torch's number of threads and the process of each epoch of a fit."""

    def on_epoch_end(self, net, **kwargs):
        net.history.record("torch_threads", torch.get_num_threads())
        net.history.record("pid", os.getpid())


def _fit_threads(estimator, X, y) -> float:
    """Scorer: torch threads in the last epoch of the fit."""
    return float(estimator.history_[-1, "torch_threads"])


def _fit_pid(estimator, X, y) -> float:
    """Scorer: the process that fitted the estimator."""
    return float(estimator.history_[-1, "pid"])


def _predict_and_certify(estimator, X):
    return estimator.predict(X), estimator.certify(X, method="ibp").margins


def _fit(estimator, X, y):
    return estimator.fit(X, y)


def _fit_and_threads_after(estimator, X, y):
    estimator.fit(X, y)
    return estimator.history_[:, "torch_threads"], torch.get_num_threads()


@pytest.fixture(scope="module")
def data():
    X, y = load_digits(return_X_y=True)
    return (X[:300] / 16.0).astype(np.float32), y[:300]


@pytest.fixture(scope="module")
def teacher(data):
    return CertifiedTeacher(eps=EPS, method="ibp", **TINY).fit(*data)


@pytest.fixture(scope="module")
def client():
    """A real cluster: 2 worker processes of 1 thread each, closed with every process it
    started, and the environment of this process restored."""
    from distributed import Client, LocalCluster

    # The nanny writes dask's worker variables (OMP_NUM_THREADS=1, ...) into this process's
    # environment before it spawns a worker; later tests must not inherit them.
    environ = os.environ.copy()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        with (
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
    finally:
        os.environ.clear()
        os.environ.update(environ)
    # multiprocessing's resource tracker lives as long as this process: it is not a leak.
    left = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and "resource_tracker" not in " ".join(_cmdline(p))
    ]
    _, alive = psutil.wait_procs(left, timeout=10)
    assert not alive, f"the cluster left processes behind: {alive}"


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # it ended meanwhile
        return []


def _searches(teacher):
    """The three searches by name; each is fitted once with ``n_jobs=1``, once on dask."""
    scoring = {
        "certified": CertifiedAccuracy(EPS, method="ibp"),
        "accuracy": "accuracy",
        "threads": _fit_threads,
        "pid": _fit_pid,
    }
    callbacks = [("threads", _RecordThreads())]
    cv = StratifiedKFold(2, shuffle=True, random_state=SEED)
    return {
        "teacher-grid": GridSearchCV(
            CertifiedTeacher(eps=EPS, method="ibp", callbacks=callbacks, **TINY),
            {"lr": [1e-3, 1e-2], "eps_train_ratio": [1.0, 1.5]},
            scoring=scoring,
            refit="certified",
            cv=cv,
        ),
        "student-frozen-teacher-grid": GridSearchCV(
            DistilledStudent(FrozenEstimator(teacher), eps=EPS, callbacks=callbacks, **TINY),
            {"loss": ["selective", "baseline"], "distill_weight": [0.3, 1.0]},
            scoring=scoring,
            refit="certified",
            cv=cv,
        ),
        # Every fit trains its own teacher (a clone of the unfitted one) on its training folds.
        "student-unfitted-teacher-randomized": RandomizedSearchCV(
            DistilledStudent(
                CertifiedTeacher(eps=EPS, method="ibp", **TINY),
                eps=EPS,
                callbacks=callbacks,
                **TINY,
            ),
            {"distill_weight": uniform(0.0, 1.0), "temperature": [1.0, 4.0]},
            n_iter=3,
            random_state=SEED,
            scoring=scoring,
            refit="certified",
            cv=cv,
        ),
    }


@pytest.mark.parametrize(
    "name", ["teacher-grid", "student-frozen-teacher-grid", "student-unfitted-teacher-randomized"]
)
def test_search_on_dask_equals_sequential(name, client, data, teacher):
    X, y = data
    search = _searches(teacher)[name]
    sequential = clone(search).set_params(n_jobs=1).fit(X, y)
    on_dask = clone(search).set_params(n_jobs=-1)
    with joblib.parallel_backend("dask"):
        on_dask.fit(X, y)

    # Every candidate and fold was fitted on the workers, with their single torch thread (dask
    # sets OMP_NUM_THREADS=1 for them unless this environment sets it), and scored there.
    def column(results, name):
        return np.array([results[f"split{i}_test_{name}"] for i in range(on_dask.n_splits_)])

    workers = set(client.run(os.getpid).values())
    assert set(column(on_dask.cv_results_, "pid").ravel()) <= workers
    assert set(column(sequential.cv_results_, "pid").ravel()) == {os.getpid()}
    threads = column(on_dask.cv_results_, "threads")
    assert np.all(threads == float(os.environ.get("OMP_NUM_THREADS", 1))), threads

    expected, got = sequential.cv_results_, on_dask.cv_results_
    assert got["params"] == expected["params"]
    for key in expected:
        if key.startswith(("split", "mean_test", "std_test", "rank_test")) and not key.endswith(
            ("threads", "pid")
        ):
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert on_dask.best_params_ == sequential.best_params_
    assert on_dask.best_score_ == sequential.best_score_
    assert len(set(expected["mean_test_certified"])) > 1, "the scores should tell candidates apart"
    np.testing.assert_array_equal(on_dask.predict(X), sequential.predict(X))
    if name == "student-frozen-teacher-grid":
        # The frozen teacher was shipped to the workers, not retrained there or here.
        assert on_dask.best_estimator_.teacher_ is teacher
        assert len(teacher.history_) == TINY["max_epochs"]


def test_estimators_pickle_to_workers(client, data, teacher):
    X, y = data
    student = DistilledStudent(FrozenEstimator(teacher), eps=EPS, **TINY).fit(X, y)
    for estimator in (teacher, student):
        remote = client.submit(_predict_and_certify, estimator, X, pure=False).result()
        local = _predict_and_certify(estimator, X)
        for a, b in zip(remote, local, strict=True):
            np.testing.assert_array_equal(a, b)

    # A student with an unfitted teacher fits both on a worker and comes back fitted.
    unfitted = DistilledStudent(CertifiedTeacher(eps=EPS, method="ibp", **TINY), eps=EPS, **TINY)
    remote = client.submit(_fit, clone(unfitted), X, y, pure=False).result()
    local = clone(unfitted).fit(X, y)
    assert remote.teacher_ is not remote.teacher and remote.teacher_outputs_ is None
    for a, b in (
        (remote.module_, local.module_),
        (remote.teacher_.module_, local.teacher_.module_),
    ):
        for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(p, q), name
    np.testing.assert_array_equal(remote.predict(X), local.predict(X))


def test_torch_threads_on_a_worker(client, data):
    # The user's torch_threads wins over the worker's single thread, for the fit only. (One
    # epoch: two threads on a busy 2-core machine are slow, which is the point of the default.)
    estimator = CertifiedTeacher(
        eps=EPS,
        method="ibp",
        torch_threads=2,
        callbacks=[("threads", _RecordThreads())],
        **{**TINY, "max_epochs": 1},
    )
    during, after = client.submit(_fit_and_threads_after, estimator, *data, pure=False).result()
    assert list(during) == [2]
    assert after == float(os.environ.get("OMP_NUM_THREADS", 1))


# ---------------------------------------------------------------------------- certify_dask
def _digits_module():
    torch.manual_seed(SEED)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)
    ).eval()


def test_certify_dask_on_the_cluster_equals_in_memory(client, data, teacher):
    import dask
    import dask.array as da

    from certdistill import certify
    from certdistill.scale.distributed import certify_dask

    X, y = data
    X_dask = da.from_array(X, chunks=(70, 32))  # uneven row blocks; features merged per task
    module = _digits_module()
    methods = ("ibp", "crown")
    result = certify_dask(module, X_dask, EPS, method=methods, y=y, lower=0.0, upper=1.0)
    assert result.margins.shape == (len(X), 10) and result.status.chunks == (X_dask.chunks[0],)
    assert result.method == "ibp+crown" and result.eps == pytest.approx(EPS)
    # Lazy until computed; computed together, each block is certified once, on the workers.
    with distributed.get_task_stream(client) as tasks:
        status, certified, margins = dask.compute(result.status, result.certified, result.margins)
    blocks = [t for t in tasks.data if "certify_block" in str(t["key"])]
    assert len(blocks) == len(X_dask.chunks[0])
    expected = certify(module, X, EPS, method=methods, y=y, lower=0.0, upper=1.0)
    np.testing.assert_allclose(margins, expected.margins, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(status, expected.status)
    np.testing.assert_array_equal(certified, expected.certified)
    assert 0 < expected.certified_fraction < 1

    # An estimator: its own eps, domain and labels; one pass over the blocks for every field.
    computed = certify_dask(teacher, X_dask, method="ibp").compute()
    expected = teacher.certify(X, method="ibp")
    np.testing.assert_allclose(computed.pop("margins"), expected.margins, rtol=1e-5, atol=1e-6)
    for name, values in computed.items():
        np.testing.assert_array_equal(values, getattr(expected, name), err_msg=name)
    assert set(computed) == {"prediction", "certified", "status", "decided_by"}


def test_certify_dask_checks_what_it_can_at_the_call(client, data, teacher):
    import dask.array as da

    from certdistill.scale.distributed import certify_dask

    X_dask = da.from_array(data[0], chunks=100)
    module = _digits_module()
    with pytest.raises(ValueError, match="Unknown method"):
        certify_dask(module, X_dask, EPS, method="nope")
    with pytest.raises(ValueError, match="eps is required"):
        certify_dask(module, X_dask)
    with pytest.raises(ValueError, match="non-negative"):
        certify_dask(module, X_dask, -1.0)
    with pytest.raises(ValueError, match="sample shape"):
        certify_dask(module, X_dask[:, :10], EPS)
    with pytest.raises(ValueError, match="memory_limit"):
        certify_dask(module, X_dask, EPS, memory_limit=0)
    with pytest.raises(ValueError, match="fitted on 64"):
        certify_dask(teacher, X_dask[:, :10])
    with pytest.raises(ValueError, match="own domain"):
        certify_dask(teacher, X_dask, lower=0.0)
    with pytest.raises(ValueError, match="y must have shape"):
        certify_dask(module, X_dask, EPS, y=np.zeros(3))
