"""CertifiedTeacher: estimator behaviour, certification API, model selection and persistence."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import joblib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler
from skorch.dataset import ValidSplit
from torch import nn

from certdistill import Certificate
from certdistill.estimators.scoring import CertifiedAccuracy
from certdistill.estimators.teacher import CertifiedTeacher
from certdistill.exceptions import UnsupportedLayerError

FAST = dict(max_epochs=4, lr=1e-2, random_state=0, module__hidden_sizes=(32,))


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)


@pytest.fixture(scope="module")
def small(digits):
    """400 digit images of 4 classes (labels 0..3)."""
    Xtr, _, ytr, _ = digits
    keep = ytr < 4
    return Xtr[keep][:400], ytr[keep][:400]


@pytest.fixture(scope="module")
def fitted(small):
    X, y = small
    return CertifiedTeacher(eps=0.05, lower=0.0, upper=1.0, **FAST).fit(X, y)


# ----------------------------------------------------------------------------- estimator
def test_string_labels_round_trip(small):
    X, y = small
    names = np.array(["zero", "one", "two", "three"])[y]
    teacher = CertifiedTeacher(**FAST).fit(X, names)
    assert list(teacher.classes_) == sorted(set(names))
    pred = teacher.predict(X)
    assert pred.dtype == names.dtype and set(pred) <= set(names)
    proba = teacher.predict_proba(X)
    assert proba.shape == (len(X), 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert np.array_equal(pred, teacher.classes_[proba.argmax(axis=1)])
    assert teacher.score(X, names) == pytest.approx(np.mean(pred == names))
    assert teacher.score(X, names) > 0.8
    cert = teacher.certify(X[:10], eps=0.01, y=names[:10])
    assert cert.margins.shape == (10, 4)


def test_validation_split_reports_encoded_accuracy(small):
    X, y = small
    names = np.array(["a", "b", "c", "d"])[y]
    teacher = CertifiedTeacher(train_split=ValidSplit(4, stratified=True), **FAST).fit(X, names)
    accs = teacher.history[:, "valid_acc"]
    assert len(accs) == FAST["max_epochs"] and 0.5 < accs[-1] <= 1.0
    assert np.isfinite(teacher.history[:, "valid_loss"]).all()


def test_feature_checks(fitted, small):
    X, _ = small
    assert fitted.n_features_in_ == 64
    with pytest.raises(ValueError, match="features"):
        fitted.predict(X[:, :10])
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        fitted.predict(bad)
    with pytest.raises(ValueError, match="input_shape"):
        CertifiedTeacher(input_shape=(1, 4, 4), **FAST).fit(X, small[1])
    with pytest.raises(ValueError, match="upper"):
        CertifiedTeacher(upper=0.5, **FAST).fit(X, small[1])


def test_invalid_hyperparameters_raise_in_fit(small):
    X, y = small
    for params in (
        dict(method="pgd"),
        dict(eps=-0.1),
        dict(kappa_end=2.0),
        dict(input_shape=(0, 8)),
    ):
        teacher = CertifiedTeacher(**params, **FAST)  # no error at construction
        with pytest.raises(ValueError):
            teacher.fit(X, y)
    with pytest.raises(TypeError, match="sample_weight"):
        CertifiedTeacher(**FAST).fit(X, y, sample_weight=np.ones(len(y)))


def test_default_modules(small):
    X, y = small
    flat = CertifiedTeacher(**FAST).fit(X, y)
    assert not any(isinstance(m, nn.Conv2d) for m in flat.module_.modules())
    assert flat.module_[0].in_features == 64 and flat.module_[-1].out_features == 4
    cnn_params = dict(FAST, max_epochs=2)
    cnn_params.pop("module__hidden_sizes")
    cnn = CertifiedTeacher(
        input_shape=(1, 8, 8), module__channels=(4, 8), module__hidden_sizes=(16,), **cnn_params
    ).fit(X, y)
    convs = [m for m in cnn.module_.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8]
    # images given as (n, 1, 8, 8) arrays are accepted as well
    images = X.reshape(-1, 1, 8, 8)
    np.testing.assert_array_equal(cnn.predict(images), cnn.predict(X))


def test_custom_modules(small):
    X, y = small
    params = {k: v for k, v in FAST.items() if not k.startswith("module__")}
    instance = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 4))
    teacher = CertifiedTeacher(instance, method="ibp", **params).fit(X, y)
    assert teacher.module_ is instance
    assert teacher.certify(X[:5], method="ibp").margins.shape == (5, 4)

    def make_net(hidden=8):
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Sequential(nn.Linear(hidden, 4)))

    teacher = CertifiedTeacher(make_net, module__hidden=12, **params).fit(X, y)
    assert teacher.module_[0].out_features == 12

    class Net(nn.Module):  # a custom forward the engine follows by torch.fx tracing
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 4))

        def forward(self, x):
            return self.body(x)

    traced = CertifiedTeacher(Net, **params).fit(X, y)
    assert traced.certify(X[:5], method="crown").margins.shape == (5, 4)

    class Squashed(Net):  # ... and refuses what it cannot bound
        def forward(self, x):
            return torch.sigmoid(self.body(x))

    with pytest.raises(UnsupportedLayerError, match="sigmoid"):
        CertifiedTeacher(Squashed, **params).fit(X, y)
    plain = CertifiedTeacher(Squashed, eps_train_ratio=0.0, **params).fit(X, y)  # clean training
    assert plain.score(X, y) > 0.5

    bad = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 4))
    with pytest.raises(UnsupportedLayerError, match="Tanh"):
        CertifiedTeacher(bad, **params).fit(X, y)


def test_random_state_gives_identical_weights(small):
    X, y = small
    state = torch.random.get_rng_state()
    a = CertifiedTeacher(method="mtl-ibp", **FAST).fit(X, y)
    b = CertifiedTeacher(method="mtl-ibp", **FAST).fit(X, y)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    for pa, pb in zip(
        a.module_.state_dict().values(), b.module_.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb)
    c = CertifiedTeacher(method="mtl-ibp", **dict(FAST, random_state=1)).fit(X, y)
    assert not torch.equal(a.module_[0].weight, c.module_[0].weight)


def test_schedules_recorded_in_history(small):
    X, y = small
    teacher = CertifiedTeacher(
        eps=0.1,
        eps_train_ratio=1.5,
        method="crown-ibp",
        warmup=0.25,
        ramp=0.5,
        **dict(FAST, max_epochs=8),
    ).fit(X, y)
    eps = np.array(teacher.history[:, "eps"])
    assert eps[0] == 0.0  # warm-up: first two of eight epochs
    assert np.all(np.diff(eps) >= 0)
    assert eps[-1] == pytest.approx(0.15)
    kappa = np.array(teacher.history[:, "kappa"])
    beta = np.array(teacher.history[:, "beta"])
    assert kappa[0] == 1.0 and kappa[-1] == 0.0 and beta[0] == 1.0 and beta[-1] == 0.0
    assert teacher.history[:, "lr"][-1] == pytest.approx(1e-2 * 0.2**2)
    per_batch = teacher.history[3, "batches", :, "eps"]
    assert len(per_batch) == 4 and np.all(np.diff(per_batch) > 0)  # moves within an epoch
    mtl = CertifiedTeacher(method="mtl-ibp", alpha=0.3, **FAST).fit(X, y)
    assert mtl.history[:, "alpha"] == [0.3] * FAST["max_epochs"]
    # a schedule parameter can be overridden through skorch's callback parameters
    fixed = CertifiedTeacher(callbacks__kappa_schedule__end=0.5, **FAST).fit(X, y)
    assert fixed.history[-1, "kappa"] == 0.5


def test_partial_fit(small):
    X, y = small
    teacher = CertifiedTeacher(**FAST)
    teacher.partial_fit(X[y < 2], y[y < 2], classes=[0, 1, 2, 3])
    assert list(teacher.classes_) == [0, 1, 2, 3]
    assert len(teacher.history) == FAST["max_epochs"]
    teacher.partial_fit(X, y)
    assert len(teacher.history) == 2 * FAST["max_epochs"]
    assert teacher.history[-1, "eps"] == pytest.approx(teacher.eps_train)
    with pytest.raises(ValueError, match="not seen"):
        teacher.partial_fit(X[:5], np.full(5, 7))
    # fit starts again from scratch
    teacher.fit(X, y)
    assert len(teacher.history) == FAST["max_epochs"]


def test_last_batch_of_one_sample(small):
    X, y = small
    teacher = CertifiedTeacher(**dict(FAST, batch_size=64, max_epochs=2)).fit(X[:129], y[:129])
    assert np.isfinite(teacher.history[:, "train_loss"]).all()


# ----------------------------------------------------------------------------- certification
def test_certify_api(fitted, small):
    X, y = small
    cert = fitted.certify(X[:50])
    assert isinstance(cert, Certificate)
    assert cert.eps == pytest.approx(fitted.eps) and cert.method == "ibp+crown-ibp+crown"
    assert cert.margins.shape == (50, 4) and cert.certified.dtype == bool
    np.testing.assert_array_equal(fitted.classes_[cert.prediction], fitted.predict(X[:50]))
    labelled = fitted.certify(X[:50], y=y[:50], method="ibp")
    assert fitted.certified_accuracy(X[:50], y[:50], method="ibp") == pytest.approx(
        labelled.certified.mean()
    )
    both = fitted.certify(X[:50], y=y[:50], method=("ibp", "crown"))
    crown = fitted.certify(X[:50], y=y[:50], method="crown")
    assert both.method == "ibp+crown"
    # A cascade: CROWN runs on the samples IBP left open and keeps the larger bound per margin.
    assert np.all(both.certified == (labelled.certified | crown.certified))
    assert np.all(both.margins >= labelled.margins - 1e-7)
    still_open = labelled.status == "unknown"  # not certified, clean prediction right
    assert np.all(labelled.status[~labelled.certified & ~still_open] == "falsified")
    assert np.all(both.margins[still_open] >= crown.margins[still_open] - 1e-5)
    assert set(both.decided_by[both.certified]) <= {"ibp", "crown"}
    bigger = fitted.certify(X[:50], eps=0.5, method="ibp")
    assert (
        bigger.eps == 0.5
        and bigger.certified.sum() <= fitted.certify(X[:50], method="ibp").certified.sum()
    )


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_certified_radius_consistent(fitted, small, method):
    X, y = small
    max_eps, tol = 0.5, 1e-3
    radius = fitted.certified_radius(X[:20], y=y[:20], method=method, max_eps=max_eps, tol=tol)
    assert radius.shape == (20,) and np.all((radius >= 0) & (radius <= max_eps))
    assert 0 < np.count_nonzero(radius) and np.all(radius < max_eps)
    for r, x, label in zip(radius, X[:20], y[:20], strict=True):
        # certified at the radius (with the label: robustly correct), not a little above it
        assert fitted.certify(x[None], eps=float(r), y=[label], method=method).certified[0] == (
            r > 0
        )
        assert not fitted.certify(
            x[None], eps=float(r) + 2 * tol, y=[label], method=method
        ).certified[0]


def test_training_raises_certified_accuracy(digits):
    """A short certified fit certifies far more than an untrained or a plainly trained net."""
    Xtr, Xte, ytr, yte = digits
    common = dict(
        eps=0.1,
        lower=0.0,
        upper=1.0,
        random_state=0,
        lr=5e-3,
        module__hidden_sizes=(128,),
        max_epochs=20,
    )
    certified = CertifiedTeacher(method="ibp", eps_train_ratio=1.5, **common).fit(Xtr, ytr)
    plain = CertifiedTeacher(method="ibp", eps_train_ratio=0.0, **common).fit(Xtr, ytr)
    untrained = CertifiedTeacher(method="ibp", **dict(common, max_epochs=0)).fit(Xtr, ytr)
    cert_acc = certified.certified_accuracy(Xte, yte, method="ibp")
    plain_acc = plain.certified_accuracy(Xte, yte, method="ibp")
    untrained_acc = untrained.certified_accuracy(Xte, yte, method="ibp")
    assert plain.score(Xte, yte) > 0.9  # the plain net is a good classifier...
    assert cert_acc > 0.6  # ...but only certified training makes it certifiably robust
    assert cert_acc > plain_acc + 0.4
    assert cert_acc > untrained_acc + 0.4
    assert certified.score(Xte, yte) > 0.85


# ----------------------------------------------------------------------------- sklearn API
def test_params_stored_verbatim_and_clone():
    params = dict(
        eps=0.2,
        method="mtl-ibp",
        eps_train_ratio=1.3,
        warmup=0.1,
        ramp=0.4,
        kappa_start=0.9,
        kappa_end=0.2,
        beta_start=0.8,
        beta_end=0.1,
        alpha=0.7,
        pgd_steps=3,
        pgd_step_size=0.05,
        reg_lambda=0.1,
        reg_tol=0.4,
        input_shape=(1, 8, 8),
        lower=0.0,
        upper=1.0,
        random_state=3,
        lr_milestones=(0.5,),
        lr_gamma=0.5,
        grad_clip=None,
        lr=0.02,
        max_epochs=7,
        batch_size=32,
    )
    teacher = CertifiedTeacher(**params)
    got = teacher.get_params()
    for key, value in params.items():
        assert got[key] == value, key
    cloned = clone(teacher)
    assert cloned is not teacher
    for key, value in params.items():
        assert cloned.get_params()[key] == value
    teacher.set_params(eps=0.3, method="ibp")
    assert teacher.eps == 0.3 and teacher.method == "ibp"


def test_certified_accuracy_scorer(fitted, small):
    X, y = small
    scorer = CertifiedAccuracy(0.05, method="ibp")
    assert scorer(fitted, X, y) == pytest.approx(fitted.certified_accuracy(X, y, 0.05, "ibp"))
    weights = np.where(np.arange(len(y)) < 100, 1.0, 0.0)
    assert scorer(fitted, X, y, sample_weight=weights) == pytest.approx(
        fitted.certified_accuracy(X[:100], y[:100], 0.05, "ibp")
    )
    assert "0.05" in repr(scorer)
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(TypeError, match="certify"):
        scorer(LogisticRegression().fit(X, y), X, y)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_grid_search_over_eps_and_method(small, n_jobs):
    X, y = small
    grid = GridSearchCV(
        CertifiedTeacher(lower=0.0, upper=1.0, **dict(FAST, max_epochs=3)),
        param_grid={"eps": [0.02, 0.05], "method": ["ibp", "crown-ibp"]},
        scoring={
            "accuracy": "accuracy",
            "certified": CertifiedAccuracy(0.05),
            "certified_ibp": CertifiedAccuracy(0.05, method="ibp"),
        },
        refit="certified",
        cv=2,
        n_jobs=n_jobs,
    )
    grid.fit(X, y)
    results = grid.cv_results_
    for key in ("mean_test_accuracy", "mean_test_certified", "mean_test_certified_ibp"):
        assert len(results[key]) == 4 and np.all(np.isfinite(results[key]))
    best = int(np.argmax(results["mean_test_certified"]))
    assert grid.best_params_ == results["params"][best]
    assert isinstance(grid.best_estimator_, CertifiedTeacher)
    assert grid.best_estimator_.eps == grid.best_params_["eps"]
    assert grid.score(X, y) == pytest.approx(CertifiedAccuracy(0.05)(grid.best_estimator_, X, y))


def test_pipeline_on_breast_cancer():
    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    pipe = make_pipeline(
        MinMaxScaler(clip=True),
        CertifiedTeacher(lower=0.0, upper=1.0, **dict(FAST, max_epochs=10)),
    )
    grid = GridSearchCV(
        pipe,
        param_grid={"certifiedteacher__eps": [0.01, 0.03]},
        scoring={"accuracy": "accuracy", "certified": CertifiedAccuracy(0.01)},
        refit="certified",
        cv=2,
        n_jobs=2,
    ).fit(Xtr, ytr)
    assert grid.best_estimator_.score(Xte, yte) > 0.85
    # refit="certified": the search scores with certified accuracy through the pipeline
    assert grid.score(Xte, yte) == CertifiedAccuracy(0.01)(grid.best_estimator_, Xte, yte)
    final = grid.best_estimator_[-1]
    scaled = grid.best_estimator_[0].transform(Xte)
    assert grid.score(Xte, yte) == final.certified_accuracy(scaled, yte, eps=0.01)
    assert final.n_features_in_ == 30 and list(final.classes_) == [0, 1]


def test_joblib_round_trip_in_fresh_process(fitted, small, tmp_path):
    X, _ = small
    path = tmp_path / "teacher.joblib"
    joblib.dump(fitted, path)
    np.save(tmp_path / "X.npy", X[:40])
    script = textwrap.dedent(
        f"""
        import joblib, numpy as np
        teacher = joblib.load({str(path)!r})
        X = np.load({str(tmp_path / "X.npy")!r})
        cert = teacher.certify(X, method="crown")
        np.savez({str(tmp_path / "out.npz")!r}, predict=teacher.predict(X),
                 proba=teacher.predict_proba(X), margins=cert.margins,
                 certified=cert.certified, prediction=cert.prediction)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    out = np.load(tmp_path / "out.npz")
    cert = fitted.certify(X[:40], method="crown")
    np.testing.assert_array_equal(out["predict"], fitted.predict(X[:40]))
    np.testing.assert_array_equal(out["proba"], fitted.predict_proba(X[:40]))
    np.testing.assert_array_equal(out["margins"], cert.margins)
    np.testing.assert_array_equal(out["certified"], cert.certified)
    np.testing.assert_array_equal(out["prediction"], cert.prediction)


