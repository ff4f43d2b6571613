"""The real-time chain without a scheduler: ``iris-drs process-frame`` and tests.

The same stage functions as the DAG's tasks (:mod:`.realtime`), one after the other in this
process, with the same ledger records.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import Settings, settings
from .alerts import check_frame
from .frame import Frame
from .ledger import DONE, FAILED, QUARANTINED, FrameLedger, isotime, open_ledger
from .realtime import (
    archive_frame,
    classify_frame,
    ingest_frame,
    process_frame,
    supersede_earlier,
)

log = logging.getLogger(__name__)


def run_chain(frame: Frame, *, ingest: bool = True, context: str | None = None,
              ledger: FrameLedger | None = None, cfg: Settings | None = None) -> dict[str, Any] | None:
    """classify, archive, readout -> reduce -> quicklook -> ingest for one claimed frame;
    returns the frame's report (None: quarantined)."""
    cfg = cfg or settings()
    ledger = ledger or open_ledger(cfg.ledger_path)
    classified = classify_frame(frame, ledger=ledger, cfg=cfg)
    if classified is None:
        return None
    archived = archive_frame(classified, ledger=ledger, cfg=cfg) if ingest else None
    f = process_frame(classified, context=context, ledger=ledger, cfg=cfg)
    if f is None:
        return None
    if ingest:
        return ingest_frame(f, archived=archived, ledger=ledger, cfg=cfg)
    done = ledger.finish(f.frame_id, status=DONE)
    supersede_earlier(f.frame_id, ledger)
    check_frame(done, ledger=ledger)
    return {**f.to_dict(), "status": DONE, "latency_seconds": done["latency_seconds"],
            "deadline_missed": bool(done["deadline_missed"])}


def process_paths(paths: list[str], *, ingest: bool = True, context: str | None = None,
                  cfg: Settings | None = None) -> list[dict[str, Any]]:
    """``iris-drs process-frame``: claim local raw files and run the whole chain on each.

    Returns one result per file: the finished frame, ``{"status": "quarantined", ...}``,
    ``{"status": "failed", "error": ...}`` (the other files still go on) or
    ``{"status": "duplicate", ...}`` for content already claimed."""
    from .landing import claim_paths

    cfg = cfg or settings()
    ledger = open_ledger(cfg.ledger_path)
    claimed = claim_paths(paths, ledger=ledger, cfg=cfg, dag_id="iris-drs-cli")
    claimed_names = {f.filename: f for f in claimed}
    results = []
    for p in paths:
        name = Path(p).name
        frame = claimed_names.get(name)
        if frame is None:
            from ..storage import sha256_file

            existing = ledger.frame_by_sha(sha256_file(p))
            results.append({"filename": name, "status": "duplicate",
                            "frame_id": existing["frame_id"] if existing else None})
            continue
        try:
            out = run_chain(frame, ingest=ingest, context=context, ledger=ledger, cfg=cfg)
        except Exception as exc:  # noqa: BLE001 - one frame's failure must not stop the rest
            log.error("%s failed: %s: %s", name, type(exc).__name__, exc)
            row = ledger.frame(frame.frame_id) or {}
            if row.get("status") not in (FAILED, QUARANTINED):
                ledger.update_frame(frame.frame_id, status=FAILED, finished_at=isotime(),
                                    error=f"{type(exc).__name__}: {exc}"[:2000])
            results.append({**frame.to_dict(), "status": FAILED,
                            "error": f"{type(exc).__name__}: {exc}"})
            continue
        results.append(out if out is not None else {**frame.to_dict(), "status": QUARANTINED})
    return results
