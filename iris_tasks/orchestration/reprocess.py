"""Reprocessing after a CRDS context change: find exactly the frames whose references change.

A frame qualifies when it was processed (ledger status ``done``), its recipe has a stage 2
(kinds science, sky, telluric: darks and flats only feed the masters) and
:func:`iris_tasks.calib.references_changed` reports at least one reference type its kind
uses (sky frames and standards do not use ``telluric`` or ``photom``) whose best reference differs between the context the frame was processed with (``frames.crds_context``)
and the new one. Those frames go through readout -> reduce -> quicklook -> ingest again under
the new context; the new products get new object keys with the context in the name, and the
ledger keeps every version (``products.version`` / ``current``).

Which frames and which context (:func:`resolve_request`):

* ``context``: the run's ``context`` param, else the triggering ``iris/crds-context`` asset
  event's ``context``, else the operational context;
* nights: the run's partition key (the night: ``iris_reprocess`` runs for the partition of the
  ``iris/crds-context`` event that triggered it, ``iris_reprocess_nights`` for the night of its
  cron tick or backfill), else the ``night_from``/``night_to`` params of a manual run, else
  the night of a triggering event, else all nights.

Which nights are stale (:func:`night_states`, :func:`stale_nights`): nights with processed
frames reduced under another context than the target (the operational one) whose best
references differ under the target - the frames reprocessing that night would re-reduce.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import Settings, settings
from ..errors import ConfigurationError
from .common import ensure_dir
from .frame import Frame
from .ledger import DONE, FrameLedger, open_ledger
from .nights import check_night

log = logging.getLogger(__name__)

REPROCESS_KINDS = ("science", "sky", "telluric")
# Reference types a frame kind's reduction does not use: a change in them re-reduces nothing.
# The telluric and photom steps calibrate science frames only (sky frames skip them, a
# standard is not calibrated by itself), so a night's new telluric references or imager zero
# points reprocess its science frames (IFS frames never match a photom reference: DETECTOR).
UNUSED_REFTYPES = {"sky": frozenset({"telluric", "photom"}),
                   "telluric": frozenset({"telluric", "photom"})}


def _optional_reftypes() -> frozenset[str]:
    """Reference types a step loads only when an option asks for it (the readout's ``ipc``,
    off by default): the real-time chain runs the steps' defaults, so a new reference of
    such a type changes no product and reprocesses nothing."""
    from ..steps.readout_step import ReadoutStep

    return ReadoutStep.optional_reference_types


def resolve_request(params: Mapping[str, Any] | None = None,
                    events: Sequence[Mapping[str, Any]] = (),
                    partition_key: str | None = None) -> dict[str, Any]:
    """``{"context", "nights": [from, to] | None, "force", "source"}`` for one reprocessing run.

    A partitioned run (``partition_key``: a night) works on that night only; a manual run
    without a key on its ``night_from``/``night_to``; giving both is a ConfigurationError.
    """
    from .. import calib

    params = dict(params or {})
    events = [e for e in events if e]
    calib.cache_dir()  # configures crds once per process
    context = params.get("context") or (events[-1].get("context") if events else None)
    calib.follow_store(context)  # IRIS_CRDS_STORE: hosts sharing no disk
    context = calib.resolve_context(context) if context else calib.operational_context()
    lo, hi = params.get("night_from"), params.get("night_to")
    if partition_key:
        if lo or hi:
            raise ConfigurationError(
                f"partition key {partition_key!r} and night_from/night_to {lo!r}/{hi!r}: a run "
                "works on its partition's night; give one or the other")
        night = check_night(partition_key, what="partition key")
        nights, source = [night, night], "partition"
    elif lo or hi:
        nights, source = [check_night(lo or hi, what="night_from"),
                          check_night(hi or lo, what="night_to")], "params"
    elif any(e.get("night") for e in events):
        night = check_night(max(str(e["night"]) for e in events if e.get("night")), what="event night")
        nights, source = [night, night], "asset-event"
    else:
        nights, source = None, "all"
    return {"context": context, "nights": nights, "force": bool(params.get("force")), "source": source}


def _selection_header(frame: Mapping[str, Any], ledger: FrameLedger, cfg: Settings, *,
                      fetch: bool = True) -> dict[str, Any] | None:
    """Header CRDS matches this frame on: its current rate product's (which carries READPATT
    and everything of the raw header), else the raw header with READPATT derived. Without
    ``fetch`` a raw file that is only in the store is not downloaded (None)."""
    from astropy.io import fits

    from .. import metadata

    for prod in ledger.products(frame["frame_id"], current_only=True):
        if prod["kind"] == "rate" and prod["path"] and Path(prod["path"]).is_file():
            return dict(fits.getheader(prod["path"], 0))
    if not fetch and not (frame.get("raw_path") and Path(frame["raw_path"]).is_file()):
        return None
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


def reference_changes(frame: Mapping[str, Any], context: str, ledger: FrameLedger, cfg: Settings, *,
                      fetch: bool = True) -> dict[str, tuple[str, str]] | None:
    """``{reftype: (old reference, new reference)}`` for the references that differ between the
    context the frame was processed with and ``context`` (empty: none; a frame processed
    without a context compares as empty), among the types the frame's kind uses
    (:data:`UNUSED_REFTYPES`). None when the frame's header is not at hand (``fetch=False``
    and the raw file only in the store)."""
    from .. import calib

    old = frame["crds_context"]
    if not old:
        return {}
    header = _selection_header(frame, ledger, cfg, fetch=fetch)
    if header is None:
        return None
    unused = UNUSED_REFTYPES.get(str(frame.get("kind")), frozenset()) | _optional_reftypes()
    return calib.references_changed(header, old, context,
                                    sorted(set(calib.REFTYPES) - unused))


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
    calib.follow_store(context)  # IRIS_CRDS_STORE: hosts sharing no disk
    ctx = calib.resolve_context(context)
    span = (nights[0], nights[1]) if nights else None
    selected = []
    for frame in ledger.frames(nights=span, status=DONE, kind=REPROCESS_KINDS):
        old = frame["crds_context"]
        if old == ctx and not force:
            continue
        try:
            changes = reference_changes(frame, ctx, ledger, cfg) or {}
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


def night_states(context: str | None = None, nights: Sequence[str] | None = None, *,
                 ledger: FrameLedger | None = None, cfg: Settings | None = None) -> list[dict[str, Any]]:
    """Per night with processed science, sky or telluric frames, newest night first: is it
    current under ``context`` (default: the operational one)?

    Each entry: ``night``, ``context`` (the target), ``frames`` (processed frames of the
    reprocessed kinds), ``current`` (already under the target), ``contexts`` (``{context:
    frames}`` of the others), ``unchanged`` (under another context, but the target selects the
    same references: reprocessing would not touch them), ``stale_frames`` (their references
    change: ``iris_reprocess`` would re-reduce them), ``unknown`` (header not at hand locally:
    raw file only in the store; counted as stale), ``errors`` (CRDS cannot compare them: a
    warning in the log; reprocessing skips them too) and ``stale`` (``stale_frames + unknown
    > 0``). Reads the ledger and the local CRDS cache only (a read-only ledger is fine); costs
    one CRDS best-references comparison per frame not under the target.
    """
    from .. import calib

    cfg = cfg or settings()
    ledger = ledger or open_ledger(cfg.ledger_path)
    calib.cache_dir()  # configures crds once per process
    calib.follow_store(context)  # IRIS_CRDS_STORE: hosts sharing no disk
    ctx = calib.resolve_context(context) if context else calib.operational_context()
    span = (nights[0], nights[1]) if nights else None
    states: dict[str, dict[str, Any]] = {}
    for frame in ledger.frames(nights=span, status=DONE, kind=REPROCESS_KINDS):
        night = frame["night"]
        state = states.setdefault(night, {"night": night, "context": ctx, "frames": 0, "current": 0,
                                          "contexts": {}, "unchanged": 0, "stale_frames": 0,
                                          "unknown": 0, "errors": 0})
        state["frames"] += 1
        old = frame["crds_context"]
        if old == ctx:
            state["current"] += 1
            continue
        state["contexts"][old] = state["contexts"].get(old, 0) + 1
        try:
            changes = reference_changes(frame, ctx, ledger, cfg, fetch=False)
        except Exception as exc:  # select_frames skips such a frame too (with this warning)
            log.warning("frame %s: cannot compare references (%s)", frame["frame_id"], exc)
            state["errors"] += 1
            continue
        state["unknown" if changes is None else "stale_frames" if changes else "unchanged"] += 1
    out = sorted(states.values(), key=lambda s: s["night"], reverse=True)
    for state in out:
        state["stale"] = state["stale_frames"] + state["unknown"] > 0
    return out


def stale_nights(context: str | None = None, nights: Sequence[str] | None = None, *,
                 ledger: FrameLedger | None = None, cfg: Settings | None = None) -> list[str]:
    """The nights :func:`night_states` finds stale, oldest first (what to backfill)."""
    return sorted(s["night"] for s in night_states(context, nights, ledger=ledger, cfg=cfg) if s["stale"])


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


def summarize(results: Sequence[Mapping[str, Any] | None], request: Mapping[str, Any], *,
              ledger: FrameLedger | None = None, cfg: Settings | None = None) -> dict[str, Any]:
    """What a run re-reduced (``frames``, ``by_night``: night -> frame ids) and which of its
    nights are still stale under its context afterwards (``stale_nights``)."""
    done = [r for r in results if r]
    by_night: dict[str, list[str]] = {}
    for r in done:
        by_night.setdefault(str(r.get("night")), []).append(r["frame_id"])
    nights = request.get("nights")
    stale = stale_nights(request.get("context"), nights, ledger=ledger, cfg=cfg)
    summary = {"context": request.get("context"), "nights": nights,
               "source": request.get("source"), "reprocessed": len(done),
               "frames": [r["frame_id"] for r in done], "by_night": by_night,
               "stale_nights": stale}
    if stale:
        log.warning("nights still stale under %s after this run: %s (see the warnings of select "
                    "and any failed rp task)", request.get("context"), ", ".join(stale))
    log.info("reprocessing summary: %s", summary)
    return summary


__all__ = ["DONE", "REPROCESS_KINDS", "UNUSED_REFTYPES", "night_states", "reference_changes", "reprocess_frame",
           "resolve_request", "select_frames", "stale_nights", "summarize", "variant_of"]
