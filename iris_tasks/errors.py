"""The DRS's exception hierarchy: what went wrong, and therefore what to do about it.

Every project exception derives from :class:`IrisError` and from one category that says how
the fault is handled (the DAG retry policy in ``iris_tasks.orchestration.dag_defaults`` keys
on these classes, by dotted path):

* :class:`TransientError` - a service or resource that can come back (object store, ledger
  database, a restarting server): **retried** with backoff.
* :class:`BadInputError` - the data are wrong (header, truncated file, implausible ramp):
  quarantine the frame, never retry; an operator fixes the file.
* :class:`ConfigurationError` - a missing reference, an unknown CRDS context, a bad setting:
  fail at once and say which.
* :class:`ProcessingError` - an algorithm failed on good input (no convergence, a QA threshold
  exceeded): fail at once, an operator looks.
* :class:`ConflictError` - the request contradicts state that must not change (other bytes
  under an immutable object key): fail at once.
* :class:`FrameSkipped` - not a fault: a frame deliberately not processed further (skip).

The split follows Rubin's Prompt Processing (``RetriableError`` / ``NonRetriableError`` in
``activator/exception.py``): the code that knows *why* something failed picks the class, the
code that schedules retries only looks at the class. :class:`TransientError` plays the part of
``RetriableError``; the four others are the non-retriable kinds, named for what an operator
has to do. As there, :attr:`IrisError.nested` gives the wrapped exception of a
``raise ... from exc``.

A class may carry a non-retriable category next to an inherited transient one (say a storage
error that is a conflict): the non-retriable category wins, in :func:`is_retriable` and in
the retry policy alike (its FAIL rule comes first).

This module imports nothing of the project, nor Airflow: kernels, steps, the CLI and DAG files
at parse time can all import it.
"""

from __future__ import annotations

import sys
from typing import ClassVar

__all__ = [
    "BadInputError",
    "ConfigurationError",
    "ConflictError",
    "FrameSkipped",
    "IrisError",
    "NON_RETRIABLE",
    "ProcessingError",
    "THIRD_PARTY_TRANSIENT",
    "TransientError",
    "dotted",
    "is_retriable",
    "is_retried",
    "is_skip",
]


class IrisError(Exception):
    """Root of every IRIS DRS exception.

    ``retriable`` is a class-level summary of the category (see :func:`is_retriable` for the
    rule that also handles classes with two categories).
    """

    retriable: ClassVar[bool] = False

    @property
    def nested(self) -> BaseException | None:
        """The exception this one wraps (``raise ... from exc``, else the one being handled
        when it was raised), or None. Never raises, so it is safe inside handlers."""
        if self.__cause__ is not None:
            return self.__cause__
        if self.__context__ is not None and not self.__suppress_context__:
            return self.__context__
        return None


class TransientError(IrisError):
    """A service or resource failed in a way that can go away by itself (network, object
    store, database, a server restarting): retry with backoff."""

    retriable: ClassVar[bool] = True


class BadInputError(IrisError):
    """The input data are wrong (bad header, damaged or truncated file, implausible values):
    quarantine, never retry - the same bytes fail the same way."""


class ConfigurationError(IrisError):
    """The system is set up wrongly for this work (a missing or wrong reference file, an
    unknown CRDS context, an invalid setting): stop at once and name what is missing."""


class ProcessingError(IrisError):
    """An algorithm failed on input that passed validation (a fit that does not converge, a
    master beyond its QA thresholds): fail, an operator investigates."""


class ConflictError(IrisError):
    """The operation contradicts state that must not change, e.g. different content already
    stored under an immutable key: retrying cannot help, an operator (or the caller) decides."""


class FrameSkipped(IrisError):
    """Not a fault: the frame is deliberately not processed further (quarantined, superseded).
    The ledger records the stage as skipped and leaves the frame's status alone; a DAG task
    turns it into Airflow's skip."""


#: The categories that veto a retry, in the order the retry policy lists them.
NON_RETRIABLE: tuple[type[IrisError], ...] = (
    BadInputError,
    ConfigurationError,
    ProcessingError,
    ConflictError,
    FrameSkipped,
)


#: Third-party exceptions the store steps' retry policy retries too (dotted class paths; a
#: subclass matches): the object store's client and the network. The policy in
#: ``iris_tasks.orchestration.dag_defaults`` is built from this and :data:`NON_RETRIABLE`.
THIRD_PARTY_TRANSIENT: tuple[str, ...] = (
    "botocore.exceptions.BotoCoreError",
    "botocore.exceptions.ClientError",
    "builtins.ConnectionError",
    "builtins.TimeoutError",
)


def dotted(cls: type) -> str:
    """``module.QualifiedName`` of a class (how retry policies name exception classes)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def is_retried(exc: BaseException) -> bool:
    """True where the store steps' retry policy retries ``exc``: no non-retriable category,
    and a :class:`TransientError` or one of :data:`THIRD_PARTY_TRANSIENT` (by class path,
    so that botocore need not be imported to find out)."""
    if isinstance(exc, NON_RETRIABLE):
        return False
    return is_retriable(exc) or any(dotted(c) in THIRD_PARTY_TRANSIENT for c in type(exc).__mro__)


def is_retriable(exc: BaseException) -> bool:
    """True for a :class:`TransientError` that carries no non-retriable category.

    Only project exceptions are judged here; the retry policy adds the few third-party
    transient ones (botocore, builtin ``ConnectionError`` / ``TimeoutError``).
    """
    return isinstance(exc, TransientError) and not isinstance(exc, NON_RETRIABLE)


def is_skip(exc: BaseException) -> bool:
    """True for a deliberate skip: :class:`FrameSkipped` or Airflow's skip exception.

    Airflow is not imported to find out: an exception can only be an instance of
    ``AirflowSkipException`` if the module defining it is loaded already.
    """
    if isinstance(exc, FrameSkipped):
        return True
    # airflow.exceptions.AirflowSkipException is a deprecated alias of this same class.
    module = sys.modules.get("airflow.sdk.exceptions")
    skip = getattr(module, "AirflowSkipException", None) if module is not None else None
    return isinstance(skip, type) and isinstance(exc, skip)
