"""Warm task processes: the science stack is imported once, before the executor forks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from iris_tasks.orchestration import warm


def _py(code: str, **env: str) -> dict:
    import os

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_preload_names_what_failed_and_keeps_going():
    out = warm.preload_science_stack(("json", "iris_tasks.no_such_module", "csv"))
    assert out["loaded"] == ["json", "csv"]
    assert "ModuleNotFoundError" in out["failed"]["iris_tasks.no_such_module"]


def test_every_preloaded_module_exists_and_forked_children_inherit_it():
    # A fresh interpreter: the list must stay importable as the package evolves, and a child
    # forked afterwards must find the modules and asdf's extension registry already there.
    out = _py("""
        import json, os, sys
        from iris_tasks.orchestration.warm import PRELOAD_MODULES, preload_science_stack
        res = preload_science_stack()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            import asdf
            ok = all(m in sys.modules for m in PRELOAD_MODULES)
            cached = asdf.get_config()._extensions is not None
            os.write(w, json.dumps([ok, cached]).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        child = json.loads(os.read(r, 1000))
        print(json.dumps({"failed": res["failed"], "n": len(res["loaded"]), "child": child}))
    """)
    assert out["failed"] == {}
    assert out["n"] == len(warm.PRELOAD_MODULES)
    assert out["child"] == [True, True]


def test_warm_local_executor_preloads_before_its_workers_fork(monkeypatch):
    from airflow.executors.local_executor import LocalExecutor

    calls = []
    monkeypatch.setattr(warm, "preload_science_stack", lambda: calls.append("preload"))
    monkeypatch.setattr(LocalExecutor, "start", lambda self: calls.append("fork workers"))
    monkeypatch.delenv(warm.ENV_PRELOAD, raising=False)
    warm.WarmLocalExecutor(parallelism=1).start()
    assert calls == ["preload", "fork workers"]

    calls.clear()
    monkeypatch.setenv(warm.ENV_PRELOAD, "0")
    warm.WarmLocalExecutor(parallelism=1).start()
    assert calls == ["fork workers"]


def test_airflow_loads_the_warm_executor_by_its_module_path(monkeypatch):
    from airflow.executors.executor_loader import ExecutorLoader

    from iris_devstack.airflow_env import WARM_LOCAL_EXECUTOR

    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", WARM_LOCAL_EXECUTOR)
    (name,) = ExecutorLoader._get_executor_names(validate_teams=False)
    cls, _ = ExecutorLoader.import_executor_cls(name)
    assert cls is warm.WarmLocalExecutor and cls.is_local


@pytest.mark.parametrize("preload", ["1", "0"])
def test_celery_config_is_airflow_defaults_plus_preload(preload):
    out = _py("""
        import json, sys
        from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
        from iris_tasks.orchestration.warm import CELERY_CONFIG
        print(json.dumps({"same": CELERY_CONFIG == DEFAULT_CELERY_CONFIG,
                          "stpipe": "stpipe" in sys.modules}))
    """, IRIS_PRELOAD=preload, AIRFLOW__CELERY__BROKER_URL="redis://127.0.0.1:6379/0")
    assert out == {"same": True, "stpipe": preload == "1"}
