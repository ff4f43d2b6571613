"""Pytest fixtures for object storage: a real SeaweedFS S3 server and stores on it.

Import the fixtures you need into a test module or into tests/conftest.py::

    from storage_fixtures import seaweedfs, s3_store, local_store, object_store, airflow_s3_conn  # noqa: F401

``seaweedfs`` is session-scoped (one ``weed mini`` per xdist worker, on random loopback ports,
~1 s to start, stopped at the end of the session). Every ``s3_store`` gets its own key prefix
in the shared bucket, so tests never see each other's objects.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from iris_devstack.services.seaweedfs import SeaweedS3
from iris_tasks.storage import LocalStore, ObjectStore
from iris_tasks.storage.s3 import S3Store

TEST_BUCKET = "iris-test"
TEST_CONN_ID = "iris_s3"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A running SeaweedFS S3 server with bucket ``iris-test``; stopped after the session."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"), buckets=[TEST_BUCKET])
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_store(seaweedfs: SeaweedS3) -> S3Store:
    """An S3Store on the session server under a fresh prefix."""
    return S3Store(TEST_BUCKET, f"t-{uuid.uuid4().hex[:12]}", client=seaweedfs.client())


@pytest.fixture
def local_store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    store = LocalStore(tmp_path_factory.mktemp("localstore"))
    store.ensure_bucket()
    return store


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def object_store(request: pytest.FixtureRequest) -> ObjectStore:
    """The same contract test runs against LocalStore and S3Store (SeaweedFS)."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def airflow_s3_conn(seaweedfs: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point ``AIRFLOW_CONN_IRIS_S3`` (and the AWS/IRIS env vars) at the session server;
    returns the connection id."""
    for name, value in seaweedfs.env(TEST_CONN_ID).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("IRIS_STORE_URL", f"s3://{TEST_BUCKET}/t-{uuid.uuid4().hex[:12]}?conn_id={TEST_CONN_ID}")
    return TEST_CONN_ID
