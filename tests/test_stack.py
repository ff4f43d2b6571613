"""Stack control (iris_devstack.stack): configuration, the PostgreSQL option, and a real start of
SeaweedFS + the Airflow components on loopback with a clean stop (no process left behind)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from iris_devstack.stack import (
    ALL_COMPONENTS,
    MARKER,
    Stack,
    StackError,
    ensure_postgres_database,
    free_port,
)

ROOT = Path(__file__).resolve().parents[1]
PG_URL = "postgresql://postgres@127.0.0.1:5432"


def _pg_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            pass
        import psycopg

        with psycopg.connect(f"{PG_URL}/postgres", connect_timeout=3):
            return True
    except Exception:
        return False


def _ours(state: Path, marker: str) -> list[psutil.Process]:
    """Every live process that belongs to this stack: marker in its env, or the state dir in
    its command line (catches anything that dropped the environment)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == os.getpid():
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get(MARKER) == marker or str(state) in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def test_configure_and_env(tmp_path: Path):
    stack = Stack(tmp_path)
    cfg = stack.configure(api_port=free_port())
    again = stack.config()
    assert again == cfg and cfg.db_url == f"sqlite:///{tmp_path / 'airflow' / 'airflow.db'}"
    env = stack.env()
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == f"http://127.0.0.1:{cfg.api_port}/execution/"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "iris_tasks.orchestration.warm.WarmLocalExecutor"
    assert env["AIRFLOW__CORE__PARALLELISM"] == "4"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "False"
    assert env[MARKER] == cfg.stack_id
    assert env["AIRFLOW__CORE__PLUGINS_FOLDER"] == str(ROOT / "plugins")
    assert str(cfg.s3_port) in env["AIRFLOW_CONN_IRIS_S3"]
    assert env["AWS_ENDPOINT_URL_S3"] == cfg.s3_url
    pw = json.loads(Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]).read_text())
    assert pw == {"admin": stack.admin_password()}
    assert oct((tmp_path / "secrets.json").stat().st_mode & 0o777) == "0o600"
    assert stack.running_components() == []
    assert stack.stop() == []  # nothing running: a no-op
    assert cfg.s3_port + 10000 <= 65535  # weed's gRPC port must exist too
    assert env["IRIS_STORE_URL"] == "s3://iris-drs?conn_id=iris_s3"
    # A killed scheduler's task instances are reset within seconds, not the 5 min defaults.
    assert int(env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD"]) <= 30
    assert float(env["AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL"]) <= 30
    assert int(env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"]) <= 120
    # Per-stack S3 keys from the 0600 secrets file, the password file 0600 too.
    sec = json.loads((tmp_path / "secrets.json").read_text())
    assert env["AWS_ACCESS_KEY_ID"] == sec["s3_access_key"] != "iris-admin"
    pw_file = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    assert oct(pw_file.stat().st_mode & 0o777) == "0o600"


def test_compute_server_socket_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("IRIS_COMPUTE_SOCKET", raising=False)
    stack = Stack(tmp_path)
    cfg = stack.configure(api_port=free_port())
    env = stack.env()
    assert env["IRIS_COMPUTE_SOCKET"] == str(tmp_path / "run" / "compute.sock")
    assert stack.compute_enabled(env)
    deep = tmp_path / ("d" * 100)  # a Unix socket path may not be this long
    deep_stack = Stack(deep)
    deep_cfg = deep_stack.configure(api_port=free_port())
    short = deep_stack.env()["IRIS_COMPUTE_SOCKET"]
    assert len(short) <= 107 and deep_cfg.stack_id[:12] in short and cfg.stack_id[:12] not in short
    monkeypatch.setenv("IRIS_COMPUTE_SOCKET", "off")  # run the stack without the server
    assert not stack.compute_enabled(stack.env())


def test_stack_with_another_store(tmp_path: Path):
    store = (tmp_path / "store").as_uri()
    stack = Stack(tmp_path)
    stack.configure(api_port=free_port(), store_url=store)
    assert Stack(tmp_path).config().store_url == store  # persisted for stop/status and restarts
    assert stack.env()["IRIS_STORE_URL"] == store


def test_open_auth_and_bad_auth(tmp_path: Path):
    stack = Stack(tmp_path)
    stack.configure(auth="open")
    assert stack.env()["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "True"
    assert stack.admin_password() is None and stack.token() is None
    with pytest.raises(StackError):
        Stack(tmp_path / "x").configure(auth="nope")


@pytest.mark.skipif(not _pg_up(), reason="PostgreSQL not reachable on 127.0.0.1:5432")
def test_postgres_database_is_created_once():
    import psycopg

    name = f"iris_test_{uuid.uuid4().hex[:8]}"
    try:
        assert ensure_postgres_database(f"{PG_URL}/{name}") is True
        assert ensure_postgres_database(f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}") is False
    finally:
        with psycopg.connect(f"{PG_URL}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.mark.slow
@pytest.mark.services
def test_full_stack_start_health_api_and_clean_stop(tmp_path: Path):
    state = tmp_path / "state"
    stack = Stack(state)
    cfg = stack.start(api_port=free_port(), timeout=240)
    stray = None
    try:
        health = stack.health()
        assert all(health["components"][c] for c in ALL_COMPONENTS), health
        assert health["api"]["metadatabase"]["status"] == "healthy"
        assert health["s3"] is True
        assert health["compute"] is True  # the compute server answers on its socket
        sock = Path(stack.compute_socket(stack.env()))
        assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o600
        # Every listener of the stack is on loopback.
        for p in _ours(state, cfg.stack_id):
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    assert c.laddr.ip in ("127.0.0.1", "::1"), (p.cmdline()[:3], c.laddr)
        # REST API: token auth works, anonymous is refused.
        assert stack.api("GET", "/dags")["total_entries"] >= 0
        with pytest.raises(StackError, match="401"):
            from iris_devstack.stack import _http_json

            _http_json(f"{cfg.api_url}/api/v2/dags")
        # The operations plugin is mounted and behind Airflow's auth.
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{cfg.api_url}/iris-ops/api/night", timeout=10)
        assert err.value.code == 401
        req = urllib.request.Request(f"{cfg.api_url}/iris-ops/api/night",
                                     headers={"Authorization": f"Bearer {stack.token()}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            night = json.loads(resp.read())
        assert "summary" in night
        # The scheduler is SIGKILLed: the supervisor kills what it left (its LocalExecutor
        # workers) and restarts it; the API reports it healthy again.
        sched = psutil.Process(health["components"]["scheduler"]["pid"])
        workers = sched.children(recursive=True)
        sched.kill()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            h = stack.health()["components"]["scheduler"]
            if h["restarts"] == 1 and h["healthy"]:
                break
            time.sleep(2)
        assert h["restarts"] == 1 and h["healthy"], h
        assert not [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
        # A stray process of this stack in a session of its own (as Airflow does for task
        # processes): stop() must find it through the marker.
        stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                                 env=stack.env(), start_new_session=True)
    finally:
        # Stop from another process, as `make stop` does.
        proc = subprocess.run([sys.executable, "-m", "iris_devstack.stack", "--state-dir", str(state), "stop"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        if stray is not None:
            stray.wait(10)
        stack.stop()  # belt and braces if the CLI failed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _ours(state, cfg.stack_id) == []
    assert not any((state / "pids").iterdir())
    assert stray.returncode is not None


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.skipif(not _pg_up(), reason="PostgreSQL not reachable on 127.0.0.1:5432")
def test_stack_on_postgresql(tmp_path: Path):
    import psycopg

    name = f"iris_airflow_test_{uuid.uuid4().hex[:8]}"
    state = tmp_path / "state"
    stack = Stack(state)
    try:
        cfg = stack.start(components=("scheduler", "api-server"), db_url=f"{PG_URL}/{name}",
                          api_port=free_port(), timeout=240)
        assert cfg.db_url.endswith(name)
        assert stack.health()["api"]["metadatabase"]["status"] == "healthy"
        assert stack.api("GET", "/dags")["total_entries"] >= 0
    finally:
        stack.stop()
        assert stack.leftovers() == []
        with psycopg.connect(f"{PG_URL}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_api_retries_idempotent_calls_on_server_errors(tmp_path: Path, monkeypatch):
    import http.server
    import threading

    answers = {"PATCH": [500, 500, 200], "POST": [500, 200]}
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self):
            seen.append(self.command)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            code = answers[self.command].pop(0)
            body = b'{"ok": true}' if code == 200 else b'{"detail": "database is locked"}'
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_PATCH = do_POST = _reply

        def log_message(self, *args):  # keep pytest output clean
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr("iris_devstack.stack.time.sleep", lambda s: None)
    try:
        stack = Stack(tmp_path)
        stack.configure(auth="open")
        cfg = json.loads(stack.config_path.read_text())
        cfg["api_port"] = server.server_address[1]  # configure() picks a free port; ours is taken
        stack.config_path.write_text(json.dumps(cfg))
        assert stack.api("PATCH", "/dags/x", {"is_paused": False}) == {"ok": True}
        with pytest.raises(StackError, match="HTTP 500"):
            stack.api("POST", "/dags/x/dagRuns", {})  # not idempotent: sent once
        assert seen == ["PATCH", "PATCH", "PATCH", "POST"]
    finally:
        server.shutdown()
