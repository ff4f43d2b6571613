"""Sky geometry of simulated imager frames: pointing, position angle and the TAN projection.

The convention is the reduction's (``iris_tasks.steps.assign_wcs``), implemented here
independently so the tests can cross-check the two:

* gnomonic (TAN) projection about the header pointing (RA, DEC), which sits at the reference
  pixel CRPIX; 4 mas square pixels;
* CRPIX (1-based FITS pixels) is the centre of the 4096 x 4096 full frame, (2048.5, 2048.5),
  moved into array coordinates with XSTART/YSTART (so a scaled-down simulated array, which says
  XSTART=YSTART=1, has its CRPIX outside the array), or the array centre when XSTART/YSTART
  are not known;
* standard sky parity: at PA = 0 north is +Y and east is -X (RA grows towards -X);
* PA is the angle of detector +Y measured from north through east. With s the pixel scale,
  (dx, dy) a pixel offset from CRPIX and (xi, eta) the standard coordinates (xi towards east,
  eta towards north)::

      xi  = s (-cos PA dx + sin PA dy)
      eta = s ( sin PA dx + cos PA dy)

  i.e. PC = [[-cos PA, sin PA], [sin PA, cos PA]]; that matrix is its own inverse.

Pixel coordinates in this module are 0-based pixel centres (numpy index order is (y, x)), as
in the star truth; FITS pixel = 0-based + 1.
"""

from __future__ import annotations

import math

import numpy as np

from .scenes import PIXEL_SCALE_MAS

IMAGER_FULL_FRAME = 4096  # the real H4RG-10 format: CRPIX is placed at its centre


def reference_pixel(shape: tuple[int, int], xstart: int | None = None,
                    ystart: int | None = None) -> tuple[float, float]:
    """(CRPIX1, CRPIX2), 1-based, by the reduction's rule (see the module docstring)."""
    ny, nx = shape
    if xstart is not None and ystart is not None:
        centre = (IMAGER_FULL_FRAME + 1) / 2.0
        return centre - (xstart - 1), centre - (ystart - 1)
    return (nx + 1) / 2.0, (ny + 1) / 2.0


def _linear(pa: float) -> tuple[float, float]:
    theta = math.radians(pa)
    return math.cos(theta), math.sin(theta)


def pixel_to_sky(x: np.ndarray | float, y: np.ndarray | float, ra0: float, dec0: float,
                 pa: float, crpix: tuple[float, float],
                 pixel_scale_mas: float = PIXEL_SCALE_MAS) -> tuple[np.ndarray, np.ndarray]:
    """(RA, DEC) in degrees of 0-based pixel positions (x, y) for pointing (ra0, dec0, pa)."""
    c, s = _linear(pa)
    dx = np.asarray(x, np.float64) + 1.0 - crpix[0]
    dy = np.asarray(y, np.float64) + 1.0 - crpix[1]
    scale = math.radians(pixel_scale_mas / 3.6e6)
    xi = scale * (-c * dx + s * dy)
    eta = scale * (s * dx + c * dy)
    d0 = math.radians(dec0)
    denom = math.cos(d0) - eta * math.sin(d0)
    ra = math.radians(ra0) + np.arctan2(xi, denom)
    dec = np.arctan2(math.sin(d0) + eta * math.cos(d0), np.hypot(xi, denom))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def sky_to_pixel(ra: np.ndarray | float, dec: np.ndarray | float, ra0: float, dec0: float,
                 pa: float, crpix: tuple[float, float],
                 pixel_scale_mas: float = PIXEL_SCALE_MAS) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel positions (x, y) of (RA, DEC) in degrees: the inverse of pixel_to_sky."""
    a = np.radians(np.asarray(ra, np.float64)) - math.radians(ra0)
    d = np.radians(np.asarray(dec, np.float64))
    d0 = math.radians(dec0)
    cos_c = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a)
    if np.any(cos_c <= 0):
        raise ValueError("position is 90 deg or more from the pointing: not on the TAN plane")
    xi = np.cos(d) * np.sin(a) / cos_c
    eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a)) / cos_c
    scale = math.radians(pixel_scale_mas / 3.6e6)
    c, s = _linear(pa)
    # PC is an involution (a reflection), so the inverse linear step uses the same matrix.
    dx = (-c * xi + s * eta) / scale
    dy = (s * xi + c * eta) / scale
    return dx + crpix[0] - 1.0, dy + crpix[1] - 1.0


def dithered_pointing(ra0: float, dec0: float, pa: float, crpix: tuple[float, float],
                      dx: float, dy: float,
                      pixel_scale_mas: float = PIXEL_SCALE_MAS) -> tuple[float, float]:
    """Pointing (RA, DEC at CRPIX) after a telescope offset that moves the sky by (+dx, +dy)
    detector pixels: the new reference pixel sees what pixel CRPIX - (dx, dy) saw before."""
    x = crpix[0] - 1.0 - dx
    y = crpix[1] - 1.0 - dy
    ra, dec = pixel_to_sky(x, y, ra0, dec0, pa, crpix, pixel_scale_mas)
    return float(ra), float(dec)
