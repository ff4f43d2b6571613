"""``@iris_task``: what every IRIS DAG task does before and after its own work, in one place.

Imported by the DAG files at parse time, so only the Airflow SDK and :mod:`iris_tasks.errors`
are imported at module level; the task's own imports (and lineage) happen when it runs.

Each task:

* starts its lineage from empty (:func:`iris_tasks.lineage.begin_task`: ``dag.test()`` and
  the CLI run many tasks in one process, whose files would otherwise be reported as this
  task's datasets);
* optionally labels its map index with the file it works on (``label="frame"``: the frame's
  file name; a path: its base name), so the UI lists mapped tasks by file, not by number;
* refuses to run on a host whose code or configuration differs from the scheduler's
  (:mod:`iris_tasks.orchestration.deployment`; checked only where a fingerprint is published);
* turns :class:`~iris_tasks.errors.FrameSkipped` into Airflow's skip, so reduction code can
  say "skip this frame" without importing Airflow;
* returns its value as one XCom (``multiple_outputs=False`` unless asked: a ``-> dict``
  annotation would make Airflow push each key as an XCom of its own).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

from airflow.sdk import task

from iris_tasks.errors import FrameSkipped

#: ``map_index_template`` of a labelled task: rendered from the context key the task sets.
MAP_LABEL = "{{ iris_map_label }}"
_LABEL_KEY = "iris_map_label"


def label_text(value: Any) -> str:
    """The map-index label of a task argument: a frame dict's ``filename``, a path's base
    name, else its string form ("?" when missing)."""
    if isinstance(value, dict):
        return str(value.get("filename") or "?")
    if isinstance(value, (str, os.PathLike)):
        return os.path.basename(os.fspath(value)) or "?"
    return "?" if value is None else str(value)


def set_map_label(value: Any) -> None:
    """Label the running task instance's map index with ``label_text(value)``."""
    from airflow.sdk import get_current_context

    get_current_context()[_LABEL_KEY] = label_text(value)


def iris_task(*, label: str | None = None, **task_kwargs: Any) -> Callable[[Callable], Any]:
    """``@task(**task_kwargs)`` for an IRIS DAG task (see the module docstring).

    Parameters
    ----------
    label
        Name of the task argument whose value labels the map index (``"frame"``, ``"master"``).
        Sets ``map_index_template`` unless given in ``task_kwargs``.
    **task_kwargs
        Passed to :func:`airflow.sdk.task` unchanged (timeouts, retries, trigger rule, ...).

    The wrapped callable keeps its name, docstring and signature (Airflow reads the task id,
    ``doc_md`` and which context variables to pass from them).
    """
    if label is not None:
        task_kwargs.setdefault("map_index_template", MAP_LABEL)
    # A task annotated ``-> dict`` would otherwise push every key as an XCom of its own: ~30
    # execution-API writes per frame for the frame's record, most of the api-server's CPU.
    task_kwargs.setdefault("multiple_outputs", False)

    def decorate(fn: Callable) -> Any:
        signature = inspect.signature(fn)
        if label is not None and label not in signature.parameters:
            raise TypeError(f"iris_task: {fn.__qualname__} has no argument {label!r} to label "
                            f"its map index with (arguments: {list(signature.parameters)})")

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            if label is not None:
                set_map_label(signature.bind_partial(*args, **kwargs).arguments.get(label))
            from iris_tasks import lineage
            from iris_tasks.orchestration.deployment import check_deployment, published_fingerprint

            # A host on other code or configuration than the scheduler's refuses the task.
            check_deployment(published_fingerprint())
            lineage.begin_task()
            try:
                return fn(*args, **kwargs)
            except FrameSkipped as exc:
                from airflow.sdk.exceptions import AirflowSkipException

                raise AirflowSkipException(str(exc)) from exc

        return task(**task_kwargs)(run)

    return decorate
