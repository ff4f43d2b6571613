"""Helpers for tests that need references in a CRDS cache (any team's tests may use them).

    from iris_tasks.calib.testing import temporary_cache, write_reference

    with temporary_cache(tmp_path / "crds") as calib:
        calib.publish_references([write_reference(tmp_path / "d.fits", "dark",
                                  DETECTOR="IMG1", READPATT="UTR10")], "test dark")
        ...  # stpipe steps now find the dark through crds
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def write_reference(
    path: str | os.PathLike[str],
    reftype: str,
    useafter: str = "2020-01-01T00:00:00",
    data: np.ndarray | None = None,
    **keywords: Any,
) -> Path:
    """Write a minimal reference FITS file: PRIMARY header with the CRDS keywords
    (INSTRUME=IRIS, REFTYPE, USEAFTER, plus `keywords` such as DETECTOR/READPATT/FILTER/
    IFSMODE) and a small SCI image."""
    from astropy.io import fits

    primary = fits.PrimaryHDU()
    primary.header["INSTRUME"] = "IRIS"
    primary.header["REFTYPE"] = reftype.upper()
    primary.header["USEAFTER"] = useafter
    primary.header["PEDIGREE"] = "SIMULATION"
    primary.header["DESCRIP"] = f"test {reftype}"
    primary.header["AUTHOR"] = "iris_tasks.calib.testing"
    for key, value in keywords.items():
        primary.header[key] = value
    sci = np.zeros((8, 8), np.float32) if data is None else data
    path = Path(path)
    fits.HDUList([primary, fits.ImageHDU(sci, name="SCI")]).writeto(path, overwrite=True)
    return path


@contextlib.contextmanager
def temporary_cache(directory: str | os.PathLike[str]) -> Iterator[Any]:
    """Configure crds on a fresh cache in `directory`; restore the environment and crds'
    process state afterwards. Yields the :mod:`iris_tasks.calib` module."""
    from crds.client import api
    from crds.core import config, utils

    from iris_tasks import calib
    from iris_tasks.calib import cache

    saved_env = dict(os.environ)
    saved_proxy, saved_url = api.S, getattr(api, "URL", None)
    saved_root, saved_seen = cache._root, cache._seen_state
    try:
        calib.configure(directory)
        yield calib
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        api.S = saved_proxy
        if saved_url is not None:
            api.URL = saved_url
        config.CRDS_REF_SUBDIR_MODE = "None"
        cache._root, cache._seen_state = saved_root, saved_seen
        utils.clear_function_caches()
