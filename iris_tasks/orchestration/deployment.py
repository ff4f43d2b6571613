"""Is this worker running the scheduler's code and configuration? The deployment fingerprint.

With several worker hosts (Celery), a host left on older code, or started with another
configuration, would process frames differently from the rest without anyone noticing. So the
scheduler side publishes the fingerprint of its deployment - a digest of the *content* of the
DRS code (``iris_tasks``, ``readout_cy`` and the DAG files) and of the configuration that must
be the same everywhere - as the Airflow Variable :data:`VARIABLE`, and every IRIS task checks
its own against it before it starts (:func:`check_deployment`, called by
:func:`iris_tasks.orchestration.dag_tasks.iris_task`). A mismatch refuses the work with
:class:`DeploymentMismatch`, naming both fingerprints, what differs and the host; it is a
transient error, so a task with retries left is retried, and lands on another host if one runs
the right deployment. Without a published fingerprint (the single-host stack, ``dag.test()``,
the CLI) nothing is checked.

Configuration that legitimately differs per host is left out: where the host keeps its state
and caches, how it reaches the services (addresses), and its own capacity
(:data:`PER_HOST`). The ledger URL counts by database and schema only, for the same reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import TransientError

log = logging.getLogger(__name__)

#: The Airflow Variable holding the scheduler side's fingerprint (JSON: code, config, digests).
VARIABLE = "iris_deployment_fingerprint"

_ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("iris_tasks", "readout_cy", "dags")
CODE_SUFFIXES = (".py", ".pyx", ".yaml", ".json", ".txt")

#: Settings that are each host's own business: its directories, its addresses of the shared
#: services, its capacity, the dev stack's markers.
PER_HOST = frozenset({
    "IRIS_STATE_DIR", "IRIS_CRDS_PATH", "IRIS_NATIVE_CACHE", "IRIS_COMPUTE_SOCKET",
    "IRIS_COMPUTE_SLOTS", "IRIS_PRELOAD", "IRIS_STACK_ID", "IRIS_STACK_STATE",
    "IRIS_S3_ENDPOINT_URL", "IRIS_AIRFLOW_URL", "IRIS_CLUSTER_HOST", "IRIS_CLI_STATE",
})
CONFIG_EXTRA = frozenset({"CRDS_CONTEXT"})


class DeploymentMismatch(TransientError):
    """This host's code or configuration differs from the scheduler's: it refuses the task
    (retried, possibly on another host)."""


def code_digest(root: Path = _ROOT) -> str:
    """SHA-256 (16 hex) over the relative paths and contents of the deployed code files: the
    same on every host that runs the same code, wherever and whenever it was installed."""
    digest = hashlib.sha256()
    for sub in CODE_DIRS:
        base = root / sub
        files = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "build"))
            files += [Path(dirpath) / n for n in filenames if n.endswith(CODE_SUFFIXES)]
        for path in sorted(files):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()[:16]


def _ledger_identity(url: str) -> str:
    """A ledger URL without the address and password: the database (and schema) it names, or
    a SQLite file's name."""
    if "://" not in url or url.startswith("sqlite"):
        return Path(url.split("///", 1)[-1]).name
    parts = urllib.parse.urlsplit(url)
    return f"{parts.path.lstrip('/')}?{parts.query}"


def config_values(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The configuration every host must share: ``IRIS_*`` and ``CRDS_CONTEXT`` without
    :data:`PER_HOST`, with the ledger URL reduced to the database it names."""
    env = os.environ if env is None else env
    out = {}
    for key, value in sorted(env.items()):
        if not (key.startswith("IRIS_") or key in CONFIG_EXTRA) or key in PER_HOST:
            continue
        out[key] = _ledger_identity(value) if key == "IRIS_LEDGER_URL" else value
    return out


def fingerprint(env: Mapping[str, str] | None = None, root: Path = _ROOT) -> dict[str, Any]:
    """``{"code", "config", "id", "config_digests"}``: the code digest, the configuration's
    digest, both together (``id``, what is compared) and a digest per variable (to name what
    differs without showing values, which may hold passwords)."""
    values = config_values(env)
    per_var = {k: hashlib.sha256(v.encode()).hexdigest()[:12] for k, v in values.items()}
    config = hashlib.sha256("\n".join(f"{k}={v}" for k, v in per_var.items()).encode()).hexdigest()[:16]
    code = code_digest(root)
    return {"id": f"{code}-{config}", "code": code, "config": config, "config_digests": per_var}


def describe_difference(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> str:
    """What differs between two fingerprints, in words."""
    parts = []
    if mine.get("code") != theirs.get("code"):
        parts.append(f"code {mine.get('code')} here vs {theirs.get('code')}")
    a, b = mine.get("config_digests") or {}, theirs.get("config_digests") or {}
    names = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if names:
        parts.append("configuration differs in " + ", ".join(names))
    elif mine.get("config") != theirs.get("config"):
        parts.append("configuration differs")
    return "; ".join(parts) or "no difference"


def check_deployment(published: Mapping[str, Any] | None, *, host: str | None = None,
                     env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Raise :class:`DeploymentMismatch` when this process's fingerprint differs from the
    ``published`` one (the scheduler side's); returns this process's fingerprint. ``None``
    (nothing published) passes."""
    mine = fingerprint(env)
    if not published or published.get("id") == mine["id"]:
        return mine
    host = host or socket.gethostname()
    raise DeploymentMismatch(
        f"host {host} refuses this task: its deployment fingerprint {mine['id']} differs from "
        f"the scheduler's {published.get('id')} ({describe_difference(mine, published)}); "
        "redeploy or restart this worker with the scheduler's code and configuration")


def published_fingerprint() -> dict[str, Any] | None:
    """The scheduler side's fingerprint from the Airflow Variable, None when unpublished
    (read through the task's execution API: call inside a running task only)."""
    import json

    from airflow.sdk import Variable

    text = Variable.get(VARIABLE, default=None)
    return json.loads(text) if text else None
