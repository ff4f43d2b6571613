"""Telluric correction and flux calibration of IFS cubes from a standard star (arrays only).

A telluric standard is a hot dwarf (B9V-A3V) whose spectrum is, to a few per cent, a blackbody
with hydrogen absorption lines. Its cube, divided by that model, gives the *response*: what
the atmosphere x telescope x IRIS turn 1 erg/s/cm^2/A above the atmosphere into, in e-/s per
wavelength bin summed over the star. Dividing a science cube by it removes the telluric
absorption and the instrument's spectral response and puts the cube in physical units in
one step (OSIRIS's ``divblackbo`` + flux scaling; ``remhydr`` is the hydrogen-line part).

1. :func:`find_star` - the star in the band-collapsed cube (a point source, S/N checked);
2. :func:`extract_star` - its spectrum in a circular aperture; voxels lost to bad pixels are
   made up from the star's band-averaged profile, and the fraction lost is reported (a
   saturated core loses most of its voxels);
3. :func:`blackbody_flam` - the star's continuum from its temperature and magnitude (astropy's
   Planck law through the Vega zero points of :mod:`iris_tasks.instrument.standards`);
4. :func:`hydrogen_mask` + :func:`interpolate_over` - the hydrogen lines are not modelled in
   depth: their windows are masked and the response interpolated across them (linear between
   the medians of the bins either side), which assumes the atmosphere is smooth under them;
5. :func:`compute_response` - counts / model, its error, QA (S/N, residual line structure);
6. :func:`airmass_exponent_response` - the standard's atmosphere rescaled to the science
   airmass: the smooth instrument part (an upper envelope) is kept, the absorption part raised
   to X_sci / X_std (Beer-Lambert on the observed, LSF-smoothed transmission: exact for
   resolved lines, an approximation for unresolved ones);
7. :func:`apply_response` - science cube / response / spaxel area -> erg/s/cm^2/A/arcsec^2,
   ERR with the response's error, DQ where the response is undefined.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d, maximum_filter1d

from ..datamodels.dqflags import pixel
from ..errors import BadInputError
from ..instrument.standards import hydrogen_lines, vega_zero_point

log = logging.getLogger(__name__)

__all__ = [
    "FLAM_UNIT", "SURFACE_UNIT", "StarSpectrum", "TelluricError", "airmass_exponent_response",
    "apply_response", "blackbody_flam", "compute_response", "extract_star", "find_star",
    "fit_hydrogen_lines", "hydrogen_mask", "interpolate_in_airmass", "interpolate_over",
    "photmjsr",
]

FLAM_UNIT = "erg / (s cm2 Angstrom)"
SURFACE_UNIT = "erg / (s cm2 Angstrom arcsec2)"
DO_NOT_USE = np.uint32(pixel["DO_NOT_USE"])
INTERPOLATED = np.uint32(pixel["UNRELIABLE_FLAT"])  # response bins bridged over a hydrogen line
# Half-width (micron at Br-gamma, scaling with wavelength) of the window masked around each
# hydrogen line: the strongest lines of an A0 dwarf keep ~1 % of their depth 4-5 FWHM out.
H_WINDOW_UM = 0.012
_ARCSEC2_SR = (math.pi / 180.0 / 3600.0) ** 2
_C_ANGSTROM_S = 2.99792458e18


class TelluricError(BadInputError, ValueError):
    """A standard-star cube that cannot give a response (no star, saturated, wrong type)."""


@dataclass
class StarSpectrum:
    """A star found in a cube and its aperture spectrum (e-/s per bin, summed over the star)."""

    x: float  # 0-based spaxel position
    y: float
    snr: float  # S/N of the band-summed flux in the brightest spaxel
    radius: float  # aperture radius (spaxels)
    flux: np.ndarray  # (nw,)
    variance: np.ndarray  # (nw,)
    lost: np.ndarray  # (nw,) fraction of the star's profile on unusable voxels
    core_lost: float  # fraction of the core (r <= 1.5 spaxels) voxels unusable over the band
    edge_fraction: float  # fraction of the star's band-averaged light beyond the field edge
                          # or the aperture (from the profile's extent: 0 = all inside)


def _usable(data: np.ndarray, err: np.ndarray, dq: np.ndarray) -> np.ndarray:
    return ((np.asarray(dq) & DO_NOT_USE) == 0) & np.isfinite(data) & np.isfinite(err)


def find_star(data: np.ndarray, err: np.ndarray, dq: np.ndarray, *, min_snr: float = 30.0
              ) -> tuple[float, float, float]:
    """(x, y, S/N) of the brightest point source in a cube (nw, ny, nx).

    The band is summed per spaxel over usable voxels (scaled to the full band where some are
    missing); the brightest spaxel's S/N against its own ERR and against the field's scatter
    must both reach ``min_snr``; the position is the flux-weighted centroid of the 3x3 spaxels
    around it above the field's median. TelluricError when there is no such source.
    """
    ok = _usable(data, err, dq)
    nw = data.shape[0]
    n_ok = ok.sum(axis=0)
    d = np.where(ok, data, 0.0).astype(np.float64)
    v = np.where(ok, np.asarray(err, np.float64) ** 2, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(n_ok > 0, nw / np.maximum(n_ok, 1), 0.0)
        image = d.sum(axis=0) * scale
        noise = np.sqrt(v.sum(axis=0)) * scale
    valid = (n_ok > 0.5 * nw) & np.isfinite(image)
    if valid.sum() < 4:
        raise TelluricError("fewer than 4 spaxels have usable data over half of the band")
    level = float(np.median(image[valid]))
    spread = float(1.4826 * np.median(np.abs(image[valid] - level)))
    above = np.where(valid, image - level, -np.inf)
    j, i = np.unravel_index(int(np.argmax(above)), image.shape)
    peak = float(above[j, i])
    snr_err = peak / max(float(noise[j, i]), 1e-300)
    snr_field = peak / max(spread, 1e-300) if spread > 0 else snr_err
    snr = min(snr_err, snr_field)
    if not np.isfinite(snr) or snr < min_snr:
        raise TelluricError(f"no star: the brightest spaxel ({i}, {j}) is {snr:.1f} sigma above "
                            f"the field (need {min_snr:g})")
    js = slice(max(j - 1, 0), j + 2)
    is_ = slice(max(i - 1, 0), i + 2)
    w = np.clip(np.where(valid[js, is_], image[js, is_] - level, 0.0), 0.0, None)
    yy, xx = np.mgrid[js, is_]
    return float((w * xx).sum() / w.sum()), float((w * yy).sum() / w.sum()), float(snr)


def extract_star(data: np.ndarray, err: np.ndarray, dq: np.ndarray, x: float, y: float,
                 radius: float, *, snr: float = math.nan) -> StarSpectrum:
    """Aperture spectrum of a star at (x, y) (spaxels): sum of the voxels within ``radius``.

    The star's band-averaged profile (the median over wavelength of each spaxel's share of the
    aperture flux) fills voxels that are unusable: a plane's sum is divided by the profile
    weight of its usable voxels, and that weight's shortfall is ``lost``.
    """
    nw, ny, nx = data.shape
    jj, ii = np.mgrid[0:ny, 0:nx]
    r = np.hypot(ii - x, jj - y)
    inside = r <= radius
    if not inside.any():
        raise TelluricError(f"aperture of radius {radius} spaxels at ({x:.2f}, {y:.2f}) "
                            "contains no spaxel")
    ok = _usable(data, err, dq)[:, inside]
    d = np.where(ok, np.asarray(data, np.float64)[:, inside], np.nan)
    v = np.where(ok, np.asarray(err, np.float64)[:, inside] ** 2, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.nansum(d, axis=1)
        share = d / np.where(total[:, None] != 0, total[:, None], np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            profile = np.nanmedian(share, axis=0)
    profile = np.where(np.isfinite(profile), np.clip(profile, 0.0, None), 0.0)
    if profile.sum() <= 0:
        raise TelluricError(f"no usable light in the aperture at ({x:.2f}, {y:.2f})")
    profile = profile / profile.sum()
    weight = (ok * profile[None, :]).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = np.where(weight > 0, np.nansum(d, axis=1) / weight, np.nan)
        var = np.where(weight > 0, v.sum(axis=1) / weight**2, np.nan)
    core = r[inside] <= 1.5
    core_lost = float(1.0 - ok[:, core].mean()) if core.any() else 0.0
    # light beyond the aperture or the field: the profile's outermost ring against its peak
    ring = r[inside] > radius - 1.0
    edge = float(profile[ring].sum()) if ring.any() else 0.0
    return StarSpectrum(x=float(x), y=float(y), snr=float(snr), radius=float(radius), flux=flux,
                        variance=var, lost=1.0 - weight, core_lost=core_lost, edge_fraction=edge)


def blackbody_flam(wave_um: np.ndarray, teff: float, mag: float, band: str) -> np.ndarray:
    """F_lambda (erg/s/cm^2/A) of a blackbody of ``teff`` K with Vega magnitude ``mag`` in
    ``band`` (J, H, Ks or an IRIS filter name), at ``wave_um`` micron."""
    from astropy import units as u
    from astropy.modeling.physical_models import BlackBody

    if not (math.isfinite(teff) and teff > 0):
        raise TelluricError(f"standard temperature must be positive, not {teff}")
    if not math.isfinite(mag):
        raise TelluricError(f"standard magnitude must be finite, not {mag}")
    lam0, f0 = vega_zero_point(band)
    bb = BlackBody(temperature=teff * u.K)
    flam_unit = u.erg / u.s / u.cm**2 / u.AA / u.sr

    def shape(w):
        return bb(np.atleast_1d(w) * u.um).to(flam_unit, u.spectral_density(
            np.atleast_1d(w) * u.um)).value

    norm = f0 * 10.0 ** (-0.4 * mag) / float(shape(lam0)[0])
    return shape(np.asarray(wave_um, np.float64)) * norm


def hydrogen_mask(wave_um: np.ndarray, half_width_um: float = H_WINDOW_UM) -> np.ndarray:
    """Bins within ``half_width_um`` x (lambda / Br-gamma) of a Paschen or Brackett line."""
    w = np.asarray(wave_um, np.float64)
    lines = hydrogen_lines(float(w.min()) - 0.05, float(w.max()) + 0.05)
    mask = np.zeros(w.shape, bool)
    for lam in lines.wavelength_um:
        mask |= np.abs(w - lam) <= half_width_um * lam / 2.1661
    return mask


def masked_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The runs of True in a 1-d ``mask`` as ``[start, stop)`` index pairs, in order."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def interpolate_over(wave_um: np.ndarray, values: np.ndarray, mask: np.ndarray,
                     edge_bins: int = 5) -> np.ndarray:
    """``values`` with each masked run replaced by the straight line between the medians of
    the ``edge_bins`` finite bins either side (a run at an end takes the one side's median)."""
    out = np.array(values, np.float64)
    w = np.asarray(wave_um, np.float64)
    n = w.size
    for start, stop in masked_runs(mask):
        left = out[max(0, start - edge_bins):start]
        right = out[stop:min(n, stop + edge_bins)]
        left = left[np.isfinite(left)]
        right = right[np.isfinite(right)]
        if left.size and right.size:
            wl = float(np.median(w[max(0, start - edge_bins):start]))
            wr = float(np.median(w[stop:min(n, stop + edge_bins)]))
            vl, vr = float(np.median(left)), float(np.median(right))
            out[start:stop] = vl + (vr - vl) * (w[start:stop] - wl) / (wr - wl)
        elif left.size or right.size:
            out[start:stop] = float(np.median(left if left.size else right))
        else:
            out[start:stop] = np.nan
    return out


def _window_model(p: np.ndarray, x: np.ndarray, lam: np.ndarray, order: int, scale: float,
                  lines: np.ndarray, centre: float) -> np.ndarray:
    """Polynomial x (1 - Gaussian-smoothed Lorentzians): the model of one hydrogen window;
    ``p`` = polynomial coefficients (order + 1), h0, LSF sigma (bins), one depth per line."""
    poly = np.polyval(p[: order + 1], x) * scale
    h0, sig = p[order + 1], p[order + 2]
    absorb = np.zeros_like(lam)
    for lam_i, d_i in zip(lines, p[order + 3:], strict=True):
        absorb += d_i / (1.0 + ((lam - lam_i) / (h0 * lam_i / centre)) ** 2)
    return poly * (1.0 - gaussian_filter1d(absorb, sig, mode="nearest"))


def fit_hydrogen_lines(wave_um: np.ndarray, ratio: np.ndarray, error: np.ndarray,
                       mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(line profile L, fitted) for the masked hydrogen windows of ``ratio`` (the standard's
    counts over its continuum model): in each window, extended by half its width on both
    sides, ``ratio = P(lambda) x L(lambda)`` with P a low-order polynomial (the response,
    smooth on that scale) and ``L = 1 - G * sum_i d_i / (1 + ((lambda - lambda_i) / h_i)^2)``:
    Lorentzians (one depth per line, one width law h_i = h0 lambda_i / lambda_c) convolved with
    a Gaussian line-spread function G of fitted width. L is 1 outside the fitted regions;
    ``fitted`` is False for bins of windows whose fit failed (left to interpolation).
    """
    from scipy.optimize import least_squares

    w = np.asarray(wave_um, np.float64)
    n = w.size
    profile = np.ones(n)
    fitted = np.zeros(n, bool)
    m = np.asarray(mask, bool)
    for a, b in masked_runs(m):
        ext = max(10, (b - a) // 2)
        lo, hi = max(0, a - ext), min(n, b + ext)
        lines = hydrogen_lines(float(w[lo]), float(w[hi - 1])).wavelength_um
        lines = lines[(lines >= w[a] - 1e-9) & (lines <= w[b - 1] + 1e-9)]
        ww, rr, ee = w[lo:hi], ratio[lo:hi], error[lo:hi]
        ok = np.isfinite(rr) & np.isfinite(ee) & (ee > 0)
        if lines.size == 0 or ok.sum() < 3 * (lines.size + 6) or ok[: a - lo].sum() < 3 \
                or ok[b - lo:].sum() < 3:
            continue
        centre = 0.5 * (ww[0] + ww[-1])
        span = max(ww[-1] - ww[0], 1e-6)
        x = (ww - centre) / span
        order = int(np.clip(span / 0.04 + 1, 1, 4))
        step = float(np.median(np.diff(ww)))
        h_init = 0.5 * 0.0025 * centre / 2.1661
        side = ok & ~m[lo:hi]
        poly0 = np.polyfit(x[side], rr[side], min(order, max(1, int(side.sum()) // 4 - 1)))
        poly0 = np.concatenate([np.zeros(order + 1 - poly0.size), poly0])
        scale = float(np.median(rr[side]))

        args = (x, ww, order, scale, lines, centre)
        p0 = np.concatenate([poly0 / scale, [h_init, 1.0], np.full(lines.size, 0.3)])
        lower = np.concatenate([np.full(order + 1, -np.inf), [0.1 * h_init, 0.3],
                                np.zeros(lines.size)])
        upper = np.concatenate([np.full(order + 1, np.inf), [10 * h_init, 5.0],
                                np.full(lines.size, 0.95)])
        try:
            fit = least_squares(lambda p, a=args, r=rr, e=ee, o=ok:
                                ((_window_model(p, *a) - r) / e)[o],
                                p0, bounds=(lower, upper), x_scale="jac", max_nfev=400)
        except (ValueError, np.linalg.LinAlgError) as exc:
            log.warning("hydrogen lines at %.4f-%.4f um: fit failed (%s); interpolated",
                        w[a], w[b - 1], exc)
            continue
        if not fit.success:
            continue
        p = fit.x
        poly = np.polyval(p[: order + 1], x) * scale
        line_part = _window_model(p, *args) / poly
        profile[lo:hi] = line_part
        fitted[lo:hi] = True
        log.debug("hydrogen lines %s: depths %s, h0 %.5f um, LSF sigma %.2f bins (%g um)",
                  np.round(lines, 4), np.round(p[order + 3:], 3), p[order + 1], p[order + 2],
                  p[order + 2] * step)
    return profile, fitted


def compute_response(wave_um: np.ndarray, star: StarSpectrum, model_flam: np.ndarray, *,
                     half_width_um: float = H_WINDOW_UM, max_lost: float = 0.25,
                     min_snr: float = 3.0, lines: str = "fit"
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(response, error, dq, qa): the star's counts per bin over its model F_lambda.

    Bins whose star spectrum lost more than ``max_lost`` of its profile to unusable voxels,
    or with S/N below ``min_snr``, are DO_NOT_USE (NaN). Hydrogen lines (windows of
    ``half_width_um`` x lambda / Br-gamma, flagged INTERPOLATED): ``lines='fit'`` divides them
    out with :func:`fit_hydrogen_lines` (the atmosphere's structure under a line stays in the
    response), falling back to interpolation where a fit fails; ``'interpolate'`` bridges the
    windows with :func:`interpolate_over`. QA: ``snr`` (median S/N of the used bins),
    ``line_residual`` (the largest |inner / outer - 1| of the final response in the flanks
    just outside the windows, inner = 1-1.25, outer = 1.25-1.5 half-widths: line wings left
    in), ``masked_fraction``, ``lines_fitted`` (share of window bins fitted).
    """
    if lines not in ("fit", "interpolate"):
        raise ValueError(f"lines must be 'fit' or 'interpolate', not {lines!r}")
    w = np.asarray(wave_um, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = star.flux / np.sqrt(star.variance)
        resp = star.flux / model_flam
        resp_err = np.sqrt(star.variance) / model_flam
    bad = ~np.isfinite(resp) | ~(star.lost <= max_lost) | ~(snr >= min_snr) | (resp <= 0)
    resp = np.where(bad, np.nan, resp)
    resp_err = np.where(bad, np.nan, resp_err)
    mask = hydrogen_mask(w, half_width_um)
    fitted = np.zeros(w.shape, bool)
    if lines == "fit" and mask.any():
        profile, fitted = fit_hydrogen_lines(w, resp, resp_err, mask)
        with np.errstate(invalid="ignore", divide="ignore"):
            resp = np.where(fitted, resp / profile, resp)
            resp_err = np.where(fitted, resp_err / profile, resp_err)
    todo = mask & ~fitted
    bridged = interpolate_over(w, resp, todo)
    bridged_err = interpolate_over(w, resp_err, todo)
    dq = np.zeros(w.shape, np.uint32)
    dq[mask] |= INTERPOLATED
    undefined = ~np.isfinite(bridged) | (bridged <= 0)
    dq[undefined] |= DO_NOT_USE
    bridged = np.where(undefined, np.nan, bridged)
    used = ~bad & ~mask
    qa = {"snr": float(np.median(snr[used])) if used.any() else 0.0,
          "masked_fraction": float(mask.mean()),
          "lines_fitted": float(fitted[mask].mean()) if mask.any() else 0.0,
          "line_residual": _line_residual(w, bridged, half_width_um)}
    return bridged, bridged_err, dq, qa


def _line_residual(w: np.ndarray, resp: np.ndarray, half_width_um: float) -> float:
    lines = hydrogen_lines(float(w.min()), float(w.max()))
    worst = 0.0
    for lam in lines.wavelength_um:
        h = half_width_um * lam / 2.1661
        d = np.abs(w - lam)
        inner = resp[(d > h) & (d <= 1.25 * h)]
        outer = resp[(d > 1.25 * h) & (d <= 1.5 * h)]
        inner, outer = inner[np.isfinite(inner)], outer[np.isfinite(outer)]
        if inner.size and outer.size:
            worst = max(worst, abs(float(np.mean(inner) / np.mean(outer)) - 1.0))
    return worst


def airmass_exponent_response(wave_um: np.ndarray, response: np.ndarray, exponent: float,
                              envelope_um: float = 0.1, smooth_bins: float = 1.5) -> np.ndarray:
    """The response with its atmospheric part raised to ``exponent`` (science / standard
    airmass): ``R * A**(exponent - 1)``, A the standard's transmission seen in the response.

    A = smoothed response / its upper envelope (running maximum over ``envelope_um`` of the
    response smoothed by ``smooth_bins``, Gaussian-smoothed again, never below it). The
    smoothing keeps the noise of the response out of A (a noise peak would otherwise raise the
    envelope and read as absorption), and A only multiplies the measured response, so its
    noise is not raised to a power. Absorption spread wider than ``envelope_um`` stays in the
    envelope and is not rescaled.
    """
    r = np.asarray(response, np.float64)
    if exponent == 1.0:
        return r.copy()
    w = np.asarray(wave_um, np.float64)
    step = float(np.median(np.abs(np.diff(w)))) if w.size > 1 else 1.0
    size = max(3, int(round(envelope_um / step)) | 1)
    good = np.isfinite(r)
    if not good.any():
        return r.copy()
    filled = np.interp(np.arange(r.size), np.flatnonzero(good), r[good])
    smooth = gaussian_filter1d(filled, smooth_bins, mode="nearest")
    env = gaussian_filter1d(maximum_filter1d(smooth, size, mode="nearest"), size / 2.0,
                            mode="nearest")
    env = np.maximum(env, smooth)
    trans = np.clip(smooth / env, 1e-3, 1.0)
    return r * trans ** (exponent - 1.0)


def interpolate_in_airmass(low: tuple[np.ndarray, np.ndarray, np.ndarray, float],
                           high: tuple[np.ndarray, np.ndarray, np.ndarray, float],
                           airmass: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The response at ``airmass`` from two standards' responses that bracket it.

    ``low``/``high``: (response, error, dq, airmass) of each standard on one wavelength grid.
    Each bin's logarithm is interpolated linearly in airmass (Beer-Lambert per bin): what the
    two standards measured at each bin replaces the power-law rescaling of one standard,
    which cannot follow unresolved saturated lines (deep water bands), whose effective
    transmission does not scale as a power of the airmass. Returns (response, error, dq,
    weight of ``high``); the relative errors combine with the weights, the DQ is the union.
    """
    r_lo, e_lo, dq_lo, x_lo = low
    r_hi, e_hi, dq_hi, x_hi = high
    if not x_lo < x_hi:
        raise ValueError(f"interpolate_in_airmass: airmasses {x_lo} and {x_hi} are not "
                         "increasing")
    weight = (float(airmass) - x_lo) / (x_hi - x_lo)
    r_lo, r_hi = np.asarray(r_lo, np.float64), np.asarray(r_hi, np.float64)
    usable = np.isfinite(r_lo) & np.isfinite(r_hi) & (r_lo > 0) & (r_hi > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_r = (1.0 - weight) * np.log(r_lo) + weight * np.log(r_hi)
        rel = np.hypot((1.0 - weight) * np.asarray(e_lo, np.float64) / r_lo,
                       weight * np.asarray(e_hi, np.float64) / r_hi)
    response = np.where(usable, np.exp(log_r), np.nan)
    error = np.where(usable, response * rel, np.nan)
    dq = np.asarray(dq_lo, np.uint32) | np.asarray(dq_hi, np.uint32)
    dq = np.where(usable, dq, dq | DO_NOT_USE).astype(np.uint32)
    return response, error, dq, weight


def photmjsr(photflam_per_arcsec2: float, wave_um: float) -> float:
    """Convert a conversion in erg/s/cm^2/A/arcsec^2 (per count rate) to MJy/sr at ``wave_um``."""
    lam_a = wave_um * 1e4
    fnu = photflam_per_arcsec2 * lam_a**2 / _C_ANGSTROM_S  # erg/s/cm^2/Hz/arcsec^2
    return fnu / 1e-17 / _ARCSEC2_SR


def apply_response(data: np.ndarray, err: np.ndarray, dq: np.ndarray, response: np.ndarray,
                   response_err: np.ndarray, response_dq: np.ndarray, area_arcsec2: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(SCI, ERR, DQ) of a cube (e-/s per spaxel per bin) in erg/s/cm^2/A/arcsec^2.

    ERR combines the cube's error and the response's (fully correlated between spaxels, so
    kept per voxel, not averaged down); planes where the response is undefined are NaN and
    DO_NOT_USE."""
    r = np.asarray(response, np.float64)[:, None, None]
    re = np.asarray(response_err, np.float64)[:, None, None]
    undefined = ~np.isfinite(r) | ~(r > 0) | ((np.asarray(response_dq)[:, None, None]
                                               & DO_NOT_USE) != 0)
    rr = np.where(undefined, 1.0, r)
    with np.errstate(invalid="ignore"):
        sci = np.asarray(data, np.float64) / rr / area_arcsec2
        e = np.sqrt((np.asarray(err, np.float64) / rr) ** 2
                    + (sci * np.where(undefined, 0.0, re / rr) * area_arcsec2) ** 2) / area_arcsec2
    sci = np.where(undefined, np.nan, sci)
    e = np.where(undefined, np.nan, e)
    out_dq = np.asarray(dq, np.uint32).copy()
    out_dq[np.broadcast_to(undefined, out_dq.shape)] |= DO_NOT_USE
    return sci.astype(np.float32), e.astype(np.float32), out_dq
