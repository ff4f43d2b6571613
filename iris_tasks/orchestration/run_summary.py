"""The end of a failed real-time run: its report, and the frames its tasks left open."""

from __future__ import annotations

import logging
from typing import Any

from .ledger import DONE, FAILED, QUARANTINED, FrameLedger, open_ledger

log = logging.getLogger(__name__)


def summarize_run(run_id: str, *, ledger: FrameLedger | None = None) -> dict[str, Any]:
    """Report of a real-time run whose tasks have all ended.

    Any frame of the run still open now will never be closed by a task (its task was
    upstream-failed, killed or timed out): it is closed here as failed with that reason, so
    every frame reaches a terminal state. Also alerts frames unfinished past their deadline.
    """
    from .alerts import check_overdue

    ledger = ledger or open_ledger()
    overdue = check_overdue(run_id=run_id, ledger=ledger)
    for f in ledger.close_open_frames(
            run_id=run_id, reason="its tasks ended without closing it (a task failed, was "
                                  "upstream-failed, killed or timed out; see the run)"):
        log.error("frame %s (%s) was left %s by its tasks: closed as failed",
                  f["frame_id"], f["filename"], f["status"])
    frames = ledger.frames(run_id=run_id)
    failed = [f for f in frames if f["status"] == FAILED]
    summary = {
        "run_id": run_id, "frames": len(frames),
        "done": sum(1 for f in frames if f["status"] == DONE),
        "quarantined": sum(1 for f in frames if f["status"] == QUARANTINED),
        "failed": len(failed),
        "failed_frames": [{"frame_id": f["frame_id"], "filename": f["filename"],
                           "error": f["error"]} for f in failed],
        "deadline_missed": sorted({f["frame_id"] for f in frames if f["deadline_missed"]}
                                  | {a["frame_id"] for a in overdue}),
        "max_latency_seconds": max((f["latency_seconds"] or 0.0 for f in frames), default=None),
    }
    log.info("real-time run summary: %s", summary)
    return summary


def close_failed_run(run_id: str, *, ledger: FrameLedger | None = None) -> dict[str, Any]:
    """The real-time DAG's failure callback: :func:`summarize_run` for a failed run, with its
    failed frames logged by name and error. Returns the summary."""
    summary = summarize_run(run_id, ledger=ledger)
    for f in summary["failed_frames"]:
        log.error("run %s: frame %s (%s) failed: %s", run_id, f["frame_id"], f["filename"],
                  f["error"])
    return summary
