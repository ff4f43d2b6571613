"""The object store misbehaving: 5xx answers, slow answers, connections cut mid-upload.

A real SeaweedFS behind a fault-injecting proxy on loopback (tests/s3_fault_proxy.py). What
must hold after each fault: the object is stored exactly once with the bytes of the file
(read back and checked against its SHA-256), or the upload fails with a StorageError -- the
error the real-time DAG's storage tasks retry on -- leaving no object and no unfinished
multipart upload behind.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from s3_fault_proxy import FaultProxy
from storage_fixtures import TEST_BUCKET

from iris_tasks.storage import StorageError, sha256_file
from iris_tasks.storage.s3 import S3Store, default_transfer_config

pytestmark = pytest.mark.services

MiB = 1024 * 1024


@pytest.fixture
def proxied(seaweedfs):
    proxy = FaultProxy(seaweedfs.host, seaweedfs.port).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def _store(proxy: FaultProxy, seaweedfs, prefix: str) -> S3Store:
    return S3Store(TEST_BUCKET, prefix, endpoint_url=proxy.url, access_key=seaweedfs.access_key,
                   secret_key=seaweedfs.secret_key, region_name="us-east-1",
                   transfer_config=default_transfer_config(multipart_threshold=5 * MiB,
                                                           multipart_chunksize=5 * MiB))


def _file(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(len(name)).integers(0, 255, size, np.uint8).tobytes())
    return path


def _no_leftovers(seaweedfs, prefix: str) -> None:
    client = seaweedfs.client()
    uploads = client.list_multipart_uploads(Bucket=TEST_BUCKET, Prefix=prefix).get("Uploads", [])
    assert uploads == [], f"unfinished multipart uploads left behind: {uploads}"


def _exactly_once(store: S3Store, key: str, src: Path, tmp_path: Path) -> None:
    keys = [i.key for i in store.list("")]
    assert keys.count(key) == 1, keys
    back = store.get_file(key, tmp_path / f"back-{uuid.uuid4().hex[:6]}", verify=True)
    assert sha256_file(back) == sha256_file(src)


def test_503_and_slow_answers_are_ridden_out(seaweedfs, proxied, tmp_path):
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    store = _store(proxied, seaweedfs, prefix)
    small, big = _file(tmp_path, "small.fits", 200_000), _file(tmp_path, "big.fits", 12 * MiB)

    # Every third request answered 503 SlowDown, every fifth delayed by 1 s.
    def flaky(method: str, path: str, n: int) -> object:
        if n % 3 == 1:
            return "503"
        if n % 5 == 2:
            return ("delay", 1.0)
        return None

    proxied.fault = flaky
    for src in (small, big):
        info = store.put_file(src, f"raw/{src.name}", {"frame_id": "f"})
        assert info.sha256 == sha256_file(src)
    assert any(a == "503" for _, _, a in proxied.requests)
    proxied.fault = lambda *a: None
    for src in (small, big):
        _exactly_once(store, f"raw/{src.name}", src, tmp_path)
    _no_leftovers(seaweedfs, prefix)


def test_a_connection_cut_mid_upload_is_retried(seaweedfs, proxied, tmp_path):
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    store = _store(proxied, seaweedfs, prefix)
    big = _file(tmp_path, "cut.fits", 11 * MiB)
    cuts = []

    def cut_first_two_parts(method: str, path: str, n: int) -> object:
        if method == "PUT" and "partNumber=" in path and len(cuts) < 2:
            cuts.append(path)
            return "reset"
        return None

    proxied.fault = cut_first_two_parts
    store.put_file(big, "raw/cut.fits")
    assert len(cuts) == 2
    proxied.fault = lambda *a: None
    _exactly_once(store, "raw/cut.fits", big, tmp_path)
    _no_leftovers(seaweedfs, prefix)


def test_an_outage_fails_with_a_retryable_error_and_leaves_nothing(seaweedfs, proxied, tmp_path):
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    store = _store(proxied, seaweedfs, prefix)
    src = _file(tmp_path, "down.fits", 7 * MiB)
    # The server accepts the multipart upload, then every request fails: an outage mid-upload.
    proxied.fault = lambda method, path, n: "503" if n >= 2 else None
    with pytest.raises(StorageError):
        store.put_file(src, "raw/down.fits")
    proxied.fault = lambda *a: None
    assert [i.key for i in store.list("")] == []  # nothing visible
    # The abort could not reach the server either; the DAG's storage tasks retry StorageError,
    # and the retry clears the dead try's upload before it stores the file once.
    store.put_file(src, "raw/down.fits")
    _exactly_once(store, "raw/down.fits", src, tmp_path)
    _no_leftovers(seaweedfs, prefix)
