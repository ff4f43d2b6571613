"""Object storage for IRIS DRS: raw frames, products and quicklooks, with checksums.

``open_store(url)`` returns an :class:`ObjectStore` (S3 through boto3/Airflow, or a local
directory); :func:`product_key` builds ``<kind>/<night>/<detector>/<obsname>/<file>`` keys.
See docs/storage.md.
"""

from .base import (
    SHA256_META,
    ChecksumMismatchError,
    ObjectConflictError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    sha256_file,
    validate_key,
)
from .factory import ENV_STORE_URL, open_store
from .keys import KINDS, parse_product_key, product_key
from .local import LocalStore


def __getattr__(name: str):
    # S3Store pulls in boto3 (~0.3 s); load it only when asked for.
    if name == "S3Store":
        from .s3 import S3Store

        return S3Store
    raise AttributeError(name)


__all__ = [
    "ENV_STORE_URL",
    "KINDS",
    "SHA256_META",
    "ChecksumMismatchError",
    "LocalStore",
    "ObjectConflictError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "S3Store",
    "StorageError",
    "open_store",
    "parse_product_key",
    "product_key",
    "sha256_file",
    "validate_key",
]
