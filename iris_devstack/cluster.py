"""A multi-host Celery cluster of the DRS on one machine: worker "hosts" in network namespaces.

``python -m iris_devstack cluster start|stop|status`` (``make cluster`` / ``make cluster-stop``)
runs the production topology (docs/cluster.md) on this machine, as root:

* **root namespace** - the Airflow scheduler, dag-processor, triggerer and api-server with the
  ``CeleryExecutor``, SeaweedFS (S3), a Redis broker of the cluster's own and a TCP relay, all
  under the stack's supervisor (:class:`iris_devstack.stack.Stack`, state in ``<state>/root``);
  PostgreSQL (the machine's, ``127.0.0.1:5432``) holds the Airflow metadata and, in schema
  ``iris_ledger`` of the same database, the frame ledger;
* **worker hosts** ``h1``, ``h2``, ... - each in its own network namespace on the cluster's
  bridge (:mod:`iris_devstack.netns`), its own mount namespace (its directory is bound at one
  common path, so every host sees *its own* state there, as every pod sees its own volume)
  and UTS namespace (hostname ``iris-<host>``); each runs a Celery worker and its own compute
  server, optionally pinned to one core. Hosts share nothing but the broker, the database and
  the object store; the landing area is the S3 prefix ``s3://iris-drs/landing/``.

The services of the root namespace listen on 127.0.0.1 only; the hosts reach them through the
bridge address, where the relay forwards the api-server (execution API), PostgreSQL and S3, and
where the broker itself listens. The broker is the cluster's own ``redis-server`` (append-only
file on, so queued tasks survive its restart) rather than the machine's shared Redis: the
tests restart it mid-night, which must not disturb anyone else.

Code: the cluster runs a *release*, a snapshot of ``iris_tasks``, ``readout_cy``, ``dags``,
``plugins`` and ``iris_devstack`` copied at start (``<state>/release``, and one copy per host),
as an image would be: editing the working tree does not change a running cluster. The
scheduler side publishes its deployment fingerprint (:mod:`iris_tasks.orchestration.deployment`)
as an Airflow Variable and every task checks its host's against it.

Layout under the state directory (default ``<repo>/var/cluster``)::

    cluster.json          what start decided (hosts, addresses, ports, database)
    release/              the code the root namespace runs
    root/                 the Stack's state (airflow home, logs, pids, seaweedfs, crds seed)
    hosts/<h>/release/    the host's code;  hosts/<h>/state/  its IRIS_STATE_DIR (work, crds, logs)
    mnt/                  the common mount point (empty outside the hosts)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .netns import ClusterNetwork, NetworkError, free_subnet
from .services import proctrack
from .stack import AIRFLOW_COMPONENTS, REPO_ROOT, Stack, StackError, free_port

log = logging.getLogger(__name__)

RELEASE_DIRS = ("iris_tasks", "readout_cy", "dags", "plugins", "iris_devstack")
PG_ADDRESS = ("127.0.0.1", 5432)
PG_USER = "postgres"
LEDGER_SCHEMA = "iris_ledger"
LANDING = "s3://iris-drs/landing"
REMOTE_LOGS = "s3://iris-drs/airflow-logs"
# Hosts share no disk: each keeps its own CRDS cache and follows this replica in the object
# store (iris_tasks.calib.replica); a context published anywhere is pushed there.
CRDS_REPLICA = "s3://iris-drs/crds?conn_id=iris_s3"
BROKER = "broker"
RELAY = "relay"
HOST_PREFIX = "host-"
READY_FILE = "host.json"


class ClusterError(StackError):
    """The cluster could not be started, reached or stopped; the message says what and where."""


def default_state_dir() -> Path:
    return Path(os.environ.get("IRIS_CLUSTER_STATE") or REPO_ROOT / "var" / "cluster")


@dataclass
class ClusterConfig:
    """What ``start`` decided (``cluster.json``)."""

    state_dir: str
    cluster_id: str
    db_name: str
    network: dict[str, Any]
    broker_port: int
    api_port: int
    s3_port: int
    concurrency: int = 2  # Celery task slots per host
    compute_slots: int = 1  # compute-server workers per host (and cores it is given)
    pin: bool = False  # each host on its own core (taskset)
    host_env: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def net(self) -> ClusterNetwork:
        return ClusterNetwork(**self.network)

    @property
    def db_url(self) -> str:
        return f"postgresql://{PG_USER}@{PG_ADDRESS[0]}:{PG_ADDRESS[1]}/{self.db_name}"


class Cluster:
    """The cluster under one state directory."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None):
        self.state_dir = Path(state_dir).resolve() if state_dir else default_state_dir().resolve()
        self.config_path = self.state_dir / "cluster.json"
        self.release_dir = self.state_dir / "release"
        self.hosts_dir = self.state_dir / "hosts"
        self.mount_point = self.state_dir / "mnt"
        self.stack = Stack(self.state_dir / "root")

    # ------------------------------------------------------------------ configuration
    def config(self) -> ClusterConfig:
        if not self.config_path.is_file():
            raise ClusterError(f"no cluster configured under {self.state_dir} (run start first)")
        return ClusterConfig(**json.loads(self.config_path.read_text()))

    def _save(self, cfg: ClusterConfig) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        os.replace(tmp, self.config_path)

    def host_dir(self, host: str) -> Path:
        return self.hosts_dir / host

    def host_state(self, host: str) -> Path:
        """The host's state directory as seen from the root namespace."""
        return self.host_dir(host) / "state"

    def root_env(self, cfg: ClusterConfig) -> dict[str, str]:
        """Overrides of the root namespace's Airflow environment (the Stack's ``env_overrides``)."""
        addr = cfg.net.service_address
        pythonpath = os.pathsep.join(p for p in (str(self.release_dir), os.environ.get("PYTHONPATH")) if p)
        return {
            "PYTHONPATH": pythonpath,
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.release_dir / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.release_dir / "plugins"),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://{addr}:{cfg.broker_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://{PG_USER}@{PG_ADDRESS[0]}:{PG_ADDRESS[1]}/{cfg.db_name}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(cfg.concurrency),
            # Task instances record socket.gethostname(): the host's UTS name (iris-h1, ...);
            # the default (getfqdn) would try DNS, which a host namespace cannot reach.
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "socket.gethostname",
            "AIRFLOW__LOGGING__REMOTE_LOGGING": "True",
            "AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER": REMOTE_LOGS,
            "AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID": "iris_s3",
            "AIRFLOW__LOGGING__DELETE_LOCAL_LOGS": "True",
            # A host that vanished: its running tasks stop heartbeating; after 30 s they are
            # failed and retried (on a host that is alive). A task whose broker message was
            # lost stays queued for at most 2 min before the scheduler queues it again.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "120",
            "IRIS_LEDGER_URL": f"{cfg.db_url}?schema={LEDGER_SCHEMA}",
            "IRIS_CRDS_STORE": CRDS_REPLICA,
            "IRIS_LANDING": LANDING,
            "IRIS_COMPUTE_SOCKET": "off",  # no compute server in the root namespace
            "IRIS_COMPUTE_SLOTS": str(cfg.compute_slots * len(cfg.net.hosts)),
        }

    def host_env(self, cfg: ClusterConfig, host: str) -> dict[str, str]:
        """The whole environment of one worker host's processes (what they see inside)."""
        net = cfg.net
        addr = net.service_address
        env = self.stack.env(base=os.environ)
        # The root's loopback services, as the host reaches them: through the bridge.
        for port in (cfg.api_port, cfg.s3_port, PG_ADDRESS[1]):
            for sep in (":", "%3A"):
                old, new = f"127.0.0.1{sep}{port}", f"{addr}{sep}{port}"
                env = {k: v.replace(old, new) for k, v in env.items()}
        mnt = self.mount_point
        state = mnt / "state"
        env.update({
            "PYTHONPATH": os.pathsep.join(p for p in (str(mnt / "release"), os.environ.get("PYTHONPATH")) if p),
            "AIRFLOW_HOME": str(state / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(mnt / "release" / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(mnt / "release" / "plugins"),
            "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "iris_tasks.orchestration.warm.CELERY_CONFIG",
            "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
                {"type": "file", "log_file_path": str(state / "lineage" / "ol")}),
            "IRIS_STATE_DIR": str(state),
            "IRIS_CRDS_PATH": str(state / "crds"),
            "IRIS_COMPUTE_SOCKET": str(state / "run" / "compute.sock"),
            "IRIS_COMPUTE_SLOTS": str(cfg.compute_slots),
            "IRIS_CLUSTER_HOST": host,
            "OMP_NUM_THREADS": str(cfg.compute_slots),
        })
        env.pop("IRIS_STACK_STATE", None)
        env.update(cfg.host_env.get(host, {}))
        return env

    # ------------------------------------------------------------------ start
    def start(self, hosts: int = 2, *, db_name: str | None = None, pin: bool = False,
              concurrency: int = 2, compute_slots: int = 1, timeout: float = 300.0,
              host_env: Mapping[str, Mapping[str, str]] | None = None) -> ClusterConfig:
        """Snapshot the release, create the network, start the root services and ``hosts``
        worker hosts, wait until all are up. On failure everything started is stopped."""
        if self.config_path.is_file() and (self.stack.supervisor_process() or self._host_processes()):
            raise ClusterError(f"a cluster under {self.state_dir} is running; stop it first")
        if os.geteuid() != 0:
            raise ClusterError("the cluster needs root (network namespaces, veth pairs, mounts)")
        redis = shutil.which("redis-server")
        if redis is None:
            raise ClusterError("redis-server not found (Debian: apt-get install redis-server)")
        self._check_postgres()
        if self.config_path.is_file():  # an earlier cluster here, not stopped: clear its remains
            left = self.stop()["removed"]
            if left:
                log.warning("removed what an earlier cluster left: %s", ", ".join(left))
            shutil.rmtree(self.hosts_dir, ignore_errors=True)
        for d in (self.state_dir, self.hosts_dir, self.mount_point):
            d.mkdir(parents=True, exist_ok=True)
        cid = uuid.uuid4().hex[:6]
        names = [f"h{i + 1}" for i in range(hosts)]
        net = ClusterNetwork(cid, free_subnet())
        cfg = ClusterConfig(
            state_dir=str(self.state_dir), cluster_id=cid, db_name=db_name or "iris_cluster",
            network=net.to_dict(), broker_port=0, api_port=free_port(8090), s3_port=0,
            concurrency=concurrency, compute_slots=compute_slots, pin=pin,
            host_env={k: dict(v) for k, v in (host_env or {}).items()})
        from .stack import s3_free_port

        cfg.s3_port = s3_free_port(8343)
        self._save(cfg)
        try:
            snapshot_release(REPO_ROOT, self.release_dir)
            net.create_bridge()
            for name in names:
                net.add_host(name)
            cfg.network = net.to_dict()
            cfg.broker_port = free_port(6390, host=net.service_address)
            self._save(cfg)
            self._start_root(cfg, redis, timeout)
            self.publish_fingerprint()
            for name in names:
                self.start_host(name)
            self.wait_hosts(names, timeout)
        except BaseException:
            log.error("cluster start failed; stopping what was started")
            self.stop()
            raise
        return cfg

    def _check_postgres(self) -> None:
        try:
            with socket.create_connection(PG_ADDRESS, timeout=5):
                pass
        except OSError as exc:
            raise ClusterError(f"PostgreSQL (metadata DB and ledger) unreachable at "
                               f"{PG_ADDRESS[0]}:{PG_ADDRESS[1]}: {exc}") from exc

    def _start_root(self, cfg: ClusterConfig, redis: str, timeout: float) -> None:
        net = cfg.net
        addr = net.service_address
        broker_dir = self.state_dir / "root" / "broker"
        broker_dir.mkdir(parents=True, exist_ok=True)
        broker = [redis, "--bind", addr, "--port", str(cfg.broker_port), "--dir", str(broker_dir),
                  "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                  "--protected-mode", "no", "--daemonize", "no"]
        relay = [sys.executable, "-m", "iris_devstack.netns", "relay", "--listen", addr,
                 *(a for port in (cfg.api_port, cfg.s3_port, PG_ADDRESS[1])
                   for a in ("--map", f"{port}:127.0.0.1:{port}"))]
        self.stack.start(
            components=["seaweedfs", *AIRFLOW_COMPONENTS, BROKER, RELAY],
            timeout=timeout, db_url=cfg.db_url, api_port=cfg.api_port, s3_port=cfg.s3_port,
            parallelism=cfg.concurrency * len(net.hosts),
            extra={BROKER: broker, RELAY: relay}, env_overrides=self.root_env(cfg))
        got = self.stack.config()
        if (got.api_port, got.s3_port) != (cfg.api_port, cfg.s3_port):
            raise ClusterError(f"ports taken meanwhile: api {cfg.api_port}->{got.api_port}, "
                               f"s3 {cfg.s3_port}->{got.s3_port}; start again")

    def publish_fingerprint(self) -> dict[str, Any]:
        """Publish the scheduler side's deployment fingerprint (its release, its configuration)
        as the Airflow Variable every task checks its host against."""
        from iris_tasks.orchestration.deployment import VARIABLE, fingerprint

        fp = fingerprint(self.stack.env(base={}), root=self.release_dir)
        body = {"key": VARIABLE, "value": json.dumps(fp),
                "description": "deployment fingerprint of the scheduler side (iris_devstack.cluster)"}
        try:
            self.stack.api("POST", "/variables", body)
        except StackError as exc:
            if "HTTP 409" not in str(exc):
                raise
            self.stack.api("PATCH", f"/variables/{VARIABLE}", body)
        log.info("published deployment fingerprint %s", fp["id"])
        return fp

    # ------------------------------------------------------------------ hosts
    def _host_name(self, host: str) -> str:
        return f"{HOST_PREFIX}{host}"

    def prepare_host(self, host: str, release: Path | None = None) -> None:
        """The host's own disk: its release (a copy of the cluster's unless given) and state
        directories. Its CRDS cache starts empty and follows the replica in the store."""
        hdir = self.host_dir(host)
        if release is not None or not (hdir / "release").is_dir():
            shutil.rmtree(hdir / "release", ignore_errors=True)
            shutil.copytree(release or self.release_dir, hdir / "release", symlinks=True)
        state = self.host_state(host)
        for sub in ("run", "logs", "work", "lineage", "airflow"):
            (state / sub).mkdir(parents=True, exist_ok=True)

    def sync_crds(self) -> dict:
        """Share the root's CRDS cache (where an operator publishes references) with the
        hosts: ``iris-drs calib sync`` into the replica the hosts follow (``CRDS_REPLICA``);
        each host pulls a new context before it picks one for a frame (within
        ``IRIS_CRDS_STORE_POLL`` s, at once when a run names it). Returns the command's
        report."""
        env = self.stack.env()
        out = subprocess.run([sys.executable, "-m", "iris_tasks.calib", "--cache",
                              env["IRIS_CRDS_PATH"], "sync"],
                             env=env, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise ClusterError(f"CRDS replica sync failed: {out.stderr.strip()[-800:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def host_argv(self, cfg: ClusterConfig, host: str) -> list[str]:
        """``ip netns exec`` + a private mount and UTS namespace, the host's directory bound
        at the common mount point, then the host runner (all exec: one PID)."""
        net = cfg.net
        inner = (f"mount --bind {shlex.quote(str(self.host_dir(host)))} "
                 f"{shlex.quote(str(self.mount_point))} && hostname iris-{host} && exec "
                 + shlex.join([sys.executable, "-m", "iris_devstack.cluster", "--state-dir",
                               str(self.state_dir), "_host", host]))
        argv = ["ip", "netns", "exec", net.namespace(host), "unshare", "--mount", "--uts",
                "--propagation", "private", "sh", "-c", inner]
        if cfg.pin:
            core = net.hosts.index(host) % (os.cpu_count() or 1)
            argv = ["taskset", "-c", str(core), *argv]
        return argv

    def start_host(self, host: str, release: Path | None = None,
                   restore_link: bool = True) -> psutil.Process:
        """Start (or restart) one worker host, with ``release`` as its code when given (else
        the code it had, or the cluster's); restores its link if it was cut, unless
        ``restore_link`` is False (to see the host refuse to start without its services)."""
        cfg = self.config()
        net = cfg.net
        if host not in net.hosts:
            raise ClusterError(f"no host {host!r} in the cluster (hosts: {', '.join(net.hosts)})")
        if self._host_process(host) is not None:
            raise ClusterError(f"host {host} is running")
        self.prepare_host(host, release)
        (self.host_state(host) / "run" / READY_FILE).unlink(missing_ok=True)
        if restore_link:
            net.set_link(host, True)
        cg = self.stack.stack_cgroup()
        leaf = proctrack.leaf(cg, self._host_name(host)) if cg else None
        return self.stack.spawn(self._host_name(host), self.host_argv(cfg, host),
                                self.host_env(cfg, host), cgroup=leaf)

    def wait_hosts(self, hosts: list[str], timeout: float = 180.0) -> None:
        end = time.monotonic() + timeout
        pending = list(hosts)
        while pending:
            for h in list(pending):
                state = self.host_status(h)
                if state.get("state") == "ready":
                    pending.remove(h)
                elif not state.get("alive"):
                    raise ClusterError(f"host {h} exited: {state.get('error') or 'see its log'} "
                                       f"({self.stack.logs_dir / (self._host_name(h) + '.log')})")
            if pending and time.monotonic() > end:
                raise ClusterError(f"hosts {pending} not ready after {timeout:.0f} s")
            time.sleep(0.5)

    def host_status(self, host: str) -> dict[str, Any]:
        proc = self._host_process(host)
        try:
            report = json.loads((self.host_state(host) / "run" / READY_FILE).read_text())
        except (OSError, ValueError):
            report = {}
        return {**report, "alive": proc is not None, "pid": proc.pid if proc else None}

    def _host_process(self, host: str) -> psutil.Process | None:
        return self.stack._process(self._host_name(host))

    def _host_processes(self) -> list[psutil.Process]:
        try:
            hosts = self.config().net.hosts
        except (ClusterError, OSError, ValueError, TypeError):
            return []
        return [p for p in (self._host_process(h) for h in hosts) if p is not None]

    def host_tree(self, host: str) -> list[psutil.Process]:
        """Every live process of a host: its cgroup leaf, else the host runner's descendants."""
        found: dict[int, psutil.Process] = {}
        cg = self.stack.stack_cgroup()
        for pid in proctrack.cgroup_pids(cg / self._host_name(host) if cg else None):
            with contextlib.suppress(psutil.Error):
                found[pid] = psutil.Process(pid)
        proc = self._host_process(host)
        if proc is not None:
            found[proc.pid] = proc
            with contextlib.suppress(psutil.Error):
                found.update({c.pid: c for c in proc.children(recursive=True)})
        return list(found.values())

    def kill_host(self, host: str, cut_link: bool = True) -> list[int]:
        """A host dies: SIGKILL all its processes at once, and cut its link to the bridge."""
        net = self.config().net
        if cut_link:
            net.set_link(host, False)
        procs = self.host_tree(host)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(procs, timeout=10)
        log.warning("host %s killed (%d processes)%s", host, len(procs), ", link cut" if cut_link else "")
        return [p.pid for p in procs]

    def stop_host(self, host: str, timeout: float = 20.0) -> list[int]:
        """Stop one host: SIGTERM its runner (which stops its worker and compute server), then
        SIGKILL whatever of it is left after ``timeout``."""
        return self.stop_hosts([host], timeout=timeout)

    def stop_hosts(self, hosts: Sequence[str], timeout: float = 20.0) -> list[int]:
        """:meth:`stop_host` for several hosts at once: every runner is told to stop first,
        then all are waited for together (each Celery worker's warm shutdown takes seconds;
        one after the other they add up). Returns the pids that had to be killed."""
        runners = [p for p in (self._host_process(h) for h in hosts) if p is not None]
        for proc in runners:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        psutil.wait_procs(runners, timeout=timeout)
        left = [p for h in hosts for p in self.host_tree(h)]
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=10)
        for h in hosts:
            self.stack._pid_path(self._host_name(h)).unlink(missing_ok=True)
        return [p.pid for p in left]

    # ------------------------------------------------------------------ stop / status
    def stop(self, purge: bool = False) -> dict[str, Any]:
        """Stop the hosts, the root services, remove the network; ``purge`` also drops the
        cluster's database. Returns what was killed and anything left (must be empty)."""
        report: dict[str, Any] = {"killed": [], "removed": []}
        try:
            cfg = self.config()
        except ClusterError:
            cfg = None
        if cfg is not None:
            report["killed"] += self.stop_hosts(cfg.net.hosts)
        with contextlib.suppress(StackError):
            report["killed"] += self.stack.stop()
        if cfg is not None:
            with contextlib.suppress(NetworkError):
                report["removed"] = cfg.net.destroy()
            if purge:
                drop_postgres_database(cfg.db_url)
        report["leftovers"] = self.leftovers()
        return report

    def leftovers(self) -> dict[str, list[Any]]:
        """Processes and network objects of this cluster still alive."""
        procs = {p.pid for p in self.stack.leftovers()}
        net: list[str] = []
        with contextlib.suppress(ClusterError):
            cfg = self.config()
            for h in cfg.net.hosts:
                procs.update(p.pid for p in self.host_tree(h))
            net = cfg.net.leftovers()
        return {"processes": sorted(procs), "network": net}

    def status(self) -> dict[str, Any]:
        cfg = self.config()
        net = cfg.net
        return {
            "state_dir": str(self.state_dir),
            "api": self.stack.config().api_url if self.stack.config_path.is_file() else None,
            "service_address": net.service_address,
            "broker": f"redis://{net.service_address}:{cfg.broker_port}/0",
            "database": cfg.db_url,
            "root": self.stack.health() if self.stack.config_path.is_file() else None,
            "hosts": {h: {**self.host_status(h), "address": net.address(h),
                          "namespace": net.namespace(h)} for h in net.hosts},
        }


# ---------------------------------------------------------------------- helpers
def snapshot_release(repo: Path, dest: Path) -> None:
    """Copy the code the cluster runs (``RELEASE_DIRS``; compiled extensions included, caches
    and build trees not) to ``dest``, replacing an older snapshot."""
    shutil.rmtree(dest, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.c", "*.o")
    for sub in RELEASE_DIRS:
        shutil.copytree(repo / sub, dest / sub, ignore=ignore, symlinks=True)


def drop_postgres_database(db_url: str) -> None:
    import urllib.parse

    import psycopg
    from psycopg import sql

    parts = urllib.parse.urlsplit(db_url)
    dbname = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
    log.info("dropped PostgreSQL database %s", dbname)


# ---------------------------------------------------------------------- inside a host
def preflight(cfg: ClusterConfig) -> None:
    """Every shared service answers at the address this host was given; else a clear error
    naming the service and the address."""
    from .services.seaweedfs import s3_answers

    addr = cfg.net.service_address
    checks = [("broker (Redis)", cfg.broker_port), ("metadata DB and ledger (PostgreSQL)", PG_ADDRESS[1]),
              ("Airflow execution API (api-server)", cfg.api_port), ("object store (S3)", cfg.s3_port)]
    problems = []
    for service, port in checks:
        try:
            with socket.create_connection((addr, port), timeout=3):
                pass
        except OSError as exc:
            problems.append(f"{service} unreachable at {addr}:{port}: {exc}")
            continue
        if port == cfg.s3_port and not s3_answers(addr, port, timeout=5):
            problems.append(f"{service} at {addr}:{port} accepts connections but does not answer S3")
    if problems:
        raise ClusterError("; ".join(problems))


def run_host(cluster: Cluster, host: str) -> int:
    """The host runner, inside the host's namespaces: check the services, start the compute
    server and the Celery worker, report ready, and stop both on SIGTERM."""
    from iris_tasks.orchestration.compute.server import wait_ready

    cfg = cluster.config()
    state = Path(os.environ["IRIS_STATE_DIR"])
    ready = state / "run" / READY_FILE

    def report(**fields: Any) -> None:
        ready.write_text(json.dumps({"host": host, "hostname": socket.gethostname(),
                                     "runner_pid": os.getpid(), **fields}) + "\n")

    try:
        preflight(cfg)
    except ClusterError as exc:
        log.error("host %s: %s", host, exc)
        report(state="failed", error=str(exc))
        return 2
    stop = {"now": False}

    def on_term(signum: int, frame: Any) -> None:  # noqa: ARG001 - handler signature
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    logs = state / "logs"
    sock = os.environ["IRIS_COMPUTE_SOCKET"]
    children: dict[str, subprocess.Popen] = {}

    def spawn(name: str, argv: list[str]) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child's stdout for its life
        children[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, cwd=str(state))
        return children[name]

    code = 0
    try:
        compute = spawn("compute", [sys.executable, "-m", "iris_tasks.orchestration.compute",
                                    "--socket", sock, "--workers", str(cfg.compute_slots)])
        wait_ready(sock, timeout=120, process=compute)
        celery_log = logs / "celery.log"
        start_at = celery_log.stat().st_size if celery_log.exists() else 0
        worker = spawn("celery", [sys.executable, "-m", "airflow", "celery", "worker",
                                  "--concurrency", str(cfg.concurrency),
                                  "--celery-hostname", f"{host}@iris-{host}",
                                  "--skip-serve-logs", "--without-mingle", "--without-gossip"])
        report(state="starting")
        while not stop["now"]:
            with open(celery_log, "rb") as fh:
                fh.seek(start_at)
                if b" ready." in fh.read():
                    break
            if worker.poll() is not None:
                raise ClusterError(f"celery worker exited with {worker.returncode}; see {celery_log}")
            time.sleep(0.3)
        report(state="ready", worker_pid=worker.pid, compute_pid=compute.pid)
        log.info("host %s ready (hostname %s)", host, socket.gethostname())
        while not stop["now"]:
            dead = [n for n, p in children.items() if p.poll() is not None]
            if dead:
                log.error("host %s: %s exited (%s); stopping the host", host, dead[0],
                          children[dead[0]].returncode)
                code = 1
                break
            time.sleep(0.5)
    except Exception as exc:  # noqa: BLE001 - reported, then the host stops
        log.error("host %s: %s", host, exc)
        report(state="failed", error=str(exc))
        code = 1
    finally:
        for p in children.values():
            with contextlib.suppress(OSError):
                p.terminate()  # celery: warm shutdown (running tasks finish), compute: stop
        end = time.monotonic() + 15
        for p in children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, end - time.monotonic()))
        for p in children.values():
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.kill()
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                p.kill()
        if code == 0 and stop["now"]:
            report(state="stopped")
    return code


# ---------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iris_devstack cluster",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", default=None, help="default: $IRIS_CLUSTER_STATE or <repo>/var/cluster")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start", help="start the root services and the worker hosts")
    p_start.add_argument("--hosts", type=int, default=2, help="worker hosts (default 2)")
    p_start.add_argument("--db", default="iris_cluster", help="PostgreSQL database (created if missing)")
    p_start.add_argument("--pin", action="store_true", help="pin each host to its own core (taskset)")
    p_start.add_argument("--concurrency", type=int, default=2, help="Celery task slots per host")
    p_stop = sub.add_parser("stop", help="stop everything; no process, namespace or link left")
    p_stop.add_argument("--purge", action="store_true", help="also drop the cluster's database")
    sub.add_parser("status", help="root components and hosts (JSON)")
    p_host = sub.add_parser("_host", help=argparse.SUPPRESS)
    p_host.add_argument("host")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cluster = Cluster(args.state_dir)
    try:
        if args.cmd == "_host":
            return run_host(cluster, args.host)
        if args.cmd == "start":
            cluster.start(args.hosts, db_name=args.db, pin=args.pin, concurrency=args.concurrency)
            st = cluster.status()
            print(f"cluster up: Airflow UI {st['api']}/ (user admin, password in "
                  f"{cluster.stack.secrets_path}); hosts "
                  + ", ".join(f"{h} {v['address']}" for h, v in st["hosts"].items())
                  + f"; broker {st['broker']}; state {cluster.state_dir}")
            return 0
        if args.cmd == "stop":
            report = cluster.stop(purge=args.purge)
            left = report["leftovers"]
            print(f"stopped (SIGKILLed {len(report['killed'])}; removed {len(report['removed'])} "
                  f"network objects); leftovers: {left}")
            return 1 if left["processes"] or left["network"] else 0
        print(json.dumps(cluster.status(), indent=2, default=str))
        return 0
    except (StackError, NetworkError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
