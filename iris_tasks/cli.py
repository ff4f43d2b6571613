"""``iris-drs`` command line: one entry point, subcommands contributed by the library modules.

Each module that offers commands defines ``register_cli(subparsers)``; handlers return an exit
code. Any error becomes one line on stderr and a non-zero exit, so the CLI is safe in scripts
and in Airflow's BashOperator alike.

Whose state a command acts on
-----------------------------
The commands that read or write a CRDS cache, a frame ledger, an object store or lineage
events (:data:`STATE_COMMANDS`) work on the **CLI's own state directory** unless told
otherwise: ``--state DIR``, else ``$IRIS_CLI_STATE``, else ``$XDG_STATE_HOME/iris-drs``, else
``~/.local/state/iris-drs``, laid out as :func:`iris_tasks.config.state_environment`
says (``crds/``, ``ledger.sqlite``, ``store/``, ``lineage/``, ...). The ``IRIS_*`` variables
of the running stack (set for the Airflow tasks, and in a shell that sourced
``iris-drs airflow-env``) are ignored then, even when present: a test night reduced from a
shell must never become the stack's operational CRDS context or appear on the night page.
``--operational`` acts on the stack's configuration (what
:func:`iris_tasks.config.settings` reads). Either way one line on stderr says
which state, CRDS cache, ledger and store the command uses. See docs/cli.md.

``simulate`` and ``info`` touch no state; ``airflow-env`` and ``compute-server`` are parts of
the stack and always use its configuration.

Commands from other packages
----------------------------
Packages installed alongside may add commands through the ``iris_drs.cli`` entry-point group
(:data:`PLUGIN_GROUP`): each entry point names a ``register_cli(subparsers)`` function, called
after the library's own modules. The development stack adds ``airflow-env`` this way, so this
package never imports the stack (arrows point down). A plugin that fails to load is reported
on stderr and left out; the other commands still work.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "iris_tasks.cli_info",
    "iris_tasks.calib.cli",
    "iris_tasks.simulate.cli",
    "iris_tasks.pipelines.cli",
    "iris_tasks.orchestration.cli",
)

#: Entry-point group of the commands contributed by other installed packages.
PLUGIN_GROUP = "iris_drs.cli"

#: Commands that act on a state (CRDS cache, ledger, store, lineage): they take ``--state DIR``
#: / ``--operational`` and print the state banner.
STATE_COMMANDS = frozenset({
    "calib", "readout", "reduce", "masters", "strun", "process-frame", "ingest", "lineage",
    "ledger", "nightly", "reprocess", "nights",
})

STATE_HELP = ("work on this state directory (its crds/, ledger.sqlite, store/, lineage/); "
              "default $IRIS_CLI_STATE, else $XDG_STATE_HOME/iris-drs or ~/.local/state/iris-drs")
OPERATIONAL_HELP = ("act on the running stack's state: the IRIS_* configuration (IRIS_STATE_DIR, "
                    "IRIS_CRDS_PATH, IRIS_LEDGER_URL, IRIS_STORE_URL) that the Airflow tasks use")


def _add_state_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Below the top level the defaults are suppressed, so `iris-drs --state X readout ...`
    # is not undone by the sub-parser's own default.
    default: dict = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--state", dest="cli_state", metavar="DIR", help=STATE_HELP,
                        **({"default": None} if top else default))
    parser.add_argument("--operational", action="store_true", help=OPERATIONAL_HELP,
                        **({"default": False} if top else default))


def _parsers_below(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every sub-parser under it (``calib`` has its own sub-commands)."""
    yield parser
    for action in parser._actions:  # argparse has no public walk of its tree
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers_below(sub)


