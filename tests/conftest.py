"""Shared test configuration: keep every test offline and its state in tmp."""

import os
import re
import tempfile

import pytest

pytest_plugins = ["storage_fixtures", "telluric_night"]

# Nothing in the test-suite may reach a CRDS server; calib tests set their own cache dirs.
os.environ.setdefault("CRDS_MODE", "local")
os.environ.setdefault("MPLBACKEND", "Agg")
# Importing Airflow writes $AIRFLOW_HOME/airflow.cfg: never let a test touch ~/airflow.
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="iris-test-airflow-")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup`` (``make test``) every test module is one unit of work, so that
    its module- and session-scoped fixtures (a simulated night, a live Airflow, a cluster) are
    built on one worker only, once; an ``xdist_group`` mark puts tests of several modules in
    one unit (the telluric night is shared by two modules).

    pytest-xdist 3.8 marks a grouped test by rewriting ``item._nodeid``, which pytest 9 no
    longer reads (a node's id lives in ``item._id``): its own marks had no effect, every
    group spread over the workers and each built the group's fixtures again. The group is
    appended to the id the way xdist means to."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import NodeId

    for item in items:
        if "@" in item.nodeid:  # xdist's own rewrite took effect
            continue
        groups = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                         for mark in item.iter_markers("xdist_group")})
        # an id-safe name: NodeId.parse reads '/', '.' and '::' as structure
        group = "_".join(groups) or re.sub(r"\W", "_", item.nodeid.split("::", 1)[0])
        item._id = NodeId.parse(f"{item.nodeid}@{group}")


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A CLI ``main`` called in-process may configure the root logger with a handler on the
    stream pytest captured for that test; it is closed afterwards. Put the root logger back
    after every test so that no later test logs into a closed stream."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def iris_state(tmp_path, monkeypatch):
    """The orchestration's settings on a fresh state dir: ledger, work area and quarantine
    under ``tmp_path/state``, a landing directory, a local store, no alert webhook."""
    from iris_tasks.config import settings

    monkeypatch.setenv("IRIS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("IRIS_LANDING", str(tmp_path / "landing"))
    monkeypatch.setenv("IRIS_STORE_URL", (tmp_path / "store").as_uri())
    monkeypatch.delenv("IRIS_ALERT_WEBHOOK", raising=False)
    (tmp_path / "landing").mkdir()
    return settings()


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory):
    """An Airflow metadata DB migrated once for the whole run (the first xdist worker that asks
    migrates it, the others wait for it); every test that runs Airflow copies it into its own
    AIRFLOW_HOME (``live_airflow.airflow_test_env``)."""
    from live_airflow import shared_migrated_db

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' base directories share this parent
        root = root.parent
    return shared_migrated_db(root)


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(20261123)
