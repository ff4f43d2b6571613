"""The end of a real-time run: its report, the frames its tasks left open, and its verdict."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import ProcessingError
from .ledger import FAILED, QUARANTINED, FrameLedger, open_ledger

log = logging.getLogger(__name__)


class FramesFailedError(ProcessingError):
    """Frames of a real-time run failed: the run must end failed so that Airflow's views,
    alerts and REST API tell the truth."""


def summarize_run(results: list[dict[str, Any] | None], *, run_id: str | None = None,
                  ledger: FrameLedger | None = None) -> dict[str, Any]:
    """End-of-run report, once every task of the run has ended.

    Any frame of the run still open now will never be closed by a task (its task was
    upstream-failed, killed or timed out): it is closed here as failed with that reason, so
    every frame reaches a terminal state. Also alerts frames unfinished past their deadline.
    """
    from .alerts import check_overdue

    ledger = ledger or open_ledger()
    done = [r for r in results if r]
    overdue = check_overdue(run_id=run_id, ledger=ledger) if run_id else []
    if run_id:
        for f in ledger.close_open_frames(
                run_id=run_id, reason="its tasks ended without closing it (a task failed, was "
                                      "upstream-failed, killed or timed out; see the run)"):
            log.error("frame %s (%s) was left %s by its tasks: closed as failed",
                      f["frame_id"], f["filename"], f["status"])
    frames = ledger.frames(run_id=run_id) if run_id else []
    failed = [f for f in frames if f["status"] == FAILED]
    summary = {
        "run_id": run_id, "frames": len(frames), "done": len(done),
        "quarantined": sum(1 for f in frames if f["status"] == QUARANTINED),
        "failed": len(failed),
        "failed_frames": [{"frame_id": f["frame_id"], "filename": f["filename"],
                           "error": f["error"]} for f in failed],
        "deadline_missed": sorted({f["frame_id"] for f in frames if f["deadline_missed"]}
                                  | {a["frame_id"] for a in overdue}),
        "max_latency_seconds": max((r.get("latency_seconds") or 0.0 for r in done), default=None),
    }
    log.info("real-time run summary: %s", summary)
    return summary


def raise_if_failed(summary: dict[str, Any]) -> None:
    """Fail the run's summary task (and so the run) when frames failed; names them."""
    if summary["failed"]:
        names = ", ".join(f"{f['filename']} ({f['error']})" for f in summary["failed_frames"][:10])
        raise FramesFailedError(f"{summary['failed']} frame(s) of run {summary['run_id']} failed: "
                                f"{names}")
