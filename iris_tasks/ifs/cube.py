"""From fitted samples to a calibrated cube: units, throughput, DQ, WCS and sky (pure functions).

Units. The rate image is DN/s. Multiplied by the gain (e-/DN, per pixel from the gain
reference, else the header GAIN) it is e-/s per pixel; extraction turns that into e-/s per
spaxel per wavelength bin on the detector, and dividing by the spaxel throughput (THRUPUT of
the trace reference) gives the flux arriving at the IFS in e-/s per spaxel per wavelength bin
(``BUNIT = 'electron/s'``) - the unit of the simulator's source cube.

DQ of a voxel: ``DO_NOT_USE | NON_SCIENCE`` (SCI and ERR NaN) where no usable pixel constrains
the sample or the spaxel throughput is unusable; ``DO_NOT_USE`` (value kept) where less than
``min_coverage`` of its detector weight falls on usable pixels - the value then rests on the
wings of its profile and on its neighbours - or where masked pixels nearby leave it nearly
undetermined (variance inflated more than ``max_inflation`` times over its own pixels').
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np

from ..datamodels.dqflags import pixel
from ..steps.assign_wcs import imager_wcsinfo

log = logging.getLogger(__name__)

__all__ = [
    "EMPTY", "LOW_COVERAGE", "NO_SKY", "assemble_cube", "cube_wcsinfo", "median_sky",
    "outer_sky", "outer_spaxels", "poisson_model", "rate_variance", "subtract_sky",
    "to_electrons", "wavelength_axis",
]

EMPTY = np.uint32(pixel["DO_NOT_USE"] | pixel["NON_SCIENCE"])
LOW_COVERAGE = np.uint32(pixel["DO_NOT_USE"])
NO_SKY = np.uint32(pixel["NO_SKY"] | pixel["DO_NOT_USE"])
# Efficiency of the median of n Gaussian values relative to the mean (large n): the variance
# of the median is pi/2 times that of the mean.
_MEDIAN_VARIANCE = math.pi / 2.0


def rate_variance(err: np.ndarray, var_poisson: np.ndarray | None,
                  var_rnoise: np.ndarray | None) -> np.ndarray:
    """Per-pixel variance of a rate image: VAR_POISSON + VAR_RNOISE, or ERR^2 when the
    components are absent or all zero (rates written by tools that only fill ERR)."""
    if var_poisson is not None and var_rnoise is not None:
        var = np.asarray(var_poisson, np.float64) + np.asarray(var_rnoise, np.float64)
        if np.any(var > 0):
            return var
    return np.asarray(err, np.float64) ** 2


def to_electrons(data: np.ndarray, variance: np.ndarray, gain: np.ndarray | float | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data * g, variance * g^2, usable gain) with ``g`` in e-/DN (map or scalar).

    Pixels with a non-finite or non-positive gain are returned as unusable (False).
    """
    d = np.asarray(data, np.float64)
    v = np.asarray(variance, np.float64)
    if gain is None:
        return d, v, np.ones(d.shape, bool)
    g = np.broadcast_to(np.asarray(gain, np.float64), d.shape)
    ok = np.isfinite(g) & (g > 0)
    g = np.where(ok, g, 0.0)
    return d * g, v * g * g, ok


