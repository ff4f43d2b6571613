"""The health banner of the night page: each part of the stack checked with a short time limit,
so that the page answers in seconds whatever hangs, and says red what does not answer.

* :func:`bounded` runs the checks (and the page's other reads) in a small pool of threads and
  waits at most a few seconds; a check that has not answered is reported ``unknown`` and is not
  started again until it returns (a hung database costs one thread, not one per page view).
* :func:`compute_server`, :func:`object_store`: one connection each with a 2 s timeout.
* :func:`frame_flow`: the age of the last processed frame, red when frames wait behind it
  longer than ``IRIS_OPS_STALE_SECONDS`` (default 120 s: twice the IFS requirement).
* Airflow's scheduler, triggerer, DAG processor, metadata DB and the workers come from
  :mod:`iris_ops.airflow_db`; the ledger's line from how its read went.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .airflow_db import age_text
from .views import ComponentHealth, HealthView, LandingView, NightView

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 2.0  # seconds for one connection of a check
ENV_STALE = "IRIS_OPS_STALE_SECONDS"
DEFAULT_STALE_SECONDS = 120.0

_POOL = cf.ThreadPoolExecutor(max_workers=12, thread_name_prefix="iris-ops")
_RUNNING: dict[str, tuple[cf.Future, float]] = {}
_LOCK = threading.Lock()


class NoAnswer(TimeoutError):
    """A bounded call did not answer in time (the message says what and since when)."""


def bounded(calls: Mapping[str, Callable[[], Any]], timeout: float) -> dict[str, Any]:
    """Run ``calls`` in parallel; wait at most ``timeout`` s in all. Returns name -> result,
    or the exception it raised, or :class:`NoAnswer`. A call whose previous run (same name)
    has not returned yet is not started again: its result is that run's, if it is done by
    now, else :class:`NoAnswer`."""
    futures: dict[str, cf.Future] = {}
    started: dict[str, float] = {}
    with _LOCK:
        for name in [n for n, (f, _) in _RUNNING.items() if f.done()]:
            del _RUNNING[name]  # only calls still running are remembered
        for name, fn in calls.items():
            previous = _RUNNING.get(name)
            if previous is not None and not previous[0].done():
                futures[name], started[name] = previous
                continue
            fut = _POOL.submit(fn)
            _RUNNING[name] = (fut, time.monotonic())
            futures[name], started[name] = fut, time.monotonic()
    cf.wait(futures.values(), timeout=timeout)
    out: dict[str, Any] = {}
    for name, fut in futures.items():
        if fut.done():
            exc = fut.exception()
            out[name] = exc if exc is not None else fut.result()
        else:
            out[name] = NoAnswer(f"no answer for {time.monotonic() - started[name]:.0f} s")
    return out


def stale_after() -> float:
    """``IRIS_OPS_STALE_SECONDS`` (default 120): how long frames may wait before the banner
    turns red."""
    raw = os.environ.get(ENV_STALE, "").strip()
    try:
        return float(raw) if raw else DEFAULT_STALE_SECONDS
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %g", ENV_STALE, raw, DEFAULT_STALE_SECONDS)
        return DEFAULT_STALE_SECONDS


def compute_server(path: Path | None) -> list[ComponentHealth]:
    """Whether the compute server listens on its socket (``None``: switched off, the tasks
    compute in their own processes)."""
    if path is None:
        return [ComponentHealth("compute", "off", "off", "IRIS_COMPUTE_SOCKET=off: tasks compute themselves")]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CHECK_TIMEOUT)
        try:
            sock.connect(os.fspath(path))
        except OSError as exc:
            # The tasks fall back to computing themselves: slower (imports per task), not stopped.
            return [ComponentHealth("compute", "warn", "not listening",
                                    f"{path}: {exc.strerror or exc}; tasks compute in their own "
                                    "processes (slower)")]
    return [ComponentHealth("compute", "ok", "listening", str(path))]


def object_store(store: Any) -> list[ComponentHealth]:
    """Whether the object store answers: an S3 endpoint answers an HTTP request (any status)
    within the timeout; a local store's directory exists."""
    client = getattr(store, "client", None)
    endpoint = getattr(getattr(client, "meta", None), "endpoint_url", None)
    if endpoint:
        try:
            with urllib.request.urlopen(endpoint, timeout=CHECK_TIMEOUT):
                pass
        except urllib.error.HTTPError:
            pass  # an S3 server answers an anonymous GET with 403: it is there
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return [ComponentHealth("object store", "bad", "no answer", f"{endpoint}: {reason}")]
        return [ComponentHealth("object store", "ok", "answers", str(endpoint))]
    root = getattr(store, "root", None)
    if root is not None:
        ok = Path(root).is_dir()
        return [ComponentHealth("object store", "ok" if ok else "bad", "local" if ok else "missing", str(root))]
    return [ComponentHealth("object store", "unknown", "not checked", repr(store))]


