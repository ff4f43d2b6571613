"""Where the orchestration keeps its state, read from ``IRIS_*`` environment variables.

One place decides every path the DAGs and the CLI use, so a task, ``iris-drs process-frame``
and a test all agree on where the ledger, the work area and the quarantine are:

=====================  =====================================================================
``IRIS_STATE_DIR``     root of the run state (default ``<repo>/var`` in a source checkout,
                       else ``~/.iris_drs``)
``IRIS_LANDING``       landing area: a directory or ``s3://bucket/prefix`` (default
                       ``<state>/landing``)
``IRIS_LEDGER_URL``    the frame ledger: a PostgreSQL URL (``postgresql://user@host:5432/db``,
                       ``postgresql+psycopg2://...``, ``?schema=name``), ``sqlite:///path`` or
                       a path (default: the SQLite file ``<state>/ledger.sqlite``)
``IRIS_LEDGER_SCHEMA`` PostgreSQL schema of the ledger tables when the URL names none
                       (default: the connection's search_path, normally ``public``)
``IRIS_STORE_URL``     object store for raw frames and products (see iris_tasks.storage;
                       default ``file://<state>/store``)
``IRIS_CRDS_PATH``     CRDS cache (read by iris_tasks.calib; default ``<repo>/var/crds``)
``IRIS_CRDS_STORE``    a store URL where hosts that share no disk replicate the CRDS cache
                       (iris_tasks.calib.replica; default: unset, not replicated)
``IRIS_CRDS_STORE_POLL``  seconds between a host's looks at the replica's pointer (default 5)
``IRIS_S3_CONN_ID``    Airflow connection for an S3 landing area (default ``iris_s3``)
``IRIS_ALERT_WEBHOOK`` URL that deadline alerts are POSTed to as JSON (default: off)
``IRIS_MAX_FRAMES``    most frames one real-time run claims (default 32)
``IRIS_LANDING_POLL``  seconds between landing scans in the triggerer (default 0.5)
``IRIS_LANDING_SETTLE_SECONDS``  a frame written in place (not renamed) is claimed once whole
                       and unmodified this long (default 1)
``IRIS_LANDING_STALE_SECONDS``  a frame still incomplete after this long is claimed and
                       quarantined as truncated (default 120)
``IRIS_MIN_MASTER_FRAMES``  fewest frames a master dark/flat is built from (default 3)
``IRIS_FLEXURE_PRIOR_MINUTES``  an IFS frame whose flexure it cannot measure itself takes
                       the offsets measured on the night's frames of its mode/scale/filter
                       taken within this many minutes (default 30; 0: off)
``IRIS_COMPUTE_SLOTS`` most frames the real-time DAG processes at once, across all its runs
                       (default: the CPU count; claim, ingest and summaries do not count)
=====================  =====================================================================

These are the *operational* configuration: what the Airflow tasks and the stack's components
read. The ``iris-drs`` command line does not use them unless told to (``--operational``): it
works on its own state directory (:func:`cli_state_dir`, ``$IRIS_CLI_STATE``, else
``$XDG_STATE_HOME/iris-drs``, else ``~/.local/state/iris-drs``) laid out as
:func:`state_environment` says, so a test night reduced from a shell never becomes the running
stack's CRDS context, ledger rows or stored objects (docs/cli.md).

Nothing here imports Airflow, the science stack or anything else of the project: the DAG
files read it at parse time, and every layer (the CRDS cache in ``iris_tasks.calib``, the
compute server, the dev stack) takes its defaults and its "off" vocabulary from here.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

ENV_STATE_DIR = "IRIS_STATE_DIR"
ENV_LANDING = "IRIS_LANDING"
ENV_STORE_URL = "IRIS_STORE_URL"
ENV_LEDGER_URL = "IRIS_LEDGER_URL"
ENV_LEDGER_SCHEMA = "IRIS_LEDGER_SCHEMA"
ENV_CRDS_PATH = "IRIS_CRDS_PATH"
ENV_CRDS_STORE = "IRIS_CRDS_STORE"
ENV_CRDS_STORE_POLL = "IRIS_CRDS_STORE_POLL"
ENV_S3_CONN_ID = "IRIS_S3_CONN_ID"
ENV_ALERT_WEBHOOK = "IRIS_ALERT_WEBHOOK"
ENV_MAX_FRAMES = "IRIS_MAX_FRAMES"
ENV_LANDING_SETTLE = "IRIS_LANDING_SETTLE_SECONDS"
ENV_LANDING_STALE = "IRIS_LANDING_STALE_SECONDS"
ENV_LANDING_POLL = "IRIS_LANDING_POLL"
ENV_MIN_MASTER_FRAMES = "IRIS_MIN_MASTER_FRAMES"
ENV_FLEXURE_PRIOR_MINUTES = "IRIS_FLEXURE_PRIOR_MINUTES"
ENV_COMPUTE_SLOTS = "IRIS_COMPUTE_SLOTS"
ENV_CLI_STATE = "IRIS_CLI_STATE"
ENV_NATIVE_CACHE = "IRIS_NATIVE_CACHE"
ENV_COMPUTE_SOCKET = "IRIS_COMPUTE_SOCKET"

DEFAULT_S3_CONN_ID = "iris_s3"


def default_state_dir() -> Path:
    """``$IRIS_STATE_DIR``, else ``<repo>/var`` in a source checkout, else ``~/.iris_drs``."""
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / "var"
    return Path.home() / ".iris_drs"


#: What switches a feature off when a variable says it (``IRIS_COMPUTE_SOCKET=off``,
#: ``IRIS_NATIVE_CACHE=0``, ``IRIS_PRELOAD=no``, ``IRIS_STACK_CGROUP=false``...): one vocabulary.
OFF_VALUES = ("0", "off", "false", "no", "none")


def is_off(value: str | None) -> bool:
    """Whether an environment value switches its feature off (empty is not "off": unset)."""
    return value is not None and value.strip().lower() in OFF_VALUES


@dataclass(frozen=True)
class Settings:
    """Resolved orchestration paths and knobs (see the module docstring)."""

    state_dir: Path
    landing: str
    store_url: str
    s3_conn_id: str
    alert_webhook: str | None
    max_frames_per_run: int
    landing_poll_seconds: float
    min_master_frames: int = 3
    compute_slots: int = 1
    ledger_url: str | None = None
    # The landing contract (landing.py): a file written in place is claimed once whole and
    # untouched this long; one still incomplete after the stale time is claimed to be
    # quarantined as truncated.
    landing_settle_seconds: float = 1.0
    landing_stale_seconds: float = 120.0
    flexure_prior_minutes: float = 30.0

    @property
    def ledger_path(self) -> Path | str:
        """Where the frame ledger is, as FrameLedger/open_ledger take it: the IRIS_LEDGER_URL
        database when set (a str), else the SQLite file under the state directory."""
        return self.ledger_url or self.state_dir / "ledger.sqlite"

    @property
    def work_dir(self) -> Path:
        return self.state_dir / "work"

    @property
    def quarantine_dir(self) -> Path:
        return self.state_dir / "quarantine"

    @property
    def lineage_dir(self) -> Path:
        return self.state_dir / "lineage"

    @property
    def landing_is_s3(self) -> bool:
        return self.landing.startswith("s3://")

    @classmethod
    def from_env(cls) -> Settings:
        state = default_state_dir()
        landing = os.environ.get(ENV_LANDING) or str(state / "landing")
        if not landing.startswith("s3://"):
            landing = str(Path(landing).expanduser().resolve())
        return cls(
            state_dir=state,
            landing=landing,
            store_url=os.environ.get(ENV_STORE_URL) or (state / "store").resolve().as_uri(),
            s3_conn_id=os.environ.get(ENV_S3_CONN_ID) or DEFAULT_S3_CONN_ID,
            alert_webhook=os.environ.get(ENV_ALERT_WEBHOOK) or None,
            max_frames_per_run=int(os.environ.get(ENV_MAX_FRAMES) or 32),
            landing_poll_seconds=float(os.environ.get(ENV_LANDING_POLL) or 0.5),
            min_master_frames=int(os.environ.get(ENV_MIN_MASTER_FRAMES) or 3),
            compute_slots=max(1, int(os.environ.get(ENV_COMPUTE_SLOTS) or os.cpu_count() or 1)),
            ledger_url=_ledger_url(os.environ.get(ENV_LEDGER_URL), os.environ.get(ENV_LEDGER_SCHEMA)),
            landing_settle_seconds=float(os.environ.get(ENV_LANDING_SETTLE) or 1.0),
            landing_stale_seconds=float(os.environ.get(ENV_LANDING_STALE) or 120.0),
            flexure_prior_minutes=float(os.environ.get(ENV_FLEXURE_PRIOR_MINUTES) or 30.0),
        )


def _ledger_url(url: str | None, schema: str | None) -> str | None:
    """IRIS_LEDGER_URL with IRIS_LEDGER_SCHEMA folded in as ``schema=``, so the one string
    handed to every FrameLedger (and serialized into the landing trigger) is complete."""
    url = (url or "").strip() or None
    schema = (schema or "").strip()
    if url is None or not schema or not url.lower().startswith("postgres"):
        return url
    if "schema" in urllib.parse.parse_qs(url.partition("?")[2]):
        return url  # the URL's own choice wins
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


def crds_path_setting() -> Path | None:
    """``$IRIS_CRDS_PATH`` (the CRDS cache iris_tasks.calib configures), None when unset.

    Read at each call: the command line points it at its own state's cache before anything
    configures crds (iris_tasks.calib applies the repository/home defaults)."""
    value = os.environ.get(ENV_CRDS_PATH, "").strip()
    return Path(value).expanduser() if value else None


def crds_store_setting() -> str | None:
    """``$IRIS_CRDS_STORE`` (the object-store replica of the CRDS cache), None when unset."""
    return os.environ.get(ENV_CRDS_STORE, "").strip() or None


def crds_store_poll_seconds() -> float:
    """``$IRIS_CRDS_STORE_POLL``: seconds between looks at the replica's pointer (default 5)."""
    value = os.environ.get(ENV_CRDS_STORE_POLL, "").strip()
    return float(value) if value else 5.0


