"""certdistill: certified robustness and certified distillation as scikit-learn estimators."""

from certdistill import _moved
from certdistill._version import __version__
from certdistill.bounds import Perturbation
from certdistill.certification.certify import Certificate, certified_radius, certify
from certdistill.estimators.persistence import load, save
from certdistill.estimators.scoring import CertifiedAccuracy
from certdistill.estimators.student import DistilledStudent
from certdistill.estimators.teacher import CertifiedTeacher
from certdistill.exceptions import SafeFormatError, UnsupportedLayerError
from certdistill.io.onnx_export import export_onnx
from certdistill.io.onnx_import import load_onnx

_moved.install()

__all__ = [
    "Certificate",
    "CertifiedAccuracy",
    "CertifiedTeacher",
    "DistilledStudent",
    "Perturbation",
    "SafeFormatError",
    "UnsupportedLayerError",
    "certified_radius",
    "certify",
    "export_onnx",
    "load",
    "load_onnx",
    "save",
    "__version__",
]
