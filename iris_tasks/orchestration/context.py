"""Request context: who asked for the work running now, and where its records go.

A compute-server worker runs a frame on behalf of an Airflow task in another process. While
it does, three things must reach that task rather than the worker: the task's identity (for
the ledger's stage rows), lineage records (for the task's OpenLineage events) and events such
as "the rate product is written". They live here, in context variables, so that the modules
that read them (:mod:`.common`, :mod:`iris_tasks.lineage`, the real-time stages) and the one
that sets them (:mod:`.compute.server`) need not know each other. This module imports nothing
of the project.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

LineageSink = Callable[[list[str], list[str], "str | None"], None]
EventSink = Callable[[str, dict[str, Any]], None]

_IDENTITY: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "iris_request_identity", default=None)
_LINEAGE: contextvars.ContextVar[LineageSink | None] = contextvars.ContextVar(
    "iris_request_lineage", default=None)
_EVENTS: contextvars.ContextVar[EventSink | None] = contextvars.ContextVar(
    "iris_request_events", default=None)


def task_identity_override() -> dict[str, Any] | None:
    """The requesting task's identity while a compute worker serves it, else None."""
    return _IDENTITY.get()


def lineage_sink() -> LineageSink | None:
    """Where lineage records go while a compute worker serves a request, else None."""
    return _LINEAGE.get()


def notify(event: str, **data: Any) -> None:
    """Announce ``event`` to whoever asked for the running operation, in a compute worker or
    in-process alike; a no-op when nobody listens."""
    sink = _EVENTS.get()
    if sink is not None:
        sink(event, data)


@contextlib.contextmanager
def serving(identity: dict[str, Any] | None, *, lineage: LineageSink | None,
            events: EventSink | None) -> Iterator[None]:
    """The context of one request served for a task (compute worker)."""
    tokens = (_IDENTITY.set(identity), _LINEAGE.set(lineage), _EVENTS.set(events))
    try:
        yield
    finally:
        _EVENTS.reset(tokens[2])
        _LINEAGE.reset(tokens[1])
        _IDENTITY.reset(tokens[0])


@contextlib.contextmanager
def listening(events: EventSink | None) -> Iterator[None]:
    """Deliver :func:`notify` events to ``events`` while an operation runs in this process."""
    token = _EVENTS.set(events)
    try:
        yield
    finally:
        _EVENTS.reset(token)
