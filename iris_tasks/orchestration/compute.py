"""The compute server: long-lived worker processes that run the real-time frame computation.

Why it exists. Every Airflow task is a fresh process. On this kind of VM (virtio-balloon with
free page reporting) memory that a previous process freed goes back to the host within
seconds, and the next process pays ~2 s per GiB to fault it in again: a 4k imager readout took
2.4-2.7 s in a task against 1.2 s in a process that had done one before. A worker that stays
alive keeps its heap (glibc is told never to give it back, see :func:`_keep_heap`), its
imported modules and its mapped reference arrays, so a frame costs only its arithmetic.

How it works. ``iris-drs compute-server --socket PATH`` binds a Unix socket, imports the
science stack once, and forks ``--workers`` processes (default ``IRIS_COMPUTE_SLOTS``) that
accept connections on it, one request at a time each. The ``frame.process`` task calls
:func:`run`, which sends the operation and the frame as JSON and waits. While the worker runs
it, the task receives:

* every log record (re-emitted under the same logger name, so the Airflow task log shows the
  steps as if they had run in the task),
* every lineage record (replayed into the task's OpenLineage collector),
* events the operation announces with :func:`notify` (e.g. "the rate product is written",
  which lets the task store it while stage 2 still runs),
* then the result, or the error with the worker's traceback (raised as :class:`ComputeError`).

The worker takes the task's identity (dag_id, run_id, task_id, map_index, try) for the ledger,
so the night page links each stage to the task that asked for it.

Safety. The socket is mode 0600. Only the operations in :data:`OPERATIONS` can be called. A
request is refused, and the task computes in its own process instead, when the server runs
other code than the task (``refused: stale code``: the server then restarts itself with the
new code), or a different ``IRIS_*``/``CRDS_*`` configuration (refused naming the variables,
never their values). With no server listening, :func:`run` computes in-process: the server is
an accelerator, never a dependency. A worker that dies mid-frame (OOM kill, segfault) fails
the task with :class:`ComputeServerLost`, which says so; the server starts a new worker.

``IRIS_COMPUTE_SOCKET``: the socket path (default ``<state>/run/compute.sock``); ``off``
disables the server for the tasks. The local stack (``make demo``/``make serve``) starts the
server as its ``compute`` component; the Helm chart runs it as a sidecar of each Celery
worker, sharing the socket through an ``emptyDir``.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import ctypes
import ctypes.util
import hashlib
import importlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_COMPUTE_SOCKET = "IRIS_COMPUTE_SOCKET"
PROTOCOL = 1
OFF_VALUES = ("", "0", "off", "false", "no", "none")

# What a task may ask for, by name. Nothing else is importable through the socket.
OPERATIONS: dict[str, str] = {
    "ping": "iris_tasks.orchestration.compute:ping",
    "process_frame": "iris_tasks.orchestration.realtime:process_frame",
}

# Configuration that must be identical in task and server: the settings of iris_tasks and a
# CRDS context pin. The other CRDS_* variables are derived from the cache directory by
# iris_tasks.calib.configure, and the cache actually in use is compared instead. The socket
# path itself and the preload switch are the server's own business.
CONFIG_PREFIXES = ("IRIS_",)
CONFIG_EXTRA = frozenset({"CRDS_CONTEXT"})
CONFIG_IGNORED = frozenset({ENV_COMPUTE_SOCKET, "IRIS_PRELOAD", "IRIS_STACK_ID"})

# A Unix socket path is limited to 108 bytes including the terminating NUL (Linux).
MAX_SOCKET_PATH = 107
_HEADER = struct.Struct("!I")
MAX_MESSAGE = 64 << 20
REQUEST_READ_TIMEOUT = 30.0
EXIT_STALE = 75  # a worker saw a newer code fingerprint: the master re-executes itself

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
_CODE_DIRS = ("iris_tasks", "readout_cy")


class ComputeError(RuntimeError):
    """The operation failed in the compute server; the message names the remote exception."""

    def __init__(self, message: str, *, remote_type: str = "", remote_traceback: str = ""):
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


class ComputeServerLost(ComputeError):
    """The worker went away (killed, crashed) before it answered."""


class _Refused(Exception):
    """The server will not run this request here; the caller computes in-process."""


# -- where and what --------------------------------------------------------------------------
def socket_path() -> Path | None:
    """The socket the tasks use: ``$IRIS_COMPUTE_SOCKET``, else ``<state>/run/compute.sock``;
    None when switched off."""
    value = os.environ.get(ENV_COMPUTE_SOCKET)
    if value is not None:
        return None if value.strip().lower() in OFF_VALUES else Path(value).expanduser()
    from .config import settings

    return settings().state_dir / "run" / "compute.sock"


def code_fingerprint(root: Path = _PACKAGE_ROOT) -> str:
    """Digest of the names, sizes and mtimes of the package's Python files and extension
    modules: it changes when the code is redeployed or rebuilt (~2 ms to compute)."""
    digest = hashlib.sha256()
    for sub in _CODE_DIRS:
        base = root / sub
        entries = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                if name.endswith((".py", ".so")):
                    path = os.path.join(dirpath, name)
                    with contextlib.suppress(OSError):
                        st = os.stat(path)
                        entries.append(f"{os.path.relpath(path, root)}:{st.st_size}:{st.st_mtime_ns}")
        digest.update("\n".join(sorted(entries)).encode())
    return digest.hexdigest()[:16]


def config_fingerprint(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """{variable: short digest of its value} of the configuration that must match; digests
    rather than values, because a ledger URL may carry a password."""
    env = os.environ if env is None else env
    return {k: hashlib.sha256(v.encode()).hexdigest()[:12] for k, v in sorted(env.items())
            if (k.startswith(CONFIG_PREFIXES) or k in CONFIG_EXTRA) and k not in CONFIG_IGNORED}


def current_config() -> dict[str, str]:
    """This process's configuration fingerprint, including the CRDS cache it actually uses
    (a process may have been pointed at a cache in code, not by its environment). Configures
    CRDS first, as every frame computation does, so both sides compare the same variables."""
    from .. import calib

    cache = str(calib.cache_dir())
    return {**config_fingerprint(), "(CRDS cache in use)": hashlib.sha256(cache.encode()).hexdigest()[:12]}


def config_difference(mine: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """Names of the variables set differently (or only on one side)."""
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


def ping(delay: float = 0.0) -> dict[str, Any]:
    """Health check: who answers. ``delay`` keeps the worker busy (tests, diagnosis)."""
    if delay:
        time.sleep(float(delay))
    return {"pid": os.getpid(), "code": code_fingerprint(), "identity": _IDENTITY.get()}


# -- framing ---------------------------------------------------------------------------------
def _send(sock: socket.socket, message: Mapping[str, Any]) -> None:
    body = json.dumps(message, default=str).encode()
    sock.sendall(_HEADER.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class _Probe(EOFError):
    """The peer connected and closed without a word: a readiness check."""


def _recv(sock: socket.socket) -> dict[str, Any]:
    first = sock.recv(_HEADER.size)
    if not first:
        raise _Probe("connection closed before a message")
    head = first + (_recv_exact(sock, _HEADER.size - len(first)) if len(first) < _HEADER.size else b"")
    (size,) = _HEADER.unpack(head)
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is larger than the {MAX_MESSAGE} allowed")
    return json.loads(_recv_exact(sock, size))


# -- request context in the worker -----------------------------------------------------------
# The identity of the task a request comes from, and where its lineage goes: read by
# orchestration.common.task_identity and lineage.record while the worker runs the request.
_IDENTITY: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "iris_compute_identity", default=None)
_LINEAGE_SINK: contextvars.ContextVar[Callable[[list[str], list[str], str | None], None] | None] = (
    contextvars.ContextVar("iris_compute_lineage", default=None))


_EVENT_SINK: contextvars.ContextVar[Callable[[str, dict[str, Any]], None] | None] = (
    contextvars.ContextVar("iris_compute_events", default=None))


def notify(event: str, **data: Any) -> None:
    """Announce ``event`` to whoever asked for the running operation (``run(on_event=)``),
    in a compute worker or in-process alike; a no-op when nobody listens."""
    sink = _EVENT_SINK.get()
    if sink is not None:
        sink(event, data)


def identity_override() -> dict[str, Any] | None:
    """The requesting task's identity while a compute worker serves it, else None."""
    return _IDENTITY.get()