def test_set_params_device_moves_a_fitted_network():
    """skorch keeps ``device`` as a plain attribute; a fitted estimator must follow it."""
    X, y = load_digits(return_X_y=True)
    net = CertifiedTeacher(
        method="ibp", max_epochs=1, module__hidden_sizes=(8,), random_state=0
    ).fit(X[:100] / 16, y[:100])
    net.set_params(device="meta")  # a device without data: no GPU needed to see the move
    assert {p.device.type for p in net.module_.parameters()} == {"meta"}
    states = [
        v
        for s in net.optimizer_.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    ]
    assert states and {v.device.type for v in states} == {"meta"}
    assert net.device == "meta"


# ------------------------------------------------------------------- small data sets
@pytest.mark.parametrize(
    "n, batch_size, max_epochs, expected",
    [
        (125, 128, None, 500),
        (377, 128, None, 167),
        (1257, 128, None, 60),
        (125, 128, 7, 7),
        (125, 16, None, 63),
    ],
)
def test_default_epochs_reach_enough_optimiser_steps(n, batch_size, max_epochs, expected):
    teacher = CertifiedTeacher(batch_size=batch_size, max_epochs=max_epochs)
    assert teacher._epochs_for(n) == expected


def test_default_epochs_train_a_tiny_data_set_and_schedules_stretch(small):
    X, y = small
    teacher = CertifiedTeacher(
        method="ibp", lr=1e-2, random_state=0, module__hidden_sizes=(16,)
    ).fit(X[:40], y[:40])
    assert teacher.n_epochs_ == len(teacher.history) == 500  # one batch per epoch
    eps = teacher.history[:, "eps"]
    assert eps[0] == 0.0 and eps[-1] == pytest.approx(teacher.eps_train)
    assert teacher.score(X[:40], y[:40]) > 0.9


