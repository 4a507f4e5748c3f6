"""Exceptions raised by certdistill."""


class UnsupportedLayerError(TypeError):
    """A module contains a layer the native bound engine cannot propagate bounds through."""


class SafeFormatError(ValueError):
    """An estimator holds something the safe file format (:func:`certdistill.save`) cannot store:
    a layer outside its list, a parameter that is not JSON data or a known class, or an
    estimator class other than ``CertifiedTeacher`` and ``DistilledStudent``. Save it with joblib
    instead (trusted files only)."""
