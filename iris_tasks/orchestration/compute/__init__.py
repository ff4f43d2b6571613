"""The compute server: long-lived worker processes that run the real-time frame computation.

Why it exists. Every Airflow task is a fresh process. On this kind of VM (virtio-balloon with
free page reporting) memory that a previous process freed goes back to the host within
seconds, and the next process pays ~2 s per GiB to fault it in again: a 4k imager readout took
2.4-2.7 s in a task against 1.2 s in a process that had done one before. A worker that stays
alive keeps its heap (glibc is told never to give it back, see :func:`_keep_heap`), its
imported modules and its mapped reference arrays, so a frame costs only its arithmetic.

How it works. ``iris-drs compute-server --socket PATH`` binds a Unix socket, imports the
science stack once, and forks ``--workers`` processes (default ``IRIS_COMPUTE_SLOTS``) that
accept connections on it, one request at a time each. The ``frame`` task calls
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

The package: :mod:`.protocol` (wire format, operations, fingerprints, errors), :mod:`.client`
(the task's side: :func:`run`), :mod:`.server` (:class:`ComputeServer`, ``main``). The request
context a worker sets (task identity, lineage and event sinks) lives in
:mod:`iris_tasks.orchestration.context`, which imports nothing of the project.
"""

from __future__ import annotations

from ..context import notify
from .client import probe, run, run_local
from .protocol import (
    ENV_COMPUTE_SOCKET,
    MAX_SOCKET_PATH,
    OPERATIONS,
    ComputeError,
    ComputeServerLost,
    code_fingerprint,
    config_difference,
    config_fingerprint,
    current_config,
    ping,
    socket_path,
)
from .server import ComputeServer, add_arguments, main, running_server, serve, wait_ready

__all__ = [
    "ENV_COMPUTE_SOCKET", "MAX_SOCKET_PATH", "OPERATIONS", "ComputeError",
    "ComputeServer", "ComputeServerLost", "add_arguments", "code_fingerprint",
    "config_difference", "config_fingerprint", "current_config", "main", "notify", "ping",
    "probe", "run", "run_local", "running_server", "serve", "socket_path", "wait_ready",
]
