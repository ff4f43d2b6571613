"""The ``frame.process`` task: :func:`~.realtime.process_frame` on the compute server (or in
the task), with the frame's rate product stored while its stage 2 still computes."""

from __future__ import annotations

import logging
import threading
from typing import Any

from ..config import Settings, settings
from .common import frame_stage, run_info, task_identity
from .frame import Frame
from .ledger import FAILED, open_ledger
from .realtime import process_frame, store_item

log = logging.getLogger(__name__)


class EarlyUpload:
    """Stores a frame's ``_rate`` product while its stage 2 still computes.

    The rate is final as soon as the readout wrote it, and uploading it (~320 MB at 4096²)
    is most of ``frame.ingest``'s work; done here, beside the reduction, it leaves ingest a
    checksum comparison (identical content is skipped) and its ledger record a no-op. Best
    effort: any failure is logged and ``frame.ingest``, which retries, stores the rate as
    before. Timed in the ledger as stage ``early_upload`` (beside the compute, so neither
    compute nor ingest in the latency breakdown).
    """

    def __init__(self, cfg: Settings | None = None):
        self.cfg = cfg or settings()
        self.ident = task_identity()  # read in the task's own thread; the upload runs in another
        self.thread: threading.Thread | None = None
        self.url: str | None = None

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "rate_written" and self.thread is None:
            self.thread = threading.Thread(target=self._upload, args=(data["frame"],),
                                           name="iris-early-upload", daemon=True)
            self.thread.start()

    def _upload(self, data: dict[str, Any]) -> None:
        from ..storage import open_store

        frame = Frame.from_dict(data)
        try:
            ledger = open_ledger(self.cfg.ledger_path)
            run = {k: self.ident[k] for k in ("dag_id", "run_id", "try_number")}
            with frame_stage(ledger, frame.frame_id, "early_upload", run, ident=self.ident,
                             fail_frame=False) as detail:
                store = open_store(self.cfg.store_url)
                self.url = store_item(store, frame, "rate", frame.rate_path, variant=None,
                                      ledger=ledger, run=run)
                detail["objects"] = {"rate": self.url}
        except Exception as exc:  # noqa: BLE001 - frame.ingest stores it (and retries)
            log.warning("early upload of %s's rate failed (frame.ingest will store it): %s: %s",
                        frame.filename, type(exc).__name__, exc)

    def finish(self, timeout: float = 600.0) -> None:
        """Wait for the upload, so ``frame.ingest`` never races it for the same key."""
        if self.thread is not None:
            self.thread.join(timeout)


def process_frame_op(frame: dict[str, Any], **kwargs: Any) -> dict[str, Any] | None:
    """The compute operation ``process_frame``: :func:`~.realtime.process_frame` on a frame
    as JSON, answering JSON (what crosses the socket)."""
    out = process_frame(Frame.from_dict(frame), **kwargs)
    return out.to_dict() if out is not None else None


def process_frame_task(frame: Frame, *, cfg: Settings | None = None) -> Frame | None:
    """``frame.process``: :func:`~.realtime.process_frame` on the compute server when one
    listens (warm worker, see :mod:`.compute`), else in this process; same result either
    way. The rate product goes to the store as soon as it is written (:class:`EarlyUpload`).

    A compute worker that dies under the frame is a transient loss (the server starts a new
    one): the frame is computed again at once, in this process -- not on the server, so that a
    frame that kills workers by itself cannot take the server's other workers down with it.
    The early upload, if it started, goes on; a second loss fails the frame. Returns None when
    the frame was quarantined.
    """
    from .compute import ComputeServerLost, run, run_local

    early = EarlyUpload(cfg)
    data = frame.to_dict()
    try:
        try:
            out = run("process_frame", data, label=frame.filename, on_event=early.on_event)
        except ComputeServerLost as exc:
            log.warning("%s; computing %s again in this process", exc, frame.filename)
            ledger = open_ledger((cfg or settings()).ledger_path)
            ledger.record_alert("compute_retry", f"compute worker lost; {frame.filename} "
                                f"computed again in the task process: {exc}",
                                frame_id=frame.frame_id, **run_info_ids())
            try:
                out = run_local("process_frame", data, on_event=early.on_event)
            except ComputeServerLost as again:
                ledger.update_frame(frame.frame_id, status=FAILED, error=str(again)[:2000])
                raise
    finally:
        early.finish()
    return Frame.from_dict(out) if out is not None else None


def run_info_ids() -> dict[str, Any]:
    """dag_id / run_id of the current task (for alerts)."""
    info = run_info()
    return {"dag_id": info["dag_id"], "run_id": info["run_id"]}
