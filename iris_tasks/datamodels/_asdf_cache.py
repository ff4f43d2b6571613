"""Parse each asdf schema resource once per process instead of once per ``$ref`` resolution.

stdatamodels validates every array assigned to a model (``model.data = ...``) against asdf's
``ndarray-1.1.0`` schema. asdf builds a new ``$ref`` resolver for each validation, and that
resolver re-reads schemas served by its resource manager with ``yaml.load`` every time
(asdf 6.0: ``asdf.schema._make_schema_loader`` caches only file/URL schemas). At 4096^2 a
stage-1 run made 36 such parses (~8 ms each, ~0.3 s) and a stage-2 run more. The resources
are immutable per URI once registered, so their parsed form is cached here and shared, as
asdf already shares its cached parse of file/URL schemas with every resolver (the
validators only read them; a deep copy per resolution cost as much as the parse).

Installed on import of :mod:`iris_tasks.datamodels`; if asdf changes the private hook this
relies on, nothing is patched and asdf works as before (only slower).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def install() -> bool:
    """Wrap asdf's schema loader with a per-URI cache; True if (already) installed."""
    try:
        import asdf.schema as asdf_schema
    except ImportError:  # pragma: no cover - asdf is a dependency
        return False
    make = getattr(asdf_schema, "_make_schema_loader", None)
    if make is None or not callable(make):
        log.debug("asdf has no _make_schema_loader; schema resources are not cached")
        return False
    if getattr(make, "_iris_cached", False):
        return True

    @functools.lru_cache(maxsize=512)
    def parsed(url: str) -> tuple[Any, Any]:
        return make()(url)

    def make_cached() -> Callable[[str], tuple[Any, Any]]:
        def load_schema(url: str) -> tuple[Any, Any]:
            if not isinstance(url, str):
                return make()(url)
            return parsed(url)

        return load_schema

    make_cached._iris_cached = True  # type: ignore[attr-defined]
    make_cached.cache_clear = parsed.cache_clear  # type: ignore[attr-defined]
    asdf_schema._make_schema_loader = make_cached
    return True
