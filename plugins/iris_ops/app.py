"""The IRIS operations page: a small read-only FastAPI app mounted into the Airflow api-server.

Routes (relative to the mount point, ``/iris-ops`` in Airflow):

``GET /``                      the night page (HTML; ``?night=YYYY-MM-DD``, ``?refresh=N``)
``GET /api/night``             the same data as JSON
``GET /ql/{frame_id}/{kind}``  a frame's quicklook PNG (``raw`` or ``reduced``)
``GET /ql-master/{name}``      a nightly master's preview PNG
``GET /object?key=...``        an object of the store (presigned redirect for S3, file otherwise)
``GET /healthz``               liveness

Inside Airflow every route requires an authenticated Airflow user (the api-server mounts
plugin apps without any auth of their own). Nothing here writes anywhere.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from .views import NightView

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
Loader = Callable[[str | None], NightView]


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
    airflow_base_url: str | None = None,
    require_auth: bool = True,
    allowed_roots: list[str | os.PathLike[str]] | None = None,
    open_store: Callable[[], Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> FastAPI:
    """Build the app.

    ``load_night(night)`` returns a :class:`NightView` (default: read the ledger configured by
    the IRIS_* environment). ``airflow_base_url`` prefixes task-log links (default
    ``[api] base_url`` or ``/``). ``require_auth`` puts every route behind Airflow's
    authentication. Quicklook PNGs are only served from below ``allowed_roots`` (default: the
    state directory). ``open_store()`` returns the object store for ``/object`` links.
    Previews rendered on demand (raw frames, masters) are cached in ``cache_dir`` (default
    ``<first allowed root>/ops_cache``), the only place this app writes to.
    """
    if load_night is None:
        from .ledger import load_night_from_env as load_night  # noqa: N813
    if airflow_base_url is None:
        airflow_base_url = _airflow_base_url()
    if allowed_roots is None:
        allowed_roots = [_state_dir()]
    roots = [Path(r).resolve() for r in allowed_roots]
    cache = Path(cache_dir).resolve() if cache_dir else roots[0] / "ops_cache"
    if open_store is None:
        open_store = _open_store_from_env

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
    env.globals.update(
        fmt_s=_fmt_seconds,
        fmt_v=_fmt_value,
        task_url=lambda d, r, t, m, mapped=False: task_instance_url(airflow_base_url, d, r, t, m, mapped),
    )
    page = env.get_template("night.html")

    def _view(night: str | None) -> NightView:
        try:
            return load_night(night)
        except Exception as exc:  # the page must render even when the ledger is unreadable
            log.exception("loading the night failed")
            return NightView(night=night, problem=f"could not read the ledger: {exc}")

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

    @app.get("/", response_class=HTMLResponse)
    def night_page(night: str | None = Query(None, pattern=r"^\d{4}-\d{2}-\d{2}$"),
                   refresh: int = Query(30, ge=0, le=3600)) -> HTMLResponse:
        view = _view(night)
        html = page.render(view=view, refresh=refresh)
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/api/night")
    def night_json(night: str | None = Query(None, pattern=r"^\d{4}-\d{2}-\d{2}$")) -> JSONResponse:
        return JSONResponse(_view(night).to_json(), headers={"Cache-Control": "no-store"})

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
        view = _view(None)
        frame = _find_frame(load_night, view, frame_id)
        if kind == "raw" and not frame.ql_raw:
            return _rendered(frame.raw_path, f"{_safe_tag(frame.frame_id)}_raw")
        return _png(frame.ql_raw if kind == "raw" else frame.ql_reduced)

    @app.get("/ql-master/{name}")
    def master_quicklook(name: str, night: str | None = Query(None, pattern=r"^\d{4}-\d{2}-\d{2}$")) -> Response:
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


def _find_frame(load_night: Loader, view: NightView, frame_id: str):
    for f in view.frames:
        if f.frame_id == frame_id:
            return f
    # Not in the latest night: look through the others the ledger knows.
    for night in view.nights:
        if night == view.night:
            continue
        for f in load_night(night).frames:
            if f.frame_id == frame_id:
                return f
    raise HTTPException(404, "unknown frame")


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
