"""The IRIS operations page: a small read-only FastAPI app mounted into the Airflow api-server.

Routes (relative to the mount point, ``/iris-ops`` in Airflow):

``GET /``                      the night page (HTML): the health banner, pending approvals, the
                               live timeline (``?view=timeline``, default: newest first,
                               ``detector``, ``obsname``, ``status``, ``page``, ``per_page``) or
                               the frames grouped by detector and OBSNAME (``?view=groups``),
                               the landing area, masters, quarantine; ``?night=YYYY-MM-DD``,
                               ``?refresh=N`` seconds between updates in place (0: off)
``GET /api/night``             the same data as JSON (same parameters)
``GET /api/health``            the health banner as JSON
``GET /ql/{frame_id}/{kind}``  a frame's quicklook PNG (``raw`` or ``reduced``)
``GET /ql-master/{name}``      a nightly master's preview PNG
``GET /object?key=...``        an object of the store (presigned redirect for S3, file otherwise)
``GET /healthz``               liveness

Inside Airflow every route requires an authenticated Airflow user (the api-server mounts
plugin apps without any auth of their own). Nothing here writes anywhere.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape

from . import health as health_checks
from . import nights as stale_nights
from .ledger import TimelineQuery
from .views import ApprovalRow, ComponentHealth, FrameRow, LandingView, NightState, NightView

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: ``load_night(night, query)``: the night's view; ``query`` None: the whole night (grouped view)
Loader = Callable[[str | None, TimelineQuery | None], NightView]
Check = Callable[[], list[ComponentHealth]]
NIGHT_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
#: The page waits at most this long for the ledger and the checks (each check's own
#: connections time out sooner, health.CHECK_TIMEOUT): it answers even when parts hang.
READ_TIMEOUT = 5.0
DEFAULT_REFRESH = 15


def _fmt_seconds(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f} s"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def task_instance_url(base: str, dag_id: str, run_id: str, task_id: str | None,
                      map_index: int | None, mapped: bool = False) -> str:
    """The Airflow 3 UI page of a task instance (its Logs tab is the default view); for a
    mapped task with an unknown index, the list of its mapped instances."""
    q = urllib.parse.quote
    url = f"{base.rstrip('/')}/dags/{q(dag_id, safe='')}/runs/{q(run_id, safe='')}"
    if task_id:
        url += f"/tasks/{q(task_id, safe='')}"
        if map_index is not None and map_index >= 0:
            url += f"/mapped/{map_index}"
        elif mapped:
            url += "/mapped"
    return url


def required_actions_url(base: str, a: ApprovalRow) -> str:
    """The Required Actions tab of a waiting human-in-the-loop task in the Airflow UI."""
    return task_instance_url(base, a.dag_id, a.run_id, a.task_id, a.map_index) + "/required_actions"


def markdown_html(text: str) -> Markup:
    """A request's markdown body (QA tables) as HTML: raw HTML in it is escaped, links are
    validated (markdown-it's commonmark preset, tables on); without markdown-it, the text."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # pragma: no cover - Airflow brings markdown-it-py (through rich)
        return Markup(f"<pre>{escape(text)}</pre>")
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    return Markup(md.render(text))  # noqa: S704 - html disabled: markdown-it escapes the input


def _airflow_auth_dependency() -> Callable[..., Any] | None:
    """Airflow's own "is this an authenticated user" check, when running inside Airflow."""
    try:
        from airflow.api_fastapi.core_api.security import requires_authenticated
    except ImportError:  # pragma: no cover - outside Airflow
        return None
    return requires_authenticated()


def create_app(
    load_night: Loader | None = None,
    *,
    load_frame: Callable[[str], FrameRow | None] | None = None,
    checks: Mapping[str, Check] | None = None,
    load_approvals: Callable[[], list[ApprovalRow]] | None = None,
    look_at_landing: Callable[[], LandingView] | None = None,
    load_night_states: Callable[[], list[NightState]] | None = None,
    airflow_base_url: str | None = None,
    require_auth: bool = True,
    allowed_roots: list[str | os.PathLike[str]] | None = None,
    open_store: Callable[[], Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    read_timeout: float = READ_TIMEOUT,
) -> FastAPI:
    """Build the app.

    ``load_night(night, query)`` returns a :class:`NightView` (default: read the ledger
    configured by the IRIS_* environment); ``load_frame(frame_id)`` one frame for its
    quicklooks. ``checks`` (name -> callable returning banner lines), ``load_approvals`` (the
    pending Required Actions), ``look_at_landing`` and ``load_night_states`` (which nights
    are stale under the operational CRDS context) feed the banner, the approvals, the landing
    section and the nights table; with the default ``load_night`` they default to the
    deployment's (Airflow's metadata DB, the compute socket, the object store,
    ``$IRIS_LANDING``, the ledger + CRDS cache), otherwise to nothing. Each is called with a time limit (``read_timeout`` in all).
    ``airflow_base_url`` prefixes links into the Airflow UI (default ``[api] base_url`` or
    ``/``). ``require_auth`` puts every route behind Airflow's authentication. Quicklook
    PNGs are only served from below ``allowed_roots`` (default: the state directory).
    ``open_store()`` returns the object store for ``/object`` links. Previews rendered on
    demand (raw frames, masters) are cached in ``cache_dir`` (default ``<first allowed
    root>/ops_cache``), the only place this app writes to.
    """
    if load_night is None:
        from . import airflow_db
        from . import landing as landing_area
        from .ledger import load_frame_from_env, load_night_from_env

        load_night = load_night_from_env
        load_frame = load_frame or load_frame_from_env
        checks = health_checks.default_checks() if checks is None else checks
        load_approvals = load_approvals or airflow_db.pending_approvals
        look_at_landing = look_at_landing or landing_area.look
        load_night_states = load_night_states or stale_nights.CachedNightStates()
    checks = dict(checks or {})
    if airflow_base_url is None:
        airflow_base_url = _airflow_base_url()
    if allowed_roots is None:
        allowed_roots = [_state_dir()]
    roots = [Path(r).resolve() for r in allowed_roots]
    cache = Path(cache_dir).resolve() if cache_dir else roots[0] / "ops_cache"
    if open_store is None:
        open_store = _open_store_from_env
    # Names of this app's bounded calls (a call still running is not started twice).
    tag = uuid.uuid4().hex[:8]

    deps = []
    if require_auth:
        dep = _airflow_auth_dependency()
        if dep is None:
            raise RuntimeError("require_auth=True needs Airflow's api_fastapi security module")
        deps.append(Depends(dep))

    app = FastAPI(title="IRIS operations", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=deps)
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)),
                      autoescape=select_autoescape(["html", "xml"]))
    env.filters["md"] = markdown_html
    env.globals.update(
        fmt_s=_fmt_seconds,
        fmt_v=_fmt_value,
        fmt_t=_fmt_time,
        task_url=lambda d, r, t, m, mapped=False: task_instance_url(airflow_base_url, d, r, t, m, mapped),
        actions_url=lambda a: required_actions_url(airflow_base_url, a),
        all_actions_url=f"{airflow_base_url.rstrip('/')}/required_actions?response_received=false",
        reprocess_url=f"{airflow_base_url.rstrip('/')}/dags/iris_reprocess",
        backfill_url=f"{airflow_base_url.rstrip('/')}/dags/iris_reprocess_nights",
    )
    template = env.get_template("night.html")

    def _timed_night(night: str | None, query: TimelineQuery | None) -> tuple[NightView, float]:
        t0 = time.monotonic()
        return load_night(night, query), time.monotonic() - t0

    def _view(night: str | None, query: TimelineQuery | None = None, *, live: bool = False) -> NightView:
        """The night's view; ``live``: with the banner, approvals and landing area, each read
        with a time limit."""
        now = dt.datetime.now(dt.UTC)
        calls: dict[str, Callable[[], Any]] = {
            f"{tag}:ledger:{night}:{query}": lambda: _timed_night(night, query)}
        if live:
            calls.update({f"{tag}:check:{name}": fn for name, fn in checks.items()})
            if load_approvals is not None:
                calls[f"{tag}:approvals"] = load_approvals
            if look_at_landing is not None:
                calls[f"{tag}:landing"] = look_at_landing
            if load_night_states is not None:
                calls[f"{tag}:night_states"] = load_night_states
        results = health_checks.bounded(calls, read_timeout)
        got = results[f"{tag}:ledger:{night}:{query}"]
        seconds = None
        if isinstance(got, BaseException):  # the page renders even when the ledger does not answer
            if not isinstance(got, health_checks.NoAnswer):
                log.error("loading the night failed: %s", got, exc_info=got)
            view = NightView(night=night, problem=f"could not read the ledger: {got}")
        else:
            view, seconds = got
        view.now = now.isoformat(timespec="milliseconds")
        if not live:
            return view
        approvals = results.get(f"{tag}:approvals")
        if isinstance(approvals, BaseException):
            log.warning("pending approvals not read: %s", approvals)
            view.problem = "; ".join(filter(None, [view.problem, f"pending approvals not read: {approvals}"]))
        elif approvals:
            view.approvals = approvals
            _mark_awaiting(view)
        if look_at_landing is not None:
            view.landing = _landing(results.get(f"{tag}:landing"), view)
        if load_night_states is not None:
            states = results.get(f"{tag}:night_states")
            if isinstance(states, BaseException):
                if not isinstance(states, health_checks.NoAnswer):
                    log.warning("stale nights not computed: %s", states)
                view.night_states_problem = f"stale nights not known yet: {states}"
            else:
                view.night_states = states
        names = list(checks)
        health = health_checks.assemble([results[f"{tag}:check:{n}"] for n in names], names, now)
        health.components += [health_checks.ledger_line(view, seconds),
                              health_checks.frame_flow(view, view.landing, now)]
        view.health = health
        return view

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        # A browser that lost its session gets Airflow's login page instead of a JSON 401.
        wants_html = "text/html" in request.headers.get("accept", "")
        if exc.status_code == 401 and wants_html and require_auth:
            login = _login_url(str(request.url))
            if login:
                return RedirectResponse(login, status_code=303)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    def _query(view: str, detector: str | None, obsname: str | None, status: str | None,
               page_no: int, per_page: int) -> TimelineQuery | None:
        if view == "groups":
            return None
        return TimelineQuery(detector=detector or None, obsname=obsname or None,
                             status=status or None, page=page_no, per_page=per_page)

    @app.get("/", response_class=HTMLResponse)
    def night_page(night: str | None = Query(None, pattern=NIGHT_PATTERN),
                   refresh: int = Query(DEFAULT_REFRESH, ge=0, le=3600),
                   view: str = Query("timeline", pattern="^(timeline|groups)$"),
                   detector: str | None = Query(None, max_length=40),
                   obsname: str | None = Query(None, max_length=40),
                   status: str | None = Query(None, max_length=40),
                   page: int = Query(1, ge=1, le=100000),
                   per_page: int = Query(50, ge=5, le=500)) -> HTMLResponse:
        query = _query(view, detector, obsname, status, page, per_page)
        data = _view(night, query, live=True)
        # The links keep what the operator chose (no night chosen: the page follows the
        # newest night, also across the night change).
        params = {"night": night, "view": None if view == "timeline" else view, "detector": detector,
                  "obsname": obsname, "status": status, "page": page if page > 1 else None,
                  "per_page": per_page if per_page != 50 else None,
                  "refresh": refresh if refresh != DEFAULT_REFRESH else None}

        def link(**changes: Any) -> str:
            merged = {**params, **changes}
            return "?" + urllib.parse.urlencode({k: v for k, v in merged.items() if v not in (None, "")})

        html = template.render(view=data, refresh=refresh, mode=view, query=query, params=params,
                               link=link)
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/api/night")
    def night_json(night: str | None = Query(None, pattern=NIGHT_PATTERN),
                   view: str = Query("timeline", pattern="^(timeline|groups)$"),
                   detector: str | None = Query(None, max_length=40),
                   obsname: str | None = Query(None, max_length=40),
                   status: str | None = Query(None, max_length=40),
                   page: int = Query(1, ge=1, le=100000),
                   per_page: int = Query(50, ge=5, le=500)) -> JSONResponse:
        data = _view(night, _query(view, detector, obsname, status, page, per_page), live=True)
        return JSONResponse(data.to_json(), headers={"Cache-Control": "no-store"})

    @app.get("/api/health")
    def health_json() -> JSONResponse:
        data = _view(None, TimelineQuery(per_page=5), live=True)
        return JSONResponse(data.to_json()["health"], headers={"Cache-Control": "no-store"})

    @app.get("/api/nights")
    def nights_json(stale: bool = Query(False)) -> JSONResponse:
        """Per night: current or stale under the operational CRDS context (``stale=true``:
        the stale ones only), the REST face of ``iris-drs nights --stale``."""
        if load_night_states is None:
            raise HTTPException(404, "no night states in this deployment")
        got = health_checks.bounded({f"{tag}:night_states": load_night_states},
                                    read_timeout)[f"{tag}:night_states"]
        if isinstance(got, BaseException):
            raise HTTPException(503, f"stale nights not known yet: {got}")
        rows = [asdict(n) for n in got if n.stale or not stale]
        return JSONResponse(rows, headers={"Cache-Control": "no-store"})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    def _png(ref: str | None) -> Response:
        if not ref:
            raise HTTPException(404, "no quicklook")
        path = Path(ref)
        if path.is_absolute():
            path = path.resolve()
            if path.suffix.lower() != ".png" or not any(path.is_relative_to(r) for r in roots):
                raise HTTPException(403, "not an allowed quicklook path")
            if not path.is_file():
                raise HTTPException(404, "quicklook file missing")
            return FileResponse(path, media_type="image/png",
                                headers={"Cache-Control": "max-age=300"})
        return _object_response(ref, open_store)  # an object key in the store

    def _rendered(fits_path: str | None, tag: str) -> Response:
        """A zscale preview of a FITS file (raw ramp: last-first read), made once and cached."""
        if not fits_path:
            raise HTTPException(404, "no quicklook")
        src = Path(fits_path).resolve()
        if not any(src.is_relative_to(r) for r in roots):
            raise HTTPException(403, "not an allowed data path")
        if not src.is_file():
            raise HTTPException(404, "data file gone")
        out = cache / f"{tag}.png"
        if not out.is_file() or out.stat().st_mtime < src.stat().st_mtime:
            from iris_tasks.quicklook import make_quicklook

            try:
                make_quicklook(src, out, size=256)
            except Exception as exc:
                log.warning("preview of %s failed: %s", src, exc)
                raise HTTPException(500, f"preview failed: {exc}") from exc
        return FileResponse(out, media_type="image/png", headers={"Cache-Control": "max-age=300"})

    @app.get("/ql/{frame_id}/{kind}")
    def frame_quicklook(frame_id: str, kind: str) -> Response:
        if kind not in ("raw", "reduced"):
            raise HTTPException(404, "kind must be raw or reduced")
        frame = load_frame(frame_id) if load_frame else _find_frame(load_night, _view(None), frame_id)
        if frame is None:
            raise HTTPException(404, "unknown frame")
        if kind == "raw" and not frame.ql_raw:
            return _rendered(frame.raw_path, f"{_safe_tag(frame.frame_id)}_raw")
        return _png(frame.ql_raw if kind == "raw" else frame.ql_reduced)

    @app.get("/ql-master/{name}")
    def master_quicklook(name: str, night: str | None = Query(None, pattern=NIGHT_PATTERN)) -> Response:
        for m in _view(night).masters:
            if m.name == name:
                if m.ql:
                    return _png(m.ql)
                return _rendered(m.path, f"master_{_safe_tag(m.name)}")
        raise HTTPException(404, "unknown master")

    @app.get("/object")
    def store_object(key: str = Query(..., min_length=1, max_length=1024)) -> Response:
        return _object_response(key, open_store)

    return app


