"""The SeaweedFS service helper: real `weed mini` processes, started and stopped here."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import psutil
import pytest
from net_probe import anonymous_status

from iris_devstack.services import seaweedfs as sw
from iris_devstack.services.seaweedfs import SeaweedError, SeaweedS3

pytestmark = pytest.mark.services
pytest_plugins = ["storage_fixtures"]


def _weed_pids_for(data_dir: Path) -> list[int]:
    """Every live `weed` process serving ``data_dir`` (catches orphans, not just our pid)."""
    out = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and cmd and os.path.basename(cmd[0]) == "weed" \
                and f"-dir={data_dir}" in cmd:
            out.append(proc.pid)
    return out


def test_start_stop_loopback_only_and_no_orphans(tmp_path: Path) -> None:
    data = tmp_path / "sw"
    server = SeaweedS3(data, buckets=["iris-raw", "iris-products"])
    with server:
        pid = server.pid
        assert server.is_running() and _weed_pids_for(data.resolve()) == [pid]
        names = {b["Name"] for b in server.client().list_buckets()["Buckets"]}
        assert {"iris-raw", "iris-products"} <= names
        listening = [c.laddr for c in psutil.Process(pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        if server.isolated:
            # weed's listeners live in its own network namespace: none in ours; S3 is our
            # relay's port.
            assert listening == []
            assert server.port in {c.laddr.port for c in psutil.Process().net_connections(kind="inet")
                                   if c.status == psutil.CONN_LISTEN}
        else:
            assert listening, "weed listens on nothing?"
            assert {a.ip for a in listening} == {"127.0.0.1"}
            assert server.port in {a.port for a in listening}
        socks = [p for p in server._socket_paths() if p.exists()]
    assert not server.is_running()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _weed_pids_for(data.resolve()) == []
    assert socks and not [p for p in socks if p.exists()]  # sockets cleaned up


def test_credentials_are_enforced(seaweedfs: SeaweedS3) -> None:
    import boto3
    import botocore.exceptions

    from iris_tasks.storage.s3 import default_botocore_config

    bad = boto3.session.Session(aws_access_key_id=seaweedfs.access_key, aws_secret_access_key="wrong",
                                region_name="us-east-1").client(
        "s3", endpoint_url=seaweedfs.endpoint_url,
        config=default_botocore_config(retries={"mode": "standard", "total_max_attempts": 1}))
    with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch"):
        bad.list_buckets()
    assert seaweedfs.client().list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_airflow_connection_uri_round_trips(seaweedfs: SeaweedS3) -> None:
    from airflow.models.connection import Connection

    conn = Connection(conn_id="iris_s3", uri=seaweedfs.airflow_conn_uri())
    assert conn.conn_type == "aws"
    assert (conn.login, conn.password) == (seaweedfs.access_key, seaweedfs.secret_key)
    assert conn.extra_dejson == {"endpoint_url": seaweedfs.endpoint_url, "region_name": "us-east-1"}
    as_json = json.loads(seaweedfs.airflow_conn_json())
    assert as_json["extra"]["endpoint_url"] == seaweedfs.endpoint_url
    env = seaweedfs.env()
    assert env["AIRFLOW_CONN_IRIS_S3"] == seaweedfs.airflow_conn_uri()


def test_startup_failure_reports_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'fake weed: cannot open volume' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    server = SeaweedS3(tmp_path / "d", weed_binary=str(fake), startup_timeout=10)
    with pytest.raises(SeaweedError, match=r"(?s)exited with status 3.*fake weed: cannot open volume"):
        server.start()
    assert not server.is_running()


def test_extra_flags_override_and_environment_reaches_weed(tmp_path: Path) -> None:
    # The fake records what it was started with; extra flags come after the class's own (weed
    # takes the later of a flag given twice), extra environment is weed's.
    record = tmp_path / "argv"
    fake = tmp_path / "weed"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" "GOGC=$GOGC" > {record}\nexit 3\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    server = SeaweedS3(tmp_path / "d", weed_binary=str(fake), startup_timeout=10,
                       weed_args=["-filer.maxMB=16"], weed_env={"GOGC": "400"})
    with pytest.raises(SeaweedError, match="exited with status 3"):
        server.start()
    lines = record.read_text().splitlines()
    assert lines[-2:] == ["-filer.maxMB=16", "GOGC=400"]
    assert "-s3.autoCreateBucket=false" in lines[:-2]


def test_startup_timeout_is_reported(tmp_path: Path) -> None:
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'listening nowhere'\nexec sleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    server = SeaweedS3(tmp_path / "d", weed_binary=str(fake), startup_timeout=1.5)
    with pytest.raises(SeaweedError, match=r"(?s)not ready after 2 s.*listening nowhere"):
        server.start()
    assert server.proc is None  # the sleeping fake was terminated, not orphaned


def test_requested_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    port = sw.pick_ports(1)[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        with pytest.raises(SeaweedError, match=f"port {port} on 127.0.0.1 is in use"):
            SeaweedS3(tmp_path / "d", port=port).start()


def test_cli_start_status_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "cli"
    port = sw.pick_ports(1)[0]
    assert sw.main(["start", "--dir", str(data), "--port", str(port), "--bucket", "iris-demo", "-q"]) == 0
    env_lines = capsys.readouterr().out
    try:
        pid = int((data / "weed.pid").read_text())
        assert f"IRIS_S3_ENDPOINT_URL=http://127.0.0.1:{port}" in env_lines
        assert "export AIRFLOW_CONN_IRIS_S3=" in env_lines
        state = json.loads((data / "seaweedfs.json").read_text())
        assert state["pid"] == pid and state["endpoint_url"] == f"http://127.0.0.1:{port}"
        assert stat.S_IMODE((data / "seaweedfs.json").stat().st_mode) == 0o600
        # Starting again is a no-op that reports the running server.
        assert sw.main(["start", "--dir", str(data), "-q"]) == 0
        assert int((data / "weed.pid").read_text()) == pid
        assert "AIRFLOW_CONN_IRIS_S3" in capsys.readouterr().out
        assert sw.main(["status", "--dir", str(data)]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["running"] and status["pid"] == pid
    finally:
        assert sw.main(["stop", "--dir", str(data)]) == 0
    assert not (data / "weed.pid").exists()
    assert _weed_pids_for(data.resolve()) == []
    assert sw.main(["status", "--dir", str(data)]) == 3


@pytest.mark.slow
def test_data_survives_restart(tmp_path: Path) -> None:
    data = tmp_path / "persist"
    with SeaweedS3(data, buckets=["iris-keep"]) as first:
        first.client().put_object(Bucket="iris-keep", Key="a/b.txt", Body=b"kept")
    # New random ports on the second start; objects and buckets must still be there.
    with SeaweedS3(data) as second:
        body = second.client().get_object(Bucket="iris-keep", Key="a/b.txt")["Body"].read()
    assert body == b"kept"


def _stored_fids(data_dir: Path) -> list[str]:
    """File ids of the needles in weed's volumes, read from its .idx/.dat files (a needle
    header is cookie(4) id(8) size(4); this build's index entries are id(8) offset(5)
    size(4), offset in units of 8 bytes)."""
    fids = []
    for idx in data_dir.glob("*.idx"):
        vid = idx.stem.rsplit("_", 1)[-1]
        dat = idx.read_bytes()
        with open(idx.with_suffix(".dat"), "rb") as fh:
            for i in range(0, len(dat) - 16, 17):
                nid = int.from_bytes(dat[i:i + 8], "big")
                b = dat[i + 8:i + 13]
                offset = ((b[4] << 32) | int.from_bytes(b[:4], "big")) * 8
                if offset == 0:
                    continue
                fh.seek(offset)
                header = fh.read(16)
                assert int.from_bytes(header[4:12], "big") == nid, "index and data disagree"
                fids.append(f"{vid},{nid:x}{int.from_bytes(header[:4], 'big'):08x}")
    return fids


@pytest.mark.parametrize("isolate", [True, False])
def test_no_anonymous_access_to_weed(tmp_path: Path, isolate: bool) -> None:
    """Filer, master and volume answer no anonymous request: isolated, they are not even
    reachable; without isolation (the fallback) the JWT signing keys refuse them. S3 with the
    keys works, S3 without is refused."""
    if isolate and not sw.private_netns_available():
        pytest.skip("no private network namespace here")
    data = tmp_path / "sec"
    with SeaweedS3(data, buckets=["iris-drs"], isolate=isolate) as server:
        client = server.client()
        client.put_object(Bucket="iris-drs", Key="raw/frame.fits", Body=b"RAW" * 1000)
        fids = _stored_fids(data)
        assert fids
        p = server.ports
        filer, master, volume = (f"http://127.0.0.1:{p[c]}" for c in ("filer", "master", "volume"))
        expect = {"refused"} if isolate else {401, 403}
        assert anonymous_status("GET", f"{filer}/buckets/iris-drs/raw/frame.fits") in expect
        assert anonymous_status("PUT", f"{filer}/buckets/iris-drs/raw/evil.txt", b"x") in expect
        assert anonymous_status("DELETE", f"{filer}/buckets/iris-drs/raw/frame.fits") in expect
        for fid in fids:
            assert anonymous_status("GET", f"{volume}/{fid}") in expect
        if isolate:
            assert anonymous_status("GET", f"{master}/dir/assign") == "refused"
            for comp, port in p.items():  # every HTTP and gRPC port of weed
                for q in (port, port + 10000):
                    assert anonymous_status("GET", f"http://127.0.0.1:{q}/") == "refused", (comp, q)
        # S3: anonymous refused, the keys work, nothing was changed by the attempts above.
        assert anonymous_status("GET", f"{server.endpoint_url}/iris-drs/raw/frame.fits") == 403
        assert anonymous_status("PUT", f"{server.endpoint_url}/iris-drs/raw/evil.txt", b"x") == 403
        assert anonymous_status("DELETE", f"{server.endpoint_url}/iris-drs/raw/frame.fits") == 403
        assert client.get_object(Bucket="iris-drs", Key="raw/frame.fits")["Body"].read() == b"RAW" * 1000
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="iris-drs")["Contents"]]
        assert keys == ["raw/frame.fits"]
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert server.access_key not in server.log_path.read_text()
    assert server.secret_key not in server.log_path.read_text()


def test_keys_are_generated_per_server(tmp_path: Path) -> None:
    a, b = SeaweedS3(tmp_path / "a"), SeaweedS3(tmp_path / "b")
    assert a.access_key != b.access_key and a.secret_key != b.secret_key
    assert "iris-admin" not in (a.access_key, a.secret_key)
