"""``iris-drs`` command line: one entry point, subcommands contributed by the library modules.

Each module that offers commands defines ``register_cli(subparsers)``; handlers return an exit
code. Any error becomes one line on stderr and a non-zero exit, so the CLI is safe in scripts
and in Airflow's BashOperator alike.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

log = logging.getLogger(__name__)

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "iris_tasks.cli_info",
    "iris_tasks.calib.cli",
    "iris_tasks.simulate.cli",
    "iris_tasks.pipelines.cli",
    "iris_tasks.orchestration.cli",
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="iris-drs", description="IRIS data reduction system (TMT IRIS imager and IFS)."
    )
    parser.add_argument("--version", action="version", version=f"iris-drs {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("iris-drs: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for operators; -vv shows the traceback
        log.debug("command failed", exc_info=True)
        print(f"iris-drs {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
