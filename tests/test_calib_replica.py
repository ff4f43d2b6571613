"""The CRDS cache of hosts that share no disk, replicated through the object store
(iris_tasks.calib.replica): on a filesystem store and on a real SeaweedFS S3 server."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from storage_fixtures import local_store, object_store, s3_store, seaweedfs  # noqa: F401

from iris_tasks.calib import replica
from iris_tasks.calib.testing import temporary_cache, write_reference
from iris_tasks.storage import LocalStore, sha256_file


def _dark(tmp_path, name: str, level: float, useafter: str = "2020-01-01T00:00:00"):
    return write_reference(tmp_path / name, "dark", useafter=useafter,
                           data=np.full((8, 8), level, np.float32), DETECTOR="IMG1", READPATT="UTR10")


def test_a_context_published_on_one_host_is_used_on_the_other(object_store, tmp_path):  # noqa: F811
    with temporary_cache(tmp_path / "host_a") as calib:
        ctx_a = calib.publish_references([_dark(tmp_path, "a.fits", 1.0)], "host A's dark")
        pushed = replica.push(object_store)
        names_a = replica.cache.reference_names(ctx_a)
        ref_a = replica.cache.references_dir() / names_a[0]
        digest = sha256_file(ref_a)
    assert pushed["context"] == ctx_a and any(k.endswith(".pmap") for k in pushed["uploaded"])

    with temporary_cache(tmp_path / "host_b") as calib:
        assert calib.operational_context() != ctx_a
        assert replica.pull(object_store) == ctx_a
        assert calib.operational_context() == ctx_a
        ref_b = replica.cache.references_dir() / names_a[0]
        assert sha256_file(ref_b) == digest
        assert ctx_a in replica.cache.verify_context(ctx_a)  # every mapping checksum holds
        assert replica.pull(object_store) is None  # nothing new: one HEAD, nothing installed
        events = [e["event"] for e in calib.context_history()]
        assert "publish" in events  # the audit log came along

        # B builds on A's context and shares the next one.
        ctx_b = calib.publish_references([_dark(tmp_path, "b.fits", 2.0, "2021-01-01T00:00:00")],
                                         "host B's dark")
        replica.push(object_store)
    assert replica.cache.context_serial(ctx_b) == replica.cache.context_serial(ctx_a) + 1

    with temporary_cache(tmp_path / "host_a") as calib:
        assert replica.pull(object_store) == ctx_b
        assert calib.operational_context() == ctx_b


def test_two_hosts_publishing_at_once_are_refused_not_overwritten(object_store, tmp_path):  # noqa: F811
    with temporary_cache(tmp_path / "host_a") as calib:
        base = calib.operational_context()
        replica.push(object_store)
    with temporary_cache(tmp_path / "host_b") as calib:
        replica.pull(object_store)
        assert calib.operational_context() == base
    # Both publish their own dark on the same base, offline from each other: both make N+1.
    with temporary_cache(tmp_path / "host_a") as calib:
        ctx_a = calib.publish_references([_dark(tmp_path, "a.fits", 1.0)], "A")
        replica.push(object_store)
    with temporary_cache(tmp_path / "host_b") as calib:
        ctx_b = calib.publish_references([_dark(tmp_path, "b.fits", 5.0)], "B")
        assert ctx_b == ctx_a  # the same name for other contents
        with pytest.raises(replica.CalibrationError, match=r"another host published"):
            replica.push(object_store)
    with temporary_cache(tmp_path / "host_c") as calib:
        assert replica.pull(object_store) == ctx_a  # the store still holds A's, whole
        ref = replica.cache.references_dir() / replica.cache.reference_names(ctx_a)[0]
        from astropy.io import fits

        assert float(fits.getdata(ref, "SCI")[0, 0]) == 1.0


def test_a_stale_host_cannot_move_the_pointer_back(object_store, tmp_path):  # noqa: F811
    with temporary_cache(tmp_path / "stale") as calib:
        old = calib.operational_context()
    with temporary_cache(tmp_path / "host_a") as calib:
        new = calib.publish_references([_dark(tmp_path, "a.fits", 1.0)], "A")
        replica.push(object_store)
    with temporary_cache(tmp_path / "stale") as calib:
        with pytest.raises(replica.CalibrationError, match="pull first"):
            replica.push(object_store)
        assert calib.operational_context() == old
    with temporary_cache(tmp_path / "host_c") as calib:
        assert replica.pull(object_store) == new


def test_hosts_follow_the_store_through_the_environment(tmp_path, monkeypatch):
    """IRIS_CRDS_STORE: publishing pushes by itself; the orchestration's follow_store pulls,
    at once for a context this host does not have, else every IRIS_CRDS_STORE_POLL s."""
    store_url = (tmp_path / "replica").as_uri()
    with temporary_cache(tmp_path / "host_b") as calib:
        calib.operational_context()
    with temporary_cache(tmp_path / "host_a") as calib:
        monkeypatch.setenv("IRIS_CRDS_STORE", store_url)
        ctx = calib.publish_references([_dark(tmp_path, "a.fits", 1.0)], "A")
        assert LocalStore(tmp_path / "replica").head(replica.POINTER_KEY) is not None
    with temporary_cache(tmp_path / "host_b") as calib:
        monkeypatch.setenv("IRIS_CRDS_STORE", store_url)
        monkeypatch.setenv("IRIS_CRDS_STORE_POLL", "3600")
        replica._last_follow["at"] = float("inf")  # as if it had just looked
        assert calib.follow_store() is None  # throttled
        assert calib.follow_store(ctx) == ctx  # named but missing here: fetched now
        assert calib.operational_context() == ctx


def test_an_unreachable_store_keeps_the_local_context(tmp_path, monkeypatch, caplog):
    with temporary_cache(tmp_path / "host") as calib:
        here = calib.operational_context()
        monkeypatch.setenv("IRIS_CRDS_STORE", "s3://iris-calib/crds?endpoint_url=http://127.0.0.1:9")
        monkeypatch.setenv("IRIS_CRDS_STORE_POLL", "0")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        with caplog.at_level(logging.WARNING, logger="iris_tasks.calib.replica"):
            assert calib.follow_store() is None
        assert "not reachable" in caplog.text and here in caplog.text
        assert calib.operational_context() == here


def test_the_cli_state_never_follows_the_operational_replica(tmp_path, monkeypatch):
    from iris_tasks.config import state_environment

    monkeypatch.setenv("IRIS_CRDS_STORE", "s3://iris-calib/crds")
    assert state_environment(tmp_path)["IRIS_CRDS_STORE"] is None


def test_a_publication_raced_by_another_host_lands_on_top_of_it(tmp_path, monkeypatch):
    """Host A (another process) publishes between host B's pull and B's push: B's push is
    refused, B takes its context back, installs A's and publishes on top of it."""
    import subprocess
    import sys

    url = (tmp_path / "replica").as_uri()
    dark_a = _dark(tmp_path, "a.fits", 1.0)
    dark_b = _dark(tmp_path, "b.fits", 2.0, "2021-01-01T00:00:00")

    class RacedStore(LocalStore):
        raced = False

        def put_file(self, *args, **kwargs):
            if not RacedStore.raced:
                RacedStore.raced = True
                subprocess.run([sys.executable, "-m", "iris_tasks.calib", "--cache",
                                str(tmp_path / "host_a"), "publish", str(dark_a), "-m", "A"],
                               env={**os.environ, "IRIS_CRDS_STORE": url}, check=True,
                               capture_output=True, text=True)
            return super().put_file(*args, **kwargs)

    with temporary_cache(tmp_path / "host_b") as calib:
        base = replica.cache.context_serial(calib.operational_context())
        monkeypatch.setattr(replica, "replica_store", lambda: RacedStore(tmp_path / "replica"))
        ctx_b = calib.publish_references([dark_b], "B")
        assert RacedStore.raced
        assert replica.cache.context_serial(ctx_b) == base + 2, ctx_b
        darks = [n for n in replica.cache.reference_names(ctx_b) if "_dark_" in n]
        assert len(darks) == 2  # A's rule kept, B's added on top
        history = [(e["event"], e.get("description")) for e in calib.context_history()]
        assert ("publish", "A") in history and ("publish", "B") in history
    with temporary_cache(tmp_path / "host_c") as calib:
        assert replica.pull(LocalStore(tmp_path / "replica")) == ctx_b


