"""The landing area: where the instrument's readout computer drops raw frames.

A landing area is a local directory or an S3 prefix (``s3://bucket/prefix``). Only ``*.fits`` /
``*.fit`` files directly in the directory (or under the prefix) are frames; the rest is
*ignored* and reported (:func:`survey_directory`, ledger table ``landing_ignored``, the night
page), so an operator sees data waiting where the DRS will not take it: compressed frames,
sub-directories, symbolic links, other files.

**The writer's contract** (docs/airflow.md, "Landing contract"). A frame is claimed only when
it is whole. Two ways to get there, the first one that holds wins:

* *atomic rename* (recommended, no added latency): write the file under a hidden name
  (``.name.fits``) or a partial suffix (``.part``, ``.tmp``, ...), fsync, rename it to its
  final name. The rename leaves the file's ctime after its mtime, which marks it finished.
* *written in place*: the file's FITS structure is complete (every HDU's header and data
  present, ``SCI`` among them, and ``ASDF`` where the header says it is a datamodel file:
  :func:`iris_tasks.rawcheck.inspect_structure`) and it has not been modified for
  ``settle_seconds`` (default 1 s).
A file that stays incomplete and untouched for ``stale_seconds`` (default 120 s) is claimed
all the same, so that classification quarantines it as truncated instead of leaving it unseen.
S3 objects appear whole by construction (a PUT or a completed multipart upload).

:func:`scan_landing` lists the frames ready to claim (the landing trigger and the claim step
share it); :func:`claim_frames` turns landing entries into claimed frames: it records the
arrival in the ledger, hashes the content, claims the frame by hash (a duplicate arrival is
recorded and dropped, not processed again) and moves the file into the run's work area
(``<state>/work/<frame_id>/``), so the landing directory only ever holds unclaimed frames.
S3 objects are downloaded into the work area and left in place; the ledger remembers them.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..config import Settings, settings
from .frame import Frame
from .ledger import FAILED, FrameLedger, isotime, open_ledger, parse_time

log = logging.getLogger(__name__)

FRAME_SUFFIXES = (".fits", ".fit")
_PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".filepart", ".crdownload")
DEFAULT_SETTLE_SECONDS = 1.0
DEFAULT_STALE_SECONDS = 120.0


@dataclass(frozen=True)
class LandingEntry:
    """One file or object in the landing area."""

    uri: str  # file:///abs/path or s3://bucket/key
    name: str
    size: int
    mtime: float  # epoch seconds: st_ctime (set by the atomic rename) or S3 LastModified
    etag: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key(self) -> tuple[str, int, float]:
        return self.uri, self.size, self.mtime


@dataclass(frozen=True)
class IgnoredEntry:
    """Something in the landing area that is not a frame the DRS takes, and why."""

    uri: str
    name: str
    size: int
    reason: str


@dataclass(frozen=True)
class LandingSurvey:
    """What one look at the landing area found."""

    ready: list[LandingEntry]  # whole frames, oldest first
    waiting: list[tuple[LandingEntry, str]]  # frames still being written, with why
    ignored: list[IgnoredEntry]


def is_frame_name(name: str) -> bool:
    """Whether a file name is a complete frame (not hidden, not a partial upload)."""
    low = name.lower()
    return (not name.startswith(".") and low.endswith(FRAME_SUFFIXES)
            and not low.endswith(_PARTIAL_SUFFIXES))


def is_in_flight_name(name: str) -> bool:
    """A name a writer uses while it writes (hidden or partial suffix): neither a frame nor
    worth reporting."""
    return name.startswith(".") or name.lower().endswith(_PARTIAL_SUFFIXES)


def ignored_reason(name: str) -> str:
    """Why a name that is not a frame name is not taken (for the operators' report)."""
    low = name.lower()
    if low.endswith((".fits.gz", ".fits.fz", ".fits.bz2", ".fit.gz", ".fits.zip")):
        return "compressed frame: the DRS takes uncompressed .fits files only"
    return "not a .fits/.fit file"


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix/") (prefix '' for the bucket)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://bucket[/prefix] URL: {url!r}")
    prefix = parts.path.strip("/")
    return parts.netloc, (prefix + "/" if prefix else "")


