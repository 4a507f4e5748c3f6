"""Shared test configuration: seeds, one CPU thread, a reproducible Hypothesis profile."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# The helper modules (networks.py, milp.py) live next to the tests and are not a package.
sys.path.insert(0, os.path.dirname(__file__))

# The test networks are tiny: intra-op threading only adds synchronisation, and on a
# loaded 2-core machine two OpenMP threads made a small conv forward/backward ~50x slower.
torch.set_num_threads(1)

# Derandomized and without an example database, so a run is a pure function of the code:
# a failure seen once is seen every time, locally and on CI.
settings.register_profile(
    "certdistill",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("certdistill")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - for any code still drawing from the global state
    yield