def test_a_collapsed_fit_warns(small):
    from sklearn.exceptions import ConvergenceWarning

    X, y = small
    net = nn.Sequential(nn.Linear(X.shape[1], 4))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    with pytest.warns(ConvergenceWarning, match="single class 2"):
        CertifiedTeacher(net, lr=0.0, max_epochs=1, random_state=0).fit(X, y)


@pytest.mark.parametrize("shuffle", [False, True])
def test_tensor_batches_train_as_the_data_loader_does(monkeypatch, shuffle):
    """Batches by tensor indexing are the DataLoader's: the same fitted weights."""
    X, y = load_digits(return_X_y=True)
    X = (X[:300] / 16).astype(np.float32)
    y = y[:300]
    params = dict(
        method="ibp",
        eps=0.05,
        lower=0.0,
        upper=1.0,
        max_epochs=2,
        batch_size=64,
        random_state=0,
        module__hidden_sizes=(16,),
        iterator_train__shuffle=shuffle,
    )
    fast = CertifiedTeacher(**params).fit(X, y)
    monkeypatch.setattr(CertifiedTeacher, "_tensor_batches", False)
    slow = CertifiedTeacher(**params).fit(X, y)
    np.testing.assert_allclose(fast.predict_proba(X), slow.predict_proba(X), atol=1e-6)