def native_cache_setting() -> Path | bool:
    """``$IRIS_NATIVE_CACHE``: False when switched off (:func:`is_off`), a path when one is
    given, True for the default place (beside the CRDS cache)."""
    value = os.environ.get(ENV_NATIVE_CACHE, "").strip()
    if is_off(value):
        return False
    return Path(value).expanduser() if value else True


def cli_state_dir() -> Path:
    """The ``iris-drs`` command line's own state directory (not the operational one).

    ``$IRIS_CLI_STATE``, else ``$XDG_STATE_HOME/iris-drs``, else ``~/.local/state/iris-drs``
    (the XDG base-directory default). Never derived from ``IRIS_STATE_DIR``: a shell that
    sourced ``iris-drs airflow-env`` has that set, and the CLI must still not act on it
    unless asked (``--operational``).
    """
    env = os.environ.get(ENV_CLI_STATE, "").strip()
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_STATE_HOME", "").strip()
    # XDG: a relative XDG_STATE_HOME is invalid and must be ignored.
    base = (Path(xdg).expanduser() if xdg and Path(xdg).is_absolute()
            else Path.home() / ".local" / "state")
    return (base / "iris-drs").resolve()


def state_environment(state_dir: str | os.PathLike[str]) -> dict[str, str | None]:
    """``IRIS_*`` values that make every reader of this module (and iris_tasks.calib) use a
    self-contained state directory: ``{name: value}``, ``None`` meaning "remove".

    Layout: ``<state>/crds`` (CRDS cache), ``<state>/ledger.sqlite``, ``<state>/store``
    (``file://`` object store), ``<state>/landing``, ``<state>/work``, ``<state>/lineage``,
    ``<state>/quarantine``. Removed: the ledger database URL and schema (the SQLite file under
    the state is used), the CRDS cache's replica in the object store (a test night must not
    publish into the operational one), the deadline-alert webhook (operators must not be paged by a test
    frame), a native-reference cache placed elsewhere (it would be written into). The compute
    server is switched off: it is the stack's, and works on the stack's configuration.
    """
    state = Path(state_dir).expanduser().resolve()
    native = os.environ.get(ENV_NATIVE_CACHE, "").strip().lower()
    return {
        ENV_STATE_DIR: str(state),
        ENV_CRDS_PATH: str(state / "crds"),
        ENV_CRDS_STORE: None,
        ENV_STORE_URL: (state / "store").as_uri(),
        ENV_LANDING: str(state / "landing"),
        ENV_LEDGER_URL: None,
        ENV_LEDGER_SCHEMA: None,
        ENV_ALERT_WEBHOOK: None,
        ENV_COMPUTE_SOCKET: "off",
        # "0"/"off" (no native cache) is kept; a path would put the CLI's copies elsewhere.
        ENV_NATIVE_CACHE: os.environ[ENV_NATIVE_CACHE]
        if native in ("0", "off", "false", "no") else None,
    }


def settings() -> Settings:
    """Current settings (re-read each call: tests and the CLI change the environment)."""
    return Settings.from_env()
