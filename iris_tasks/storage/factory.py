"""``open_store(url)``: one string configures where products go.

* ``s3://bucket/prefix?conn_id=iris_s3`` - S3 through an Airflow connection (endpoint, keys,
  region from the connection; works in tasks and anywhere ``AIRFLOW_CONN_IRIS_S3`` is set);
* ``s3://bucket/prefix?endpoint_url=http://127.0.0.1:8333&region_name=us-east-1`` - S3 with
  keys from the usual AWS environment/credential chain (``AWS_ACCESS_KEY_ID`` ...);
* ``s3://bucket/prefix`` - endpoint from ``IRIS_S3_ENDPOINT_URL`` or boto3's own
  ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS itself;
* ``file:///abs/path`` or a plain path - :class:`LocalStore`.

With no argument the URL comes from ``IRIS_STORE_URL``.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from .base import ObjectStore, StorageError
from .local import LocalStore

ENV_STORE_URL = "IRIS_STORE_URL"
ENV_ENDPOINT = "IRIS_S3_ENDPOINT_URL"


def open_store(url: str | os.PathLike[str] | None = None) -> ObjectStore:
    """Open the store named by ``url`` (or ``$IRIS_STORE_URL``)."""
    if url is None:
        url = os.environ.get(ENV_STORE_URL)
        if not url:
            raise StorageError(None, f"no store URL given and ${ENV_STORE_URL} is not set")
    if isinstance(url, os.PathLike):
        return LocalStore(url)
    parsed = urlparse(url)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = unquote(parsed.path) if parsed.scheme == "file" else url
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StorageError(None, f"file URL with a host is not supported: {url}")
        return LocalStore(Path(path))
    if parsed.scheme != "s3":
        raise StorageError(None, f"unsupported store URL scheme {parsed.scheme!r} in {url!r}")

    from .s3 import S3Store  # boto3 only when S3 is used

    bucket = parsed.netloc
    prefix = parsed.path.strip("/")
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    unknown = set(query) - {"conn_id", "endpoint_url", "region_name"}
    if unknown:
        raise StorageError(None, f"unknown store URL parameters {sorted(unknown)} in {url!r}")
    if "conn_id" in query:
        return S3Store.from_airflow_conn(query["conn_id"], bucket=bucket or None, prefix=prefix)
    endpoint = query.get("endpoint_url") or os.environ.get(ENV_ENDPOINT) or None
    return S3Store(bucket, prefix, endpoint_url=endpoint, region_name=query.get("region_name"))
