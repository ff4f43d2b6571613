"""The real-time chain of one raw frame, as plain functions.

``iris_realtime`` runs :func:`admit_frames` (classification, quarantine) in its claim task,
then one task per frame (:mod:`.frame_task`): :func:`archive_frame` (the raw file into the
store) beside :func:`process_frame` (readout -> reduce -> quicklook), then
:func:`ingest_frame` (products and quicklook). The run's summary is in :mod:`.run_summary`,
and the chain without a scheduler (``iris-drs process-frame``) in :mod:`.local_run`.
A *frame* is a small JSON-able dict that grows as it goes
through the chain (it is what the tasks pass each other as XCom)::

    claim      frame_id sha256 filename raw_path landed_at source_uri outcome
    classify   + night detector obstype obsname kind mode filter readpatt stages
                 final_suffix deadline_seconds deadline_at work_dir
    readout    + crds_context rate_path
    reduce     + product_path (cal/s3d or None) final_path
    quicklook  + quicklook_path
    archive    (beside the above) {"raw": url}, handed to ingest as ``archived``
               (with the early upload's {"rate": url})
    ingest     + objects {kind: url} status latency_seconds deadline_missed

A frame whose metadata is invalid is quarantined by :func:`classify_frame` (which then returns
None): the raw file and a ``reason.json`` go to ``<state>/quarantine/<night>/<frame_id>/``
(and, best effort, to the store under ``quarantine/``), the ledger says ``quarantined``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .. import lineage
from ..config import Settings, settings
from .alerts import check_frame
from .common import STORE_KIND, ascii_meta, ensure_dir, frame_stage, run_info, versioned_name
from .flexure_memory import flexure_prior_options, record_frame_flexure
from .frame import Frame
from .ledger import (
    DONE,
    PROCESSING,
    QUARANTINED,
    FrameLedger,
    isotime,
    open_ledger,
    parse_time,
)

log = logging.getLogger(__name__)

JOB = "iris_realtime"


def _ctx(ledger: FrameLedger | None, cfg: Settings | None) -> tuple[FrameLedger, Settings]:
    cfg = cfg or settings()
    return ledger or open_ledger(cfg.ledger_path), cfg


# -- classify / quarantine ------------------------------------------------------------------
def _identity(raw_path: str, landed_at: str):
    """(recipe, frame info) from a raw header; raises metadata.MetadataError if invalid.

    The header is the one the validation parsed: the file is read once."""
    from .. import metadata

    verdict = metadata.inspect_file(raw_path)
    recipe, header = verdict.recipe, verdict.header
    night = metadata.observing_night(str(header["DATE-OBS"]), str(header["TIME-OBS"]))
    readpatt = header.get("READPATT") or metadata.readpatt(header["SAMPMODE"], header["NUMREADS"])
    deadline_at = parse_time(landed_at) + dt.timedelta(seconds=recipe.deadline_seconds)
    info = {
        "night": night, "detector": str(header["DETECTOR"]), "obstype": recipe.obstype,
        "obsname": recipe.obsname, "kind": recipe.kind, "mode": recipe.mode,
        "filter": str(header.get("FILTER")) if header.get("FILTER") is not None else None,
        "readpatt": str(readpatt), "deadline_seconds": recipe.deadline_seconds,
        "deadline_at": isotime(deadline_at),
    }
    return recipe, info


def classify_frame(frame: Frame, *, ledger: FrameLedger | None = None,
                   cfg: Settings | None = None) -> Frame | None:
    """Validate the raw file and attach the frame's recipe; quarantine it if invalid.

    Returns the classified frame, or None when the frame was quarantined. Any failure to read
    or validate the file is bad input (quarantine with the reason), never a crash of the run.
    A frame classified already is returned as it is.
    """
    from .. import metadata

    if frame.classified:
        return frame
    ledger, cfg = _ctx(ledger, cfg)
    fid = frame.frame_id
    with frame_stage(ledger, fid, "classify") as detail:
        try:
            recipe, info = _identity(frame.raw_path, frame.landed_at)
        except metadata.MetadataError as exc:
            problems = list(exc.problems)
            reason = "invalid IRIS metadata"
        except Exception as exc:  # noqa: BLE001 - whatever breaks the validator is bad input
            problems = [("file", f"cannot be read as an IRIS raw frame: "
                                 f"{type(exc).__name__}: {exc}")]
            reason = "unreadable raw file"
        else:
            problems = []
        if problems:
            detail.update(outcome="quarantined", problems=[f"{k}: {m}" for k, m in problems])
            quarantine_frame(frame, problems, reason=reason, ledger=ledger, cfg=cfg)
            return None
        ledger.update_frame(fid, status=PROCESSING, **info)
        detail.update(obsname=recipe.obsname, kind=recipe.kind)
    lineage.record([frame.source_uri], [frame.raw_path], job=f"{JOB}.classify")
    return frame.with_(**info, stages=tuple(recipe.stages), final_suffix=recipe.final_suffix,
                       work_dir=str(cfg.work_dir / fid))


def admit_frames(frames: list[Frame], *, ledger: FrameLedger | None = None,
                 cfg: Settings | None = None) -> list[Frame]:
    """Classify freshly claimed frames and quarantine the bad ones, in the claim task.

    Rejecting bad input here, with a header read and a sampled look at the data, costs a
    fraction of a second per file and no compute slot: a burst of bad files never queues in
    front of good frames' compute. Returns the classified good frames.
    """
    ledger, cfg = _ctx(ledger, cfg)
    admitted = []
    for frame in frames:
        classified = classify_frame(frame, ledger=ledger, cfg=cfg)
        if classified is not None:
            admitted.append(classified)
    return admitted


def quarantine_frame(frame: Frame, problems: list[tuple[str, str]], *,
                     reason: str = "invalid IRIS metadata", ledger: FrameLedger | None = None,
                     cfg: Settings | None = None) -> Path:
    """Move a bad frame to the quarantine with a ``reason.json``; returns the reason file."""
    from astropy.io import fits

    from .. import metadata

    ledger, cfg = _ctx(ledger, cfg)
    fid = frame.frame_id
    landed = parse_time(frame.landed_at)
    night = metadata.observing_night(landed.strftime("%Y-%m-%d"), landed.strftime("%H:%M:%S"))
    detector = obsname = "unknown"
    try:  # name the frame as well as its header allows, for the store key
        header = fits.getheader(frame.raw_path, 0)
        if header.get("DETECTOR") in metadata.DETECTORS:
            detector = str(header["DETECTOR"])
        if header.get("OBSNAME") in metadata.RECIPES:
            obsname = str(header["OBSNAME"])
    except Exception:
        pass
    dest = ensure_dir(cfg.quarantine_dir / night / fid)
    raw_src = Path(frame.raw_path)
    raw_dest = dest / frame.filename
    if raw_src.exists():
        shutil.move(str(raw_src), raw_dest)
    reason_doc = {
        "frame_id": fid, "filename": frame.filename, "sha256": frame.sha256,
        "source_uri": frame.source_uri, "landed_at": frame.landed_at,
        "quarantined_at": isotime(), "reason": reason,
        "problems": [{"keyword": k, "message": m} for k, m in problems],
        "raw_path": str(raw_dest), **{k: v for k, v in run_info().items() if k != "try_number"},
    }
    reason_path = dest / "reason.json"
    reason_path.write_text(json.dumps(reason_doc, indent=2) + "\n")
    summary = "; ".join(f"{k}: {m}" for k, m in problems)[:2000]
    ledger.update_frame(fid, status=QUARANTINED, raw_path=str(raw_dest), finished_at=isotime(),
                        error=f"quarantined ({reason}): {summary}")
    log.warning("frame %s (%s) quarantined: %s", fid, frame.filename, summary)
    _store_quarantine(raw_dest, reason_path, night, detector, obsname, fid, cfg)
    return reason_path


def _store_quarantine(raw: Path, reason: Path, night: str, detector: str, obsname: str,
                      fid: str, cfg: Settings) -> None:
    """Copy a quarantined frame to the store (best effort: the local copy is authoritative)."""
    try:
        from ..storage import open_store, product_key

        store = open_store(cfg.store_url)
        meta = ascii_meta({"frame_id": fid, "status": "quarantined"})
        if raw.exists():
            store.put_file(raw, product_key(night, detector, obsname, raw.name, "quarantine"), meta)
        store.put_file(reason, product_key(night, detector, obsname, f"{raw.stem}.reason.json",
                                           "quarantine"), meta, overwrite=True)
    except Exception as exc:
        log.warning("quarantined frame %s not copied to the store: %s", fid, exc)


# -- processing -----------------------------------------------------------------------------
def _out_dir(frame: Frame, variant: str | None) -> Path:
    base = Path(frame.work_dir)
    return ensure_dir(base / variant if variant else base)


def _stage(name: str, variant: str | None) -> str:
    return f"reprocess.{name}" if variant else name


def readout_frame(frame: Frame, *, context: str | None = None, variant: str | None = None,
                  ledger: FrameLedger | None = None, cfg: Settings | None = None,
                  keep: dict[str, Any] | None = None) -> Frame:
    """Stage 1 (ramp fitting) -> ``<root>_rate.fits``; pins the CRDS context for the frame.

    ``context`` None takes the operational context now, and the same context is then used for
    every later step of this frame even if a new one is published meanwhile. ``keep``: a dict
    that receives the saved rate model as ``"rate_model"``, for :func:`reduce_frame` in the
    same process.
    """
    from .. import calib
    from ..pipelines.recipes import run_readout_model

    ledger, cfg = _ctx(ledger, cfg)
    calib.cache_dir()  # configures crds once per process
    calib.follow_store(context)  # IRIS_CRDS_STORE: hosts sharing no disk
    ctx = calib.resolve_context(context) if context else calib.operational_context()
    with frame_stage(ledger, frame.frame_id, _stage("readout", variant)) as detail:
        rate, model = run_readout_model(frame.raw_path, _out_dir(frame, variant), context=ctx,
                                        validate=False)
        if keep is not None:
            keep["rate_model"] = model
        else:
            model.close()
        detail.update(crds_context=ctx, rate=str(rate))
    if not variant:
        ledger.update_frame(frame.frame_id, crds_context=ctx)
    _record_step_lineage([frame.raw_path], rate, "readout")
    return frame.with_(crds_context=ctx, rate_path=str(rate))


def _sky_paths(frame: Frame, ledger: FrameLedger, cfg: Settings | None = None) -> list[str]:
    """The night's processed sky frames matching this science/telluric frame.

    Imager: their rate images. IFS: their sky cubes (``s3d``), so no sky is extracted twice
    inside the real-time budget; with none yet, the cube pipeline's documented outer-spaxel
    fallback applies. A sky product that is not on this host (processed on another worker
    host, or its work area cleaned) is fetched from the store into the frame's work area,
    checksum-verified, so every host reduces with the same skies.
    """
    if frame.kind not in ("science", "telluric"):
        return []
    wanted = "rate" if frame.mode == "imager" else "s3d"
    skies = [f for f in ledger.frames(night=frame.night, kind="sky", status=DONE)
             if f["detector"] == frame.detector and f["filter"] == frame.filter
             and f.get("mode") == frame.mode]
    paths = []
    for sky in skies[-3:]:
        for prod in ledger.products(sky["frame_id"], current_only=True):
            if prod["kind"] != wanted or not prod["path"]:
                continue
            if Path(prod["path"]).is_file():
                paths.append(prod["path"])
            elif prod["key"] and frame.work_dir:
                paths += _fetch_sky(prod, Path(frame.work_dir) / "skies", cfg or settings())
    return paths


def _fetch_sky(product: dict[str, Any], dest_dir: Path, cfg: Settings) -> list[str]:
    """A sky product from the store (SHA-256 checked); none when it cannot be had, which
    leaves the frame to the pipeline's fallback, as a sky not yet processed would."""
    from ..storage import open_store

    dest = dest_dir / Path(product["path"]).name
    try:
        if not dest.is_file():
            open_store(cfg.store_url).get_file(product["key"], dest)
    except Exception as exc:  # noqa: BLE001 - logged; the reduction goes on without it
        log.warning("sky %s not fetched from the store: %s: %s", product["key"], type(exc).__name__, exc)
        return []
    return [str(dest)]


