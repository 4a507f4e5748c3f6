"""DistilledStudent: teacher handling, losses, model selection and persistence."""

from __future__ import annotations

import math

import joblib
import numpy as np
import pytest
import torch
from digits import SMALL_FIT, small_digits
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks
from skorch_checks import SKORCH_EXPECTED_FAILURES

from certdistill import CertifiedTeacher, DistilledStudent
from certdistill.estimators.distillation import (
    DISTILLATION_LOSSES,
    DistillationBatch,
    DistillationLoss,
)
from certdistill.estimators.losses import distillation_kl
from certdistill.estimators.scoring import CertifiedAccuracy
from certdistill.estimators.teacher_outputs import BULK_ROWS, clear_shared_cache

TEACHER = {**SMALL_FIT, "method": "ibp", "module__hidden_sizes": (32,)}
STUDENT = {**SMALL_FIT, "module__hidden_sizes": (16,), "transfer": ()}
ALONE = {k: v for k, v in STUDENT.items() if k != "transfer"}  # the same network, trained alone


@pytest.fixture(scope="module")
def small():
    """300 digit images of 4 classes (labels 0..3), scaled to [0, 1]."""
    return small_digits(4, 300)


@pytest.fixture(scope="module")
def teacher(small):
    X, y = small
    return CertifiedTeacher(**TEACHER).fit(X, y)


@pytest.fixture(autouse=True)
def _fresh_teacher_cache():
    """Teacher outputs are shared between fits from one teacher: each test starts without."""
    clear_shared_cache()
    yield
    clear_shared_cache()


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
    assert student.score(X, y) > 0.5  # 4 classes: training did something
    cert = student.certify(X[:20], method="ibp", y=y[:20])
    np.testing.assert_array_equal(cert.certified, (cert.margins > 0).all(1))
    assert student.certified_accuracy(X[:20], y[:20], method="ibp") == cert.certified.mean()


def test_a_new_distillation_loss_is_one_function_and_one_table_entry(small, teacher, monkeypatch):
    X, y = small
    seen = []

    def clean_kl_only(batch: DistillationBatch):
        seen.append(batch.teacher_worst)
        return distillation_kl(batch.teacher_logits, batch.terms.logits, batch.temperature)

    monkeypatch.setitem(
        DISTILLATION_LOSSES, "clean-kl", DistillationLoss(clean_kl_only, needs_worst=False)
    )
    student = DistilledStudent(teacher, loss="clean-kl", **STUDENT).fit(X, y)
    assert seen and all(worst is None for worst in seen)
    assert np.isfinite(student.history[:, "train_loss"]).all()
    with pytest.raises(ValueError, match="loss must be one of"):
        DistilledStudent(teacher, loss="no-such-loss", **STUDENT).fit(X, y)


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
        method="ibp",
        eps=0.05,
        lower=0.0,
        upper=1.0,
        max_epochs=1,
        random_state=0,
        input_shape=(1, 8, 8),
        module__channels=(4,),
        module__hidden_sizes=(16,),
    ).fit(X, y)
    student = DistilledStudent(FrozenEstimator(teacher), **STUDENT).fit(X, y)
    assert student.input_shape is None and student.score(X, y) > 0.5
    # the teacher reads the student's flat rows with its own input shape (1, 8, 8)
    clean, _ = student.teacher_logits(student.module_input(X[:10]), torch.as_tensor(y[:10]), 0.0)
    np.testing.assert_allclose(
        clean.numpy(), teacher.forward(X[:10].reshape(-1, 1, 8, 8)), rtol=1e-5, atol=1e-5
    )


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
    bad = [
        ("teacher_bounds", "exact"),
        ("temperature_end", -1.0),
        ("distill_weight_end", 1.5),
        ("distill_weight", -0.1),
        ("pgd_steps", 0),
        ("worst_case_weight", -1.0),
        ("teacher_radius_levels", 0),
        ("teacher_radius_levels", 2.5),
    ]
    for name, value in bad:
        with pytest.raises(ValueError, match=name):
            DistilledStudent(teacher, **{name: value}, **STUDENT).fit(X, y)


