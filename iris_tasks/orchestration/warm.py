"""Warm task processes: import the science stack once, before the executor forks.

Every Airflow 3 task runs in a process forked from its executor worker (LocalExecutor: the
worker is itself forked from the scheduler; Celery: from the ``airflow celery worker`` main
process through the prefork pool). A task of the real-time chain then spends ~3.5 s importing
astropy, stdatamodels, stpipe, crds and asdf and discovering asdf's extension entry points
before it touches a pixel - the largest single item in a 30 s budget after the compute.
Doing that once in the long-lived parent makes every forked task start warm: the modules
and asdf's extension registry are inherited copy-on-write.

Nothing here runs an OpenMP region, opens a connection or starts a thread: those would not
survive the fork. CRDS is imported but not configured (each task configures its own cache).

Use:

* LocalExecutor: ``AIRFLOW__CORE__EXECUTOR=iris_tasks.orchestration.warm.WarmLocalExecutor``
  (what the development stack, ``make demo``, runs).
* CeleryExecutor: ``AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS=
  iris_tasks.orchestration.warm.CELERY_CONFIG`` (the Helm chart sets it); the worker imports
  it when it builds its Celery app, before the pool forks.

``IRIS_PRELOAD=0`` switches preloading off (to measure what it saves).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any

from airflow.executors.local_executor import LocalExecutor

log = logging.getLogger(__name__)

ENV_PRELOAD = "IRIS_PRELOAD"

# What the IRIS tasks import, heaviest first. The DAG files themselves stay unimported here:
# the task runner parses its DAG file in the child, and that must see the current file.
PRELOAD_MODULES: tuple[str, ...] = (
    "numpy",
    "scipy.ndimage",
    "astropy.io.fits",
    "astropy.stats",
    "astropy.wcs",
    "asdf",
    "stdatamodels",
    "stpipe",
    "crds",
    "photutils.background",
    "matplotlib",
    "matplotlib.pyplot",
    "boto3",
    "readout_cy",
    "iris_tasks.datamodels",
    "iris_tasks.steps",
    "iris_tasks.pipelines.recipes",
    "iris_tasks.ifs",
    "iris_tasks.masters",
    "iris_tasks.calib",
    "iris_tasks.quicklook",
    "iris_tasks.storage",
    "iris_tasks.lineage",
    "iris_tasks.orchestration.realtime",
    "iris_tasks.orchestration.landing",
    "iris_tasks.orchestration.ingest",
    "iris_tasks.orchestration.nightly",
    "iris_tasks.orchestration.reprocess",
    "airflow.sdk.execution_time.task_runner",
)


def preload_enabled() -> bool:
    from ..config import is_off

    return not is_off(os.environ.get(ENV_PRELOAD, "1"))


def preload_science_stack(modules: tuple[str, ...] = PRELOAD_MODULES) -> dict[str, Any]:
    """Import ``modules`` and fill asdf's extension registry; returns what was done.

    A module that fails to import is logged and skipped: a task that needs it will then fail
    with the real error in its own log, where an operator looks.
    """
    t0 = time.perf_counter()
    loaded, failed = [], {}
    for name in modules:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception as exc:  # noqa: BLE001 - see docstring
            failed[name] = f"{type(exc).__name__}: {exc}"
            log.warning("preload: %s not imported (%s)", name, failed[name])
    if "asdf" in loaded:
        try:
            import asdf

            # Entry-point discovery (~1.9 s cold) is cached on the global config object.
            cfg = asdf.get_config()
            _ = cfg.extensions, cfg.resource_manager
        except Exception as exc:  # noqa: BLE001 - a cold asdf is slower, not broken
            failed["asdf extensions"] = f"{type(exc).__name__}: {exc}"
            log.warning("preload: asdf extensions not discovered (%s)", exc)
    seconds = time.perf_counter() - t0
    log.info("preloaded %d modules in %.2f s (%d failed)", len(loaded), seconds, len(failed))
    return {"loaded": loaded, "failed": failed, "seconds": seconds}


class WarmLocalExecutor(LocalExecutor):
    """LocalExecutor whose workers fork from a process that already holds the science stack."""

    def start(self) -> None:
        if preload_enabled():
            preload_science_stack()
        super().start()


def _celery_config() -> dict[str, Any]:
    from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

    # Airflow's defaults already prefetch one task per child and acknowledge late, which is
    # what a frame queue wants; only the preloading is ours.
    return dict(DEFAULT_CELERY_CONFIG)


def __getattr__(name: str) -> Any:
    # Built on first access so that importing this module for the executor class does not
    # need the Celery provider; the Celery worker reaches it through celery_config_options.
    if name == "CELERY_CONFIG":
        config = _celery_config()
        if preload_enabled():
            preload_science_stack()
        globals()["CELERY_CONFIG"] = config
        return config
    raise AttributeError(name)
