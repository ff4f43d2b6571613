"""A real Airflow for a test: migrated metadata DB, the components as processes, a REST client.

Used by the tests that need a live scheduler and API server rather than ``dag.test()``: a
human-in-the-loop answer (Required Actions) and deadline alerts are resolved by the scheduler
and the API server. Airflow reads its configuration at import, so everything Airflow runs in
subprocesses with the environment of :func:`iris_devstack.airflow_env.airflow_env`.

* :func:`migrate` - ``airflow db migrate`` into a state directory; :func:`shared_migrated_db`
  does it once for the whole test run, whichever xdist worker asks first (each test copies the
  file, :func:`airflow_test_env`; the ``migrated_db`` fixture of ``tests/conftest.py``);
* :func:`with_operator_login` - SimpleAuthManager with one named user and a known password
  (instead of "everyone is admin"), so an answer given through the API names its author;
* :func:`running` - start the components, yield, stop them (by their process groups);
* :class:`AirflowAPI` - ``/auth/token`` then ``/api/v2`` with the bearer token, as a UI does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from iris_devstack.airflow_env import airflow_env


def migrate(state: Path) -> Path:
    """``airflow db migrate`` under ``state``; returns the SQLite file."""
    env = airflow_env(state, base=os.environ, parallelism=2)
    proc = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return state / "airflow" / "airflow.db"


def shared_migrated_db(root: Path) -> Path:
    """One migrated metadata DB for every test of the run: the first caller migrates under
    ``root`` (shared by the xdist workers of the run) while holding a lock, the others wait for
    it and reuse the file (they only ever copy it)."""
    root.mkdir(parents=True, exist_ok=True)
    state = root / "airflow-migrated" / "state"
    done = state / "migrated.ok"
    with open(root / "airflow-migrated.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.is_file():
                db = migrate(state)
                done.write_text(str(db))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return Path(done.read_text())


def airflow_test_env(tmp_path: Path, migrated_db: Path | None = None, **kwargs: Any) -> dict[str, str]:
    """The Airflow + IRIS environment of one test under ``tmp_path/state`` (a copy of the
    migrated DB; small masters from 2 frames; no landing settle time; no alert webhook)."""
    state = tmp_path / "state"
    if migrated_db is not None:
        (state / "airflow").mkdir(parents=True, exist_ok=True)
        shutil.copy(migrated_db, state / "airflow" / "airflow.db")
    env = airflow_env(state, base=os.environ, parallelism=2, **kwargs)
    env["IRIS_MIN_MASTER_FRAMES"] = "2"
    # Test nights are copied into the landing area whole: no need to wait for them to settle
    # (the landing contract has its own tests, test_landing_contract.py).
    env["IRIS_LANDING_SETTLE_SECONDS"] = "0"
    env.pop("IRIS_ALERT_WEBHOOK", None)
    return env


def with_operator_login(env: dict[str, str], user: str = "night_operator",
                        password: str = "test-only-password") -> tuple[str, str]:
    """Make SimpleAuthManager know one admin ``user`` with ``password`` (written to its
    passwords file in AIRFLOW_HOME); returns the credentials."""
    home = Path(env["AIRFLOW_HOME"])
    passwords = home / "test_passwords.json"
    passwords.write_text(json.dumps({user: password}))
    env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] = "False"
    env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = f"{user}:admin"
    env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] = str(passwords)
    return user, password


@contextlib.contextmanager
def running(env: dict[str, str], log_dir: Path,
            components: Sequence[Sequence[str]] = (("api-server",), ("scheduler", "--skip-serve-logs"),
                                                   ("dag-processor",)),
            grace: float = 5.0) -> Iterator[dict[str, Path]]:
    """Run Airflow components (``airflow <args>``) until the block ends; yields their log
    files by component name. The API server listens on ``AIRFLOW__API__PORT``; the log
    servers are skipped (they would listen on every interface; task logs are local files).

    At the end every component gets SIGTERM and ``grace`` seconds in all to exit, then its
    process group gets SIGKILL: the stack is thrown away with its state directory, and a
    triggerer waiting for its trigger runner can take 10 s to exit (how a stack stops is
    tested in ``tests/test_stack.py``)."""
    procs: list[subprocess.Popen] = []
    logs: dict[str, Path] = {}
    try:
        for args in components:
            args = list(args)
            if args[0] == "api-server" and "--port" not in args:
                args += ["--port", env["AIRFLOW__API__PORT"]]
            logs[args[0]] = log_dir / f"{args[0]}.log"
            with open(logs[args[0]], "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "airflow", *args], env=env,
                                              stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        yield logs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        end = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Whatever is left of its group (task processes, the trigger runner) goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def tail(logs: dict[str, Path], chars: int = 3000) -> str:
    """The ends of the component logs, for an assertion message."""
    return "\n".join(f"--- {name}\n{path.read_text(errors='replace')[-chars:]}"
                     for name, path in logs.items() if path.is_file())


def wait_for(check: Callable[[], Any], timeout: float, what: str, logs: dict[str, Path] | None = None,
             interval: float = 1.0) -> Any:
    """Poll ``check`` until it returns something truthy (returned) or fail after ``timeout`` s."""
    import httpx

    end = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (OSError, httpx.TransportError):  # the API server is not up (yet)
            value = None
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                 + (tail(logs) if logs else ""))
        time.sleep(interval)


class AirflowAPI:
    """The REST API of a running API server, logged in as a UI user would be."""

    def __init__(self, env: dict[str, str], user: str | None = None, password: str | None = None):
        import httpx

        self.base = f"http://127.0.0.1:{env['AIRFLOW__API__PORT']}"
        self.user, self.password = user, password
        self.client = httpx.Client(base_url=self.base, timeout=30)
        self.token: str | None = None

    def login(self) -> str:
        if self.user is None:  # everyone is admin: a token without credentials
            resp = self.client.get("/auth/token")
        else:
            resp = self.client.post("/auth/token", json={"username": self.user, "password": self.password})
        resp.raise_for_status()
        self.token = resp.json()["access_token"]
        return self.token

    def request(self, method: str, path: str, *, prefix: str = "/api/v2", **kwargs: Any) -> Any:
        if self.token is None:
            self.login()
        resp = self.client.request(method, f"{prefix}{path}",
                                   headers={"Authorization": f"Bearer {self.token}"}, **kwargs)
        if resp.status_code >= 400:
            raise AssertionError(f"{method} {path} -> {resp.status_code}: {resp.text[:2000]}")
        return resp.json() if resp.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, json=body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, json=body)

    def close(self) -> None:
        self.client.close()

    # -- the calls the tests make ----------------------------------------------------------
    def dag_registered(self, dag_id: str) -> bool:
        try:
            self.get(f"/dags/{dag_id}")
        except AssertionError:
            return False
        return True

    def unpause(self, dag_id: str, reparse: bool = False) -> None:
        """Unpause; with ``reparse`` also ask the DAG processor to parse the DAG's file now.
        An asset watcher (the landing trigger) only runs for an unpaused DAG, and which
        watchers are active is decided when the file is parsed: without the request that
        happens up to ``min_file_process_interval`` (30 s) later."""
        self.patch(f"/dags/{dag_id}", {"is_paused": False})
        if reparse:
            self.request("PUT", f"/parseDagFile/{self.get(f'/dags/{dag_id}')['file_token']}")

    def asset_events(self, **params: Any) -> list[dict[str, Any]]:
        """``GET /assets/events``. Airflow 3.3.2 answers 500 while an event's newly created run
        has no start date yet (its response model requires one): asked again until it
        answers."""
        end = time.monotonic() + 60
        while True:
            try:
                return list(self.get("/assets/events", **params)["asset_events"])
            except AssertionError as err:
                if " -> 500:" not in str(err) or time.monotonic() > end:
                    raise
            time.sleep(0.5)

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        run = self.post(f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def task_states(self, dag_id: str, run_id: str) -> dict[tuple[str, int], str]:
        tis = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=100)["task_instances"]
        return {(t["task_id"], t["map_index"]): t["state"] for t in tis}

    def deadlines(self, dag_id: str = "~", run_id: str = "~") -> list[dict[str, Any]]:
        """The Deadlines the UI shows for a run (its private ``/ui`` API; met ones are deleted
        when the run succeeds, missed ones stay)."""
        found = self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/deadlines", prefix="/ui",
                             params={"limit": 100})
        return list(found["deadlines"])

    def pending_actions(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """The run's human-in-the-loop requests without an answer (the Required Actions page)."""
        found = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/hitlDetails", response_received=False)
        return list(found["hitl_details"])

    def answer(self, dag_id: str, run_id: str, task_id: str, chosen: list[str],
               params_input: dict[str, Any] | None = None, map_index: int = -1) -> dict[str, Any]:
        return self.patch(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails",
                          {"chosen_options": chosen, "params_input": params_input or {}})
