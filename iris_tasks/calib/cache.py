"""The IRIS CRDS cache: offline configuration, bootstrap, contexts and the operational pointer.

Layout (standard CRDS, observatory "tmt")::

    <cache>/mappings/tmt/tmt_NNNN.pmap, tmt_iris_NNNN.imap, tmt_iris_<type>_NNNN.rmap
    <cache>/references/tmt/iris/tmt_iris_<type>_NNNN.fits
    <cache>/config/tmt/server_config          operational-context pointer (read by crds too)
    <cache>/config/tmt/context_history.jsonl  append-only audit log of every change
    <cache>/config/tmt/iris_calib.lock        file lock serialising all writers

``server_config`` is the file crds itself reads (through ``CRDS_CONFIG_URI``) to learn the
operational context when no context is given, so crds, stpipe and this module always agree.
It is only ever replaced whole (temp file + ``os.replace``) while holding the lock.
"""

from __future__ import annotations

import ast
import contextlib
import datetime as dt
import getpass
import json
import logging
import os
import pprint
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crds
from crds.client import api, proxy
from crds.core import config, rmap, utils
from crds.core import exceptions as crexc
from filelock import FileLock, Timeout

from ..config import crds_path_setting, native_cache_setting
from .errors import CalibrationError, ContextError, CorruptFileError, ReferenceMissingError
from .observatory import register
from .reftypes import INSTRUMENT, OBSERVATORY, REFTYPES, USEAFTER_KEYWORDS

log = logging.getLogger(__name__)

# Never contacted. "serverless" in the URL is crds' own offline switch: its JSON-RPC proxy
# refuses every call for such a URL (crds.client.proxy), so even a cache miss cannot reach
# a server; and the ".invalid" top-level domain (RFC 2606) could not resolve anyway.
OFFLINE_SERVER_URL = "https://tmt-crds-serverless-mode.invalid"

#: Seconds a writer waits for the cache lock; ``IRIS_CRDS_LOCK_TIMEOUT`` overrides it, read
#: when the lock is taken (not at import, so a process that sets it later is obeyed).
LOCK_TIMEOUT_S = 300.0
ENV_LOCK_TIMEOUT = "IRIS_CRDS_LOCK_TIMEOUT"

_STATE_FILE = "server_config"
_HISTORY_FILE = "context_history.jsonl"
_LOCK_FILE = "iris_calib.lock"

PMAP_RE = re.compile(rf"^{OBSERVATORY}_(\d{{4,}})\.pmap$")

# CRDS_* path variables that would put parts of the cache somewhere else: removed.
_FOREIGN_PATH_VARS = (
    "CRDS_PATH_SINGLE", "CRDS_MAPPATH", "CRDS_MAPPATH_SINGLE", "CRDS_REFPATH",
    "CRDS_REFPATH_SINGLE", "CRDS_CFGPATH", "CRDS_CFGPATH_SINGLE", "CRDS_PICKLEPATH",
    "CRDS_PICKLEPATH_SINGLE",
)
# crds settings forced to their offline/safe values (crds writes its defaults into os.environ
# at import, so these are always present): no remote URIs, no S3, checksums enforced.
_FORCED_VARS = {
    "CRDS_MAPPING_URI": "None",
    "CRDS_REFERENCE_URI": "None",
    "CRDS_PICKLE_URI": "None",
    "CRDS_S3_ENABLED": "false",
    "CRDS_S3_RETURN_URI": "false",
    "CRDS_IGNORE_MAPPING_CHECKSUM": "false",
}

_root: Path | None = None
_seen_state: tuple[str, str] | None = None


def default_cache_dir() -> Path:
    """$IRIS_CRDS_PATH, else <repo>/var/crds in a source checkout, else ~/.iris_drs/crds.

    Read at each call (never at import): the ``iris-drs`` command line points
    ``IRIS_CRDS_PATH`` at its own state's cache before anything configures crds, and only
    ``--operational`` leaves the stack's value in place (docs/cli.md).
    """
    env = crds_path_setting()
    if env is not None:
        return env
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / "var" / "crds"
    return Path.home() / ".iris_drs" / "crds"


