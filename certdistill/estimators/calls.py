"""Wrappers of the estimators' public calls: the torch threads of the call, the state kept
when ``fit`` raises, and the keyword arguments ``fit`` refuses."""

from __future__ import annotations

import functools

from certdistill.scale.parallel import torch_threads

__all__ = ["in_torch_threads", "keep_state_on_error", "reject_fit_params"]


def in_torch_threads(method):
    """Run an estimator method with the estimator's ``torch_threads`` (see
    :mod:`certdistill.scale.parallel`); estimators pickled before the parameter existed have
    none."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch_threads(getattr(self, "torch_threads", None)):
            return method(self, *args, **kwargs)

    return wrapper


def keep_state_on_error(method):
    """Run ``fit`` or ``partial_fit`` so that, if it raises, the estimator is left as it was
    before the call: a fitted model stays usable (it predicts and certifies as before) and an
    unfitted one stays unfitted. The attributes are restored, not copied: the fitted network
    is not duplicated."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        state = dict(vars(self))
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            vars(self).clear()
            vars(self).update(state)
            raise

    return wrapper


def reject_fit_params(estimator, fit_params) -> None:
    if fit_params:
        raise TypeError(
            f"{type(estimator).__name__}.fit got unexpected keyword arguments "
            f"{sorted(fit_params)}: sample_weight and extra forward arguments are not supported."
        )