def _structure_problem(path: str, st: os.stat_result) -> str | None:
    """Why the file is not (yet) a whole raw frame, or None; cached per file version.

    "Whole" is :func:`iris_tasks.rawcheck.inspect_structure`'s verdict (every HDU's header and
    data present, SCI, and ASDF where the header says the file is a datamodel), the same
    reader classification uses; only headers are read.
    """
    from iris_tasks.rawcheck import inspect_structure

    key = (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _STRUCTURE_CACHE:
        return _STRUCTURE_CACHE[key]
    check = inspect_structure(path)
    problem = None
    if not check.structure_ok:
        problem = "; ".join(m for _, m in check.problems[:2]) or "not a complete raw frame"
    elif check.hdus and check.hdus[-1].padded_end > check.size:
        # Classification lets a short last padding pass (the data are all there); a writer
        # still appending leaves exactly this, so the landing area waits for more.
        problem = f"{check.hdus[-1].label} is not padded to a whole block yet"
    if len(_STRUCTURE_CACHE) > 4096:
        _STRUCTURE_CACHE.clear()
    _STRUCTURE_CACHE[key] = problem
    return problem


_STRUCTURE_CACHE: dict[tuple[str, int, int, int], str | None] = {}


def readiness(path: str, st: os.stat_result, *, now: float | None = None,
              settle_seconds: float = DEFAULT_SETTLE_SECONDS,
              stale_seconds: float = DEFAULT_STALE_SECONDS) -> str | None:
    """None when the file at ``path`` is whole and may be claimed, else why it must wait.

    The writer's contract is in the module docstring. A file incomplete for longer than
    ``stale_seconds`` counts as ready: it is claimed and then quarantined as truncated.
    """
    now = time.time() if now is None else now
    age = now - st.st_mtime
    renamed = st.st_ctime_ns > st.st_mtime_ns
    if not renamed and age < settle_seconds:
        return f"modified {age:.1f} s ago (settles after {settle_seconds:g} s)"
    problem = _structure_problem(path, st)
    if problem is None or age >= stale_seconds:
        return None
    return f"incomplete: {problem}"


def survey_directory(directory: str | os.PathLike[str], *,
                     settle_seconds: float = DEFAULT_SETTLE_SECONDS,
                     stale_seconds: float = DEFAULT_STALE_SECONDS) -> LandingSurvey:
    """Frames ready to claim, frames still being written, and what is ignored, directly in
    ``directory`` (a missing directory: nothing)."""
    ready: list[LandingEntry] = []
    waiting: list[tuple[LandingEntry, str]] = []
    ignored: list[IgnoredEntry] = []
    now = time.time()
    base = Path(directory).resolve()
    try:
        with os.scandir(directory) as it:
            found = list(it)
    except FileNotFoundError:
        return LandingSurvey([], [], [])
    for entry in found:
        if is_in_flight_name(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # claimed between listing and stat
            continue
        uri = (base / entry.name).as_uri()
        if entry.is_symlink():
            ignored.append(IgnoredEntry(uri, entry.name, st.st_size,
                                        "symbolic link: the DRS takes regular files only "
                                        "(a link can change or dangle under it)"))
            continue
        if entry.is_dir(follow_symlinks=False):
            ignored.append(IgnoredEntry(uri, entry.name, 0,
                                        "sub-directory: frames must be directly in the landing "
                                        "directory"))
            continue
        if not entry.is_file(follow_symlinks=False):
            ignored.append(IgnoredEntry(uri, entry.name, 0, "not a regular file"))
            continue
        if not is_frame_name(entry.name):
            ignored.append(IgnoredEntry(uri, entry.name, st.st_size, ignored_reason(entry.name)))
            continue
        # ctime changes on rename, so for an atomically renamed file it is the moment the
        # frame landed even if the writer preserved an older mtime.
        landing = LandingEntry(uri, entry.name, st.st_size, round(st.st_ctime, 6))
        why = readiness(entry.path, st, now=now, settle_seconds=settle_seconds,
                        stale_seconds=stale_seconds)
        if why is None:
            ready.append(landing)
        else:
            waiting.append((landing, why))
    ready.sort(key=lambda e: (e.mtime, e.name))
    return LandingSurvey(ready, waiting, sorted(ignored, key=lambda e: e.name))


def scan_directory(directory: str | os.PathLike[str], **kwargs: float) -> list[LandingEntry]:
    """Frames ready to claim directly in ``directory``, oldest first (see
    :func:`survey_directory`)."""
    return survey_directory(directory, **kwargs).ready


def entry_from_s3(bucket: str, key: str, size: int, last_modified: dt.datetime | None,
                  etag: str | None) -> LandingEntry:
    when = last_modified.timestamp() if last_modified is not None else time.time()
    return LandingEntry(f"s3://{bucket}/{key}", key.rsplit("/", 1)[-1], int(size), round(when, 6),
                        etag.strip('"') if etag else None)


def survey_s3_listing(bucket: str, prefix: str, objects: list[dict[str, Any]]) -> LandingSurvey:
    """Sort one S3 listing (``ListObjectsV2`` ``Contents``) into frames and ignored keys.

    An object is whole once it is listed (S3 writes are atomic), so nothing waits."""
    ready, ignored = [], []
    for obj in objects:
        rest = obj["Key"][len(prefix):]
        name = rest.rsplit("/", 1)[-1]
        if not rest or is_in_flight_name(name):
            continue
        uri = f"s3://{bucket}/{obj['Key']}"
        if "/" in rest:
            ignored.append(IgnoredEntry(uri, rest, int(obj.get("Size", 0)),
                                        "under a sub-prefix: frames must be directly under the "
                                        "landing prefix"))
        elif not is_frame_name(rest):
            ignored.append(IgnoredEntry(uri, rest, int(obj.get("Size", 0)), ignored_reason(rest)))
        else:
            ready.append(entry_from_s3(bucket, obj["Key"], obj.get("Size", 0),
                                       obj.get("LastModified"), obj.get("ETag")))
    ready.sort(key=lambda e: (e.mtime, e.name))
    return LandingSurvey(ready, [], sorted(ignored, key=lambda e: e.name))


def survey_s3(url: str, *, conn_id: str) -> LandingSurvey:
    """Frames and ignored keys under an S3 prefix, through the Airflow connection ``conn_id``."""
    from iris_tasks.storage.s3 import S3Store

    bucket, prefix = split_s3_url(url)
    store = S3Store.from_airflow_conn(conn_id, bucket=bucket)
    listing = [{"Key": i.key, "Size": i.size, "LastModified": i.last_modified, "ETag": i.etag}
               for i in store.list(prefix)]
    return survey_s3_listing(bucket, prefix, listing)


def survey_landing(landing: str | None = None, *, conn_id: str | None = None) -> LandingSurvey:
    """One look at the landing area (default ``$IRIS_LANDING``)."""
    cfg = settings()
    landing = landing or cfg.landing
    if landing.startswith("s3://"):
        return survey_s3(landing, conn_id=conn_id or cfg.s3_conn_id)
    return survey_directory(landing, settle_seconds=cfg.landing_settle_seconds,
                            stale_seconds=cfg.landing_stale_seconds)


def scan_landing(landing: str | None = None, *, conn_id: str | None = None) -> list[LandingEntry]:
    """Frames ready to claim in the landing area (default ``$IRIS_LANDING``), oldest first."""
    return survey_landing(landing, conn_id=conn_id).ready


def deliver(src: str | os.PathLike[str], landing: str | os.PathLike[str],
            name: str | None = None) -> Path:
    """Put a file into a landing directory the way the contract asks a writer to (the
    reference writer, for the instrument's software, the demo, benches and tests): copy under
    a hidden ``.part`` name, fsync, rename. Returns the landed path."""
    landing = Path(landing)
    final = landing / (name or Path(src).name)
    tmp = landing / f".{final.name}.part"
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)  # atomic: the frame appears whole or not at all
    return final


# -- claiming -------------------------------------------------------------------------------
def _entry_from_payload(payload: dict[str, Any]) -> LandingEntry:
    return LandingEntry(str(payload["uri"]), str(payload["name"]), int(payload["size"]),
                        float(payload["mtime"]), payload.get("etag"))


def _localize(entry: LandingEntry, dest_dir: Path, cfg: Settings) -> Path | None:
    """Local path of the entry's content (S3: downloaded into ``dest_dir``); None if gone."""
    if entry.uri.startswith("s3://"):
        from iris_tasks.storage import ObjectNotFoundError
        from iris_tasks.storage.s3 import S3Store

        bucket, key = entry.uri[len("s3://"):].split("/", 1)
        store = S3Store.from_airflow_conn(cfg.s3_conn_id, bucket=bucket)
        try:
            # Instrument uploads carry no sha256 metadata; we hash the download ourselves.
            return store.get_file(key, dest_dir / entry.name, verify=False)
        except ObjectNotFoundError:
            return None
    path = Path(unquote(urlsplit(entry.uri).path))
    return path if path.is_file() else None


def claim_frames(
    payloads: list[dict[str, Any]] | None = None,
    *,
    scan: bool = True,
    limit: int | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
    ledger: FrameLedger | None = None,
    cfg: Settings | None = None,
) -> list[Frame]:
    """Claim the frames announced in ``payloads`` (landing-trigger events) and, with ``scan``,
    anything else waiting in the landing area; return the frames to process.

    Each returned :class:`~.frame.Frame` has its claim fields, with outcome ``new`` or
    ``retry``. Duplicates (same content
    already claimed) are recorded in the ledger (``arrivals.outcome='duplicate'``,
    ``frames.duplicates``) and moved to ``<state>/duplicates/`` (local landing) instead.
    """
    cfg = cfg or settings()
    ledger = ledger or open_ledger(cfg.ledger_path)
    limit = cfg.max_frames_per_run if limit is None else limit
    claimer = run_id or f"pid-{os.getpid()}"

    entries: dict[tuple[str, int, float], tuple[LandingEntry, str | None, str]] = {}
    for payload in payloads or []:
        try:
            e = _entry_from_payload(payload)
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring malformed landing event payload %r", payload)
            continue
        entries[e.key] = (e, payload.get("seen_at"), payload.get("origin") or e.uri)
    if scan:
        for e in scan_landing(cfg.landing, conn_id=cfg.s3_conn_id):
            entries.setdefault(e.key, (e, None, e.uri))

    frames: list[Frame] = []
    incoming = cfg.work_dir / "incoming"
    for entry, seen_at, origin in sorted(entries.values(), key=lambda x: (x[0].mtime, x[0].name)):
        if len(frames) >= limit:
            log.info("claimed %d frames (the per-run limit); the rest wait for the next run", limit)
            break
        arrival = ledger.record_arrival(entry.uri, entry.size, entry.mtime, etag=entry.etag,
                                        seen_by="trigger" if seen_at else "scan", seen_at=seen_at)
        if arrival["outcome"] is not None or not ledger.take_arrival(arrival["id"], claimer):
            continue  # dealt with already, or another run is claiming it right now
        scratch = incoming / str(arrival["id"])
        try:
            frame = _claim_entry(entry, origin, arrival, scratch, ledger, cfg, dag_id, run_id)
        except OSError as exc:
            # A full or failing work area: the file stays where it landed (a move that could
            # not complete leaves the source), the arrival is released so that a later run
            # claims it again, and the other frames go on.
            ledger.release_arrival(arrival["id"])
            shutil.rmtree(scratch, ignore_errors=True)
            log.error("%s could not be claimed (%s: %s); it stays in the landing area for the "
                      "next run", entry.uri, type(exc).__name__, exc)
            continue
        if frame is None:
            continue
        frames.append(frame)
    return frames


def _claim_entry(entry: LandingEntry, origin: str, arrival: dict[str, Any], scratch: Path,
                 ledger: FrameLedger, cfg: Settings, dag_id: str | None,
                 run_id: str | None) -> Frame | None:
    """Hash, claim in the ledger and move one taken arrival into the work area; None when it
    vanished or is a duplicate."""
    from iris_tasks.storage import sha256_file

    scratch.mkdir(parents=True, exist_ok=True)
    path = _localize(entry, scratch, cfg)
    if path is None:
        ledger.close_arrival(arrival["id"], frame_id=None, outcome="vanished")
        log.warning("%s vanished from the landing area before it was claimed", entry.uri)
        return None
    sha = sha256_file(path)
    # Landing time: the earlier of "first seen" and the entry's own time (ctime/S3).
    landed = min(parse_time(arrival["seen_at"]), dt.datetime.fromtimestamp(entry.mtime, dt.UTC))
    frame, outcome = ledger.claim(sha256=sha, filename=entry.name, source_uri=origin,
                                  landed_at=isotime(landed), dag_id=dag_id, run_id=run_id)
    fid = frame["frame_id"]
    if outcome == "duplicate":
        ledger.close_arrival(arrival["id"], frame_id=fid, outcome="duplicate")
        _dispose_duplicate(entry, path, cfg, fid)
        log.info("%s is a duplicate of frame %s (%s); not processed again",
                 entry.uri, fid, frame["status"])
        shutil.rmtree(scratch, ignore_errors=True)
        return None
    try:
        dest_dir = cfg.work_dir / fid
        dest_dir.mkdir(parents=True, exist_ok=True)
        raw_path = dest_dir / entry.name
        if path != raw_path:
            shutil.move(str(path), raw_path)
    except OSError as exc:
        ledger.update_frame(fid, status=FAILED, finished_at=isotime(),
                            error=f"claim: {type(exc).__name__}: {exc} (the file stays in the "
                                  "landing area and is claimed again by a later run)")
        raise
    shutil.rmtree(scratch, ignore_errors=True)
    ledger.update_frame(fid, raw_path=str(raw_path))
    ledger.close_arrival(arrival["id"], frame_id=fid, outcome=outcome)
    log.info("claimed %s as frame %s (%s)", entry.uri, fid, outcome)
    return Frame(frame_id=fid, sha256=sha, filename=entry.name, raw_path=str(raw_path),
                 landed_at=frame["landed_at"], source_uri=origin, outcome=outcome)


def _dispose_duplicate(entry: LandingEntry, path: Path, cfg: Settings, frame_id: str) -> None:
    """Take a duplicate out of the landing directory (kept, not deleted, for inspection)."""
    if entry.uri.startswith("s3://"):
        path.unlink(missing_ok=True)  # our download; the object stays where it landed
        return
    dest = cfg.state_dir / "duplicates" / frame_id
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{int(time.time() * 1000)}-{entry.name}"
    try:
        shutil.move(str(path), target)
    except FileNotFoundError:
        pass


def claim_paths(paths: list[str | os.PathLike[str]], **kwargs: Any) -> list[Frame]:
    """Claim specific local files (``iris-drs process-frame``): they are copied, not moved,
    into the work area, and go through the same ledger claim as landed frames."""
    cfg: Settings = kwargs.pop("cfg", None) or settings()
    ledger: FrameLedger = kwargs.pop("ledger", None) or open_ledger(cfg.ledger_path)
    stage = cfg.work_dir / "incoming" / f"cli-{os.getpid()}-{int(time.time() * 1000)}"
    stage.mkdir(parents=True, exist_ok=True)
    payloads = []
    for p in paths:
        src = Path(p).resolve()
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such raw file")
        copy = stage / src.name
        shutil.copy2(src, copy)
        st = copy.stat()
        payloads.append({"uri": copy.as_uri(), "name": src.name, "size": st.st_size,
                         "mtime": round(st.st_ctime, 6), "seen_at": isotime(), "origin": src.as_uri()})
    try:
        return claim_frames(payloads, scan=False, limit=len(payloads), ledger=ledger, cfg=cfg, **kwargs)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def release_landed(frame: Frame, *, ledger: FrameLedger | None = None,
                   cfg: Settings | None = None) -> bool:
    """Delete a frame's S3 landing object once its raw bytes are archived.

    A file in a landing directory is moved into the work area when it is claimed; an object in
    an S3 landing area is downloaded instead, so without this it would stay stored beside its
    archived copy for good. Called after the archive holds the bytes; the object is deleted
    only while it is still the one claimed (same size and ETag as its arrival, or the same
    modification time where no ETag was listed): a corrected re-send under the same name is
    left for the next claim. Returns whether it deleted the object.
    """
    if not frame.source_uri.startswith("s3://"):
        return False
    from iris_tasks.storage.s3 import S3Store

    cfg = cfg or settings()
    ledger = ledger or open_ledger(cfg.ledger_path)
    claimed = [a for a in ledger.arrivals()
               if a["frame_id"] == frame.frame_id and a["source_uri"] == frame.source_uri]
    if not claimed:
        return False
    bucket, key = frame.source_uri[len("s3://"):].split("/", 1)
    store = S3Store.from_airflow_conn(cfg.s3_conn_id, bucket=bucket)
    now = store.head(key)
    if now is None:
        return False

    def same(arrival: dict[str, Any]) -> bool:
        if arrival["size"] != now.size:
            return False
        if arrival["etag"] and now.etag:
            return arrival["etag"] == now.etag
        # A HEAD's Last-Modified has whole seconds, a listing's milliseconds.
        return now.last_modified is not None and abs(
            arrival["mtime"] - now.last_modified.timestamp()) < 1.0

    if not any(same(a) for a in claimed):
        log.info("%s changed since frame %s was claimed; left in the landing area",
                 frame.source_uri, frame.frame_id)
        return False
    store.delete(key)
    log.info("%s archived as frame %s: removed from the landing area", frame.source_uri,
             frame.frame_id)
    return True


def localize_frame(frame: Frame, *, ledger: FrameLedger | None = None,
                   cfg: Settings | None = None) -> Frame:
    """The frame with its raw file in this host's work area.

    With several worker hosts the frame's task may run on another host than the ``claim``
    that downloaded it (hosts share no disk), or be a retry on another host after the first
    one died. The raw bytes are then fetched again: from the archive (``raw/...``, when an
    earlier try stored them; the landing object is deleted then) or else from the S3 landing
    object itself, and checked against the frame's SHA-256 (its identity since the claim).
    A frame whose raw file is here already is returned as it is (one host, or a retry on the
    same host).
    """
    from ..storage import ObjectNotFoundError, StorageError, open_store, sha256_file
    from ..storage.s3 import S3Store

    cfg = cfg or settings()
    work = cfg.work_dir / frame.frame_id
    if frame.work_dir:
        frame = frame.with_(work_dir=str(work))
    if Path(frame.raw_path).is_file():
        return frame
    ledger = ledger or open_ledger(cfg.ledger_path)
    dest = work / frame.filename
    sources = []
    for product in ledger.products(frame.frame_id):
        if product["kind"] == "raw" and product["key"]:
            sources.append(("archive", lambda key=product["key"]: open_store(cfg.store_url).get_file(key, dest)))
    if frame.source_uri.startswith("s3://"):
        bucket, key = frame.source_uri[len("s3://"):].split("/", 1)
        sources.append(("landing area", lambda: S3Store.from_airflow_conn(
            cfg.s3_conn_id, bucket=bucket).get_file(key, dest, verify=False)))
    tried = []
    for where, fetch in sources:
        try:
            fetch()
        except ObjectNotFoundError as exc:
            tried.append(f"{where}: {exc}")
            continue
        sha = sha256_file(dest)
        if sha != frame.sha256:
            dest.unlink(missing_ok=True)
            tried.append(f"{where}: content changed (sha256 {sha[:12]}, frame {frame.sha256[:12]})")
            continue
        log.info("%s fetched from the %s into this host's work area", frame.filename, where)
        return frame.with_(raw_path=str(dest))
    raise StorageError(frame.source_uri, f"raw frame {frame.frame_id} is not on this host and "
                       f"could not be fetched ({'; '.join(tried) or 'no archive or S3 landing copy'})")
