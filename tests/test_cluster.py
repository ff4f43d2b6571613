"""The multi-host Celery cluster (iris_devstack.cluster), for real: two worker hosts in network
namespaces on this machine, the CeleryExecutor, a Redis broker, PostgreSQL, SeaweedFS.

One cluster for the module; the tests run in order on it (one xdist group):

1. a simulated night (imager + IFS, 256 px) lands in the S3 landing prefix and is processed
   across both hosts: every frame done, every product stored exactly once with its checksum,
   task instances and ledger stages on both hosts, a quicklook (night page) and a task log
   read through the api-server from the object store;
2. a CRDS context published mid-night in the root's cache reaches both hosts through the
   object store (each host has its own cache, no shared disk): the next frames use it;
3. the host running a frame is killed mid-frame (all its processes SIGKILLed, its link cut):
   the frame is retried on the other host and completes, the ledger shows both tries; the
   dead host, restarted with its link still cut, refuses to start naming the services and
   their addresses;
4. the broker is killed mid-night and restarted by the supervisor: the frames complete;
5. a host running other code refuses the task (both fingerprints and the host named), and the
   refused frame is processed once a matching host is back;
6. stop leaves no process, namespace or link.

Needs root (namespaces, veth pairs), redis-server and PostgreSQL at 127.0.0.1:5432.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.xdist_group("cluster"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

NIGHT = "2026-11-21"
SIZE, NREADS = 256, 4
TERMINAL = ("done", "failed", "quarantined", "superseded")
HOSTNAMES = {"iris-h1", "iris-h2"}


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("redis-server") is None or shutil.which("ip") is None:
        return "needs redis-server and iproute2"
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        return "needs PostgreSQL at 127.0.0.1:5432"
    return None


@pytest.fixture(scope="module")
def cl(tmp_path_factory: pytest.TempPathFactory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from iris_devstack.cluster import Cluster
    from iris_devstack.demo import unpause, wait_for_dags
    from iris_devstack.stack import seaweed_endpoint
    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.orchestration.ledger import FrameLedger
    from iris_tasks.simulate.night import NightPlan, simulate_night

    root = tmp_path_factory.mktemp("cluster")
    # The ideal IFS optics come with their trace reference: at 256 px the arcs hold too few
    # lines to learn the instrument model from them (the demo's afternoon calibrations).
    plan = NightPlan(n_dark=1, n_flat=1, n_sky=1, n_science=2, n_telluric=1, n_arc=0,
                     imager_filters=("Ks",), ifs_modes=(("LENSLET", "4"),))
    manifest = simulate_night(root / "sim", size=SIZE, nreads=NREADS, detectors=["IMG1", "IFS"],
                              seed=5, night=NIGHT, plan=plan, ifs_optics="ideal")
    cluster = Cluster(root / "cluster")
    cluster.start(hosts=2, db_name=f"iris_cluster_test_{uuid.uuid4().hex[:8]}", pin=True)
    try:
        stack = cluster.stack
        env = stack.env()
        with temporary_cache(env["IRIS_CRDS_PATH"]) as calib:  # published in the root's cache...
            calib.publish_references([str(root / "sim" / r["path"]) for r in manifest["references"]],
                                     "pre-night references")
        cluster.sync_crds()  # ...and shared through the object store, which the hosts follow
        wait_for_dags(stack, ["iris_realtime"], timeout=240)
        unpause(stack, ["iris_realtime"])
        yield {"cluster": cluster, "root": root, "manifest": manifest, "env": env,
               "ledger": FrameLedger(env["IRIS_LEDGER_URL"]),
               "s3": seaweed_endpoint(stack.state_dir, stack.config().s3_port,
                                      stack._ensure_secrets()).client()}
    finally:
        report = cluster.stop(purge=True)
        print("CLUSTER-STOP " + json.dumps(report))


# -- helpers -----------------------------------------------------------------------------------
def _land(cl: dict, path: Path, name: str | None = None) -> str:
    name = name or path.name
    cl["s3"].upload_file(str(path), "iris-drs", f"landing/{name}")
    return name


def _variant(cl: dict, obsname: str, exp_no: int) -> Path:
    """A new exposure (new EXP_NO, hence new bytes) of the night's first ``obsname`` frame."""
    from astropy.io import fits

    src = next(cl["root"] / "sim" / f["path"] for f in cl["manifest"]["files"] if f["obsname"] == obsname)
    dest = cl["root"] / "variants" / src.name.replace("_0001", f"_{exp_no:04d}")
    dest.parent.mkdir(exist_ok=True)
    shutil.copyfile(src, dest)
    with fits.open(dest, mode="update") as hdul:
        hdul[0].header["EXP_NO"] = exp_no
    return dest