def reduce_frame(frame: Frame, *, variant: str | None = None,
                 ledger: FrameLedger | None = None, cfg: Settings | None = None,
                 rate_model: Any = None) -> Frame:
    """Stage 2 by the frame's recipe (imager -> ``_cal``); frames without one keep their rate.

    ``rate_model``: the frame's rate still in memory from :func:`readout_frame` (``keep``),
    handed over to stage 2 rather than read back from ``rate_path``.

    IFS frames: the ``flexure`` step gets the night's neighbouring offsets from the ledger as
    its prior (:func:`flexure_prior_options`, window ``IRIS_FLEXURE_PRIOR_MINUTES``), and the
    offsets the frame's reduction used are recorded in the ledger afterwards
    (:func:`record_frame_flexure`; by the real-time chain, not by reprocessing).
    """
    from astropy.io import fits

    from ..pipelines.recipes import run_reduction

    ledger, cfg = _ctx(ledger, cfg)
    with frame_stage(ledger, frame.frame_id, _stage("reduce", variant)) as detail:
        skies = _sky_paths(frame, ledger, cfg)
        steps: dict[str, dict[str, Any]] = {}
        if frame.mode in ("lenslet", "slicer"):
            prior = flexure_prior_options(frame, fits.getheader(frame.rate_path, 0), ledger,
                                          window_seconds=60.0 * cfg.flexure_prior_minutes)
            if prior:
                steps["flexure"] = prior
                detail["flexure_prior"] = prior
        product = run_reduction(frame.rate_path, _out_dir(frame, variant), sky_paths=skies,
                                context=frame.crds_context, rate_model=rate_model,
                                step_options=steps)
        detail.update(product=str(product) if product else None, skies=skies)
        if product is not None and not variant and frame.mode in ("lenslet", "slicer"):
            flex = record_frame_flexure(frame, fits.getheader(product, 0), ledger)
            if flex is not None:
                detail["flexure"] = {k: flex[k] for k in ("dx", "dy", "method")}
    if product is not None:
        _record_step_lineage([frame.rate_path, *skies], product, "reduce")
    final = str(product) if product else frame.rate_path
    return frame.with_(product_path=str(product) if product else None, final_path=final)


