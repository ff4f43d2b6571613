"""The compute server's wire protocol and the checks both sides make.

Length-prefixed JSON messages over a Unix socket; the operations a task may ask for, by name;
the code and configuration fingerprints that decide whether a server may serve a task; the
errors the task side raises. Shared by :mod:`.client` (the task) and :mod:`.server`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...config import is_off
from ...errors import IrisError, TransientError
from .. import context

log = logging.getLogger(__name__)


ENV_COMPUTE_SOCKET = "IRIS_COMPUTE_SOCKET"
PROTOCOL = 1

# What a task may ask for, by name. Nothing else is importable through the socket.
OPERATIONS: dict[str, str] = {
    "ping": "iris_tasks.orchestration.compute.protocol:ping",
    "process_frame": "iris_tasks.orchestration.frame_task:process_frame_op",
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

_PACKAGE_ROOT = Path(__file__).resolve().parents[3]
_CODE_DIRS = ("iris_tasks", "readout_cy")


class ComputeError(IrisError, RuntimeError):
    """The operation failed in the compute server; the message names the remote exception.

    No category of its own: what the remote exception was (``remote_type``) decides."""

    def __init__(self, message: str, *, remote_type: str = "", remote_traceback: str = ""):
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


class ComputeServerLost(TransientError, ComputeError):
    """The worker went away (killed, crashed) before it answered: the server starts a new one,
    so the computation can be tried again (the ``frame`` task does, in its own process)."""


class Refused(Exception):
    """The server will not run this request here; the caller computes in-process."""


# -- where and what --------------------------------------------------------------------------
def socket_path() -> Path | None:
    """The socket the tasks use: ``$IRIS_COMPUTE_SOCKET``, else ``<state>/run/compute.sock``;
    None when switched off."""
    value = os.environ.get(ENV_COMPUTE_SOCKET)
    if value is not None:
        # An empty value switches the server off too: there is no socket path in it.
        return None if not value.strip() or is_off(value) else Path(value).expanduser()
    from ...config import settings

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
    from ... import calib

    cache = str(calib.cache_dir())
    return {**config_fingerprint(), "(CRDS cache in use)": hashlib.sha256(cache.encode()).hexdigest()[:12]}


def config_difference(mine: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """Names of the variables set differently (or only on one side)."""
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


def ping(delay: float = 0.0) -> dict[str, Any]:
    """Health check: who answers. ``delay`` keeps the worker busy (tests, diagnosis)."""
    if delay:
        time.sleep(float(delay))
    return {"pid": os.getpid(), "code": code_fingerprint(), "identity": context.task_identity_override()}


# -- framing ---------------------------------------------------------------------------------
def send(sock: socket.socket, message: Mapping[str, Any]) -> None:
    body = json.dumps(message, default=str).encode()
    sock.sendall(_HEADER.pack(len(body)) + body)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class Probe(EOFError):
    """The peer connected and closed without a word: a readiness check."""


def recv(sock: socket.socket) -> dict[str, Any]:
    first = sock.recv(_HEADER.size)
    if not first:
        raise Probe("connection closed before a message")
    head = first + (recv_exact(sock, _HEADER.size - len(first)) if len(first) < _HEADER.size else b"")
    (size,) = _HEADER.unpack(head)
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is larger than the {MAX_MESSAGE} allowed")
    return json.loads(recv_exact(sock, size))