def _frames(cl: dict, names: list[str]) -> dict[str, dict[str, Any]]:
    return {f["filename"]: f for f in cl["ledger"].frames() if f["filename"] in names}


def _wait_frames(cl: dict, names: list[str], timeout: float = 300.0) -> dict[str, dict[str, Any]]:
    end = time.monotonic() + timeout
    while True:
        found = _frames(cl, names)
        if len(found) == len(names) and all(f["status"] in TERMINAL for f in found.values()):
            return found
        if time.monotonic() > end:
            raise AssertionError(f"frames not finished after {timeout:.0f} s: "
                                 f"{ {n: (found.get(n) or {}).get('status') for n in names} }\n"
                                 + _logs(cl))
        time.sleep(2)


def _logs(cl: dict, chars: int = 2500) -> str:
    cluster = cl["cluster"]
    paths = [*cluster.stack.logs_dir.glob("*.log"),
             *(cluster.host_state(h) / "logs" / "celery.log" for h in ("h1", "h2"))]
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-chars:]}" for p in paths if p.is_file())


def _task_instances(cl: dict) -> list[dict[str, Any]]:
    api = cl["cluster"].stack.api
    out = []
    for run in api("GET", "/dags/iris_realtime/dagRuns?limit=100")["dag_runs"]:
        tis = api("GET", f"/dags/iris_realtime/dagRuns/{run['dag_run_id']}/taskInstances?limit=100")
        out += tis["task_instances"]
    return out


def _tries(cl: dict, ti: dict[str, Any]) -> list[dict[str, Any]]:
    api = cl["cluster"].stack.api
    path = (f"/dags/iris_realtime/dagRuns/{ti['dag_run_id']}/taskInstances/{ti['task_id']}/"
            f"{ti['map_index']}/tries")
    return api("GET", path)["task_instances"]


def _log_text(cl: dict, ti: dict[str, Any], try_number: int) -> str:
    api = cl["cluster"].stack.api
    log = api("GET", f"/dags/iris_realtime/dagRuns/{ti['dag_run_id']}/taskInstances/"
                     f"{ti['task_id']}/logs/{try_number}?map_index={ti['map_index']}")
    return json.dumps(log["content"])


def _stage_hosts(cl: dict, frame_id: str) -> list[tuple[int, str, str]]:
    """(try, stage, host) of a frame's ledger stages."""
    return [(s["try_number"], s["stage"], json.loads(s["detail"] or "{}").get("host"))
            for s in cl["ledger"].stages(frame_id)]


def _check_products_once(cl: dict, frames: dict[str, dict[str, Any]]) -> None:
    """Every current product of the frames in the ledger is one object in the store, with the
    recorded SHA-256 (downloaded and hashed); no object of theirs is stored twice."""
    import hashlib

    s3, ledger = cl["s3"], cl["ledger"]
    stored = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="iris-drs")
              for o in page.get("Contents", []) if not o["Key"].startswith(("airflow-logs/", "crds/"))]
    for name, frame in frames.items():
        assert frame["status"] == "done", f"{name}: {frame['status']} {frame['error']}"
        current = [p for p in ledger.products(frame["frame_id"]) if p["current"]]
        kinds = [p["kind"] for p in current]
        assert len(kinds) == len(set(kinds)), f"{name}: a product kind recorded twice: {kinds}"
        assert {"raw", "rate", "quicklook"} <= set(kinds), f"{name}: {kinds}"
        for p in current:
            assert stored.count(p["key"]) == 1, f"{name}: {p['key']} stored {stored.count(p['key'])} times"
            body = s3.get_object(Bucket="iris-drs", Key=p["key"])["Body"].read()
            assert hashlib.sha256(body).hexdigest() == p["sha256"], f"{name}: {p['key']} checksum"
        raw = next(p for p in current if p["kind"] == "raw")
        assert raw["sha256"] == frame["sha256"], f"{name}: archived raw differs from the claimed bytes"
        stem = Path(name).stem
        assert [k for k in stored if Path(k).name.startswith(stem + "_")
                or Path(k).name == name].__len__() == len(current), f"{name}: stray objects"
    assert not [k for k in stored if k.startswith("landing/") and Path(k).name in frames], \
        "landed objects not released after archiving"