def test_distillation_schedules_are_recorded(small, teacher):
    X, y = small
    student = DistilledStudent(
        teacher,
        distill_weight=1.0,
        distill_weight_end=0.0,
        temperature=8.0,
        temperature_end=2.0,
        warmup=0.0,
        ramp=0.5,
        **{**STUDENT, "max_epochs": 4},
    ).fit(X, y)
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
    student = DistilledStudent(
        teacher,
        warmup=0.0,
        ramp=0.0,
        batch_size=100,
        cache_teacher=cache,
        **{**STUDENT, "max_epochs": 4},
    ).fit(X, y)
    # cached: the 300 rows once, in chunks of BULK_ROWS; uncached: every batch
    assert len(calls) == (math.ceil(300 / BULK_ROWS["cpu"]) if cache else 12)
    assert student.teacher_outputs_ is None  # dropped after fit: not pickled with the student


@pytest.mark.parametrize("levels", [None, 2, 4])
def test_teacher_radius_levels_bound_the_teacher_passes_of_the_ramp(
    small, teacher, monkeypatch, levels
):
    X, y = small
    calls = _count_teacher_bounds(monkeypatch, teacher)
    # the whole run is the ramp: 3 batches per epoch, 6 epochs, eps changes at every batch
    student = DistilledStudent(
        teacher,
        warmup=0.0,
        ramp=1.0,
        batch_size=100,
        teacher_radius_levels=levels,
        **{**STUDENT, "max_epochs": 6},
    )
    student.fit(X, y)
    # exact: one pass per batch but the first (eps 0); rounded: each step's rows computed once,
    # in chunks of BULK_ROWS
    assert len(calls) == (17 if levels is None else levels * math.ceil(300 / BULK_ROWS["cpu"]))


def test_second_fit_from_the_same_teacher_reuses_its_outputs(small, teacher, monkeypatch):
    X, y = small
    calls = _count_teacher_bounds(monkeypatch, teacher)
    params = dict(warmup=0.0, ramp=0.0, batch_size=100, **{**STUDENT, "max_epochs": 2})
    first = DistilledStudent(teacher, **params).fit(X, y)
    once = len(calls)
    assert once > 0
    second = DistilledStudent(teacher, **params).fit(X, y)
    assert len(calls) == once  # the whole-set worst cases came from the first fit
    np.testing.assert_allclose(first.predict_proba(X), second.predict_proba(X), atol=1e-6)
    # other rows miss the shared outputs
    DistilledStudent(teacher, **params).fit(X[:200], y[:200])
    assert len(calls) > once


