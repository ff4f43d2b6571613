"""Small helpers shared by the real-time, nightly and reprocessing functions."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .ledger import FAILED, FrameLedger

# Where a product of each kind goes in the object store (iris_tasks.storage key kinds).
# A master the nightly build could not make is a JSON file with this suffix beside the built
# ones, naming its inputs and the reason: its QA fails with it, the approval request shows it.
FAILED_SUFFIX = ".failed.json"

STORE_KIND = {"raw": "raw", "rate": "products", "cal": "products", "s3d": "products",
              "dark": "references", "flat": "references", "quicklook": "quicklook"}


def task_identity() -> dict[str, Any]:
    """dag_id, run_id, try_number, max_tries, task_id, map_index of the Airflow task we run
    in, or a CLI identity (``iris-drs-cli`` / ``cli-<pid>``, no retries) outside Airflow. In a
    compute-server worker: the identity of the task whose request it serves."""
    from .context import task_identity_override

    override = task_identity_override()
    if override:
        return dict(override)
    try:
        if "airflow.sdk" not in sys.modules:  # not in a task; do not import Airflow to find out
            raise LookupError
        from airflow.sdk import get_current_context

        ti = get_current_context()["ti"]
        return {"dag_id": ti.dag_id, "run_id": ti.run_id, "try_number": ti.try_number,
                "max_tries": getattr(ti, "max_tries", 0), "task_id": ti.task_id,
                "map_index": getattr(ti, "map_index", -1)}
    except Exception:
        return {"dag_id": "iris-drs-cli", "run_id": f"cli-{os.getpid()}", "try_number": 1,
                "max_tries": 0, "task_id": None, "map_index": None}


def retry_pending(exc: BaseException, ident: Mapping[str, Any]) -> bool:
    """True when the task of ``ident`` will be tried again after ``exc``: the store steps'
    retry policy retries it (:func:`iris_tasks.errors.is_retried`) and the task has tries
    left (Airflow retries while ``try_number <= max_tries``). False without a known
    ``max_tries`` (an identity from older code, the CLI)."""
    from ..errors import is_retried

    max_tries, try_number = ident.get("max_tries"), ident.get("try_number")
    if max_tries is None or try_number is None:
        return False
    return int(try_number) <= int(max_tries) and is_retried(exc)


def run_info() -> dict[str, Any]:
    """dag_id / run_id / try_number (the ledger's stage columns)."""
    ident = task_identity()
    return {k: ident[k] for k in ("dag_id", "run_id", "try_number")}


def process_cpu_seconds() -> float:
    """User + system CPU of this process so far, all threads (OpenMP, upload threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def frame_stage(ledger: FrameLedger, frame_id: str, stage: str,
                run: Mapping[str, Any] | None = None, *, ident: Mapping[str, Any] | None = None,
                fail_frame: bool = True) -> Iterator[dict[str, Any]]:
    """Time ``stage`` in the ledger; on an exception mark the frame failed (with the error)
    and re-raise, so a failed task is visible in the ledger as well as in Airflow.

    The stage's record also gets ``cpu_seconds``: this process's CPU (all its threads) while
    the stage ran, which is the stage's own cost where nothing else runs in the process (a
    compute-server worker, a store task); what a frame costs per component is summed from it.

    ``ident``: the task identity, when the stage runs in a thread that cannot read it (taken
    with :func:`task_identity` in the task's own thread). ``fail_frame=False`` for a
    best-effort stage: its failure is recorded on the stage only. A deliberate skip
    (:func:`iris_tasks.errors.is_skip`) leaves the frame's status alone, and so does a fault
    the task will retry (:func:`retry_pending`): the frame keeps its status, with the fault
    as its error, until a later try closes it."""
    from ..errors import is_skip

    ident = dict(ident or task_identity())
    run = dict(run or {k: ident[k] for k in ("dag_id", "run_id", "try_number")})
    try:
        # The worker host, recorded at the start: a stage whose host died still names it.
        with ledger.stage(frame_id, stage, detail={"host": socket.gethostname()}, **run) as detail:
            if ident["task_id"]:  # lets the ops UI link the stage to its task instance
                detail.update(task_id=ident["task_id"], map_index=ident["map_index"])
            cpu0 = process_cpu_seconds()
            try:
                yield detail
            finally:
                detail["cpu_seconds"] = round(process_cpu_seconds() - cpu0, 3)
    except Exception as exc:
        if fail_frame and not is_skip(exc):
            error = f"{stage}: {type(exc).__name__}: {exc}"
            if retry_pending(exc, ident):
                # A store fault its task retries: the frame stays open (not failed while a
                # retry may still store it); the fault is on the stage and in the frame's error.
                # The last try's fault fails it here; a run that ends with it open closes it.
                ledger.update_frame(frame_id, error=(
                    f"{error} (try {ident['try_number']} of {int(ident['max_tries']) + 1}; "
                    "retried)")[:2000])
            else:
                ledger.update_frame(frame_id, status=FAILED, error=error)
        raise


def versioned_name(filename: str, context: str | None) -> str:
    """Object name of a reprocessed product: the CRDS context goes before the extension,
    ``root_cal.fits`` -> ``root_cal.tmt_0007.fits`` (``root_ql.png`` -> ``root_ql.tmt_0007.png``)."""
    if not context:
        return filename
    stem = context.rsplit(".", 1)[0] if context.endswith(".pmap") else context
    base, dot, ext = filename.rpartition(".")
    return f"{base}.{stem}.{ext}" if dot else f"{filename}.{stem}"


def ascii_meta(values: Mapping[str, Any]) -> dict[str, str]:
    """Object metadata: lowercase names, ASCII string values, None dropped."""
    out = {}
    for k, v in values.items():
        if v is None:
            continue
        text = str(v).encode("ascii", "replace").decode("ascii")
        out[k.lower().replace("-", "_")] = text
    return out


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p