def ledger_line(view: NightView, seconds: float | None) -> ComponentHealth:
    """The ledger's banner line: the page's own read of it."""
    if view.problem:
        return ComponentHealth("ledger", "bad", "unreadable", view.problem)
    took = "" if seconds is None else f"read in {seconds:.2f} s; "
    return ComponentHealth("ledger", "ok", "readable", f"{took}{view.source}")


def frame_flow(view: NightView, landing: LandingView | None, now: dt.datetime,
               limit: float | None = None) -> ComponentHealth:
    """The age of the last processed frame; red when frames (open in the ledger, or whole in
    the landing area and not claimed) have waited longer than ``limit`` seconds."""
    limit = stale_after() if limit is None else limit

    def age(text: str | None) -> float | None:
        if not text:
            return None
        when = dt.datetime.fromisoformat(text)
        when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
        return max(0.0, (now - when).total_seconds())

    last = age(view.last_done_at)
    last_text = "no frame processed yet" if last is None else f"last frame processed {age_text(last)} ago"
    waits = [a for a in (age(view.open_since),
                         *(age(w.since) for w in (landing.waiting if landing else []) if w.state == "ready"))
             if a is not None]
    if not waits:
        return ComponentHealth("frames", "ok", last_text, "nothing waiting")
    oldest = max(waits)
    text = f"a frame has waited {age_text(oldest)}"
    if oldest > limit:
        return ComponentHealth("frames", "bad", f"{last_text}; {text}",
                               f"stale: frames wait longer than {limit:.0f} s ({ENV_STALE})")
    return ComponentHealth("frames", "ok", last_text, f"processing; {text}")


def assemble(parts: list[list[ComponentHealth] | BaseException], names: list[str],
             now: dt.datetime) -> HealthView:
    """The banner from the checks' results (a failed or silent check is a red line)."""
    components: list[ComponentHealth] = []
    for name, part in zip(names, parts, strict=True):
        if isinstance(part, NoAnswer):
            components.append(ComponentHealth(name, "unknown", "no answer", f"{part} (limit {CHECK_TIMEOUT:g} s)"))
        elif isinstance(part, BaseException):
            components.append(ComponentHealth(name, "unknown", "check failed", f"{type(part).__name__}: {part}"))
        else:
            components.extend(part)
    return HealthView(components=components, checked_at=now.isoformat(timespec="seconds"))


def default_checks() -> dict[str, Callable[[], list[ComponentHealth]]]:
    """The checks of a deployment, from the IRIS_* and Airflow environment of the api-server."""
    from iris_tasks.config import settings
    from iris_tasks.orchestration.compute.protocol import socket_path

    from . import airflow_db

    stores: dict[str, Any] = {}

    def store() -> list[ComponentHealth]:
        from iris_tasks.storage import open_store

        # One client per store URL for the process: making an S3 client costs ~0.15 core-s,
        # the page asks every few seconds.
        url = settings().store_url
        if url not in stores:
            stores[url] = open_store(url)
        return object_store(stores[url])

    return {
        "airflow": airflow_db.airflow_health,
        "workers": airflow_db.task_queue,
        "compute": lambda: compute_server(socket_path()),
        "object store": store,
    }
