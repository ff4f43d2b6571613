"""Object-store contract (LocalStore and S3Store on a real SeaweedFS) and S3 specifics."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from iris_tasks.storage import (
    ChecksumMismatchError,
    LocalStore,
    ObjectConflictError,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    open_store,
    parse_product_key,
    product_key,
    sha256_file,
)
from iris_tasks.storage.s3 import S3Store, default_transfer_config

# Fixtures (seaweedfs, s3_store, local_store, object_store, airflow_s3_conn) live there.
pytest_plugins = ["storage_fixtures"]
TEST_BUCKET = "iris-test"  # the bucket storage_fixtures.seaweedfs creates

MiB = 1 << 20


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _corrupt_stored(store: ObjectStore, key: str, data: bytes) -> None:
    """Replace the stored bytes behind the store's back, keeping its recorded checksum
    (what bit rot or a buggy writer would do)."""
    if isinstance(store, LocalStore):
        path = store.root / key
        with open(path, "r+b") as f:  # in place: same file, sidecar untouched
            f.write(data)
    else:
        assert isinstance(store, S3Store)
        old = store.client.head_object(Bucket=store.bucket, Key=store.prefix + key)
        store.client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=data,
                                Metadata=old["Metadata"])


# -- contract, run on both stores ------------------------------------------------------------

def test_put_get_roundtrip(object_store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    src = _write(tmp_path / "in.fits", data)
    info = object_store.put_file(src, "raw/2026-11-23/IMG1/IMG1-SCI/in.fits", {"OBSNAME": "IMG1-SCI"})
    assert info.size == len(data)
    assert info.sha256 == sha256_file(src)
    assert not info.skipped
    assert info.verified
    assert info.metadata == {"obsname": "IMG1-SCI"}
    assert object_store.exists(info.key)
    head = object_store.head(info.key)
    assert head is not None and head.sha256 == info.sha256 and head.size == len(data)

    out = object_store.get_file(info.key, tmp_path / "out" / "copy.fits")
    assert out.read_bytes() == data
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".iris-tmp-")]


def test_reput_is_idempotent(object_store: ObjectStore, tmp_path: Path) -> None:
    src = _write(tmp_path / "a.fits", os.urandom(1000))
    first = object_store.put_file(src, "products/a.fits")
    again = object_store.put_file(src, "products/a.fits")
    assert again.skipped
    assert again.sha256 == first.sha256
    assert again.last_modified == first.last_modified


def test_conflicting_content_is_an_error_unless_overwrite(object_store: ObjectStore, tmp_path: Path) -> None:
    a = _write(tmp_path / "a.fits", b"A" * 100)
    b = _write(tmp_path / "b.fits", b"B" * 120)
    object_store.put_file(a, "products/x.fits")
    with pytest.raises(ObjectConflictError, match="products/x.fits"):
        object_store.put_file(b, "products/x.fits")
    assert object_store.head("products/x.fits").sha256 == sha256_file(a)

    info = object_store.put_file(b, "products/x.fits", overwrite=True)
    assert not info.skipped and info.sha256 == sha256_file(b) and info.size == 120
    assert object_store.get_file("products/x.fits", tmp_path / "back").read_bytes() == b"B" * 120


def test_missing_objects(object_store: ObjectStore, tmp_path: Path) -> None:
    assert object_store.head("nope/x.fits") is None
    assert not object_store.exists("nope/x.fits")
    with pytest.raises(ObjectNotFoundError, match="nope/x.fits"):
        object_store.get_file("nope/x.fits", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert object_store.delete("nope/x.fits") is False


def test_list_and_delete(object_store: ObjectStore, tmp_path: Path) -> None:
    src = _write(tmp_path / "f", b"x")
    keys = ["raw/2026-11-23/IMG1/A/1.fits", "raw/2026-11-23/IMG1/A/2.fits",
            "raw/2026-11-24/IMG1/A/3.fits", "products/2026-11-23/IMG1/A/1_cal.fits"]
    for k in keys:
        object_store.put_file(src, k)
    assert [o.key for o in object_store.list("raw/2026-11-23/")] == keys[:2]
    assert [o.key for o in object_store.list("raw/")] == keys[:3]
    assert [o.key for o in object_store.list("raw/2026-11-2")] == keys[:3]  # plain string prefix
    assert sorted(o.key for o in object_store.list()) == sorted(keys)
    assert all(o.size == 1 for o in object_store.list())
    assert object_store.delete(keys[0]) is True
    assert not object_store.exists(keys[0])
    assert [o.key for o in object_store.list("raw/2026-11-23/")] == keys[1:2]


def test_stored_corruption_is_detected_on_download(object_store: ObjectStore, tmp_path: Path) -> None:
    src = _write(tmp_path / "a.fits", b"good data " * 100)
    object_store.put_file(src, "products/a.fits")
    _corrupt_stored(object_store, "products/a.fits", b"BAD!")
    dest = tmp_path / "dl" / "a.fits"
    with pytest.raises(ChecksumMismatchError, match="products/a.fits"):
        object_store.get_file("products/a.fits", dest)
    assert not dest.exists()  # never exposes unverified bytes
    assert [p.name for p in dest.parent.iterdir()] == []
    # Unverified download stays possible for forensics.
    assert object_store.get_file("products/a.fits", dest, verify=False).read_bytes().startswith(b"BAD!")


def test_local_copy_verification(object_store: ObjectStore, tmp_path: Path) -> None:
    src = _write(tmp_path / "a.fits", os.urandom(4096))
    object_store.put_file(src, "products/a.fits")
    dest = object_store.get_file("products/a.fits", tmp_path / "copy.fits")
    object_store.verify_file("products/a.fits", dest)
    raw = bytearray(dest.read_bytes())
    raw[100] ^= 0xFF  # one flipped byte in the local copy
    dest.write_bytes(bytes(raw))
    with pytest.raises(ChecksumMismatchError, match="copy.fits"):
        object_store.verify_file("products/a.fits", dest)


@pytest.mark.parametrize("key", ["", "/abs/x", "a//b", "a/../b", "a/./b", "a b", "a/.iris-meta/x", "é"])
def test_invalid_keys_rejected(object_store: ObjectStore, tmp_path: Path, key: str) -> None:
    src = _write(tmp_path / "a", b"a")
    with pytest.raises(StorageError):
        object_store.put_file(src, key)


def test_missing_source_and_bad_metadata(object_store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        object_store.put_file(tmp_path / "missing.fits", "a.fits")
    src = _write(tmp_path / "a", b"a")
    with pytest.raises(StorageError, match="reserved"):
        object_store.put_file(src, "a.fits", {"sha256": "0" * 64})
    with pytest.raises(StorageError, match="ASCII"):
        object_store.put_file(src, "a.fits", {"note": "Maunakea – ok"})


def test_url(object_store: ObjectStore) -> None:
    url = object_store.url("raw/a.fits")
    assert url.startswith("s3://iris-test/t-") or url.startswith("file:///")
    assert url.endswith("/raw/a.fits")


# -- LocalStore specifics ---------------------------------------------------------------------

def test_local_store_hides_internal_files_and_hashes_foreign_files(local_store: LocalStore,
                                                                   tmp_path: Path) -> None:
    src = _write(tmp_path / "a", b"abc")
    local_store.put_file(src, "p/a.fits")
    # A file dropped into the tree by other means has no sidecar: hashed on demand.
    _write(local_store.root / "p" / "foreign.fits", b"xyz")
    (local_store.root / "p" / ".iris-tmp-123-partial.fits").write_bytes(b"partial")
    assert [o.key for o in local_store.list()] == ["p/a.fits", "p/foreign.fits"]
    assert local_store.head("p/foreign.fits").sha256 == sha256_file(local_store.root / "p" / "foreign.fits")


def test_open_store_local(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path / "s")), LocalStore)
    store = open_store((tmp_path / "s2").as_uri())
    assert isinstance(store, LocalStore) and store.root == (tmp_path / "s2").resolve()
    with pytest.raises(StorageError, match="scheme"):
        open_store("ftp://x/y")
    with pytest.raises(StorageError, match="unknown store URL parameters"):
        open_store("s3://bucket/p?conn=x")


def test_open_store_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IRIS_STORE_URL", str(tmp_path / "envstore"))
    assert open_store().root == (tmp_path / "envstore").resolve()
    monkeypatch.delenv("IRIS_STORE_URL")
    with pytest.raises(StorageError, match="IRIS_STORE_URL"):
        open_store()


# -- key layout ---------------------------------------------------------------------------------

def test_product_key_layout() -> None:
    key = product_key("2026-11-23", "IMG1", "IMG1-SCI", "/landing/iris_0001_raw.fits", kind="raw")
    assert key == "raw/2026-11-23/IMG1/IMG1-SCI/iris_0001_raw.fits"
    assert product_key("2026-11-23", "IFS", "LEN-SCI", "x_s3d.fits").startswith("products/")
    assert parse_product_key("prefix/" + key) == {
        "kind": "raw", "night": "2026-11-23", "detector": "IMG1", "obsname": "IMG1-SCI",
        "filename": "iris_0001_raw.fits"}
    for bad in [dict(night="23-11-2026"), dict(kind="junk"), dict(detector="IMG 1"),
                dict(obsname="../x")]:
        kw = dict(night="2026-11-23", detector="IMG1", obsname="IMG1-SCI", filename="a.fits", kind="raw")
        kw.update(bad)
        with pytest.raises(StorageError):
            product_key(**kw)


# -- S3 specifics (real SeaweedFS) ----------------------------------------------------------------


@pytest.mark.services
def test_s3_single_part_uses_server_sha256(s3_store: S3Store, tmp_path: Path) -> None:
    src = _write(tmp_path / "a.fits", os.urandom(10_000))
    info = s3_store.put_file(src, "a.fits")
    assert info.verified == "server-sha256"
    raw = s3_store.client.head_object(Bucket=TEST_BUCKET, Key=s3_store.prefix + "a.fits",
                                      ChecksumMode="ENABLED")
    assert raw["Metadata"]["sha256"] == info.sha256
    assert raw["ContentType"] == "application/fits"


@pytest.mark.services
def test_s3_multipart_upload(seaweedfs, tmp_path: Path) -> None:
    store = S3Store(TEST_BUCKET, "mp-" + os.urandom(4).hex(), client=seaweedfs.client(),
                    transfer_config=default_transfer_config(multipart_threshold=5 * MiB,
                                                            multipart_chunksize=5 * MiB,
                                                            max_concurrency=2))
    data = os.urandom(12 * MiB + 123)  # 3 parts, the last one short
    src = _write(tmp_path / "big.fits", data)
    info = store.put_file(src, "big.fits")
    assert info.verified == "composite-sha256"
    assert info.size == len(data) and info.sha256 == sha256_file(src)
    raw = store.client.head_object(Bucket=TEST_BUCKET, Key=store.prefix + "big.fits", ChecksumMode="ENABLED")
    assert raw["ETag"].strip('"').endswith("-3")  # a multipart ETag: not an MD5 of the content
    assert store.put_file(src, "big.fits").skipped
    assert store.get_file("big.fits", tmp_path / "back.fits").read_bytes() == data
    # No multipart uploads left open.
    assert not store.client.list_multipart_uploads(Bucket=TEST_BUCKET, Prefix=store.prefix).get("Uploads")


@pytest.mark.services
def test_s3_multipart_source_changing_is_aborted(seaweedfs, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = S3Store(TEST_BUCKET, "mpc-" + os.urandom(4).hex(), client=seaweedfs.client(),
                    transfer_config=default_transfer_config(multipart_threshold=5 * MiB,
                                                            multipart_chunksize=5 * MiB))
    src = _write(tmp_path / "big.fits", os.urandom(11 * MiB))
    real_upload_part = store.client.upload_part

    def upload_part(**kwargs):
        if kwargs["PartNumber"] == 2:  # another writer changes the file mid-upload
            time.sleep(0.02)  # past the kernel's coarse timestamp tick
            with open(src, "r+b") as f:
                f.write(b"rewritten")
        return real_upload_part(**kwargs)

    monkeypatch.setattr(store.client, "upload_part", upload_part)
    with pytest.raises(ChecksumMismatchError, match="changed during upload"):
        store.put_file(src, "big.fits")
    assert not store.exists("big.fits")
    assert not store.client.list_multipart_uploads(Bucket=TEST_BUCKET, Prefix=store.prefix).get("Uploads")


@pytest.mark.services
def test_s3_bodies_are_hashed_once_for_their_checksum_not_again_for_the_signature(
        s3_store: S3Store, tmp_path: Path) -> None:
    """Each upload carries the signed x-amz-checksum-sha256 the server checks; the SigV4 payload
    hash (a further SHA-256 pass over every byte on plain HTTP) is not computed."""
    seen: list[dict[str, str]] = []

    def capture(request, **_):
        seen.append({k.lower(): v.decode() if isinstance(v, bytes) else v
                     for k, v in request.headers.items()})

    s3_store.client.meta.events.register("before-send.s3.PutObject", capture)
    s3_store.client.meta.events.register("before-send.s3.UploadPart", capture)
    src = _write(tmp_path / "a.fits", b"payload" * 1000)
    s3_store.put_file(src, "a.fits")
    assert seen and all(h["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD" for h in seen)
    assert all("x-amz-checksum-sha256" in h for h in seen)
    assert "x-amz-checksum-sha256" in seen[0]["authorization"].lower()  # the checksum is signed


@pytest.mark.services
def test_s3_corrupted_transfer_rejected_by_server(s3_store: S3Store, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src = _write(tmp_path / "a.fits", b"payload" * 1000)
    import iris_tasks.storage.s3 as s3mod

    # Claim a checksum the bytes on the wire do not have: SeaweedFS must refuse the object.
    monkeypatch.setattr(s3mod, "sha256_file", lambda p: "1" * 64)
    with pytest.raises(ChecksumMismatchError, match="a.fits"):
        s3_store.put_file(src, "a.fits")
    assert not s3_store.exists("a.fits")


@pytest.mark.services
def test_s3_download_corrupted_in_transit(s3_store: S3Store, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    src = _write(tmp_path / "a.fits", b"payload" * 1000)
    s3_store.put_file(src, "a.fits")
    real = s3_store.client.download_file

    def flaky(bucket, key, filename, **kw):
        real(bucket, key, filename, **kw)
        with open(filename, "r+b") as f:
            f.write(b"X")

    monkeypatch.setattr(s3_store.client, "download_file", flaky)
    dest = tmp_path / "dl.fits"
    with pytest.raises(ChecksumMismatchError, match="downloaded content"):
        s3_store.get_file("a.fits", dest)
    assert not dest.exists()


@pytest.mark.services
def test_s3_concurrent_writer_detected_by_conditional_put(s3_store: S3Store, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    a = _write(tmp_path / "a", b"first writer")
    b = _write(tmp_path / "b", b"second writer")
    s3_store.put_file(a, "race.fits")
    real_head = s3_store.head
    calls = {"n": 0}

    def stale_head(key):
        # The first HEAD happens "before" the other writer finished: it sees nothing.
        calls["n"] += 1
        return None if calls["n"] == 1 else real_head(key)

    monkeypatch.setattr(s3_store, "head", stale_head)
    with pytest.raises(ObjectConflictError, match="concurrently"):
        s3_store.put_file(b, "race.fits")
    calls["n"] = 0
    assert s3_store.put_file(a, "race.fits").skipped  # same content: the race is harmless
    assert real_head("race.fits").sha256 == sha256_file(a)


@pytest.mark.services
def test_s3_from_airflow_connection(airflow_s3_conn: str, tmp_path: Path) -> None:
    store = S3Store.from_airflow_conn(airflow_s3_conn, bucket=TEST_BUCKET, prefix="conn-test")
    assert store.client.meta.config.retries["mode"] == "standard"
    src = _write(tmp_path / "a.fits", b"via airflow connection")
    info = store.put_file(src, "a.fits")
    assert info.url == f"s3://{TEST_BUCKET}/conn-test/a.fits"
    # open_store with the URL the fixture exported in IRIS_STORE_URL.
    env_store = open_store()
    assert isinstance(env_store, S3Store) and env_store.bucket == TEST_BUCKET
    env_store.put_file(src, "b.fits")
    assert [o.key for o in env_store.list()] == ["b.fits"]


@pytest.mark.services
def test_open_store_s3_with_endpoint(seaweedfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    store = open_store(f"s3://{TEST_BUCKET}/ep-test?endpoint_url={seaweedfs.endpoint_url}")
    assert isinstance(store, S3Store) and store.prefix == "ep-test/"
    store.ensure_bucket()
    store.put_file(_write(tmp_path / "a", b"a"), "a.fits")
    assert store.exists("a.fits")
    assert store.presigned_url("a.fits").startswith(seaweedfs.endpoint_url)


@pytest.mark.services
def test_s3_ensure_bucket_creates(seaweedfs) -> None:
    name = "iris-new-" + os.urandom(3).hex()
    store = S3Store(name, client=seaweedfs.client())
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    assert name in [b["Name"] for b in seaweedfs.client().list_buckets()["Buckets"]]


def test_s3_unreachable_endpoint_is_a_clear_storage_error(tmp_path: Path) -> None:
    import boto3

    from iris_devstack.services.seaweedfs import pick_ports
    from iris_tasks.storage.s3 import default_botocore_config

    port = pick_ports(1)[0]
    client = boto3.session.Session(aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1") \
        .client("s3", endpoint_url=f"http://127.0.0.1:{port}",
                config=default_botocore_config(retries={"mode": "standard", "total_max_attempts": 1},
                                               connect_timeout=1))
    store = S3Store("b-x", client=client)
    with pytest.raises(StorageError, match=r"object 'a.fits': head failed at http://127.0.0.1"):
        store.head("a.fits")


@pytest.mark.services
def test_s3_missing_bucket_is_named(seaweedfs, tmp_path: Path) -> None:
    store = S3Store("iris-absent-" + os.urandom(3).hex(), client=seaweedfs.client())
    assert store.head("a.fits") is None
    with pytest.raises(StorageError, match="does not exist"):
        store.put_file(_write(tmp_path / "a", b"a"), "a.fits")


@pytest.mark.services
def test_s3_fallbacks_for_servers_without_checksums_or_conditions(
        s3_store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import botocore.exceptions

    # A server that neither returns checksums nor implements conditional writes.
    real_head, real_put = s3_store._head_raw, s3_store.client.put_object

    def head_without_checksum(key):
        resp = real_head(key)
        if resp is not None:
            resp = {k: v for k, v in resp.items() if not k.startswith("Checksum")}
        return resp

    def put_without_conditions(**kw):
        if "IfNoneMatch" in kw or "IfMatch" in kw:
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "NotImplemented", "Message": "no conditional writes"}}, "PutObject")
        resp = real_put(**kw)
        return {k: v for k, v in resp.items() if not k.startswith("Checksum")}

    monkeypatch.setattr(s3_store, "_head_raw", head_without_checksum)
    monkeypatch.setattr(s3_store.client, "put_object", put_without_conditions)
    src = _write(tmp_path / "a.fits", b"no checksum server" * 10)
    info = s3_store.put_file(src, "a.fits")
    assert info.verified == "reread" and not s3_store.conditional_writes
    s3_store.reread_limit = 0
    info = s3_store.put_file(_write(tmp_path / "b.fits", b"bigger" * 10), "b.fits")
    assert info.verified == "metadata"
    assert s3_store.get_file("a.fits", tmp_path / "back.fits").read_bytes() == src.read_bytes()
