"""The compute server: pre-forked worker processes that keep their heap between frames.

See the package docstring for why and how. The master binds the socket, imports the science
stack once and supervises its workers; each worker serves one request at a time with the
requesting task's identity, lineage and event sinks set (:mod:`..context`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .. import context
from . import protocol
from .client import _resolve, probe
from .protocol import (
    ENV_COMPUTE_SOCKET,
    EXIT_STALE,
    MAX_SOCKET_PATH,
    OPERATIONS,
    PROTOCOL,
    REQUEST_READ_TIMEOUT,
    Probe,
    config_difference,
    socket_path,
)

log = logging.getLogger(__name__)


class _ForwardLogs(logging.Handler):
    """Sends each record of the request to the waiting task."""

    def __init__(self, sock: socket.socket, level: int):
        super().__init__(level)
        self.sock = sock
        self.broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.broken or record.name.startswith("iris_tasks.orchestration.compute"):
            return
        try:
            msg = record.getMessage()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                msg = f"{msg}\n{record.exc_text}"
            with self.lock:
                protocol.send(self.sock, {"type": "log", "name": record.name, "level": record.levelno,
                                  "msg": msg, "created": record.created})
        except OSError:
            self.broken = True  # the task went away; the worker finishes and moves on


def _serve_connection(conn: socket.socket, code: str, config: Mapping[str, str]) -> bool:
    """Answer one request; returns False when this worker's code is stale (exit after)."""
    conn.settimeout(REQUEST_READ_TIMEOUT)  # a peer that connects and says nothing must not hold a worker
    request = protocol.recv(conn)
    conn.settimeout(None)
    if request.get("protocol") != PROTOCOL:
        protocol.send(conn, {"type": "refused", "reason": f"protocol {request.get('protocol')} != {PROTOCOL}"})
        return True
    if request.get("code") != code:
        protocol.send(conn, {"type": "refused", "reason": "stale code: the server restarts with the new code"})
        return False
    differ = config_difference(config, request.get("config") or {})
    if differ:
        protocol.send(conn, {"type": "refused", "reason": "configuration differs: " + ", ".join(differ)})
        return True
    op = request.get("op")
    if op not in OPERATIONS:
        protocol.send(conn, {"type": "refused", "reason": f"unknown operation {op!r}"})
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
                protocol.send(conn, message)
        except OSError:
            handler.broken = True

    def forward_lineage(inputs: list[str], outputs: list[str], job: str | None) -> None:
        forward({"type": "lineage", "inputs": inputs, "outputs": outputs, "job": job})

    def forward_event(event: str, data: dict[str, Any]) -> None:
        forward({"type": "event", "event": event, "data": data})

    t0 = time.perf_counter()
    try:
        with context.serving(request.get("identity"), lineage=forward_lineage,
                             events=forward_event):
            result = _resolve(op)(*request.get("args", []), **request.get("kwargs", {}))
        reply = {"type": "result", "value": result}
    except Exception as exc:  # noqa: BLE001 - the task raises it; this worker carries on
        reply = {"type": "error", "exc_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                 "message": str(exc), "traceback": traceback.format_exc()}
    finally:
        root.removeHandler(handler)
    reply["seconds"] = round(time.perf_counter() - t0, 3)
    reply["pid"] = os.getpid()
    with contextlib.suppress(OSError):
        protocol.send(conn, reply)
    log.info("%s for %s: %s in %.2f s", op, (request.get("identity") or {}).get("run_id"),
             reply["type"], reply["seconds"])
    return True


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
        self.code = protocol.code_fingerprint()
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
            from ..warm import PRELOAD_MODULES, preload_science_stack

            # The task runner is Airflow's, not ours: a worker never runs an Airflow task.
            preload_science_stack(tuple(m for m in PRELOAD_MODULES if not m.startswith("airflow")))
        self.config = protocol.current_config()
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
            except Probe:
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
    from ...config import settings

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
    path = Path(args.socket) if args.socket else socket_path()
    if not args.ping:  # a server process owns its logging; a ping from a caller does not
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                            format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
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
