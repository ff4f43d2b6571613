"""Throughput and latency of the multi-host Celery cluster with 1 and 2 worker hosts, same run.

For each host count (default 1 then 2) a fresh cluster (:mod:`iris_devstack.cluster`, each host
pinned to its own core, one compute slot and two Celery slots per host) gets the same burst of
``--frames`` frames (imager and IFS alternating, ``--size``^2, variants that differ in
EXP_NO) uploaded to its S3 landing prefix at once, and the bench waits until all are done.
It prints per host count:

* throughput: frames / (last ingested - first landed), in frames per minute;
* landing-to-ingested p50/p95 per mode (under this backlog: queueing included);
* CPU per frame, per role (exact per process tree, ``stack_cpu.py``'s accounting, the idle
  cluster's cost measured first and subtracted): the worker hosts (Celery, task processes,
  compute server), the scheduler, api-server, dag-processor, triggerer, the broker and relay,
  the object store, and PostgreSQL (the machine's server: other users of it count too);
* the scaling from 1 to 2 hosts, and a machine-speed reference measured in the same run.

    .venv/bin/python bench/bench_cluster.py --size 2048 --frames 12
    .venv/bin/python bench/bench_cluster.py --size 4096 --frames 8 --hosts 1,2

Needs root, redis-server and PostgreSQL at 127.0.0.1:5432, like the cluster. Measures; no
assertions. The hosts' work areas are pruned of finished frames while it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench_latency import simulate_bases
from stack_cpu import _subtree, format_reference, machine_reference

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("imager", "ifs")
ROOT_ROLES = ("scheduler", "api-server", "dag-processor", "triggerer", "broker", "relay", "seaweedfs")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def postmaster() -> Any:
    """The machine's PostgreSQL server process (its backends are its children)."""
    import psutil

    found = [p for p in psutil.process_iter(["name", "ppid"])
             if p.info["name"] in ("postgres", "postmaster")]
    parents = [p for p in found if p.info["ppid"] not in {q.pid for q in found}]
    return parents[0] if parents else None


def cluster_cpu(cluster: Any, pg: Any) -> dict[str, float]:
    """CPU seconds so far: each root component, the worker hosts together, PostgreSQL."""
    out = {}
    for name in ROOT_ROLES:
        proc = cluster.stack._process(name)  # noqa: SLF001 - the bench reads the records
        out[name] = _subtree(proc) if proc is not None else 0.0
    out["worker hosts"] = sum(_subtree(p) for h in cluster.config().net.hosts
                              if (p := cluster._host_process(h)) is not None)  # noqa: SLF001
    out["postgresql"] = _subtree(pg) if pg is not None else 0.0
    return out