def quicklook_frame(frame: Frame, *, variant: str | None = None,
                    ledger: FrameLedger | None = None, cfg: Settings | None = None) -> Frame:
    """PNG preview (zscale) of the final product: ``<root>_ql.png``."""
    from ..quicklook import make_quicklook

    ledger, cfg = _ctx(ledger, cfg)
    final = Path(frame.final_path)
    root = final.stem.rsplit("_", 1)[0]
    png = _out_dir(frame, variant) / f"{root}_ql.png"
    with frame_stage(ledger, frame.frame_id, _stage("quicklook", variant)) as detail:
        make_quicklook(final, png)
        detail["png"] = str(png)
    lineage.record([final], [png], job=f"{JOB}.quicklook")
    return frame.with_(quicklook_path=str(png))


def _record_step_lineage(inputs: list[str], output: Any, step: str) -> None:
    """Inputs of a pipeline step plus the references and context named in its output."""
    from astropy.io import fits

    try:
        header = dict(fits.getheader(str(output), 0))
    except Exception:
        header = {}
    refs = list(lineage.reference_uris(header).values())
    lineage.record([*inputs, *refs], [output], job=f"{JOB}.{step}")


def store_item(store: Any, frame: Frame, kind: str, path: str, *, variant: str | None,
                ledger: FrameLedger, run: dict[str, Any], name: str | None = None,
                sha256: str | None = None) -> str:
    """Put one file of the frame into the store and record it as a product; returns its URL.

    ``sha256``: the file's hash when it is known already (the raw frame's, from the claim)."""
    from ..storage import product_key
    from ..storage.keys import encode_name

    ctx = frame.crds_context if kind != "raw" else None
    if name is None:
        name = (Path(path).name if kind == "raw" or not variant
                else versioned_name(Path(path).name, ctx))
    key = product_key(frame.night, frame.detector, frame.obsname, name, STORE_KIND[kind])
    meta = ascii_meta({"frame_id": frame.frame_id, "obsname": frame.obsname,
                       "night": frame.night, "detector": frame.detector,
                       "rawfile": encode_name(frame.filename),  # ASCII, reversible
                       "crds_context": ctx, "product": kind})
    info = store.put_file(path, key, meta, overwrite=kind != "raw", sha256=sha256)
    ledger.add_product(frame.frame_id, kind, path=str(path), key=key, url=info.url,
                       sha256=info.sha256, size=info.size, crds_context=ctx, run_id=run["run_id"])
    return info.url


