"""IRIS reference-file selection and publishing through CRDS, fully offline.

Importing this package registers the "tmt" observatory with crds (see
:mod:`iris_tasks.calib.observatory`); call :func:`configure` once per process to point crds
at the IRIS cache (it is also done implicitly on first use). DataModels declare
``crds_observatory = "tmt"``. See docs/calib.md.
"""

from __future__ import annotations

from .cache import (
    OFFLINE_SERVER_URL,
    cache_dir,
    cache_status,
    configure,
    context_history,
    default_cache_dir,
    list_contexts,
    native_cache_dir,
    newest_context,
    operational_at,
    operational_context,
    refresh,
    resolve_context,
    set_operational_context,
    unpin,
)
from .errors import (
    CalibrationError,
    ContextError,
    CorruptFileError,
    PublishError,
    ReferenceMissingError,
    WrongReftypeError,
)
from .observatory import register as _register
from .publishing import publish_references, read_reference
from .reftypes import INSTRUMENT, OBSERVATORY, REFTYPES, USEAFTER_KEYWORDS
from .replica import follow_store
from .report import describe_context, format_contexts, show, verify_cache
from .selection import (
    check_reference,
    dataset_parameters,
    get_reference,
    get_references,
    recommendations,
    references_changed,
)

_register()

CRDS_OBSERVATORY = OBSERVATORY

__all__ = [
    "CRDS_OBSERVATORY",
    "INSTRUMENT",
    "OBSERVATORY",
    "OFFLINE_SERVER_URL",
    "REFTYPES",
    "USEAFTER_KEYWORDS",
    "CalibrationError",
    "ContextError",
    "CorruptFileError",
    "PublishError",
    "ReferenceMissingError",
    "WrongReftypeError",
    "cache_dir",
    "cache_status",
    "check_reference",
    "configure",
    "context_history",
    "dataset_parameters",
    "follow_store",
    "default_cache_dir",
    "describe_context",
    "format_contexts",
    "get_reference",
    "get_references",
    "list_contexts",
    "native_cache_dir",
    "newest_context",
    "operational_at",
    "operational_context",
    "publish_references",
    "read_reference",
    "recommendations",
    "references_changed",
    "refresh",
    "resolve_context",
    "set_operational_context",
    "show",
    "unpin",
    "verify_cache",
]
