"""Exceptions raised by certdistill."""


class UnsupportedLayerError(TypeError):
    """A module contains a layer the native bound engine cannot propagate bounds through."""
