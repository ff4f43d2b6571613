"""Lineage of IRIS products: OpenLineage datasets for tasks, and the ``iris-drs lineage`` query.

Two records say where a product came from:

* its own FITS header: ``RAWFILE`` (raw frame), ``R_<TYPE>`` (each reference, ``crds://name``),
  ``CRDS_CTX`` (the context that selected them), ``S_<STEP>`` (step status);
* OpenLineage run events, one per task run, with the files it read and wrote as datasets.
  In Airflow the tasks report them to the hook lineage collector (:func:`record`) and the
  OpenLineage provider writes them with its file transport to ``<state>/lineage/ol-*.json``;
  outside Airflow (``iris-drs process-frame``) :func:`record` writes the same kind of event
  directly to that directory.

Dataset naming follows the OpenLineage conventions the Airflow providers use: a local file is
namespace ``file``, name = absolute path; an object is namespace ``s3://<bucket>``, name = key.
References and CRDS mappings are the files in the CRDS cache, so they are ``file`` datasets too.

:func:`lineage_of` answers "which raw frames and references made this product" by reading the
header and walking the events backwards from the product (object -> local product -> rate ->
raw + references). A product is identified by its content (SHA-256 against the ledger's
products) or its exact path/object and header, never by its file name: two nights' products
share names.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .orchestration.context import lineage_sink

log = logging.getLogger(__name__)

PRODUCER = "https://github.com/tmt-iris/iris-drs"
NAMESPACE = "iris-drs"


# -- dataset names -------------------------------------------------------------------------
def dataset_uri(location: str | os.PathLike[str]) -> str:
    """A URI for a file or object: ``s3://...`` and ``file://...`` pass through, a local path
    becomes ``file://<absolute path>``."""
    text = os.fspath(location)
    if "://" in text:
        return text
    return Path(text).resolve().as_uri()


def ol_name(uri: str) -> tuple[str, str]:
    """(namespace, name) of an OpenLineage dataset for ``uri``, as the Airflow providers name it."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        return f"s3://{parts.netloc}", parts.path.lstrip("/") or "/"
    if parts.scheme == "file":
        return ("file://" + parts.netloc if parts.netloc else "file"), unquote(parts.path)
    return parts.scheme or "file", (parts.netloc + parts.path) if parts.scheme else uri


def reference_uris(header: Mapping[str, Any]) -> dict[str, str]:
    """{R_<TYPE> or CRDS_CTX: file URI in the CRDS cache} for a product header.

    ``crds://name`` values are located in the configured cache (iris_tasks.calib); values that
    are already paths are used as they are; N/A entries are skipped.
    """
    out: dict[str, str] = {}
    wanted = {k: str(v).strip() for k, v in header.items()
              if (str(k).startswith("R_") or k == "CRDS_CTX") and v not in (None, "")}
    if not wanted:
        return out
    located: dict[str, str] = {}
    try:
        import crds

        from iris_tasks import calib

        calib.cache_dir()  # configures crds once per process
        for key, value in wanted.items():
            name = value[len("crds://"):] if value.startswith("crds://") else value
            if name.upper() in ("N/A", "NONE") or not name:
                continue
            if os.path.isabs(name):
                located[key] = name
            else:
                try:
                    located[key] = crds.locate_file(name, calib.OBSERVATORY)
                except Exception:  # an unknown name still deserves a dataset
                    located[key] = name
    except ImportError:  # pragma: no cover - the science stack is always installed
        located = {k: v for k, v in wanted.items()}
    for key, path in located.items():
        out[key] = dataset_uri(path) if os.path.isabs(path) else f"file:///{path}"
    return out


# -- recording ------------------------------------------------------------------------------
def _collector() -> Any | None:
    try:
        from airflow.sdk.lineage import get_hook_lineage_collector
    except ImportError:
        return None
    return get_hook_lineage_collector


def in_airflow_task() -> bool:
    """True inside a running Airflow task."""
    return _task_context() is not None


def _task_context() -> Any | None:
    # A task always runs with the Task SDK imported; without it we are certainly not in one,
    # and importing Airflow just to find out would read (and write) its configuration.
    if "airflow.sdk" not in sys.modules:
        return None
    try:
        from airflow.sdk import get_current_context

        return get_current_context()
    except Exception:
        return None


def begin_task() -> None:
    """Start a task's lineage from empty.

    The collector is a process-wide singleton; a worker runs one task per process, but
    ``dag.test()`` and the CLI run many tasks in one process and would otherwise report earlier
    tasks' files as this task's datasets.
    """
    getter = _collector()
    if getter is not None:
        getter.cache_clear()


def record(
    inputs: Iterable[str | os.PathLike[str]],
    outputs: Iterable[str | os.PathLike[str]],
    *,
    job: str | None = None,
    lineage_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Report a step's input and output files/objects.

    In a compute-server worker they are sent to the task that asked for the work, which
    records them as its own. In an Airflow task they go to the hook lineage collector and appear in the task's
    OpenLineage COMPLETE event. Elsewhere (``job`` given) one COMPLETE event is written to
    ``lineage_dir`` (default ``<state>/lineage``) so the same query works for CLI runs.
    """
    ins = [dataset_uri(x) for x in inputs if x]
    outs = [dataset_uri(x) for x in outputs if x]
    sink = lineage_sink()
    if sink is not None:  # a compute-server worker: the requesting task reports them
        sink(ins, outs, job)
        return
    if in_airflow_task():
        getter = _collector()
        if getter is None:
            return
        collector = getter()
        for uri in ins:
            collector.add_input_asset(context=None, uri=uri)
        for uri in outs:
            collector.add_output_asset(context=None, uri=uri)
        return
    if job:
        write_event(job, ins, outs, lineage_dir=lineage_dir)