def _safe_tag(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:120]


def _find_frame(load_night: Loader, view: NightView, frame_id: str) -> FrameRow | None:
    """A frame by id through the night loader (when no frame loader is given)."""
    for f in view.frames:
        if f.frame_id == frame_id:
            return f
    for night in view.nights:
        if night == view.night:
            continue
        for f in load_night(night, None).frames:
            if f.frame_id == frame_id:
                return f
    return None


def _mark_awaiting(view: NightView) -> None:
    """Masters of the night offered in a pending approval are "awaiting approval"."""
    offered = {name for a in view.approvals if a.night == view.night for name in a.masters}
    for m in view.masters:
        if m.name in offered:
            m.status = "awaiting approval"
            m.note = m.note if m.note != "no QA report in the ledger: see the qa task log" else ""


def _landing(got: Any, view: NightView) -> LandingView:
    """The landing section: the survey, with the ledger's first-seen times; the ledger's list
    and the reason when the survey failed or did not answer."""
    from .landing import unseen

    if isinstance(got, BaseException) or got is None:
        where = _landing_setting()
        return unseen(where, str(got) if got is not None else "not surveyed", view.ignored)
    first_seen = {i.uri: i.since for i in view.ignored}
    for i in got.ignored:
        i.since = i.since or first_seen.get(i.uri)
    view.ignored = got.ignored
    return got