@pytest.mark.parametrize("shuffle", [False, True])
def test_tensor_batches_are_the_data_loaders_batches(shuffle):
    from skorch.dataset import Dataset
    from torch.utils.data import DataLoader

    from certdistill.estimators.base import TensorBatches

    X = np.random.default_rng(0).normal(size=(23, 3)).astype(np.float32)
    y = np.arange(23) % 4
    torch.manual_seed(5)
    expected = [
        (a.clone(), b.clone()) for a, b in DataLoader(Dataset(X, y), batch_size=5, shuffle=shuffle)
    ]
    after_loader = torch.rand(1)
    torch.manual_seed(5)
    batches = TensorBatches(X, y, batch_size=5, shuffle=shuffle)
    got = []
    for a, b in batches:
        np.testing.assert_array_equal(X[batches.rows_of(a).numpy()], a.numpy())
        got.append((a, b))
    assert torch.equal(torch.rand(1), after_loader)  # the same draws from the global generator
    assert len(got) == len(expected) == len(batches)
    for (a, b), (c, d) in zip(got, expected, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


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
    ibp = CertifiedTeacher(method="ibp", **ALONE).fit(X, y)
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


# skorch's own two failures, as for the teacher (test_estimator_checks.py).
@parametrize_with_checks(
    [
        DistilledStudent(
            CertifiedTeacher(method="ibp", max_epochs=2, module__hidden_sizes=(8,), random_state=0),
            max_epochs=2,
            lr=1e-2,
            module__hidden_sizes=(8,),
            random_state=0,
        )
    ],
    expected_failed_checks=lambda estimator: SKORCH_EXPECTED_FAILURES,
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


# ------------------------------------------------------------------ loss values, by hand
def _log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    shifted = z - z.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def _cross_entropy(z, target):
    """Mean cross-entropy; ``target`` holds labels or rows of class probabilities."""
    target = np.asarray(target)
    if target.ndim == 1:
        target = np.eye(np.shape(z)[1])[target]
    return float(-(target * _log_softmax(z)).sum(1).mean())


def _kl(t, s, temp):
    p = np.exp(_log_softmax(np.asarray(t) / temp))
    return float(temp**2 * (p * (np.log(p) - _log_softmax(np.asarray(s) / temp))).sum(1).mean())


def _huber(s, t, temp):
    d = np.abs(np.asarray(s, np.float64) - np.asarray(t, np.float64)) / temp
    return float(temp * np.where(d < 1, 0.5 * d**2, d - 0.5).mean())


def test_distillation_terms_by_hand():
    from certdistill.estimators.losses import distillation_kl, margin_matching

    t = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    s = torch.tensor([[0.5, 0.5, 0.0], [2.0, 1.0, -1.0]])
    # KL(p || q) = sum p log(p / q) with p = softmax(t / T), q = softmax(s / T), times T^2
    for temp in (1.0, 2.0, 4.0):
        assert distillation_kl(t, s, temp).item() == pytest.approx(_kl(t, s, temp), rel=1e-6)
        assert margin_matching(t, s, temp).item() == pytest.approx(_huber(s, t, temp), rel=1e-6)
    assert distillation_kl(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    # one case written out: T = 1, one sample, p = (1/2, 1/2), q = (e / (1 + e), 1 / (1 + e))
    p_q = math.log(0.5 / (math.e / (1 + math.e))) / 2 + math.log(0.5 / (1 / (1 + math.e))) / 2
    assert distillation_kl(
        torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), 1.0
    ).item() == pytest.approx(p_q, rel=1e-6)
    # Huber at scale T = 2: differences 1 (quadratic part) and 4 (linear part), mean of the two
    value = margin_matching(torch.zeros(1, 2), torch.tensor([[1.0, 4.0]]), 2.0).item()
    assert value == pytest.approx(2.0 * (0.5 * 0.5**2 + (2.0 - 0.5)) / 2, rel=1e-6)


def test_certified_loss_with_and_without_weights_by_hand():
    from certdistill.estimators.losses import certified_loss as _certified_loss

    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.0, 0.0]])
    shat = torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, 1.5]])
    y = torch.tensor([0, 1])
    ce_s, ce_shat = [
        [_cross_entropy(z[i : i + 1], y[i : i + 1].numpy()) for i in range(2)]
        for z in (s.numpy(), shat.numpy())
    ]
    kappa = 0.3
    expected = kappa * np.mean(ce_s) + (1 - kappa) * np.mean(ce_shat)
    assert _certified_loss(s, shat, y, kappa, None).item() == pytest.approx(expected, rel=1e-6)
    w = torch.tensor([1.0, 0.25])  # the second sample moves 3/4 of its certified term to clean
    per_sample = [
        kappa * ce_s[i] + (1 - kappa) * (w[i] * ce_shat[i] + (1 - w[i]) * ce_s[i]) for i in range(2)
    ]
    got = _certified_loss(s, shat, y, kappa, w).item()
    assert got == pytest.approx(float(np.mean(per_sample)), rel=1e-6)


def _linear(weight, bias) -> torch.nn.Sequential:
    layer = torch.nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return torch.nn.Sequential(layer)