# -- the tests -----------------------------------------------------------------------------------
def test_night_across_two_hosts(cl):
    names = []
    by_time: dict[str, list[dict]] = {}
    for f in cl["manifest"]["files"]:
        by_time.setdefault(f"{f['date_obs']}T{f['time_obs']}", []).append(f)
    for stamp in sorted(by_time):
        names += [_land(cl, cl["root"] / "sim" / f["path"]) for f in by_time[stamp]]
    frames = _wait_frames(cl, names)
    _check_products_once(cl, frames)
    assert {f["kind"] for f in frames.values()} >= {"dark", "flat", "sky", "science", "telluric"}
    assert {f["mode"] for f in frames.values()} == {"imager", "lenslet"}

    tis = [t for t in _task_instances(cl) if t["state"] == "success"]
    assert {t["hostname"] for t in tis} == HOSTNAMES, "task instances did not run on both hosts"
    stage_hosts = {h for f in frames.values() for _, _, h in _stage_hosts(cl, f["frame_id"])}
    assert stage_hosts == HOSTNAMES, f"ledger stages on {stage_hosts}"
    # A science frame reduced after its mode's sky was done used that sky, whichever host
    # processed the sky (fetched from the store when it was the other one).
    for f in frames.values():
        if f["kind"] != "science":
            continue
        sky = next(s for s in frames.values() if s["kind"] == "sky" and s["mode"] == f["mode"])
        reduce = next(s for s in cl["ledger"].stages(f["frame_id"]) if s["stage"] == "reduce")
        if sky["finished_at"] < reduce["started_at"]:
            assert json.loads(reduce["detail"])["skies"], f"{f['filename']} reduced without its sky"
    # The night page shows a frame's quicklook, made on a host: served from the object store.
    import urllib.request

    stack = cl["cluster"].stack
    sci = next(f for n, f in frames.items() if "IMG1-SCI" in n)
    req = urllib.request.Request(f"{stack.config().api_url}/iris-ops/ql/{sci['frame_id']}/reduced",
                                 headers={"Authorization": f"Bearer {stack.token()}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        png = resp.read()
    ql = next(p for p in cl["ledger"].products(sci["frame_id"]) if p["kind"] == "quicklook" and p["current"])
    assert png == cl["s3"].get_object(Bucket="iris-drs", Key=ql["key"])["Body"].read()
    # The api-server shows a task log written on a host: read back from the object store.
    frame_ti = next(t for t in tis if t["task_id"] == "frame")
    text = _log_text(cl, frame_ti, frame_ti["try_number"])
    assert "s3://iris-drs/airflow-logs/" in text and frame_ti["rendered_map_index"] in text


def test_a_context_published_mid_night_reaches_both_hosts(cl):
    from astropy.io import fits

    from iris_tasks.calib import cache
    from iris_tasks.calib.testing import temporary_cache

    cluster, env = cl["cluster"], cl["env"]
    before = {f["crds_context"] for f in cl["ledger"].frames() if f["crds_context"]}
    assert len(before) == 1, before
    # Each host pulled the night's context into its own cache (it started with none).
    for host in ("h1", "h2"):
        assert (cluster.host_state(host) / "crds" / "mappings" / "tmt" / min(before)).is_file(), host
    # A new IMG1 dark (other bytes, later USEAFTER) published where an operator would: the
    # root's cache, then shared.
    old_dark = next(cl["root"] / "sim" / r["path"] for r in cl["manifest"]["references"]
                    if fits.getval(cl["root"] / "sim" / r["path"], "REFTYPE", 0).lower() == "dark"
                    and fits.getval(cl["root"] / "sim" / r["path"], "DETECTOR", 0) == "IMG1")
    new_dark = cl["root"] / "mid_night_dark.fits"
    shutil.copyfile(old_dark, new_dark)
    with fits.open(new_dark, mode="update") as hdul:
        hdul[0].header["USEAFTER"] = f"{NIGHT}T00:00:00"
        hdul[0].header["DESCRIP"] = "mid-night dark (cluster test)"
    with temporary_cache(env["IRIS_CRDS_PATH"]) as calib:
        context = calib.publish_references([str(new_dark)], "mid-night dark")
        dark_name = next(n for n in cache.reference_names(context) if "_dark_" in n
                         and n not in {m for c in before for m in cache.reference_names(c)})
    assert cluster.sync_crds()["operational"] == context
    time.sleep(6)  # a host process looks at the replica's pointer at most every 5 s
    names = [_land(cl, _variant(cl, "IMG1-SCI", 150 + i)) for i in range(4)]
    frames = _wait_frames(cl, names)
    _check_products_once(cl, frames)
    hosts = {h for f in frames.values() for _, s, h in _stage_hosts(cl, f["frame_id"]) if s == "readout"}
    for name, frame in frames.items():
        assert frame["crds_context"] == context, (name, frame["crds_context"], context)
        cal = next(p for p in cl["ledger"].products(frame["frame_id"]) if p["kind"] == "cal" and p["current"])
        head = cl["s3"].get_object(Bucket="iris-drs", Key=cal["key"], Range="bytes=0-57599")["Body"].read()
        assert dark_name.encode() in head, f"{name}: its _cal does not name {dark_name} (R_DARK)"
    for host in hosts:
        assert (cluster.host_state(host.removeprefix("iris-")) / "crds" / "mappings" / "tmt" / context).is_file()


def test_host_killed_mid_frame_is_retried_on_the_other_host(cl):
    cluster = cl["cluster"]
    sci = _variant(cl, "LEN-SCI", 101)
    name = _land(cl, sci)
    # The ledger names the host of a stage from its start: kill that host as soon as the
    # frame's task (not its claim) starts a stage there.
    end = time.monotonic() + 180
    victim = None
    while victim is None:
        assert time.monotonic() < end, "the frame's task never ran\n" + _logs(cl)
        frame = _frames(cl, [name]).get(name)
        stages = cl["ledger"].stages(frame["frame_id"]) if frame else []
        victim = next((json.loads(s["detail"] or "{}").get("host") for s in stages
                       if s["stage"] != "classify" and s["status"] == "running"), None)
        time.sleep(0.05)
    victim = victim.removeprefix("iris-")
    survivor = ({"h1", "h2"} - {victim}).pop()
    killed = cluster.kill_host(victim, cut_link=True)
    assert killed, "no process of the host was found to kill"
    assert _frames(cl, [name])[name]["status"] not in TERMINAL, "frame finished before the kill"
    # What the dead host left running (it can write nothing more: killed, link cut). The kill
    # may land between two stages, when there is none.
    left_running = {s["id"] for s in cl["ledger"].stages(_frames(cl, [name])[name]["frame_id"])
                    if s["status"] == "running"}

    frame = _wait_frames(cl, [name], timeout=300)[name]
    _check_products_once(cl, {name: frame})
    running = next(t for t in _task_instances(cl) if t["task_id"] == "frame"
                   and t["rendered_map_index"] == name)
    tries = _tries(cl, running)
    assert [t["hostname"] for t in tries][:1] == [f"iris-{victim}"], tries
    assert tries[-1]["state"] == "success" and tries[-1]["hostname"] == f"iris-{survivor}", tries
    stages = _stage_hosts(cl, frame["frame_id"])
    assert {h for t, _, h in stages if t == 1} <= {f"iris-{victim}", f"iris-{survivor}"}
    assert any(t == 1 and h == f"iris-{victim}" for t, _, h in stages), stages
    assert any(t > 1 and h == f"iris-{survivor}" and s == "ingest" for t, s, h in stages), stages
    assert len([f for f in cl["ledger"].frames() if f["filename"] == name]) == 1
    # The dead host's stages were closed by the retry, not left "running" for ever.
    first_try = [s for s in cl["ledger"].stages(frame["frame_id"]) if s["try_number"] == 1]
    assert first_try and {s["status"] for s in first_try} <= {"success", "failed", "abandoned"}, first_try
    assert {s["id"] for s in first_try if s["status"] == "abandoned"} == left_running, \
        (first_try, left_running)

    # Restarted with its link still cut: it refuses to start, naming each service's address.
    cluster.start_host(victim, restore_link=False)
    end = time.monotonic() + 60
    while cluster.host_status(victim).get("alive"):
        assert time.monotonic() < end, "a host without its network did not give up"
        time.sleep(0.5)
    error = cluster.host_status(victim).get("error") or ""
    addr = cluster.config().net.service_address
    for service in ("broker (Redis)", "PostgreSQL", "object store (S3)"):
        assert service in error, error
    assert f"{addr}:{cluster.config().broker_port}" in error and f"{addr}:5432" in error, error
    cluster.stop_host(victim)
    cluster.start_host(victim)
    cluster.wait_hosts([victim])


def test_broker_restart_mid_night(cl):
    cluster = cl["cluster"]
    stack = cluster.stack
    names = [_land(cl, _variant(cl, obs, 200 + i)) for i, obs in enumerate(["IMG1-SCI", "LEN-SCI", "IMG1-SCI"])]
    end = time.monotonic() + 120
    while not any(f["status"] != "claimed" for f in _frames(cl, names).values()):
        assert time.monotonic() < end, "nothing started\n" + _logs(cl)
        time.sleep(0.3)
    broker = stack._process("broker")
    before = broker.pid
    broker.kill()  # the supervisor restarts it
    names += [_land(cl, _variant(cl, "IMG1-SCI", 210))]  # lands while the broker is down
    frames = _wait_frames(cl, names, timeout=400)
    _check_products_once(cl, frames)
    after = stack._process("broker")
    assert after is not None and after.pid != before
    assert stack.supervisor_status()["components"]["broker"]["restarts"] >= 1


def test_host_on_other_code_refuses_work(cl):
    cluster = cl["cluster"]
    other = cl["root"] / "other-release"
    shutil.copytree(cluster.release_dir, other)
    with open(other / "iris_tasks" / "orchestration" / "realtime.py", "a") as fh:
        fh.write("\n# a hot fix deployed on one host only\n")
    cluster.stop_hosts(["h1", "h2"])
    cluster.start_host("h2", release=other)
    cluster.wait_hosts(["h2"])
    name = _land(cl, _variant(cl, "IMG1-SCI", 301))
    end = time.monotonic() + 180
    refused = None
    while refused is None:
        assert time.monotonic() < end, "no refusal seen\n" + _logs(cl)
        for ti in _task_instances(cl):
            if ti["task_id"] == "claim" and ti["state"] in ("up_for_retry", "failed"):
                text = _log_text(cl, ti, 1)
                if "refuses this task" in text:
                    refused = text
        time.sleep(1)
    published = json.loads(cluster.stack.api("GET", "/variables/iris_deployment_fingerprint")["value"])
    assert "host iris-h2 refuses" in refused and published["id"] in refused, refused[:3000]
    assert "code " in refused and " differs from the scheduler's " in refused
    assert _frames(cl, [name]) == {}, "a refused claim must not claim the frame"

    # The right code back on both hosts: the refused frame is processed, once (by the claim's
    # retry, or by the next run's claim, which takes whatever waits in the landing area).
    cluster.stop_host("h2")
    cluster.start_host("h2", release=cluster.release_dir)
    cluster.start_host("h1")
    cluster.wait_hosts(["h1", "h2"])
    later = _land(cl, _variant(cl, "IMG1-SCI", 302))
    frames = _wait_frames(cl, [name, later], timeout=300)
    _check_products_once(cl, frames)


def test_stop_leaves_nothing(cl):
    cluster = cl["cluster"]
    cid = cluster.config().cluster_id
    report = cluster.stop(purge=True)
    assert report["leftovers"] == {"processes": [], "network": []}, report
    import subprocess

    assert cid not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert cid not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert not os.path.ismount(cluster.mount_point)
