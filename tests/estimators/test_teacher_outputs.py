"""TeacherOutputs: the teacher's worst-case logits are sound, "best" is the tightest, cache keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from networks import around
from sklearn.datasets import load_digits

from certdistill import CertifiedTeacher
from certdistill.bounds import Perturbation
from certdistill.estimators.teacher_outputs import TEACHER_BOUNDS, TeacherOutputs
from certdistill.verify.attacks import pgd_attack

EPS = 0.05


@pytest.fixture(scope="module")
def fitted():
    X, y = load_digits(return_X_y=True)
    X, y = (X[:400] / 16.0).astype(np.float32), y[:400]
    teacher = CertifiedTeacher(
        method="ibp",
        eps=EPS,
        lower=0.0,
        upper=1.0,
        max_epochs=3,
        lr=1e-2,
        random_state=0,
        module__hidden_sizes=(32, 32),
    ).fit(X, y)
    return teacher, torch.as_tensor(X[:40]), torch.as_tensor(y[:40])


@pytest.mark.parametrize("bounds", [b for b in TEACHER_BOUNDS if b != "pgd"])
def test_worst_case_logits_bound_every_point_of_the_ball(fitted, bounds):
    teacher, x, y = fitted
    clean, worst = TeacherOutputs(teacher, bounds)(x, y, around(x, EPS, 0.0, 1.0))
    torch.testing.assert_close(clean, teacher.module_.eval()(x))
    assert torch.all(worst.gather(1, y[:, None]) == 0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        noise = (torch.rand(x.shape, generator=generator) * 2 - 1) * EPS
        corners = torch.sign(noise) * EPS
        for delta in (noise, corners):
            with torch.no_grad():
                z = teacher.module_((x + delta).clamp(0.0, 1.0))
            assert torch.all(z - z.gather(1, y[:, None]) <= worst + 1e-5)


def test_best_is_at_least_as_tight_as_each_method(fitted):
    teacher, x, y = fitted
    worst = {
        b: TeacherOutputs(teacher, b)(x, y, around(x, EPS, 0.0, 1.0))[1]
        for b in ("ibp", "crown-ibp", "best")
    }
    assert torch.all(worst["best"] <= worst["ibp"] + 1e-6)
    assert torch.all(worst["best"] <= worst["crown-ibp"] + 1e-6)


def test_pgd_worst_case_is_attained_and_within_the_bounds(fitted):
    teacher, x, y = fitted
    torch.manual_seed(5)  # the attack's random start draws from the global random state
    _, attacked = TeacherOutputs(teacher, "pgd", pgd_steps=10)(x, y, around(x, EPS, 0.0, 1.0))
    clean, bounded = TeacherOutputs(teacher, "ibp")(x, y, around(x, EPS, 0.0, 1.0))
    assert torch.all(attacked <= bounded + 1e-5)  # an attained point never beats a bound
    assert torch.all(attacked.gather(1, y[:, None]) == 0)
    # Attained, sample by sample: the same attack gives points of the ball whose logits these are.
    torch.manual_seed(5)
    points = pgd_attack(teacher.module_, x, y, EPS, steps=10, lower=0.0, upper=1.0)
    assert torch.all((points - x).abs() <= EPS + 1e-6)
    assert torch.all((points >= 0.0) & (points <= 1.0))
    with torch.no_grad():
        logits = teacher.module_.eval()(points)
    torch.testing.assert_close(attacked, logits - logits.gather(1, y[:, None]))
    # Per sample, the attack does what it maximises: the cross-entropy of its point is above the
    # clean point's (the worst-case logits are 0 at the label, so it is their logsumexp).
    shifted = clean - clean.gather(1, y[:, None])
    assert torch.all(torch.logsumexp(attacked, 1) > torch.logsumexp(shifted, 1))


def test_cache_serves_repeated_batches_and_follows_eps_and_labels(fitted):
    teacher, x, y = fitted
    outputs = TeacherOutputs(teacher, "ibp")
    ball, wider = around(x, EPS, 0.0, 1.0), around(x, 2 * EPS, 0.0, 1.0)
    first = outputs(x, y, ball)
    again = outputs(x, y, ball)
    assert (outputs.misses, outputs.hits) == (1, 1)
    torch.testing.assert_close(first[1], again[1])
    reordered = outputs(x.flip(0), y.flip(0), ball)  # keyed by sample, not by position
    assert outputs.hits == 2
    torch.testing.assert_close(reordered[1], first[1].flip(0))
    other_eps = outputs(x, y, wider)
    assert outputs.misses == 2 and torch.all(other_eps[1] >= first[1] - 1e-6)
    other_labels = (y + 1) % 10
    _, worst = outputs(x, other_labels, wider)
    assert outputs.misses == 3 and torch.all(worst.gather(1, other_labels[:, None]) == 0)
    outputs(x + 1e-3, y, wider, cache=False)
    assert outputs.misses == 4


def test_zero_eps_gives_shifted_clean_logits(fitted):
    teacher, x, y = fitted
    clean, worst = TeacherOutputs(teacher, "ibp")(x, y, around(x, 0.0))
    torch.testing.assert_close(worst, clean - clean.gather(1, y[:, None]))


@pytest.mark.parametrize("per_feature", [False, True])
def test_rounded_radius_contains_the_batch_ball_and_takes_few_values(per_feature):
    eps = torch.linspace(0.01, 0.2, 64) if per_feature else 0.2
    ceiling = Perturbation.create(eps, (64,), lower=0.0, upper=1.0)
    outputs = TeacherOutputs(None, "ibp", ceiling=ceiling, levels=8)
    seen = set()
    for fraction in np.concatenate([np.linspace(1e-4, 1.0, 997), [1 / 8, 3 / 8, 7 / 8]]):
        batch = ceiling.scaled(float(fraction))
        rounded = outputs.rounded_up(batch)
        assert torch.all(rounded.eps >= batch.eps)  # the rounded ball contains the batch's
        # ... and is the smallest step that does (or the next one, for float error)
        assert rounded.level <= ceiling.level * (np.ceil(fraction * 8 - 1e-9) + 1) / 8 + 1e-9
        seen.add(rounded.eps.numpy().tobytes())
    assert len(seen) == 8
    assert torch.equal(outputs.rounded_up(ceiling).eps, ceiling.eps)
    beyond = ceiling.scaled(1.5)  # outside the grid: the batch's own radius
    assert outputs.rounded_up(beyond) is beyond
    exact = TeacherOutputs(None, "ibp", ceiling=ceiling, levels=None)
    assert exact.rounded_up(ceiling.scaled(0.3)).level == pytest.approx(0.3 * ceiling.level)


def test_rounded_worst_case_bounds_the_batch_ball_and_is_computed_once_per_step(fitted):
    teacher, x, y = fitted
    ceiling = around(x, 2 * EPS, 0.0, 1.0)
    outputs = TeacherOutputs(teacher, "ibp", ceiling=ceiling, levels=4)
    exact = TeacherOutputs(teacher, "ibp")
    generator = torch.Generator().manual_seed(1)
    for fraction in (0.26, 0.3, 0.4, 0.49, 0.5):  # one step (0.5 of the ceiling): one miss
        batch = ceiling.scaled(fraction)
        _, worst = outputs(x, y, outputs.rounded_up(batch))
        _, tight = exact(x, y, batch)
        assert torch.all(worst >= tight - 1e-5)  # a larger ball's bounds are looser
        radius = batch.eps
        for _ in range(10):
            delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * radius
            with torch.no_grad():
                z = teacher.module_((x + torch.sign(delta) * radius).clamp(0.0, 1.0))
            assert torch.all(z - z.gather(1, y[:, None]) <= worst + 1e-5)
    assert (outputs.misses, outputs.hits) == (1, 4)
    assert exact.misses == 5
