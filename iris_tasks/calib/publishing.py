"""Publishing references: new rmap/imap/pmap versions, checksummed, made operational atomically."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crds.core import exceptions as crexc
from crds.core import timestamp, utils

from . import cache, replica
from .errors import CalibrationError, CorruptFileError, PublishError, ReplicaConflictError
from .reftypes import ANY_VALUES, INSTRUMENT, OBSERVATORY, REFTYPES, USEAFTER_KEYWORDS

log = logging.getLogger(__name__)


@dataclass
class _Incoming:
    """One reference file to publish, with the rmap key it goes in under."""

    source: Path
    reftype: str
    match: dict[str, str]
    useafter: str
    sha1: str
    name: str = ""
    reused: bool = False
    header: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.reftype, tuple(self.match.values()), self.useafter)


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_reference(path: str | os.PathLike[str]) -> _Incoming:
    """Read the CRDS keywords of a reference file and derive its rmap key.

    REFTYPE, USEAFTER and every Match keyword of the type must be present; a keyword value
    of N/A (or ANY) means "any value", used when no reference matches the value exactly.
    """
    from astropy.io import fits

    source = Path(path).resolve()
    try:
        # Read every HDU once with checksum=True: astropy then verifies CHECKSUM/DATASUM
        # wherever the writer recorded them, and reports a mismatch as a warning.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fits.open(source, checksum=True) as hdul:
                header = hdul[0].header.copy()
                for hdu in hdul:
                    hdu.data  # noqa: B018 - reading the data is what triggers DATASUM checks
    except FileNotFoundError:
        raise PublishError(f"{source}: no such reference file") from None
    except Exception as exc:
        raise CorruptFileError(f"{source}: unreadable FITS reference: {exc}") from exc
    bad_sums = [str(w.message).strip() for w in caught if "verification failed" in str(w.message)]
    if bad_sums:
        raise CorruptFileError(f"{source}: FITS checksum mismatch: {' '.join(bad_sums)}")
    problems = []
    instrument = str(header.get("INSTRUME", "")).strip().upper()
    if instrument != INSTRUMENT.upper():
        problems.append(f"INSTRUME={instrument or 'missing'} (must be {INSTRUMENT.upper()})")
    reftype = str(header.get("REFTYPE", "")).strip().lower()
    if reftype not in REFTYPES:
        problems.append(f"REFTYPE={reftype.upper() or 'missing'} (known: {', '.join(sorted(REFTYPES))})")
    useafter = ""
    raw_useafter = str(header.get("USEAFTER", "")).strip()
    try:
        # rmap UseAfter keys are 'YYYY-MM-DD HH:MM:SS'
        useafter = timestamp.reformat_date(raw_useafter).split(".")[0]
    except Exception:
        problems.append(f"USEAFTER={raw_useafter or 'missing'} (need YYYY-MM-DDThh:mm:ss)")
    match: dict[str, str] = {}
    if reftype in REFTYPES:
        for key in REFTYPES[reftype].parkeys:
            value = str(header.get(key, "")).strip()
            if not value:
                problems.append(f"{key} missing (use N/A for 'any {key}')")
            elif value.upper() in ANY_VALUES:
                match[key] = "N/A"
            else:
                match[key] = utils.condition_value(value)
    if problems:
        raise PublishError(f"{source}: cannot publish: " + "; ".join(problems))
    return _Incoming(source=source, reftype=reftype, match=match, useafter=useafter,
                     sha1=_sha1(source), header={k: header[k] for k in ("DESCRIP", "PEDIGREE", "AUTHOR") if k in header})


def _known_references() -> dict[str, str]:
    """sha1 -> cache name of every reference published so far (from the audit log)."""
    known = {}
    for event in cache.context_history():
        for ref in event.get("references", []):
            known[ref["sha1"]] = ref["name"]
    return known


def _next_serial(pattern_dir: Path, prefix: str, suffix: str, also: set[str]) -> int:
    serials = [-1]
    for name in [p.name for p in pattern_dir.glob(f"{prefix}*{suffix}")] + list(also):
        middle = name[len(prefix):-len(suffix)] if name.startswith(prefix) and name.endswith(suffix) else ""
        if middle.isdigit():
            serials.append(int(middle))
    return max(serials) + 1


def publish_references(
    files: list[str | os.PathLike[str]],
    description: str,
    author: str | None = None,
    dry_run: bool = False,
) -> str:
    """Publish reference files as a new context and make it operational.

    Each file goes into a new version of its type's rmap (Match on its header keywords,
    UseAfter on USEAFTER), then a new imap and pmap (next serial) are written with crds
    sha1sums, the files are copied into the cache under CRDS names
    (``tmt_iris_<type>_NNNN.fits``) and the operational pointer is switched atomically.
    Everything runs under the cache lock, so concurrent publishers serialise; old contexts
    are kept. If the operational context is pinned the new context is created but not made
    operational. Re-publishing identical content changes nothing and returns the newest
    context (safe for task retries). With `dry_run`, nothing is written and the name the new
    context would get is returned. When the cache is replicated (``IRIS_CRDS_STORE``,
    :mod:`.replica`) the store's newest context is pulled first and the new one pushed after.
    """
    if not files:
        raise PublishError("publish_references: no files given")
    if not description or not description.strip():
        raise PublishError("publish_references: a description is required (it is the audit trail)")
    author = author or cache._user()
    cache.cache_dir()
    incoming = [read_reference(f) for f in files]
    seen: dict[tuple, _Incoming] = {}
    for item in incoming:
        if item.key in seen:
            raise PublishError(
                f"{item.source} and {seen[item.key].source} are both {item.reftype} for "
                f"{item.match} USEAFTER {item.useafter}: publish one of them"
            )
        seen[item.key] = item
    # Hosts that share no disk meet in the object store: build on its newest context, share
    # the new one, and when another host published the same context name meanwhile, take
    # this publication back, take theirs and publish again on top of it.
    store = None if dry_run else replica.replica_store()
    for attempt in range(1, REPLICA_ATTEMPTS + 1):
        if store is not None:
            replica.pull(store)
        done = _publish_locally(incoming, description, author, dry_run)
        if store is None or done.written == []:
            break
        try:
            replica.push(store)
            break
        except ReplicaConflictError as exc:
            _take_back(done)
            if attempt == REPLICA_ATTEMPTS:
                raise PublishError(f"{done.context} not published: {exc} "
                                   f"({REPLICA_ATTEMPTS} attempts)") from exc
            log.warning("%s was published on another host meanwhile (%s); publishing on top "
                        "of the object store's context (attempt %d)", done.context, exc,
                        attempt + 1)
    if done.written == []:
        return done.context
    warm_native_cache([cache.references_dir() / item.name for item in incoming])
    if done.pinned:
        log.warning("published %s, but the operational context stays pinned at %s",
                    done.context, done.operational)
    else:
        log.info("published %s (operational): %s", done.context, description)
    return done.context


#: Publications tried when the object-store replica took another host's context meanwhile.
REPLICA_ATTEMPTS = 3


@dataclass(frozen=True)
class _Published:
    """One local publication: the context, the files it wrote (empty: nothing new, or a dry
    run), the pointer before and after."""

    context: str
    written: list[Path]
    before: dict[str, Any]
    operational: str
    pinned: bool


def _publish_locally(incoming: list[_Incoming], description: str, author: str,
                     dry_run: bool) -> _Published:
    with cache.locked("publish references"):
        state = cache._read_state()
        base = state["edit_context"]
        pinned = bool(state.get("pinned"))
        new_context, new_rmaps, new_imap, new_pmap = _build(base, incoming, description, author)
        if new_context is None:
            log.info("nothing new to publish: %s already selects these references", base)
            return _Published(base, [], state, state["operational_context"], pinned)
        if dry_run:
            for item in incoming:
                log.info("dry run: %s -> %s (%s %s USEAFTER %s)", item.source, item.name,
                         item.reftype, item.match, item.useafter)
            log.info("dry run: would create %s from %s", new_context, base)
            return _Published(new_context, [], state, state["operational_context"], pinned)
        written = []
        try:
            for item in incoming:
                if not item.reused:
                    written.append(_copy_reference(item))
            for rmap_obj in new_rmaps:
                written.append(cache.write_mapping(rmap_obj, rmap_obj.header["name"]))
            written.append(cache.write_mapping(new_imap, new_imap.header["name"]))
            written.append(cache.write_mapping(new_pmap, new_context))
            cache.verify_context(new_context)
        except Exception as exc:
            # Nothing refers to the new files yet: remove them so no broken context lingers.
            for path in written:
                Path(path).unlink(missing_ok=True)
            if isinstance(exc, CalibrationError):
                raise
            raise PublishError(f"publishing {new_context} failed: {exc}") from exc
        operational = state["operational_context"] if pinned else new_context
        cache._write_state(operational, new_context, pinned)
        cache._append_history(
            {
                "event": "publish",
                "context": new_context,
                "derived_from": base,
                "operational_context": operational,
                "pinned": pinned,
                "description": description,
                "author": author,
                "mappings": [new_context, new_imap.header["name"],
                             *[r.header["name"] for r in new_rmaps]],
                "references": [
                    {"name": i.name, "source": str(i.source), "sha1": i.sha1, "reftype": i.reftype,
                     "match": i.match, "useafter": i.useafter, "reused": i.reused, **i.header}
                    for i in incoming
                ],
            }
        )
    cache.refresh()
    return _Published(new_context, [Path(p) for p in written], state, operational, pinned)


def _take_back(done: _Published) -> None:
    """Undo a local publication the replica refused: its files removed, the pointer as it
    was (the audit log comes from the store with the next pull)."""
    with cache.locked("take back a publication the object store refused"):
        for path in done.written:
            path.unlink(missing_ok=True)
        cache._write_state(done.before["operational_context"], done.before["edit_context"],
                           bool(done.before.get("pinned")))
    cache.refresh()
    log.warning("took back %s locally (%d file(s)): the object store holds another %s",
                done.context, len(done.written), done.context)


def warm_native_cache(paths: list[Path]) -> None:
    """Convert newly published references into the steps' native-byte-order cache now, so the
    first real-time frame after a publication does not pay for it (~3 s for one 4096^2
    detector's set). Best effort: a failure only means the first step converts them itself."""
    from ..datamodels.io import read_cached_native_hdulist

    native = cache.native_cache_dir()
    if native is None:
        return
    for path in paths:
        try:
            hdul = read_cached_native_hdulist(path, native)
            if hdul is not None:
                hdul.close()
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.warning("%s: not converted into the native cache (%s)", path, exc)


def _build(base: str, incoming: list[_Incoming], description: str, author: str):
    """In memory: name the references and derive new rmaps, imap and pmap from `base`.
    Returns (None, ...) when the result would select exactly what `base` does."""
    known = _known_references()
    allocated: set[str] = set()
    refdir = cache.references_dir()
    for item in incoming:
        if item.sha1 in known and (refdir / known[item.sha1]).is_file():
            item.name, item.reused = known[item.sha1], True
            continue
        prefix = f"{OBSERVATORY}_{INSTRUMENT}_{item.reftype}_"
        history_names = {ref for ref in known.values() if ref.startswith(prefix)}
        serial = _next_serial(refdir, prefix, ".fits", allocated | history_names)
        item.name = f"{prefix}{serial:04d}.fits"
        allocated.add(item.name)

    base_pmap = cache.load_mapping(base, cached=False)
    imap_name = base_pmap.selector[INSTRUMENT.upper()]
    base_imap = cache.load_mapping(imap_name, cached=False)
    new_imap = base_imap.copy()
    mapdir = cache.mappings_dir()
    new_rmaps = []
    for reftype in sorted({i.reftype for i in incoming}):
        old_name = base_imap.selector.get(reftype.upper())
        if old_name:
            old = cache.load_mapping(old_name, cached=False)
        else:  # a type added to the table after this cache was created
            placeholder = f"{OBSERVATORY}_{INSTRUMENT}_{reftype}.rmap"
            old = cache.mapping_from_text(
                cache.empty_rmap_text(reftype, placeholder, "generated by iris_tasks.calib"),
                placeholder,
            )
        new = old
        for item in (i for i in incoming if i.reftype == reftype):
            header = {**item.match}
            header[USEAFTER_KEYWORDS[0]], header[USEAFTER_KEYWORDS[1]] = item.useafter.split()
            try:
                new = new.insert(header, item.name)
            except (crexc.CrdsError, AssertionError) as exc:
                raise PublishError(
                    f"{item.source}: cannot add to {old.basename} as {item.match} "
                    f"USEAFTER {item.useafter}: {exc}"
                ) from exc
        if old_name and new.selector.format() == old.selector.format():
            continue
        prefix = f"{OBSERVATORY}_{INSTRUMENT}_{reftype}_"
        new.header["name"] = f"{prefix}{_next_serial(mapdir, prefix, '.rmap', set()):04d}.rmap"
        new.header["derived_from"] = old_name or "generated by iris_tasks.calib"
        new_imap.selector[reftype.upper()] = new.header["name"]
        new_rmaps.append(new)
    if not new_rmaps:
        return None, [], None, None

    imap_prefix = f"{OBSERVATORY}_{INSTRUMENT}_"
    new_imap.header["name"] = f"{imap_prefix}{_next_serial(mapdir, imap_prefix, '.imap', set()):04d}.imap"
    new_imap.header["derived_from"] = imap_name
    new_pmap = base_pmap.copy()
    new_pmap.selector[INSTRUMENT.upper()] = new_imap.header["name"]
    new_context = f"{OBSERVATORY}_{_next_serial(mapdir, f'{OBSERVATORY}_', '.pmap', set()):04d}.pmap"
    new_pmap.header["name"] = new_context
    new_pmap.header["derived_from"] = base
    new_pmap.header["description"] = description
    new_pmap.header["author"] = author
    return new_context, new_rmaps, new_imap, new_pmap


def _copy_reference(item: _Incoming) -> Path:
    """Copy into the cache under its CRDS name (temp + rename), checking the bytes arrived."""
    final = cache.references_dir() / item.name
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise PublishError(f"{final}: reference name already taken; references are never rewritten")
    tmp = final.with_name(f".{item.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    shutil.copyfile(item.source, tmp)
    if _sha1(tmp) != item.sha1:
        tmp.unlink(missing_ok=True)
        raise PublishError(f"{item.source}: changed while being copied into the cache")
    os.chmod(tmp, 0o444)  # references are immutable once published
    os.replace(tmp, final)
    return final