class Pruner:
    """Removes finished frames' work directories on every host (the bench's disk budget)."""

    def __init__(self, cluster: Any, ledger: Any):
        self.cluster, self.ledger = cluster, ledger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(5):
            with contextlib.suppress(Exception):
                done = [f["frame_id"] for f in self.ledger.frames() if f["status"] == "done"]
                for h in self.cluster.config().net.hosts:
                    for fid in done:
                        shutil.rmtree(self.cluster.host_state(h) / "work" / fid, ignore_errors=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def run_one(hosts: int, args: argparse.Namespace, bases: dict[str, list[Path]], refs: list[str],
            state: Path, serial: int) -> dict[str, Any]:
    from bench_latency import land_variant

    from iris_devstack.cluster import Cluster
    from iris_devstack.demo import unpause, wait_for_dags
    from iris_devstack.stack import seaweed_endpoint
    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.orchestration.ledger import FrameLedger

    cluster = Cluster(state / f"cluster-{hosts}")
    t0 = time.monotonic()
    cluster.start(hosts=hosts, db_name=f"iris_bench_{uuid.uuid4().hex[:8]}", pin=True)
    log(f"{hosts} host(s) up in {time.monotonic() - t0:.0f} s")
    result: dict[str, Any] = {"hosts": hosts}
    try:
        stack = cluster.stack
        env = stack.env()
        with temporary_cache(env["IRIS_CRDS_PATH"]) as calib:
            calib.publish_references(refs, "bench_cluster")
        cluster.sync_crds()
        wait_for_dags(stack, ["iris_realtime"], timeout=240)
        unpause(stack, ["iris_realtime"])
        ledger = FrameLedger(env["IRIS_LEDGER_URL"])
        s3 = seaweed_endpoint(stack.state_dir, stack.config().s3_port, stack._ensure_secrets()).client()
        pg = postmaster()
        staging = state / "staging"
        staging.mkdir(exist_ok=True)
        variants = []
        for i in range(args.frames):
            mode = MODES[i % 2]
            base = bases[mode][i // 2 % len(bases[mode])]
            name = land_variant(base, staging, serial + i)
            variants.append((mode, staging / name))
        idle0, ti0 = cluster_cpu(cluster, pg), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_rate = {k: (v - idle0[k]) / (time.monotonic() - ti0)
                     for k, v in cluster_cpu(cluster, pg).items()}
        pruner = Pruner(cluster, ledger)
        cpu0, start = cluster_cpu(cluster, pg), time.monotonic()
        for _, path in variants:
            s3.upload_file(str(path), "iris-drs", f"landing/{path.name}")
        log(f"landed {len(variants)} frames")
        names = {path.name: mode for mode, path in variants}
        deadline = time.monotonic() + args.timeout
        while True:
            frames = [f for f in ledger.frames() if f["filename"] in names]
            if len(frames) == len(names) and all(f["status"] in ("done", "failed", "quarantined")
                                                 for f in frames):
                break
            if time.monotonic() > deadline:
                log(f"timed out: {sum(f['status'] == 'done' for f in frames)}/{len(names)} done")
                break
            time.sleep(1)
        wall = time.monotonic() - start
        cpu = cluster_cpu(cluster, pg)
        pruner.stop()
        done = [f for f in frames if f["status"] == "done"]
        landed = min(f["landed_at"] for f in frames)
        finished = max(f["finished_at"] for f in done) if done else None
        from iris_tasks.orchestration.ledger import parse_time

        span = (parse_time(finished) - parse_time(landed)).total_seconds() if finished else wall
        result.update({
            "frames": len(names), "done": len(done), "span_s": span,
            "frames_per_min": 60.0 * len(done) / span if span else 0.0,
            "latency": {m: _pct([f["latency_seconds"] for f in done if names[f["filename"]] == m])
                        for m in MODES},
            "cpu_per_frame": {k: (cpu[k] - cpu0[k] - idle_rate[k] * wall) / max(1, len(done))
                              for k in cpu},
            "hosts_used": sorted({h for f in done for h in _hosts(ledger, f["frame_id"])}),
        })
        shutil.rmtree(staging, ignore_errors=True)
    finally:
        report = cluster.stop(purge=True)
        log(f"{hosts} host(s) stopped; leftovers {report['leftovers']}")
        shutil.rmtree(cluster.state_dir, ignore_errors=True)
    return result


def _hosts(ledger: Any, frame_id: str) -> set[str]:
    import json

    return {json.loads(s["detail"] or "{}").get("host") for s in ledger.stages(frame_id)} - {None}


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return {"p50": statistics.median(values), "p95": p95}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--frames", type=int, default=12, help="frames per host count (imager/IFS alternating)")
    ap.add_argument("--hosts", default="1,2", help="host counts to run, in order")
    ap.add_argument("--state", type=Path, default=REPO / "var" / "bench-cluster")
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args(argv)
    args.state.mkdir(parents=True, exist_ok=True)
    log(f"load average before: {os.getloadavg()}")
    reference = machine_reference()
    log(format_reference(reference))
    bases = simulate_bases(args.state / f"sim-{args.size}", args.size, distinct=2)
    refs = sorted(str(p) for p in (args.state / f"sim-{args.size}" / "references").glob("*.fits"))
    serial = int(time.time()) % 100000 * 100
    results = []
    for i, hosts in enumerate(int(h) for h in args.hosts.split(",")):
        results.append(run_one(hosts, args, bases, refs, args.state, serial + 1000 * i))
        _print(results[-1])
    print(f"\n=== summary: {args.size}x{args.size}, {args.frames} frames per run (imager/IFS "
          f"alternating, landed at once), {os.cpu_count()} cores, load average now {os.getloadavg()}")
    for r in results:
        _print(r)
    if len(results) > 1 and results[0]["frames_per_min"]:
        print(f"scaling {results[0]['hosts']} -> {results[-1]['hosts']} hosts: "
              f"{results[-1]['frames_per_min'] / results[0]['frames_per_min']:.2f}x throughput")
    print(format_reference(reference))
    return 0


def _print(r: dict[str, Any]) -> None:
    lat = "; ".join(f"{m} p50 {v['p50']:.1f} s p95 {v['p95']:.1f} s" for m, v in r["latency"].items()
                    if v["p50"] is not None)
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_per_frame"].items())
    overhead = sum(v for k, v in r["cpu_per_frame"].items() if k in (*ROOT_ROLES[:6], "postgresql"))
    print(f"{r['hosts']} host(s): {r['done']}/{r['frames']} frames done in {r['span_s']:.0f} s = "
          f"{r['frames_per_min']:.2f} frames/min (hosts used: {', '.join(r['hosts_used'])}); {lat}\n"
          f"    core-s per frame: {cpu}\n"
          f"    scheduler + api-server + dag-processor + triggerer + broker + relay + PostgreSQL: "
          f"{overhead:.2f} core-s per frame", flush=True)


if __name__ == "__main__":
    sys.exit(main())
