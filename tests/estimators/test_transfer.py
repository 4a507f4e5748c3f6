"""Transfer sets: unlabelled rows (``y == -1``) and teacher-labelled augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from digits import SMALL_FIT, small_digits
from sklearn.frozen import FrozenEstimator

from certdistill import CertifiedTeacher, DistilledStudent
from certdistill.estimators.guidance import AUTO_SHARE
from certdistill.estimators.transfer import TRANSFER_KINDS, transfer_inputs

TEACHER = {**SMALL_FIT, "method": "ibp", "module__hidden_sizes": (32,)}
STUDENT = {
    **SMALL_FIT,
    "max_epochs": 2,
    "module__hidden_sizes": (16,),
    "batch_size": 50,
    "transfer": (),
}


@pytest.fixture(scope="module")
def small():
    return small_digits(4, 200)


def _rows_trained(student) -> int:
    return int(sum(batch["train_batch_size"] for batch in student.history[0, "batches"]))


def test_unlabelled_rows_are_labelled_by_a_teacher_fitted_on_the_labelled_ones(small):
    X, y = small
    y_semi = y.copy()
    y_semi[100:] = -1
    student = DistilledStudent(CertifiedTeacher(**TEACHER), unlabeled_label=-1, **STUDENT).fit(
        X, y_semi
    )
    np.testing.assert_array_equal(student.classes_, np.unique(y[:100]))
    assert _rows_trained(student) == len(X)  # labelled and unlabelled rows
    # The teacher saw the labelled rows only: the same teacher fitted on them alone.
    alone = CertifiedTeacher(**TEACHER).fit(X[:100], y[:100])
    np.testing.assert_array_equal(student.teacher_.predict_proba(X), alone.predict_proba(X))


def test_unlabelled_rows_take_the_teachers_predictions_as_labels(small, monkeypatch):
    X, y = small
    teacher = CertifiedTeacher(**TEACHER).fit(X[:100], y[:100])
    seen = {}
    original = DistilledStudent.training_loss

    def spy(self, x, labels, training=True):
        seen.setdefault("batches", []).append((x.detach().clone(), labels.clone()))
        return original(self, x, labels, training)

    monkeypatch.setattr(DistilledStudent, "training_loss", spy)
    y_semi = np.concatenate([y[:100], np.full(100, -1)])
    DistilledStudent(
        FrozenEstimator(teacher), unlabeled_label=-1, **dict(STUDENT, max_epochs=1)
    ).fit(X, y_semi)
    inputs = torch.cat([b[0] for b in seen["batches"]]).numpy()
    labels = torch.cat([b[1] for b in seen["batches"]]).numpy()
    np.testing.assert_allclose(inputs, X, rtol=0, atol=0)
    expected = teacher.predict_proba(X[100:]).argmax(1)
    np.testing.assert_array_equal(labels[100:], expected)
    np.testing.assert_array_equal(teacher.classes_[labels[:100]], y[:100])


def test_all_rows_unlabelled_is_an_error(small):
    X, y = small
    with pytest.raises(ValueError, match="unlabelled"):
        DistilledStudent(CertifiedTeacher(**TEACHER), unlabeled_label=-1, **STUDENT).fit(
            X, np.full(len(y), -1)
        )
    # Without unlabeled_label, -1 is an ordinary class (binary problems label -1 and 1).
    pair = np.where(y[:20] % 2 == 0, -1, 1)
    student = DistilledStudent(CertifiedTeacher(**TEACHER), **STUDENT).fit(X[:20], pair)
    np.testing.assert_array_equal(student.classes_, [-1, 1])


@pytest.mark.parametrize("kind", TRANSFER_KINDS)
def test_every_transfer_kind_adds_teacher_labelled_rows_inside_the_domain(small, kind):
    X, y = small
    teacher = CertifiedTeacher(**dict(TEACHER, input_shape=(1, 8, 8))).fit(X, y)
    student = DistilledStudent(
        FrozenEstimator(teacher),
        transfer_size=0.5,
        transfer_keep="all",
        **dict(STUDENT, input_shape=(1, 8, 8), transfer=kind),
    ).fit(X, y)
    assert _rows_trained(student) == len(X) + len(X) // 2 == len(X) + student.transfer_kept_
    assert student.score(X, y) > 0.25


@pytest.mark.parametrize("size", [0.0, 1e-4])
def test_a_transfer_set_of_no_rows_trains_on_the_given_rows(small, size):
    X, y = small
    teacher = FrozenEstimator(CertifiedTeacher(**TEACHER).fit(X, y))
    student = DistilledStudent(
        teacher, transfer_size=size, **dict(STUDENT, transfer=("noise", "ball"))
    ).fit(X, y)
    assert _rows_trained(student) == len(X)


def _trained_rows(monkeypatch, student, X, y) -> tuple[np.ndarray, np.ndarray]:
    """The inputs and labels of the student's first epoch, in the order trained."""
    seen = []
    original = DistilledStudent.training_loss

    def spy(self, x, labels, training=True):
        seen.append((x.detach().clone(), labels.clone()))
        return original(self, x, labels, training)

    with monkeypatch.context() as patch:
        patch.setattr(DistilledStudent, "training_loss", spy)
        student.set_params(max_epochs=1).fit(X, y)
    return torch.cat([b[0] for b in seen]).numpy(), torch.cat([b[1] for b in seen]).numpy()


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_transfer_keep_certified_keeps_the_transfer_rows_the_teacher_certifies(
    small, monkeypatch, eps
):
    X, y = small
    teacher = CertifiedTeacher(**dict(TEACHER, eps=eps, max_epochs=6)).fit(X, y)
    made, shares = {}, {}
    for keep in ("all", "certified", "auto"):
        student = DistilledStudent(
            FrozenEstimator(teacher),
            transfer_keep=keep,
            transfer_size=1.0,
            **dict(STUDENT, eps=eps, transfer=("noise", "ball"), iterator_train__shuffle=False),
        )
        inputs, labels = _trained_rows(monkeypatch, student, X, y)
        np.testing.assert_array_equal(inputs[: len(X)], X)
        made[keep] = inputs[len(X) :], labels[len(X) :], student.transfer_kept_
        shares[keep] = student.transfer_certified_
    rows, labels, count = made["all"]
    assert count == len(rows) == 2 * len(X)
    np.testing.assert_array_equal(labels, teacher.predict_proba(rows).argmax(1))
    # Kept: the rows whose teacher label IBP (the student's teacher_bounds) proves at eps.
    proven = teacher.certify(rows, eps=eps, method="ibp", y=teacher.classes_[labels]).certified
    kept_rows, kept_labels, kept = made["certified"]
    assert kept == int(proven.sum()) == len(kept_rows)
    np.testing.assert_array_equal(kept_rows, rows[proven])
    np.testing.assert_array_equal(kept_labels, labels[proven])
    assert shares["all"] is None
    assert shares["certified"] == shares["auto"] == pytest.approx(proven.mean())
    if eps == 0.05:
        assert 0 < kept < len(rows)  # the filter has both kinds of rows to sort
        assert proven.mean() >= AUTO_SHARE  # so "auto" keeps them all
        expected = made["all"]
    else:
        assert kept < len(rows) * AUTO_SHARE  # a teacher cannot vouch for its labels far out
        expected = made["certified"]
    for got, want in zip(made["auto"], expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_transfer_keep_with_a_pgd_teacher_keeps_what_its_attack_cannot_flip(small):
    X, y = small
    teacher = CertifiedTeacher(**dict(TEACHER, max_epochs=6)).fit(X, y)
    kept = {}
    for bounds in ("ibp", "pgd"):
        student = DistilledStudent(
            FrozenEstimator(teacher),
            teacher_bounds=bounds,
            transfer_keep="certified",
            transfer_size=1.0,
            **dict(STUDENT, max_epochs=1, transfer=("noise", "ball")),
        ).fit(X, y)
        kept[bounds] = student.transfer_kept_
    # Whatever IBP proves, no attack flips: the attack keeps at least as many rows.
    assert kept["ibp"] <= kept["pgd"] <= 2 * len(X)


def test_transfer_keep_is_checked(small):
    X, y = small
    teacher = FrozenEstimator(CertifiedTeacher(**TEACHER).fit(X, y))
    with pytest.raises(ValueError, match="transfer_keep must be one of"):
        DistilledStudent(teacher, transfer_keep="some", **STUDENT).fit(X, y)


def test_transfer_inputs_by_hand():
    rng = np.random.RandomState(0)
    X = rng.uniform(0, 1, (10, 4)).astype(np.float32)
    eps = np.array([0.1, 0.2, 0.0, 0.05], dtype=np.float32)
    lower, upper = np.zeros(4, np.float32), np.ones(4, np.float32)
    for kind, bound in (("noise", 2.0), ("ball", 1.5)):
        made = transfer_inputs(
            X,
            [kind],
            3.0,
            eps,
            lower=lower,
            upper=upper,
            input_shape=None,
            random_state=np.random.RandomState(1),
        )
        assert made.shape == (30, 4) and made.dtype == np.float32
        assert np.all(made >= 0) and np.all(made <= 1)
        distance = np.min(np.abs(made[:, None, :] - X[None]).max(-1) / 1.0, axis=1)
        assert np.all(distance <= bound * eps.max() + 1e-6)
        np.testing.assert_array_equal(made[:, 2], np.clip(made[:, 2], 0, 1))
    mixed = transfer_inputs(
        X,
        ["mixup"],
        1.0,
        eps,
        lower=None,
        upper=None,
        input_shape=None,
        random_state=np.random.RandomState(2),
    )
    assert np.all(mixed >= X.min(0) - 1e-6) and np.all(mixed <= X.max(0) + 1e-6)
    image = np.arange(9, dtype=np.float32).reshape(1, 9) + 1
    shifted = transfer_inputs(
        image,
        ["shift"],
        8.0,
        np.float32(0.1),
        lower=None,
        upper=None,
        input_shape=(1, 3, 3),
        random_state=np.random.RandomState(3),
    )
    grids = shifted.reshape(-1, 3, 3)
    source = image.reshape(3, 3)
    expected = {
        tuple(np.roll(np.pad(source, 1), shift, axis)[1:-1, 1:-1].ravel())
        for shift, axis in ((-1, 0), (1, 0), (-1, 1), (1, 1))
    }
    assert {tuple(grid.ravel()) for grid in grids} <= expected


def test_transfer_parameters_are_checked(small):
    X, y = small
    teacher = FrozenEstimator(CertifiedTeacher(**TEACHER).fit(X, y))
    with pytest.raises(ValueError, match="transfer must name some of"):
        DistilledStudent(teacher, **dict(STUDENT, transfer="rotate")).fit(X, y)
    with pytest.raises(ValueError, match="input_shape"):
        DistilledStudent(teacher, **dict(STUDENT, transfer="shift")).fit(X, y)
    with pytest.raises(ValueError, match="transfer_size"):
        DistilledStudent(teacher, transfer_size=-1.0, **dict(STUDENT, transfer="noise")).fit(X, y)


def test_default_student_has_a_tenth_of_the_teachers_parameters(small):
    X, y = small
    teacher = CertifiedTeacher(**dict(TEACHER, module__hidden_sizes=(128, 128))).fit(X, y)
    size = sum(p.numel() for p in teacher.module_.parameters())
    for fraction in (0.1, 0.3):
        student = DistilledStudent(
            FrozenEstimator(teacher),
            student_size=fraction,
            **{k: v for k, v in STUDENT.items() if k != "module__hidden_sizes"},
        ).fit(X, y)
        ratio = sum(p.numel() for p in student.module_.parameters()) / size
        assert fraction * 0.8 < ratio < fraction * 1.25
    explicit = DistilledStudent(FrozenEstimator(teacher), **STUDENT).fit(X, y)
    assert explicit.module_[0].out_features == 16  # module__hidden_sizes wins


def test_temperature_changes_the_default_student(small):
    X, y = small
    teacher = FrozenEstimator(CertifiedTeacher(**TEACHER).fit(X, y))
    default = {k: v for k, v in STUDENT.items() if k != "transfer"}  # the default transfer set
    students = [DistilledStudent(teacher, temperature=t, **default).fit(X, y) for t in (0.1, 4.0)]
    cold, warm = ([p.detach() for p in s.module_.parameters()] for s in students)
    assert any(not torch.equal(a, b) for a, b in zip(cold, warm, strict=True))
