"""Object key layout: ``<kind>/<night>/<detector>/<obsname>/<filename>``.

The night is the observing-night name (``YYYY-MM-DD``) computed by
``iris_tasks.metadata.observing_night``; it is taken as a parameter here so storage does not
depend on the metadata rules.
"""

from __future__ import annotations

import datetime as dt
import re

from .base import StorageError, validate_key

KINDS = ("raw", "products", "quicklook", "quarantine", "references")

_NIGHT = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def product_key(
    night: str | dt.date,
    detector: str,
    obsname: str,
    filename: str,
    kind: str = "products",
) -> str:
    """Key of one file, e.g. ``raw/2026-11-23/IMG1/IMG1-SCI/iris_20261124_0001_raw.fits``.

    Only the base name of ``filename`` is used, so a local path can be passed directly.
    """
    if kind not in KINDS:
        raise StorageError(None, f"unknown key kind {kind!r}; expected one of {KINDS}")
    if isinstance(night, dt.date):
        night = night.isoformat()
    if not _NIGHT.match(str(night)):
        raise StorageError(None, f"night must be YYYY-MM-DD, got {night!r}")
    dt.date.fromisoformat(str(night))  # rejects 2026-13-45 with a ValueError naming it
    base = str(filename).replace("\\", "/").rsplit("/", 1)[-1]
    for label, value in (("detector", detector), ("obsname", obsname), ("filename", base)):
        if not _NAME.match(str(value)):
            raise StorageError(None, f"{label} {value!r} is not a valid key component")
    return validate_key(f"{kind}/{night}/{detector}/{obsname}/{base}")


def parse_product_key(key: str) -> dict[str, str]:
    """Inverse of :func:`product_key` (ignores any store prefix before the kind)."""
    parts = key.split("/")
    for i, part in enumerate(parts):
        if part in KINDS and len(parts) - i == 5:
            kind, night, detector, obsname, filename = parts[i:]
            return {"kind": kind, "night": night, "detector": detector,
                    "obsname": obsname, "filename": filename}
    raise StorageError(key, "not a <kind>/<night>/<detector>/<obsname>/<file> key")
