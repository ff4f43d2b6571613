"""Airflow plugin: the IRIS operations page ("IRIS night" in the Airflow UI menu).

The page is a read-only FastAPI app (plugins/iris_ops) mounted at ``/iris-ops`` in the
api-server; ``external_views`` adds the menu entry that shows it inside the Airflow UI.
Every route requires an authenticated Airflow user.
"""

from __future__ import annotations

import logging

from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)

URL_PREFIX = "/iris-ops"


def _app():
    # Imported lazily so a scheduler or worker that loads plugins (for listeners, macros) does
    # not build the web app; only the api-server reads `fastapi_apps`.
    from iris_ops.app import create_app

    return create_app()


class _LazyApp:
    """ASGI app built on first request (keeps plugin import cheap in non-web components)."""

    def __init__(self) -> None:
        self._app = None

    async def __call__(self, scope, receive, send):
        if self._app is None:
            self._app = _app()
        if scope["type"] == "lifespan":
            return  # the api-server's lifespan only enters FastAPI sub-apps
        await self._app(scope, receive, send)


class IrisOpsPlugin(AirflowPlugin):
    name = "iris_ops"
    fastapi_apps = [
        {"app": _LazyApp(), "url_prefix": URL_PREFIX, "name": "IRIS operations"},
    ]
    external_views = [
        {
            "name": "IRIS night",
            # Relative to the UI's base URL (no leading slash), shown in an iframe.
            "href": URL_PREFIX.lstrip("/") + "/",
            "url_route": "iris-night",
            "destination": "nav",
            "nav_top_level": True,
        },
    ]
