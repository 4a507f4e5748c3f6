"""The optional auto_LiRPA backend fails clearly when auto_LiRPA cannot be imported."""

import sys

import pytest
import torch
from torch import nn

from certdistill import certify


def test_missing_auto_lirpa_raises_import_error_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "auto_LiRPA", None)  # makes `import auto_LiRPA` fail
    module = nn.Sequential(nn.Linear(4, 3)).eval()
    with pytest.raises(ImportError, match="auto_LiRPA.*install"):
        certify(module, torch.rand(2, 4), 0.1, backend="auto_lirpa")


def test_unknown_backend_is_a_value_error():
    module = nn.Sequential(nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match="backend"):
        certify(module, torch.rand(2, 4), 0.1, backend="marabou")
