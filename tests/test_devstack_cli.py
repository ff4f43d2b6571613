"""The dev stack's package boundary and its commands: iris_tasks imports nothing of
iris_devstack, ``iris-drs airflow-env`` arrives through the ``iris_drs.cli`` entry points, and
``iris-devstack`` dispatches to the stack's modules."""

from __future__ import annotations

import ast
import importlib.metadata
import logging
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_iris_tasks_imports_nothing_of_the_dev_stack():
    # Arrows point down: the science package must run (Helm image, Airflow workers) without it.
    offenders = []
    for path in sorted((ROOT / "iris_tasks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] == "iris_devstack"]
    assert offenders == []


def test_airflow_env_is_an_iris_drs_command_through_the_entry_point(tmp_path, capsys):
    from iris_tasks.cli import PLUGIN_GROUP, main

    assert "iris_devstack.cli:register_cli" in {
        ep.value for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP)}
    assert main(["airflow-env", "--state", str(tmp_path / "st")]) == 0
    out = capsys.readouterr().out
    assert f"export AIRFLOW_HOME={tmp_path / 'st' / 'airflow'}" in out
    assert "export AIRFLOW__CORE__FERNET_KEY" not in out  # secrets are read at eval time
    assert "-m iris_devstack.env_exports" in out


def _fake_entry_points(*values: str):
    eps = [importlib.metadata.EntryPoint(name=f"p{i}", value=v, group="iris_drs.cli")
           for i, v in enumerate(values)]

    def entry_points(*, group: str):
        return [ep for ep in eps if ep.group == group]

    return entry_points


def test_a_broken_plugin_is_left_out_with_a_warning(monkeypatch, caplog):
    from iris_tasks import cli

    monkeypatch.setattr(importlib.metadata, "entry_points", _fake_entry_points(
        "iris_devstack.cli:no_such_function",     # broken: warned about
        "iris_drs_not_installed_pkg.cli:register",  # not installed (Helm image): quiet
        "iris_devstack.cli:register_cli"))
    with caplog.at_level(logging.DEBUG, logger=cli.__name__):
        parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"airflow-env", "ledger", "simulate"} <= set(sub.choices)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no_such_function" in warnings[0] and "left out" in warnings[0]
    assert any("iris_drs_not_installed_pkg" in r.getMessage() for r in caplog.records
               if r.levelno == logging.DEBUG)


def test_iris_devstack_dispatches_to_the_stack_modules(tmp_path, capsys):
    from iris_devstack.cli import main

    assert main(["airflow-env", "--state", str(tmp_path), "--secrets-only"]) == 0
    assert "export AIRFLOW__CORE__FERNET_KEY=" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["stack", "--help"])
    assert exc.value.code == 0 and "start" in capsys.readouterr().out
