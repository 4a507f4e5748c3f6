"""Reproducibility on the CPU: one ``random_state``, bit-identical weights, predictions and
certificates, across two fits and across saving and loading (joblib and the safe format).

Tiny networks and few epochs: what is checked is equality, not quality. Every training path that
draws random numbers is covered: data shuffling and weight initialisation (all), the PGD start of
MTL-IBP and of the adversarial distillation loss, a teacher attacked by PGD, dropout, shuffled
batches (``iterator_train__shuffle=True``; skorch keeps the data order by default).
"""

from __future__ import annotations

import joblib
import numpy as np
import pytest
import torch
from digits import small_digits
from sklearn.base import clone
from sklearn.frozen import FrozenEstimator
from torch import nn

import certdistill
from certdistill import CertifiedTeacher, DistilledStudent

COMMON = dict(eps=0.05, lower=0.0, upper=1.0, max_epochs=3, lr=1e-2, batch_size=64, random_state=7)


@pytest.fixture(scope="module")
def data():
    return small_digits(3, 150)


@pytest.fixture(scope="module")
def teacher(data):
    return CertifiedTeacher(method="ibp", module__hidden_sizes=(16,), **COMMON).fit(*data)


def _dropout_mlp():
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


ESTIMATORS = {
    "teacher-ibp": lambda t: CertifiedTeacher(method="ibp", module__hidden_sizes=(16,), **COMMON),
    "teacher-crown-ibp": lambda t: CertifiedTeacher(module__hidden_sizes=(16,), **COMMON),
    "teacher-mtl-ibp": lambda t: CertifiedTeacher(
        method="mtl-ibp", module__hidden_sizes=(16,), **COMMON
    ),
    "teacher-cnn": lambda t: CertifiedTeacher(
        method="ibp",
        input_shape=(1, 8, 8),
        module__channels=(3,),
        module__hidden_sizes=(8,),
        **COMMON,
    ),
    "teacher-dropout": lambda t: CertifiedTeacher(_dropout_mlp, method="ibp", **COMMON),
    "teacher-shuffled": lambda t: CertifiedTeacher(
        method="ibp", module__hidden_sizes=(16,), iterator_train__shuffle=True, **COMMON
    ),
    "student-selective": lambda t: DistilledStudent(
        FrozenEstimator(t), module__hidden_sizes=(8,), **COMMON
    ),
    "student-adversarial": lambda t: DistilledStudent(
        FrozenEstimator(t), loss="adversarial", module__hidden_sizes=(8,), **COMMON
    ),
    "student-pgd-teacher": lambda t: DistilledStudent(
        FrozenEstimator(t), loss="margin", teacher_bounds="pgd", module__hidden_sizes=(8,), **COMMON
    ),
}


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key  # parameters and BatchNorm buffers


def _assert_same_outputs(a, b, X) -> None:
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    for method in ("ibp", "crown"):
        np.testing.assert_array_equal(
            a.certify(X, method=method).margins, b.certify(X, method=method).margins
        )


def _without_durations(history) -> list:
    return [{k: v for k, v in row.items() if k not in ("dur", "batches")} for row in history]


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_same_random_state_gives_identical_fits(data, teacher, name):
    X, y = data
    torch.manual_seed(1)  # the global random state must not matter...
    first = ESTIMATORS[name](teacher).fit(X, y)
    torch.manual_seed(2)
    second = ESTIMATORS[name](teacher).fit(X, y)
    _assert_same_state(first.module_, second.module_)
    _assert_same_outputs(first, second, X)
    assert _without_durations(first.history) == _without_durations(second.history)
    other = clone(first).set_params(random_state=8).fit(X, y)  # ...the seed does
    assert not torch.equal(other.module_[0].weight, first.module_[0].weight)


@pytest.mark.parametrize("fmt", ["safe", "joblib"])
@pytest.mark.parametrize("name", ["teacher-crown-ibp", "student-adversarial"])
def test_identical_across_save_and_load(data, teacher, tmp_path, name, fmt):
    X, y = data
    model = ESTIMATORS[name](teacher).fit(X, y)
    path = tmp_path / "model"
    if fmt == "safe":
        loaded = certdistill.load(certdistill.save(model, path))
    else:
        joblib.dump(model, path)
        loaded = joblib.load(path)
    _assert_same_state(loaded.module_, model.module_)
    _assert_same_outputs(loaded, model, X)
    # the seed travels with the parameters: refitting the loaded model repeats the fit
    refit = loaded.fit(X, y)
    _assert_same_state(refit.module_, ESTIMATORS[name](teacher).fit(X, y).module_)
