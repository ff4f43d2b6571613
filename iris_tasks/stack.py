"""Start, watch and stop the local IRIS DRS stack: SeaweedFS (S3), the compute server and the
Airflow components.

Every component is its own process, in its own process group (session), with its PID recorded
in ``<state>/pids/<name>.json`` and its output in ``<state>/logs/<name>.log``. ``airflow
standalone`` is deliberately not used: it leaves its children behind on SIGTERM. Stopping works
from any process (``make stop`` in another shell): it signals the recorded process groups,
waits, SIGKILLs what is left, and then sweeps for any process that still carries this stack's
marker variable (``IRIS_STACK_ID``), which every descendant inherits — including task processes
that Airflow moved into process groups of their own.

Layout under the state directory (``IRIS_STATE_DIR``, default ``<repo>/var``)::

    stack.json        ports, database URL, auth mode, stack id (what `status`/`stop` read)
    secrets.json      JWT and API secret, the admin password (mode 0600)
    pids/ logs/       one file per component
    run/compute.sock  the compute server's socket (iris_tasks.orchestration.compute)
    airflow/          AIRFLOW_HOME (SQLite DB, task logs, passwords file)
    seaweedfs/        object-store data
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .orchestration.compute import ENV_COMPUTE_SOCKET

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
AIRFLOW_COMPONENTS = ("scheduler", "dag-processor", "triggerer", "api-server")
ALL_COMPONENTS = ("seaweedfs", "compute", *AIRFLOW_COMPONENTS)
MARKER = "IRIS_STACK_ID"
ADMIN_USER = "admin"
S3_BUCKETS = ("iris-drs",)  # the default store of iris_tasks.airflow_env


class StackError(RuntimeError):
    """The stack could not be started, reached or stopped."""


def default_state_dir() -> Path:
    """``$IRIS_STATE_DIR`` or ``<repo>/var`` (gitignored)."""
    return Path(os.environ.get("IRIS_STATE_DIR") or REPO_ROOT / "var").resolve()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """``preferred`` when it is free, else a port the kernel picks."""
    if preferred and port_is_free(preferred, host):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def s3_free_port(preferred: int) -> int:
    """An S3 port for SeaweedFS: weed also binds port + 10000 (gRPC), so both must be free."""
    from .services.seaweedfs import pick_ports

    if preferred + 10000 <= 65535 and port_is_free(preferred) and port_is_free(preferred + 10000):
        return preferred
    return pick_ports(1)[0]


@dataclass
class StackConfig:
    """What `start` decided, persisted in ``stack.json`` so `stop`/`status` need no options."""

    state_dir: str
    db_url: str
    api_port: int
    s3_port: int
    auth: str = "password"  # "password" (admin + generated password) | "open" (all admins)
    parallelism: int = 4
    stack_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    worker_log_port: int = 0
    trigger_log_port: int = 0
    # None: the stack's SeaweedFS (s3://iris-drs); else any store URL, e.g. file:///data/store
    # (the embedded local store) or an S3 service elsewhere.
    store_url: str | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"


class Stack:
    """The local stack under one state directory."""

    def __init__(self, state_dir: str | Path | None = None):
        self.state_dir = Path(state_dir).resolve() if state_dir else default_state_dir()
        self.pids_dir = self.state_dir / "pids"
        self.logs_dir = self.state_dir / "logs"
        self.airflow_home = self.state_dir / "airflow"
        self.config_path = self.state_dir / "stack.json"
        self.secrets_path = self.state_dir / "secrets.json"
        self._token: str | None = None

    # ------------------------------------------------------------------ configuration
    def configure(
        self,
        db_url: str | None = None,
        api_port: int | None = None,
        s3_port: int | None = None,
        auth: str = "password",
        parallelism: int = 4,
        store_url: str | None = None,
    ) -> StackConfig:
        """Decide ports/DB/auth/store for a new start (the stack must not be running)."""
        if self.running_components():
            raise StackError(f"stack under {self.state_dir} is already running; stop it first")
        if auth not in ("password", "open"):
            raise StackError(f"auth must be 'password' or 'open', not {auth!r}")
        for d in (self.pids_dir, self.logs_dir, self.airflow_home):
            d.mkdir(parents=True, exist_ok=True)
        if db_url:
            if db_url.startswith("postgresql"):
                ensure_postgres_database(db_url)
        else:
            db_url = f"sqlite:///{self.airflow_home / 'airflow.db'}"
        cfg = StackConfig(
            state_dir=str(self.state_dir),
            db_url=db_url,
            api_port=free_port(api_port or int(os.environ.get("IRIS_API_PORT", 8080))),
            s3_port=s3_free_port(s3_port or int(os.environ.get("IRIS_S3_PORT", 8333))),
            auth=auth,
            parallelism=parallelism,
            store_url=store_url,
            worker_log_port=free_port(),
            trigger_log_port=free_port(),
        )
        self.config_path.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        self._ensure_secrets()
        return cfg

    def config(self) -> StackConfig:
        if not self.config_path.exists():
            raise StackError(f"no stack configured under {self.state_dir} (run start first)")
        data = json.loads(self.config_path.read_text())
        return StackConfig(**data)

    def _ensure_secrets(self) -> dict[str, str]:
        if self.secrets_path.exists():
            return json.loads(self.secrets_path.read_text())
        data = {
            "api_secret_key": secrets.token_urlsafe(32),
            "admin_password": secrets.token_urlsafe(12),
        }
        fd = os.open(self.secrets_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        return data

    def admin_password(self) -> str | None:
        return None if self.config().auth == "open" else self._ensure_secrets()["admin_password"]

    def env(self) -> dict[str, str]:
        """Environment of every component (and of anything that talks to this stack): the
        project's Airflow environment (iris_tasks.airflow_env) plus what the stack decides."""
        from .airflow_env import airflow_env

        cfg = self.config()
        sec = self._ensure_secrets()
        s3 = seaweed_endpoint(self.state_dir, cfg.s3_port)
        env = airflow_env(
            self.state_dir,
            sql_alchemy_conn=cfg.db_url,
            s3=s3,
            api_port=cfg.api_port,
            parallelism=cfg.parallelism,
            store_url=cfg.store_url,
            base=os.environ,
        )
        env.update(s3.env())  # AWS_* so plain boto3 (CLI, demo, bench) reaches the same server
        pw_file = self.airflow_home / "simple_auth_manager_passwords.json"
        env.update(
            {
                MARKER: cfg.stack_id,
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__SECRET_KEY": sec["api_secret_key"],
                "AIRFLOW__CORE__AUTH_MANAGER": (
                    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
                ),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": str(cfg.auth == "open"),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw_file),
                # Log servers bind every interface; task logs are local files the api-server
                # reads directly, so the components run with --skip-serve-logs. The ports are
                # still moved off the defaults so a second stack on the machine cannot clash.
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(cfg.worker_log_port),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(cfg.trigger_log_port),
                "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
                "IRIS_AIRFLOW_URL": cfg.api_url,
                ENV_COMPUTE_SOCKET: self.compute_socket(env),
            }
        )
        if cfg.auth == "password":
            # The simple auth manager reads {"user": "password"} from this file; writing it
            # ourselves gives a known password instead of one printed once into a log.
            pw_file.write_text(json.dumps({ADMIN_USER: sec["admin_password"]}) + "\n")
        return env

    def compute_socket(self, env: Mapping[str, str]) -> str:
        """The compute server's socket: ``$IRIS_COMPUTE_SOCKET`` as given (``off`` runs the
        stack without it), else ``<state>/run/compute.sock``, or a short path under the temp
        directory when that is longer than a Unix socket path may be."""
        from .orchestration.compute import MAX_SOCKET_PATH

        given = env.get(ENV_COMPUTE_SOCKET)
        if given is not None:
            return given
        path = self.state_dir / "run" / "compute.sock"
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            path = Path(tempfile.gettempdir()) / f"iris-compute-{self.config().stack_id[:12]}.sock"
        return str(path)

    def compute_enabled(self, env: Mapping[str, str]) -> bool:
        from .orchestration.compute import OFF_VALUES

        return env.get(ENV_COMPUTE_SOCKET, "").strip().lower() not in OFF_VALUES

    # ------------------------------------------------------------------ processes
    def _pid_path(self, name: str) -> Path:
        return self.pids_dir / f"{name}.json"

    def _record(self, name: str) -> dict[str, Any] | None:
        path = self._pid_path(name)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _process(self, name: str) -> psutil.Process | None:
        """The live process recorded for ``name`` (PID reuse is ruled out by create_time)."""
        rec = self._record(name)
        if not rec:
            return None
        try:
            proc = psutil.Process(rec["pid"])
            if abs(proc.create_time() - rec["create_time"]) > 0.5:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def running_components(self) -> list[str]:
        return [n for n in ALL_COMPONENTS if self._process(n) is not None]

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> psutil.Process:
        """Start one component detached in its own session; record PID, PGID, start time."""
        log_path = self.logs_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            out.write(f"\n=== {time.strftime('%F %T')} start {' '.join(argv)}\n".encode())
            out.flush()
            popen = subprocess.Popen(
                argv,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: killpg reaches its children
                cwd=str(self.state_dir),
            )
        proc = psutil.Process(popen.pid)
        rec = {
            "name": name,
            "pid": popen.pid,
            "pgid": popen.pid,
            "create_time": proc.create_time(),
            "argv": argv,
            "log": str(log_path),
        }
        self._pid_path(name).write_text(json.dumps(rec, indent=2) + "\n")
        # The Popen object is dropped on purpose: the component must outlive this process when
        # `serve` hands over to `stop`. Reap it if we are still its parent when it exits.
        _detach_reaper(popen)
        log.info("started %s pid=%d (log %s)", name, popen.pid, log_path)
        return proc

    def start(
        self,
        components: Iterable[str] = ALL_COMPONENTS,
        timeout: float = 180.0,
        **configure: Any,
    ) -> StackConfig:
        """Configure, migrate the DB, start the components and wait until they are healthy."""
        cfg = self.configure(**configure)
        env = self.env()
        components = list(components)
        try:
            if "seaweedfs" in components:
                self.spawn("seaweedfs", self._seaweed_argv(cfg), env)
            if "compute" in components and not self.compute_enabled(env):
                components.remove("compute")
            if "compute" in components:
                # Before the scheduler, so the first frame already finds warm workers.
                self.spawn("compute", [sys.executable, "-m", "iris_tasks.orchestration.compute",
                                       "--socket", env[ENV_COMPUTE_SOCKET]], env)
            if any(c in AIRFLOW_COMPONENTS for c in components):
                self.migrate(env)
            airflow = [sys.executable, "-m", "airflow"]
            argv = {
                "scheduler": [*airflow, "scheduler", "--skip-serve-logs"],
                "dag-processor": [*airflow, "dag-processor"],
                "triggerer": [*airflow, "triggerer", "--skip-serve-logs"],
                "api-server": [*airflow, "api-server", "--host", "127.0.0.1", "--port", str(cfg.api_port)],
            }
            for name in AIRFLOW_COMPONENTS:
                if name in components:
                    self.spawn(name, argv[name], env)
            self.wait_healthy(components, timeout=timeout)
        except BaseException:
            log.error("start failed; stopping what was started (logs in %s)", self.logs_dir)
            self.stop()
            raise
        return cfg

    def migrate(self, env: Mapping[str, str] | None = None) -> None:
        env = dict(env or self.env())
        t0 = time.monotonic()
        log_path = self.logs_dir / "db-migrate.log"
        with open(log_path, "ab") as out:
            proc = subprocess.run(
                [sys.executable, "-m", "airflow", "db", "migrate"],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                timeout=600, cwd=str(self.state_dir),
            )
        if proc.returncode != 0:
            raise StackError(f"airflow db migrate failed (exit {proc.returncode}); see {log_path}")
        log.info("airflow db migrate: %.1f s", time.monotonic() - t0)

    def _seaweed_argv(self, cfg: StackConfig) -> list[str]:
        # A small Python supervisor runs the storage helper's SeaweedS3 in the foreground and
        # stops it on SIGTERM, so its own clean-up logic is reused and the PID we record is the
        # one to signal.
        return [
            sys.executable, "-m", "iris_tasks.stack", "--state-dir", str(self.state_dir),
            "_seaweedfs", "--port", str(cfg.s3_port),
        ]

    # ------------------------------------------------------------------ health
    def health(self) -> dict[str, Any]:
        """Per-component liveness plus the api-server's own /api/v2/monitor/health report."""
        cfg = self.config()
        report: dict[str, Any] = {"components": {}, "api": None, "s3": False, "compute": False}
        for name in ALL_COMPONENTS:
            proc = self._process(name)
            report["components"][name] = proc.pid if proc else None
        try:
            report["api"] = _http_json(f"{cfg.api_url}/api/v2/monitor/health", timeout=5)
        except (OSError, ValueError):
            report["api"] = None
        report["s3"] = _tcp_open("127.0.0.1", cfg.s3_port)
        if report["components"].get("compute"):
            argv = self._record("compute")["argv"]
            report["compute"] = _unix_open(argv[argv.index("--socket") + 1])
        return report

    def wait_healthy(self, components: Iterable[str] = ALL_COMPONENTS, timeout: float = 180.0) -> None:
        components = list(components)
        if "compute" in components and not self._record("compute"):
            components.remove("compute")  # started without it (IRIS_COMPUTE_SOCKET=off)
        deadline = time.monotonic() + timeout
        want_api = "api-server" in components
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.health()
            dead = [c for c in components if last["components"].get(c) is None]
            if dead:
                raise StackError(f"component(s) exited: {', '.join(dead)}; see {self.logs_dir}")
            ok = True
            if "seaweedfs" in components and not last["s3"]:
                ok = False
            if "compute" in components and not last["compute"]:
                ok = False
            if want_api:
                api = last["api"] or {}
                if api.get("metadatabase", {}).get("status") != "healthy":
                    ok = False
                for comp in ("scheduler", "triggerer", "dag_processor"):
                    if comp.replace("_", "-") in components:
                        if (api.get(comp) or {}).get("status") != "healthy":
                            ok = False
            if ok:
                return
            time.sleep(1.0)
        raise StackError(f"stack not healthy after {timeout:.0f} s: {json.dumps(last)}")

    # ------------------------------------------------------------------ stop
    def stop(self, timeout: float = 30.0) -> list[int]:
        """Stop everything; returns the PIDs that had to be SIGKILLed. Safe when nothing runs.

        In phases, because the components depend on each other while they shut down: first the
        scheduler, triggerer and dag-processor (the LocalExecutor lets running tasks finish,
        and task processes report their end through the api-server's execution API), then the
        api-server, then SeaweedFS (tasks upload to it). Each phase: SIGTERM the process
        groups, wait up to ``timeout``. Finally SIGKILL whatever of the stack is still alive,
        found by process tree, process group and the IRIS_STACK_ID marker."""
        stack_id = self._stack_id()
        killed: list[int] = []
        seen: dict[int, psutil.Process] = {}
        # The compute server goes with the api-server: tasks still finishing use both.
        for phase in (("scheduler", "triggerer", "dag-processor"), ("api-server", "compute"), ("seaweedfs",)):
            groups, procs = [], []
            for name in phase:
                proc = self._process(name)
                if proc is None:
                    continue
                groups.append(self._record(name)["pgid"])
                procs.append(proc)
                with contextlib.suppress(psutil.Error):
                    procs.extend(proc.children(recursive=True))
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGTERM)
            for p in procs:
                seen[p.pid] = p
            _, alive = psutil.wait_procs(procs, timeout=timeout)
            for p in alive:
                killed += _kill(p)
        # Anything of this stack that escaped its group (task processes run in groups of their
        # own; orphans are re-parented to init): TERM, a short grace period, then KILL.
        stray = list(_marked_processes(stack_id))
        for p in stray:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(stray, timeout=5)
        for p in alive:
            killed += _kill(p)
        for name in ALL_COMPONENTS:
            self._pid_path(name).unlink(missing_ok=True)
        return killed

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this stack still alive (after `stop` this must be empty)."""
        return list(_marked_processes(self._stack_id()))

    def _stack_id(self) -> str | None:
        try:
            return self.config().stack_id
        except StackError:
            return None

    # ------------------------------------------------------------------ REST API
    def token(self) -> str | None:
        """A JWT for the REST API (None in open mode, where the server injects one)."""
        cfg = self.config()
        if cfg.auth == "open":
            return None
        if self._token is None:
            body = json.dumps({"username": ADMIN_USER, "password": self.admin_password()}).encode()
            data = _http_json(f"{cfg.api_url}/auth/token", data=body, method="POST", timeout=10)
            self._token = data["access_token"]
        return self._token

    def api(self, method: str, path: str, body: Any = None, timeout: float = 30.0,
            attempts: int = 4) -> Any:
        """Call the public REST API (``path`` below /api/v2).

        Idempotent calls (GET, PATCH, PUT, DELETE) are retried on a server error, with 1, 2,
        4 s between attempts: on SQLite the API server answers 500 when a write waited out
        the 5 s busy timeout behind the scheduler (seen at start-up, when every component
        writes at once). POST is sent once.
        """
        cfg = self.config()
        headers = {}
        tok = self.token()
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        data = json.dumps(body).encode() if body is not None else None
        tries = attempts if method.upper() in ("GET", "PATCH", "PUT", "DELETE") else 1
        attempt = 0
        while True:
            try:
                return _http_json(f"{cfg.api_url}/api/v2{path}", data=data, method=method,
                                  headers=headers, timeout=timeout)
            except StackError as exc:
                attempt += 1
                if attempt >= tries or ": HTTP 5" not in str(exc):
                    raise
                log.warning("%s %s failed (%s); retrying", method, path, str(exc)[:200])
                time.sleep(2.0 ** (attempt - 1))


# ---------------------------------------------------------------------- helpers
def seaweed_endpoint(state_dir: Path, port: int) -> Any:
    """A SeaweedS3 description of the stack's server (addresses and credentials only; the
    server itself runs in the `seaweedfs` component process)."""
    from .services.seaweedfs import SeaweedS3

    srv = SeaweedS3(state_dir / "seaweedfs", port=port, buckets=S3_BUCKETS)
    srv.ports = {"s3": port}
    return srv


def ensure_postgres_database(db_url: str) -> bool:
    """Create the database named in ``db_url`` if it does not exist; True when created."""
    import psycopg

    parts = urllib.parse.urlsplit(db_url.replace("postgresql+psycopg2://", "postgresql://")
                                  .replace("postgresql+psycopg://", "postgresql://"))
    dbname = parts.path.lstrip("/")
    if not dbname:
        raise StackError(f"no database name in {db_url!r}")
    admin = parts._replace(scheme="postgresql", path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if exists:
            return False
        from psycopg import sql

        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        log.info("created PostgreSQL database %s", dbname)
        return True


def _marked_processes(stack_id: str | None) -> Iterable[psutil.Process]:
    if not stack_id:
        return
    me = os.getpid()
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        try:
            if p.environ().get(MARKER) == stack_id and p.status() != psutil.STATUS_ZOMBIE:
                yield p
        except (psutil.Error, OSError):
            continue


def _kill(p: psutil.Process) -> list[int]:
    try:
        log.warning("SIGKILL %d %s", p.pid, " ".join(p.cmdline()[:4]))
        p.kill()
        p.wait(5)
        return [p.pid]
    except psutil.NoSuchProcess:
        return []
    except psutil.Error:
        return [p.pid]


def _detach_reaper(popen: subprocess.Popen) -> None:
    import threading

    threading.Thread(target=popen.wait, daemon=True, name=f"reap-{popen.pid}").start()


def _unix_open(path: str) -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(path)
        return True
    return False


def _tcp_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def _http_json(url: str, data: bytes | None = None, method: str = "GET",
               headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> Any:
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise StackError(f"{method} {url}: HTTP {exc.code}: {detail}") from exc
    return json.loads(raw) if raw else None


# ---------------------------------------------------------------------- SeaweedFS supervisor
def _run_seaweedfs_foreground(state_dir: Path, port: int) -> int:
    """Run SeaweedFS until SIGTERM/SIGINT, then stop it through its own clean-up."""
    from .services.seaweedfs import SeaweedS3

    stop = {"now": False}

    def _on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        stop["now"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    (state_dir / "seaweedfs").mkdir(parents=True, exist_ok=True)
    server = SeaweedS3(state_dir / "seaweedfs", port=port, buckets=S3_BUCKETS)
    server.start()
    log.info("SeaweedFS S3 on %s", server.endpoint_url)
    try:
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        server.stop()
    return 0


# ---------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iris_tasks.stack", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", default=None, help="default: $IRIS_STATE_DIR or <repo>/var")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start", help="start SeaweedFS + Airflow and wait until healthy")
    add_start_options(p_start)
    sub.add_parser("stop", help="stop every component, no orphans")
    sub.add_parser("status", help="print component PIDs and health as JSON")
    p_sw = sub.add_parser("_seaweedfs", help=argparse.SUPPRESS)
    p_sw.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stack = Stack(args.state_dir)
    if args.cmd == "_seaweedfs":
        return _run_seaweedfs_foreground(stack.state_dir, args.port)
    if args.cmd == "start":
        cfg = stack.start(**start_kwargs(args))
        print(f"Airflow UI: {cfg.api_url}/  S3: {cfg.s3_url}  state: {stack.state_dir}")
        return 0
    if args.cmd == "stop":
        killed = stack.stop()
        left = stack.leftovers()
        print(f"stopped (SIGKILLed {len(killed)}); leftovers: {[p.pid for p in left]}")
        return 1 if left else 0
    print(json.dumps(stack.health(), indent=2))
    return 0


def add_start_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=os.environ.get("IRIS_AIRFLOW_DB"),
                   help="metadata DB URL, e.g. postgresql://postgres@127.0.0.1:5432/iris_airflow "
                        "(created if missing); default: SQLite under the state dir")
    p.add_argument("--port", type=int, default=None, help="api-server port (default 8080 or free)")
    p.add_argument("--s3-port", type=int, default=None, help="SeaweedFS S3 port (default 8333 or free)")
    p.add_argument("--auth", choices=("password", "open"), default="password",
                   help="password: user admin with a generated password; open: everyone is admin")
    p.add_argument("--parallelism", type=int, default=int(os.environ.get("IRIS_PARALLELISM", 4)))
    p.add_argument("--store", default=None,
                   help="object store URL for raw frames and products (default: the stack's "
                        "SeaweedFS, s3://iris-drs; e.g. file:///data/store for the local store)")


def start_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"db_url": args.db, "api_port": args.port, "s3_port": args.s3_port,
            "auth": args.auth, "parallelism": args.parallelism, "store_url": args.store}


if __name__ == "__main__":
    sys.exit(main())
