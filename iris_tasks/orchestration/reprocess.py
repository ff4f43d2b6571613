"""Reprocessing after a CRDS context change: find exactly the frames whose references change.

A frame qualifies when it was processed (ledger status ``done``), its recipe has a stage 2
(kinds science, sky, telluric: darks and flats only feed the masters) and
:func:`iris_tasks.calib.references_changed` reports at least one reference type whose best
reference differs between the context the frame was processed with (``frames.crds_context``)
and the new one. Those frames go through readout -> reduce -> quicklook -> ingest again under
the new context; the new products get new object keys with the context in the name, and the
ledger keeps every version (``products.version`` / ``current``).

Which frames and which context (:func:`resolve_request`):

* ``context``: the run's ``context`` param, else the triggering ``iris/crds-context`` asset
  event's ``context``, else the operational context;
* nights: the ``night_from``/``night_to`` params, else from the triggering event's night on
  (new masters have USEAFTER at the start of their night, so they apply to it and later), else
  the night of the run's logical date (the daily cron run and ``airflow backfill``), else all.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import Settings, settings
from .common import ensure_dir
from .frame import Frame
from .ledger import DONE, FrameLedger, open_ledger

log = logging.getLogger(__name__)

REPROCESS_KINDS = ("science", "sky", "telluric")
LAST_NIGHT = "9999-12-31"


def night_of_datetime(when: dt.datetime) -> str:
    """Observing night of a UTC instant (e.g. a run's logical date)."""
    from .. import metadata

    when = when.astimezone(dt.UTC) if when.tzinfo else when
    return metadata.observing_night(when.strftime("%Y-%m-%d"), when.strftime("%H:%M:%S"))


def resolve_request(params: Mapping[str, Any] | None = None,
                    events: Sequence[Mapping[str, Any]] = (),
                    logical_date: dt.datetime | None = None) -> dict[str, Any]:
    """``{"context", "nights": [from, to] | None, "force", "source"}`` for one reprocessing run."""
    from .. import calib

    params = dict(params or {})
    events = [e for e in events if e]
    calib.cache_dir()  # configures crds once per process
    context = params.get("context") or (events[-1].get("context") if events else None)
    context = calib.resolve_context(context) if context else calib.operational_context()
    lo, hi = params.get("night_from"), params.get("night_to")
    if lo or hi:
        nights, source = [lo or hi, hi or lo], "params"
    elif events:
        first = min(str(e.get("night")) for e in events if e.get("night")) if any(
            e.get("night") for e in events) else None
        nights, source = ([first, LAST_NIGHT] if first else None), "asset-event"
    elif logical_date is not None:
        night = night_of_datetime(logical_date)
        nights, source = [night, night], "logical-date"
    else:
        nights, source = None, "all"
    return {"context": context, "nights": nights, "force": bool(params.get("force")), "source": source}


def _selection_header(frame: Mapping[str, Any], ledger: FrameLedger, cfg: Settings) -> dict[str, Any]:
    """Header CRDS matches this frame on: its current rate product's (which carries READPATT
    and everything of the raw header), else the raw header with READPATT derived."""
    from astropy.io import fits

    from .. import metadata

    for prod in ledger.products(frame["frame_id"], current_only=True):
        if prod["kind"] == "rate" and prod["path"] and Path(prod["path"]).is_file():
            return dict(fits.getheader(prod["path"], 0))
    raw = _local_raw(frame, ledger, cfg)
    header = dict(fits.getheader(raw, 0))
    header.setdefault("READPATT", metadata.readpatt(header["SAMPMODE"], header["NUMREADS"]))
    return header


def _local_raw(frame: Mapping[str, Any], ledger: FrameLedger, cfg: Settings) -> str:
    """The raw file on local disk (downloaded from the store if the work area lost it)."""
    if frame.get("raw_path") and Path(frame["raw_path"]).is_file():
        return str(frame["raw_path"])
    for prod in ledger.products(frame["frame_id"]):
        if prod["kind"] == "raw" and prod["key"]:
            from ..storage import open_store

            dest = ensure_dir(cfg.work_dir / frame["frame_id"]) / frame["filename"]
            open_store(cfg.store_url).get_file(prod["key"], dest)
            ledger.update_frame(frame["frame_id"], raw_path=str(dest))
            return str(dest)
    raise FileNotFoundError(f"frame {frame['frame_id']}: raw file {frame.get('raw_path')} is gone "
                            "and no stored copy is recorded")


def select_frames(context: str, nights: Sequence[str] | None = None, *, force: bool = False,
                  ledger: FrameLedger | None = None, cfg: Settings | None = None) -> list[Frame]:
    """Frames whose best references change from their own context to ``context``.

    Each returned frame is ready for :func:`reprocess_frame` and carries ``changes``:
    ``{reftype: [old reference, new reference]}``.
    """
    from .. import calib

    cfg = cfg or settings()
    ledger = ledger or open_ledger(cfg.ledger_path)
    calib.cache_dir()  # configures crds once per process
    ctx = calib.resolve_context(context)
    span = (nights[0], nights[1]) if nights else None
    reftypes = sorted(calib.REFTYPES)
    selected = []
    for frame in ledger.frames(nights=span, status=DONE, kind=REPROCESS_KINDS):
        old = frame["crds_context"]
        if old == ctx and not force:
            continue
        try:
            header = _selection_header(frame, ledger, cfg)
            changes = calib.references_changed(header, old, ctx, reftypes) if old else {}
        except Exception as exc:
            log.warning("frame %s: cannot compare references (%s); skipped", frame["frame_id"], exc)
            continue
        if not changes and not force:
            log.info("frame %s (%s): no reference changes from %s to %s", frame["frame_id"],
                     frame["filename"], old, ctx)
            continue
        selected.append(Frame.from_ledger_row(
            frame, work_root=cfg.work_dir, raw_path=_local_raw(frame, ledger, cfg),
            crds_context=None, previous_context=old, target_context=ctx,
            changes={k: list(v) for k, v in changes.items()}))
        log.info("frame %s (%s): reprocess under %s: %s", frame["frame_id"], frame["filename"], ctx,
                 changes)
    return selected


def variant_of(context: str) -> str:
    return context[:-len(".pmap")] if context.endswith(".pmap") else context


def reprocess_products(frame: Frame, *, ledger: FrameLedger | None = None,
                       cfg: Settings | None = None) -> Frame:
    """readout -> reduce -> quicklook of one selected frame under its target context (the
    ``rp.process`` task); the products are new versions beside the old ones."""
    from .realtime import quicklook_frame, readout_frame, reduce_frame

    cfg = cfg or settings()
    ledger = ledger or open_ledger(cfg.ledger_path)
    ctx = frame.target_context
    variant = variant_of(ctx)
    frame = frame.with_(raw_path=_local_raw(frame.to_dict(), ledger, cfg))
    kept: dict[str, Any] = {}
    f = readout_frame(frame, context=ctx, variant=variant, ledger=ledger, cfg=cfg, keep=kept)
    f = reduce_frame(f, variant=variant, ledger=ledger, cfg=cfg, rate_model=kept.pop("rate_model"))
    return quicklook_frame(f, variant=variant, ledger=ledger, cfg=cfg)


def reprocess_frame(frame: Frame, *, ingest: bool = True, ledger: FrameLedger | None = None,
                    cfg: Settings | None = None, store: Any = None) -> dict[str, Any]:
    """readout -> reduce -> quicklook (-> ingest) of one selected frame under its target
    context; returns the frame's report."""
    from .realtime import ingest_frame

    cfg = cfg or settings()
    ledger = ledger or open_ledger(cfg.ledger_path)
    f = reprocess_products(frame, ledger=ledger, cfg=cfg)
    if ingest:
        return ingest_frame(f, variant=variant_of(frame.target_context), ledger=ledger, cfg=cfg,
                            store=store)
    ledger.update_frame(f.frame_id, crds_context=frame.target_context)
    return {**f.to_dict(), "status": DONE}


def summarize(results: Sequence[Mapping[str, Any] | None], request: Mapping[str, Any]) -> dict[str, Any]:
    done = [r for r in results if r]
    summary = {"context": request.get("context"), "nights": request.get("nights"),
               "source": request.get("source"), "reprocessed": len(done),
               "frames": [r["frame_id"] for r in done]}
    log.info("reprocessing summary: %s", summary)
    return summary


__all__ = ["DONE", "REPROCESS_KINDS", "reprocess_frame", "resolve_request", "select_frames",
           "summarize", "variant_of"]
