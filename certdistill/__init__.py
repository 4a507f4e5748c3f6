"""certdistill: certified robustness and certified distillation as scikit-learn estimators."""

from certdistill.bounds import Perturbation
from certdistill.certify import Certificate, certified_radius, certify
from certdistill.exceptions import SafeFormatError, UnsupportedLayerError
from certdistill.io.onnx_export import export_onnx
from certdistill.io.onnx_import import load_onnx
from certdistill.persistence import load, save
from certdistill.scoring import CertifiedAccuracy
from certdistill.student import DistilledStudent
from certdistill.teacher import CertifiedTeacher

__version__ = "0.1.0.dev0"

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