def poisson_model(data_e: np.ndarray, var_poisson: np.ndarray | None,
                  var_rnoise: np.ndarray | None, gain: np.ndarray | float | None
                  ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(read-noise variance, Poisson coefficient) in electron units, so that the variance of a
    pixel whose expected rate is m e-/s is ``read + coef * m``; (None, None) without the split.

    The ramp fit gives VAR_POISSON = max(rate, 0) x c per pixel, c depending on the read
    pattern, the weighting and the flat; c = VAR_POISSON / rate where the rate is positive,
    elsewhere the median of those ratios.
    """
    if var_poisson is None or var_rnoise is None:
        return None, None
    g = 1.0 if gain is None else np.asarray(gain, np.float64)
    g2 = g * g
    vr = np.asarray(var_rnoise, np.float64) * g2
    vp = np.asarray(var_poisson, np.float64) * g2
    if not np.any(vr > 0):
        return None, None
    with np.errstate(invalid="ignore", divide="ignore"):
        known = (vp > 0) & (data_e > 0) & np.isfinite(vp) & np.isfinite(data_e)
        ratio = np.where(known, vp / np.where(known, data_e, 1.0), 0.0)
    typical = float(np.median(ratio[known])) if known.any() else 0.0
    return vr, np.where(known, ratio, typical)


def wavelength_axis(wavelength: np.ndarray, rel_tol: float = 1e-3) -> tuple[float, float, float]:
    """(CRVAL3, CDELT3, largest deviation from linear in units of CDELT3) of a wavelength grid.

    The cube's spectral WCS is linear (pixel 1 = the first plane); the WAVELENGTH extension
    carries the exact grid, so a non-linear trace is logged, not refused.
    """
    w = np.asarray(wavelength, np.float64)
    if w.ndim != 1 or w.size < 1 or not np.all(np.isfinite(w)):
        raise ValueError("the wavelength grid must be a finite 1-D array")
    if w.size == 1:
        return float(w[0]), 0.0, 0.0
    cdelt = (w[-1] - w[0]) / (w.size - 1)
    if cdelt == 0:
        raise ValueError("the wavelength grid is constant")
    dev = float(np.max(np.abs(w - (w[0] + cdelt * np.arange(w.size)))) / abs(cdelt))
    if dev > rel_tol:
        log.warning("wavelength grid deviates from linear by %.3g of a bin; CRVAL3/CDELT3 are "
                    "the linear approximation, the WAVELENGTH extension is exact", dev)
    return float(w[0]), float(cdelt), dev


def cube_wcsinfo(ra: float, dec: float, pa: float, scale_mas: float,
                 spatial_shape: tuple[int, int], wavelength: np.ndarray) -> dict[str, Any]:
    """FITS WCS keywords (wcsinfo names) of a cube: TAN about (RA, DEC) at the field centre,
    spaxel scale ``scale_mas`` square, cube +y at position angle PA (the imager convention of
    :func:`iris_tasks.steps.assign_wcs.imager_wcsinfo`), and WAVE in micron along axis 3."""
    info = imager_wcsinfo(ra, dec, pa, spatial_shape, pixel_scale_mas=scale_mas)
    crval3, cdelt3, _ = wavelength_axis(wavelength)
    info.update(wcsaxes=3, ctype3="WAVE", cunit3="um", crpix3=1.0, crval3=crval3,
                cdelt3=cdelt3, pc3_3=1.0, specsys="TOPOCENT")
    return info


def assemble_cube(flux: np.ndarray, variance: np.ndarray, coverage: np.ndarray,
                  throughput: np.ndarray, *, inflation: np.ndarray | None = None,
                  min_coverage: float = 0.5, max_inflation: float = 30.0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(SCI, ERR, DQ) float32/float32/uint32 from the fitted samples and the spaxel throughput.

    ``inflation`` (ERR^2 N_uu) above ``max_inflation`` - a sample left undetermined by masked
    pixels around it - also gets DO_NOT_USE."""
    t = np.asarray(throughput, np.float64)[None]
    usable_t = np.isfinite(t) & (t > 0)
    empty = (coverage <= 0) | ~np.isfinite(variance) | ~usable_t
    tt = np.where(usable_t, t, 1.0)
    with np.errstate(invalid="ignore"):
        sci = np.where(empty, np.nan, flux / tt)
        err = np.where(empty, np.nan, np.sqrt(np.maximum(variance, 0.0)) / tt)
    dq = np.zeros(flux.shape, np.uint32)
    dq[coverage < min_coverage] |= LOW_COVERAGE
    if inflation is not None:
        with np.errstate(invalid="ignore"):
            dq[~(inflation <= max_inflation)] |= LOW_COVERAGE
    dq[np.broadcast_to(empty, flux.shape)] |= EMPTY
    return sci.astype(np.float32), err.astype(np.float32), dq


# ---------------------------------------------------------------------- sky
def median_sky(cubes: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-voxel median of sky cubes ((sci, err, dq) each): (sky, sky_err, undefined).

    Voxels flagged DO_NOT_USE or NaN in a sky cube are left out of its median; a voxel
    without any valid sky value is ``undefined``. The error is that of the mean of the valid
    values times sqrt(pi/2) for n > 2 (the median's efficiency), the plain mean's for n <= 2
    (the median of two values is their mean).
    """
    if not cubes:
        raise ValueError("no sky cubes")
    shape = cubes[0][0].shape
    for sci, _, _ in cubes:
        if sci.shape != shape:
            raise ValueError(f"sky cubes differ in shape: {sci.shape} vs {shape}")
    stack = np.full((len(cubes), *shape), np.nan)
    var = np.full((len(cubes), *shape), np.nan)
    for q, (sci, err, dq) in enumerate(cubes):
        bad = (np.asarray(dq) & pixel["DO_NOT_USE"]) != 0
        s = np.asarray(sci, np.float64)
        e = np.asarray(err, np.float64)
        good = ~bad & np.isfinite(s) & np.isfinite(e)
        stack[q][good] = s[good]
        var[q][good] = e[good] ** 2
    count = np.sum(np.isfinite(stack), axis=0)
    undefined = count == 0
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN voxels: handled by count
        sky = np.nanmedian(stack, axis=0)
        mean_var = np.nanmean(var, axis=0) / np.maximum(count, 1)
    factor = np.where(count > 2, _MEDIAN_VARIANCE, 1.0)
    sky_err = np.sqrt(mean_var * factor)
    sky = np.where(undefined, 0.0, sky)
    sky_err = np.where(undefined, 0.0, sky_err)
    return sky, sky_err, undefined


def outer_spaxels(ny: int, nx: int, radius: float = 0.7) -> np.ndarray:
    """Spaxels at normalised elliptical radius >= ``radius`` from the field centre (1 = the
    middle of the field's edges): the field's outskirts, where the fallback sky is measured."""
    j = (np.arange(ny) - (ny - 1) / 2.0) / max(ny / 2.0, 0.5)
    i = (np.arange(nx) - (nx - 1) / 2.0) / max(nx / 2.0, 0.5)
    return np.hypot(j[:, None], i[None, :]) >= radius


def outer_sky(sci: np.ndarray, dq: np.ndarray, outer: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per-wavelength median over the ``outer`` spaxels: (sky (nw,), sky_err (nw,), undefined
    (nw,), number of outer spaxels).

    Assumes the science target does not reach the outskirts (a compact source near the
    centre). The error is sqrt(pi/2) x the robust scatter (1.4826 MAD) of the outer spaxels
    over sqrt(n), so it includes any real structure there, not just the pipeline errors.
    """
    nw = sci.shape[0]
    sel = np.asarray(outer, bool)
    n_out = int(sel.sum())
    values = np.asarray(sci, np.float64)[:, sel]
    bad = ((np.asarray(dq)[:, sel] & pixel["DO_NOT_USE"]) != 0) | ~np.isfinite(values)
    values = np.where(bad, np.nan, values)
    count = np.sum(~bad, axis=1)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN planes: handled by count
        sky = np.nanmedian(values, axis=1)
        mad = np.nanmedian(np.abs(values - sky[:, None]), axis=1)
    undefined = count == 0
    sky_err = np.sqrt(_MEDIAN_VARIANCE) * 1.4826 * mad / np.sqrt(np.maximum(count, 1))
    sky = np.where(undefined, 0.0, sky)
    sky_err = np.where(undefined, 0.0, sky_err)
    return sky.reshape(nw), sky_err.reshape(nw), undefined.reshape(nw), n_out


def subtract_sky(sci: np.ndarray, err: np.ndarray, dq: np.ndarray, sky: np.ndarray,
                 sky_err: np.ndarray, undefined: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sci - sky, sqrt(err^2 + sky_err^2), dq | NO_SKY|DO_NOT_USE where the sky is undefined.

    ``sky`` is a cube or a spectrum (nw,) broadcast over the spaxels.
    """
    shape = sci.shape
    if np.ndim(sky) == 1:
        sky = np.asarray(sky)[:, None, None]
        sky_err = np.asarray(sky_err)[:, None, None]
        undefined = np.asarray(undefined)[:, None, None]
    out = (np.asarray(sci, np.float64) - sky).astype(np.float32)
    e = np.sqrt(np.asarray(err, np.float64) ** 2 + np.asarray(sky_err, np.float64) ** 2)
    new_dq = np.asarray(dq, np.uint32).copy()
    new_dq[np.broadcast_to(undefined, shape)] |= NO_SKY
    return out, e.astype(np.float32), new_dq
