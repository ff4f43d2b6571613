"""The environment for running Airflow against this repository.

Airflow reads its configuration when ``airflow`` is first imported, so everything here is
plain environment variables, built before any Airflow process starts::

    from iris_devstack.airflow_env import airflow_env
    env = airflow_env("var", s3=seaweed, base=os.environ)
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True)

The result points Airflow at ``<repo>/dags`` and ``<repo>/plugins``, keeps AIRFLOW_HOME (and
the SQLite database, unless a PostgreSQL URL is given) under ``<state>/airflow``, binds the
API server to 127.0.0.1, writes OpenLineage events as files under ``<state>/lineage`` and
defines the two connections the DAGs use (``iris_s3``, ``fs_default``) and the ``IRIS_*``
variables read by :mod:`iris_tasks.config`.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

REPO_DIR = Path(__file__).resolve().parents[1]
# The LocalExecutor with the science stack preloaded before its workers fork.
WARM_LOCAL_EXECUTOR = "iris_tasks.orchestration.warm.WarmLocalExecutor"


class _S3Server(Protocol):  # iris_devstack.services.seaweedfs.SeaweedS3 and look-alikes
    endpoint_url: str

    def airflow_conn_uri(self) -> str: ...


def _persistent_secret(home: Path, name: str, make) -> str:
    """A secret generated once per AIRFLOW_HOME and shared by every component started with
    this environment. Airflow would otherwise invent one per process (JWT secret) or one per
    process racing to write airflow.cfg (Fernet key): tokens from the scheduler would not
    verify in the API server, and trigger kwargs encrypted by the DAG processor would not
    decrypt in the triggerer."""
    path = home / name
    if path.is_file():
        return path.read_text().strip()
    home.mkdir(parents=True, exist_ok=True)
    secret = make()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race; use its secret
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def airflow_env(
    state_dir: str | os.PathLike[str],
    *,
    sql_alchemy_conn: str | None = None,
    s3: _S3Server | None = None,
    s3_conn_uri: str | None = None,
    s3_conn_id: str = "iris_s3",
    landing: str | os.PathLike[str] | None = None,
    store_url: str | None = None,
    crds_path: str | os.PathLike[str] | None = None,
    repo_dir: str | os.PathLike[str] | None = None,
    api_port: int = 8080,
    parallelism: int = 4,
    executor: str = WARM_LOCAL_EXECUTOR,
    base: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Environment variables for Airflow and the IRIS tasks it runs.

    ``state_dir``: root of everything this deployment writes. ``sql_alchemy_conn``: a
    PostgreSQL URL for a shared deployment (default SQLite in ``<state>/airflow``). ``s3`` (a
    running SeaweedS3) or ``s3_conn_uri`` defines ``AIRFLOW_CONN_<S3_CONN_ID>``; with either,
    the default store is ``s3://iris-drs?conn_id=<s3_conn_id>``, else a local directory.
    ``base``: when given (e.g. ``os.environ``) the result is ``base`` updated with our
    variables, ready for ``subprocess``; otherwise only our variables are returned.
    """
    state = Path(state_dir).expanduser().resolve()
    repo = Path(repo_dir).resolve() if repo_dir else REPO_DIR
    home = state / "airflow"
    lineage_dir = state / "lineage"
    for d in (home, lineage_dir):
        d.mkdir(parents=True, exist_ok=True)

    conn_uri = s3_conn_uri or (s3.airflow_conn_uri() if s3 is not None else None)
    if store_url is None:
        store_url = f"s3://iris-drs?conn_id={s3_conn_id}" if conn_uri else (state / "store").as_uri()
    landing_str = str(landing) if landing is not None else str(state / "landing")
    if not landing_str.startswith("s3://"):
        landing_str = str(Path(landing_str).expanduser().resolve())
    crds = Path(crds_path).expanduser().resolve() if crds_path else state / "crds"

    env: dict[str, str] = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(repo / "plugins"),
        "AIRFLOW__CORE__EXECUTOR": executor,
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(parallelism),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # An idle scheduler loop sleeps this long before it looks again; each frame waits for
        # ~4 such looks (asset event -> run, run -> claim, claim -> process, process -> ingest).
        # 0.5 s instead of 1 s: queueing 3.7 -> 2.9 s per 4096^2 frame, no more CPU (0.2 s
        # cost more than it saved on 2 busy cores).
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
        # New DAGs start unpaused: the real-time DAG must react to the first frame of the night.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_alchemy_conn
        or f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": _persistent_secret(
            home, "jwt_secret", lambda: secrets.token_urlsafe(48)),
        "AIRFLOW__CORE__FERNET_KEY": _persistent_secret(
            home, "fernet_key", lambda: base64.urlsafe_b64encode(os.urandom(32)).decode()),
        # Loopback-only development UI: every user is admin, no login page.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        # OpenLineage is off unless a transport is configured; files work offline.
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(lineage_dir / "ol")}
        ),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "iris-drs",
        "AIRFLOW__OPENLINEAGE__DISABLE_SOURCE_CODE": "True",
        # Events emitted from a thread instead of a fork per event: a task start costs ~0.1
        # core-s less (bench/bench_task_start.py), and a stuck emission cannot strand the task.
        "AIRFLOW__OPENLINEAGE__EXECUTE_IN_THREAD": "True",
        "AIRFLOW_CONN_FS_DEFAULT": json.dumps({"conn_type": "fs", "extra": {"path": "/"}}),
        "IRIS_STATE_DIR": str(state),
        "IRIS_LANDING": landing_str,
        "IRIS_STORE_URL": store_url,
        "IRIS_CRDS_PATH": str(crds),
        "IRIS_S3_CONN_ID": s3_conn_id,
        # Matplotlib in workers (quicklook PNGs) must never look for a display.
        "MPLBACKEND": "Agg",
        # Frames run in parallel as tasks; OpenMP threads per task share the rest of the cores
        # (oversubscribed OpenMP spin-waits slow every task down).
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, parallelism))),
    }
    if conn_uri:
        env[f"AIRFLOW_CONN_{s3_conn_id.upper()}"] = conn_uri
    if s3 is not None:
        # Plain boto3 users (iris_tasks.storage without conn_id, the CLI) find the server too.
        env["IRIS_S3_ENDPOINT_URL"] = s3.endpoint_url
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    if base is None:
        return env
    return {**base, **env}
