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
raw + references).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

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


def _compute_sink() -> Any | None:
    if "iris_tasks.orchestration.compute" not in sys.modules:
        return None
    from iris_tasks.orchestration.compute import lineage_sink

    return lineage_sink()


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
    sink = _compute_sink()
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
        from iris_tasks.orchestration.config import settings

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


def lineage_of(
    product: str, *, lineage_dir: str | os.PathLike[str] | None = None,
    store_url: str | None = None, max_depth: int = 8,
) -> dict[str, Any]:
    """What made ``product`` (a local path, a ``file://``/``s3://`` URI, an object key or a
    bare file name): header provenance and the upstream datasets found in the lineage events.

    Returns ``{"product", "header", "raw_frames", "references", "contexts", "intermediates",
    "steps"}``; ``steps`` lists the runs (job, run id, time, inputs, outputs) walked through.
    """
    from iris_tasks.orchestration.config import settings

    cfg = settings()
    lineage_dir = Path(lineage_dir) if lineage_dir else cfg.lineage_dir
    header: dict[str, Any] = {}
    local = None
    if os.path.exists(product):
        local = product
    elif product.startswith("file://"):
        local = unquote(urlsplit(product).path)
    if local and os.path.exists(local):
        try:
            header = read_provenance(local)
        except Exception as exc:  # not FITS (e.g. a quicklook PNG): events still answer
            log.debug("no FITS provenance in %s: %s", local, exc)
    elif product.startswith("s3://") or "/" in product:
        header = _remote_provenance(product, store_url or cfg.store_url)

    events = load_events(lineage_dir) if lineage_dir.is_dir() else []
    producers: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for ev in events:
        for ds in ev.get("outputs") or []:
            producers.setdefault(_key(ds), []).append(ev)

    targets = _match_targets(product, local, producers)
    if not header:
        header = _header_from_targets(targets, producers, store_url or cfg.store_url)
    crds_root = os.environ.get("CRDS_PATH") or os.environ.get("IRIS_CRDS_PATH")
    seen: set[tuple[str, str]] = set()
    steps: list[dict[str, Any]] = []
    found: dict[str, set[str]] = {"raw": set(), "reference": set(), "context": set(), "intermediate": set()}
    frontier = list(targets)
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

    # The header names the raw frame and references even when no event is on file.
    if header.get("RAWFILE") and not any(
            u.rsplit("/", 1)[-1] == header["RAWFILE"] for u in found["raw"]):
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
        "matched": [_as_uri(*k) for k in targets],
        "header": header,
        "raw_frames": sorted(found["raw"]),
        "references": sorted(found["reference"]),
        "contexts": sorted(found["context"]),
        "intermediates": sorted(found["intermediate"]),
        "steps": steps,
    }


def _header_from_targets(targets: list[tuple[str, str]],
                         producers: Mapping[tuple[str, str], list[dict[str, Any]]],
                         store_url: str) -> dict[str, Any]:
    """Provenance for a product named by key or file name: read the local file that the
    events name (the product itself, or the same file as input of the step that stored it),
    else the stored object."""
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
    return {}


def _match_targets(product: str, local: str | None,
                   producers: Mapping[tuple[str, str], Any]) -> list[tuple[str, str]]:
    candidates: list[tuple[str, str]] = []
    if local:
        candidates.append(ol_name(dataset_uri(local)))
    if "://" in product:
        candidates.append(ol_name(product))
    exact = list(dict.fromkeys(c for c in candidates if c in producers))
    if exact:
        return exact
    # An object key or a bare name: match on the key suffix, then on the file name.
    tail = product.rstrip("/")
    by_suffix = [k for k in producers if k[1] == tail or k[1].endswith("/" + tail)]
    if by_suffix:
        return by_suffix
    base = tail.rsplit("/", 1)[-1]
    return [k for k in producers if k[1].rsplit("/", 1)[-1] == base]


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
    p.add_argument("product", help="product path, file:// or s3:// URI, object key or file name")
    p.add_argument("--lineage-dir", default=None, help="OpenLineage event files (default <state>/lineage)")
    p.add_argument("--store", default=None, help="object store URL for remote products (default $IRIS_STORE_URL)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run_lineage_cli)


def run_lineage_cli(args: argparse.Namespace) -> int:
    result = lineage_of(args.product, lineage_dir=args.lineage_dir, store_url=args.store)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0 if (result["raw_frames"] or result["steps"]) else 3
    print(f"product: {result['product']}")
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
