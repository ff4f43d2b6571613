"""Object key layout: ``<kind>/<night>/<detector>/<obsname>/<filename>``.

The night is the observing-night name (``YYYY-MM-DD``) computed by
``iris_tasks.metadata.observing_night``; it is taken as a parameter here so storage does not
depend on the metadata rules.

The detector and OBSNAME components must already be key-safe (they come from validated
headers). The file name can be anything a landing filesystem or S3 carries, so it is mapped
to a key name by :func:`key_filename`: a name that is already safe (``[A-Za-z0-9]`` then
``[A-Za-z0-9_.+-]``, at most 200 characters) is kept; any other name has its accents dropped
(NFKD), every other disallowed character replaced by ``_``, its stem cut to 120 characters
and a 12-hex-digit SHA-256 of the original name inserted before the extension, e.g.
``"M31 field é.fits"`` -> ``M31_field_e.<hash>.fits``.
The mapping is deterministic (the same landing name always gives the same key, so re-runs
stay idempotent) and collision-resistant (two names that clean up alike differ in their
hash). The original name is not in the key: callers keep it (the ledger's ``filename``, the
object metadata ``rawfile``; :func:`encode_name` gives an ASCII form for metadata).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import unicodedata
from urllib.parse import quote, unquote

from .base import StorageError, validate_key

KINDS = ("raw", "products", "quicklook", "quarantine", "references")

_NIGHT = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")
HASH_LENGTH = 12  # hex digits of SHA-256: 48 bits, collisions need ~16 million odd names
MAX_STEM = 120  # characters kept of a cleaned-up stem
MAX_NAME = 200  # longer names are shortened too: a local store's file names are <= 255 bytes
_COMPRESSED = (".gz", ".bz2", ".xz", ".fz", ".zst", ".z")


def _split_extension(name: str) -> tuple[str, str]:
    """(stem, extension): the last suffix, two for a compressed file (``.fits.gz``)."""
    dot = name.rfind(".")
    if dot <= 0:
        return name, ""
    stem, ext = name[:dot], name[dot:]
    if ext.lower() in _COMPRESSED:
        inner = stem.rfind(".")
        if inner > 0:
            stem, ext = stem[:inner], stem[inner:] + ext
    return stem, ext


def name_digest(name: str) -> str:
    """Short SHA-256 of a file name's UTF-8 bytes (undecodable filesystem bytes kept)."""
    data = name.encode("utf-8", "surrogateescape")
    return hashlib.sha256(data).hexdigest()[:HASH_LENGTH]


def key_filename(name: str) -> str:
    """The key-safe form of a file name (see the module docstring); safe names unchanged."""
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    if _NAME.match(base) and len(base) <= MAX_NAME:
        return base
    if not base:
        raise StorageError(None, "empty file name")
    stem, ext = _split_extension(base)

    def clean(text: str) -> str:
        text = "".join(c for c in unicodedata.normalize("NFKD", text)
                       if not unicodedata.combining(c))
        return _UNSAFE.sub("_", text)

    stem = clean(stem).lstrip("_.+-")[:MAX_STEM].rstrip("_.+-") or "file"
    ext = clean(ext)
    if not re.fullmatch(r"(\.[A-Za-z0-9_+-]+)*", ext):
        ext = ""  # an extension that did not survive cleaning is kept in the stem's hash only
    return f"{stem}.{name_digest(base)}{ext}"


def encode_name(name: str) -> str:
    """An ASCII form of any file name for object metadata (percent-encoding, reversible)."""
    return quote(str(name), safe=" !#$&'()*+,-./:;=?@[]^_`{|}~", errors="surrogateescape")


def decode_name(text: str) -> str:
    """Inverse of :func:`encode_name`."""
    return unquote(text, errors="surrogateescape")


def product_key(
    night: str | dt.date,
    detector: str,
    obsname: str,
    filename: str,
    kind: str = "products",
) -> str:
    """Key of one file, e.g. ``raw/2026-11-23/IMG1/IMG1-SCI/iris_20261124_0001_raw.fits``.

    Only the base name of ``filename`` is used, so a local path can be passed directly; it
    goes through :func:`key_filename`, so any file name gives a valid key.
    """
    if kind not in KINDS:
        raise StorageError(None, f"unknown key kind {kind!r}; expected one of {KINDS}")
    if isinstance(night, dt.date):
        night = night.isoformat()
    if not _NIGHT.match(str(night)):
        raise StorageError(None, f"night must be YYYY-MM-DD, got {night!r}")
    dt.date.fromisoformat(str(night))  # rejects 2026-13-45 with a ValueError naming it
    for label, value in (("detector", detector), ("obsname", obsname)):
        if not _NAME.match(str(value)):
            raise StorageError(None, f"{label} {value!r} is not a valid key component")
    return validate_key(f"{kind}/{night}/{detector}/{obsname}/{key_filename(filename)}")


def parse_product_key(key: str) -> dict[str, str]:
    """Inverse of :func:`product_key` (ignores any store prefix before the kind).

    ``filename`` is the key's name, i.e. the :func:`key_filename` form of the original (which
    is in the object metadata and the ledger when it differs).
    """
    parts = key.split("/")
    for i, part in enumerate(parts):
        if part in KINDS and len(parts) - i == 5:
            kind, night, detector, obsname, filename = parts[i:]
            return {"kind": kind, "night": night, "detector": detector,
                    "obsname": obsname, "filename": filename}
    raise StorageError(key, "not a <kind>/<night>/<detector>/<obsname>/<file> key")
