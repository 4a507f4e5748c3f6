"""DistilledStudent: teacher handling, losses, model selection and persistence."""

from __future__ import annotations

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks

from certdistill import CertifiedTeacher, DistilledStudent
from certdistill.scoring import CertifiedAccuracy
from certdistill.student import DISTILLATION_LOSSES

TEACHER = dict(method="ibp", eps=0.05, lower=0.0, upper=1.0, max_epochs=3, lr=1e-2,
               random_state=0, module__hidden_sizes=(32,))
STUDENT = dict(eps=0.05, lower=0.0, upper=1.0, max_epochs=3, lr=1e-2, random_state=0,
               module__hidden_sizes=(16,))


@pytest.fixture(scope="module")
def small():
    """300 digit images of 4 classes (labels 0..3), scaled to [0, 1]."""
    X, y = load_digits(return_X_y=True)
    keep = y < 4
    return (X[keep] / 16.0).astype(np.float32)[:300], y[keep][:300]


@pytest.fixture(scope="module")
def teacher(small):
    X, y = small
    return CertifiedTeacher(**TEACHER).fit(X, y)


def _weights(net):
    return [p.detach().clone() for p in net.module_.parameters()]


def _same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("loss", DISTILLATION_LOSSES)
def test_fit_with_fitted_teacher(small, teacher, loss):
    X, y = small
    before = _weights(teacher)
    student = DistilledStudent(teacher, loss=loss, **STUDENT).fit(X, y)
    assert student.teacher_ is teacher
    assert _same(before, _weights(teacher))
    assert np.isfinite(student.history[:, "train_loss"]).all()
    pred = student.predict(X)
    assert set(pred) <= set(y)
    cert = student.certify(X[:20], method="ibp")
    assert cert.certified.shape == (20,)
    assert 0.0 <= student.certified_accuracy(X, y, method="ibp") <= 1.0


def test_frozen_teacher_survives_clone(small, teacher):
    X, y = small
    frozen = FrozenEstimator(teacher)
    before = _weights(teacher)
    student = DistilledStudent(frozen, **STUDENT)
    cloned = clone(student)
    assert cloned.teacher is frozen
    cloned.fit(X, y)
    assert cloned.teacher_ is teacher
    assert _same(before, _weights(teacher))


def test_unfitted_teacher_is_fitted_inside(small):
    X, y = small
    teacher = CertifiedTeacher(**TEACHER)
    student = DistilledStudent(teacher, **STUDENT).fit(X, y)
    assert student.teacher_ is not teacher
    assert not hasattr(teacher, "n_features_in_")
    assert student.teacher_.n_features_in_ == X.shape[1]
    np.testing.assert_array_equal(student.teacher_.classes_, np.arange(4))


def test_teacher_with_input_shape(small):
    X, y = small
    teacher = CertifiedTeacher(
        method="ibp", eps=0.05, lower=0.0, upper=1.0, max_epochs=1, random_state=0,
        input_shape=(1, 8, 8), module__channels=(4,), module__hidden_sizes=(16,),
    ).fit(X, y)
    student = DistilledStudent(FrozenEstimator(teacher), **STUDENT).fit(X, y)
    assert student.predict(X).shape == (len(X),)


def test_string_labels(small, teacher):
    X, y = small
    names = np.array(["zero", "one", "two", "three"])[y]
    student = DistilledStudent(CertifiedTeacher(**TEACHER), **STUDENT).fit(X, names)
    assert set(student.predict(X)) <= set(names)
    assert list(student.classes_) == sorted(set(names))


def test_mismatched_teacher_raises(small, teacher):
    X, y = small
    with pytest.raises(ValueError, match="classes"):
        DistilledStudent(teacher, **STUDENT).fit(X[y < 3], y[y < 3])
    with pytest.raises(ValueError, match="features"):
        DistilledStudent(teacher, **STUDENT).fit(X[:, :32], y)


def test_bad_teacher_and_params(small, teacher):
    X, y = small
    with pytest.raises(TypeError, match="teacher"):
        DistilledStudent("not a teacher", **STUDENT).fit(X, y)
    with pytest.raises(NotFittedError):
        DistilledStudent(FrozenEstimator(CertifiedTeacher()), **STUDENT).fit(X, y)
    with pytest.raises(ValueError, match="loss"):
        DistilledStudent(teacher, loss="nope", **STUDENT).fit(X, y)
    with pytest.raises(ValueError, match="temperature"):
        DistilledStudent(teacher, temperature=0.0, **STUDENT).fit(X, y)
    bad = [("teacher_bounds", "exact"), ("temperature_end", -1.0), ("distill_weight_end", 1.5),
           ("distill_weight", -0.1), ("pgd_steps", 0), ("worst_case_weight", -1.0)]
    for name, value in bad:
        with pytest.raises(ValueError, match=name):
            DistilledStudent(teacher, **{name: value}, **STUDENT).fit(X, y)


def test_distillation_schedules_are_recorded(small, teacher):
    X, y = small
    student = DistilledStudent(teacher, distill_weight=1.0, distill_weight_end=0.0,
                               temperature=8.0, temperature_end=2.0, warmup=0.0, ramp=0.5,
                               **{**STUDENT, "max_epochs": 4}).fit(X, y)
    lam = student.history[:, "distill_weight"]
    temp = student.history[:, "temperature"]
    assert lam[0] > lam[-1] == 0.0 and temp[0] > temp[-1] == 2.0
    assert all(np.diff(lam) <= 0)
    constant = DistilledStudent(teacher, distill_weight=0.3, **STUDENT).fit(X, y)
    assert set(constant.history[:, "distill_weight"]) == {0.3}


