"""Command line of the development stack.

``iris-devstack COMMAND ...`` (also ``python -m iris_devstack COMMAND ...``) hands the rest of
the command line to one module of the stack::

    iris-devstack demo run|serve|stop ...      # iris_devstack.demo (what `make demo` runs)
    iris-devstack stack start|stop|status ...  # iris_devstack.stack
    iris-devstack cluster start|stop|status ...  # iris_devstack.cluster (Celery, netns hosts)
    iris-devstack seaweedfs run|start|status|stop ...   # iris_devstack.services.seaweedfs
    iris-devstack airflow-env [--state DIR] [--with-secrets | --secrets-only]

``iris-drs airflow-env`` is contributed to the science package's CLI from here, through the
``iris_drs.cli`` entry-point group (:func:`register_cli`, declared in pyproject.toml), so that
``eval "$(iris-drs airflow-env --state var)"`` keeps working while :mod:`iris_tasks` imports
nothing of the stack.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: ``iris-devstack`` commands: name -> (module with ``main(argv)``, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("iris_devstack.demo", "the demo: run | serve | stop (what `make demo` runs)"),
    "stack": ("iris_devstack.stack", "start | stop | status the local stack"),
    "cluster": ("iris_devstack.cluster", "start | stop | status the multi-host Celery cluster"),
    "seaweedfs": ("iris_devstack.services.seaweedfs", "a stand-alone SeaweedFS S3 server"),
    "airflow-env": ("iris_devstack.env_exports", "export lines for Airflow on this repository"),
}


def _usage() -> str:
    lines = ["usage: iris-devstack COMMAND [ARGS...]   (COMMAND -h for its options)", "",
             "IRIS DRS local development stack. Commands:"]
    lines += [f"  {name:12s} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``iris-devstack COMMAND ARGS...``: run ``COMMAND``'s module ``main`` on ``ARGS``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"iris-devstack: unknown command {name!r}\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


# ------------------------------------------------------------------ `iris-drs airflow-env`
def register_cli(subparsers: Any) -> None:
    """Add ``airflow-env`` to the ``iris-drs`` command (entry point ``iris_drs.cli``)."""
    p = subparsers.add_parser("airflow-env",
                              help="print export lines for running Airflow on this repo")
    p.add_argument("--state", default=None,
                   help="state directory (default $IRIS_STATE_DIR or var/)")
    p.add_argument("--s3-conn-uri", default=None, help="Airflow connection URI of the S3 service")
    p.add_argument("--sql-alchemy-conn", default=None, help="PostgreSQL URL (default SQLite)")
    p.add_argument("--landing", default=None)
    p.add_argument("--store", default=None)
    p.add_argument("--port", type=int, default=None, help="API server port (default 8080)")
    p.add_argument("--with-secrets", action="store_true",
                   help="print secret values (default: read from the secrets files at eval time)")
    p.set_defaults(handler=run_airflow_env)


def run_airflow_env(args: argparse.Namespace) -> int:
    """Print the ``export`` lines: the stack's own configuration when ``<state>/stack.json``
    exists; secrets excluded unless ``--with-secrets``
    (:func:`iris_devstack.env_exports.airflow_env_exports`)."""
    from iris_tasks.config import default_state_dir

    from .env_exports import airflow_env_exports

    for line in airflow_env_exports(
            Path(args.state) if args.state else default_state_dir(),
            with_secrets=args.with_secrets, s3_conn_uri=args.s3_conn_uri,
            sql_alchemy_conn=args.sql_alchemy_conn, landing=args.landing, store_url=args.store,
            api_port=args.port):
        print(line)
    return 0
