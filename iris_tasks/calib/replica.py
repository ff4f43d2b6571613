"""The CRDS cache shared by hosts that share no disk: a replica in the object store.

A single host (the embedded stack, one Kubernetes volume mounted read-write by every pod)
needs none of this. Worker hosts that share only the databases and the object store (the
local Celery cluster, docs/cluster.md) each keep their own cache and meet in the store,
configured by ``IRIS_CRDS_STORE`` (a store URL, iris_tasks.storage; unset: off)::

    <store>/mappings/tmt/<name>.pmap|.imap|.rmap      immutable, written once
    <store>/references/tmt/iris/<name>.fits           immutable, written once
    <store>/config/tmt/context_history.jsonl          the audit log, replaced whole
    <store>/config/tmt/server_config                  the operational pointer, written last

:func:`push` (after a publication or a pointer change on this host) uploads what the store
lacks, then the pointer, so a host that reads the pointer finds every file it names.
:func:`pull` (before a context is chosen) installs what the store has and this cache lacks,
then the store's pointer. :func:`follow_store` is the throttled pull the orchestration calls
before it picks a frame's context.

Two hosts publishing at the same moment would both number their context N+1: the second
push finds other bytes under an immutable mapping name and fails, naming the file; it never
overwrites. A push never moves the store's pointer back to an older context.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..config import crds_store_poll_seconds, crds_store_setting
from ..storage import (
    ObjectConflictError,
    ObjectInfo,
    ObjectStore,
    StorageError,
    open_store,
    sha256_file,
)
from . import cache
from .errors import CalibrationError, CorruptFileError, ReplicaConflictError
from .reftypes import INSTRUMENT, OBSERVATORY

log = logging.getLogger(__name__)

MAPPINGS_PREFIX = f"mappings/{OBSERVATORY}/"
REFERENCES_PREFIX = f"references/{OBSERVATORY}/{INSTRUMENT}/"
POINTER_KEY = f"config/{OBSERVATORY}/server_config"
HISTORY_KEY = f"config/{OBSERVATORY}/context_history.jsonl"

# The pointer last installed or pushed by this process, by SHA-256: an unchanged pointer
# costs one HEAD request and nothing else.
_seen_pointer: dict[str, str] = {}
_last_follow = {"at": float("-inf")}
_follow_lock = threading.Lock()


def replica_store() -> ObjectStore | None:
    """The store named by ``IRIS_CRDS_STORE``, or None when the cache is not replicated."""
    url = crds_store_setting()
    return open_store(url) if url else None


def where(store: ObjectStore) -> str:
    """The replica's URL (its prefix in ``store``), for messages."""
    return store.url(POINTER_KEY).removesuffix(POINTER_KEY)


def _serial(state: dict[str, Any], field: str) -> int:
    return cache.context_serial(state[field])


def _remote_pointer(store: ObjectStore, tmp_dir: Path,
                    info: ObjectInfo | None = None) -> tuple[dict[str, Any], str] | None:
    """The replica's pointer and its SHA-256; ``info``: its HEAD when the caller has it."""
    info = info or store.head(POINTER_KEY)
    if info is None:
        return None
    path = store.get_file(POINTER_KEY, tmp_dir / f".pointer.{os.getpid()}.{uuid.uuid4().hex}")
    try:
        text = path.read_text()
    finally:
        path.unlink(missing_ok=True)
    state = cache.parse_state(text, store.url(POINTER_KEY))
    if "edit_context" not in state:
        raise CorruptFileError(f"{store.url(POINTER_KEY)}: not a CRDS server_config (no edit_context)")
    return state, info.sha256 or ""


