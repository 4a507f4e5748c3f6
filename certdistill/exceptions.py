"""Exceptions raised by certdistill."""


class UnsupportedLayerError(TypeError):
    """A module contains a layer the native bound engine cannot propagate bounds through."""


class NotFittedTeacherError(ValueError):
    """A student was given a teacher that has not been fitted and cannot be fitted here."""
