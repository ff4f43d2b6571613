"""Embedded object store on a local (or shared POSIX) directory.

Same contract as :class:`~iris_tasks.storage.s3.S3Store`, for running without an S3 server.
Content lives at ``<root>/<key>``; metadata (SHA-256, size, user metadata) in a JSON sidecar at
``<root>/.iris-meta/<key>.json``, written after the data. The sidecar is authoritative: if the
data file later stops matching it (bit rot, an edit in place), downloads and :meth:`verify_file`
fail instead of quietly accepting the new bytes. A data file without a sidecar (placed in the
tree by other means, or in the instant between the data rename and the sidecar write) is
hashed on demand.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from .base import (
    SHA256_META,
    ChecksumMismatchError,
    ObjectConflictError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    copy_and_hash,
    sha256_file,
    validate_key,
    validate_metadata,
)

log = logging.getLogger(__name__)

_META_DIR = ".iris-meta"
_TMP_PREFIX = ".iris-tmp-"


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # pragma: no cover - platforms without O_DIRECTORY
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(final: Path) -> Path:
    return final.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}-{final.name}")


def _write_atomic(final: Path, data: bytes) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


class LocalStore(ObjectStore):
    """Object store rooted at a directory; writes are temp-file + fsync + rename."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- paths ---------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _meta_path(self, key: str) -> Path:
        return self.root / _META_DIR / f"{validate_key(key)}.json"

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def ensure_bucket(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    # -- reads ---------------------------------------------------------------------------
    def _read_sidecar(self, key: str) -> dict | None:
        try:
            return json.loads(self._meta_path(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StorageError(key, f"unreadable metadata sidecar: {exc}") from exc

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if not path.is_file():
            return None
        side = self._read_sidecar(key)
        if side is None:
            sha, meta = sha256_file(path), {}
        else:
            sha, meta = side.get(SHA256_META), dict(side.get("metadata", {}))
        return ObjectInfo(
            key=key,
            size=st.st_size,
            sha256=sha,
            url=path.as_uri(),
            etag=None,
            last_modified=dt.datetime.fromtimestamp(st.st_mtime, tz=dt.UTC),
            metadata=meta,
        )

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if not self.root.is_dir():
            return []
        out: list[ObjectInfo] = []
        # Walk only the directory that can contain the prefix, as S3 would scan only that range.
        start = self.root
        head, _, _ = prefix.rpartition("/")
        if head:
            start = self.root / head
            if not start.is_dir():
                return []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = sorted(d for d in dirnames if d != _META_DIR and not d.startswith(_TMP_PREFIX))
            for name in filenames:
                if name.startswith(_TMP_PREFIX):
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                st = path.stat()
                side = self._read_sidecar(key)
                out.append(
                    ObjectInfo(
                        key=key,
                        size=st.st_size,
                        sha256=side.get(SHA256_META) if side else None,
                        url=path.as_uri(),
                        last_modified=dt.datetime.fromtimestamp(st.st_mtime, tz=dt.UTC),
                        metadata=dict(side.get("metadata", {})) if side else {},
                    )
                )
        out.sort(key=lambda o: o.key)
        return out

    def get_file(self, key: str, dest: str | os.PathLike[str], *, verify: bool = True) -> Path:
        src = self._path(key)
        info = self.head(key)
        if info is None:
            raise ObjectNotFoundError(key, f"does not exist in {self.root}")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(dest)
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                got, _ = copy_and_hash(fin, fout)
                fout.flush()
                os.fsync(fout.fileno())
            if verify and got != info.sha256:
                raise ChecksumMismatchError(
                    key, f"content SHA-256 {got} does not match recorded {info.sha256}"
                )
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
        final = self._path(key)
        meta = validate_metadata(key, metadata)
        src = Path(local_path)
        if not src.is_file():
            raise StorageError(key, f"local file {str(src)!r} does not exist")
        # A given hash is checked against the bytes copied below: still one pass in all.
        sha = sha256 or sha256_file(src)

        existing = self.head(key)
        if existing is not None:
            if existing.sha256 == sha:
                log.info("put %s: identical content already stored, skipped", key)
                return replace(existing, skipped=True)
            if not overwrite:
                raise ObjectConflictError(
                    key, f"exists with SHA-256 {existing.sha256}, new content has {sha}"
                    " (pass overwrite=True to replace)",
                )

        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(final)
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                # Hash the bytes actually written: catches the source changing under us.
                copied_sha, size = copy_and_hash(fin, fout)
                fout.flush()
                os.fsync(fout.fileno())
            if copied_sha != sha:
                raise ChecksumMismatchError(
                    key, f"source {str(src)!r} changed while being stored ({sha} -> {copied_sha})"
                )
            sidecar = json.dumps({SHA256_META: sha, "size": size, "metadata": meta}).encode()
            if overwrite:
                # Drop the old sidecar first: in every intermediate state a reader sees data
                # with either its own sidecar or none (then the checksum is computed on demand).
                self._meta_path(key).unlink(missing_ok=True)
                os.replace(tmp, final)
            else:
                if existing is None:
                    # A sidecar left by an interrupted delete must not describe the new data.
                    self._meta_path(key).unlink(missing_ok=True)
                try:
                    # link() fails if the name exists, so a concurrent writer cannot be clobbered.
                    os.link(tmp, final)
                except FileExistsError:
                    other = self.head(key)
                    if other is not None and other.sha256 == sha:
                        return replace(other, skipped=True)
                    raise ObjectConflictError(key, "written concurrently with different content") from None
                except OSError:
                    # Filesystems without hard links: fall back to rename (existence checked above).
                    os.replace(tmp, final)
            _fsync_dir(final.parent)
            _write_atomic(self._meta_path(key), sidecar)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("put %s (%d bytes, sha256 %s)", key, size, sha[:12])
        info = self.head(key)
        assert info is not None
        return replace(info, verified="local-copy")

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            path.unlink()
            existed = True
        except FileNotFoundError:
            existed = False
        self._meta_path(key).unlink(missing_ok=True)
        return existed

    def destroy(self) -> None:
        """Remove the whole store (tests and demos)."""
        shutil.rmtree(self.root, ignore_errors=True)