def archive_frame(frame: Frame, *, store: Any = None, ledger: FrameLedger | None = None,
                  cfg: Settings | None = None) -> dict[str, Any]:
    """Store the raw frame under its immutable ``raw/...`` key, beside its processing.

    Raw data are archived as soon as they are claimed, whatever becomes of the processing (a
    frame whose reduction fails is still safe in the store), and the upload overlaps the
    compute instead of adding to the frame's latency. A file name already archived with other
    bytes (a corrected re-send) is stored as a new version, ``<stem>.<frame_id>.fits``, never
    over the first one. ``frame`` is classified (:func:`admit_frames`). Returns
    ``{"raw": url}``.
    """
    from ..storage import ObjectConflictError, open_store

    ledger, cfg = _ctx(ledger, cfg)
    if not frame.classified:
        raise ValueError(f"{frame.filename}: archive needs a classified frame")
    store = store or open_store(cfg.store_url)
    run = run_info()
    with frame_stage(ledger, frame.frame_id, "archive", run) as detail:
        # The claim hashed the raw file (its frame id) and nothing writes it since.
        try:
            url = store_item(store, frame, "raw", frame.raw_path, variant=None,
                             ledger=ledger, run=run, sha256=frame.sha256)
        except ObjectConflictError:
            name = raw_version_name(frame.filename, frame.frame_id)
            log.warning("%s: a different raw file with this name is archived already; storing "
                        "this one as %s", frame.filename, name)
            url = store_item(store, frame, "raw", frame.raw_path, variant=None,
                             ledger=ledger, run=run, name=name, sha256=frame.sha256)
            detail["renamed"] = name
        detail["objects"] = {"raw": url}
    lineage.record([frame.raw_path], [url], job=f"{JOB}.archive")
    try:  # an S3 landing object is the second copy now: no frame is stored twice
        from .landing import release_landed

        release_landed(frame, ledger=ledger, cfg=cfg)
    except Exception as exc:  # noqa: BLE001 - it stays in the landing area, already claimed
        log.warning("%s: landing object not removed after archiving: %s: %s",
                    frame.source_uri, type(exc).__name__, exc)
    return {"raw": url}


