"""The object-store contract shared by the S3 and local implementations.

Every stored object carries the hex SHA-256 of its content in its metadata (``sha256``). The
checksum is computed locally before upload, checked by the server where it can (S3 flexible
checksums) and checked again by the client after every download, so a product that reaches a
reader has the bytes the writer meant.
"""

from __future__ import annotations

import abc
import base64
import datetime as dt
import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import ConflictError, TransientError

log = logging.getLogger(__name__)

#: Metadata key (``x-amz-meta-sha256`` on S3) holding the hex SHA-256 of the object content.
SHA256_META = "sha256"

# 1 MiB reads keep hashing near disk speed without holding large files in memory.
_READ_CHUNK = 1 << 20

# Keys are '/'-separated relative paths of conservative characters: they become S3 keys and
# local paths alike, so nothing that could escape the root or need quoting is allowed.
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9_.+=@,-]+$")


class StorageError(TransientError, RuntimeError):
    """A storage operation failed; ``key`` names the object and ``problem`` says why.

    Transient by default (the store may come back: the DAG retry policy retries it);
    :class:`ObjectConflictError` is also a :class:`~iris_tasks.errors.ConflictError`, which
    wins: never retried."""

    def __init__(self, key: str | None, problem: str):
        self.key = key
        self.problem = problem
        where = f"object {key!r}" if key is not None else "object store"
        super().__init__(f"{where}: {problem}")


class ObjectNotFoundError(StorageError):
    """The object does not exist."""


class ObjectConflictError(StorageError, ConflictError):
    """An object with different content already exists under the key (no ``overwrite``)."""


class ChecksumMismatchError(StorageError):
    """Content did not match its recorded SHA-256 (upload, download or verification)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object.

    ``sha256`` is the hex digest of the content; it may be ``None`` in :meth:`ObjectStore.list`
    results (S3 listings carry no user metadata; call :meth:`ObjectStore.head`). ``skipped``
    is True when :meth:`ObjectStore.put_file` found identical content already stored.
    ``verified`` names how the content was checked on the way in (``server-sha256``,
    ``composite-sha256``, ``reread``, ``local-copy``) and is empty when nothing was checked.
    """

    key: str
    size: int
    sha256: str | None
    url: str
    etag: str | None = None
    last_modified: dt.datetime | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    skipped: bool = False
    verified: str = ""


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise :class:`StorageError`."""
    if not isinstance(key, str) or not key:
        raise StorageError(key if isinstance(key, str) else None, "key must be a non-empty string")
    segments = key.split("/")
    for seg in segments:
        if seg in ("", ".", "..") or not _KEY_SEGMENT.match(seg):
            raise StorageError(key, f"invalid key segment {seg!r} (allowed: A-Z a-z 0-9 _ . + = @ , -)")
        if seg.startswith(".iris-"):
            # Reserved for the local store's temporary files and metadata sidecars.
            raise StorageError(key, "key segments may not start with '.iris-'")
    return key


def validate_metadata(key: str, metadata: Mapping[str, object] | None) -> dict[str, str]:
    """Normalise user metadata to lowercase ASCII keys and string values (S3 rules)."""
    out: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        name = str(k).lower()
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
            raise StorageError(key, f"invalid metadata name {k!r}")
        if name == SHA256_META:
            raise StorageError(key, f"metadata name {SHA256_META!r} is reserved for the checksum")
        value = str(v)
        if not value.isascii():
            raise StorageError(key, f"metadata {k!r} must be ASCII, got {value!r}")
        out[name] = value
    return out


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_READ_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def copy_and_hash(src: BinaryIO, dst: BinaryIO) -> tuple[str, int]:
    """Copy a stream while hashing it; return (hex SHA-256, bytes copied)."""
    h = hashlib.sha256()
    n = 0
    for chunk in iter(lambda: src.read(_READ_CHUNK), b""):
        h.update(chunk)
        dst.write(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def hex_to_b64(hexdigest: str) -> str:
    """S3 carries checksums base64-encoded; our metadata carries them as hex."""
    return base64.b64encode(bytes.fromhex(hexdigest)).decode("ascii")


def b64_to_hex(b64: str) -> str:
    return base64.b64decode(b64).hex()


class ObjectStore(abc.ABC):
    """Interface of an object store holding IRIS raw frames, products and quicklooks.

    Keys are relative ('/'-separated, see :func:`validate_key`); a store may add its own
    prefix. Writes are all-or-nothing: an object is either absent or complete.
    """

    @abc.abstractmethod
    def ensure_bucket(self) -> None:
        """Create the bucket (or root directory) if it is missing."""

    @abc.abstractmethod
    def put_file(
        self,
        local_path: str | os.PathLike[str],
        key: str,
        metadata: Mapping[str, object] | None = None,
        *,
        overwrite: bool = False,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Store a local file under ``key``, idempotently.

        Identical content already stored: no transfer, ``skipped=True``. Different content:
        :class:`ObjectConflictError` unless ``overwrite``. ``sha256``: the file's SHA-256 when
        the caller hashed this very file already (the claim hashes every raw frame), which
        saves a pass over it; the bytes sent are still checked (per part by an S3 server,
        against this value by the filesystem store, and on every download).
        """

    @abc.abstractmethod
    def get_file(self, key: str, dest: str | os.PathLike[str], *, verify: bool = True) -> Path:
        """Download ``key`` to ``dest`` (atomically) and check its SHA-256; return ``dest``."""

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Metadata of ``key`` or None when it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (plain string prefix), sorted by key."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Delete ``key``; return whether it existed."""

    @abc.abstractmethod
    def url(self, key: str) -> str:
        """A URI naming the object (``s3://bucket/key`` or ``file:///...``)."""

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def verify_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Raise :class:`ChecksumMismatchError` unless ``local_path`` matches the stored object."""
        info = self.head(key)
        if info is None:
            raise ObjectNotFoundError(key, "does not exist")
        if info.sha256 is None:
            raise StorageError(key, "no SHA-256 recorded for the object; cannot verify")
        got = sha256_file(local_path)
        if got != info.sha256:
            raise ChecksumMismatchError(
                key, f"local file {os.fspath(local_path)!r} has SHA-256 {got}, stored {info.sha256}"
            )
