"""Exceptions raised by iris_tasks.calib. Every message names the file and the problem."""

from __future__ import annotations

from ..errors import ConfigurationError


class CalibrationError(ConfigurationError):
    """Base of every reference-selection or publishing failure."""


class ReferenceMissingError(CalibrationError):
    """No rule matches the header, or the selected reference is not in the cache."""


class CorruptFileError(CalibrationError):
    """A mapping fails its sha1sum/syntax check, or a reference FITS file cannot be read."""


class WrongReftypeError(CalibrationError):
    """A reference file's REFTYPE keyword is not the type it was selected or supplied for."""


class ContextError(CalibrationError):
    """An unknown, malformed or unloadable context name, or a cache that is not set up."""


class PublishError(CalibrationError):
    """A reference cannot be published (missing keywords, conflicting files, lock timeout)."""


class ReplicaConflictError(PublishError):
    """The object-store replica holds what this cache's publication would contradict: another
    file under one of its names (a context published on another host at the same time), or
    a newer context than this cache's newest."""
