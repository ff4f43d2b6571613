"""Shared test configuration: keep every test offline and its state in tmp."""

import os
import tempfile

import pytest

pytest_plugins = ["storage_fixtures"]

# Nothing in the test-suite may reach a CRDS server; calib tests set their own cache dirs.
os.environ.setdefault("CRDS_MODE", "local")
os.environ.setdefault("MPLBACKEND", "Agg")
# Importing Airflow writes $AIRFLOW_HOME/airflow.cfg: never let a test touch ~/airflow.
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="iris-test-airflow-")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(20261123)
