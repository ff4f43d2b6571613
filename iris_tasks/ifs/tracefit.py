"""Trace geometry and cross-dispersion profile of every IFS spaxel, measured on lamp flats.

A continuum lamp (LEN-SPX for the lenslet, SLI-NFF for the slicer) lights every spectrum
along its whole length, so it shows where each spaxel's light falls across the dispersion
and how it is spread there. This module measures, from such rate images (DN/s,
dark-subtracted), what the pipeline needs for its extraction:

* the trace ``x(y)`` of every spaxel - a Legendre series in the normalised row
  ``t = 2 (y - y_lo) / (y_hi - y_lo) - 1`` - with the residual rms of the measured centres;
* an empirical cross-dispersion profile (:class:`~iris_tasks.ifs.profile.CrossProfile`): per
  zone of the detector, the fraction of a sample's flux in each column around ``rint(x)`` as
  a function of the sample's phase ``x - rint(x)``;
* the relative lamp throughput of every spaxel (median 1), and QA figures.

It follows what the operating IFS pipelines do with their calibration frames (Keck OSIRIS
builds rectification matrices from lenslet scans, CHARIS a PSFlet library, KCWI traces
continuum bars): the optical design (:func:`iris_tasks.instrument.ifs_design.nominal_design`)
only says where to look. The as-built instrument departs from it by up to ~1.5 pixels (smooth
distortion, rotation, per-slice offsets, flexure of the calibration frame), so the design
positions are first searched over a window (``search``), then refined.

LENSLET
    Spectra are isolated (pitch >= 6 columns). For every spectrum and row the centre and flux
    are fitted with the current profile (Gauss-Newton on the pixels of a window of
    ``2 half + 1`` columns, the neighbouring spectra's modelled light subtracted first), a
    Legendre polynomial ``x(t)`` is fitted per spaxel with sigma clipping, and the profile is
    re-measured. The profile is an *effective* (pixel-integrated) PSF in the sense of Anderson
    & King (2000): the pixels of the spectra, divided by each row's flux and placed by their
    offset ``u = column - x`` from the fitted centre, sample the function ``E(u)`` = fraction
    of the flux in a pixel at offset ``u``; it is solved on a grid of nodes 1/``oversample``
    pixel apart (linear interpolation, a weak curvature penalty), jointly with the
    neighbours' light (a 6-column pitch puts it inside a 10-pixel window), and recentred so
    that its centroid over the core is 0. The zones run along each row of spectra (blue end,
    middle, red end: the core widens ~ linearly with wavelength, by ~20 % over a band) and
    across the field, and every sample's profile is the bilinear blend of the zones around
    it - the extraction's interpolation - so the zone profiles are fitted as the extraction
    will use them. Where the pitch is small the wing nodes beyond ``pitch / 2 - 1`` are
    shared by all zones: a zone's wing at ``u`` and its own core at ``u - pitch`` are nearly
    degenerate (only the spectra's flux differences tell them apart). The table is ``E``
    read at the column offsets of every phase and normalised over the window.
SLICER
    The spaxels of one slice are one column apart and blend: the lamp shows each slice as a
    bright band with sharp edges and dark gaps of 4 columns between slices. In row bands (the
    mean of ``band_rows`` rows), every slice is modelled as its spaxels at
    ``x_i = C + (i + 0.5 - n / 2) p`` with relative throughputs ``T_i`` (constant along the
    slice, a smooth Legendre series across it), a band flux and a flux slope across the
    slice per band (the slit image is tilted by ~0.5 row across a slice, so a lamp spectrum
    that changes along the rows tilts the band), all convolved with a parametric profile: a
    Gaussian core (sigma) plus a Gaussian halo (fraction, sigma), pixel-integrated, its
    parameters per zone blended bilinearly between zone centres. Centre and pitch per band
    and slice, the profile parameters and the throughputs are fitted together by
    Levenberg-Marquardt on the sparse Jacobian of all band pixels (fitting them in turn
    converges very slowly: the edges, the wings and the edge spaxels' throughputs trade with
    each other). ``C(y)`` and ``p(y)`` are then Legendre series per slice and the spaxel
    traces follow. Limitations: the profile of a single slicer spaxel is not visible in a
    continuum flat, only the edges of the slices and the light in the gaps between them are;
    so the slicer's profile is only as good as the parametric core + halo form (a halo of
    another shape is fitted by the closest of these). The positions inside a slice follow
    from its edges: linear in the spaxel index, unless ``slice_curvature`` adds the bend of
    a smooth field distortion. Spaxel throughputs that jump from spaxel to spaxel are not
    resolved (``slicer_throughput_degree``).

Measured (tests/test_ifs_tracefit.py and one-off runs on 2026-12-07; x of the fitted traces
against the truth, rms over the measured rows):

* this module's tests' own forward model (256 px, Gaussian core + Moffat/Gaussian halo,
  shift, distortion, rotation, per-slice offsets): lenslet 0.0004 px noiseless, 0.003 px
  with two flats of peak S/N ~60, profile table within 0.3 % / 1.3 % of the peak; slicer
  0.005 px (0.0003 px without this test's strong distortion, 0.6 px over 256 columns,
  which bends a slice by 0.04 px), table within 0.05 %.
* the realistic simulator (:mod:`iris_tasks.simulate.ifs_optics`: as-built distortion,
  per-slice offsets and pitch, core + halo PSF varying with wavelength and field, flexure),
  flat-fielded rates with noise: slicer 0.009 px at 512 px (5 slices) and 0.0004 px at
  4096 px (44 slices; core/halo fitted to 0.54-0.60 px / 6 % / 3.06 px against the truth's
  0.49-0.72 px / 6 % / 3.05 px); lenslet 0.0085 px at 1024 px (7-column pitch), 0.003 px
  at 2048 px and 0.0026 px at 4096 px (31 columns); flat residuals at the noise's level
  (0.08 % slicer, 0.23 % lenslet, of the peak, at 4096 px). At 512 px the lenslet's 6-column pitch
  puts each spectrum's 4 px halo on its neighbours' cores and the traces come out to
  ~0.02 px. A lamp rate that has not been flat-fielded (the simulated detector's 3 % pixel
  response, 2 % channel gain steps) moves the slicer's traces by ~0.01 px (0.013 px rms at
  512 px): fit flat-fielded lamp frames.
* time at 4096^2, one flat, on the shared 2-core machine under load ~5 (a numpy copy of
  the frame took 31-64 ms in the same runs): lenslet 50 s, slicer 48 s; peak memory of
  the whole run (simulator included) 4.6 GB / 3.9 GB.

Refusals (:class:`~iris_tasks.errors.BadInputError`, naming the file): a lamp that is off or
too faint, a frame with too many saturated or unusable pixels where the traces fall, and a
frame whose pattern does not match the design (another mode, or shifted beyond the search
window).

QA (``TraceSolution.qa``): ``trace_rms`` (median per-spaxel residual rms, px),
``profile_residual`` (rms of the flat's residual about the fitted model within the profile
windows, relative to the profile peak; noise included), ``profile_residual_noise`` (what noise
alone gives), ``traced_fraction`` (spaxels with a trace), ``shift`` (the global offset from the
design found by the search), ``n_flats``, ``flat_files``, ``zones``, ``seconds``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg  # noqa: F401  (sp.linalg)
from numpy.polynomial import legendre
from scipy.sparse.linalg import spsolve
from scipy.special import erf

from ..errors import BadInputError
from ..instrument.ifs_design import SLICE_GAP, IfsDesign
from .profile import CrossProfile

log = logging.getLogger(__name__)

__all__ = ["FlatInput", "TraceSolution", "fit_traces", "legendre_at", "pixel_profile"]

_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


# ---------------------------------------------------------------------- inputs and outputs
@dataclass(frozen=True)
class FlatInput:
    """One continuum-lamp flat as a rate image.

    Attributes
    ----------
    data : ndarray (ny, nx)
        Lamp rate, DN/s, dark-subtracted.
    variance : ndarray (ny, nx) or None
        Variance of ``data``; None weights every usable pixel equally.
    good : ndarray (ny, nx) bool or None
        Pixels that may be used (None: every finite pixel).
    name : str
        File name, for messages and QA.
    saturated : ndarray (ny, nx) bool or None
        Pixels that saturated in the ramp (the DQ SATURATED bit), if known: a lamp that
        saturates where the traces fall is refused.
    """

    data: np.ndarray
    variance: np.ndarray | None = None
    good: np.ndarray | None = None
    name: str = "<array>"
    saturated: np.ndarray | None = None


@dataclass(frozen=True)
class TraceSolution:
    """The measured trace geometry and cross-dispersion profile of one IFS configuration.

    ``x_coeffs[j, i]`` are the Legendre coefficients of spaxel (j, i)'s column ``x`` as a
    function of ``t = 2 (y - y_limits[0]) / (y_limits[1] - y_limits[0]) - 1`` (``y`` the
    detector row, 0-based pixel centres). ``row_range[j, i]`` is the first and last row the
    trace was measured on (the series extrapolates a few rows beyond). ``rms`` is the residual
    rms of the measured centres about the fit (NaN for a spaxel not traced), ``throughput``
    the relative lamp throughput (median 1).
    """

    design: IfsDesign
    x_coeffs: np.ndarray
    y_limits: tuple[float, float]
    profile: CrossProfile
    rms: np.ndarray
    throughput: np.ndarray
    qa: dict = field(default_factory=dict)
    row_range: np.ndarray | None = None
    traced: np.ndarray | None = None  # (ny_s, nx_s) bool: measured, not filled in

    def x_at(self, y: np.ndarray) -> np.ndarray:
        """Trace column at rows ``y``, broadcastable to (ny_s, nx_s, ...)."""
        lo, hi = self.y_limits
        y = np.asarray(y, np.float64)
        t = (2.0 * (y - lo) / (hi - lo)) - 1.0
        return legendre_at(self.x_coeffs, t)

    def trace_x(self, trace_y: np.ndarray | None = None) -> np.ndarray:
        """TRACE_X (ny_s, nx_s, nwave) on the rows ``trace_y`` (default: the design's)."""
        ty = self.design.trace_y if trace_y is None else np.asarray(trace_y, np.float64)
        return self.x_at(ty)


def legendre_at(coeffs: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Legendre series with per-spaxel ``coeffs`` (..., ncoef) at ``t`` (broadcastable to
    ``coeffs.shape[:-1] + extra``), by the three-term recurrence."""
    c = np.asarray(coeffs, np.float64)
    t = np.asarray(t, np.float64)
    lead = c.shape[:-1]
    extra = t.ndim - len(lead)
    if extra < 0:
        raise ValueError(f"t of shape {t.shape} does not broadcast to the coefficients {lead}")
    cs = [c[..., k].reshape(lead + (1,) * extra) for k in range(c.shape[-1])]
    p_prev = np.ones_like(t)
    out = cs[0] * p_prev
    if len(cs) == 1:
        return np.broadcast_to(out, np.broadcast_shapes(out.shape, t.shape)).copy()
    p = t.copy()
    out = out + cs[1] * p
    for k in range(2, len(cs)):
        p_prev, p = p, ((2 * k - 1) * t * p - (k - 1) * p_prev) / k
        out = out + cs[k] * p
    return out


# ---------------------------------------------------------------------- profile helpers
def pixel_profile(u: np.ndarray, sigma: float, halo_fraction: float = 0.0,
                  halo_sigma: float = 1.0) -> np.ndarray:
    """Fraction of a point's flux in a pixel whose centre is ``u`` pixels from it, for a
    Gaussian core (``sigma``) plus a Gaussian halo (``halo_fraction`` of the flux,
    ``halo_sigma``)."""
    u = np.asarray(u, np.float64)

    def g(s):
        return 0.5 * (erf((u + 0.5) / (_SQRT2 * s)) - erf((u - 0.5) / (_SQRT2 * s)))

    out = (1.0 - halo_fraction) * g(sigma)
    if np.any(halo_fraction):
        out = out + halo_fraction * g(halo_sigma)
    return out


def _pixel_profile_slope(u: np.ndarray, sigma, halo_fraction, halo_sigma) -> np.ndarray:
    """d/du of :func:`pixel_profile` (the density at the pixel's two edges)."""

    def d(s):
        a = np.exp(-0.5 * ((u + 0.5) / s) ** 2)
        b = np.exp(-0.5 * ((u - 0.5) / s) ** 2)
        return (a - b) / (_SQRT2PI * s)

    return (1.0 - halo_fraction) * d(sigma) + halo_fraction * d(halo_sigma)


def _phases(nphase: int) -> np.ndarray:
    return -0.5 + np.arange(nphase) / (nphase - 1)


def _table_from_function(func, half: int, nphase: int) -> np.ndarray:
    """(nb, nphase) table: func(column offset from the sample) normalised over the window."""
    b = np.arange(2 * half + 1)[:, None]
    offset = (b - half) - _phases(nphase)[None, :]
    table = np.clip(func(offset), 0.0, None)
    table /= table.sum(axis=0, keepdims=True)
    return table


# ---------------------------------------------------------------------- small numerics
def _solve_small(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched solve of (..., n, n) x = (..., n); singular systems give 0."""
    n = a.shape[-1]
    ridge = 1e-12 * np.trace(a, axis1=-2, axis2=-1)[..., None, None] * np.eye(n)
    ok = np.all(np.isfinite(a), axis=(-2, -1)) & np.all(np.isfinite(b), axis=-1)
    ok &= np.abs(np.linalg.det(a + ridge)) > 0
    out = np.zeros(b.shape)
    if ok.any():
        out[ok] = np.linalg.solve((a + ridge)[ok], b[ok][..., None])[..., 0]
    return out


def _robust_sigma(values: np.ndarray) -> float:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def _design_x_at_rows(tx: np.ndarray, ty: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Design column of each spaxel at ``rows`` (..., nr): linear interpolation along the
    design samples (their rows are evenly spaced in each spectrum)."""
    nw = tx.shape[-1]
    step = (ty[..., -1:] - ty[..., :1]) / (nw - 1)
    kf = (rows - ty[..., :1]) / step
    k0 = np.clip(np.floor(kf).astype(np.int64), 0, nw - 2)
    w = kf - k0
    x0 = np.take_along_axis(tx, k0, axis=-1)
    x1 = np.take_along_axis(tx, k0 + 1, axis=-1)
    return x0 + w * (x1 - x0)


def _fit_legendre(t: np.ndarray, values: np.ndarray, weights: np.ndarray, ncoef: int,
                  clip: float, n_clip: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted Legendre fits along the last axis with sigma clipping, batched.

    ``t``, ``values``, ``weights`` (..., n). Returns (coefficients (..., ncoef), kept mask
    (..., n), rms of the kept residuals (...)). The clip scale is the weighted rms of the
    residuals normalised by each point's expected error (1/sqrt(weight)), floored at 1:
    a point is rejected if its residual exceeds ``clip`` times its own error times that.
    """
    v = np.where(np.isfinite(values), values, 0.0)
    w = np.where(np.isfinite(values) & np.isfinite(weights), np.maximum(weights, 0.0), 0.0)
    vander = legendre.legvander(t, ncoef - 1)  # (..., n, ncoef)
    keep = w > 0
    coeffs = np.zeros(v.shape[:-1] + (ncoef,))
    for _ in range(n_clip + 1):
        wk = np.where(keep, w, 0.0)
        ata = np.einsum("...nk,...n,...nl->...kl", vander, wk, vander)
        atb = np.einsum("...nk,...n,...n->...k", vander, wk, v)
        coeffs = _solve_small(ata, atb)
        resid = v - np.einsum("...nk,...k->...n", vander, coeffs)
        norm = resid * np.sqrt(w)
        nk = np.maximum(keep.sum(-1), 1)
        dof = np.maximum(nk - ncoef, 1)
        chi = np.sqrt(np.where(keep, norm**2, 0.0).sum(-1) / dof)
        scale = np.maximum(chi, 1.0)[..., None]
        new_keep = (w > 0) & (np.abs(norm) <= clip * scale)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    resid = v - np.einsum("...nk,...k->...n", vander, coeffs)
    nk = keep.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rms = np.sqrt(np.where(keep, resid**2, 0.0).sum(-1) / np.maximum(nk, 1))
    rms = np.where(nk > ncoef, rms, np.nan)
    return coeffs, keep, rms


def _to_global_domain(coeffs: np.ndarray, local: tuple[float, float],
                      glob: tuple[float, float]) -> np.ndarray:
    """Legendre coefficients over rows ``local`` -> the same polynomial over rows ``glob``."""
    ncoef = coeffs.shape[-1]
    conv = np.zeros((ncoef, ncoef))
    for k in range(ncoef):
        basis = np.zeros(ncoef)
        basis[k] = 1.0
        series = legendre.Legendre(basis, domain=list(local)).convert(domain=list(glob))
        conv[: series.coef.size, k] = series.coef
    return coeffs @ conv.T


def _zone_edges(lo: float, hi: float, n: int) -> np.ndarray:
    return np.linspace(lo, hi + 1e-9, n + 1)


# ---------------------------------------------------------------------- the input frames
def _combine(flats: Sequence[FlatInput], shape: tuple[int, int]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse-variance mean of the flats: (data, weight = 1/variance or 0, saturated any)."""
    num = np.zeros(shape)
    den = np.zeros(shape)
    sat = np.zeros(shape, bool)
    for flat in flats:
        d = np.asarray(flat.data, np.float64)
        ok = np.isfinite(d)
        if flat.good is not None:
            ok &= np.asarray(flat.good, bool)
        if flat.variance is not None:
            v = np.asarray(flat.variance, np.float64)
            with np.errstate(invalid="ignore"):
                ok &= np.isfinite(v) & (v > 0)
            w = np.zeros(shape)
            np.divide(1.0, v, out=w, where=ok)
        else:
            w = ok.astype(np.float64)
        num += np.where(ok, d, 0.0) * w
        den += w
        if flat.saturated is not None:
            sat |= np.asarray(flat.saturated, bool)
    data = np.zeros(shape)
    np.divide(num, den, out=data, where=den > 0)
    if all(f.variance is not None for f in flats):
        weight = den
    else:  # unit weights: the mean of n frames counts n times
        weight = den
    return data, weight, sat


def _noise_level(data: np.ndarray, weight: np.ndarray) -> float:
    """Robust per-pixel noise: from the variances if given, else from row-to-row differences
    (the lamp continuum changes slowly along the dispersion)."""
    step = max(1, data.shape[0] // 512)  # a few hundred row pairs are plenty
    ok = weight > 0
    diff = data[1::step] - data[:-1:step]
    both = ok[1::step] & ok[:-1:step]
    if both.sum() > 100:
        return _robust_sigma(diff[both]) / _SQRT2
    return float("nan")


def _shift_scores(data: np.ndarray, rows: np.ndarray, x: np.ndarray, shifts: np.ndarray
                  ) -> np.ndarray:
    """Sum of ``data`` interpolated linearly in x at (rows, x + shift) for every shift:
    (len(shifts),) + rows.shape[:-1] (summed over the last axis)."""
    ny, nx = data.shape
    out = np.empty((shifts.size,) + rows.shape[:-1])
    flat = data.ravel()
    base = rows * nx
    for n, dx in enumerate(shifts):
        xs = x + dx
        c0 = np.floor(xs).astype(np.int64)
        f = xs - c0
        ok = (c0 >= 0) & (c0 < nx - 1)
        idx = np.where(ok, base + c0, 0)
        v = flat[idx] * (1.0 - f) + flat[np.minimum(idx + 1, flat.size - 1)] * f
        out[n] = np.where(ok, v, 0.0).sum(-1)
    return out


def _peak(shifts: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax along axis 0 with parabolic refinement; (shift, at_edge)."""
    n = shifts.size
    k = np.argmax(scores, axis=0)
    kc = np.clip(k, 1, n - 2)
    ym = np.take_along_axis(scores, (kc - 1)[None], 0)[0]
    y0 = np.take_along_axis(scores, kc[None], 0)[0]
    yp = np.take_along_axis(scores, (kc + 1)[None], 0)[0]
    den = ym - 2 * y0 + yp
    with np.errstate(invalid="ignore", divide="ignore"):
        off = np.where(den < 0, 0.5 * (ym - yp) / den, 0.0)
    off = np.clip(off, -1.0, 1.0)
    step = shifts[1] - shifts[0]
    return shifts[kc] + off * step, (k == 0) | (k == n - 1)


@dataclass
class _Layout:
    """Rows and design columns of the samples the fit uses."""

    rows: np.ndarray  # (ny_s, nx_s, nr) int detector rows
    xd: np.ndarray  # (ny_s, nx_s, nr) design column at those rows
    valid: np.ndarray  # (ny_s, nx_s, nr) rows on the detector


def _layout(design: IfsDesign, shape: tuple[int, int], margin: int, step: int = 1) -> _Layout:
    tx, ty = design.trace_x, design.trace_y
    nw = tx.shape[-1]
    first = np.ceil(ty[..., 0]).astype(np.int64) + margin
    nr = (nw - 1 - 2 * margin) // step + 1
    if nr < 4:
        raise ValueError(f"spectra of {nw} rows are too short for a search margin of {margin}")
    rows = first[..., None] + step * np.arange(nr)
    last_ok = np.floor(ty[..., -1]).astype(np.int64)[..., None] - margin
    valid = (rows >= 0) & (rows < shape[0]) & (rows <= last_ok)
    rows = np.clip(rows, 0, shape[0] - 1)
    return _Layout(rows=rows, xd=_design_x_at_rows(tx, ty, rows.astype(np.float64)),
                   valid=valid)


def _check_frame(flat: FlatInput, design: IfsDesign, lay: _Layout, search: float,
                 min_snr: float, max_saturated: float, max_unusable: float,
                 min_contrast: float) -> float:
    """Refuse a lamp frame that cannot be traced; return its global x shift from the design.

    Lamp off / too faint: the bright-to-dark range of the frame is below ``min_snr`` times
    the pixel noise. Saturated: more than ``max_saturated`` of the pixels on the traces'
    cores flagged saturated. Unusable: more than ``max_unusable`` of them masked. Pattern:
    the mean level on the (shifted) design cores over the level between the traces is below
    ``min_contrast``, or the best shift lies at the edge of the search window.
    """
    name = flat.name
    data = np.asarray(flat.data, np.float64)
    if data.ndim != 2 or data.shape != (design.size, design.size):
        raise BadInputError(f"{name}: lamp flat of shape {data.shape} does not match the "
                            f"{design.size}x{design.size} design of {design.mode}")
    ok = np.isfinite(data)
    if flat.good is not None:
        ok &= np.asarray(flat.good, bool)
    weight = ok.astype(np.float64)
    d = np.where(ok, data, 0.0)
    noise = _noise_level(d, weight)
    if flat.variance is not None:
        v = np.asarray(flat.variance, np.float64)
        good_v = ok & np.isfinite(v) & (v > 0)
        if good_v.any():
            noise = float(np.sqrt(np.median(v[good_v])))
    rows, xd, valid = lay.rows, lay.xd, lay.valid
    core_rows = rows[valid]
    core_cols = np.rint(xd[valid]).astype(np.int64)
    inside = (core_cols >= 0) & (core_cols < data.shape[1])
    core_rows, core_cols = core_rows[inside], core_cols[inside]
    if core_rows.size == 0:
        raise BadInputError(f"{name}: no design trace falls on the frame")
    vals = d[ok]
    bright = float(np.percentile(vals, 99.0)) if vals.size else 0.0
    dark = float(np.percentile(vals, 2.0)) if vals.size else 0.0
    if not (np.isfinite(noise) and noise > 0):
        noise = max(abs(bright), 1e-30) * 1e-3
    if not (bright - dark > min_snr * noise):
        raise BadInputError(f"{name}: the lamp looks off or too faint (bright-to-dark range "
                            f"{bright - dark:.3g} DN/s, {(bright - dark) / noise:.1f} times the "
                            f"pixel noise; at least {min_snr:g} needed)")
    if flat.saturated is not None:
        sat = np.asarray(flat.saturated, bool)[core_rows, core_cols]
        if sat.mean() > max_saturated:
            raise BadInputError(f"{name}: {100 * sat.mean():.1f} % of the pixels on the traces "
                                f"saturated (at most {100 * max_saturated:g} % allowed): "
                                "lamp too bright or exposure too long")
    bad = ~ok[core_rows, core_cols]
    if bad.mean() > max_unusable:
        raise BadInputError(f"{name}: {100 * bad.mean():.1f} % of the pixels on the traces are "
                            f"unusable (at most {100 * max_unusable:g} % allowed; saturated?)")
    # global x shift: the design pattern slid over the frame
    sel = valid
    shifts = np.arange(-search, search + 1e-9, 0.1)
    rows_s = np.where(sel, rows, 0)
    xd_s = np.where(sel, xd, -10.0)
    scores = _shift_scores(d, rows_s.reshape(-1, rows.shape[-1]),
                           xd_s.reshape(-1, rows.shape[-1]), shifts).sum(-1)
    shift, at_edge = _peak(shifts, scores[:, None])
    shift = float(shift[0])
    # contrast: cores against the midpoints between neighbouring traces
    if design.mode == "LENSLET":
        between = design.pitch / 2.0
    else:
        between = (design.trace_x.shape[1] - 1) / 2.0 + (SLICE_GAP + 1) / 2.0
        # the middle of the gap after the slice, measured from the slice centre
    if design.mode == "LENSLET":
        core_x = xd + shift
        dark_x = xd + shift + between
    else:
        centre = xd.mean(axis=1, keepdims=True)
        core_x = np.broadcast_to(centre, xd.shape) + shift
        dark_x = core_x + between
    c_core = np.rint(core_x[valid]).astype(np.int64)
    c_dark = np.rint(dark_x[valid]).astype(np.int64)
    r_all = rows[valid]
    nx = data.shape[1]
    ok_c = (c_core >= 0) & (c_core < nx) & (c_dark >= 0) & (c_dark < nx)
    lit_level = float(np.median(d[r_all[ok_c], c_core[ok_c]]))
    dark_level = float(np.median(d[r_all[ok_c], c_dark[ok_c]]))
    contrast = (lit_level - dark) / max(dark_level - dark, noise, 1e-30)
    if contrast < min_contrast or bool(at_edge[0]):
        why = (f"best shift {shift:+.2f} px at the edge of the +-{search:g} px search window"
               if at_edge[0] else f"trace cores only {contrast:.2f} times brighter than the "
               f"gaps between them (at least {min_contrast:g} expected)")
        raise BadInputError(f"{name}: the lamp pattern does not match the {design.mode} design "
                            f"({design.filter}, scale {design.scale}): {why}; wrong mode, or "
                            "the optics moved beyond the search window")
    return shift


# ---------------------------------------------------------------------- lenslet
class _EPSF:
    """Per-zone effective PSFs on a grid of nodes: E(u) by linear interpolation."""

    def __init__(self, values: np.ndarray, u0: float, du: float):
        self.values = values  # (nzone, nnode)
        self.u0 = u0
        self.du = du

    @property
    def nnode(self) -> int:
        return self.values.shape[1]

    def locate(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (u - self.u0) / self.du
        i0 = np.floor(pos).astype(np.int64)
        inside = (i0 >= 0) & (i0 < self.nnode - 1)
        i0 = np.clip(i0, 0, self.nnode - 2)
        return i0, pos - i0, inside

    def evaluate(self, zones: np.ndarray, weights: np.ndarray, u: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(E(u), dE/du) of samples whose profile is the blend of the zones ``zones`` (n, nc)
        with ``weights`` (n, nc) (the extraction's bilinear interpolation between zone
        centres), at offsets u (n, nb)."""
        i0, f, inside = self.locate(u)
        table = self.values.ravel()
        e = np.zeros(u.shape)
        s = np.zeros(u.shape)
        for c in range(zones.shape[1]):
            wc = weights[:, c:c + 1]
            if not np.any(wc):
                continue
            flat = np.where(inside, i0 + zones[:, c:c + 1] * self.nnode, 0)
            v0 = table[flat]
            dv = table[flat + 1] - v0
            e += wc * (v0 + f * dv)
            s += wc * dv
        e *= inside
        s *= inside
        s /= self.du
        return e, s


def _model_image(shape, rows, cols, amp, epsf_vals) -> np.ndarray:
    """Image of samples (rows (n,), window columns (n, nb), amplitudes (n,), E (n, nb))."""
    ny, nx = shape
    ok = (cols >= 0) & (cols < nx)
    idx = rows[:, None] * nx + np.clip(cols, 0, nx - 1)
    w = np.where(ok, amp[:, None] * epsf_vals, 0.0)
    return np.bincount(idx.ravel(), weights=w.ravel(), minlength=ny * nx).reshape(ny, nx)


def _corners(zone_y: np.ndarray, zone_x: np.ndarray, y: np.ndarray, x: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Zones (n, 4) and bilinear weights (n, 4) of samples at (x, y): the extraction's
    interpolation between zone centres, clamped at the outer centres."""
    def axis(centres, v):
        if centres.size == 1:
            z = np.zeros(v.shape, np.int64)
            return z, z, np.zeros(v.shape)
        lower = np.clip(np.searchsorted(centres, v, side="right") - 1, 0, centres.size - 2)
        frac = np.clip((v - centres[lower]) / (centres[lower + 1] - centres[lower]), 0.0, 1.0)
        return lower, lower + 1, frac

    y0, y1, fy = axis(zone_y, y)
    x0, x1, fx = axis(zone_x, x)
    nzx = zone_x.size
    zones = np.stack([y0 * nzx + x0, y0 * nzx + x1, y1 * nzx + x0, y1 * nzx + x1], axis=1)
    weights = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], axis=1)
    return zones, weights


def _fit_lenslet(data, weight, design, lay, shift, *, search, half, ncoef, zones, oversample,
                 nphase, clip, n_outer, smooth):
    ny, nx = data.shape
    ny_s, nx_s, nr = lay.rows.shape
    pitch = design.pitch
    nsamp = ny_s * nx_s * nr
    rows = lay.rows.reshape(-1)
    valid = lay.valid.reshape(-1)
    x = (lay.xd + shift).reshape(ny_s * nx_s, nr)

    # -- per-spaxel offsets from the design: a search along each whole spectrum
    local = min(1.5, pitch / 2.0 - 1.0)
    shifts = np.arange(-local, local + 1e-9, 0.1)
    rs = np.where(lay.valid, lay.rows, 0).reshape(ny_s * nx_s, nr)
    xs = np.where(lay.valid.reshape(ny_s * nx_s, nr), x, -10.0)
    dsm = np.where(weight > 0, data, 0.0)
    scores = _shift_scores(dsm, rs, xs, shifts)
    dx, _ = _peak(shifts, scores)
    # smooth the per-spaxel offsets over the field: a few spaxels (dead columns, edges) go
    # astray, the optics do not
    jj, ii = np.meshgrid(np.linspace(-1, 1, ny_s), np.linspace(-1, 1, nx_s), indexing="ij")
    basis = np.stack([jj.ravel() ** a * ii.ravel() ** b for a in range(3) for b in range(4)
                      if a + b <= 3], axis=1)
    keep = np.isfinite(dx)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(basis[keep], dx[keep], rcond=None)
        smooth_dx = basis @ coef
        keep = np.abs(dx - smooth_dx) < 0.3
    dx = np.where(np.abs(dx - smooth_dx) < 0.3, dx, smooth_dx)
    x = x + dx[:, None]
    x = x.reshape(-1)

    # -- zones: along each row of spectra from its blue to its red end (the profile widens
    # with wavelength, ~ +-10 % over a band), and across the field
    yc = rows.astype(np.float64)
    nper, nzx = zones
    ends = np.stack([design.trace_y[..., 0].mean(axis=1), design.trace_y[..., -1].mean(axis=1)],
                    axis=1)  # (ny_s, 2) design rows of the spectra's ends
    zone_y = np.concatenate([np.linspace(a, b, nper) for a, b in ends])
    xlo, xhi = float(x[valid].min()), float(x[valid].max())
    ex = _zone_edges(xlo, xhi, nzx)
    zone_x = 0.5 * (ex[1:] + ex[:-1])
    nzy = zone_y.size
    zc, wc = _corners(zone_y, zone_x, yc, x)

    # -- the effective PSF, first a Gaussian of the design width
    reach = half + 1.0
    du = 1.0 / oversample
    nodes = np.arange(-reach, reach + 0.5 * du, du)
    init = pixel_profile(nodes, design.psf_sigma)
    epsf = _EPSF(np.tile(init, (nzy * nzx, 1)), float(nodes[0]), du)
    offsets = np.arange(-half, half + 1)
    # the profile needs a few thousand samples a zone, not all of them: whole detector rows
    # (every spectrum in them, so that neighbours are modelled together) every few rows
    # (~500 samples of ~2 half + 1 pixels each per zone; at most ~150k samples in all, which
    # bounds the sparse profile fit to ~1 GB at 4096^2)
    profile_stride = max(1, int(nsamp // min(max(500 * nzy * nzx, 60_000), 150_000)))
    wflat = weight.ravel()
    dflat = data.ravel()
    amp = np.zeros(nsamp)
    xfit = x.copy()
    rms = np.full(ny_s * nx_s, np.nan)
    keep_rows = valid.copy()
    xmeas = x.copy()
    xerr = np.full(nsamp, np.inf)
    ncx = ncoef
    # each spectrum's measured rows map to t = -1 .. 1 (row_range)
    rr = rows.reshape(ny_s * nx_s, nr).astype(np.float64)
    vrows = np.where(valid.reshape(ny_s * nx_s, nr), rr, np.nan)
    with np.errstate(invalid="ignore"):
        r_lo = np.nanmin(np.where(np.isnan(vrows), np.inf, vrows), axis=1, keepdims=True)
        r_hi = np.nanmax(np.where(np.isnan(vrows), -np.inf, vrows), axis=1, keepdims=True)
    row_range = np.concatenate([r_lo, r_hi], axis=1)
    row_range[~np.isfinite(row_range).all(1)] = np.nan
    tloc = None
    for outer in range(n_outer):
        first_pass = outer == 0
        # a narrow window until the neighbours are modelled
        hw = min(half, max(1, int(pitch // 2) - 1)) if first_pass else half
        win = np.arange(-hw, hw + 1)
        for gn in range(3 if first_pass else 2):
            cols = np.rint(xmeas).astype(np.int64)[:, None] + win
            okc = (cols >= 0) & (cols < nx) & valid[:, None]
            idx = rows[:, None] * nx + np.clip(cols, 0, nx - 1)
            u = cols - xmeas[:, None]
            e, de = epsf.evaluate(zc, wc, u)
            w = np.where(okc, wflat[idx], 0.0)
            target = dflat[idx]
            if not first_pass:
                # the neighbours' modelled light (the sample's own added back); rebuilt at
                # every step: the windows move with the centres, and a stale own term left
                # in a column that entered the window costs 30-60 % more scatter on noisy
                # lamps
                model = _model_image((ny, nx), rows[valid], cols[valid], amp[valid],
                                     e[valid]).ravel()
                target = target - model[idx] + amp[:, None] * e
            if first_pass and gn == 0:
                amp = (w * e * target).sum(1) / np.maximum((w * e * e).sum(1), 1e-300)
            # Gauss-Newton for (amp, x): d model / d x = -amp E'(u)
            ja = e
            jx = -amp[:, None] * de
            r = target - amp[:, None] * e
            a11 = (w * ja * ja).sum(1)
            a12 = (w * ja * jx).sum(1)
            a22 = (w * jx * jx).sum(1)
            b1 = (w * ja * r).sum(1)
            b2 = (w * jx * r).sum(1)
            det = a11 * a22 - a12 * a12
            good = (det > 1e-12 * np.maximum(a11 * a22, 1e-300)) & valid & (a11 > 0)
            with np.errstate(invalid="ignore", divide="ignore"):
                d_amp = np.where(good, (a22 * b1 - a12 * b2) / det, 0.0)
                d_x = np.where(good, (a11 * b2 - a12 * b1) / det, 0.0)
                var_x = np.where(good & (amp > 0), a11 / det, np.inf)
            d_x = np.clip(d_x, -0.5, 0.5)
            amp = amp + d_amp
            xmeas = xmeas + d_x
            xerr = np.sqrt(var_x)
        # guard: centres that ran off (a dead column, a cosmic) go back to the smooth trace
        wild = ~np.isfinite(xmeas) | (np.abs(xmeas - xfit) > 1.0 + (3.0 if first_pass else 0.0))
        xmeas = np.where(wild, xfit, xmeas)
        wfit = np.where(valid & np.isfinite(xerr) & (amp > 0) & ~wild, 1.0 / xerr**2, 0.0)
        # -- trace per spaxel: Legendre in the spectrum's own normalised rows
        tloc = 2.0 * (rr - r_lo) / np.maximum(r_hi - r_lo, 1.0) - 1.0
        coeffs, kept, rms = _fit_legendre(tloc, xmeas.reshape(-1, nr), wfit.reshape(-1, nr),
                                          ncx, clip)
        keep_rows = kept.reshape(-1)
        vander = legendre.legvander(tloc, ncx - 1)
        xfit = np.einsum("snk,sk->sn", vander, coeffs).reshape(-1)
        if outer == n_outer - 1:
            break
        # -- the effective PSF per zone, fitted to the pixels jointly with the neighbours
        cols = np.rint(xfit).astype(np.int64)[:, None] + offsets
        use = valid & (amp > 0) & np.isfinite(xfit) & (rows % profile_stride == 0)
        epsf = _solve_epsf(epsf, zc[use], wc[use], rows[use], cols[use],
                           cols[use] - xfit[use, None], amp[use], dflat, wflat, nx, smooth,
                           core=min(half + 1.0, max(2.0, pitch / 2.0 - 1.0)))
        # recentre: the centroid of E over the window is the trace centre
        zshift = _recentre(epsf, min(half + 0.5, 2.0 * max(design.psf_sigma, 0.5) + 0.5))
        xshift = (wc * zshift[zc]).sum(axis=1)
        xmeas = xmeas + xshift
        xfit = xfit + xshift
    # final residual QA: the flat against the model, within the windows
    cols = np.rint(xfit).astype(np.int64)[:, None] + offsets
    okc = (cols >= 0) & (cols < nx) & valid[:, None]
    idx = rows[:, None] * nx + np.clip(cols, 0, nx - 1)
    u = cols - xfit[:, None]
    e, _ = epsf.evaluate(zc, wc, u)
    use = valid & (amp > 0)
    model = _model_image((ny, nx), rows[use], cols[use], amp[use], e[use])
    peak = amp * e.max(axis=1)
    resid = (dflat[idx] - model.ravel()[idx])
    sel = okc & use[:, None] & (wflat[idx] > 0) & keep_rows[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(sel, resid / peak[:, None], 0.0)
        rel_noise = np.where(sel, 1.0 / np.sqrt(wflat[idx]) / peak[:, None], 0.0)
    nsel = max(int(sel.sum()), 1)
    profile_residual = float(np.sqrt((rel**2).sum() / nsel))
    noise_residual = float(np.sqrt((rel_noise**2).sum() / nsel))
    if not np.any(wflat != 1.0):
        noise_residual = float("nan")  # no variances given: noise unknown
    table = np.empty((nzy * nzx, 2 * half + 1, nphase))
    for z in range(nzy * nzx):
        vals = epsf.values[z]
        table[z] = _table_from_function(lambda off, v=vals: np.interp(off, nodes, v), half,
                                        nphase)
    table = table.reshape(nzy, nzx, 2 * half + 1, nphase)
    # throughput: each spaxel's flux over the lamp spectrum (median over spaxels of a row k)
    a2 = np.where(valid & keep_rows & (amp > 0), amp, np.nan).reshape(ny_s, nx_s, nr)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows no spectrum reaches
        spectrum = np.nanmedian(a2.reshape(ny_s * nx_s, nr), axis=0)
        thr = np.nanmedian(a2 / spectrum, axis=2)
        thr = thr / np.nanmedian(thr)
    return dict(coeffs=coeffs.reshape(ny_s, nx_s, ncx), row_range=row_range.reshape(ny_s, nx_s, 2),
                rms=rms.reshape(ny_s, nx_s), throughput=thr, table=table, zone_y=zone_y,
                zone_x=zone_x, profile_residual=profile_residual,
                profile_residual_noise=noise_residual, psf_sigma=_sigma_of(epsf, half))


def _sigma_of(epsf: _EPSF, half: int) -> float:
    """Gaussian sigma with the same core as the median zone's E (its half maximum)."""
    u = epsf.u0 + epsf.du * np.arange(epsf.nnode)
    v = np.median(epsf.values, axis=0)
    peak = v.max()
    above = u[v >= 0.5 * peak]
    if above.size < 2:
        return float("nan")
    # E is the pixel-integrated profile: its FWHM^2 ~ (2.355 sigma)^2 + 1 (a box of 1 px)
    fwhm = above.max() - above.min() + epsf.du
    return float(math.sqrt(max(fwhm**2 - 1.0 / 1.0, 0.01)) / 2.3548)


def _solve_epsf(epsf: _EPSF, zones: np.ndarray, zweights: np.ndarray, rows: np.ndarray,
                cols: np.ndarray, u: np.ndarray, amp: np.ndarray, data: np.ndarray,
                weight: np.ndarray, nx: int, smooth: float, core: float) -> _EPSF:
    """Least-squares nodes of E for every zone at once.

    Every pixel of the samples' windows is modelled as ``sum_s amp_s E_zone(s)(col - x_s)``
    over all the samples whose window covers it, so where the lenslet pitch puts one
    spectrum's wing on its neighbour's core the two are fitted together (solving for one
    spectrum's wing with the neighbour's *previous* model subtracted just swaps the two
    errors from one iteration to the next). A weak penalty on the second differences of the
    nodes (``smooth`` times the median data weight of a node) keeps sparsely sampled nodes
    tame, and the outermost nodes are pulled to 0.
    """
    nz, nn = epsf.values.shape
    i0, f, inside = epsf.locate(u)
    ok = inside & (cols >= 0) & (cols < nx)
    pix = rows[:, None] * nx + np.clip(cols, 0, nx - 1)
    ok &= weight[pix] > 0
    a = np.broadcast_to(amp[:, None], u.shape)
    upix, inv = np.unique(pix[ok], return_inverse=True)
    row_of = np.full(u.shape, -1, np.int64)
    row_of[ok] = inv
    vals, cols_n, rows_n = [], [], []
    for c in range(zones.shape[1]):  # each sample's profile blends its zones' (bilinear)
        wz = zweights[:, c:c + 1]
        keep = ok & (wz > 0)
        if not keep.any():
            continue
        node = (zones[:, c:c + 1] * nn + i0)[keep]
        aw = (a * wz)[keep]
        ff = f[keep]
        sel_inv = row_of[keep]
        vals += [aw * (1 - ff), aw * ff]
        cols_n += [node, node + 1]
        rows_n += [sel_inv, sel_inv]
    vals = np.concatenate(vals)
    cols_n = np.concatenate(cols_n)
    rows_n = np.concatenate(rows_n)
    design = sp.csr_matrix((vals, (rows_n, cols_n)), shape=(upix.size, nz * nn))
    # Parameters: the nodes within ``core`` of the centre per zone; the wing nodes beyond it
    # shared by all zones. Where the pitch puts a spectrum's wing on its neighbour's core
    # (6 columns at small sizes), a zone's wing at u and its core at u - pitch only differ
    # through the spectra's flux differences: per zone the pair is nearly degenerate (the
    # fitted wings swing by a few % of the peak and drag the cores and centres with them).
    # One wing for the whole field is pinned by the spectra at the field edges.
    u_nodes = epsf.u0 + epsf.du * np.arange(nn)
    own = np.abs(u_nodes) <= core
    if own.all():
        mapping = sp.identity(nz * nn, format="csr")
        n_par = nz * nn
    else:
        n_own = int(own.sum())
        wing_index = np.cumsum(~own) - 1  # wing node number of each non-own node
        zz, kk = np.divmod(np.arange(nz * nn), nn)
        col = np.where(own[kk], zz * n_own + (np.cumsum(own) - 1)[kk],
                       nz * n_own + wing_index[kk])
        n_par = nz * n_own + int((~own).sum())
        mapping = sp.csr_matrix((np.ones(nz * nn), (np.arange(nz * nn), col)),
                                shape=(nz * nn, n_par))
    design = (design @ mapping).tocsr()
    w = weight[upix]
    wd = sp.diags(w) @ design
    normal = (design.T @ wd).tocsc()
    rhs = design.T @ (w * data[upix])
    diag = normal.diagonal()
    scale = float(np.median(diag[diag > 0])) if np.any(diag > 0) else 1.0
    # curvature penalty along each zone's full node range (through the shared wings), the
    # outermost nodes pulled to 0
    d2 = sp.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(nn - 2, nn))
    d2z = sp.kron(sp.identity(nz), d2) @ mapping
    pen = (d2z.T @ d2z) * (smooth * scale)
    ends = np.zeros(nn)
    ends[[0, -1]] = 1.0
    ez = sp.diags(np.tile(ends, nz)) @ mapping
    pen = pen + (ez.T @ ez) * scale
    # parameters no pixel reaches stay at their previous value
    previous = sp.linalg.lsqr(mapping, epsf.values.ravel())[0] if n_par != nz * nn \
        else epsf.values.ravel()
    idle = np.where(diag <= 0, scale, 0.0)
    pen = pen + sp.diags(idle)
    rhs = rhs + idle * previous
    new = mapping @ np.asarray(spsolve((normal + pen).tocsc(), rhs))
    return _EPSF(np.asarray(new).reshape(nz, nn), epsf.u0, epsf.du)


def _recentre(epsf: _EPSF, core: float) -> np.ndarray:
    """Shift each zone's E so that its centroid over |u| <= ``core`` is 0; returns the
    shift to add to the trace positions.

    The centroid of a symmetric profile over any symmetric window is its centre; a window
    on the core keeps the noise of the faint wing nodes, which a wide window multiplies by
    their large |u|, out of the trace positions."""
    u = epsf.u0 + epsf.du * np.arange(epsf.nnode)
    inside = np.abs(u) <= core
    shifts = np.zeros(epsf.values.shape[0])
    for z in range(epsf.values.shape[0]):
        v = epsf.values[z]
        c = float((u[inside] * v[inside]).sum() / v[inside].sum())
        for _ in range(3):  # resample a few times: the window moves with the shift
            v2 = np.interp(u + c, u, epsf.values[z], left=0.0, right=0.0)
            c2 = float((u[inside] * v2[inside]).sum() / v2[inside].sum())
            if abs(c2) < 1e-6:
                break
            c += c2
        epsf.values[z] = np.interp(u + c, u, epsf.values[z], left=0.0, right=0.0)
        shifts[z] = c
    return shifts


# ---------------------------------------------------------------------- slicer
def _cumulative(profile: np.ndarray) -> np.ndarray:
    """Running integral of a pixelised profile (..., nx): value at the left edge of each
    pixel and after the last, (..., nx + 1)."""
    out = np.zeros(profile.shape[:-1] + (profile.shape[-1] + 1,))
    np.cumsum(profile, axis=-1, out=out[..., 1:])
    return out


def _integral(cum: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integral over columns [a, b] (continuous, pixel c covering [c - 0.5, c + 0.5]) of the
    pixelised profile whose running integral is ``cum`` (..., nx + 1)."""
    n = cum.shape[-1] - 1

    def at(v):
        e = np.clip(v + 0.5, 0.0, float(n))
        k = np.clip(np.floor(e).astype(np.int64), 0, n - 1)
        lo = np.take_along_axis(cum, k[..., None], axis=-1)[..., 0]
        hi = np.take_along_axis(cum, k[..., None] + 1, axis=-1)[..., 0]
        return lo + (e - k) * (hi - lo)

    return at(b) - at(a)


class _SlicerModel:
    """Model of the band profiles: every slice's spaxels at C + (i + 0.5 - n/2) p with
    throughputs T, times a band flux S, spread by a core + halo profile per zone."""

    def __init__(self, nband: int, nslice: int, nspax: int, nx: int, reach: int,
                 zones: np.ndarray, zweights: np.ndarray):
        self.nband, self.nslice, self.nspax, self.nx = nband, nslice, nspax, nx
        self.win = np.arange(-reach, reach + 1)
        # profile zones of every band and slice and their bilinear weights, (nband, nslice, 4)
        self.zones = zones
        self.zweights = zweights
        self.ioff = np.arange(nspax) + 0.5 - nspax / 2.0
        # curvature term of the spaxel positions across a slice: x_i = C + o_i p + q_i kappa
        self.quad = 0.5 * (self.ioff**2 - np.mean(self.ioff**2))
        self.kappa = np.zeros((nband, nslice))

    def positions(self, centre: np.ndarray, pitch: np.ndarray) -> np.ndarray:
        return (centre[..., None] + self.ioff * pitch[..., None]
                + self.quad * self.kappa[..., None])  # (nband, nslice, nspax)

    def fix_windows(self, x: np.ndarray) -> None:
        """Keep the windows of the positions ``x`` (one column wider on each side) for all
        later evaluations: the pixel structure of the fit is then set up once."""
        self.fixed = None
        self.win = np.arange(self.win[0] - 1, self.win[-1] + 2)
        self.fixed = self.windows(x)

    def windows(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if getattr(self, "fixed", None) is not None:
            return self.fixed
        cols = np.rint(x).astype(np.int64)[..., None] + self.win  # (b, j, i, w)
        ok = (cols >= 0) & (cols < self.nx)
        flat = np.arange(self.nband)[:, None, None, None] * self.nx + np.clip(cols, 0,
                                                                           self.nx - 1)
        return cols, ok, flat

    def kernel(self, u: np.ndarray, theta: np.ndarray, slope: bool = False) -> np.ndarray:
        """E (or dE/du) at offsets u (b, j, i, w) with the zone parameters theta (nz, 3)."""
        th = self.theta_of(theta)[:, :, None, None, :]
        if slope:
            return _pixel_profile_slope(u, th[..., 0], th[..., 1], th[..., 2])
        return pixel_profile(u, th[..., 0], th[..., 1], th[..., 2])

    def theta_of(self, theta: np.ndarray) -> np.ndarray:
        """Profile parameters (nband, nslice, 3) blended from the zones' (nz, 3)."""
        return np.einsum("bjc,bjck->bjk", self.zweights, theta[self.zones])

    def image(self, values: np.ndarray, flat: np.ndarray, ok: np.ndarray) -> np.ndarray:
        return np.bincount(flat[ok], weights=values[ok],
                           minlength=self.nband * self.nx).reshape(self.nband, self.nx)


def _fit_slicer(data, weight, design, shift, *, search, half, ncoef, zones, nphase, clip,
                n_outer, band_rows, margin, throughput_degree, curvature):
    ny, nx = data.shape
    tx, ty = design.trace_x, design.trace_y
    nslice, nspax, nw = tx.shape
    # rows every spaxel of every slice covers, in bands
    first = int(np.ceil(ty[..., 0].max())) + margin
    last = int(np.floor(ty[..., -1].min())) - margin
    first, last = max(first, 0), min(last, ny - 1)
    if band_rows is None:
        band_rows = max(8, (last - first + 1) // 64)
    nband = (last - first + 1) // band_rows
    if nband < 4:
        raise ValueError(f"too few rows ({last - first + 1}) for slicer bands of {band_rows}")
    rows = first + np.arange(nband * band_rows).reshape(nband, band_rows)
    # band profiles: plain means of the usable pixels over each band's rows. Not weighted
    # by 1/variance: a Poisson variance differs from row to row with the lamp spectrum, and
    # with weights that differ from column to column each column's mean would belong to
    # another row (the traces lean and bow along the rows)
    good = weight[rows] > 0  # (b, r, nx)
    count = good.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        prof = np.where(count > 0, np.where(good, data[rows], 0.0).sum(axis=1)
                        / np.maximum(count, 1), 0.0)
        var = np.where(good, 1.0 / np.where(good, weight[rows], 1.0), 0.0).sum(axis=1)
        wband = np.where(count > 0, count**2 / np.where(var > 0, var, np.inf), 0.0)
    del good
    # the row each band's mean belongs to: its lamp-flux-weighted mean row, per slice
    xd0 = _design_x_at_rows(tx, ty, np.broadcast_to(rows.mean(1)[None, None, :],
                                                    (nslice, nspax, nband)))
    lo_col = np.clip(np.floor(xd0[:, 0].mean(1) + shift - 0.5).astype(np.int64), 0, nx)
    hi_col = np.clip(np.ceil(xd0[:, -1].mean(1) + shift + 0.5).astype(np.int64), 0, nx)
    csum = np.zeros((ny, nx + 1))
    np.cumsum(np.where(weight > 0, data, 0.0), axis=1, out=csum[:, 1:])
    slice_flux = csum[rows][:, :, hi_col] - csum[rows][:, :, lo_col]  # (b, r, j)
    slice_flux = np.maximum(slice_flux, 0.0)
    fsum = slice_flux.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ycen_bj = np.where(fsum > 0, (slice_flux * rows[:, :, None]).sum(axis=1)
                           / np.where(fsum > 0, fsum, 1.0), rows.mean(1)[:, None])
    del csum, slice_flux
    ycen = ycen_bj.mean(axis=1)  # (b,)
    # design centre and pitch of every slice at the band rows
    yb = np.broadcast_to(rows.mean(1)[None, None, :], (nslice, nspax, nband))
    xd = _design_x_at_rows(tx, ty, yb)  # (j, i, b)
    centre = (xd.mean(axis=1) + shift).T  # (b, j)
    pitch = ((xd[:, -1] - xd[:, 0]) / max(nspax - 1, 1)).T.copy()  # (b, j)
    # -- search: slide a slab of the slice's width over the band profile
    cum = _cumulative(prof)
    local = np.arange(-search, search + 1e-9, 0.05)
    width = nspax * pitch
    scores = np.empty((local.size, nband, nslice))
    for n, dx in enumerate(local):
        a = centre + dx - width / 2
        b = centre + dx + width / 2
        scores[n] = _integral(cum[:, None, :], a, b)
    # a slab that fits gains the most against its neighbours: use the score's slope sign
    # change; the maximum of the integral is flat-topped only for a top hat
    dxs, _ = _peak(local, scores)
    # smooth along the bands per slice (a few bands may be hit by defects)
    y_lo, y_hi = float(ycen_bj.min()), float(ycen_bj.max())
    tt = 2.0 * (ycen_bj.T - y_lo) / max(y_hi - y_lo, 1.0) - 1.0  # (j, b)
    cfit, _, _ = _fit_legendre(tt, (centre + dxs).T, np.ones((nslice, nband)), 4, 3.0)
    centre = np.einsum("jbk,jk->bj", legendre.legvander(tt, 3), cfit)
    # -- zones
    nzy, nzx = zones
    # zone centres from the first to the last band / slice; every band and slice blends the
    # four around it (as the extraction interpolates the tables), so the profile follows
    # its smooth change with wavelength (~ +-10 % over a band) and across the field
    zone_y = np.linspace(ycen[0], ycen[-1], nzy) if nzy > 1 else np.array([ycen.mean()])
    slice_x = centre.mean(axis=0)
    zone_x = (np.linspace(slice_x[0], slice_x[-1], nzx) if nzx > 1
              else np.array([slice_x.mean()]))
    zc, zw = _corners(zone_y, zone_x, np.broadcast_to(ycen[:, None], centre.shape).ravel(),
                      np.broadcast_to(slice_x[None, :], centre.shape).ravel())
    model = _SlicerModel(nband, nslice, nspax, nx, half + 2, zc.reshape(nband, nslice, 4),
                         zw.reshape(nband, nslice, 4))
    theta = np.tile([design.psf_sigma, 0.05, max(2.0, 3 * design.psf_sigma)], (nzy * nzx, 1))
    thr = np.ones((nslice, nspax))
    # band flux: the mean of the slab's inner columns
    xs = model.positions(centre, pitch)
    inner = np.rint(xs[..., 2:-2]).astype(np.int64)
    flux = np.take_along_axis(prof[:, None, :], inner.reshape(nband, 1, -1), 2).reshape(
        inner.shape).mean(-1)
    wpix = wband
    if throughput_degree is None:
        basis = np.eye(nspax)
    else:
        basis = legendre.legvander(np.linspace(-1.0, 1.0, nspax),
                                   min(int(throughput_degree), nspax - 1))
        # the linear part across the slice is the per-band flux slope's (its band median)
        basis = np.delete(basis, 1, axis=1) if basis.shape[1] > 1 else basis
    acoef = np.zeros((nslice, basis.shape[1]))
    acoef[:, 0] = 1.0
    state = _SlicerState(centre=centre, pitch=pitch, flux=flux, theta=theta, acoef=acoef)
    state, chi2 = _slicer_lm(model, prof, wpix, state, basis, n_iter=n_outer,
                             curvature_from=ycen, curvature=curvature)
    centre, pitch, flux, theta = state.centre, state.pitch, state.flux, state.theta
    onorm = model.ioff / max(float(np.abs(model.ioff).max()), 1.0)
    thr = (state.acoef @ basis.T) * (1.0 + np.median(state.slope, axis=0)[:, None] * onorm)
    cov = state.cov
    # -- traces: centre(y) and pitch(y) per slice as Legendre series
    ok = np.isfinite(cov[..., 0, 0]) & (cov[..., 0, 0] > 0)
    wc = np.where(ok, 1.0 / np.where(ok, cov[..., 0, 0], 1.0), 0.0).T  # (j, b)
    okp = np.isfinite(cov[..., 1, 1]) & (cov[..., 1, 1] > 0)
    wp = np.where(okp, 1.0 / np.where(okp, cov[..., 1, 1], 1.0), 0.0).T
    c_coef, c_keep, _ = _fit_legendre(tt, centre.T, wc, ncoef, clip)
    p_coef, p_keep, _ = _fit_legendre(tt, pitch.T, wp, min(ncoef, 3), clip)
    vander = legendre.legvander(tt, ncoef - 1)  # (j, b, k)
    cfit = np.einsum("jbk,jk->jb", vander, c_coef)
    pfit = np.einsum("jbk,jk->jb", vander[..., : p_coef.shape[1]], p_coef)
    # per-spaxel residual rms of the band measurements about the fitted traces
    k_coef, _, _ = _fit_legendre(tt, model.kappa.T, np.ones((nslice, nband)), ncoef, 1e9)
    kfit = np.einsum("jbk,jk->jb", vander, k_coef)
    quad = model.quad[None, :, None]
    xi_meas = (centre.T[:, None, :] + model.ioff[None, :, None] * pitch.T[:, None, :]
               + quad * model.kappa.T[:, None, :])
    xi_fit = (cfit[:, None, :] + model.ioff[None, :, None] * pfit[:, None, :]
              + quad * kfit[:, None, :])
    keep = (c_keep & p_keep)[:, None, :]
    nk = keep.sum(-1)
    rms = np.sqrt(np.where(keep, (xi_meas - xi_fit) ** 2, 0.0).sum(-1) / np.maximum(nk, 1))
    rms = np.where(nk > ncoef, rms, np.nan)
    pc = np.zeros_like(c_coef)
    pc[:, : p_coef.shape[1]] = p_coef
    coeffs = (c_coef[:, None, :] + model.ioff[None, :, None] * pc[:, None, :]
              + model.quad[None, :, None] * k_coef[:, None, :])
    # -- QA: residual of the band profiles within the slices and their gaps
    xs = model.positions(centre, pitch)
    cols, okw, flat = model.windows(xs)
    e = model.kernel(cols - xs[..., None], theta)
    amp = flux[..., None] * (state.acoef @ basis.T)[None] * (1.0 + state.slope[..., None]
                                                             * onorm)
    img = model.image(amp[..., None] * e, flat, okw)
    lit = model.image(np.ones_like(e), flat, okw) > 0
    level = np.median(flux * thr.mean(1)[None, :])
    sel = lit & (wpix > 0)
    profile_residual = float(np.sqrt(np.mean(((prof - img)[sel] / level) ** 2)))
    with np.errstate(divide="ignore"):
        noise = np.where(sel, 1.0 / np.sqrt(np.where(wpix > 0, wpix, np.inf)), 0.0)
    profile_residual_noise = float(np.sqrt(np.mean((noise[sel] / level) ** 2)))
    # relative peak of one spaxel's profile against the slab level, for the record
    # -- table per zone
    table = np.empty((nzy * nzx, 2 * half + 1, nphase))
    for z in range(nzy * nzx):
        table[z] = _table_from_function(lambda off, t=theta[z]: pixel_profile(off, *t), half,
                                        nphase)
    # throughput: the spaxel's T times its slice's flux relative to the other slices
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = flux / np.median(flux, axis=1, keepdims=True)
    slice_level = np.median(rel, axis=0)
    throughput = thr * slice_level[:, None]
    throughput = throughput / np.median(throughput)
    row_range = np.broadcast_to(np.array([float(rows[0, 0]), float(rows[-1, -1])]),
                                (nslice, nspax, 2)).copy()
    # the band means sit at the band centres: the measured rows span ycen[0] .. ycen[-1]
    local_range = (y_lo, y_hi)
    return dict(coeffs=coeffs, row_range=row_range, local_range=local_range, rms=rms,
                throughput=throughput, table=table.reshape(nzy, nzx, 2 * half + 1, nphase),
                zone_y=zone_y, zone_x=zone_x, profile_residual=profile_residual,
                profile_residual_noise=profile_residual_noise,
                psf_sigma=float(np.median(theta[:, 0])), psf_params=theta.reshape(nzy, nzx, 3))


def _slicer_curvature(pitch: np.ndarray, centre: np.ndarray, ycen: np.ndarray) -> np.ndarray:
    """Curvature of the spaxel positions across each slice, (nband, nslice).

    Inside a slice a continuum lamp is uniform, so only the slice edges - a centre and a
    width, i.e. a mean pitch - are measured. The distortion of the optics is smooth over
    the field, though: the pitch of the slices, as a smooth function p(column, row) fitted
    over all slices, has the column derivative dp/dx, which is the second derivative of
    the spaxel positions within a slice (over a slice of n spaxels it moves the middle
    spaxels by ~ n^2 dp/dx / 8 against the edges).
    """
    nband, nslice = pitch.shape
    if nslice < 2:
        return np.zeros_like(pitch)
    span = max(float(np.ptp(centre)), 1.0)
    xi = 2.0 * (centre - centre.mean()) / span
    yy = 2.0 * (ycen - ycen.mean()) / max(float(np.ptp(ycen)), 1.0)
    yy = np.broadcast_to(yy[:, None], pitch.shape)
    dx_deg = min(3, nslice - 1)
    terms = [(a, b) for a in range(dx_deg + 1) for b in range(3)]
    basis = np.stack([xi.ravel() ** a * yy.ravel() ** b for a, b in terms], axis=1)
    v = pitch.ravel()
    keep = np.isfinite(v)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(basis[keep], v[keep], rcond=None)
        resid = v - basis @ coef
        scale = _robust_sigma(resid[keep]) or 0.0
        new = np.isfinite(v) & (np.abs(resid) <= 4.0 * max(scale, 1e-9))
        if np.array_equal(new, keep):
            break
        keep = new
    deriv = np.zeros(v.shape)
    for (a, b), c in zip(terms, coef, strict=True):
        if a > 0:
            deriv += c * a * xi.ravel() ** (a - 1) * yy.ravel() ** b
    return (deriv * 2.0 / span).reshape(pitch.shape)


def _slicer_terms(model, centre, pitch, flux, thr, theta):
    xs = model.positions(centre, pitch)
    cols, ok, flat = model.windows(xs)
    u = cols - xs[..., None]
    e = model.kernel(u, theta)
    amp = flux[..., None] * thr[None]  # (b, j, i)
    return xs, cols, ok, flat, u, e, amp


@dataclass
class _SlicerState:
    centre: np.ndarray  # (nband, nslice)
    pitch: np.ndarray  # (nband, nslice)
    flux: np.ndarray  # (nband, nslice)
    theta: np.ndarray  # (nzone, 3): core sigma, halo fraction, halo sigma
    acoef: np.ndarray  # (nslice, nk): throughput across the slice, Legendre coefficients
    slope: np.ndarray | None = None  # (nband, nslice): relative flux slope across the slice
    cov: np.ndarray | None = None  # (nband, nslice, 4, 4) of (centre, pitch, flux, slope)


# Parameters per band and slice: centre, pitch, flux, relative flux slope across the slice.
# The slope is there because the spaxels of a slice see one wavelength at slightly different
# rows (the slit image is tilted by ~0.5 row across a slice): a lamp spectrum that changes
# along the rows makes a flux gradient across the slice that changes from band to band.
_NGEO = 4
_THETA_LIMITS = np.array([[0.15, 3.0], [0.0, 0.6], [0.3, 10.0]])


def _kernel_terms(u: np.ndarray, th: np.ndarray) -> tuple[np.ndarray, ...]:
    """E, dE/du, dE/dsigma, dE/dfraction, dE/dhalo_sigma of the pixel-integrated core +
    halo profile at offsets u (th broadcast against u, last axis the 3 parameters)."""
    sig, frac, hs = th[..., 0], th[..., 1], th[..., 2]

    def parts(s):
        a = (u + 0.5) / s
        b = (u - 0.5) / s
        pa = np.exp(-0.5 * a * a) / _SQRT2PI
        pb = np.exp(-0.5 * b * b) / _SQRT2PI
        g = 0.5 * (erf(a / _SQRT2) - erf(b / _SQRT2))
        du = (pa - pb) / s
        ds = -(pa * a - pb * b) / s
        return g, du, ds

    gc, duc, dsc = parts(sig)
    gh, duh, dsh = parts(hs)
    e = (1.0 - frac) * gc + frac * gh
    de = (1.0 - frac) * duc + frac * duh
    return e, de, (1.0 - frac) * dsc, gh - gc, frac * dsh


def _slicer_lm(model, prof, wpix, state, basis, *, n_iter, curvature_from, curvature):
    """Levenberg-Marquardt on all the slicer parameters at once: (centre, pitch, flux) per
    band and slice, the profile per zone, the throughput coefficients per slice.

    The pixel Jacobian is sparse (a band pixel depends on its slice's three band parameters,
    its zone's profile and its slice's throughput; a gap pixel on two slices), so the normal
    matrix is too; it is solved directly. Fitting the blocks in turn instead converges very
    slowly: the profile's wings, the edge positions and the throughputs at the edges trade
    with each other.
    """
    nb_, nj = model.nband, model.nslice
    nz = state.theta.shape[0]
    nk = basis.shape[1]
    n_geo = nb_ * nj * _NGEO
    onorm = model.ioff / max(float(np.abs(model.ioff).max()), 1.0)  # -1 .. 1 across a slice
    if state.slope is None:
        state.slope = np.zeros((nb_, nj))
    n_par = n_geo + nz * 3 + nj * nk
    w_all = wpix.ravel()
    model.fix_windows(model.positions(state.centre, state.pitch))
    structure: dict = {}

    def evaluate(st, want_jac):
        thr = st.acoef @ basis.T  # (j, i)
        xs = model.positions(st.centre, st.pitch)
        cols, ok, flat = model.windows(xs)
        u = cols - xs[..., None]
        th = model.theta_of(st.theta)[:, :, None, None, :]
        terms = _kernel_terms(u, th)
        e = terms[0]
        tilt = 1.0 + st.slope[..., None] * onorm  # (b, j, i)
        amp = (st.flux[..., None] * thr[None] * tilt)[..., None]  # (b, j, i, 1)
        img = model.image(amp * e, flat, ok)
        resid = prof - img
        chi2 = float((w_all * resid.ravel() ** 2).sum())
        if not want_jac:
            return chi2, resid, None
        # per (band, slice, column) sums of the window elements: one Jacobian row each (the
        # windows are fixed, so this structure is computed once)
        if not structure:
            key = (np.arange(nb_)[:, None, None, None] * nj
                   + np.arange(nj)[None, :, None, None])
            key = np.broadcast_to(key * model.nx + np.clip(cols, 0, model.nx - 1), cols.shape)
            keys, inv = np.unique(key[ok], return_inverse=True)
            grp = keys // model.nx  # band * nj + slice
            pix = (grp // nj) * model.nx + keys % model.nx
            upix, prow = np.unique(pix, return_inverse=True)
            structure.update(keys=keys, inv=inv, grp=grp, upix=upix, prow=prow)
        keys, inv, grp = structure["keys"], structure["inv"], structure["grp"]
        upix, prow = structure["upix"], structure["prow"]
        de = terms[1]
        o = model.ioff[None, None, :, None]
        cols_j = []
        vals_j = []
        sel = ok

        def add(weights, param):
            cols_j.append(param)
            vals_j.append(np.bincount(inv, weights=weights[sel], minlength=keys.size))

        add(np.broadcast_to(-amp * de, cols.shape), grp * _NGEO)
        add(np.broadcast_to(-amp * de * o, cols.shape), grp * _NGEO + 1)
        add(np.broadcast_to((thr[None] * tilt)[..., None] * e, cols.shape), grp * _NGEO + 2)
        add(np.broadcast_to((st.flux[..., None] * thr[None] * onorm)[..., None] * e,
                            cols.shape), grp * _NGEO + 3)
        zg = model.zones.reshape(-1, 4)[grp]  # (keys, 4) zones of each key's band and slice
        for c in range(4):
            wcz = model.zweights[..., c][:, :, None, None]
            if not np.any(wcz):
                continue
            for k in range(3):
                add(np.broadcast_to(wcz * amp * terms[2 + k], cols.shape),
                    n_geo + zg[:, c] * 3 + k)
        slice_of_grp = grp % nj
        fe = np.broadcast_to((st.flux[..., None] * tilt)[..., None] * e, cols.shape)
        for k in range(nk):
            add(fe * basis[:, k][None, None, :, None], n_geo + nz * 3 + slice_of_grp * nk + k)
        nrow = upix.size
        rows_all = np.concatenate([prow] * len(cols_j))
        jac = sp.csr_matrix((np.concatenate(vals_j), (rows_all, np.concatenate(cols_j))),
                            shape=(nrow, n_par))
        return chi2, resid, (jac, upix)

    chi2, resid, jd = evaluate(state, True)
    lam = 1e-3
    for it in range(n_iter):
        jac, upix = jd
        w = w_all[upix]
        r = resid.ravel()[upix]
        jtw = jac.T @ sp.diags(w)
        normal = (jtw @ jac).tocsc()
        grad = jtw @ r
        diag = normal.diagonal()
        diag = np.where(diag > 0, diag, 1.0)
        improved = False
        for _ in range(8):
            step = _schur_step(normal, lam * diag, grad, n_geo)
            trial = _apply_step(state, step, nb_, nj, nz, nk, basis)
            chi2_t, resid_t, _ = evaluate(trial, False)
            if chi2_t < chi2:
                improved = True
                break
            lam *= 4.0
        if not improved:
            break
        converged = chi2 - chi2_t < 1e-6 * chi2
        state, chi2 = trial, chi2_t
        lam = max(lam / 3.0, 1e-7)
        if converged or it % 3 == 2 or it == n_iter - 1:
            kappa = (_slicer_curvature(state.pitch, state.centre, curvature_from)
                     if curvature else model.kappa)
            moved = float(np.abs(kappa - model.kappa).max() * np.abs(model.quad).max())
            model.kappa = kappa
            if converged and moved < 1e-4:  # px at the slice edges
                chi2, resid, jd = evaluate(state, True)
                break
        chi2, resid, jd = evaluate(state, True)
    # covariance of (centre, pitch, flux) per band and slice from the diagonal blocks
    jac, upix = jd
    w = w_all[upix]
    normal = (jac.T @ sp.diags(w) @ jac).tocsr()
    blocks = np.zeros((nb_ * nj, _NGEO, _NGEO))
    idx = np.arange(nb_ * nj) * _NGEO
    for a in range(_NGEO):
        for b in range(_NGEO):
            blocks[:, a, b] = np.asarray(normal[idx + a, idx + b]).ravel()
    nfree = max(int((w_all > 0).sum()) - n_par, 1)
    scale = max(chi2 / nfree, 1e-30)
    with np.errstate(invalid="ignore", divide="ignore"):
        ridge = 1e-12 * np.trace(blocks, axis1=1, axis2=2)[:, None, None] * np.eye(_NGEO)
        cov = np.linalg.inv(blocks + ridge) * scale
    state.cov = cov.reshape(nb_, nj, _NGEO, _NGEO)
    return state, chi2


def _schur_step(normal: sp.spmatrix, damping: np.ndarray, grad: np.ndarray, n_geo: int
                ) -> np.ndarray:
    """Solve the damped normal equations by the Schur complement of the band parameters.

    The first ``n_geo`` unknowns are ``_NGEO`` per band and slice, coupled to each other
    only within their block (and, weakly, to the neighbouring slice's through the gap
    pixels, which this step leaves out: Levenberg-Marquardt only needs a descent step, and
    it accepts a step only if chi^2 drops). The remaining few hundred (profile zones,
    throughputs) couple to everything: they are solved from the dense Schur complement.
    A direct sparse solve of the whole system costs 10-40x more (its fill-in).
    """
    csr = normal.tocsr()
    n = csr.shape[0]
    ng = n_geo // _NGEO
    base = np.arange(ng) * _NGEO
    blocks = np.zeros((ng, _NGEO, _NGEO))
    for a in range(_NGEO):
        for b in range(_NGEO):
            blocks[:, a, b] = np.asarray(csr[base + a, base + b]).ravel()
    blocks[:, np.arange(_NGEO), np.arange(_NGEO)] += damping[:n_geo].reshape(ng, _NGEO)
    scale = np.einsum("gii->gi", blocks).max(axis=1)
    bad = ~(scale > 0)
    blocks[bad] = np.eye(_NGEO)
    inv_blocks = np.linalg.inv(blocks)
    a_inv = sp.bsr_matrix((inv_blocks, np.arange(ng), np.arange(ng + 1)),
                          shape=(n_geo, n_geo)).tocsr()
    b_mat = csr[:n_geo, n_geo:]
    c_mat = csr[n_geo:, n_geo:].toarray() + np.diag(damping[n_geo:])
    ainv_b = a_inv @ b_mat
    schur = c_mat - (b_mat.T @ ainv_b).toarray()
    g1, g2 = grad[:n_geo], grad[n_geo:]
    rhs = g2 - ainv_b.T @ g1
    try:
        x2 = np.linalg.solve(schur, rhs)
    except np.linalg.LinAlgError:
        x2 = np.linalg.lstsq(schur, rhs, rcond=None)[0]
    x1 = a_inv @ (g1 - b_mat @ x2)
    out = np.empty(n)
    out[:n_geo] = x1
    out[n_geo:] = x2
    return out


def _apply_step(state, step, nb_, nj, nz, nk, basis):
    n_geo = nb_ * nj * _NGEO
    geo = step[:n_geo].reshape(nb_, nj, _NGEO)
    th = step[n_geo: n_geo + nz * 3].reshape(nz, 3)
    ac = step[n_geo + nz * 3:].reshape(nj, nk)
    theta = np.clip(state.theta + th, _THETA_LIMITS[:, 0], _THETA_LIMITS[:, 1])
    theta[:, 2] = np.maximum(theta[:, 2], 1.2 * theta[:, 0])
    acoef = state.acoef + ac
    flux = state.flux + geo[..., 2]
    # the throughput's scale belongs to the band fluxes: mean 1 per slice
    mean = (acoef @ basis.T).mean(axis=1)
    mean = np.where(mean > 0, mean, 1.0)
    return _SlicerState(centre=state.centre + np.clip(geo[..., 0], -0.5, 0.5),
                        pitch=state.pitch + np.clip(geo[..., 1], -0.02, 0.02),
                        flux=flux * mean[None, :], theta=theta,
                        acoef=acoef / mean[:, None],
                        slope=state.slope + np.clip(geo[..., 3], -0.05, 0.05))


# ---------------------------------------------------------------------- entry point
def _default_zones(n_samples: int, n_limit: tuple[int, int], snr: float) -> tuple[int, int]:
    """3..8 zones a side: more where there are many bright samples."""
    eff = n_samples * min(1.0, (snr / 50.0) ** 2)
    n = int(np.clip(math.floor(math.sqrt(eff / 800.0)), 3, 8))
    return (max(1, min(n, n_limit[0])), max(1, min(n, n_limit[1])))


def fit_traces(flats: Sequence[FlatInput], design: IfsDesign, *, search: float | None = None,
               half: int | None = None, ncoef: int | None = None,
               zones: tuple[int, int] | None = None, nphase: int = 65, oversample: int = 8,
               clip: float = 4.0, n_iter: int = 3, smooth: float = 1e-3, min_snr: float = 20.0,
               max_saturated: float = 0.01, max_unusable: float = 0.3,
               min_contrast: float = 3.0, band_rows: int | None = None,
               slicer_throughput_degree: int | None = 4,
               slice_curvature: bool = False) -> TraceSolution:
    """Measure the trace geometry and cross-dispersion profile from continuum-lamp flats.

    Parameters
    ----------
    flats : sequence of FlatInput
        Lamp rate images (DN/s, dark-subtracted) of one configuration (mode, scale, filter).
        Each is checked on its own, then they are combined (inverse-variance mean).
    design : IfsDesign
        The nominal layout (``nominal_design(mode, size, filter, scale)``): where to start.
    search : float
        Half-width (px) of the window searched around the design for the global shift
        (default: 2.5 for the slicer, ``min(2.5, pitch / 2 - 0.5)`` for the lenslet).
    half : int
        Profile window half-width: columns ``rint(x) - half .. rint(x) + half`` (default 5
        for a 6-column lenslet pitch, up to 8 for wider pitches; 5 for the slicer).
    ncoef : int
        Legendre coefficients of ``x(t)`` (default 3 for lenslet spectra, 6 for slicer
        traces along the full height).
    zones : (nzy, nzx)
        Profile zones. Slicer: zones along the rows and across the slices (default 3..8 a
        side, from the number and S/N of the samples). Lenslet: ``nzy`` zones along each
        row of spectra, blue end to red end (default 3; 2 for spectra shorter than 80
        rows), times ``nzx`` across the field (default 3..6).
    nphase : int
        Phases in the profile table.
    oversample : int
        Profile nodes per pixel (lenslet).
    clip : float
        Sigma clipping of the trace fits.
    n_iter : int
        Outer iterations (measure centres, fit traces, re-measure the profile).
    smooth : float
        Curvature penalty of the lenslet profile, relative to the data weight of a node.
    min_snr, max_saturated, max_unusable, min_contrast : float
        Refusal thresholds (see the module docstring).
    band_rows : int
        Slicer: rows averaged into one band (default: 1/64 of the spectrum length, >= 8).
    slicer_throughput_degree : int or None
        Slicer: degree of the Legendre series of the spaxel throughput across a slice (None:
        a free value per spaxel, which trades with the edge positions; see
        ``_slicer_lm``).
    slice_curvature : bool
        Slicer: give the spaxel positions across a slice the curvature of a smooth field
        distortion, from the column gradient of the slices' pitch over the field
        (``_slicer_curvature``). Off by default: the slicer's own pitch differs from slice
        to slice by ~1 %, which swamps that gradient at the IRIS scale (88-spaxel slices
        on a 4096-column field, where the curvature moves a spaxel by < 0.001 px).

    Returns
    -------
    TraceSolution

    Raises
    ------
    BadInputError
        No flat, a lamp off or too faint, saturated, or a pattern that does not match.
    """
    t_start = time.perf_counter()
    flats = list(flats)
    if not flats:
        raise BadInputError("no lamp flat given to fit the traces")
    mode = design.mode
    shape = (design.size, design.size)
    if search is None:
        search = 2.5 if mode == "SLICER" else min(2.5, design.pitch / 2.0 - 0.5)
    margin = int(math.ceil(search)) + 1
    n_total = design.trace_x.size
    check_step = max(1, math.ceil(n_total / 400_000))  # the checks need a sample, not all
    lay_check = _layout(design, shape, margin, check_step)
    shifts = []
    for flat in flats:
        shifts.append(_check_frame(flat, design, lay_check, search, min_snr, max_saturated,
                                   max_unusable, min_contrast))
    lay = _layout(design, shape, margin) if mode == "LENSLET" else None
    data, weight, _ = _combine(flats, shape)
    shift = float(np.median(shifts))
    ny_s, nx_s, _ = design.trace_x.shape
    if mode == "LENSLET":
        if half is None:
            half = int(min(8, max(3, math.floor(design.pitch) - 1)))
        ncx = int(ncoef or 3)
        noise = _noise_level(data, weight)
        snr = float(np.percentile(data[weight > 0], 99) / noise) if noise > 0 else 100.0
        if zones is None:
            nzx = min(6, _default_zones(int(lay.valid.sum()), (8, nx_s), snr)[1])
            # zones per row of spectra: blue end, middle, red end (the core's width is
            # ~ linear in wavelength); two on short spectra
            nper = 3 if design.trace_x.shape[-1] >= 80 else 2
            # a zone's profile needs ~1000 samples of S/N ~100 (a 1 % table): fewer zones
            # along the spectra on a faint or small frame
            budget = int(lay.valid.sum()) * min(1.0, (snr / 100.0) ** 2) / 1000.0
            while nper > 1 and nper * ny_s * nzx > budget:
                nper -= 1
            nz = (nper, nzx)
        else:
            nz = zones
        res = _fit_lenslet(data, weight, design, lay, shift, search=search, half=half,
                           ncoef=ncx, zones=nz, oversample=oversample, nphase=nphase,
                           clip=clip, n_outer=n_iter, smooth=smooth)
    else:
        if half is None:
            half = 5
        ncx = int(ncoef or 6)
        noise = _noise_level(data, weight)
        snr = float(np.percentile(data[weight > 0], 99) / noise) if noise > 0 else 100.0
        nband_est = max(4, (design.trace_x.shape[-1] - 2 * margin) // max(
            8, (design.trace_x.shape[-1] - 2 * margin) // 64))
        nz = zones or _default_zones(nband_est * ny_s * 8, (nband_est, ny_s), snr)
        res = _fit_slicer(data, weight, design, shift, search=search, half=half, ncoef=ncx,
                          zones=nz, nphase=nphase, clip=clip, n_outer=4 * n_iter,
                          band_rows=band_rows, margin=margin,
                          throughput_degree=slicer_throughput_degree,
                          curvature=slice_curvature)
    ylim = (0.0, float(design.size - 1))
    rr = res["row_range"]
    local = np.broadcast_to(np.asarray(res.get("local_range") or np.nan), (ny_s, nx_s, 2))
    local = np.where(np.isfinite(local), local, rr)
    coeffs = np.full(res["coeffs"].shape, np.nan)
    ok = np.isfinite(local).all(-1) & (local[..., 1] > local[..., 0])
    # one conversion per distinct row range (every spaxel of a lenslet row of spectra
    # shares one; the slicer's all share one)
    pairs, inverse = np.unique(local[ok], axis=0, return_inverse=True)
    src = res["coeffs"][ok]
    out = np.empty_like(src)
    for n, (lo, hi) in enumerate(pairs):
        sel = inverse.ravel() == n
        out[sel] = _to_global_domain(src[sel], (float(lo), float(hi)), ylim)
    coeffs[ok] = out
    traced = np.isfinite(res["rms"])
    profile = CrossProfile(table=res["table"], zone_y=res["zone_y"], zone_x=res["zone_x"])
    qa = {
        "trace_rms": float(np.nanmedian(res["rms"])) if traced.any() else float("nan"),
        "profile_residual": res["profile_residual"],
        "profile_residual_noise": res["profile_residual_noise"],
        "traced_fraction": float(traced.mean()),
        "shift": shift,
        "n_flats": len(flats),
        "flat_files": [f.name for f in flats],
        "zones": tuple(int(v) for v in res["table"].shape[:2]),
        "psf_sigma": res["psf_sigma"],
        "profile_params": (None if res.get("psf_params") is None
                           else np.asarray(res["psf_params"]).tolist()),
        "seconds": time.perf_counter() - t_start,
    }
    log.info("IFS traces (%s %s %s): %d of %d spaxels traced, trace rms %.4f px, profile "
             "residual %.4f, shift %+.2f px, %.1f s", mode, design.scale, design.filter,
             int(traced.sum()), traced.size, qa["trace_rms"], qa["profile_residual"], shift,
             qa["seconds"])
    return TraceSolution(design=design, x_coeffs=coeffs, y_limits=ylim, profile=profile,
                         rms=res["rms"], throughput=res["throughput"], qa=qa,
                         row_range=rr, traced=traced)
