"""Security of the local stack: only the S3 gateway (with keys) is reachable, the keys are
generated per stack, secret files are 0600 and no secret appears in logs, stack.json, the
supervisor's files or `airflow-env` output."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from net_probe import anonymous_status

from iris_devstack.stack import Stack, free_port, seaweed_endpoint

pytestmark = [pytest.mark.services, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def _secret_files(stack: Stack) -> list[Path]:
    home = stack.airflow_home
    return [stack.secrets_path, home / "jwt_secret", home / "fernet_key",
            home / "simple_auth_manager_passwords.json",
            *sorted((stack.state_dir / "seaweedfs").glob(".mini_*"))]


def test_keys_per_stack_and_secret_file_modes(tmp_path: Path):
    a, b = Stack(tmp_path / "a"), Stack(tmp_path / "b")
    for s in (a, b):
        s.configure(api_port=free_port())
        s.env()  # writes the password file, creates the JWT secret and Fernet key
    ka, kb = a.secret_values(), b.secret_values()
    assert ka["s3_access_key"] != kb["s3_access_key"] and ka["s3_secret_key"] != kb["s3_secret_key"]
    assert "iris-admin" not in ka.values()
    for path in _secret_files(a):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    stack_json = a.config_path.read_text()
    assert not [k for k, v in ka.items() if v in stack_json]
    # An older stack's readable secrets file is tightened on first use.
    a.secrets_path.chmod(0o644)
    a.secret_values()
    assert stat.S_IMODE(a.secrets_path.stat().st_mode) == 0o600


def test_airflow_env_prints_the_stacks_configuration_without_secrets(tmp_path: Path):
    state = tmp_path / "state"
    stack = Stack(state)
    stack.configure(api_port=free_port(), auth="open", store_url=(tmp_path / "store").as_uri())
    env = stack.env(base={})
    cmd = [sys.executable, "-m", "iris_tasks.cli", "airflow-env", "--state", str(state)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"export IRIS_STORE_URL={(tmp_path / 'store').as_uri()}" in text
    assert "export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True" in text
    assert f"AIRFLOW__API__PORT={stack.config().api_port}" in text
    leaked = [k for k, v in stack.secret_values().items() if v in text + out.stderr]
    assert leaked == []
    # eval gives a working shell: the secrets arrive from the secrets file at eval time.
    shell = subprocess.run(
        ["bash", "-c", f'eval "$({" ".join(cmd)} 2>/dev/null)"; '
                       'printf "%s\\n%s\\n%s" "$AWS_SECRET_ACCESS_KEY" "$IRIS_STORE_URL" "$AIRFLOW_CONN_IRIS_S3"'],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    secret, store, conn = shell.stdout.split("\n")
    assert secret == env["AWS_SECRET_ACCESS_KEY"] and store == env["IRIS_STORE_URL"]
    assert conn == env["AIRFLOW_CONN_IRIS_S3"]
    shown = subprocess.run([*cmd, "--with-secrets"], capture_output=True, text=True, timeout=120,
                           cwd=ROOT).stdout
    assert env["AWS_SECRET_ACCESS_KEY"] in shown


def test_only_s3_with_keys_is_reachable(tmp_path: Path):
    stack = Stack(tmp_path / "state")
    cfg = stack.start(components=("seaweedfs",), api_port=free_port(), timeout=90)
    try:
        client = seaweed_endpoint(stack.state_dir, cfg.s3_port, stack.secret_values()).client()
        client.put_object(Bucket="iris-drs", Key="raw/frame.fits", Body=b"RAW" * 100)
        # Every listening port of every process of the stack, in this network namespace.
        ports = set()
        for p in stack.leftovers():
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    assert c.laddr.ip == "127.0.0.1", c
                    ports.add(c.laddr.port)
        assert ports == {cfg.s3_port}, ports
        url = f"http://127.0.0.1:{cfg.s3_port}"
        assert anonymous_status("GET", f"{url}/iris-drs/raw/frame.fits") == 403
        assert anonymous_status("PUT", f"{url}/iris-drs/raw/evil.txt", b"x") == 403
        assert anonymous_status("DELETE", f"{url}/iris-drs/raw/frame.fits") == 403
        # weed's own ports (from its command line) answer nothing on this machine.
        weed = [c for p in stack.leftovers() for c in [p] if c.name() == "weed"]
        assert len(weed) == 1
        internal = [int(a.split("=", 1)[1]) for a in weed[0].cmdline()
                    if a.split("=")[0].endswith((".port", ".port.grpc")) and "=" in a and int(a.split("=", 1)[1]) > 0]
        assert len(internal) >= 8
        for port in internal:
            assert anonymous_status("GET", f"http://127.0.0.1:{port}/dir/assign") == "refused", port
            assert anonymous_status("PUT", f"http://127.0.0.1:{port}/buckets/iris-drs/raw/x", b"x") == "refused"
        assert client.get_object(Bucket="iris-drs", Key="raw/frame.fits")["Body"].read() == b"RAW" * 100
        assert [o["Key"] for o in client.list_objects_v2(Bucket="iris-drs")["Contents"]] == ["raw/frame.fits"]
        for path in _secret_files(stack):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE((stack.state_dir / "seaweedfs").stat().st_mode) == 0o700
    finally:
        stack.stop()
    secrets = stack.secret_values()
    texts = {p: p.read_text(errors="replace") for d in (stack.logs_dir, stack.run_dir, stack.pids_dir)
             for p in d.glob("*") if p.is_file()}
    texts[stack.config_path] = stack.config_path.read_text()
    texts[stack.state_dir / "seaweedfs" / "weed.log"] = (stack.state_dir / "seaweedfs" / "weed.log").read_text()
    leaks = [(str(p), k) for p, t in texts.items() for k, v in secrets.items() if v in t]
    assert leaks == []
    assert stack.leftovers() == []
