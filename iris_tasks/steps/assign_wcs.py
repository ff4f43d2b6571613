"""Imager WCS from the pointing: the algorithm of the assign_wcs step (pure functions).

Model: gnomonic (TAN) projection about the field centre (RA, DEC) placed at the centre of
the 4096 x 4096 detector, 4 mas square pixels, detector +Y at position angle PA (degrees
east of north), standard sky parity (east to the left when north is up). The linear part
is written as CDELT (pixel scale) times a PC rotation matrix:

    PC = [[-cos PA, sin PA],
          [ sin PA, cos PA]]

so a step along +Y moves the sky position toward PA and a step along +X toward PA - 90 deg.
Optical distortion is not modelled yet (a distortion reference type would add it).
"""

from __future__ import annotations

import math
from typing import Any

from astropy.wcs import WCS

IMAGER_PIXEL_SCALE_MAS = 4.0
FULL_FRAME = 4096


def imager_wcsinfo(
    ra: float,
    dec: float,
    pa: float,
    shape: tuple[int, int],
    *,
    pixel_scale_mas: float = IMAGER_PIXEL_SCALE_MAS,
    xstart: int | None = None,
    ystart: int | None = None,
) -> dict[str, Any]:
    """FITS WCS keywords (wcsinfo names, lowercase) for an imager frame.

    The reference pixel is the full-frame centre (2048.5, 2048.5) moved into subarray
    coordinates when XSTART/YSTART are given, else the centre of the array itself.
    """
    if not (math.isfinite(ra) and math.isfinite(dec) and math.isfinite(pa)):
        raise ValueError(f"pointing RA={ra} DEC={dec} PA={pa} is not finite")
    if not -90.0 <= dec <= 90.0:
        raise ValueError(f"DEC={dec} is outside [-90, 90]")
    ny, nx = shape
    if xstart is not None and ystart is not None:
        crpix1 = (FULL_FRAME + 1) / 2.0 - (xstart - 1)
        crpix2 = (FULL_FRAME + 1) / 2.0 - (ystart - 1)
    else:
        crpix1, crpix2 = (nx + 1) / 2.0, (ny + 1) / 2.0
    theta = math.radians(pa)
    scale = pixel_scale_mas / 3.6e6  # mas -> deg
    return {
        "wcsaxes": 2,
        "ctype1": "RA---TAN",
        "ctype2": "DEC--TAN",
        "cunit1": "deg",
        "cunit2": "deg",
        "crpix1": float(crpix1),
        "crpix2": float(crpix2),
        "crval1": float(ra % 360.0),
        "crval2": float(dec),
        "cdelt1": scale,
        "cdelt2": scale,
        "pc1_1": -math.cos(theta),
        "pc1_2": math.sin(theta),
        "pc2_1": math.sin(theta),
        "pc2_2": math.cos(theta),
        "radesys": "ICRS",
    }


def wcs_from_wcsinfo(wcsinfo: Any) -> WCS:
    """astropy WCS from wcsinfo keywords (a dict or a model's ``meta.wcsinfo`` node)."""
    get = wcsinfo.get if isinstance(wcsinfo, dict) else (lambda k: getattr(wcsinfo, k, None))
    header = {}
    for key in ("wcsaxes", "ctype1", "ctype2", "cunit1", "cunit2", "crpix1", "crpix2", "crval1",
                "crval2", "cdelt1", "cdelt2", "pc1_1", "pc1_2", "pc2_1", "pc2_2", "radesys"):
        value = get(key)
        if value is not None:
            header[key.upper()] = value
    if "CTYPE1" not in header:
        raise ValueError("no WCS: the frame has not been through assign_wcs")
    return WCS(header)


def model_wcs(model: Any) -> WCS:
    """astropy WCS of an IRIS image model after assign_wcs."""
    return wcs_from_wcsinfo(model.meta.wcsinfo)
