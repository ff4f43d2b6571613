"""Imager photometric zero point from a standard star (arrays only; photutils apertures).

An IMG1-TEL ``_cal`` frame holds one standard of known Vega magnitude near the field centre.
Its count rate in a circular aperture, the sky taken as the sigma-clipped median of an
annulus, gives the zero point ``ZP = m + 2.5 log10(rate)``: the magnitude of a source giving
1 count/s through this filter, at the standard's airmass. From it, the conversion of a
``_cal`` frame to surface brightness (JWST's PHOTMJSR idea) follows with the band's Vega
zero point (:func:`photmjsr_from_zero_point`).

Atmospheric extinction: a star at airmass X gives 10^(-0.4 k (X - X_std)) of the counts it
gives at the standard's airmass X_std, so the zero point at X is ``ZP(X) = ZP(X_std) - k (X -
X_std)`` (:func:`zero_point_at_airmass`); k (mag per airmass) is the night's own where its
standards span enough airmass (:func:`fit_extinction`), else the band's Maunakea value
(:func:`iris_tasks.instrument.standards.extinction_coefficient`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..datamodels.dqflags import BAD_FOR_SCIENCE
from ..errors import BadInputError
from ..instrument.standards import vega_zero_point

log = logging.getLogger(__name__)

__all__ = ["ExtinctionFit", "ZeroPoint", "ZeroPointError", "fit_extinction", "measure_zero_point",
           "photmjsr_from_zero_point", "zero_point_at_airmass"]

_C_ANGSTROM_S = 2.99792458e18
_ARCSEC2_SR = (math.pi / 180.0 / 3600.0) ** 2


class ZeroPointError(BadInputError, ValueError):
    """A standard-star frame that cannot give a zero point (no star, saturated, off the edge)."""


@dataclass
class ZeroPoint:
    """A measured zero point and what it rests on."""

    zp: float  # magnitude of 1 count/s (the frame's unit) through this filter
    zp_err: float
    x: float  # star position (0-based pixels)
    y: float
    rate: float  # star count rate in the aperture, sky removed
    rate_err: float
    radius: float
    snr: float


def measure_zero_point(data: np.ndarray, err: np.ndarray, dq: np.ndarray, mag: float, *,
                       radius: float = 30.0, annulus: tuple[float, float] = (34.0, 46.0),
                       search_box: int = 64, min_snr: float = 50.0) -> ZeroPoint:
    """Zero point from the brightest source within ``search_box`` pixels of the frame centre.

    The star is the peak of the 5x5-smoothed image in the central box, centred by the flux-
    weighted centroid of the 11x11 pixels around it; ``radius`` must take the whole PSF (the
    aperture correction is 1 by construction, so a radius too small for the star is the
    caller's choice). Pixels with BAD_FOR_SCIENCE DQ bits (or SATURATED) inside the aperture
    are an error: a saturated or damaged core biases the rate.
    """
    from photutils.aperture import ApertureStats, CircularAnnulus, CircularAperture
    from scipy.ndimage import uniform_filter

    from ..datamodels.dqflags import pixel

    d = np.asarray(data, np.float64)
    e = np.asarray(err, np.float64)
    bad = ((np.asarray(dq) & np.uint32(BAD_FOR_SCIENCE | pixel["SATURATED"])) != 0) \
        | ~np.isfinite(d) | ~np.isfinite(e)
    ny, nx = d.shape
    cy, cx = (ny - 1) / 2.0, (nx - 1) / 2.0
    half = search_box // 2
    y0, y1 = max(0, int(cy) - half), min(ny, int(cy) + half + 1)
    x0, x1 = max(0, int(cx) - half), min(nx, int(cx) + half + 1)
    smooth = uniform_filter(np.where(bad, 0.0, d), 5)
    j, i = np.unravel_index(int(np.argmax(smooth[y0:y1, x0:x1])), (y1 - y0, x1 - x0))
    j, i = j + y0, i + x0
    box = (slice(max(0, j - 5), j + 6), slice(max(0, i - 5), i + 6))
    cut = np.where(bad[box], 0.0, d[box])
    level = float(np.median(d[~bad]))
    w = np.clip(cut - level, 0.0, None)
    if w.sum() <= 0:
        raise ZeroPointError("no star near the frame centre")
    yy, xx = np.mgrid[box]
    x, y = float((w * xx).sum() / w.sum()), float((w * yy).sum() / w.sum())
    if x - annulus[1] < 0 or y - annulus[1] < 0 or x + annulus[1] > nx - 1 \
            or y + annulus[1] > ny - 1:
        raise ZeroPointError(f"star at ({x:.1f}, {y:.1f}): its sky annulus (r <= {annulus[1]}) "
                             f"leaves the {nx}x{ny} frame")
    aperture = CircularAperture((x, y), r=radius)
    ring = CircularAnnulus((x, y), r_in=annulus[0], r_out=annulus[1])
    mask_in = aperture.to_mask(method="exact").to_image((ny, nx))
    gy, gx = np.mgrid[0:ny, 0:nx]
    if np.any(bad & (np.hypot(gx - x, gy - y) < 3.0)):
        raise ZeroPointError(f"star at ({x:.1f}, {y:.1f}): its core has unusable (saturated or "
                             "bad) pixels")
    sky = ApertureStats(np.where(bad, np.nan, d), ring, sigma_clip=None).median
    stats = ApertureStats(np.where(bad, 0.0, d) - sky, aperture, error=np.where(bad, 0.0, e))
    n_bad = float((mask_in * bad).sum())
    if n_bad > 0.01 * aperture.area:
        raise ZeroPointError(f"star at ({x:.1f}, {y:.1f}): {n_bad:.0f} unusable pixels in the "
                             "aperture")
    rate = float(stats.sum)
    rate_err = float(stats.sum_err)
    snr = rate / rate_err if rate_err > 0 else math.inf
    if not (rate > 0 and snr >= min_snr):
        raise ZeroPointError(f"no star: aperture at ({x:.1f}, {y:.1f}) has S/N {snr:.1f} "
                             f"(need {min_snr:g})")
    zp = float(mag) + 2.5 * math.log10(rate)
    zp_err = 2.5 / math.log(10.0) * rate_err / rate
    log.info("zero point %.4f +- %.4f mag (star %.3g counts/s at %.1f, %.1f; S/N %.0f)", zp,
             zp_err, rate, x, y, snr)
    return ZeroPoint(zp=zp, zp_err=zp_err, x=x, y=y, rate=rate, rate_err=rate_err,
                     radius=radius, snr=snr)


def photmjsr_from_zero_point(zp: float, band: str, pixel_scale_arcsec: float) -> float:
    """MJy/sr per count/s per pixel for zero point ``zp`` in ``band`` (Vega system): a source of
    1 count/s has magnitude ``zp``, i.e. F_nu = F_nu(Vega) 10^(-0.4 zp) at the isophotal
    wavelength, spread over one pixel's solid angle."""
    lam_um, flam0 = vega_zero_point(band)
    lam_a = lam_um * 1e4
    fnu0_mjy = flam0 * lam_a**2 / _C_ANGSTROM_S / 1e-17
    return fnu0_mjy * 10.0 ** (-0.4 * zp) / (pixel_scale_arcsec**2 * _ARCSEC2_SR)


def zero_point_at_airmass(zp_std: float, airmass_std: float, airmass: float,
                          extinction: float) -> float:
    """The zero point at ``airmass`` from one measured at ``airmass_std``, with ``extinction``
    k in mag per airmass: ZP(X) = ZP(X_std) - k (X - X_std) (a source at higher airmass
    gives fewer counts, so 1 count/s is a brighter magnitude)."""
    return float(zp_std) - float(extinction) * (float(airmass) - float(airmass_std))


@dataclass
class ExtinctionFit:
    """Zero point versus airmass of one night's standards: ZP(X) = zp1 - k (X - 1)."""

    k: float  # mag per airmass
    k_err: float
    zp1: float  # zero point at airmass 1
    n: int
    airmass_range: tuple[float, float]


def fit_extinction(zero_points: list[float], errors: list[float],
                   airmasses: list[float]) -> ExtinctionFit:
    """Weighted straight line through the standards' zero points against airmass (errors floored
    at 0.005 mag: clouds and flat-field differences between standards, not only photon noise).
    Needs two standards at different airmasses; ``ValueError`` otherwise."""
    zp = np.asarray(zero_points, np.float64)
    x = np.asarray(airmasses, np.float64)
    sig = np.maximum(np.asarray(errors, np.float64), 0.005)
    if zp.size < 2 or not np.ptp(x) > 0:
        raise ValueError(f"fit_extinction: needs standards at two airmasses (got {x.tolist()})")
    w = 1.0 / sig**2
    design = np.stack([np.ones_like(x), -(x - 1.0)], axis=1)
    cov = np.linalg.inv(design.T @ (design * w[:, None]))
    zp1, k = cov @ (design.T @ (w * zp))
    return ExtinctionFit(k=float(k), k_err=float(math.sqrt(cov[1, 1])), zp1=float(zp1),
                         n=int(zp.size), airmass_range=(float(x.min()), float(x.max())))
