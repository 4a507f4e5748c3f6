"""The opt-in allocator setting: it takes effect on glibc and training still works after it."""

import subprocess
import sys

import pytest

from certdistill.scale.allocator import retain_freed_memory

_SCRIPT = """
import numpy as np
import sys
import torch
from certdistill import CertifiedTeacher
from certdistill.scale.allocator import retain_freed_memory

applied = retain_freed_memory()
rng = np.random.default_rng(0)
X = rng.random((64, 6)).astype(np.float32)
y = (X[:, 0] > 0.5).astype(np.int64)
teacher = CertifiedTeacher(eps=0.05, max_epochs=2, random_state=0, verbose=0).fit(X, y)
print(applied, float(np.mean(teacher.predict(X) == y)))
"""


def test_retain_freed_memory_reports_whether_it_applied():
    # Run in a child process: the setting is global to the process that makes it.
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True
    ).stdout.split()
    applied, accuracy = out[-2] == "True", float(out[-1])
    if sys.platform.startswith("linux") and _is_glibc():
        assert applied
    else:
        assert not applied
    assert 0.0 <= accuracy <= 1.0


def _is_glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(sys.platform.startswith("linux"), reason="the non-Linux branch")
def test_retain_freed_memory_is_a_no_op_elsewhere():
    assert retain_freed_memory() is False
