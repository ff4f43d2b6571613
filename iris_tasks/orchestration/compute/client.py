"""The task's side of the compute server: run an operation there, or here.

:func:`run` connects to the socket, sends the request and relays what comes back while the
worker computes (log records, lineage records, events), then returns the result or raises
the worker's error; with no server listening, or a refusal, it computes in this process.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import context
from . import protocol
from .protocol import (
    MAX_SOCKET_PATH,
    OPERATIONS,
    PROTOCOL,
    ComputeError,
    ComputeServerLost,
    Refused,
    socket_path,
)

log = logging.getLogger(__name__)

def _resolve(op: str) -> Callable[..., Any]:
    module, _, attr = OPERATIONS[op].partition(":")
    return getattr(importlib.import_module(module), attr)


def _task_identity() -> dict[str, Any]:
    from ..common import task_identity

    return task_identity()


def _replay_log(message: Mapping[str, Any]) -> None:
    logger = logging.getLogger(str(message.get("name") or "iris_tasks"))
    level = int(message.get("level") or logging.INFO)
    if logger.isEnabledFor(level):
        record = logger.makeRecord(logger.name, level, "(compute server)", 0,
                                   "%s", (message.get("msg", ""),), None)
        logger.handle(record)


def _replay_lineage(message: Mapping[str, Any]) -> None:
    from ... import lineage

    lineage.record(message.get("inputs") or [], message.get("outputs") or [], job=message.get("job"))


def run(op: str, *args: Any, label: str | None = None, timeout: float | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None, **kwargs: Any) -> Any:
    """Run operation ``op`` on the compute server if one listens, else in this process.

    The result is the operation's own (JSON round trip). ``label`` names the work in logs
    (a file name). ``on_event(event, data)`` receives what the operation :func:`notify`-s, in
    this thread, while it runs; an exception there is logged, never raised into the work. A
    remote exception is raised as :class:`ComputeError`; a worker that dies before it answers
    as :class:`ComputeServerLost`.
    """
    if op not in OPERATIONS:
        raise ValueError(f"unknown compute operation {op!r} (known: {', '.join(OPERATIONS)})")
    what = f"{op}({label})" if label else op
    events = _guarded(on_event, what)
    path = socket_path()
    sock = _connect(path) if path is not None else None
    if sock is None:
        return _run_here(op, args, kwargs, events)
    try:
        return _call(sock, op, args, kwargs, what=what, path=path, timeout=timeout, events=events)
    except Refused as exc:
        log.warning("compute server %s refused %s (%s); computing in this process", path, what, exc)
        return _run_here(op, args, kwargs, events)
    finally:
        sock.close()


def run_local(op: str, *args: Any, on_event: Callable[[str, dict[str, Any]], None] | None = None,
              **kwargs: Any) -> Any:
    """Run operation ``op`` in this process, never on the server (after a lost worker)."""
    if op not in OPERATIONS:
        raise ValueError(f"unknown compute operation {op!r} (known: {', '.join(OPERATIONS)})")
    return _run_here(op, args, kwargs, _guarded(on_event, op))


def _guarded(callback: Callable[[str, dict[str, Any]], None] | None,
             what: str) -> Callable[[str, dict[str, Any]], None] | None:
    if callback is None:
        return None

    def deliver(event: str, data: dict[str, Any]) -> None:
        try:
            callback(event, data)
        except Exception:  # noqa: BLE001 - a listener must not break the work it listens to
            log.exception("handling event %r of %s failed", event, what)

    return deliver


def _run_here(op: str, args: tuple, kwargs: dict,
              events: Callable[[str, dict[str, Any]], None] | None) -> Any:
    with context.listening(events):
        return _resolve(op)(*args, **kwargs)


def probe(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Is a compute server answering, and would it serve this process? (``--ping``)

    Never computes anything here: ``status`` is ``up`` (with the answering worker's PID and
    code), ``absent`` (no server listens), ``refused`` (it would not serve this process's code
    or configuration; ``reason`` says which) or ``off``.
    """
    where = Path(path) if path is not None else socket_path()
    if where is None:
        return {"socket": None, "status": "off"}
    out: dict[str, Any] = {"socket": str(where)}
    sock = _connect(where)
    if sock is None:
        return {**out, "status": "absent"}
    try:
        answer = _call(sock, "ping", (), {}, what="ping", path=where, timeout=30.0, events=None)
        return {**out, "status": "up", "worker_pid": answer["pid"], "code": answer["code"]}
    except Refused as exc:
        return {**out, "status": "refused", "reason": str(exc)}
    except ComputeError as exc:
        return {**out, "status": "error", "reason": str(exc)}
    finally:
        sock.close()


def _connect(path: Path) -> socket.socket | None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        log.warning("compute socket path %s is longer than %d bytes; computing in this process",
                    path, MAX_SOCKET_PATH)
        return None
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5.0)
        sock.connect(os.fspath(path))
    except OSError as exc:  # a socket file left by a server that is gone
        sock.close()
        log.info("no compute server at %s (%s); computing in this process", path, exc)
        return None
    return sock


def _call(sock: socket.socket, op: str, args: tuple, kwargs: dict, *, what: str, path: Path,
          timeout: float | None, events: Callable[[str, dict[str, Any]], None] | None) -> Any:
    sock.settimeout(timeout)
    root_level = logging.getLogger().getEffectiveLevel()
    t0 = time.perf_counter()
    protocol.send(sock, {"protocol": PROTOCOL, "op": op, "args": list(args), "kwargs": kwargs,
                 "code": protocol.code_fingerprint(), "config": protocol.current_config(),
                 "identity": _task_identity(), "log_level": max(root_level, logging.DEBUG)})
    while True:
        try:
            message = protocol.recv(sock)
        except (EOFError, ConnectionError) as exc:
            raise ComputeServerLost(
                f"the compute server at {path} lost {what} after {time.perf_counter() - t0:.1f} s "
                f"(its worker died: {exc}); see the compute server log") from None
        kind = message.get("type")
        if kind == "log":
            _replay_log(message)
        elif kind == "lineage":
            _replay_lineage(message)
        elif kind == "event":
            if events is not None:
                events(str(message.get("event")), dict(message.get("data") or {}))
        elif kind == "refused":
            raise Refused(message.get("reason"))
        elif kind == "result":
            log.info("%s computed by compute-server worker %s in %.2f s", what, message.get("pid"),
                     message.get("seconds") or 0.0)
            return message.get("value")
        elif kind == "error":
            remote = message.get("exc_type", "Exception")
            log.error("%s failed in compute-server worker %s:\n%s", what, message.get("pid"),
                      message.get("traceback", ""))
            raise ComputeError(f"{remote.rsplit('.', 1)[-1]}: {message.get('message')}",
                               remote_type=remote, remote_traceback=message.get("traceback", ""))
        else:
            raise ComputeError(f"compute server at {path} sent an unknown message {kind!r}")
