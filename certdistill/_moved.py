"""The module paths of earlier versions, kept importable after the move into folders by concept.

``import certdistill.teacher`` (and every other path in :data:`MOVED`) returns the module at its
new home, so code and joblib files that name the old paths keep working. Nothing inside the
package imports an old path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: Old module path -> where the module lives now.
MOVED: dict[str, str] = {
    "certdistill.attacks": "certdistill.verify.attacks",
    "certdistill.certify": "certdistill.certification.certify",
    "certdistill.streaming": "certdistill.certification.streaming",
    "certdistill.sparse_rows": "certdistill.certification.sparse_rows",
    "certdistill.verify.vnncomp": "certdistill.certification.vnncomp",
    "certdistill.verify.vnnlib": "certdistill.io.vnnlib",
    "certdistill.parallel": "certdistill.scale.parallel",
    "certdistill.distributed": "certdistill.scale.distributed",
    **{
        f"certdistill.{name}": f"certdistill.estimators.{name}"
        for name in (
            "base",
            "teacher",
            "student",
            "teacher_outputs",
            "transfer",
            "losses",
            "schedules",
            "scoring",
            "models",
            "_architecture",
            "persistence",
            "_safe_config",
        )
    },
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolve an old module path to the module object at its new path (one object, two names)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        # The import system overwrites __spec__ with the alias's; keep the real one to restore.
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._real_spec


def install() -> None:
    """Register the old paths of the modules already imported, and add the finder once.

    Registering first matters for ``certdistill.certify``: the package root's ``certify`` is the
    function, and a first import through the finder would rebind that name to the module.
    """
    for old, new in MOVED.items():
        if new in sys.modules:
            sys.modules.setdefault(old, sys.modules[new])
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
