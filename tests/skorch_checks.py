"""The scikit-learn estimator checks that fail because of skorch, and how exactly they fail.

Shared by the estimator checks of the teacher (``test_estimator_checks.py``) and of the student
(``test_student.py``).
"""

from __future__ import annotations

#: Check name -> reason, for ``parametrize_with_checks(expected_failed_checks=...)``.
SKORCH_EXPECTED_FAILURES = {
    "check_no_attributes_set_in_init": (
        "skorch's NeuralNet.__init__ sets history_, initialized_, virtual_params_ and the "
        "module__* keyword arguments as attributes"
    ),
    "check_set_params": (
        "skorch's get_params lists its private _params_to_validate set, which set_params then "
        "cannot take a value for"
    ),
}

#: Check name -> (exception type, message pattern) that the check raises on a skorch net.
SKORCH_EXPECTED_ERRORS = {
    "check_no_attributes_set_in_init": (
        AssertionError,
        r"should not set any attribute apart from parameters during init\. Found attributes "
        r"\['history_', 'initialized_', .*'virtual_params_'\]",
    ),
    "check_set_params": (AttributeError, r"'float' object has no attribute 'add'"),
}