def _local_files() -> dict[str, Path]:
    """Every mapping and reference of this cache, by its key in the store."""
    out = {}
    for prefix, directory in ((MAPPINGS_PREFIX, cache.mappings_dir()),
                              (REFERENCES_PREFIX, cache.references_dir())):
        if directory.is_dir():
            for path in sorted(directory.iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    out[prefix + path.name] = path
    return out


def push(store: ObjectStore | None = None) -> dict[str, Any]:
    """Upload this cache's new mappings and references, then its pointer and history.

    Returns ``{"uploaded": [keys], "context": operational}``. Raises
    :class:`ReplicaConflictError` when the store already holds another file under one of
    this cache's names (a context published elsewhere at the same time), or a newer context
    than this cache's newest (pull first); the store is then unchanged but for new files
    that no pointer names.
    """
    store = store or replica_store()
    if store is None:
        raise CalibrationError("the CRDS cache is not replicated: IRIS_CRDS_STORE is not set")
    cache.cache_dir()
    uploaded = []
    with cache.locked("pushing the CRDS cache to the object store"):
        stored = {i.key: i for prefix in (MAPPINGS_PREFIX, REFERENCES_PREFIX)
                  for i in store.list(prefix)}
        for key, path in _local_files().items():
            # Mappings are small and define a context: an existing one must be these very
            # bytes. References carry CRDS-unique names that only a mapping can refer to,
            # so a name already stored is not hashed again.
            if key in stored and key.startswith(REFERENCES_PREFIX):
                continue
            try:
                if not store.put_file(path, key).skipped:
                    uploaded.append(key)
            except ObjectConflictError:
                raise ReplicaConflictError(
                    f"{path}: the object store already holds a different {path.name} "
                    f"({store.url(key)}): another host published a context at the same time; "
                    "pull the store's context and publish again") from None
        local = cache._read_state()
        remote = _remote_pointer(store, cache.config_dir())
        if remote is not None and _serial(remote[0], "edit_context") > _serial(local, "edit_context"):
            raise ReplicaConflictError(
                f"the object store's newest context {remote[0]['edit_context']} is newer than "
                f"this cache's {local['edit_context']} ({cache.cache_dir()}): pull first")
        history = cache.config_dir() / "context_history.jsonl"
        if history.is_file():
            store.put_file(history, HISTORY_KEY, overwrite=True)
        info = store.put_file(cache.config_dir() / "server_config", POINTER_KEY, overwrite=True)
        _seen_pointer[str(cache.cache_dir())] = info.sha256 or ""
    log.info("CRDS cache pushed to %s: %d new file(s), operational %s",
             where(store), len(uploaded), local["operational_context"])
    return {"uploaded": uploaded, "context": local["operational_context"]}


def pull(store: ObjectStore | None = None) -> str | None:
    """Install the store's new mappings, references and pointer into this cache.

    Returns the operational context when this cache's pointer changed, else None (the store
    holds nothing yet, or nothing newer). A store whose newest context is older than this
    cache's is left alone (a push will bring it up to date) with a warning.
    """
    store = store or replica_store()
    if store is None:
        return None
    root = str(cache.cache_dir())
    info = store.head(POINTER_KEY)
    if info is None or (info.sha256 and _seen_pointer.get(root) == info.sha256):
        return None
    remote = _remote_pointer(store, cache.config_dir(), info)
    if remote is None:
        return None
    state, digest = remote
    local = cache._read_state()
    if _serial(state, "edit_context") < _serial(local, "edit_context"):
        log.warning("the object store's newest CRDS context %s is older than this cache's %s: "
                    "not installed", state["edit_context"], local["edit_context"])
        _seen_pointer[root] = digest
        return None
    # Names are unique only while every publication goes through the store: a context of the
    # store's name made here without it would silently stand in for the store's.
    mine = cache.mappings_dir() / state["edit_context"]
    if mine.is_file():
        theirs = store.head(MAPPINGS_PREFIX + state["edit_context"])
        if theirs is not None and theirs.sha256 and theirs.sha256 != sha256_file(mine):
            raise ReplicaConflictError(
                f"{mine} differs from {store.url(MAPPINGS_PREFIX + state['edit_context'])}: "
                "this cache published a context of that name without the object store; move "
                "this cache aside and let the host fill a new one from the store")
    fetched = 0
    for prefix, directory in ((MAPPINGS_PREFIX, cache.mappings_dir()),
                              (REFERENCES_PREFIX, cache.references_dir())):
        directory.mkdir(parents=True, exist_ok=True)
        for item in store.list(prefix):
            dest = directory / item.key[len(prefix):]
            if not dest.exists():
                store.get_file(item.key, dest)  # atomic, SHA-256 checked
                fetched += 1
    for name in (state["operational_context"], state["edit_context"]):
        missing = [n for n in cache.reference_names(name)
                   if not (cache.references_dir() / n).is_file()]
        if missing:
            raise CalibrationError(f"{store.url(POINTER_KEY)} names {name}, whose references "
                                   f"{', '.join(missing[:5])} are not in the store")
    changed = (state["operational_context"], state["edit_context"]) != \
        (local["operational_context"], local["edit_context"])
    with cache.locked("installing the object store's CRDS pointer"):
        if changed:
            cache._write_state(state["operational_context"], state["edit_context"],
                               bool(state.get("pinned", False)))
        if store.head(HISTORY_KEY) is not None:
            store.get_file(HISTORY_KEY, cache.config_dir() / "context_history.jsonl")
    _seen_pointer[root] = digest
    cache.refresh()
    if changed:
        log.info("CRDS context %s (newest %s) installed from %s (%d file(s) fetched)",
                 state["operational_context"], state["edit_context"], where(store), fetched)
        return state["operational_context"]
    return None


def follow_store(needed: str | None = None) -> str | None:
    """:func:`pull` at most every ``IRIS_CRDS_STORE_POLL`` seconds (default 5), and at once
    when ``needed`` (a context name) is not in this cache; no-op when the cache is not
    replicated. A store that cannot be reached is logged and the local context kept: the
    frame records the context it used (CRDS_CTX), so a frame reduced with a stale context is
    found and reprocessed like any other."""
    if not crds_store_setting():
        return None
    # Only a context named by its file can be missing here; an alias (tmt-operational, ...)
    # is resolved after the throttled look like any other choice.
    name = os.path.basename(str(needed or ""))
    name = name if name.endswith(".pmap") or not name else f"{name}.pmap"
    missing = bool(cache.PMAP_RE.match(name)) and not (cache.mappings_dir() / name).is_file()
    with _follow_lock:
        now = time.monotonic()
        if not missing and now - _last_follow["at"] < crds_store_poll_seconds():
            return None
        _last_follow["at"] = now
        try:
            return pull()
        except (StorageError, OSError) as exc:
            log.warning("CRDS replica in the object store not reachable (%s); keeping %s", exc,
                        cache._read_state()["operational_context"])
            return None