def write_event(
    job: str, inputs: list[str], outputs: list[str], *,
    lineage_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write one OpenLineage COMPLETE RunEvent as ``<lineage_dir>/ol-<time>-<uuid>.json``.

    The JSON is what openlineage-python's file transport writes, so :func:`load_events` reads
    both kinds the same way.
    """
    if lineage_dir is None:
        from iris_tasks.config import settings

        lineage_dir = settings().lineage_dir
    out_dir = Path(lineage_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    event = {
        "eventType": "COMPLETE",
        "eventTime": now.isoformat(),
        "producer": PRODUCER,
        "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent",
        "run": {"runId": str(uuid.uuid4()), "facets": {}},
        "job": {"namespace": NAMESPACE, "name": job, "facets": {}},
        "inputs": [dict(zip(("namespace", "name"), ol_name(u), strict=True)) for u in inputs],
        "outputs": [dict(zip(("namespace", "name"), ol_name(u), strict=True)) for u in outputs],
    }
    path = out_dir / f"ol-{now.strftime('%Y%m%d-%H%M%S.%f')}-{event['run']['runId'][:8]}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(event) + "\n")
    tmp.replace(path)  # readers never see half an event
    return path


# -- query ----------------------------------------------------------------------------------
def load_events(lineage_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every COMPLETE run event with datasets in ``lineage_dir`` (``ol-*.json`` files; each
    file holds one JSON event per line)."""
    events = []
    for path in sorted(Path(lineage_dir).glob("ol-*.json")):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                log.debug("skipping unreadable lineage line in %s", path)
                continue
            if ev.get("eventType") == "COMPLETE" and (ev.get("inputs") or ev.get("outputs")):
                events.append(ev)
    return events


def _key(ds: Mapping[str, Any]) -> tuple[str, str]:
    return str(ds.get("namespace")), str(ds.get("name"))


def _as_uri(ns: str, name: str) -> str:
    if ns == "file":
        return Path(name).as_uri() if name.startswith("/") else f"file:///{name}"
    if ns.startswith("s3://"):
        return f"{ns}/{name}"
    return f"{ns}/{name}" if "://" in ns else f"{ns}:{name}"


def _classify(ns: str, name: str, produced: bool, crds_root: str | None) -> str:
    base = name.rsplit("/", 1)[-1]
    if base.endswith((".pmap", ".imap", ".rmap")):
        return "context"
    if (crds_root and name.startswith(crds_root)) or "/references/" in name or base.startswith("tmt_iris_"):
        return "reference"
    if produced:
        return "intermediate"
    return "raw"


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """RAWFILE, CRDS_CTX, R_* and S_* keywords of a product's primary header."""
    from astropy.io import fits

    header = fits.getheader(os.fspath(path), 0)
    keep = {k: header[k] for k in header
            if k in ("RAWFILE", "CRDS_CTX", "FILENAME", "OBSNAME", "OBSTYPE", "DETECTOR", "CAL_VER")
            or k.startswith(("R_", "S_"))}
    return keep


#: Seconds an event may precede the last change of the file it says it wrote (the event is
#: written after the file, so only clock granularity matters): older events describe an
#: earlier file at the same path.
EVENT_MTIME_SLACK_S = 1.0


def _names_file(uri: str, name: str) -> bool:
    """Whether ``uri`` ends in the file ``name``: as written, percent-encoded in a file URI,
    or in the key-safe form the store and FITS headers give a name with spaces or non-ASCII
    characters (iris_tasks.storage.keys)."""
    from urllib.parse import unquote

    from .storage.keys import key_filename

    base = unquote(uri.rsplit("/", 1)[-1])
    return name in (base, key_filename(base)) or base == key_filename(name)


def lineage_of(
    product: str, *, lineage_dir: str | os.PathLike[str] | None = None,
    store_url: str | None = None, max_depth: int = 8,
    ledger_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """What made ``product``: header provenance and the upstream datasets in the lineage events.

    ``product`` is a local path, a ``file://``/``s3://`` URI or an object key (with its
    ``/``-separated prefix). It is identified by **content or header, never by file name**:

    * a local file by its SHA-256 among the ledger's products (the same bytes anywhere on
      disk are the same product), and by the events that wrote exactly this path -- only
      those not older than the file (a later file at the same path is another product);
    * an object by its exact URI or key in the events and the ledger;
    * the header's RAWFILE / R_* / CRDS_CTX always; events whose raw frames contradict the
      header's RAWFILE are dropped with a warning.

    A bare file name that is not a file here matches nothing (two nights' products share
    names). Returns ``{"product", "identified_by", "matched", "frames", "header",
    "raw_frames", "references", "contexts", "intermediates", "steps", "warnings"}``; ``steps``
    lists the runs (job, run id, time, inputs, outputs) walked through.
    """
    from iris_tasks.config import settings

    cfg = settings()
    lineage_dir = Path(lineage_dir) if lineage_dir else cfg.lineage_dir
    store_url = store_url or cfg.store_url
    warnings: list[str] = []
    identified_by: list[str] = []

    local: str | None = None
    if product.startswith("file://"):
        local = unquote(urlsplit(product).path)
    elif "://" not in product and os.path.exists(product):
        local = os.path.abspath(product)
    if local is not None and not os.path.isfile(local):
        raise FileNotFoundError(f"{product}: no such file")
    remote = None if local is not None else product

    header: dict[str, Any] = {}
    if local:
        try:
            header = read_provenance(local)
        except Exception as exc:  # not FITS (e.g. a quicklook PNG): events still answer
            log.debug("no FITS provenance in %s: %s", local, exc)
    elif remote and "/" not in remote:
        warnings.append(f"{product}: not a file here, and a bare file name does not identify a "
                        "product (products of different nights share names); give its path, "
                        "URI or object key")
        remote = None

    events = load_events(lineage_dir) if lineage_dir.is_dir() else []
    producers: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for ev in events:
        for ds in ev.get("outputs") or []:
            producers.setdefault(_key(ds), []).append(ev)

    # 1. Content: the ledger's products with these bytes (local) or this object (remote).
    rows = _ledger_products(ledger_path or cfg.ledger_path, local=local, remote=remote)
    frames = _ledger_frames(ledger_path or cfg.ledger_path, {r["frame_id"] for r in rows})
    targets: list[tuple[str, str]] = []
    for row in rows:
        identified_by.append(f"ledger product {row['kind']} v{row['version']} of frame "
                             f"{row['frame_id']} ({'sha256' if local else 'object'} match)")
        for uri in (row.get("url"), row.get("path")):
            if uri and ol_name(dataset_uri(uri)) in producers:
                targets.append(ol_name(dataset_uri(uri)))

    # 2. The exact path or object the events name (a local path only by events not older
    # than the file).
    path_targets: list[tuple[str, str]] = []
    if local:
        key = ol_name(dataset_uri(local))
        fresh = [ev for ev in producers.get(key, []) if _not_older(ev, local)]
        if fresh:
            producers[key] = fresh
            path_targets.append(key)
        elif key in producers:
            producers.pop(key)
            warnings.append(f"{local}: the events that wrote this path are older than the file "
                            "(another product was written there since); not used")
    elif remote:
        path_targets = _match_remote(remote, producers)
    if local and not rows and not path_targets:
        # The same bytes at another path that an event wrote (a product copied or moved
        # by hand): that path's events describe this product.
        path_targets = _same_content(local, producers)
        if path_targets:
            identified_by.append("same content as " + ", ".join(_as_uri(*k) for k in path_targets))
    if not header and (targets or path_targets or remote):
        header = _header_from_targets(targets + path_targets, producers, store_url, remote)

    found, steps = _walk(producers, targets, max_depth)
    if path_targets:
        path_found, path_steps = _walk(producers, path_targets, max_depth)
        raw_file = str(header.get("RAWFILE") or "")
        if raw_file and path_found["raw"] and not any(
                _names_file(u, raw_file) for u in path_found["raw"]):
            warnings.append(
                f"events for {_as_uri(*path_targets[0])} name raw frame(s) "
                f"{', '.join(sorted(path_found['raw']))}, not the header's RAWFILE {raw_file}; "
                "not used")
        else:
            identified_by.append("lineage events of "
                                 + ", ".join(_as_uri(*k) for k in path_targets))
            for kind, items in path_found.items():
                found[kind] |= items
            seen_runs = {s["run_id"] for s in steps}
            steps += [s for s in path_steps if s["run_id"] not in seen_runs]

    # The ledger names the raw frame of its products whatever the events say.
    for frame in frames:
        uri = frame.get("source_uri") or frame.get("raw_path")
        if uri and not any(_names_file(u, frame["filename"]) for u in found["raw"]):
            found["raw"].add(dataset_uri(uri))
    # The header names the raw frame and references even when no event is on file.
    if header:
        identified_by.append("header provenance (RAWFILE, R_*, CRDS_CTX)")
    if header.get("RAWFILE") and not any(
            _names_file(u, str(header["RAWFILE"])) for u in found["raw"]):
        found["raw"].add(str(header["RAWFILE"]))
    header_refs = {k: v for k, v in header.items() if k.startswith("R_") and str(v).upper() != "N/A"}
    for value in header_refs.values():
        name = str(value).removeprefix("crds://")
        if not any(u.rsplit("/", 1)[-1] == name for u in found["reference"]):
            found["reference"].add(str(value))
    if header.get("CRDS_CTX") and not any(
            u.rsplit("/", 1)[-1] == header["CRDS_CTX"] for u in found["context"]):
        found["context"].add(str(header["CRDS_CTX"]))
    steps.sort(key=lambda s: s["time"])
    return {
        "product": product,
        "identified_by": identified_by,
        "matched": [_as_uri(*k) for k in dict.fromkeys(targets + path_targets)],
        "frames": [{k: f.get(k) for k in ("frame_id", "filename", "sha256", "source_uri", "status")}
                   for f in frames],
        "header": header,
        "raw_frames": sorted(found["raw"]),
        "references": sorted(found["reference"]),
        "contexts": sorted(found["context"]),
        "intermediates": sorted(found["intermediate"]),
        "steps": steps,
        "warnings": warnings,
    }


def _not_older(event: Mapping[str, Any], path: str) -> bool:
    """True if ``event`` was written after ``path`` last changed (within the slack)."""
    try:
        when = dt.datetime.fromisoformat(str(event.get("eventTime"))).timestamp()
    except ValueError:
        return False
    return when >= os.path.getmtime(path) - EVENT_MTIME_SLACK_S


def _same_content(local: str, producers: dict[tuple[str, str], list[dict[str, Any]]]
                  ) -> list[tuple[str, str]]:
    """Event-written local files with the same bytes as ``local`` (and events not older than
    them). Cheap first: equal size, then the first 64 KiB (a FITS primary header, with its
    creation DATE and FILENAME), and only then the whole file's SHA-256."""
    from iris_tasks.storage import sha256_file

    size = os.path.getsize(local)
    with open(local, "rb") as handle:
        head = handle.read(65536)
    digest: str | None = None
    found = []
    for key, evs in list(producers.items()):
        path = key[1]
        if key[0] != "file" or path == local:
            continue
        try:
            if os.path.getsize(path) != size:
                continue
            with open(path, "rb") as handle:
                if handle.read(65536) != head:
                    continue
            digest = digest or sha256_file(local)
            if sha256_file(path) != digest:
                continue
        except OSError:  # gone since the event was written
            continue
        fresh = [ev for ev in evs if _not_older(ev, path)]
        if fresh:
            producers[key] = fresh
            found.append(key)
    return found


def _walk(producers: Mapping[tuple[str, str], list[dict[str, Any]]],
          targets: list[tuple[str, str]], max_depth: int
          ) -> tuple[dict[str, set[str]], list[dict[str, Any]]]:
    """Upstream datasets and runs from ``targets`` backwards through the events."""
    crds_root = os.environ.get("CRDS_PATH") or os.environ.get("IRIS_CRDS_PATH")
    seen: set[tuple[str, str]] = set()
    steps: list[dict[str, Any]] = []
    found: dict[str, set[str]] = {"raw": set(), "reference": set(), "context": set(), "intermediate": set()}
    frontier = list(dict.fromkeys(targets))
    depth = 0
    while frontier and depth < max_depth:
        nxt = []
        for key in frontier:
            if key in seen:
                continue
            seen.add(key)
            for ev in producers.get(key, []):
                steps.append({
                    "job": ev["job"]["name"], "run_id": ev["run"]["runId"], "time": ev["eventTime"],
                    "inputs": [_as_uri(*_key(d)) for d in ev.get("inputs") or []],
                    "outputs": [_as_uri(*_key(d)) for d in ev.get("outputs") or []],
                })
                for ds in ev.get("inputs") or []:
                    k = _key(ds)
                    kind = _classify(*k, produced=k in producers, crds_root=crds_root)
                    found[kind].add(_as_uri(*k))
                    # A reference's or context's own history (the nightly masters) is not
                    # part of this product's making; stop there.
                    if k in producers and kind not in ("reference", "context"):
                        nxt.append(k)
        frontier = nxt
        depth += 1
    return found, steps


def _ledger_rows(ledger_path: str | os.PathLike[str],
                 query: Callable[[Any], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``query(reader)`` on the ledger's read-only reader: nothing is created or written."""
    from iris_tasks.orchestration.ledger import FrameLedger, LedgerMissing

    ledger = FrameLedger(ledger_path, readonly=True)
    try:
        with ledger.reader() as reader:
            return query(reader)
    except LedgerMissing:
        return []
    except Exception as exc:  # the events and the header still answer
        log.warning("ledger %s not consulted: %s", ledger.location.display, exc)
        return []


def _ledger_products(ledger_path: str | os.PathLike[str], *, local: str | None,
                     remote: str | None) -> list[dict[str, Any]]:
    """The ledger's product rows for a local file (by SHA-256) or an object (URL or key)."""
    if local:
        from iris_tasks.storage import sha256_file

        try:
            digest = sha256_file(local)
        except OSError:
            return []
        return _ledger_rows(ledger_path, lambda r: r.products_by_sha256(digest))
    if remote and "/" in remote:
        key = urlsplit(remote).path.lstrip("/") if "://" in remote else remote.lstrip("/")
        return _ledger_rows(ledger_path, lambda r: r.products_by_object(remote, key))
    return []


def _ledger_frames(ledger_path: str | os.PathLike[str],
                   frame_ids: set[str]) -> list[dict[str, Any]]:
    return _ledger_rows(ledger_path, lambda r: r.frames_by_id(frame_ids)) if frame_ids else []


def _header_from_targets(targets: list[tuple[str, str]],
                         producers: Mapping[tuple[str, str], list[dict[str, Any]]],
                         store_url: str, remote: str | None) -> dict[str, Any]:
    """Provenance for a product given as an object: read the local file the events name (the
    product itself, or the same file as input of the step that stored it), else the object."""
    candidates = [name for ns, name in targets if ns == "file"]
    for ns, name in targets:
        base = name.rsplit("/", 1)[-1]
        for ev in producers.get((ns, name), []):
            candidates += [d["name"] for d in ev.get("inputs") or []
                           if d.get("namespace") == "file" and str(d.get("name", "")).endswith("/" + base)]
    for path in candidates:
        if os.path.isfile(path):
            try:
                return read_provenance(path)
            except Exception:
                continue
    for ns, name in targets:
        if ns.startswith("s3://"):
            header = _remote_provenance(_as_uri(ns, name), store_url)
            if header:
                return header
    if remote:
        return _remote_provenance(remote, store_url)
    return {}


def _match_remote(product: str, producers: Mapping[tuple[str, str], Any]) -> list[tuple[str, str]]:
    """Event datasets for an object: its exact URI, or for a key (``night/.../name``) the
    objects whose key is exactly it under the bucket's prefix. Never a bare name."""
    if "://" in product:
        key = ol_name(product)
        return [key] if key in producers else []
    tail = product.strip("/")
    if "/" not in tail:
        return []
    # A key is the store's whole name of the object (night/detector/OBSNAME/file): in a
    # file:// store the events name it by its absolute path, which ends with the key.
    return [k for k in producers if k[1] == tail or k[1].endswith("/" + tail)]


def _remote_provenance(product: str, store_url: str) -> dict[str, Any]:
    """Header provenance of an object: download it to a temporary file (headers only are
    needed, but objects are whole files)."""
    import tempfile

    from iris_tasks.storage import open_store

    try:
        store = open_store(store_url)
        key = product
        if product.startswith("s3://"):
            parts = urlsplit(product)
            key = parts.path.lstrip("/")
            prefix = urlsplit(store.url("x")).path.lstrip("/")[:-1]  # the store's own prefix
            if prefix and key.startswith(prefix):
                key = key[len(prefix):]
        if not key.endswith((".fits", ".fit")):
            return {}
        with tempfile.TemporaryDirectory() as tmp:
            dest = store.get_file(key, Path(tmp) / key.rsplit("/", 1)[-1])
            return read_provenance(dest)
    except Exception as exc:
        log.info("no header provenance for %s: %s", product, exc)
        return {}


# -- CLI ------------------------------------------------------------------------------------
def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "lineage", help="which raw frames and references made a product (header + OpenLineage events)")
    p.add_argument("product", help="product path, file:// or s3:// URI, or object key "
                                   "(identified by content and header, never by file name)")
    p.add_argument("--ledger", default=None,
                   help="frame ledger whose products are matched by SHA-256 (default: the state's)")
    p.add_argument("--lineage-dir", default=None, help="OpenLineage event files (default <state>/lineage)")
    p.add_argument("--store", default=None, help="object store URL for remote products (default $IRIS_STORE_URL)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run_lineage_cli)


def run_lineage_cli(args: argparse.Namespace) -> int:
    result = lineage_of(args.product, lineage_dir=args.lineage_dir, store_url=args.store,
                        ledger_path=args.ledger)
    for warning in result["warnings"]:
        print(f"iris-drs lineage: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0 if (result["raw_frames"] or result["steps"]) else 3
    print(f"product: {result['product']}")
    print("identified by: " + ("; ".join(result["identified_by"]) or "nothing (see the warnings)"))
    for frame in result["frames"]:
        print(f"  ledger frame {frame['frame_id']} {frame['filename']} ({frame['status']})")
    for label in ("raw_frames", "references", "contexts", "intermediates"):
        items = result[label]
        print(f"{label.replace('_', ' ')}:" + ("" if items else " (none found)"))
        for item in items:
            print(f"  {item}")
    if result["header"]:
        print("header provenance:")
        for k, v in result["header"].items():
            print(f"  {k:9s} = {v}")
    if result["steps"]:
        print("steps:")
        for s in result["steps"]:
            print(f"  {s['time']}  {s['job']}")
    return 0 if (result["raw_frames"] or result["steps"]) else 3
