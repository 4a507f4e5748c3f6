"""``torch_threads``: the estimators' torch threads, set for a call and restored after it."""

from __future__ import annotations

import importlib
import pickle

import numpy as np
import pytest
import torch
from skorch.callbacks import Callback

from certdistill import CertifiedTeacher
from certdistill.scale.parallel import torch_threads

# The module, not the function of the same name that the package exports.
certify_module = importlib.import_module("certdistill.certification.problem")


class _RecordThreads(Callback):
    def on_epoch_end(self, net, **kwargs):
        net.history.record("torch_threads", torch.get_num_threads())


@pytest.fixture
def data():
    X = np.random.default_rng(0).uniform(size=(40, 5)).astype(np.float32)
    return X, (X[:, 0] > 0.5).astype(int)


def test_context_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(before + 1):
        raise RuntimeError
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_context_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="torch_threads must be None or a positive int"):
        with torch_threads(bad):
            pass


def test_estimator_fits_predicts_and_certifies_with_its_threads(data, monkeypatch):
    X, y = data
    before = torch.get_num_threads()
    net = CertifiedTeacher(
        method="ibp",
        module__hidden_sizes=(8,),
        max_epochs=2,
        random_state=0,
        torch_threads=before + 1,
        callbacks=[("threads", _RecordThreads())],
    )
    net.fit(X, y)
    assert net.history_[:, "torch_threads"] == [before + 1] * 2
    assert torch.get_num_threads() == before

    seen = {}

    def recording(name, function):
        def wrapper(*args, **kwargs):
            seen[name] = torch.get_num_threads()
            return function(*args, **kwargs)

        return wrapper

    def forward_hook(*_):
        seen["predict"] = torch.get_num_threads()

    net.module_.register_forward_hook(forward_hook)
    # The estimators run the certification problem's cascade and bisection directly.
    problem = certify_module.Problem
    monkeypatch.setattr(problem, "certify", recording("certify", problem.certify))
    monkeypatch.setattr(problem, "radius", recording("certified_radius", problem.radius))
    net.predict(X)
    net.certify(X, method="ibp")
    net.certified_radius(X[:2], method="ibp", tol=0.1)
    assert seen == {"predict": before + 1, "certify": before + 1, "certified_radius": before + 1}
    assert torch.get_num_threads() == before


def test_default_leaves_threads_alone(data):
    X, y = data
    torch.set_num_threads(1)  # as conftest.py
    net = CertifiedTeacher(
        method="ibp",
        module__hidden_sizes=(8,),
        max_epochs=1,
        callbacks=[("threads", _RecordThreads())],
    ).fit(X, y)
    assert net.torch_threads is None
    assert net.history_[:, "torch_threads"] == [1]


def test_invalid_torch_threads_raise_in_fit(data):
    with pytest.raises(ValueError, match="torch_threads"):
        CertifiedTeacher(torch_threads=0, max_epochs=1).fit(*data)


def test_estimators_pickled_before_the_parameter_still_predict(data):
    X, y = data
    net = CertifiedTeacher(
        method="ibp", module__hidden_sizes=(8,), max_epochs=1, random_state=0
    ).fit(X, y)
    del net.torch_threads  # as in a file written by an older version
    restored = pickle.loads(pickle.dumps(net))
    np.testing.assert_array_equal(restored.predict(X), net.predict(X))