def configure(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Point crds at the IRIS cache, fully offline, for this process; create the cache if absent.

    Sets CRDS_PATH, CRDS_MODE=local, CRDS_OBSERVATORY=tmt, CRDS_SERVER_URL (never contacted)
    and CRDS_CONFIG_URI (crds reads the operational context from the cache), removes CRDS_*
    variables that would relocate parts of the cache, and defaults
    STPIPE_DISABLE_CRDS_STEPPARS=true (IRIS publishes no step-parameter references).
    CRDS_CONTEXT, if set, is kept: it pins this process to one context, as in CRDS.

    Returns the cache directory. Safe to call repeatedly.
    """
    global _root, _seen_state
    register()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = root.resolve()
    for var in _FOREIGN_PATH_VARS:
        if os.environ.pop(var, None) is not None:
            log.warning("ignoring %s: the IRIS CRDS cache is %s", var, root)
    for var, value in _FORCED_VARS.items():
        previous = os.environ.get(var)
        if previous is not None and previous.lower() != value.lower():
            log.warning("overriding %s=%s with %s (IRIS CRDS runs offline)", var, previous, value)
        os.environ[var] = value
    os.environ.update(
        {
            "CRDS_PATH": str(root),
            "CRDS_MODE": "local",
            "CRDS_OBSERVATORY": OBSERVATORY,
            "CRDS_SERVER_URL": OFFLINE_SERVER_URL,
            "CRDS_CONFIG_URI": str(root / "config" / OBSERVATORY),
        }
    )
    os.environ.setdefault("STPIPE_DISABLE_CRDS_STEPPARS", "true")
    # crds lower-cases CRDS_CONFIG_URI (written for URLs) and writes it back to the
    # environment; ours is a local path, and a cache under /data/Night2026T01 would then be
    # looked for under /data/night2026t01 and crds would sys.exit(-1) from inside a step.
    config.CRDS_CONFIG_URI.lower = False
    # crds read CRDS_SERVER_URL once, at import: re-point its JSON-RPC proxy too.
    api.set_crds_server(OFFLINE_SERVER_URL)
    # crds remembers the reference sub-directory layout per process; re-read it for this cache.
    config.CRDS_REF_SUBDIR_MODE = "None"
    utils.clear_function_caches()
    _root, _seen_state = root, None
    _bootstrap_if_needed()
    log.debug("CRDS cache %s, operational context %s", root, _read_state()["operational_context"])
    return root


def reset() -> None:
    """Forget the configured cache, so the next use configures :func:`default_cache_dir` anew.

    For a process that changes ``IRIS_CRDS_PATH`` between uses (the CLI run in-process by
    tests); crds' own memo caches are cleared too.
    """
    global _root, _seen_state
    _root, _seen_state = None, None
    utils.clear_function_caches()


def lock_timeout() -> float:
    """``$IRIS_CRDS_LOCK_TIMEOUT`` seconds, else :data:`LOCK_TIMEOUT_S`."""
    value = os.environ.get(ENV_LOCK_TIMEOUT, "").strip()
    try:
        return float(value) if value else LOCK_TIMEOUT_S
    except ValueError:
        raise CalibrationError(f"{ENV_LOCK_TIMEOUT}={value!r} is not a number of seconds") from None


def cache_dir() -> Path:
    """The configured cache directory (configures the default one on first use)."""
    if _root is None or os.environ.get("CRDS_PATH") != str(_root):
        return configure(_root)
    return _root


def mappings_dir() -> Path:
    return cache_dir() / "mappings" / OBSERVATORY


def references_dir() -> Path:
    return cache_dir() / "references" / OBSERVATORY / INSTRUMENT


#: ``IRIS_NATIVE_CACHE``: ``0`` switches the native-byte-order reference cache off; a path
#: puts it there instead of ``<CRDS cache>/iris-native`` (read through iris_tasks.config).


def native_cache_dir() -> Path | None:
    """Where references are kept in native byte order for the steps (None: switched off).

    Outside CRDS's own ``references``/``mappings`` trees, so CRDS never sees the entries; they
    are derived data, safe to delete at any time (the next read rebuilds them).
    """
    setting = native_cache_setting()
    if setting is False:
        return None
    return setting if isinstance(setting, Path) else cache_dir() / "iris-native"


def config_dir() -> Path:
    return cache_dir() / "config" / OBSERVATORY


# --------------------------------------------------------------------------- state + lock


@contextlib.contextmanager
def locked(what: str) -> Iterator[None]:
    """Hold the cache's writer lock (cross-process; fcntl on POSIX) while doing `what`."""
    path = config_dir() / _LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    timeout = lock_timeout()
    lock = FileLock(str(path), timeout=timeout)
    try:
        with lock:
            yield
    except Timeout:
        raise CalibrationError(
            f"{what}: timed out after {timeout:g} s waiting for {path} "
            "(another publisher is still running?)"
        ) from None


def _state_path() -> Path:
    return config_dir() / _STATE_FILE


def _read_state() -> dict[str, Any]:
    path = _state_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ContextError(f"{path}: no operational-context pointer; run configure()") from None
    return parse_state(text, str(path))


def parse_state(text: str, source: str) -> dict[str, Any]:
    """The operational-context pointer (``server_config``) read from ``text``; ``source``
    names where it came from in the error (this cache's file, or a replica's object)."""
    try:
        state = ast.literal_eval(text)
    except (SyntaxError, ValueError) as exc:
        raise CorruptFileError(f"{source}: unreadable operational-context pointer: {exc}") from exc
    if not isinstance(state, dict) or "operational_context" not in state:
        raise CorruptFileError(f"{source}: not a CRDS server_config (no operational_context)")
    return state


def _write_state(operational: str, edit: str, pinned: bool) -> None:
    """Atomically replace the pointer. Call only while holding :func:`locked`."""
    state = {
        "observatory": OBSERVATORY,
        # crds uses latest_context when no context is given: make it the operational one.
        "operational_context": operational,
        "latest_context": operational,
        "edit_context": edit,
        "pinned": pinned,
        "force_remote_mode": False,
        "bad_files_list": [],
        "bad_files": "",
        "download_metadata": proxy.crds_encode({}),
        "last_synced": _now(),
        "crds_version": crds.__version__,
    }
    path = _state_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as handle:
        handle.write(pprint.pformat(state) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _append_history(event: dict[str, Any]) -> None:
    """Append one audit record. Call only while holding :func:`locked`."""
    record = {"time": _now(), "user": _user(), "host": socket.gethostname(), **event}
    with open(config_dir() / _HISTORY_FILE, "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def refresh() -> bool:
    """Drop crds' in-process caches if the operational pointer changed since last seen.

    crds memoises the operational context per process; long-lived workers (and stpipe,
    which calls crds directly) should call this before each reduction so a newly published
    context is picked up. Returns True if the caches were cleared.
    """
    global _seen_state
    state = _read_state()
    current = (state["operational_context"], state.get("edit_context", ""))
    if current != _seen_state:
        changed = _seen_state is not None
        if changed:
            log.info("CRDS context pointer changed to %s; reloading", current[0])
        utils.clear_function_caches()
        _seen_state = current
        return changed
    return False


# --------------------------------------------------------------------------- contexts


def list_contexts() -> list[str]:
    """Every context (.pmap) in the cache, oldest first."""
    names = [p.name for p in mappings_dir().glob(f"{OBSERVATORY}_*.pmap") if PMAP_RE.match(p.name)]
    return sorted(names, key=context_serial)


def context_serial(name: str) -> int:
    match = PMAP_RE.match(name)
    if not match:
        raise ContextError(f"{name!r} is not an IRIS context name (expected {OBSERVATORY}_NNNN.pmap)")
    return int(match[1])


def operational_context() -> str:
    """The context used when none is given: $CRDS_CONTEXT if set (a per-process pin, as in
    CRDS), else the cache's operational pointer. Record this in products (CRDS_CTX)."""
    cache_dir()
    refresh()
    env = os.environ.get("CRDS_CONTEXT")
    if env:
        return resolve_context(env)
    return _read_state()["operational_context"]


def newest_context() -> str:
    """The most recently published context (CRDS's "edit" context); it is operational
    unless a pin holds an older one."""
    cache_dir()
    return _read_state()["edit_context"]


def cache_status() -> dict[str, Any]:
    """Pointer contents: operational, newest, pinned, cache dir, CRDS_CONTEXT override."""
    state = _read_state()
    return {
        "cache_dir": str(cache_dir()),
        "operational": state["operational_context"],
        "newest": state["edit_context"],
        "pinned": bool(state.get("pinned")),
        "crds_context_env": os.environ.get("CRDS_CONTEXT"),
    }


def resolve_context(context: str | None) -> str:
    """Turn a context spec into an existing .pmap name; ContextError otherwise.

    Accepted: None (the operational context), 'tmt_0003.pmap', 'tmt_0003', and CRDS's
    symbolic names: 'tmt-operational' / 'tmt-latest' (in CRDS "latest" means operational)
    and 'tmt-edit' (the newest published), each also without the 'tmt-' prefix.
    """
    if context is None:
        return operational_context()
    name = str(context).strip()
    state = _read_state()
    symbolic = name.removeprefix(f"{OBSERVATORY}-")
    if symbolic in ("operational", "latest"):
        return state["operational_context"]
    if symbolic in ("edit", "newest"):
        return state["edit_context"]
    if not name.endswith(".pmap"):
        name += ".pmap"
    context_serial(name)
    if not (mappings_dir() / name).is_file():
        known = list_contexts()
        span = f"{known[0]} .. {known[-1]}" if known else "none"
        raise ContextError(f"context {name} is not in the cache {mappings_dir()} (have {span})")
    return name


def reference_names(context: str) -> list[str]:
    """Every reference file ``context`` selects from (empty for the bootstrap context: a cache
    into which nothing was published yet)."""
    return sorted(load_context(resolve_context(context)).reference_names())


def load_context(context: str) -> rmap.PipelineContext:
    """Load `context` (and, lazily, its imap/rmaps) through crds, checksums verified."""
    return load_mapping(context)


def load_mapping(name: str, cached: bool = True) -> Any:
    """Load one mapping via crds; bad sha1sum/syntax -> CorruptFileError naming the file."""
    path = mappings_dir() / name
    try:
        if cached:
            return crds.get_cached_mapping(name)
        return rmap.load_mapping(str(path))
    except crexc.ChecksumError as exc:
        raise CorruptFileError(f"{path}: mapping checksum is wrong ({exc}); crds refuses it") from exc
    except crexc.MappingError as exc:
        raise CorruptFileError(f"{path}: invalid CRDS mapping: {exc}") from exc
    except FileNotFoundError as exc:
        raise CorruptFileError(f"{path}: mapping missing from the cache") from exc


def get_rmap(context: str, reftype: str) -> Any:
    """The ReferenceMapping of `reftype` in `context`, loaded and checksum-verified."""
    pmap = load_context(context)
    imap_name = pmap.selector.get(INSTRUMENT.upper())
    if imap_name is None:
        raise CorruptFileError(f"{mappings_dir() / context}: no {INSTRUMENT.upper()} instrument entry")
    imap = load_mapping(imap_name)
    rmap_name = imap.selector.get(reftype.upper())
    if rmap_name is None:
        raise ReferenceMissingError(
            f"context {context} ({imap_name}) has no rule for reference type {reftype!r}"
        )
    return load_mapping(rmap_name)


def verify_context(context: str) -> list[str]:
    """Load `context` with all its mappings from disk (no memo), checking every sha1sum.
    Returns the mapping names; raises CorruptFileError on the first bad file."""
    pmap = load_mapping(context, cached=False)
    names = [context]
    for imap_name in pmap.selector.values():
        imap = load_mapping(imap_name, cached=False)
        names.append(imap_name)
        for rmap_name in imap.selector.values():
            load_mapping(rmap_name, cached=False)
            names.append(rmap_name)
    return names


def set_operational_context(context: str | None) -> str:
    """Pin the operational context to `context` (any existing context, older or newer), or
    with None unpin: the operational context follows the newest published one again.

    While pinned, publishing still creates contexts but does not make them operational.
    Returns the new operational context.
    """
    cache_dir()
    with locked("set operational context"):
        state = _read_state()
        previous, edit = state["operational_context"], state["edit_context"]
        if context is None:
            target, pinned = edit, False
        else:
            target, pinned = resolve_context(context), True
        verify_context(target)  # never point operations at a corrupt context
        _write_state(target, edit, pinned)
        _append_history(
            {"event": "pin" if pinned else "unpin", "context": target, "previous": previous,
             "operational_context": target, "pinned": pinned}
        )
    refresh()
    log.info("operational CRDS context %s -> %s (%s)", previous, target,
             "pinned" if pinned else "follows newest")
    return target


def unpin() -> str:
    """Let the operational context follow the newest published context again."""
    return set_operational_context(None)


def context_history() -> list[dict[str, Any]]:
    """Every recorded change (bootstrap, publish, pin, unpin), oldest first."""
    path = cache_dir() / "config" / OBSERVATORY / _HISTORY_FILE
    if not path.exists():
        return []
    events = []
    with open(path) as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.endswith("\n"):
                break  # a record being appended right now (writers hold the lock, readers don't)
            if line.strip():
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise CorruptFileError(f"{path}:{lineno}: bad history record: {exc}") from exc
    return events


def operational_at(when: str) -> str:
    """The context that was operational at UTC time `when` (ISO), from the history."""
    current = None
    for event in context_history():
        if event["time"] > when:
            break
        if event.get("operational_context"):
            current = event["operational_context"]
    if current is None:
        raise ContextError(f"no context was operational at {when} in {cache_dir()}")
    return current


# --------------------------------------------------------------------------- bootstrap


def empty_rmap_text(reftype: str, name: str, derived_from: str) -> str:
    """Source of an rmap with no selections for `reftype` (sha1sum filled in on write)."""
    rt = REFTYPES[reftype]
    header = {
        "classes": ("Match", "UseAfter"),
        "derived_from": derived_from,
        "filekind": reftype.upper(),
        "instrument": INSTRUMENT.upper(),
        "mapping": "REFERENCE",
        "name": name,
        "observatory": OBSERVATORY.upper(),
        "parkey": (rt.parkeys, USEAFTER_KEYWORDS),
        "sha1sum": "",
    }
    return f"header = {_format_header(header)}\n\nselector = Match({{\n}})\n"


def _format_header(header: dict[str, Any]) -> str:
    lines = ["{"] + [f"    {key!r} : {header[key]!r}," for key in sorted(header)] + ["}"]
    return "\n".join(lines)


def write_mapping(mapping: Any, name: str) -> Path:
    """Write `mapping` as new file `name` with a fresh sha1sum (what ``crds checksum`` does),
    via a temp file so a reader never sees a partial mapping. Mappings are immutable: an
    existing name is an error. Call only while holding :func:`locked`."""
    final = mappings_dir() / name
    if final.exists():
        raise CalibrationError(f"{final}: mapping already exists; mappings are never rewritten")
    mapping.header["name"] = name
    tmp = final.with_name(f".{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    mapping.write(str(tmp))  # crds computes and embeds the sha1sum
    os.replace(tmp, final)
    mapping.filename = name
    return final


def mapping_from_text(text: str, name: str) -> Any:
    cls = {".pmap": rmap.PipelineContext, ".imap": rmap.InstrumentContext}.get(
        Path(name).suffix, rmap.ReferenceMapping
    )
    return cls.from_string(text, name, ignore_checksum=True)


def _bootstrap_if_needed() -> None:
    if _state_path().exists():
        return
    with locked("create CRDS cache"):
        if _state_path().exists():  # another process won the race
            return
        mappings_dir().mkdir(parents=True, exist_ok=True)
        references_dir().mkdir(parents=True, exist_ok=True)
        config.set_crds_ref_subdir_mode("instrument", OBSERVATORY)
        existing = list_contexts()
        if existing:  # pointer lost but contexts present: recover, never overwrite
            latest = existing[-1]
            log.warning("%s missing; recovering with latest context %s", _state_path(), latest)
            _write_state(latest, latest, False)
            _append_history({"event": "recover", "context": latest, "operational_context": latest})
            return
        pmap_name = f"{OBSERVATORY}_0000.pmap"
        imap_name = f"{OBSERVATORY}_{INSTRUMENT}_0000.imap"
        origin = "generated by iris_tasks.calib bootstrap"
        rmap_names = {}
        for reftype in sorted(REFTYPES):
            name = f"{OBSERVATORY}_{INSTRUMENT}_{reftype}_0000.rmap"
            write_mapping(mapping_from_text(empty_rmap_text(reftype, name, origin), name), name)
            rmap_names[reftype] = name
        imap_header = {
            "derived_from": origin,
            "instrument": INSTRUMENT.upper(),
            "mapping": "INSTRUMENT",
            "name": imap_name,
            "observatory": OBSERVATORY.upper(),
            "parkey": ("REFTYPE",),
            "sha1sum": "",
        }
        selector = {rt.upper(): name for rt, name in rmap_names.items()}
        imap_text = f"header = {_format_header(imap_header)}\n\nselector = {selector!r}\n"
        write_mapping(mapping_from_text(imap_text, imap_name), imap_name)
        pmap_header = {
            "derived_from": origin,
            "mapping": "PIPELINE",
            "name": pmap_name,
            "observatory": OBSERVATORY.upper(),
            "parkey": ("INSTRUME",),
            "description": "Initial IRIS context: an empty rule for every reference type",
            "sha1sum": "",
        }
        pmap_text = (
            f"header = {_format_header(pmap_header)}\n\n"
            f"selector = {{{INSTRUMENT.upper()!r}: {imap_name!r}}}\n"
        )
        write_mapping(mapping_from_text(pmap_text, pmap_name), pmap_name)
        verify_context(pmap_name)
        _write_state(pmap_name, pmap_name, False)
        _append_history(
            {"event": "bootstrap", "context": pmap_name, "operational_context": pmap_name,
             "description": pmap_header["description"], "mappings": [pmap_name, imap_name, *rmap_names.values()]}
        )
        log.info("created CRDS cache %s with context %s", cache_dir(), pmap_name)