def lineage_sink() -> Callable[[list[str], list[str], str | None], None] | None:
    """Where lineage records go while a compute worker serves a request, else None."""
    return _LINEAGE_SINK.get()


class _ForwardLogs(logging.Handler):
    """Sends each record of the request to the waiting task."""

    def __init__(self, sock: socket.socket, level: int):
        super().__init__(level)
        self.sock = sock
        self.broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.broken or record.name.startswith(__name__):
            return
        try:
            msg = record.getMessage()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                msg = f"{msg}\n{record.exc_text}"
            with self.lock:
                _send(self.sock, {"type": "log", "name": record.name, "level": record.levelno,
                                  "msg": msg, "created": record.created})
        except OSError:
            self.broken = True  # the task went away; the worker finishes and moves on


def _resolve(op: str) -> Callable[..., Any]:
    module, _, attr = OPERATIONS[op].partition(":")
    return getattr(importlib.import_module(module), attr)


def _serve_connection(conn: socket.socket, code: str, config: Mapping[str, str]) -> bool:
    """Answer one request; returns False when this worker's code is stale (exit after)."""
    conn.settimeout(REQUEST_READ_TIMEOUT)  # a peer that connects and says nothing must not hold a worker
    request = _recv(conn)
    conn.settimeout(None)
    if request.get("protocol") != PROTOCOL:
        _send(conn, {"type": "refused", "reason": f"protocol {request.get('protocol')} != {PROTOCOL}"})
        return True
    if request.get("code") != code:
        _send(conn, {"type": "refused", "reason": "stale code: the server restarts with the new code"})
        return False
    differ = config_difference(config, request.get("config") or {})
    if differ:
        _send(conn, {"type": "refused", "reason": "configuration differs: " + ", ".join(differ)})
        return True
    op = request.get("op")
    if op not in OPERATIONS:
        _send(conn, {"type": "refused", "reason": f"unknown operation {op!r}"})
        return True

    handler = _ForwardLogs(conn, int(request.get("log_level") or logging.INFO))
    root = logging.getLogger()
    root.addHandler(handler)

    def forward(message: dict[str, Any]) -> None:
        # A task that went away (killed at its timeout) must not fail the frame it asked for.
        if handler.broken:
            return
        try:
            with handler.lock:
                _send(conn, message)
        except OSError:
            handler.broken = True

    def forward_lineage(inputs: list[str], outputs: list[str], job: str | None) -> None:
        forward({"type": "lineage", "inputs": inputs, "outputs": outputs, "job": job})

    def forward_event(event: str, data: dict[str, Any]) -> None:
        forward({"type": "event", "event": event, "data": data})

    id_token = _IDENTITY.set(request.get("identity"))
    sink_token = _LINEAGE_SINK.set(forward_lineage)
    event_token = _EVENT_SINK.set(forward_event)
    t0 = time.perf_counter()
    try:
        result = _resolve(op)(*request.get("args", []), **request.get("kwargs", {}))
        reply = {"type": "result", "value": result}
    except Exception as exc:  # noqa: BLE001 - the task raises it; this worker carries on
        reply = {"type": "error", "exc_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                 "message": str(exc), "traceback": traceback.format_exc()}
    finally:
        _EVENT_SINK.reset(event_token)
        _LINEAGE_SINK.reset(sink_token)
        _IDENTITY.reset(id_token)
        root.removeHandler(handler)
    reply["seconds"] = round(time.perf_counter() - t0, 3)
    reply["pid"] = os.getpid()
    with contextlib.suppress(OSError):
        _send(conn, reply)
    log.info("%s for %s: %s in %.2f s", op, (request.get("identity") or {}).get("run_id"),
             reply["type"], reply["seconds"])
    return True


# -- the task's side -------------------------------------------------------------------------
def _task_identity() -> dict[str, Any]:
    from .common import task_identity

    return task_identity()


def _replay_log(message: Mapping[str, Any]) -> None:
    logger = logging.getLogger(str(message.get("name") or "iris_tasks"))
    level = int(message.get("level") or logging.INFO)
    if logger.isEnabledFor(level):
        record = logger.makeRecord(logger.name, level, "(compute server)", 0,
                                   "%s", (message.get("msg", ""),), None)
        logger.handle(record)


def _replay_lineage(message: Mapping[str, Any]) -> None:
    from .. import lineage

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
    except _Refused as exc:
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
    token = _EVENT_SINK.set(events)
    try:
        return _resolve(op)(*args, **kwargs)
    finally:
        _EVENT_SINK.reset(token)


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
    except _Refused as exc:
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
    _send(sock, {"protocol": PROTOCOL, "op": op, "args": list(args), "kwargs": kwargs,
                 "code": code_fingerprint(), "config": current_config(),
                 "identity": _task_identity(), "log_level": max(root_level, logging.DEBUG)})
    while True:
        try:
            message = _recv(sock)
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
            raise _Refused(message.get("reason"))
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


# -- the server ------------------------------------------------------------------------------
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def _keep_heap() -> bool:
    """Tell glibc to serve every allocation from the heap and never return it to the kernel.

    Large numpy arrays are otherwise mmapped and unmapped per allocation, and every new
    mapping is faulted in (and, on this VM, re-supplied by the host) page by page. Returns
    False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1
        ok &= libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


def _no_hugepage_advice() -> None:
    # A long-lived heap is reused, not faulted: numpy's MADV_HUGEPAGE only makes the kernel
    # zero and compact 2 MiB pages behind it (IFS reduce 7.5 -> 4.6 s measured in session 3).
    with contextlib.suppress(Exception):
        import numpy as np

        setter = getattr(np._core.multiarray, "_set_madvise_hugepage", None)
        if setter is not None:
            setter(False)


class ComputeServer:
    """Pre-forked workers accepting on one Unix socket; the master only supervises them."""

    def __init__(self, path: str | os.PathLike[str], *, workers: int = 1, max_requests: int = 500,
                 grace: float = 120.0, preload: bool = True):
        self.path = Path(path)
        self.workers = max(1, int(workers))
        self.max_requests = max(1, int(max_requests))
        self.grace = grace
        self.preload = preload
        self.code = code_fingerprint()
        self.config: dict[str, str] = {}
        self.listener: socket.socket | None = None
        self.children: dict[int, float] = {}
        self._stopping = False
        self._restart = False

    # master ------------------------------------------------------------------------------
    def bind(self) -> None:
        raw = os.fsencode(self.path)
        if len(raw) > MAX_SOCKET_PATH:
            raise ValueError(f"compute socket path {self.path} is {len(raw)} bytes; a Unix socket "
                             f"path must be at most {MAX_SOCKET_PATH} (set {ENV_COMPUTE_SOCKET})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(os.fspath(self.path))
            except OSError:
                self.path.unlink()  # left by a server that is gone
            else:
                raise RuntimeError(f"a compute server already listens on {self.path}")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # created 0600: only this user's tasks may connect
        try:
            listener.bind(os.fspath(self.path))
        finally:
            os.umask(old_umask)
        listener.listen(64)
        self.listener = listener

    def serve_forever(self) -> int:
        """Bind, preload, run the workers until SIGTERM/SIGINT; returns the exit status."""
        self.bind()
        if self.preload:
            from .warm import PRELOAD_MODULES, preload_science_stack

            # The task runner is Airflow's, not ours: a worker never runs an Airflow task.
            preload_science_stack(tuple(m for m in PRELOAD_MODULES if not m.startswith("airflow")))
        self.config = current_config()
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        log.info("compute server on %s: %d worker(s), code %s", self.path, self.workers, self.code)
        try:
            self._supervise()
        finally:
            self._shutdown()
        if self._restart:
            log.info("compute server: new code deployed, restarting")
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
        return 0

    def _on_stop(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - handler signature
        self._stopping = True

    def _supervise(self) -> None:
        failures: list[float] = []
        while not self._stopping:
            while len(self.children) < self.workers and not self._stopping:
                self._spawn()
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid, status = 0, 0
            if pid == 0:
                time.sleep(0.2)
                continue
            started = self.children.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            if code == EXIT_STALE:
                self._restart = self._stopping = True
                return
            if code != 0:
                log.error("compute worker %d exited with %s after %.0f s; starting another", pid,
                          code, time.monotonic() - (started or time.monotonic()))
                now = time.monotonic()
                failures = [t for t in failures if now - t < 60] + [now]
                if len(failures) > 5 * self.workers:
                    raise RuntimeError(f"compute workers keep dying ({len(failures)} in 60 s); giving up")
                time.sleep(0.5)

    def _spawn(self) -> None:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                status = self._worker()
            except BaseException:  # noqa: BLE001 - a child must never return into the master
                traceback.print_exc()
            finally:
                os._exit(status)
        self.children[pid] = time.monotonic()

    def _shutdown(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while self.children and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                pid, _ = os.waitpid(-1, os.WNOHANG)
                if pid:
                    self.children.pop(pid, None)
                    continue
            time.sleep(0.1)
        for pid in list(self.children):
            log.warning("compute worker %d did not stop within %.0f s; killing it", pid, self.grace)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.children.clear()
        if self.listener is not None:
            self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # worker ------------------------------------------------------------------------------
    def _worker(self) -> int:
        busy = False
        stop = False

        def on_term(signum: int, frame: Any) -> None:  # noqa: ARG001
            nonlocal stop
            stop = True
            if not busy:  # idle in accept(): leave now; busy: finish the frame first
                raise SystemExit(0)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        kept = _keep_heap()
        _no_hugepage_advice()
        log.info("compute worker %d ready (heap kept: %s)", os.getpid(), kept)
        assert self.listener is not None
        for _ in range(self.max_requests):
            if stop:
                break
            try:
                conn, _ = self.listener.accept()
            except SystemExit:
                return 0
            busy = True
            try:
                with conn:
                    fresh = _serve_connection(conn, self.code, self.config)
            except _Probe:
                fresh = True
            except (OSError, EOFError, ValueError) as exc:
                log.warning("compute worker %d: bad or broken request: %s", os.getpid(), exc)
                fresh = True
            finally:
                busy = False
            if not fresh:
                return EXIT_STALE
        return 0


@contextlib.contextmanager
def running_server(path: str | os.PathLike[str], *, workers: int = 1,
                   env: Mapping[str, str] | None = None, timeout: float = 60.0,
                   log_path: str | os.PathLike[str] | None = None) -> Iterator[int]:
    """A compute server in a child process for the block (tests, benchmarks); yields its PID."""
    import subprocess

    argv = [sys.executable, "-m", "iris_tasks.orchestration.compute", "--socket", os.fspath(path),
            "--workers", str(workers)]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(argv, env=dict(env) if env is not None else None,
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(path, timeout=timeout, process=proc)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            out.close()


def wait_ready(path: str | os.PathLike[str], *, timeout: float = 60.0, process: Any = None) -> None:
    """Block until a server answers on ``path`` (raises TimeoutError / RuntimeError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"compute server exited with {process.returncode} before it listened")
        with contextlib.suppress(OSError):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                probe.connect(os.fspath(path))
                return
        time.sleep(0.1)
    raise TimeoutError(f"no compute server on {path} after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    from .config import settings

    parser = argparse.ArgumentParser(prog="iris-drs compute-server", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return serve(args, settings_workers=settings().compute_slots)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", default=None,
                        help=f"Unix socket to listen on (default ${ENV_COMPUTE_SOCKET} or <state>/run/compute.sock)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default $IRIS_COMPUTE_SLOTS: one per compute slot)")
    parser.add_argument("--max-requests", type=int, default=500,
                        help="requests a worker serves before it is replaced (bounds heap growth)")
    parser.add_argument("--no-preload", action="store_true", help="do not import the science stack first")
    parser.add_argument("--ping", action="store_true",
                        help="do not serve: report whether a server answers on the socket and would "
                             "serve this shell's configuration (exit 0 if so)")


def serve(args: argparse.Namespace, *, settings_workers: int) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    path = Path(args.socket) if args.socket else socket_path()
    if args.ping:
        report = probe(path)
        print(json.dumps(report, indent=2))
        return 0 if report["status"] == "up" else 1
    if path is None:
        print(f"{ENV_COMPUTE_SOCKET} is off; give --socket", file=sys.stderr)
        return 2
    server = ComputeServer(path, workers=args.workers or settings_workers,
                           max_requests=args.max_requests, preload=not args.no_preload)
    return server.serve_forever()


if __name__ == "__main__":
    # Run the package's module, not this __main__ copy: the request context variables that
    # common.task_identity and lineage.record read live in iris_tasks.orchestration.compute.
    from iris_tasks.orchestration.compute import main as _main

    raise SystemExit(_main())
