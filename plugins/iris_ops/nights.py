"""Which nights are stale: their products were reduced under an older CRDS context and the
operational context now selects other references for them (what ``iris_reprocess`` would
re-reduce). The night page's "Nights" table and ``GET /api/nights``.

The answer comes from :func:`iris_tasks.orchestration.reprocess.night_states` (the ledger and
the local CRDS cache), which costs one best-references comparison per frame not under the
operational context (~12 ms): it is computed at most once per ``ttl`` seconds and again at once
when the operational context changes, never on every refresh of the page.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .views import NightState

log = logging.getLogger(__name__)

__all__ = ["CachedNightStates", "load_night_states_from_env", "night_state"]

DEFAULT_TTL_S = 120.0


def night_state(entry: dict[str, Any]) -> NightState:
    """A :class:`NightState` from one entry of ``reprocess.night_states``."""
    return NightState(night=str(entry["night"]), context=str(entry["context"]),
                      frames=int(entry["frames"]), current=int(entry["current"]),
                      stale_frames=int(entry["stale_frames"]), unknown=int(entry["unknown"]),
                      unchanged=int(entry["unchanged"]), errors=int(entry["errors"]),
                      stale=bool(entry["stale"]), contexts=dict(entry.get("contexts") or {}))


def load_night_states_from_env() -> tuple[str, list[NightState]]:
    """(operational context, its night states) for the deployment's ledger and CRDS cache."""
    from iris_tasks import calib
    from iris_tasks.config import settings
    from iris_tasks.orchestration.ledger import FrameLedger
    from iris_tasks.orchestration.reprocess import night_states

    cfg = settings()
    calib.cache_dir()
    context = str(calib.operational_context())
    ledger = FrameLedger(cfg.ledger_path, readonly=True)
    return context, [night_state(e) for e in night_states(context, ledger=ledger, cfg=cfg)]


class CachedNightStates:
    """``load()`` -> (context, states), kept ``ttl`` seconds; ``current_context()`` (cheap)
    drops the cache as soon as the operational context is another one."""

    def __init__(self, load: Callable[[], tuple[str, list[NightState]]] = load_night_states_from_env,
                 current_context: Callable[[], str] | None = None, ttl: float = DEFAULT_TTL_S):
        self._load = load
        self._current_context = current_context or _operational_context
        self._ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, str, list[NightState]] | None = None

    def __call__(self) -> list[NightState]:
        with self._lock:
            cached = self._cached
        if cached is not None:
            made, context, states = cached
            if time.monotonic() - made < self._ttl and context == self._current_context():
                return states
        context, states = self._load()
        with self._lock:
            self._cached = (time.monotonic(), context, states)
        return states


def _operational_context() -> str:
    from iris_tasks import calib

    calib.cache_dir()
    return str(calib.operational_context())
