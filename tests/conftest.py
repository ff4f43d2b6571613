"""Shared test configuration: keep every test offline and its state in tmp."""

import os

import pytest

# Nothing in the test-suite may reach a CRDS server; calib tests set their own cache dirs.
os.environ.setdefault("CRDS_MODE", "local")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(20261123)