def test_sabr_box_lies_inside_the_ball_around_the_attack():
    from certdistill.estimators.teacher import sabr_center

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(64, 10, generator=generator)
    eps = torch.rand(10, generator=generator) * 0.2
    x_adv = x + eps * (2 * torch.rand(64, 10, generator=generator) - 1)
    for fraction in (0.1, 0.4, 1.0):
        center = sabr_center(x, x_adv, eps, fraction)
        assert torch.all((center - x).abs() + fraction * eps <= eps + 1e-7)
        # moved only as far as needed: a point already deep inside stays where it is
        inside = (x_adv - x).abs() <= (1 - fraction) * eps
        assert torch.equal(center[inside], x_adv[inside])


def test_sabr_trains_a_network_certified_by_the_sound_bounds(small):
    X, y = small
    sabr = CertifiedTeacher(
        method="sabr", sabr_lambda=0.3, pgd_steps=3, eps=0.05, **{**FAST, "max_epochs": 8}
    ).fit(X, y)
    assert np.isfinite(sabr.history[:, "train_loss"]).all()
    assert sabr.score(X, y) > 0.5
    # The certificate is on the whole ball, whatever the training: sampled points agree.
    cert = sabr.certify(X[:40], method="crown", y=y[:40])
    certified = np.flatnonzero(cert.certified)
    generator = np.random.default_rng(0)
    for _ in range(20):
        noise = generator.uniform(-0.05, 0.05, size=(len(certified), X.shape[1]))
        points = np.clip(X[certified] + noise, 0.0, 1.0).astype(np.float32)
        assert np.all(sabr.predict(points) == y[certified])
    with pytest.raises(ValueError, match="sabr_lambda"):
        CertifiedTeacher(method="sabr", sabr_lambda=0.0, **FAST).fit(X, y)


