"""S3 object store (boto3), for SeaweedFS in development and any S3 service in operations.

Integrity, in order of strength:

* every object carries ``x-amz-meta-sha256`` (hex SHA-256 of the whole content), computed
  locally before the upload and re-checked on every download;
* single-part uploads also send ``x-amz-checksum-sha256``; the server recomputes it and rejects
  a mismatch (``BadDigest``) so a corrupted transfer never becomes an object;
* multipart uploads send a SHA-256 per part (checked by the server per part) and the client
  checks the server's COMPOSITE checksum (SHA-256 over the part digests, ``...-N``) against
  its own. Multipart ETags are not MD5s of the content and are never used as checksums;
* servers that return no checksum at all: small objects are re-read and hashed after upload,
  large ones are checked by size and metadata only (logged as a warning).

Writes use conditional requests (``If-None-Match: *`` to create, ``If-Match: <etag>`` to
overwrite), so two writers racing on one key cannot silently replace each other's product;
servers that do not implement them fall back to HEAD-then-PUT.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import threading
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from s3transfer.utils import ChunksizeAdjuster

from .base import (
    SHA256_META,
    ChecksumMismatchError,
    ObjectConflictError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    b64_to_hex,
    hex_to_b64,
    sha256_file,
    validate_key,
    validate_metadata,
)

log = logging.getLogger(__name__)

MiB = 1 << 20

#: Uploads at or above this size go multipart (tests lower it to exercise the path). A frame's
#: objects (a 4096^2 UTR10 ramp is 335 MB) go in one PUT: its checksum is the whole-file
#: SHA-256 the store already has, verified by the server, where multipart hashes every part
#: again (client 1.05 vs 1.9 core-s per GiB; upload wall time +15 %, bench/bench_storage.py
#: threshold=, 2026-12-07). S3 takes up to 5 GiB in one PUT.
DEFAULT_MULTIPART_THRESHOLD = 1024 * MiB
DEFAULT_MULTIPART_CHUNKSIZE = 16 * MiB
#: Objects up to this size are re-read after upload when the server reports no checksum.
DEFAULT_REREAD_LIMIT = 16 * MiB

_CONTENT_TYPES = {".fits": "application/fits", ".fit": "application/fits",
                  ".asdf": "application/asdf", ".json": "application/json", ".png": "image/png"}

_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_PRECONDITION = {"412", "PreconditionFailed", "ConditionalRequestConflict"}
_UNSUPPORTED = {"NotImplemented", "501"}


def default_botocore_config(**overrides: Any) -> Config:
    """Client settings: standard retries (transient faults and throttling, with backoff),
    path-style addressing, which S3-compatible servers on an IP/hostname need, and no SigV4
    payload hash: every body this store sends carries an ``x-amz-checksum-sha256`` header
    (signed, and checked by the server), so hashing each body once more for the signature -
    which botocore otherwise does on every plain-HTTP request - would only cost a pass of
    SHA-256 over every byte uploaded (~1 s CPU per 4096^2 imager frame's products)."""
    kw: dict[str, Any] = {
        "retries": {"mode": "standard", "total_max_attempts": 5},
        "s3": {"addressing_style": "path", "payload_signing_enabled": False},
        "connect_timeout": 10,
        "read_timeout": 120,
    }
    kw.update(overrides)
    return Config(**kw)


def default_transfer_config(**overrides: Any) -> TransferConfig:
    kw: dict[str, Any] = {
        "multipart_threshold": DEFAULT_MULTIPART_THRESHOLD,
        "multipart_chunksize": DEFAULT_MULTIPART_CHUNKSIZE,
        "max_concurrency": 4,
        "use_threads": True,
    }
    kw.update(overrides)
    return TransferConfig(**kw)


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def _code(exc: botocore.exceptions.ClientError) -> str:
    err = exc.response.get("Error", {})
    return str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


class S3Store(ObjectStore):
    """Objects in one bucket, optionally under a key prefix (``prefix/`` + key)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region_name: str | None = None,
        transfer_config: TransferConfig | None = None,
        reread_limit: int = DEFAULT_REREAD_LIMIT,
        conditional_writes: bool = True,
    ):
        if not bucket:
            raise StorageError(None, "S3Store needs a bucket name")
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = validate_key(prefix) + "/" if prefix else ""
        if client is None:
            session = boto3.session.Session(
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                region_name=region_name,  # None: boto3's own resolution (env, profile, us-east-1)
            )
            client = session.client("s3", endpoint_url=endpoint_url, config=default_botocore_config())
        self.client = client
        self.region_name = client.meta.region_name
        self.transfer_config = transfer_config or default_transfer_config()
        self.reread_limit = reread_limit
        self.conditional_writes = conditional_writes
        self._cond_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self.bucket!r}, prefix={self.prefix!r}, endpoint={self.client.meta.endpoint_url!r})"

    # -- construction from Airflow -------------------------------------------------------
    @classmethod
    def from_airflow_conn(
        cls,
        conn_id: str = "iris_s3",
        bucket: str | None = None,
        prefix: str = "",
        **kwargs: Any,
    ) -> S3Store:
        """Build a store from an Airflow AWS connection (endpoint, keys, region, botocore config).

        Our retry/addressing defaults apply unless the connection's ``config_kwargs`` extra
        overrides them; ``service_config.s3.bucket_name`` supplies the bucket if none is given,
        ``service_config.s3.transfer_config_args`` tunes multipart transfers.
        """
        try:
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise StorageError(None, "Airflow's amazon provider is not installed; "
                                     "use S3Store(bucket, endpoint_url=...) instead") from exc
        hook = S3Hook(aws_conn_id=conn_id)
        service_cfg = hook.service_config
        bucket = bucket or service_cfg.get("bucket_name")
        if not bucket:
            raise StorageError(None, f"no bucket given and connection {conn_id!r} names none "
                                     "(extra service_config.s3.bucket_name)")
        client = hook.get_client_type(config=default_botocore_config().merge(hook.config))
        if "transfer_config" not in kwargs and service_cfg.get("transfer_config_args"):
            kwargs["transfer_config"] = default_transfer_config(**service_cfg["transfer_config_args"])
        return cls(bucket, prefix, client=client, **kwargs)

    # -- helpers -------------------------------------------------------------------------
    def _full(self, key: str) -> str:
        return self.prefix + validate_key(key)

    @contextmanager
    def _errors(self, key: str | None, op: str) -> Iterator[None]:
        """Turn botocore failures into StorageError naming the key and the operation."""
        try:
            yield
        except StorageError:
            raise
        except botocore.exceptions.FlexibleChecksumError as exc:
            raise ChecksumMismatchError(key, f"{op}: {exc}") from exc
        except botocore.exceptions.ClientError as exc:
            code = _code(exc)
            msg = exc.response.get("Error", {}).get("Message", "")
            if code == "NoSuchBucket":
                raise StorageError(key, f"{op}: bucket {self.bucket!r} does not exist "
                                        "(create it with ensure_bucket())") from exc
            if code in _NOT_FOUND:
                raise ObjectNotFoundError(key, f"{op}: not found in bucket {self.bucket!r}") from exc
            if code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"):
                raise ChecksumMismatchError(key, f"{op}: server rejected the checksum ({code}: {msg})") from exc
            raise StorageError(key, f"{op} failed in bucket {self.bucket!r}: {code} {msg}".strip()) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageError(key, f"{op} failed at {self.client.meta.endpoint_url}: {exc}") from exc

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def presigned_url(self, key: str, expires: int = 3600) -> str:
        """Time-limited HTTP GET URL (for the UI to show quicklooks without credentials)."""
        with self._errors(key, "presign"):
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)}, ExpiresIn=expires
            )

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except botocore.exceptions.ClientError as exc:
            if _code(exc) not in _NOT_FOUND:
                raise StorageError(None, f"bucket {self.bucket!r}: {_code(exc)}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageError(None, f"cannot reach {self.client.meta.endpoint_url}: {exc}") from exc
        kw: dict[str, Any] = {"Bucket": self.bucket}
        if self.region_name and self.region_name != "us-east-1":
            kw["CreateBucketConfiguration"] = {"LocationConstraint": self.region_name}
        try:
            self.client.create_bucket(**kw)
            log.info("created bucket %s", self.bucket)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(None, f"create bucket {self.bucket!r}: {_code(exc)}") from exc

    # -- reads ---------------------------------------------------------------------------
    def _head_raw(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._full(key), ChecksumMode="ENABLED")
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return None
            raise
        # (other errors are wrapped by the caller's _errors context)

    def _info(self, key: str, resp: Mapping[str, Any]) -> ObjectInfo:
        meta = {k.lower(): v for k, v in (resp.get("Metadata") or {}).items()}
        sha = meta.pop(SHA256_META, None)
        server = resp.get("ChecksumSHA256")
        if sha is None and server and "-" not in server:
            # Written by another tool with a full-object checksum only: still verifiable.
            sha = b64_to_hex(server)
        etag = resp.get("ETag")
        return ObjectInfo(
            key=key,
            size=int(resp.get("ContentLength", resp.get("Size", 0))),
            sha256=sha,
            url=self.url(key),
            etag=etag.strip('"') if etag else None,
            last_modified=resp.get("LastModified"),
            metadata=meta,
        )

    def head(self, key: str) -> ObjectInfo | None:
        with self._errors(key, "head"):
            resp = self._head_raw(key)
        return None if resp is None else self._info(key, resp)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        with self._errors(prefix or None, "list"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix):]
                    etag = obj.get("ETag")
                    out.append(ObjectInfo(key=key, size=int(obj.get("Size", 0)), sha256=None,
                                          url=self.url(key), etag=etag.strip('"') if etag else None,
                                          last_modified=obj.get("LastModified")))
        out.sort(key=lambda o: o.key)
        return out

    def get_file(self, key: str, dest: str | os.PathLike[str], *, verify: bool = True) -> Path:
        info = self.head(key)
        if info is None:
            raise ObjectNotFoundError(key, f"does not exist in bucket {self.bucket!r}")
        if verify and info.sha256 is None:
            raise StorageError(key, "no SHA-256 recorded (x-amz-meta-sha256 or a full-object "
                                    "ChecksumSHA256); pass verify=False to download unchecked")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Download beside the destination and rename after the check, so `dest` only ever
        # holds verified content.
        tmp = dest.with_name(f".iris-tmp-{uuid.uuid4().hex}-{dest.name}")
        try:
            with self._errors(key, "download"):
                self.client.download_file(self.bucket, self._full(key), str(tmp),
                                          ExtraArgs={"ChecksumMode": "ENABLED"},
                                          Config=self.transfer_config)
            if verify:
                got = sha256_file(tmp)
                if got != info.sha256:
                    raise ChecksumMismatchError(
                        key, f"downloaded content has SHA-256 {got}, recorded {info.sha256}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    # -- writes --------------------------------------------------------------------------
    def put_file(
        self,
        local_path: str | os.PathLike[str],
        key: str,
        metadata: Mapping[str, object] | None = None,
        *,
        overwrite: bool = False,
        sha256: str | None = None,
    ) -> ObjectInfo:
        full = self._full(key)
        meta = validate_metadata(key, metadata)
        src = Path(local_path)
        if not src.is_file():
            raise StorageError(key, f"local file {str(src)!r} does not exist")
        ident = _identity(src)  # before hashing: a write during the hash changes it too
        size = ident[0]
        # A hash the caller took of this file saves a pass; the server still checks every part
        # (or the whole single-part body) against what is sent, downloads against ``sha``.
        sha = sha256 or sha256_file(src)

        existing = self.head(key)
        if existing is not None:
            if existing.sha256 == sha:
                log.info("put %s: identical content already stored, skipped", key)
                return replace(existing, skipped=True)
            if not overwrite:
                recorded = f"SHA-256 {existing.sha256}" if existing.sha256 else "no recorded checksum"
                raise ObjectConflictError(
                    key, f"exists in bucket {self.bucket!r} with {recorded}, "
                         f"new content has {sha} (pass overwrite=True to replace)")

        meta[SHA256_META] = sha
        # Create only if still absent, or replace only the version we just inspected.
        cond: dict[str, str] = {}
        if self.conditional_writes:
            if existing is None:
                cond = {"IfNoneMatch": "*"}
            elif existing.etag:
                cond = {"IfMatch": f'"{existing.etag}"'}
        ctype = _CONTENT_TYPES.get(src.suffix.lower()) or mimetypes.guess_type(src.name)[0] \
            or "application/octet-stream"

        def upload(cond: dict[str, str]) -> tuple[str | None, str | None]:
            if size >= self.transfer_config.multipart_threshold:
                return self._put_multipart(src, full, key, ident, sha, meta, ctype, cond)
            return self._put_single(src, full, key, sha, meta, ctype, cond)

        with self._errors(key, "upload"):
            try:
                server_checksum, composite = upload(cond)
            except botocore.exceptions.ClientError as exc:
                code = _code(exc)
                if code in _PRECONDITION:
                    # Someone else wrote the key between our HEAD and PUT.
                    other = self.head(key)
                    if other is not None and other.sha256 == sha:
                        return replace(other, skipped=True)
                    raise ObjectConflictError(
                        key, "was written concurrently with different content") from exc
                if code in _UNSUPPORTED and cond:
                    log.warning("%s: server does not implement conditional writes; "
                                "falling back to unconditional PUT", self.client.meta.endpoint_url)
                    with self._cond_lock:
                        self.conditional_writes = False
                    server_checksum, composite = upload({})
                else:
                    raise
        verified = self._verify_upload(key, size, sha, server_checksum, composite)
        log.info("put %s (%d bytes, sha256 %s, verified by %s)", self.url(key), size, sha[:12], verified)
        info = self.head(key)
        if info is None:
            raise StorageError(key, "vanished right after upload")
        return replace(info, verified=verified)

    def _put_single(self, src: Path, full: str, key: str, sha: str, meta: dict[str, str],
                    ctype: str, cond: dict[str, str]) -> tuple[str | None, None]:
        with open(src, "rb") as body:
            resp = self.client.put_object(
                Bucket=self.bucket, Key=full, Body=body, Metadata=meta, ContentType=ctype,
                ChecksumSHA256=hex_to_b64(sha), **cond)
        return resp.get("ChecksumSHA256"), None

    def _abort_unfinished(self, full: str) -> None:
        """Abort unfinished multipart uploads of exactly this key: they are what an earlier
        try left when the server went away before the abort could reach it (one task at a
        time writes a given key, so an unfinished upload of it belongs to a dead try)."""
        try:
            resp = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=full)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in _UNSUPPORTED:
                return
            raise
        for upload in resp.get("Uploads", []) or []:
            if upload.get("Key") != full:
                continue
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full,
                                               UploadId=upload["UploadId"])
            log.warning("aborted the unfinished multipart upload %s of %s left by an earlier "
                        "try", upload["UploadId"], full)

    def _put_multipart(self, src: Path, full: str, key: str, ident: tuple[int, int, int, int],
                       sha: str, meta: dict[str, str], ctype: str, cond: dict[str, str]
                       ) -> tuple[str | None, str]:
        """Multipart upload with a SHA-256 per part and a conditional completion.

        Done here rather than by s3transfer's upload_file because that cannot send
        If-None-Match on completion nor give us the part digests for the composite check.
        Parts are read sequentially and uploaded in parallel. A source that changed since
        ``sha`` was computed is caught before completion by its identity ``ident`` (size,
        modification time, inode, taken before hashing): re-hashing the whole file for that
        would cost another SHA-256 pass.
        """
        size = ident[0]
        tc = self.transfer_config
        chunk = ChunksizeAdjuster().adjust_chunksize(tc.multipart_chunksize, size)
        self._abort_unfinished(full)
        mpu = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=full, Metadata=meta, ContentType=ctype, ChecksumAlgorithm="SHA256")
        upload_id = mpu["UploadId"]
        digests: dict[int, bytes] = {}
        etags: dict[int, str] = {}
        sizes: dict[int, int] = {}

        def send(number: int, data: bytes) -> None:
            digest = hashlib.sha256(data).digest()
            resp = self.client.upload_part(
                Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=data,
                ChecksumSHA256=hex_to_b64(digest.hex()))
            digests[number], etags[number], sizes[number] = digest, resp["ETag"], len(data)

        workers = max(1, tc.max_concurrency if tc.use_threads else 1)
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="iris-s3-part") as pool, \
                    open(src, "rb") as f:
                pending: set[Future[None]] = set()
                number = 0
                while data := f.read(chunk):
                    number += 1
                    pending.add(pool.submit(send, number, data))
                    if len(pending) >= workers:  # bound memory to `workers` chunks in flight
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in done:
                            fut.result()
                for fut in pending:
                    fut.result()
            sent = sum(sizes.values())
            if _identity(src) != ident or sent != size:
                raise ChecksumMismatchError(
                    key, f"source {str(src)!r} changed during upload (size, mtime, inode "
                         f"{ident} -> {_identity(src)}; {sent} bytes sent)")
            parts = [{"PartNumber": n, "ETag": etags[n], "ChecksumSHA256": hex_to_b64(digests[n].hex())}
                     for n in sorted(etags)]
            resp = self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id,
                MultipartUpload={"Parts": parts}, **cond)
        except BaseException:
            # Leave no orphaned parts behind (they cost space and never become visible).
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - best effort; the original error matters more
                log.warning("could not abort multipart upload %s of %s", upload_id, full)
            raise
        composite = _composite(digests)
        server = resp.get("ChecksumSHA256")
        if server and server != composite:
            raise ChecksumMismatchError(key, f"server composite checksum {server} != local {composite}")
        return server, composite

    def _verify_upload(self, key: str, size: int, sha: str, server_checksum: str | None,
                       composite: str | None) -> str:
        """Check the stored object after upload; return how it was verified."""
        with self._errors(key, "verify"):
            resp = self._head_raw(key)
        if resp is None:
            raise StorageError(key, "not found right after upload")
        got_size = int(resp.get("ContentLength", -1))
        got_sha = (resp.get("Metadata") or {}).get(SHA256_META)
        if got_size != size or got_sha != sha:
            raise ChecksumMismatchError(
                key, f"after upload the server reports size {got_size} / sha256 {got_sha}, "
                     f"expected {size} / {sha}")
        server = resp.get("ChecksumSHA256") or server_checksum
        if server:
            if "-" in server:  # COMPOSITE: sha256 over part digests, suffixed with the part count
                if server != composite:
                    raise ChecksumMismatchError(
                        key, f"server composite checksum {server} != local {composite}")
                return "composite-sha256"
            if b64_to_hex(server) != sha:
                raise ChecksumMismatchError(key, f"server checksum {b64_to_hex(server)} != {sha}")
            return "server-sha256"
        if size <= self.reread_limit:
            h = hashlib.sha256()
            with self._errors(key, "verify re-read"):
                body = self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"]
                for chunk in iter(lambda: body.read(MiB), b""):
                    h.update(chunk)
            if h.hexdigest() != sha:
                raise ChecksumMismatchError(key, f"re-read content has SHA-256 {h.hexdigest()}")
            return "reread"
        log.warning("%s: server returned no checksum and the object is too large to re-read; "
                    "verified by size and metadata only", self.url(key))
        return "metadata"

    def delete(self, key: str) -> bool:
        with self._errors(key, "delete"):
            existed = self._head_raw(key) is not None
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))
        return existed

def _composite(digests: Mapping[int, bytes]) -> str:
    """S3 COMPOSITE SHA-256: base64(sha256(concat(part digests))) + '-<parts>'."""
    joined = b"".join(digests[n] for n in sorted(digests))
    return f"{hex_to_b64(hashlib.sha256(joined).hexdigest())}-{len(digests)}"