def _count_teacher_bounds(monkeypatch, teacher) -> list:
    """Record every margin_lower_bounds call (the student's own IBP uses interval_pass)."""
    engine_type = type(teacher.bound_engine())
    original = engine_type.margin_lower_bounds
    calls = []

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("method"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engine_type, "margin_lower_bounds", counting)
    return calls


@pytest.mark.parametrize("cache", [True, False])
def test_teacher_bounds_are_cached_while_eps_is_constant(small, teacher, monkeypatch, cache):
    X, y = small
    calls = _count_teacher_bounds(monkeypatch, teacher)
    # no warm-up and no ramp: every batch has the same eps, 3 batches per epoch, 4 epochs
    student = DistilledStudent(teacher, warmup=0.0, ramp=0.0, batch_size=100,
                               cache_teacher=cache, **{**STUDENT, "max_epochs": 4}).fit(X, y)
    assert len(calls) == (3 if cache else 12)
    assert student.teacher_outputs_ is None  # dropped after fit: not pickled with the student


def test_cached_training_equals_uncached(small, teacher):
    X, y = small
    params = dict(warmup=0.0, ramp=0.2, batch_size=100, **{**STUDENT, "max_epochs": 4})
    cached = DistilledStudent(teacher, **params).fit(X, y)
    uncached = DistilledStudent(teacher, cache_teacher=False, **params).fit(X, y)
    np.testing.assert_allclose(cached.predict_proba(X), uncached.predict_proba(X), atol=1e-5)


@pytest.mark.parametrize("bounds", ["crown-ibp", "best", "pgd"])
def test_teacher_bound_choices(small, teacher, monkeypatch, bounds):
    X, y = small
    calls = _count_teacher_bounds(monkeypatch, teacher)
    student = DistilledStudent(teacher, teacher_bounds=bounds, **STUDENT).fit(X, y)
    expected = {"crown-ibp": {"crown-ibp"}, "best": {"ibp", "crown-ibp"}, "pgd": set()}[bounds]
    assert set(calls) == expected
    assert np.isfinite(student.history[:, "train_loss"]).all()


def test_params_round_trip(teacher):
    student = DistilledStudent(teacher, temperature=2.0, distill_weight=0.3)
    params = student.get_params(deep=False)
    assert params["teacher"] is teacher
    assert params["temperature"] == 2.0 and params["distill_weight"] == 0.3
    cloned = clone(student)
    assert cloned.temperature == 2.0 and cloned.loss == "selective"


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_grid_search_with_frozen_teacher(small, teacher, n_jobs):
    X, y = small
    before = _weights(teacher)
    search = GridSearchCV(
        DistilledStudent(FrozenEstimator(teacher), **STUDENT),
        {"temperature": [1.0, 4.0]},
        scoring={"accuracy": "accuracy", "certified": CertifiedAccuracy(0.05, method="ibp")},
        refit="certified",
        cv=2,
        n_jobs=n_jobs,
    ).fit(X, y)
    assert search.best_params_["temperature"] in (1.0, 4.0)
    assert search.best_estimator_.teacher_ is teacher
    assert _same(before, _weights(teacher))


def test_joblib_round_trip(small, teacher, tmp_path):
    X, y = small
    student = DistilledStudent(FrozenEstimator(teacher), **STUDENT).fit(X, y)
    path = tmp_path / "student.joblib"
    joblib.dump(student, path)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(X), student.predict_proba(X))
    np.testing.assert_array_equal(loaded.teacher_.predict_proba(X), teacher.predict_proba(X))


@pytest.mark.parametrize("loss", DISTILLATION_LOSSES)
def test_no_distillation_is_ibp_training(small, teacher, loss):
    """With distill_weight=0 the student trains exactly as an IBP CertifiedTeacher."""
    X, y = small
    student = DistilledStudent(teacher, loss=loss, distill_weight=0.0, **STUDENT).fit(X, y)
    ibp = CertifiedTeacher(method="ibp", **STUDENT).fit(X, y)
    np.testing.assert_allclose(student.predict_proba(X), ibp.predict_proba(X), atol=1e-5)


def test_teacher_logits_match_its_certificate(small, teacher):
    X, y = small
    student = DistilledStudent(teacher, **STUDENT).fit(X, y)
    x = student.module_input(X[:10])
    y_enc = torch.as_tensor(y[:10])
    clean, worst = student.teacher_logits(x, y_enc, 0.05)
    np.testing.assert_allclose(clean.numpy(), teacher.forward(X[:10]).numpy(), atol=1e-5)
    margins = teacher.certify(X[:10], eps=0.05, method="ibp", y=y[:10]).margins
    finite = np.isfinite(margins)
    np.testing.assert_allclose(-worst.numpy()[finite], margins[finite], atol=1e-4)
    np.testing.assert_array_equal(worst.numpy()[~finite], 0.0)


# skorch's own two failures, as in test_estimator_checks.py.
SKORCH_EXPECTED_FAILURES = {
    "check_no_attributes_set_in_init": "skorch's NeuralNet.__init__ sets non-parameters",
    "check_set_params": "skorch's set_params stores and validates parameters its own way",
}


@parametrize_with_checks(
    [DistilledStudent(CertifiedTeacher(method="ibp", max_epochs=2, module__hidden_sizes=(8,),
                                       random_state=0),
                      max_epochs=2, lr=1e-2, module__hidden_sizes=(8,), random_state=0)],
    expected_failed_checks=lambda estimator: SKORCH_EXPECTED_FAILURES,
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