def test_loss_fusion_trains_on_the_fused_bound_of_the_worst_case_cross_entropy(small):
    X, y = small
    fused = CertifiedTeacher(method="crown-ibp", loss_fusion=True, **FAST).fit(X, y)
    assert np.isfinite(fused.history[:, "train_loss"]).all()
    assert fused.certify(X[:20], y=y[:20]).certified.shape == (20,)
    x = fused.module_input(X[:64])
    labels = torch.as_tensor(fused._encode_labels(y[:64]))
    fused.module_.eval()
    fused.current_perturbation_ = fused.training_perturbation()
    fused.current_kappa_ = 0.25
    with torch.no_grad():
        fused.current_beta_ = 1.0
        loss, logits = fused.training_loss(x, labels, training=False)
        terms = fused.interval_terms(x, labels, training=False, keep_state=True)
        bound = fused.bound_engine().crown_ibp_cross_entropy(terms.interval_pass)
        expected = 0.75 * bound.mean() + 0.25 * F.cross_entropy(logits, labels)
        torch.testing.assert_close(loss, expected)
        per_margin = fused.set_params(loss_fusion=False).training_loss(x, labels, False)[0]
        assert not torch.allclose(loss, per_margin)
        # At beta = 0 both are IBP's loss.
        fused.current_beta_ = 0.0
        ibp = fused.training_loss(x, labels, training=False)[0]
        fused.set_params(loss_fusion=True)
        torch.testing.assert_close(fused.training_loss(x, labels, training=False)[0], ibp)


def test_loss_fusion_must_be_a_boolean(small):
    X, y = small
    with pytest.raises(ValueError, match="loss_fusion"):
        CertifiedTeacher(method="crown-ibp", loss_fusion="yes", **FAST).fit(X, y)