def _box_margins(weight, bias, x, y, eps):
    """Exact minimum of z_y - z_j over the box [x - eps, x + eps] ∩ [0, 1] of a linear model
    (IBP is exact for one linear layer with the margin folded in)."""
    w, b = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
    lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    c = w[y][:, None, :] - w[None]  # (n, C, d)
    margins = (c * mid[:, None]).sum(2) + (b[y][:, None] - b) - (np.abs(c) * rad[:, None]).sum(2)
    margins[np.arange(len(y)), y] = np.inf
    return margins


@pytest.mark.parametrize("loss", ["baseline", "soft-certified", "margin", "selective"])
def test_training_loss_values_by_hand(loss):
    """The whole distillation loss of one batch, for linear teacher and student networks whose
    worst-case logits have a closed form, against the formulas of the class docstring."""
    rng = np.random.default_rng(0)
    X = rng.random((6, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    eps, lam, temp, kappa, mu = 0.1, 0.4, 2.0, 0.25, 0.7
    t_w, t_b = rng.normal(0, 3, (3, 3)), rng.normal(0, 0.3, 3)
    s_w, s_b = rng.normal(0, 1, (3, 3)), rng.normal(0, 0.3, 3)
    common = dict(eps=eps, lower=0.0, upper=1.0, max_epochs=0, reg_lambda=0.0)
    teacher = CertifiedTeacher(_linear(t_w, t_b), method="ibp", **common).fit(X, y)
    # the teacher's worst case at the student's exact radius (rounding is tested on its own)
    student = DistilledStudent(
        teacher,
        _linear(s_w, s_b),
        loss=loss,
        worst_case_weight=mu,
        teacher_radius_levels=None,
        **common,
    ).fit(X, y)
    student.current_perturbation_ = student.perturbation_.with_eps(eps)
    student.current_kappa_ = kappa
    student.current_distill_weight_, student.current_temperature_ = lam, temp
    with torch.no_grad():
        got, logits = student.training_loss(torch.from_numpy(X), torch.from_numpy(y), False)

    s = X @ s_w.T + s_b
    t = X @ t_w.T + t_b
    np.testing.assert_allclose(logits.numpy(), s, rtol=1e-5, atol=1e-5)
    shat = np.where(np.isinf(m := _box_margins(s_w, s_b, X, y, eps)), 0.0, -m)
    that = np.where(np.isinf(m := _box_margins(t_w, t_b, X, y, eps)), 0.0, -m)
    certified = (that.max(1) <= 0) & (np.sort(that, 1)[:, -2] < 0)  # every margin j != y > 0
    assert 0 < certified.sum() < len(y)  # selective weighs both kinds of samples
    l_cert = kappa * _cross_entropy(s, y) + (1 - kappa) * _cross_entropy(shat, y)
    if loss == "baseline":
        expected = (1 - lam) * l_cert + lam * (_kl(t, s, temp) + mu * _kl(that, shat, temp))
    elif loss == "soft-certified":
        soft = (1 - lam) * np.eye(3)[y] + lam * np.exp(_log_softmax(t / temp))
        expected = kappa * _cross_entropy(s, soft) + (1 - kappa) * _cross_entropy(shat, soft)
    elif loss == "margin":
        t_shift = t - t[np.arange(6), y][:, None]
        s_shift = s - s[np.arange(6), y][:, None]
        expected = (1 - lam) * l_cert + lam * (
            _huber(s_shift, t_shift, temp) + mu * _huber(shat, that, temp)
        )
    else:  # selective: certified term weighted by 1 - lam * sigmoid(teacher's gap / T)
        gap = np.where(np.eye(3, dtype=bool)[y], -np.inf, that).max(1)
        weight = 1.0 - lam / (1.0 + np.exp(-gap / temp))
        ce_s = np.array([_cross_entropy(s[i : i + 1], y[i : i + 1]) for i in range(6)])
        ce_shat = np.array([_cross_entropy(shat[i : i + 1], y[i : i + 1]) for i in range(6)])
        expected = np.mean(kappa * ce_s + (1 - kappa) * (weight * ce_shat + (1 - weight) * ce_s))
    assert got.item() == pytest.approx(expected, rel=1e-5)
