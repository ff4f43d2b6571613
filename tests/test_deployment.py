"""The deployment fingerprint (iris_tasks.orchestration.deployment): what counts, what does not,
and what a refusal says. The live refusal on a cluster host is in test_cluster.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from iris_tasks.errors import TransientError
from iris_tasks.orchestration.deployment import (
    DeploymentMismatch,
    check_deployment,
    code_digest,
    fingerprint,
)

BASE = {
    "IRIS_LANDING": "s3://iris-drs/landing",
    "IRIS_STORE_URL": "s3://iris-drs?conn_id=iris_s3",
    "IRIS_LEDGER_URL": "postgresql://postgres@127.0.0.1:5432/iris_cluster?schema=iris_ledger",
    "IRIS_STATE_DIR": "/srv/root/state",
    "IRIS_COMPUTE_SLOTS": "2",
    "PATH": "/usr/bin",
}


def test_per_host_settings_and_service_addresses_do_not_count():
    host = {**BASE, "IRIS_STATE_DIR": "/mnt/state", "IRIS_COMPUTE_SLOTS": "1",
            "IRIS_LEDGER_URL": "postgresql://postgres@10.77.1.1:5432/iris_cluster?schema=iris_ledger",
            "IRIS_COMPUTE_SOCKET": "/mnt/state/run/compute.sock", "PATH": "/bin"}
    assert fingerprint(host)["id"] == fingerprint(BASE)["id"]


@pytest.mark.parametrize("change", [
    {"IRIS_LANDING": "s3://iris-drs/other"},
    {"IRIS_LEDGER_URL": "postgresql://postgres@127.0.0.1:5432/another_db?schema=iris_ledger"},
    {"IRIS_CALIBRATION_APPROVAL": "operator"},
    {"CRDS_CONTEXT": "tmt_0007.pmap"},
])
def test_shared_configuration_counts_and_is_named(change):
    theirs = fingerprint(BASE)
    with pytest.raises(DeploymentMismatch) as err:
        check_deployment(theirs, host="iris-h9", env={**BASE, **change})
    text = str(err.value)
    assert "host iris-h9 refuses" in text and theirs["id"] in text
    assert fingerprint({**BASE, **change})["id"] in text
    assert f"configuration differs in {next(iter(change))}" in text
    assert next(iter(change.values())) not in text  # values never shown (passwords)
    assert isinstance(err.value, TransientError)  # retried, possibly on another host


def test_code_content_counts_not_file_times(tmp_path: Path):
    repo = Path(__file__).resolve().parents[1]
    copy = tmp_path / "release"
    for sub in ("iris_tasks", "readout_cy", "dags"):
        shutil.copytree(repo / sub, copy / sub, ignore=shutil.ignore_patterns("__pycache__", "build"))
    assert code_digest(copy) == code_digest(repo)  # new mtimes, same content
    with open(copy / "dags" / "iris_realtime.py", "a") as fh:
        fh.write("\n# changed\n")
    assert code_digest(copy) != code_digest(repo)


def test_nothing_published_passes():
    assert check_deployment(None, env=BASE)["id"] == fingerprint(BASE)["id"]