def raw_version_name(filename: str, frame_id: str) -> str:
    """Archive name of a raw file whose name is taken by other bytes: the frame id (a prefix
    of the content hash) before the extension, so the name is stable across retries."""
    stem, dot, ext = filename.rpartition(".")
    return f"{stem}.{frame_id}.{ext}" if dot else f"{filename}.{frame_id}"


def ingest_frame(frame: Frame, *, archived: dict[str, str] | None = None,
                 variant: str | None = None, store: Any = None,
                 ledger: FrameLedger | None = None, cfg: Settings | None = None,
                 close: bool = True) -> dict[str, Any]:
    """Store raw, products and quicklook (checksummed, idempotent) and close the frame.

    Keys: ``raw|products|quicklook/<night>/<detector>/<obsname>/<file>``. The raw frame never
    changes (same bytes: no-op; other bytes under the same name: error). Products of the
    real-time chain replace their key on a re-run; reprocessed products (``variant`` = the new
    context) get new keys with the context in the name (see :func:`common.versioned_name`).
    ``close=False`` stores without closing the frame (re-ingesting a finished frame).
    ``archived``: what the frame task stored already, beside the compute (``{"raw": url,
    "rate": url}``: the archive and the early upload); those are not stored again. Returns the
    frame's report: its fields plus ``objects``, ``status``, ``latency_seconds`` and
    ``deadline_missed`` (JSON-able, the task's XCom).
    """
    from ..storage import open_store

    ledger, cfg = _ctx(ledger, cfg)
    store = store or open_store(cfg.store_url)
    fid = frame.frame_id
    ctx = frame.crds_context
    archived = dict(archived or {})
    items: list[tuple[str, str]] = []
    if not variant and "raw" not in archived:
        items.append(("raw", frame.raw_path))
    if "rate" not in archived:
        items.append(("rate", frame.rate_path))
    if frame.product_path:
        items.append((frame.final_suffix or "cal", frame.product_path))
    if frame.quicklook_path:
        items.append(("quicklook", frame.quicklook_path))
    run = run_info()
    objects: dict[str, str] = {}
    with frame_stage(ledger, fid, _stage("ingest", variant), run) as detail:
        for kind, path in items:
            objects[kind] = store_item(store, frame, kind, path, variant=variant, ledger=ledger, run=run)
        detail["objects"] = objects
    lineage.record([p for _, p in items], list(objects.values()), job=f"{JOB}.ingest")
    objects = {**archived, **objects}
    if variant or not close:
        ledger.update_frame(fid, crds_context=ctx)
        return {**frame.to_dict(), "objects": objects, "status": DONE}
    done = ledger.finish(fid, status=DONE)
    supersede_earlier(fid, ledger)
    check_frame(done, ledger=ledger)
    log.info("frame %s done in %.1f s (deadline %s s)%s", fid, done["latency_seconds"],
             frame.deadline_seconds, " - DEADLINE MISSED" if done["deadline_missed"] else "")
    return {**frame.to_dict(), "objects": objects, "status": DONE,
            "latency_seconds": done["latency_seconds"], "deadline_missed": bool(done["deadline_missed"])}


