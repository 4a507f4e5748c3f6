"""scikit-learn's estimator checks on CertifiedTeacher.

Two checks are expected to fail because of skorch itself, not certdistill: skorch's ``__init__``
sets attributes that are not parameters (``history_``, ``initialized_``, ``virtual_params_``;
``check_no_attributes_set_in_init``) and its ``set_params`` accepts and stores arbitrary
``prefix__name`` keys (``check_set_params``). Every other check must pass.
"""

from __future__ import annotations

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from certdistill.teacher import CertifiedTeacher

SKORCH_EXPECTED_FAILURES = {
    "check_no_attributes_set_in_init": (
        "skorch's NeuralNet.__init__ sets history_, initialized_ and virtual_params_"
    ),
    "check_set_params": "skorch's set_params stores and validates parameters its own way",
}


def _expected_failures(estimator) -> dict[str, str]:
    return SKORCH_EXPECTED_FAILURES


def _cheap_teacher(method: str) -> CertifiedTeacher:
    # Tiny network and few epochs: the checks fit many times on small data.
    return CertifiedTeacher(
        method=method,
        max_epochs=3,
        lr=1e-2,
        random_state=0,
        module__hidden_sizes=(16,),
    )


@parametrize_with_checks(
    [_cheap_teacher("crown-ibp"), _cheap_teacher("mtl-ibp")],
    expected_failed_checks=_expected_failures,
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_expected_failures_are_only_skorchs():
    assert set(SKORCH_EXPECTED_FAILURES) == {
        "check_no_attributes_set_in_init",
        "check_set_params",
    }


@pytest.mark.parametrize("name", sorted(SKORCH_EXPECTED_FAILURES))
def test_expected_failures_still_fail(name):
    """The two skorch checks really fail (if skorch fixes them, drop them from the list)."""
    import sklearn.utils.estimator_checks as checks

    check = getattr(checks, name)
    with pytest.raises((AssertionError, AttributeError, TypeError, ValueError)):
        check(type(_cheap_teacher("ibp")).__name__, _cheap_teacher("ibp"))