def _register_plugins(subparsers: argparse._SubParsersAction) -> None:
    """Add the commands of the ``iris_drs.cli`` entry points (one per name, in name order)."""
    from importlib.metadata import entry_points

    # An editable install next to a stale egg-info can list one entry point twice.
    plugins = {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}
    for name in sorted(plugins):
        ep = plugins[name]
        try:
            register = ep.load()
            register(subparsers)
        except ModuleNotFoundError as exc:
            if exc.name != ep.module.partition(".")[0]:
                log.warning("iris-drs: commands of entry point %r (%s, group %s) left out: %s",
                            name, ep.value, PLUGIN_GROUP, exc)
                continue
            # Declared but not shipped: the Helm image installs the project without the dev
            # stack, so `airflow-env` is simply absent there.
            log.debug("iris-drs: entry point %r: package %s not installed", name, exc.name)
        except Exception as exc:  # a broken plugin must not take the library's commands down
            log.warning("iris-drs: commands of entry point %r (%s, group %s) left out: %s: %s",
                        name, ep.value, PLUGIN_GROUP, type(exc).__name__, exc)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="iris-drs", description="IRIS data reduction system (TMT IRIS imager and IFS).",
        epilog="State: the commands that use a CRDS cache, ledger or store work on the CLI's own "
               "state directory unless --operational is given (one line on stderr says which). "
               "See docs/cli.md.")
    parser.add_argument("--version", action="version", version=f"iris-drs {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv: debug)")
    _add_state_options(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(subparsers)
    _register_plugins(subparsers)
    for name, sub in subparsers.choices.items():
        if name in STATE_COMMANDS:
            for p in _parsers_below(sub):
                _add_state_options(p, top=False)
    return parser


# -- state ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StateChoice:
    """Which state a command acts on, and the environment that points every reader at it."""

    operational: bool
    state_dir: str
    crds_cache: str
    ledger: str
    store: str
    #: ``{IRIS_*: value or None (remove)}`` to apply for the command (empty: operational).
    environment: dict[str, str | None]
    #: The operational state directory that is *not* used (CLI state only), for the banner.
    ignored_operational: str | None = None

    def banner(self) -> str:
        """The one line on stderr naming the state, CRDS cache, ledger and store."""
        where = (f"state {self.state_dir} (CRDS cache {self.crds_cache}, ledger {self.ledger}, "
                 f"store {self.store})")
        if self.operational:
            return f"iris-drs: OPERATIONAL {where}: acting on the stack's state (--operational)"
        note = "the stack's state is not touched; --operational to act on it"
        if self.ignored_operational:
            note = (f"IRIS_STATE_DIR={self.ignored_operational} of the stack is not used; "
                    "--operational to act on it")
        return f"iris-drs: CLI {where}; {note}"


def resolve_state(args: argparse.Namespace) -> StateChoice:
    """The state the parsed command acts on (see the module docstring)."""
    from .config import (
        ENV_STATE_DIR,
        Settings,
        cli_state_dir,
        state_environment,
    )

    state_arg = getattr(args, "cli_state", None)
    operational = bool(getattr(args, "operational", False))
    if operational and state_arg:
        raise ValueError("give either --state DIR or --operational, not both")
    if operational:
        env: dict[str, str | None] = {}
        cfg = Settings.from_env()
        crds = os.environ.get("IRIS_CRDS_PATH") or None
        ignored = None
    else:
        state = (os.path.abspath(os.path.expanduser(state_arg)) if state_arg
                 else str(cli_state_dir()))
        env = state_environment(state)
        with _environment(env):
            cfg = Settings.from_env()
        crds = env["IRIS_CRDS_PATH"]
        current = os.environ.get(ENV_STATE_DIR)
        same = bool(current) and os.path.realpath(current) == os.path.realpath(state)
        ignored = current if current and not same else None
    if crds is None:
        from .calib.cache import default_cache_dir

        crds = str(default_cache_dir())
    if getattr(args, "cache", None):  # `calib --cache DIR` names the cache explicitly
        crds = os.path.abspath(os.path.expanduser(args.cache))
    from .orchestration.ledger import parse_location, redact_url

    return StateChoice(operational=operational, state_dir=str(cfg.state_dir), crds_cache=str(crds),
                       ledger=parse_location(cfg.ledger_path).display,
                       store=redact_url(cfg.store_url), environment=env,
                       ignored_operational=ignored)


@contextlib.contextmanager
def _environment(changes: dict[str, str | None]) -> Iterator[None]:
    """Apply ``changes`` to os.environ (None removes), restoring every variable afterwards."""
    saved = dict(os.environ)
    try:
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def using_state(choice: StateChoice) -> Iterator[None]:
    """Run a command on ``choice``: the environment points at it, and crds is configured
    afresh for its cache (and forgotten again afterwards, for in-process callers)."""
    calib_cache = sys.modules.get("iris_tasks.calib.cache")
    if calib_cache is not None:
        calib_cache.reset()
    try:
        with _environment(choice.environment):
            yield
    finally:
        calib_cache = sys.modules.get("iris_tasks.calib.cache")
        if calib_cache is not None:
            calib_cache.reset()


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to ``sys.stderr`` as it is when a record is emitted: ``main`` called
    from Python (tests, notebooks) may run under a swapped stderr that is closed later."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - the StreamHandler attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - StreamHandler.__init__ assigns it
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    if args.command != "strun" or args.verbose:  # stpipe's strun sets up its own log lines
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            handlers=[_CurrentStderr()])
    try:
        if args.command not in STATE_COMMANDS:
            if args.cli_state or args.operational:
                raise ValueError(f"{args.command} takes no --state/--operational: it "
                                 + ("uses no state" if args.command in ("info", "simulate")
                                    else "is part of the stack and always uses its configuration"))
            return int(args.handler(args) or 0)
        choice = resolve_state(args)
        print(choice.banner(), file=sys.stderr, flush=True)
        args.state_choice = choice  # handlers that record lineage write it into this state
        with using_state(choice):
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
