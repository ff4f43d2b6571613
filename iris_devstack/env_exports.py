"""``iris-drs airflow-env``: the export lines of a state directory's Airflow environment.

The running stack's own configuration when ``<state>/stack.json`` exists (from
:class:`~iris_devstack.stack.Stack`), else the project's defaults
(:func:`iris_devstack.airflow_env.airflow_env`); secrets never printed unless asked for.
Kept apart from both so that the stack, which builds its environment with ``airflow_env``,
and this presentation of it do not import each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .airflow_env import REPO_DIR, airflow_env
from .stack import Stack

# Variables whose values are secrets (or contain one): never printed by `airflow-env` unless
# --with-secrets is given.
SECRET_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AIRFLOW__API__SECRET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY",
)


def _is_secret(name: str, value: str, secret_values: list[str]) -> bool:
    return name in SECRET_VARIABLES or any(s and s in value for s in secret_values)


def airflow_env_exports(
    state_dir: str | os.PathLike[str],
    *,
    with_secrets: bool = False,
    secrets_only: bool = False,
    s3_conn_uri: str | None = None,
    sql_alchemy_conn: str | None = None,
    landing: str | None = None,
    store_url: str | None = None,
    api_port: int | None = None,
) -> list[str]:
    """The lines ``iris-drs airflow-env`` prints: ``export NAME=value`` for a shell.

    When ``<state>/stack.json`` exists (a stack started by :mod:`iris_devstack.stack`), the
    variables are the stack's own (its store, auth mode, ports, database), whatever the other
    options say; otherwise they come from :func:`airflow_env` and the options.

    Secrets (S3 keys, the API and JWT secrets, the Fernet key, and any variable that contains
    one, e.g. the S3 connection URI) are not printed: one line reads them at ``eval`` time
    from the 0600 secrets files, so ``eval "$(iris-drs airflow-env --state var)"`` still
    gives a working shell while the terminal, scroll-back and logs never see them.
    ``with_secrets`` prints them literally; ``secrets_only`` prints only them (what that one
    line runs)."""
    import shlex
    import sys

    state = Path(state_dir).expanduser().resolve()
    if (state / "stack.json").is_file():

        stack = Stack(state)
        env = stack.env(base={})
        secret_values = list(stack.secret_values().values())
        header = (f"# IRIS DRS stack under {state} (from stack.json): store "
                  f"{env.get('IRIS_STORE_URL')}, auth "
                  f"{'open' if env.get('AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS') == 'True' else 'password'}, "
                  f"API {env.get('IRIS_AIRFLOW_URL')}")
    else:
        kwargs: dict[str, Any] = {"s3_conn_uri": s3_conn_uri, "sql_alchemy_conn": sql_alchemy_conn,
                                  "landing": landing, "store_url": store_url}
        if api_port:
            kwargs["api_port"] = api_port
        env = airflow_env(state, **kwargs)
        home = state / "airflow"
        secret_values = [(home / n).read_text().strip() for n in ("jwt_secret", "fernet_key")
                         if (home / n).is_file()]
        header = f"# IRIS DRS Airflow environment for {state} (no stack configured there)"
    lines = [] if secrets_only else [header]
    hidden = []
    for key, value in env.items():
        secret = _is_secret(key, value, secret_values)
        if secrets_only and not secret:
            continue
        if secret and not (with_secrets or secrets_only):
            hidden.append(key)
            continue
        lines.append(f"export {key}={shlex.quote(value)}")
    if hidden:
        cmd = shlex.join([sys.executable, "-m", "iris_devstack.env_exports", "--state", str(state),
                          "--secrets-only"])
        lines.append(f"# {', '.join(hidden)}: read from the secrets files when eval'd "
                     "(--with-secrets prints them)")
        lines.append(f'eval "$({cmd})"')
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m iris_devstack.env_exports [--state DIR] [--with-secrets | --secrets-only]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m iris_devstack.env_exports",
                                     description="print export lines for the stack's environment")
    parser.add_argument("--state", default=None, help="state directory (default $IRIS_STATE_DIR or var/)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--with-secrets", action="store_true", help="print secret values too")
    group.add_argument("--secrets-only", action="store_true",
                       help="print only the secret variables (for eval; never to a terminal)")
    args = parser.parse_args(argv)
    state = args.state or os.environ.get("IRIS_STATE_DIR") or str(REPO_DIR / "var")
    for line in airflow_env_exports(state, with_secrets=args.with_secrets,
                                    secrets_only=args.secrets_only):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