def _landing_setting() -> str:
    try:
        from iris_tasks.config import settings

        return settings().landing
    except Exception:  # pragma: no cover - a broken configuration is shown elsewhere
        return os.environ.get("IRIS_LANDING", "?")


def _fmt_time(text: str | None, with_date: bool = False) -> str:
    """An ISO-8601 UTC time as the page shows it: ``07:12:03`` (with the date on request)."""
    if not text:
        return ""
    text = str(text).replace("T", " ")
    return text[:19] if with_date else text[11:19]


def _object_response(key: str, open_store: Callable[[], Any]) -> Response:
    if ".." in key.split("/") or key.startswith("/"):
        raise HTTPException(400, "bad key")
    try:
        store = open_store()
    except Exception as exc:
        raise HTTPException(503, f"object store not configured: {exc}") from exc
    if store is None:
        raise HTTPException(503, "object store not configured")
    if hasattr(store, "presigned_url"):
        # S3: let the browser fetch it directly (no big FITS through the api-server).
        return RedirectResponse(store.presigned_url(key, expires=900), status_code=307)
    info = store.head(key)
    if info is None:
        raise HTTPException(404, "no such object")
    url = store.url(key)
    if url.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
        media = "image/png" if path.suffix.lower() == ".png" else "application/octet-stream"
        return FileResponse(path, media_type=media, filename=None if media == "image/png" else path.name)
    return RedirectResponse(url, status_code=307)


def _state_dir() -> Path:
    try:
        from iris_tasks.config import settings

        return settings().state_dir
    except ImportError:  # pragma: no cover - plugin deployed without the package
        return Path(os.environ.get("IRIS_STATE_DIR", ".")).resolve()


def _open_store_from_env() -> Any:
    from iris_tasks.config import settings
    from iris_tasks.storage import open_store

    return open_store(settings().store_url)


def _airflow_base_url() -> str:
    try:
        from airflow.configuration import conf

        base = conf.get("api", "base_url", fallback="") or ""
    except Exception:  # pragma: no cover - outside Airflow
        base = ""
    # Same origin as the page: a path is enough and survives port-forwards and proxies.
    return urllib.parse.urlsplit(base).path.rstrip("/") or ""


def _login_url(next_url: str) -> str | None:
    try:
        from airflow.api_fastapi.app import get_auth_manager

        return get_auth_manager().get_url_login(next_url=next_url)
    except Exception:  # pragma: no cover - best effort
        return None
