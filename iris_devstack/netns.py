"""The local cluster's network: worker "hosts" in Linux network namespaces on a bridge.

:class:`ClusterNetwork` creates (as root, with ``ip``) one bridge in the root namespace with
the cluster's service address (``10.77.<n>.1/24``, ``<n>`` chosen so that no existing route
clashes) and, per worker host, a network namespace joined to the bridge by a veth pair, with
its own address (``10.77.<n>.<10 + i>``). A host reaches nothing but that subnet: its services
(broker, metadata DB and ledger, object store, Airflow's execution API) are the addresses the
cluster set up on the bridge. Names carry a short cluster id (``irbr-<id>``, ``irv-<id>-<i>``,
``iris-<id>-<host>``), so that :meth:`ClusterNetwork.leftovers` finds exactly what this
cluster made and a second cluster on the machine does not collide.

The services of the root namespace listen on 127.0.0.1 only; :class:`TcpRelay` (one process,
``python -m iris_devstack.netns relay``) relays ``bridge:port`` to ``127.0.0.1:port`` for those
the workers need, byte for byte (zero-copy ``splice``, as the S3 relay of
:mod:`iris_devstack.services.seaweedfs`, whose relay it extends).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field

from .services.seaweedfs import S3Relay

log = logging.getLogger(__name__)

SUBNET_BASE = "10.77"
HOST_OFFSET = 10  # host i (0-based) gets 10.77.<n>.<10 + i>


class NetworkError(RuntimeError):
    """The cluster network could not be created, changed or removed; says which command."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; a failure raises :class:`NetworkError` with the command and its error."""
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise NetworkError("the `ip` command (iproute2) is not installed") from exc
    if check and proc.returncode != 0:
        raise NetworkError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}"
                           " (the cluster's network needs root: CAP_NET_ADMIN)")
    return proc


def _used_subnets() -> set[str]:
    out = ip("-j", "addr", check=False).stdout or "[]"
    used = set()
    for link in json.loads(out):
        for a in link.get("addr_info", []):
            if a.get("family") == "inet":
                used.add(str(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network))
    return used


def free_subnet() -> int:
    """The first ``n`` whose ``10.77.<n>.0/24`` no interface of the machine uses."""
    used = _used_subnets()
    for n in range(1, 255):
        net = ipaddress.ip_network(f"{SUBNET_BASE}.{n}.0/24")
        if not any(net.overlaps(ipaddress.ip_network(u)) for u in used):
            return n
    raise NetworkError(f"no free /24 under {SUBNET_BASE}.0.0/16")


@dataclass
class ClusterNetwork:
    """The bridge and the worker hosts' namespaces of one cluster (persisted in its config)."""

    cluster_id: str  # short id in every name (4-6 characters: interface names have <= 15)
    subnet: int  # n in 10.77.<n>.0/24
    hosts: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"irbr-{self.cluster_id}"

    @property
    def service_address(self) -> str:
        """The root namespace's address on the bridge: where the workers find every service."""
        return f"{SUBNET_BASE}.{self.subnet}.1"

    def namespace(self, host: str) -> str:
        return f"iris-{self.cluster_id}-{host}"

    def veth(self, host: str) -> str:
        """The root-namespace end of the host's link (the other end is ``eth0`` inside)."""
        return f"irv-{self.cluster_id}-{self.hosts.index(host)}"

    def address(self, host: str) -> str:
        return f"{SUBNET_BASE}.{self.subnet}.{HOST_OFFSET + self.hosts.index(host)}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    # -- create / remove -------------------------------------------------------------------
    def create_bridge(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.service_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        log.info("bridge %s with %s/24", self.bridge, self.service_address)

    def add_host(self, host: str) -> None:
        """Namespace + veth pair + addresses for ``host`` (appended to :attr:`hosts`)."""
        if host in self.hosts:
            raise NetworkError(f"host {host!r} exists already in cluster {self.cluster_id}")
        self.hosts.append(host)
        ns, veth, peer = self.namespace(host), self.veth(host), f"irp-{self.cluster_id}-{self.hosts.index(host)}"
        ip("netns", "add", ns)
        ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", ns)
        ip("-n", ns, "link", "set", peer, "name", "eth0")
        ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("link", "set", veth, "master", self.bridge, "up")
        log.info("host %s: namespace %s, %s via %s", host, ns, self.address(host), veth)

    def set_link(self, host: str, up: bool) -> None:
        """Cut (``up=False``) or restore the host's link to the bridge."""
        ip("link", "set", self.veth(host), "up" if up else "down")
        log.warning("host %s: link %s %s", host, self.veth(host), "restored" if up else "cut")

    def destroy(self) -> list[str]:
        """Remove every namespace, veth and the bridge of this cluster (what exists of them);
        returns what was removed. Deleting a namespace removes its end of the veth pair and
        with it the pair."""
        removed = []
        for name in self.leftover_namespaces():
            if ip("netns", "del", name, check=False).returncode == 0:
                removed.append(f"netns {name}")
        for name in self.leftover_links():
            if ip("link", "del", name, check=False).returncode == 0:
                removed.append(f"link {name}")
        return removed

    def leftover_namespaces(self) -> list[str]:
        out = ip("netns", "list", check=False).stdout
        return [line.split()[0] for line in out.splitlines()
                if line.split() and line.split()[0].startswith(f"iris-{self.cluster_id}-")]

    def leftover_links(self) -> list[str]:
        out = json.loads(ip("-j", "link", check=False).stdout or "[]")
        mine = (f"irv-{self.cluster_id}-", f"irp-{self.cluster_id}-", self.bridge)
        # veths first, the bridge last
        names = [link["ifname"] for link in out if link["ifname"].startswith(mine)]
        return sorted(names, key=lambda n: n == self.bridge)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this cluster that still exist (empty after a stop)."""
        return [*(f"netns {n}" for n in self.leftover_namespaces()),
                *(f"link {n}" for n in self.leftover_links())]


# -------------------------------------------------------------------------- the TCP relay
class TcpRelay(S3Relay):
    """Relay TCP ``host:port`` to ``target_host:target_port`` (a service bound to loopback)."""

    def __init__(self, host: str, port: int, target_host: str, target_port: int):
        self.target_addr = (target_host, target_port)
        super().__init__(host, port, f"{target_host}:{target_port}")

    def _open_upstream(self) -> socket.socket:
        upstream = socket.create_connection(self.target_addr, timeout=5)
        upstream.settimeout(None)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return upstream


def run_relays(listen: str, mappings: list[tuple[int, str, int]]) -> int:
    """Relay ``listen:port`` -> ``target:tport`` for each mapping until SIGTERM/SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    relays = [TcpRelay(listen, port, thost, tport) for port, thost, tport in mappings]
    log.info("relaying %s", ", ".join(f"{listen}:{p} -> {h}:{t}" for p, h, t in mappings))
    stop.wait()
    for relay in relays:
        with contextlib.suppress(Exception):
            relay.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m iris_devstack.netns relay --listen ADDR --map PORT:HOST:PORT ...``."""
    parser = argparse.ArgumentParser(prog="python -m iris_devstack.netns", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("relay", help="relay TCP ports of a bridge address to loopback services")
    p.add_argument("--listen", required=True, help="address to listen on (the bridge's)")
    p.add_argument("--map", action="append", default=[], metavar="PORT:HOST:PORT",
                   help="listen port, target host and port (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mappings = []
    for m in args.map:
        port, host, tport = m.split(":")
        mappings.append((int(port), host, int(tport)))
    return run_relays(args.listen, mappings)


if __name__ == "__main__":
    sys.exit(main())