def supersede_earlier(frame_id: str, ledger: FrameLedger) -> None:
    for old in ledger.supersede(frame_id):
        log.warning("frame %s (%s, was %s) is superseded by frame %s: same file name, new content",
                    old["frame_id"], old["filename"], old["status"], frame_id)


# -- whole chain and run summary ------------------------------------------------------------
def process_frame(frame: Frame | dict[str, Any], *, context: str | None = None,
                  ledger: FrameLedger | None = None, cfg: Settings | None = None) -> Frame | None:
    """classify -> readout -> reduce -> quicklook: all of a frame's work before the store.

    The compute of the ``frame`` task of ``iris_realtime`` (a frame that arrives over
    the compute server's socket is a dict). Returns None when the frame was quarantined.
    """
    frame = Frame.from_dict(frame)
    ledger, cfg = _ctx(ledger, cfg)
    classified = classify_frame(frame, ledger=ledger, cfg=cfg)  # no-op when admitted at claim
    if classified is None:
        return None
    from .context import notify

    kept: dict[str, Any] = {}
    f = readout_frame(classified, context=context, ledger=ledger, cfg=cfg, keep=kept)
    notify("rate_written", frame=f.to_dict())
    f = reduce_frame(f, ledger=ledger, cfg=cfg, rate_model=kept.pop("rate_model"))
    return quicklook_frame(f, ledger=ledger, cfg=cfg)
