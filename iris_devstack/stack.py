"""Start, watch and stop the local IRIS DRS stack: SeaweedFS (S3), the compute server and the
Airflow components, under a supervisor.

``start`` migrates the DB and starts one supervisor process (:mod:`iris_devstack.services.supervisor`)
which starts every component - each its own process, in its own session and (when cgroup v2 is
writable) its own cgroup leaf, PID recorded in ``<state>/pids/<name>.json``, output in
``<state>/logs/<name>.log`` - restarts the ones that die (exponential backoff; gives up after
repeated fast crashes) and, as child subreaper, adopts their orphans. ``start`` on a half-up
stack repairs it. ``airflow standalone`` is deliberately not used: it leaves its children
behind on SIGTERM. Stopping works from any process (``make stop`` in another shell): the
supervisor stops the components in phases and kills what they left; then a sweep over the
stack's cgroup, the PIDs the supervisor tracked and the ``IRIS_STACK_ID`` marker removes
anything else (:mod:`iris_devstack.services.proctrack`). docs/operations.md describes the
supervision, the process tracking and the security model.

Layout under the state directory (``IRIS_STATE_DIR``, default ``<repo>/var``)::

    stack.json        ports, database URL, auth mode, stack id (what `status`/`stop` read)
    secrets.json      API secret, admin password, S3 keys (mode 0600; shown nowhere)
    pids/ logs/       one file per component (and the supervisor)
    run/              supervisor.json (its view), tracked.json (PIDs), seaweedfs.ready
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

from iris_tasks.config import default_state_dir as config_default_state_dir
from iris_tasks.config import is_off
from iris_tasks.orchestration.compute import ENV_COMPUTE_SOCKET

from .services import proctrack

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
AIRFLOW_COMPONENTS = ("scheduler", "dag-processor", "triggerer", "api-server")
ALL_COMPONENTS = ("seaweedfs", "compute", *AIRFLOW_COMPONENTS)
SUPERVISOR = "supervisor"  # iris_devstack.services.supervisor: starts, watches, restarts the rest
MARKER = "IRIS_STACK_ID"
ADMIN_USER = "admin"
S3_BUCKETS = ("iris-drs",)


class StackError(RuntimeError):
    """The stack could not be started, reached or stopped."""


def default_state_dir() -> Path:
    """The project's one default (:func:`iris_tasks.config.default_state_dir`)."""
    return config_default_state_dir()


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
    # Additional processes the supervisor runs and restarts like the components, by name
    # (e.g. a site's landing-area sync). They are stopped in the first phase.
    extra: dict[str, list[str]] = field(default_factory=dict)
    # Environment variables set last, over the stack's own (an A/B of an Airflow option, a
    # bench's own DAG folder); every component and client of the stack gets them.
    env_overrides: dict[str, str] = field(default_factory=dict)

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
        self.run_dir = self.state_dir / "run"
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
        extra: Mapping[str, list[str]] | None = None,
        env_overrides: Mapping[str, str] | None = None,
    ) -> StackConfig:
        """Decide ports/DB/auth/store for a new start (the stack must not be running)."""
        if self.running_components() or self.supervisor_process():
            raise StackError(f"stack under {self.state_dir} is already running; stop it first")
        if auth not in ("password", "open"):
            raise StackError(f"auth must be 'password' or 'open', not {auth!r}")
        for d in (self.pids_dir, self.logs_dir, self.airflow_home, self.run_dir):
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
            extra={k: list(v) for k, v in (extra or {}).items()},
            env_overrides={k: str(v) for k, v in (env_overrides or {}).items()},
        )
        clash = set(cfg.extra) & {*ALL_COMPONENTS, SUPERVISOR}
        if clash:
            raise StackError(f"extra component names clash with the stack's: {sorted(clash)}")
        self.config_path.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        self._ensure_secrets()
        return cfg

    def config(self) -> StackConfig:
        if not self.config_path.exists():
            raise StackError(f"no stack configured under {self.state_dir} (run start first)")
        data = json.loads(self.config_path.read_text())
        return StackConfig(**data)

    def _ensure_secrets(self) -> dict[str, str]:
        """The stack's secrets (``secrets.json``, mode 0600), created or completed on demand:
        the API secret, the admin password and the S3 keys, all generated per stack."""
        from .services.seaweedfs import new_access_key, new_secret_key

        data: dict[str, str] = {}
        if self.secrets_path.exists():
            try:
                data = json.loads(self.secrets_path.read_text())
            except ValueError as exc:
                raise StackError(f"{self.secrets_path}: not valid JSON ({exc})") from exc
        wanted = {
            "api_secret_key": lambda: secrets.token_urlsafe(32),
            "admin_password": lambda: secrets.token_urlsafe(12),
            "s3_access_key": new_access_key,
            "s3_secret_key": new_secret_key,
        }
        missing = [k for k in wanted if not data.get(k)]
        if missing:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            data.update({k: wanted[k]() for k in missing})
            _write_private(self.secrets_path, json.dumps(data, indent=2) + "\n")
        elif self.secrets_path.stat().st_mode & 0o077:
            self.secrets_path.chmod(0o600)  # an older stack left it readable
        return data

    def admin_password(self) -> str | None:
        return None if self.config().auth == "open" else self._ensure_secrets()["admin_password"]

    def secret_values(self) -> dict[str, str]:
        """Every secret of this stack by name (secrets.json plus Airflow's JWT secret and
        Fernet key files): what must never appear in logs, stack.json or printed output."""
        out = dict(self._ensure_secrets())
        for name in ("jwt_secret", "fernet_key"):
            with contextlib.suppress(OSError):
                out[name] = (self.airflow_home / name).read_text().strip()
        return {k: v for k, v in out.items() if v}

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment of every component (and of anything that talks to this stack): the
        project's Airflow environment (iris_devstack.airflow_env) plus what the stack decides.
        ``base`` (default ``os.environ``) is what it extends; ``{}`` gives only our variables."""
        from .airflow_env import airflow_env

        base = os.environ if base is None else base
        cfg = self.config()
        sec = self._ensure_secrets()
        s3 = seaweed_endpoint(self.state_dir, cfg.s3_port, sec)
        env = airflow_env(
            self.state_dir,
            sql_alchemy_conn=cfg.db_url,
            s3=s3,
            api_port=cfg.api_port,
            parallelism=cfg.parallelism,
            store_url=cfg.store_url,
            base=base,
        )
        env.update(s3.env())  # AWS_* so plain boto3 (CLI, demo, bench) reaches the same server
        pw_file = self.airflow_home / "simple_auth_manager_passwords.json"
        env.update(
            {
                MARKER: cfg.stack_id,
                "IRIS_STACK_STATE": str(self.state_dir),
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
                # A killed scheduler's task instances must not wait 5 min (the defaults) for
                # the restarted one: a scheduler job without a heartbeat for 20 s is dead, its
                # queued/running TIs are reset and run again at the next orphan check (every
                # 15 s, and at scheduler start); a task process that stopped heartbeating
                # (every 5 s, from its supervisor process, so long computations do not
                # delay it) for 60 s is failed.
                "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "20",
                "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "15",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
                "IRIS_AIRFLOW_URL": cfg.api_url,
                ENV_COMPUTE_SOCKET: self.compute_socket(base),
            }
        )
        if cfg.auth == "password":
            # The simple auth manager reads {"user": "password"} from this file; writing it
            # ourselves gives a known password instead of one printed once into a log.
            _write_private(pw_file, json.dumps({ADMIN_USER: sec["admin_password"]}) + "\n")
        env.update(cfg.env_overrides)
        return env

    def compute_socket(self, env: Mapping[str, str]) -> str:
        """The compute server's socket: ``$IRIS_COMPUTE_SOCKET`` as given (``off`` runs the
        stack without it), else ``<state>/run/compute.sock``, or a short path under the temp
        directory when that is longer than a Unix socket path may be."""
        from iris_tasks.orchestration.compute import MAX_SOCKET_PATH

        given = env.get(ENV_COMPUTE_SOCKET)
        if given is not None:
            return given
        path = self.state_dir / "run" / "compute.sock"
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            path = Path(tempfile.gettempdir()) / f"iris-compute-{self.config().stack_id[:12]}.sock"
        return str(path)

    def compute_enabled(self, env: Mapping[str, str]) -> bool:
        value = env.get(ENV_COMPUTE_SOCKET, "")
        return bool(value.strip()) and not is_off(value)

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
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
            return None

    def component_names(self) -> list[str]:
        """The stack's components, ALL_COMPONENTS plus the configured extra ones."""
        try:
            extra = list(self.config().extra)
        except (StackError, OSError, ValueError, TypeError):
            extra = []
        return [*ALL_COMPONENTS, *extra]

    def running_components(self) -> list[str]:
        return [n for n in self.component_names() if self._process(n) is not None]

    def supervisor_process(self) -> psutil.Process | None:
        return self._process(SUPERVISOR)

    def supervisor_status(self) -> dict[str, Any]:
        """The supervisor's last report (``run/supervisor.json``), {} when there is none."""
        try:
            return json.loads((self.run_dir / "supervisor.json").read_text())
        except (OSError, ValueError):
            return {}

    def stack_cgroup(self) -> Path | None:
        rec = self._record(SUPERVISOR) or {}
        cg = rec.get("cgroup") or self.supervisor_status().get("cgroup")
        return Path(cg).parent if cg and Path(cg).name == SUPERVISOR else (Path(cg) if cg else None)

    def component_argv(self, name: str, cfg: StackConfig, env: Mapping[str, str]) -> list[str]:
        """The command line of one component."""
        airflow = [sys.executable, "-m", "airflow"]
        argvs = {
            "seaweedfs": self._seaweed_argv(cfg),
            "compute": [sys.executable, "-m", "iris_tasks.orchestration.compute",
                        "--socket", env.get(ENV_COMPUTE_SOCKET, "")],
            "scheduler": [*airflow, "scheduler", "--skip-serve-logs"],
            "dag-processor": [*airflow, "dag-processor"],
            "triggerer": [*airflow, "triggerer", "--skip-serve-logs"],
            "api-server": [*airflow, "api-server", "--host", "127.0.0.1", "--port", str(cfg.api_port)],
        }
        argvs.update(cfg.extra)
        if name not in argvs:
            raise StackError(f"unknown component {name!r} (known: {', '.join(argvs)})")
        return argvs[name]

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str],
              cgroup: Path | None = None, reap_in_thread: bool = True) -> psutil.Process:
        """Start one component detached in its own session (and in ``cgroup`` when given);
        record PID, PGID, start time. ``reap_in_thread=False`` when the caller reaps its
        children itself (the supervisor)."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            os.chmod(log_path, 0o600)
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
                preexec_fn=proctrack.join_cgroup_preexec(cgroup),
            )
        proc = psutil.Process(popen.pid)
        rec = {
            "name": name,
            "pid": popen.pid,
            "pgid": popen.pid,
            "create_time": proc.create_time(),
            "argv": argv,
            "log": str(log_path),
            "cgroup": str(cgroup) if cgroup else None,
        }
        proctrack.write_json_atomic(self._pid_path(name), rec)
        if reap_in_thread:
            # The Popen object is dropped on purpose: the component must outlive this process
            # when `serve` hands over to `stop`. Reap it if we are still its parent when it exits.
            _detach_reaper(popen)
        else:
            self._children = getattr(self, "_children", {})
            self._children[name] = popen  # no Popen.__del__ bookkeeping while it runs
        log.info("started %s pid=%d (log %s)", name, popen.pid, log_path)
        return proc

    def start(
        self,
        components: Iterable[str] = ALL_COMPONENTS,
        timeout: float = 180.0,
        **configure: Any,
    ) -> StackConfig:
        """Configure, migrate the DB, start the supervisor (which starts the components) and
        wait until they are healthy.

        On a stack that is up or half up (a component or the supervisor died) this repairs it
        instead: the existing configuration is kept, a dead supervisor is started again (it
        adopts the running components and starts the missing ones), components it gave up on
        get a new attempt."""
        components = list(components)
        if self.config_path.exists() and (self.running_components() or self.supervisor_process()):
            return self._repair(components, timeout, configure)
        cfg = self.configure(**configure)
        env = self.env()
        if "compute" in components and not self.compute_enabled(env):
            components.remove("compute")
        try:
            if any(c in AIRFLOW_COMPONENTS for c in components):
                self.migrate(env)
            self._spawn_supervisor(components, env)
            self.wait_healthy(components, timeout=timeout)
        except BaseException:
            log.error("start failed; stopping what was started (logs in %s)", self.logs_dir)
            self.stop()
            raise
        return cfg

    def _repair(self, components: list[str], timeout: float, configure: Mapping[str, Any]) -> StackConfig:
        cfg = self.config()
        given = {k: v for k, v in configure.items() if v not in (None, "password", 4)}
        if given:
            log.warning("stack under %s is already configured; keeping its configuration "
                        "(ignored: %s)", self.state_dir, ", ".join(sorted(given)))
        env = self.env()
        sup = self.supervisor_process()
        status = self.supervisor_status()
        known = list((status.get("components") or {}).keys())
        if sup is None:
            # Components of the earlier start (as recorded) plus those asked for now.
            wanted = [c for c in self.component_names() if c in set(known) | set(components)
                      or self._record(c) is not None]
            if "compute" in wanted and not self.compute_enabled(env):
                wanted.remove("compute")
            log.warning("stack half up (supervisor gone; running: %s); repairing",
                        ", ".join(self.running_components()) or "nothing")
            self._spawn_supervisor(wanted, env)
            components = wanted
        else:
            components = known or components
            failed = [n for n, c in (status.get("components") or {}).items() if c.get("state") == "failed"]
            if failed:
                log.warning("asking the supervisor for a new attempt at %s", ", ".join(failed))
                asked = time.time()
                retry = self.run_dir / "supervisor.retry"
                retry.touch()
                # Wait until the supervisor took it (else its old report says "failed" still).
                end = time.monotonic() + 15
                while time.monotonic() < end and (
                        retry.exists() or self.supervisor_status().get("updated_at", 0) <= asked):
                    time.sleep(0.2)
        self.wait_healthy(components, timeout=timeout)
        return cfg

    def _spawn_supervisor(self, components: list[str], env: Mapping[str, str]) -> psutil.Process:
        cfg = self.config()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "supervisor.json").unlink(missing_ok=True)
        (self.run_dir / "supervisor.retry").unlink(missing_ok=True)
        use_cgroup = not is_off(os.environ.get("IRIS_STACK_CGROUP", "auto"))
        cg = proctrack.create_stack_cgroup(cfg.stack_id) if use_cgroup else None
        leaf = proctrack.leaf(cg, SUPERVISOR)
        argv = [sys.executable, "-m", "iris_devstack.stack", "--state-dir", str(self.state_dir),
                "_supervise", "--components", ",".join(components)]
        proc = self.spawn(SUPERVISOR, argv, env, cgroup=leaf)
        # Until its first report the supervisor has neither adopted nor started anything; a
        # status read before that would describe the previous supervisor's world.
        status = self.run_dir / "supervisor.json"
        end = time.monotonic() + 60
        while not status.exists():
            if not _alive(proc) or time.monotonic() > end:
                raise StackError("the supervisor did not start; see "
                                 f"{self.logs_dir / 'supervisor.log'}")
            time.sleep(0.1)
        return proc

    def migrate(self, env: Mapping[str, str] | None = None) -> None:
        env = dict(env or self.env())
        t0 = time.monotonic()
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / "db-migrate.log"
        with open(log_path, "ab") as out:
            os.chmod(log_path, 0o600)
            proc = subprocess.run(
                [sys.executable, "-m", "airflow", "db", "migrate"],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                timeout=600, cwd=str(self.state_dir),
            )
        if proc.returncode != 0:
            raise StackError(f"airflow db migrate failed (exit {proc.returncode}); see {log_path}")
        log.info("airflow db migrate: %.1f s", time.monotonic() - t0)

    def _seaweed_argv(self, cfg: StackConfig) -> list[str]:
        # A small Python wrapper runs the storage helper's SeaweedS3 in the foreground (weed
        # isolated in its own network namespace, the S3 relay in the wrapper), exits when weed
        # dies (so the supervisor restarts both) and stops weed on SIGTERM.
        return [
            sys.executable, "-m", "iris_devstack.stack", "--state-dir", str(self.state_dir),
            "_seaweedfs", "--port", str(cfg.s3_port),
        ]

    # ------------------------------------------------------------------ health
    def health(self) -> dict[str, Any]:
        """What runs and whether it works, per component: ``pid``, ``alive``, ``healthy``,
        ``restarts``, ``state`` (the supervisor's: running / backoff / failed / stopped), plus
        the api-server's own /api/v2/monitor/health report (``api``), ``s3`` (the S3 gateway
        answers through its port, not merely a listening socket) and ``compute``."""
        from .services.seaweedfs import s3_answers

        cfg = self.config()
        report: dict[str, Any] = {"components": {}, "api": None, "s3": False, "compute": False}
        try:
            report["api"] = _http_json(f"{cfg.api_url}/api/v2/monitor/health", timeout=5)
        except (OSError, ValueError, StackError):
            report["api"] = None
        report["s3"] = s3_answers("127.0.0.1", cfg.s3_port, timeout=3)
        rec = self._record("compute")
        if rec and self._process("compute"):
            argv = rec["argv"]
            report["compute"] = _unix_open(argv[argv.index("--socket") + 1])
        status = self.supervisor_status()
        sup_comps = status.get("components") or {}
        api = report["api"] or {}

        def healthy(name: str, alive: bool) -> bool:
            if not alive:
                return False
            if name == "seaweedfs":
                try:
                    ready = int((self.run_dir / "seaweedfs.ready").read_text())
                except (OSError, ValueError):
                    return False
                return report["s3"] and ready == (self._record(name) or {}).get("pid")
            if name == "compute":
                return report["compute"]
            if name == "api-server":
                return (api.get("metadatabase") or {}).get("status") == "healthy"
            if name in ("scheduler", "triggerer", "dag-processor"):
                return (api.get(name.replace("-", "_")) or {}).get("status") == "healthy"
            return True

        sup = self.supervisor_process()
        report["supervisor"] = {
            "pid": sup.pid if sup else None, "alive": sup is not None,
            "healthy": sup is not None and status.get("state") == "running",
            "subreaper": status.get("subreaper"), "cgroup": status.get("cgroup"),
        }
        for name in self.component_names():
            proc = self._process(name)
            sc = sup_comps.get(name) or {}
            if not proc and not sc:
                report["components"][name] = None  # not part of this stack
                continue
            state = sc.get("state") or ("running" if proc else "stopped")
            if proc is None and state == "running":
                state = "dead"  # the supervisor has not noticed yet (or is gone)
            report["components"][name] = {
                "pid": proc.pid if proc else None,
                "alive": proc is not None,
                "healthy": healthy(name, proc is not None),
                "restarts": sc.get("restarts", 0),
                "state": state,
                "last_exit": sc.get("last_exit"),
                "message": sc.get("message"),
            }
        return report

    def wait_healthy(self, components: Iterable[str] = ALL_COMPONENTS, timeout: float = 180.0) -> None:
        """Wait until every one of ``components`` is healthy. A component that dies meanwhile
        is restarted by the supervisor; it is an error when the supervisor is gone or gave up."""
        components = list(components)
        if "compute" in components and not self._record("compute") \
                and not self.compute_enabled(self.env()):
            components.remove("compute")  # started without it (IRIS_COMPUTE_SOCKET=off)
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.health()
            if not last["supervisor"]["alive"]:
                raise StackError(f"the supervisor exited; see {self.logs_dir / 'supervisor.log'}")
            comps = last["components"]
            failed = [c for c in components if (comps.get(c) or {}).get("state") == "failed"]
            if failed:
                detail = "; ".join(f"{c}: {comps[c].get('message')}" for c in failed)
                raise StackError(f"component(s) keep crashing: {detail}")
            if all((comps.get(c) or {}).get("healthy") for c in components):
                return
            time.sleep(1.0)
        raise StackError(f"stack not healthy after {timeout:.0f} s: {json.dumps(last)}")

    # ------------------------------------------------------------------ stop
    def stop(self, timeout: float = 30.0) -> list[int]:
        """Stop everything; returns the PIDs that had to be SIGKILLed. Safe when nothing runs.

        First the supervisor (SIGTERM): it stops restarting and runs the phased stop of the
        components itself (:meth:`stop_components`), then kills every remaining descendant -
        as child subreaper it has adopted the orphans, e.g. LocalExecutor workers of a killed
        scheduler - and everything in the components' cgroups. Then, whatever the supervisor
        did or did not do (it may have been killed): the phased stop again for recorded
        components still alive, and a sweep of everything of this stack that is left - the
        stack's cgroup, the PIDs the supervisor last tracked, processes with the stack's
        IRIS_STACK_ID marker: SIGTERM, 5 s, SIGKILL."""
        killed: list[int] = []
        sup = self.supervisor_process()
        if sup is not None:
            with contextlib.suppress(psutil.Error):
                sup.terminate()
            _, alive = psutil.wait_procs([sup], timeout=3 * timeout + 15)
            for p in alive:
                log.error("supervisor pid %d did not stop; killing it", p.pid)
                killed += _kill(p)
        killed += self.stop_components(timeout)
        stray = self.leftovers()
        if stray:
            log.warning("stopping %d leftover process(es) of the stack: %s", len(stray),
                        [p.pid for p in stray][:20])
            killed += proctrack.terminate_all(stray, 5.0)
        cg = self.stack_cgroup()
        if cg is not None:
            killed += [p for p in proctrack.cgroup_kill(cg) if p != os.getpid()]
            proctrack.remove_cgroup(cg)
        for name in (*self.component_names(), SUPERVISOR):
            self._pid_path(name).unlink(missing_ok=True)
        (self.run_dir / "tracked.json").unlink(missing_ok=True)
        return killed

    def stop_components(self, timeout: float = 30.0) -> list[int]:
        """The phased stop of the recorded components, because they depend on each other while
        they shut down: first the scheduler, triggerer and dag-processor (the LocalExecutor
        lets running tasks finish, and task processes report their end through the
        api-server's execution API), then the api-server and the compute server, then
        SeaweedFS (tasks upload to it). Each phase: SIGTERM the process groups, wait up to
        ``timeout``, SIGKILL what is left. Returns the PIDs SIGKILLed."""
        killed: list[int] = []
        first = ("scheduler", "triggerer", "dag-processor", *self.component_names()[len(ALL_COMPONENTS):])
        for phase in (first, ("api-server", "compute"), ("seaweedfs",)):
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
            for p in procs:  # descendants in process groups of their own (task processes)
                with contextlib.suppress(psutil.Error):
                    p.terminate()
            t0 = time.monotonic()
            names = {p.pid: _describe(p) for p in procs}
            slowest: list[tuple[float, int]] = []
            _, alive = psutil.wait_procs(
                procs, timeout=timeout,
                callback=lambda p, t0=t0, out=slowest: out.append((time.monotonic() - t0, p.pid)))
            # Named before they are killed: which process ignores SIGTERM is what a slow stop
            # needs to know.
            stuck = [names[p.pid] for p in alive]
            for p in alive:
                killed += _kill(p)
            if procs:
                last = max(slowest, default=None)
                log.info("stop phase %s: %.1f s%s%s", "/".join(phase), time.monotonic() - t0,
                         f" (last to exit after {last[0]:.1f} s: {names[last[1]]})" if last else "",
                         f"; {len(stuck)} SIGKILLed after {timeout:g} s: {stuck[:5]}" if stuck else "")
        return killed

    def leftovers(self) -> list[psutil.Process]:
        """Live processes of this stack (after `stop` this must be empty): the supervisor and
        the recorded components with their descendants, everything in the stack's cgroup, the
        PIDs the supervisor last tracked, and processes carrying the stack's marker."""
        found: dict[int, psutil.Process] = {}
        me = os.getpid()

        def add(p: psutil.Process | None) -> None:
            if p is None or p.pid == me or p.pid in found:
                return
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE:
                    found[p.pid] = p

        for name in (SUPERVISOR, *self.component_names()):
            proc = self._process(name)
            add(proc)
            if proc is not None:
                with contextlib.suppress(psutil.Error):
                    for c in proc.children(recursive=True):
                        add(c)
        for pid in proctrack.cgroup_pids(self.stack_cgroup()):
            with contextlib.suppress(psutil.Error):
                add(psutil.Process(pid))
        with contextlib.suppress(OSError, ValueError):
            entries = json.loads((self.run_dir / "tracked.json").read_text())
            for p in proctrack.from_snapshot(entries):
                add(p)
        for p in _marked_processes(self._stack_id()):
            add(p)
        return list(found.values())

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
def seaweed_endpoint(state_dir: Path, port: int, keys: Mapping[str, str]) -> Any:
    """A SeaweedS3 description of the stack's server (addresses and credentials only; the
    server itself runs in the `seaweedfs` component process). ``keys``: the stack's secrets
    (``s3_access_key``, ``s3_secret_key``)."""
    from .services.seaweedfs import SeaweedS3

    srv = SeaweedS3(state_dir / "seaweedfs", port=port, buckets=S3_BUCKETS,
                    access_key=keys["s3_access_key"], secret_key=keys["s3_secret_key"])
    srv.ports = {"s3": port}
    return srv


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (created 0600, never briefly readable; an
    existing file's mode is corrected too)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


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


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(p: psutil.Process) -> str:
    """``pid name: command line`` (shortened), or just the pid when it is gone."""
    try:
        return f"{p.pid} {p.name()}: {' '.join(p.cmdline())[:100]}"
    except psutil.Error:
        return str(p.pid)


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


# ---------------------------------------------------------------------- SeaweedFS wrapper
def _run_seaweedfs_foreground(state_dir: Path, port: int) -> int:
    """Run SeaweedFS until SIGTERM/SIGINT, then stop it through its own clean-up. Exits 1 when
    weed dies on its own, so that the supervisor restarts the component."""
    from .services.seaweedfs import SeaweedError, SeaweedS3

    stop = {"now": False}

    def _on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        stop["now"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    (state_dir / "seaweedfs").mkdir(parents=True, exist_ok=True)
    keys = Stack(state_dir)._ensure_secrets()
    server = SeaweedS3(state_dir / "seaweedfs", port=port, buckets=S3_BUCKETS,
                       access_key=keys["s3_access_key"], secret_key=keys["s3_secret_key"])
    ready = state_dir / "run" / "seaweedfs.ready"
    ready.unlink(missing_ok=True)
    try:
        server.start()
    except SeaweedError as exc:
        log.error("SeaweedFS did not start: %s", exc)
        return 1
    # S3 answers before the buckets exist; `healthy` means usable, so say when it is.
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.write_text(f"{os.getpid()}\n")
    log.info("SeaweedFS S3 on %s (%s)", server.endpoint_url,
             "isolated: only S3 is reachable" if server.isolated
             else "NOT isolated: internal ports reachable on loopback, JWT-protected")
    code = 0
    try:
        while not stop["now"]:
            if not server.is_running():
                code = server.proc.returncode if server.proc else 1
                log.error("weed exited (status %s); log tail:\n%s", code, server.log_tail(20))
                code = 1
                break
            time.sleep(0.5)
    finally:
        ready.unlink(missing_ok=True)
        server.stop()
    return code


# ---------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iris_devstack.stack", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", default=None, help="default: $IRIS_STATE_DIR or <repo>/var")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start", help="start SeaweedFS + Airflow and wait until healthy")
    add_start_options(p_start)
    sub.add_parser("stop", help="stop every component, no orphans")
    sub.add_parser("status", help="per component: pid, alive, healthy, restarts, state (JSON)")
    p_sw = sub.add_parser("_seaweedfs", help=argparse.SUPPRESS)
    p_sw.add_argument("--port", type=int, required=True)
    p_sup = sub.add_parser("_supervise", help=argparse.SUPPRESS)
    p_sup.add_argument("--components", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stack = Stack(args.state_dir)
    if args.cmd == "_seaweedfs":
        return _run_seaweedfs_foreground(stack.state_dir, args.port)
    if args.cmd == "_supervise":
        from .services.supervisor import Supervisor

        return Supervisor(stack, [c for c in args.components.split(",") if c]).run()
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