def test_a_cache_that_published_without_the_store_is_told_it_diverged(object_store, tmp_path):  # noqa: F811
    with temporary_cache(tmp_path / "host_a") as calib:
        calib.publish_references([_dark(tmp_path, "a.fits", 1.0)], "A")
        replica.push(object_store)
    with temporary_cache(tmp_path / "host_b") as calib:
        mine = calib.publish_references([_dark(tmp_path, "b.fits", 3.0)], "B, not shared")
        with pytest.raises(replica.ReplicaConflictError, match="differs from"):
            replica.pull(object_store)
        assert calib.operational_context() == mine  # nothing installed over it


def test_calib_sync_shares_a_cache_from_the_command_line(tmp_path):
    import json
    import subprocess
    import sys

    url = (tmp_path / "replica").as_uri()
    with temporary_cache(tmp_path / "root") as calib:
        ctx = calib.publish_references([_dark(tmp_path, "a.fits", 1.0)], "published offline")
    run = subprocess.run([sys.executable, "-m", "iris_tasks.calib", "--cache", str(tmp_path / "root"),
                          "sync", "--store", url], capture_output=True, text=True, check=True)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["operational"] == ctx and report["uploaded"] > 0
    with temporary_cache(tmp_path / "host") as calib:
        assert replica.pull(LocalStore(tmp_path / "replica")) == ctx
    missing = subprocess.run([sys.executable, "-m", "iris_tasks.calib", "--cache", str(tmp_path / "root"),
                              "sync"], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "IRIS_CRDS_STORE"})
    assert missing.returncode != 0 and "IRIS_CRDS_STORE" in missing.stderr
