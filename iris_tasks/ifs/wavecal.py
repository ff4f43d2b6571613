"""Wavelength solution and line-spread function of every IFS spaxel, from arc-lamp frames.

The arc frames (LEN-IDP / SLI-IDP: Ar, Kr, Ne, Xe lamps; DN/s, dark-subtracted) are reduced
to one row-position-versus-wavelength relation per spaxel, ``y(lambda)``, and one Gaussian
line-spread function (LSF) width per spaxel at a few wavelengths. The steps, in the spirit of
the Keck OSIRIS / KCWI / GPI arc solutions:

1. **Extraction.** Each spaxel's 1-D arc spectrum, one sample per detector row, along the
   spaxel's cross-dispersion centre ``x_at(y)`` (from the trace fit of the lamp flats): a
   profile-weighted sum over ``2 half + 1`` columns (a design-width Gaussian). In the slicer the
   neighbouring spaxels of a slice blend into it; they see the same arc lines, displaced by the
   monochromatic slit tilt of ~0.5 px over the whole slice (a few thousandths of a pixel per
   column), so the blend does not move the lines. The tilt itself is measured, spaxel by
   spaxel, not assumed.
2. **Alignment and stacking.** The spectra are put onto the design's wavelength-bin grid
   (``design.row_of``), cross-correlated with the median of an even subset of them (<= 500
   spaxels; the offsets of each spaxel - as-built distortion, per-slice offsets, flexure -
   come out of it) and re-stacked once aligned: a high signal-to-noise template spectrum.
3. **Identification on the template.** A grid search in (shift, stretch) of the line list's
   synthetic spectrum against the template (robust to missing and faint lines), then lines
   matched within a tolerance that shrinks while the polynomial degree grows (1 -> 3: the
   as-built dispersion is not linear). Lines with a listed neighbour of comparable intensity
   within ``blend_sep`` LSF sigmas are not used (their centroid is pulled by the neighbour);
   nor are lines near the ends of the spectra. An arc without significant lines (lamp off), or
   whose lines do not match the list at any offset (wrong filter, wrong lamp) is refused.
4. **Measurement per spaxel.** Every identified line, in every spaxel, is fitted with a
   pixel-integrated Gaussian plus a constant (vectorised Levenberg-Marquardt over all spaxels
   and lines at once): centre, width (the LSF sigma before pixelisation, so no ``1/12``
   correction is needed), flux. The samples near listed neighbours are left out of each fit.
   Two passes: the first re-centres every spaxel's predictions with a linear correction (the
   dispersion scale differs across the field by 0.1-0.2 %, several rows at the ends of a 4k
   spectrum), the second measures. Lines touching saturated or unusable pixels, too faint,
   too far from the prediction, or with implausible widths are dropped; an arc whose strong
   lines are mostly saturated is refused. Optionally (``fit_halo``) the lines are modelled as
   core + a halo measured on isolated lines.
5. **Fit.** Per spaxel, row ``y`` as a Legendre series in the normalised wavelength ``u`` in
   [-1, 1] (``degree`` 3 by default), weighted, clipped one worst line at a time, lines off
   in every spaxel rejected, one flexure offset per arc fitted with it (the arcs of a set
   are exposed minutes apart). Then the higher orders (``>= smooth_from_order``) are
   replaced by a smooth surface across spaxels (per slice in ``i`` for the slicer, over the
   field in ``(j, i)`` for the lenslet), and the low orders (zero point, scale) refitted per
   spaxel: spaxels with few lines stay good, each spaxel keeps its own offset and tilt. The
   residual rms is reported in micron and in resolution elements (LSF FWHM). A set with
   fewer than ``degree + 4`` lines per spaxel (blended lamps at a coarse dispersion) is
   refused.
6. **LSF.** The per-line widths (rows) fitted per spaxel as a polynomial of ``u`` (degree 1-3
   from the number of lines: along a slicer spectrum, which spans the detector, the optics'
   field variation makes it cubic), continued linearly beyond the outermost lines, smoothed
   across spaxels like the wavelength terms, converted to micron with the solution's own
   dispersion ``dlambda/dy`` at ``nlw`` nodes ``lsf_wave``; resolving power
   ``R = lambda / (2.3548 sigma)``.

Everything is over numpy arrays; the nightly builder (``iris_tasks.masters.ifs_model``) wraps
it. Bad input raises :class:`iris_tasks.errors.BadInputError` naming the arc file.
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from numpy.polynomial import legendre
from scipy import ndimage
from scipy.special import ndtr

from ..errors import BadInputError
from ..instrument.ifs_design import REFPIX, IfsDesign

if TYPE_CHECKING:  # the line list module belongs to the instrument package
    from ..instrument.lines import LineList

log = logging.getLogger(__name__)

__all__ = ["ArcInput", "WavelengthSolution", "design_x_at", "parse_lamps", "solve_wavelengths"]

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_SQRT2PI = math.sqrt(2.0 * math.pi)
# grid of the halo search (fraction of the line's light, Gaussian sigma in rows)
_HALO_FRACTIONS = np.arange(0.0, 0.1205, 0.03)
_HALO_WIDTHS = np.arange(1.5, 6.01, 1.0)
_LAMP_NAMES = {"ARGON": "AR", "KRYPTON": "KR", "NEON": "NE", "XENON": "XE"}


# --------------------------------------------------------------------------------------------
# inputs and product
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArcInput:
    """One arc-lamp rate image, as the wavelength solver needs it (no datamodel).

    Attributes
    ----------
    data : ndarray (ny, nx)
        Dark-subtracted rate, DN/s.
    variance : ndarray (ny, nx) or None
        Variance of ``data`` (DN/s)^2; None: uniform weights.
    good : ndarray (ny, nx) bool or None
        Usable pixels (False: DQ bad bits, non-finite); None: all finite pixels.
    name : str
        File name, used in messages and the QA.
    lamps : tuple of str
        Lamps that were on (header LAMPS, e.g. ``('Ar', 'Kr')``); empty: every listed line.
    saturated : ndarray (ny, nx) bool or None
        Pixels flagged SATURATED in the ramp fit; lines touching them are not used, and an arc
        whose strong lines are mostly saturated is refused.
    """

    data: np.ndarray
    variance: np.ndarray | None
    good: np.ndarray | None
    name: str
    lamps: tuple[str, ...] = ()
    saturated: np.ndarray | None = None


@dataclass(frozen=True)
class WavelengthSolution:
    """Row position of every wavelength, and the LSF, for every spaxel.

    Attributes
    ----------
    design : IfsDesign
        The configuration solved.
    y_coeffs : ndarray (ny_s, nx_s, ncw)
        ``numpy.polynomial.legendre`` coefficients of the detector row ``y(u)``,
        ``u = 2 (lambda - lo) / (hi - lo) - 1``.
    wave_limits : (float, float)
        ``(lo, hi)`` micron mapped to ``u = -1 .. +1``.
    lsf_wave : ndarray (nlw,)
        Wavelength nodes of the LSF (micron).
    lsf_sigma : ndarray (ny_s, nx_s, nlw)
        Gaussian sigma of the LSF at the nodes (micron).
    rms : ndarray (ny_s, nx_s)
        Residual rms of the lines about the fit (micron); NaN where no line was measured.
    lines_used : int
        Distinct list lines used by at least one spaxel.
    qa : dict
        Summary figures (see :func:`solve_wavelengths`).
    n_lines : ndarray (ny_s, nx_s) int
        Lines used per spaxel.
    rms_resel : ndarray (ny_s, nx_s)
        Residual rms in resolution elements (LSF FWHM).
    """

    design: IfsDesign
    y_coeffs: np.ndarray
    wave_limits: tuple[float, float]
    lsf_wave: np.ndarray
    lsf_sigma: np.ndarray
    rms: np.ndarray
    lines_used: int
    qa: dict
    n_lines: np.ndarray | None = None
    rms_resel: np.ndarray | None = None
    lines: dict = field(default_factory=dict, repr=False)

    def _u(self, wavelength: np.ndarray) -> np.ndarray:
        lo, hi = self.wave_limits
        return 2.0 * (np.asarray(wavelength, np.float64) - lo) / (hi - lo) - 1.0

    def y_at(self, wavelength: np.ndarray) -> np.ndarray:
        """Detector rows (ny_s, nx_s, nw) of ``wavelength`` (nw,) micron in every spaxel."""
        u = np.atleast_1d(self._u(wavelength))
        return legendre.legval(u, np.moveaxis(self.y_coeffs, -1, 0))

    def dispersion_at(self, wavelength: np.ndarray) -> np.ndarray:
        """Micron per detector row (ny_s, nx_s, nw) at ``wavelength``."""
        lo, hi = self.wave_limits
        u = np.atleast_1d(self._u(wavelength))
        dy_du = legendre.legval(u, legendre.legder(np.moveaxis(self.y_coeffs, -1, 0)))
        return (hi - lo) / 2.0 / dy_du

    def wavelength_at(self, y: np.ndarray) -> np.ndarray:
        """Wavelength (micron) at rows ``y`` (broadcastable to (ny_s, nx_s, n)), by Newton
        iterations on ``y(lambda)``."""
        lo, hi = self.wave_limits
        c = self.y_coeffs[..., None, :]
        y = np.broadcast_to(np.asarray(y, np.float64), self.y_coeffs.shape[:2] + np.shape(y)[-1:])
        d = legendre.legder(self.y_coeffs, axis=-1)[..., None, :]
        y_lo = legendre.legval(-1.0, np.moveaxis(self.y_coeffs, -1, 0))
        y_hi = legendre.legval(1.0, np.moveaxis(self.y_coeffs, -1, 0))
        u = -1.0 + 2.0 * (y - y_lo[..., None]) / (y_hi - y_lo)[..., None]
        for _ in range(8):
            val = _legval_last(u, c)
            der = _legval_last(u, d)
            u = u - (val - y) / der
        return lo + (u + 1.0) * (hi - lo) / 2.0

    def lsf_at(self, wavelength: np.ndarray) -> np.ndarray:
        """LSF sigma (micron) (ny_s, nx_s, nw), linear between the nodes, flat beyond."""
        w = np.atleast_1d(np.asarray(wavelength, np.float64))
        pos = np.interp(w, self.lsf_wave, np.arange(self.lsf_wave.size, dtype=np.float64))
        k0 = np.clip(np.floor(pos).astype(int), 0, max(0, self.lsf_wave.size - 2))
        k1 = np.minimum(k0 + 1, self.lsf_wave.size - 1)
        f = pos - k0
        return self.lsf_sigma[..., k0] * (1 - f) + self.lsf_sigma[..., k1] * f

    def resolving_power(self, wavelength: np.ndarray | None = None) -> np.ndarray:
        """``R = lambda / FWHM`` (ny_s, nx_s, nw) at ``wavelength`` (default: the nodes)."""
        w = self.lsf_wave if wavelength is None else np.atleast_1d(wavelength)
        return w / (FWHM_PER_SIGMA * self.lsf_at(w))


def _legval_last(u: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Legendre series with coefficients along the last axis of ``c`` (Clenshaw)."""
    n = c.shape[-1]
    if n == 1:
        return np.broadcast_to(c[..., 0], u.shape).copy()
    b1 = np.zeros(np.broadcast_shapes(u.shape, c.shape[:-1]))
    b2 = np.zeros_like(b1)
    for k in range(n - 1, 0, -1):
        b0 = c[..., k] + (2 * k + 1) / (k + 1) * u * b1 - (k + 1) / (k + 2) * b2
        b2, b1 = b1, b0
    return c[..., 0] + u * b1 - 0.5 * b2


def parse_lamps(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Header LAMPS (``'Ar,Kr'``, ``'AR KR'``, ``'argon+neon'``) -> ``('Ar', 'Kr')``."""
    if value is None:
        return ()
    parts = re.split(r"[,\s;+/]+", value) if isinstance(value, str) else list(value)
    out = []
    for p in parts:
        p = str(p).strip()
        if not p:
            continue
        key = _LAMP_NAMES.get(p.upper(), p.upper())
        out.append(key[:1] + key[1:].lower())
    return tuple(out)


def design_x_at(design: IfsDesign) -> Callable[[np.ndarray], np.ndarray]:
    """The design's cross-dispersion centre as an ``x_at(y)`` (for a first pass without a
    trace fit): ``y`` broadcastable to (ny_s, nx_s, n) -> x, linear in the design samples,
    extended flat beyond the ends."""
    tx, ty = design.trace_x, design.trace_y
    nw = tx.shape[-1]

    def x_at(y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, np.float64)
        y = np.broadcast_to(y, np.broadcast_shapes(y.shape, tx.shape[:2] + (1,)))
        k = (y - ty[..., :1]) / (ty[..., -1:] - ty[..., :1]) * (nw - 1)
        k = np.clip(k, 0.0, nw - 1.0)
        k0 = np.minimum(np.floor(k).astype(np.int64), nw - 2)
        f = k - k0
        x0 = np.take_along_axis(tx, k0.reshape(tx.shape[:2] + (-1,)), -1).reshape(k.shape)
        x1 = np.take_along_axis(tx, (k0 + 1).reshape(tx.shape[:2] + (-1,)), -1).reshape(k.shape)
        return x0 * (1 - f) + x1 * f

    return x_at


# --------------------------------------------------------------------------------------------
# line list
# --------------------------------------------------------------------------------------------
def _element(species: str) -> str:
    m = re.match(r"\s*([A-Z][a-z]?)", str(species))
    return m.group(1).upper() if m else str(species).strip().upper()


def _arc_lines(lines: LineList, lamps: tuple[str, ...], lo: float, hi: float,
               name: str) -> tuple[np.ndarray, np.ndarray]:
    """Wavelengths and intensities of the listed lines of ``lamps`` in [lo, hi]."""
    wave = np.asarray(lines.wavelength_um, np.float64)
    inten = np.asarray(lines.intensity, np.float64)
    keep = (wave >= lo) & (wave <= hi) & np.isfinite(wave) & (inten > 0)
    wanted = {_LAMP_NAMES.get(lp.upper(), lp.upper()) for lp in lamps}
    if wanted & {"CONT", "OFF", "NONE"}:
        raise BadInputError(f"{name}: LAMPS={','.join(lamps)} is not an arc lamp")
    if wanted and not wanted & {"ALL", "ARC"}:
        species = np.array([_element(s) for s in np.asarray(lines.species)])
        keep &= np.isin(species, sorted(wanted))
    if keep.sum() == 0:
        raise BadInputError(f"{name}: the line list has no line of lamps "
                            f"{','.join(lamps) or 'any'} between {lo:.4f} and {hi:.4f} um")
    order = np.argsort(wave[keep])
    return wave[keep][order], inten[keep][order]


def _neighbours(inten: np.ndarray, ratio: float) -> np.ndarray:
    """(n, n) True where line m is bright enough (> ``ratio`` x line l) to disturb l's fit."""
    nb = inten[None, :] > ratio * inten[:, None]
    np.fill_diagonal(nb, False)
    return nb


def _clear_of_neighbours(yw: np.ndarray, pos_all: np.ndarray, idx: np.ndarray,
                         neighbours: np.ndarray, radius: float) -> np.ndarray:
    """False for window samples within ``radius`` rows of a listed neighbour's position.

    yw (ns, nl, W) or (nl, W) window rows of lines ``idx``; pos_all (ns, n_list) predicted
    rows of every listed line. The lines' own fits stay free of their neighbours' wings."""
    yw3 = yw if yw.ndim == 3 else yw[None]
    clear = np.ones(yw3.shape, bool)
    lo = yw3.min(-1)
    hi = yw3.max(-1)
    for a, line in enumerate(idx):
        for m in np.flatnonzero(neighbours[line]):
            pm = pos_all[:, m]
            if not ((pm > lo[:, a] - radius) & (pm < hi[:, a] + radius)).any():
                continue
            clear[:, a, :] &= np.abs(yw3[:, a, :] - pm[:, None]) >= radius
    return clear if yw.ndim == 3 else clear[0]


def _line_outliers(res: np.ndarray, used: np.ndarray, clip: float,
                   floor: float) -> np.ndarray:
    """Lines (columns of ``res`` (ns, L)) whose median residual over the spaxels stands out
    from the other lines' by more than ``clip`` robust sigmas and ``floor``."""
    n = used.sum(0)
    med = np.array([np.median(res[used[:, k], k]) if n[k] else 0.0 for k in range(res.shape[1])])
    have = n > 0
    if have.sum() < 5:
        return np.zeros(res.shape[1], bool)
    centre = np.median(med[have])
    scale = 1.4826 * np.median(np.abs(med[have] - centre))
    return have & (np.abs(med - centre) > max(clip * scale, floor))


def _blended(wave: np.ndarray, inten: np.ndarray, sep_um: float, ratio: float) -> np.ndarray:
    """True for lines with a listed neighbour within ``sep_um`` brighter than ``ratio`` x."""
    d = np.abs(wave[:, None] - wave[None, :])
    close = (d < sep_um) & (inten[None, :] > ratio * inten[:, None])
    np.fill_diagonal(close, False)
    return close.any(axis=1)


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------
class _ExtractionPlan:
    """Profile-weighted 1-D spectra along the traces, one sample per detector row.

    The pixel indices and the profile weights depend only on the traces, so they are
    computed once and applied to every arc of the set. ``rows`` (ns, nr) int: the detector
    rows sampled for each spaxel.
    """

    def __init__(self, x_at: Callable, rows: np.ndarray, grid_shape: tuple[int, int],
                 shape: tuple[int, int], sigma: float, half: int, chunk: int = 512):
        ny, nx = shape
        ns, nr = rows.shape
        ny_s, nx_s = grid_shape
        self.shape = (ny, nx)
        offs = np.arange(-half, half + 1)
        nb = offs.size
        self.idx = np.zeros((ns, nr, nb), np.int32 if ny * nx < 2**31 else np.int64)
        self.weight = np.zeros((ns, nr, nb), np.float32)
        rows_in = (rows >= REFPIX) & (rows < ny - REFPIX)
        x_all = np.asarray(x_at(rows.reshape(ny_s, nx_s, nr).astype(np.float64)),
                           np.float64).reshape(ns, nr)
        for s0 in range(0, ns, chunk):
            sl = slice(s0, min(ns, s0 + chunk))
            xc = x_all[sl]
            cols = np.rint(xc).astype(np.int64)[..., None] + offs
            inside = (cols >= REFPIX) & (cols < nx - REFPIX) & rows_in[sl][..., None]
            self.idx[sl] = (np.clip(rows[sl], 0, ny - 1)[..., None].astype(np.int64) * nx
                            + np.clip(cols, 0, nx - 1))
            w = np.exp(-0.5 * ((cols - xc[..., None]) / sigma) ** 2)
            w /= w.sum(-1, keepdims=True)
            self.weight[sl] = np.where(inside, w, 0.0)
        self.chunk = chunk

    def apply(self, arc: ArcInput, min_coverage: float = 0.7):
        """flux, variance (float64 (ns, nr)), valid and saturated flags (bool) of ``arc``."""
        data = np.asarray(arc.data)
        good = np.isfinite(data) if arc.good is None else (np.asarray(arc.good, bool)
                                                           & np.isfinite(data))
        var = None if arc.variance is None else np.asarray(arc.variance)
        if var is not None:
            good = good & np.isfinite(var)
        data_flat = np.where(good, data, 0).astype(np.float32, copy=False).ravel()
        good_flat = good.ravel()
        var_flat = None if var is None else np.where(good, var, 0).astype(np.float32).ravel()
        sat_flat = None if arc.saturated is None else np.asarray(arc.saturated, bool).ravel()
        ns, nr, _ = self.idx.shape
        flux = np.zeros((ns, nr))
        fvar = np.zeros((ns, nr))
        valid = np.zeros((ns, nr), bool)
        fsat = np.zeros((ns, nr), bool)
        for s0 in range(0, ns, self.chunk):
            sl = slice(s0, min(ns, s0 + self.chunk))
            idx = self.idx[sl]
            w = self.weight[sl]
            pg = w * good_flat[idx]
            den = (pg * pg).sum(-1, dtype=np.float64)
            cover = pg.sum(-1, dtype=np.float64)
            ok = (cover >= min_coverage) & (den > 0)
            den = np.where(ok, den, 1.0)
            flux[sl] = np.where(ok, (pg * data_flat[idx]).sum(-1, dtype=np.float64) / den, 0.0)
            if var_flat is not None:
                fvar[sl] = np.where(ok, (pg * pg * var_flat[idx]).sum(-1, dtype=np.float64)
                                    / den**2, 0.0)
            valid[sl] = ok
            if sat_flat is not None:
                fsat[sl] = (sat_flat[idx] & (w > 0.05)).any(-1)
        return flux, fvar, valid, fsat


def _sample_rows(values: np.ndarray, r0: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Linear interpolation of row-sampled spectra ``values`` (ns, nr; NaN = unusable)
    starting at rows r0 (ns,) at fractional rows y (ns, m); NaN where a neighbour sample is
    unusable or outside."""
    ns, nr = values.shape
    t = y - r0[:, None]
    i0 = np.floor(t).astype(np.int64)
    f = t - i0
    inside = (i0 >= 0) & (i0 + 1 < nr)
    flat = np.clip(i0, 0, nr - 2) + (np.arange(ns, dtype=np.int64) * nr)[:, None]
    v = values.ravel()
    out = v[flat] * (1 - f) + v[flat + 1] * f
    out[~inside] = np.nan
    return out


# --------------------------------------------------------------------------------------------
# batched Gaussian fits
# --------------------------------------------------------------------------------------------
class _TooFewLines(BadInputError):
    """An arc with too few isolated lines to be identified on its own."""


@dataclass
class _GaussFit:
    amp: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    bkg: np.ndarray
    err_mu: np.ndarray
    err_sigma: np.ndarray
    err_amp: np.ndarray
    converged: np.ndarray
    chi2: np.ndarray


def _line_profile(yw: np.ndarray, mu: np.ndarray, sig: np.ndarray,
                  halo: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-integrated line profile (unit flux) and its derivatives in ``mu`` and ``sig``.

    A Gaussian core of sigma ``sig``, plus, with ``halo = (f, s_h)``, a fraction ``f`` of the
    light in the core convolved with a Gaussian of ``s_h`` rows (sigma ``hypot(sig, s_h)``).
    """
    def gauss(s):
        zp = (yw + 0.5 - mu[:, None]) / s[:, None]
        zm = (yw - 0.5 - mu[:, None]) / s[:, None]
        php = np.exp(-0.5 * zp * zp) / _SQRT2PI
        phm = np.exp(-0.5 * zm * zm) / _SQRT2PI
        return (ndtr(zp) - ndtr(zm), -(php - phm) / s[:, None],
                -(php * zp - phm * zm) / s[:, None])

    frac, s_h = halo
    g, dmu, dsig = gauss(sig)
    if frac <= 0:
        return g, dmu, dsig
    sh = np.hypot(sig, s_h)
    gh, dmuh, dsigh = gauss(sh)
    return ((1 - frac) * g + frac * gh, (1 - frac) * dmu + frac * dmuh,
            (1 - frac) * dsig + frac * dsigh * (sig / sh)[:, None])


def _fit_gaussians(yw: np.ndarray, f: np.ndarray, wt: np.ndarray, mu0: np.ndarray,
                   sig0: np.ndarray | float, n_iter: int = 15,
                   relative_weights: bool = False,
                   halo: tuple[float, float] = (0.0, 0.0)) -> _GaussFit:
    """Fit ``amp * P(y; mu, sigma) + bkg`` to many windows at once.

    ``P`` is the row-integrated Gaussian (plus a fixed halo, see :func:`_line_profile`), so
    ``sigma`` is the line's core width before pixelisation. ``yw, f, wt`` (N, W): row
    coordinates, values, weights (0 = unusable). Levenberg-Marquardt steps on the batched
    4x4 normal equations.
    """
    n = yw.shape[0]
    mu = np.array(mu0, np.float64, copy=True)
    sig = np.broadcast_to(np.asarray(sig0, np.float64), (n,)).copy()
    fw = np.where(wt > 0, f, np.nan)
    with np.errstate(all="ignore"):
        bkg = np.nan_to_num(np.nanmin(fw, axis=1))
        amp = np.nan_to_num(np.nansum(np.where(wt > 0, f - bkg[:, None], 0.0), axis=1))
    lam = np.full(n, 1e-3)
    eye = np.eye(4)

    def chi2(amp, mu, sig, bkg):
        g = _line_profile(yw, mu, sig, halo)[0]
        r = f - amp[:, None] * g - bkg[:, None]
        return (wt * r * r).sum(1)

    def jacobian(amp, mu, sig):
        g, dmu, dsig = _line_profile(yw, mu, sig, halo)
        return g, np.stack([g, amp[:, None] * dmu, amp[:, None] * dsig, np.ones_like(g)], -1)

    cur = chi2(amp, mu, sig, bkg)
    for _ in range(n_iter):
        g, jac = jacobian(amp, mu, sig)
        r = f - amp[:, None] * g - bkg[:, None]
        jw = jac * wt[..., None]
        jtj = np.einsum("nwa,nwb->nab", jw, jac)
        jtr = np.einsum("nwa,nw->na", jw, r)
        diag = np.einsum("naa->na", jtj)
        a_mat = jtj + (lam[:, None] * np.maximum(diag, 1e-300))[:, :, None] * eye
        try:
            step = np.linalg.solve(a_mat, jtr[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.zeros((n, 4))
            for k in range(n):
                try:
                    step[k] = np.linalg.solve(a_mat[k], jtr[k])
                except np.linalg.LinAlgError:
                    pass
        step = np.nan_to_num(step)
        step[:, 1] = np.clip(step[:, 1], -1.0, 1.0)
        step[:, 2] = np.clip(step[:, 2], -0.5 * sig, 0.5 * sig)
        amp_n, mu_n, sig_n, bkg_n = (amp + step[:, 0], mu + step[:, 1],
                                     np.maximum(sig + step[:, 2], 0.05), bkg + step[:, 3])
        new = chi2(amp_n, mu_n, sig_n, bkg_n)
        better = new <= cur
        amp = np.where(better, amp_n, amp)
        mu = np.where(better, mu_n, mu)
        sig = np.where(better, sig_n, sig)
        bkg = np.where(better, bkg_n, bkg)
        cur = np.where(better, new, cur)
        lam = np.where(better, lam * 0.3, lam * 10.0)
        if np.all(np.abs(step[:, 1]) < 1e-4) and np.all(np.abs(step[:, 2]) < 1e-4):
            break
    # covariance at the solution
    _, jac = jacobian(amp, mu, sig)
    jtj = np.einsum("nwa,nwb->nab", jac * wt[..., None], jac)
    cov = np.full((n, 4, 4), np.nan)
    det_ok = np.abs(np.linalg.det(jtj)) > 0
    if det_ok.any():
        cov[det_ok] = np.linalg.inv(jtj[det_ok])
    if relative_weights:
        # weights without a noise scale: the errors from the scatter about the fit
        dof = np.maximum((wt > 0).sum(1) - 4, 1)
        cov *= (cur / dof)[:, None, None]
    err = np.sqrt(np.abs(np.einsum("naa->na", cov)))
    converged = np.isfinite(err).all(1) & (lam < 1e3) & np.isfinite(mu)
    return _GaussFit(amp, mu, sig, bkg, err[:, 1], err[:, 2], err[:, 0], converged, cur)


def _halo_from_spaxels(flux, fvar, valid, r0, pred, pred_all, use, ok, neighbours,
                       sigma: float, no_variance: bool, max_spaxels: int = 120
                       ) -> tuple[float, float]:
    """Fraction and width (rows) of a halo around the LSF core.

    On an even subset of spaxels, every well-measured line without a listed neighbour
    within reach of the halo is fitted (own flux, centre, core width and background) for
    each (fraction, width) of a grid; the pair with the lowest total chi^2 wins. Single
    spaxels, not the stacked template: the stack mixes spaxels whose core widths differ,
    which looks like a halo. (0, 0) with fewer than 8 such lines.
    """
    ns = flux.shape[0]
    sub = np.unique(np.linspace(0, ns - 1, min(ns, max_spaxels)).round().astype(np.int64))
    reach = 6.0 * sigma + 2.0 * float(_HALO_WIDTHS.max())
    lonely = np.ones(use.size, bool)
    for a, line in enumerate(use):
        others = np.flatnonzero(neighbours[line])
        if others.size:
            d = np.abs(pred_all[sub][:, others] - pred[sub, a][:, None])
            lonely[a] = not (d < reach).any()
    sel = ok[sub] & lonely[None, :]
    if sel.sum() < 8:
        return 0.0, 0.0
    hw = int(math.ceil(3.0 * sigma + 2.0 * float(_HALO_WIDTHS.max())))
    yw, f, v, okw, _ = _windows(flux[sub], fvar[sub], valid[sub], r0[sub], pred[sub], hw)
    yw, f, v, okw = yw[sel], f[sel], v[sel], okw[sel]
    if no_variance:
        wt = okw.astype(np.float64)
    else:
        peak = np.max(np.where(okw, np.abs(f), 0.0), axis=-1, keepdims=True)
        wt = np.where(okw, 1.0 / (v + (1e-4 * peak) ** 2 + 1e-30), 0.0)
    mu0 = pred[sub][sel]
    cache: dict[tuple[float, float], float] = {}

    def total(frac: float, s_h: float) -> float:
        key = (round(frac, 5), round(s_h, 5))
        if key not in cache:
            halo = (frac, s_h) if frac > 0 else (0.0, 0.0)
            cache[key] = float(_fit_gaussians(yw, f, wt, mu0, sigma, halo=halo).chi2.sum())
        return cache[key]

    # a coarse grid, then two 3 x 3 refinements at half the spacing around the best
    grid = [(fr, sh) for fr in _HALO_FRACTIONS for sh in _HALO_WIDTHS]
    best = min(grid, key=lambda p: total(*p))
    d_fr = float(_HALO_FRACTIONS[1] - _HALO_FRACTIONS[0])
    d_sh = float(_HALO_WIDTHS[1] - _HALO_WIDTHS[0])
    for _ in range(2):
        d_fr, d_sh = d_fr / 2, d_sh / 2
        near = [(max(0.0, best[0] + a * d_fr), max(0.5, best[1] + b * d_sh))
                for a in (-1, 0, 1) for b in (-1, 0, 1)]
        best = min(near, key=lambda p: total(*p))
    return (float(best[0]), float(best[1])) if best[0] > 0 else (0.0, 0.0)


def _windows(flux, var, valid, r0, centres, hw):
    """Row windows ``round(c) - hw .. + hw`` of the spectra around ``centres`` (ns, nl):
    row coordinates, values, variances, usable flags and sample indices, each (ns, nl, W)."""
    ns, nr = flux.shape
    start = np.rint(centres).astype(np.int64) - hw
    offs = np.arange(2 * hw + 1)
    t = start[..., None] - r0[:, None, None] + offs
    inside = (t >= 0) & (t < nr)
    tc = np.clip(t, 0, nr - 1)
    srow = np.arange(ns)[:, None, None]
    ok = inside & valid[srow, tc]
    yw = (start[..., None] + offs).astype(np.float64)
    return yw, flux[srow, tc], var[srow, tc], ok, tc


# --------------------------------------------------------------------------------------------
# template (stack) identification
# --------------------------------------------------------------------------------------------
def _align(fluxn, r0, ystart, gain, kgrid, max_shift, n_iter=3, max_stack=500):
    """Per-spaxel offsets (rows) that align the spectra ``fluxn`` (NaN = unusable), the
    aligned median spectrum on the design bin grid ``kgrid`` and the spaxels it is the median
    of (an even subset of at most ``max_stack``: plenty of signal, a fraction of the cost)."""
    ns = fluxn.shape[0]
    sub = np.unique(np.linspace(0, ns - 1, min(ns, max_stack)).round().astype(np.int64))
    delta = np.zeros(ns)
    nk = kgrid.size
    lag = int(math.ceil(max_shift))
    stack = np.zeros(nk)
    for it in range(n_iter):
        y = ystart[sub, None] + delta[sub, None] + kgrid[None, :] * gain[sub, None]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rows no spaxel reaches
            stack = np.nan_to_num(np.nanmedian(_sample_rows(fluxn[sub], r0[sub], y), axis=0))
        if it == n_iter - 1:
            break
        # every spaxel on the bin grid by a whole-row shift only (one gather, no
        # interpolation; gain is one row per bin to <1e-3 in the design): the fraction of a
        # row left over is added back to the measured lag
        start = ystart + delta - r0 + kgrid[0] * gain
        first = np.rint(start).astype(np.int64)
        frac_left = start - first
        t = first[:, None] + np.arange(nk)[None, :]
        inside = (t >= 0) & (t < fluxn.shape[1])
        sk = fluxn.ravel()[np.clip(t, 0, fluxn.shape[1] - 1)
                           + (np.arange(ns, dtype=np.int64) * fluxn.shape[1])[:, None]]
        sk[~inside] = np.nan
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            a = np.nan_to_num(sk - np.nanmean(sk, axis=1, keepdims=True))
        del sk, t, inside
        b = stack - np.median(stack)
        # direct correlation at the few lags searched (cheaper than an FFT of the spectra)
        lags = np.arange(-lag, lag + 1)
        cc = np.empty((ns, lags.size))
        for n, tau in enumerate(lags):
            if tau >= 0:
                cc[:, n] = a[:, tau:] @ b[: nk - tau]
            else:
                cc[:, n] = a[:, : nk + tau] @ b[-tau:]
        best = np.argmax(cc, axis=1)
        rows_ = np.arange(ns)
        norm = np.sqrt((a * a).sum(1) * (b * b).sum()) + 1e-300
        corr_ok = (cc[rows_, best] / norm > 0.3) & (best > 0) & (best < lags.size - 1)
        bi = np.clip(best, 1, lags.size - 2)
        cm, c0, cp = cc[rows_, bi - 1], cc[rows_, bi], cc[rows_, bi + 1]
        den = cm - 2 * c0 + cp
        frac = np.where(den < 0, 0.5 * (cm - cp) / np.where(den < 0, den, -1.0), 0.0)
        tau = lags[bi] + np.clip(frac, -0.5, 0.5)
        # spaxels without a clear correlation peak follow the others
        tau = np.where(corr_ok, tau, np.median(tau[corr_ok]) if corr_ok.any() else 0.0)
        delta = delta + tau - frac_left
        delta -= np.median(delta)
    return delta, stack, sub


def _identify_template(stack, stack_noise, kgrid, k_line, w_line, lam_u, blended_fn,
                       neighbours, sigma_guess, max_shift, max_stretch, degree, name,
                       detect_snr, min_lines, min_match_fraction, edge, coef_start=None):
    """Lines of the list identified on the aligned stack; returns the template's Legendre
    coefficients of bin position k versus u, the accepted line indices, the LSF sigma (bins),
    and diagnostics."""
    nk = kgrid.size
    base = ndimage.median_filter(stack, size=max(15, int(12 * sigma_guess) | 1), mode="nearest")
    tb = stack - base
    noise = np.maximum(stack_noise, 1e-6 * np.max(np.abs(tb)) + 1e-30)
    snr = tb / noise
    # significant peaks (local maxima above detect_snr)
    sm = ndimage.gaussian_filter1d(snr, max(0.7, 0.6 * sigma_guess))
    is_peak = (sm > np.roll(sm, 1)) & (sm >= np.roll(sm, -1)) & (snr > detect_snr)
    is_peak[:2] = is_peak[-2:] = False
    peaks = np.flatnonzero(is_peak)
    if peaks.size == 0:
        raise BadInputError(f"{name}: no arc line detected (peak S/N {np.max(snr):.1f} < "
                            f"{detect_snr:g} in the median spectrum of all spaxels): lamp off?")
    # 1) grid search in (shift, stretch): the list's synthetic spectrum against the stack
    #    (skipped when another arc of the same set gave the relation already)
    comp = ndimage.gaussian_filter1d(np.sqrt(np.clip(snr, 0, None)), max(0.7, sigma_guess))
    kc = 0.5 * (kgrid[0] + kgrid[-1])
    shifts = np.arange(-max_shift, max_shift + 1e-9, 0.25)
    half_len = 0.5 * (kgrid[-1] - kgrid[0])
    ds = 0.5 / max(half_len, 1.0)
    nst = int(math.ceil(max_stretch / ds))
    stretches = np.arange(-nst, nst + 1) * ds
    w = np.sqrt(w_line / w_line.max())
    pos = (kc + (1 + stretches[:, None, None]) * (k_line[None, None, :] - kc)
           + shifts[None, :, None])
    vals = np.interp(pos, kgrid, comp, left=0.0, right=0.0)
    score = (vals * w).sum(-1)
    ib, jb = np.unravel_index(np.argmax(score), score.shape)
    shift, stretch = shifts[jb], stretches[ib]
    log.debug("%s: template shift %.2f bins, stretch %.2e", name, shift, stretch)

    def predict(coef):
        return legendre.legval(lam_u, coef)

    # initial linear relation k(u) from (shift, stretch)
    k_pred = kc + (1 + stretch) * (k_line - kc) + shift
    sigma = sigma_guess
    tols = [max(2.5, 2.5 * sigma_guess), max(1.2, 1.2 * sigma_guess), max(0.7, 0.7 * sigma)]
    degs = [1, min(2, degree), degree]
    if coef_start is not None:
        k_pred = legendre.legval(lam_u, coef_start)
        tols, degs = tols[1:], [min(coef_start.size - 1, degree)] * 2
    coef = None
    accepted = np.zeros(k_line.size, bool)
    hw = 0
    for rnd, (tol, deg) in enumerate(zip(tols, degs, strict=True), start=3 - len(degs)):
        hw = max(3, int(math.ceil(3.0 * sigma)))
        blended = blended_fn(max(sigma, 0.5) * (2.0 if rnd == 0 else 1.0))
        cand = (~blended & (k_pred > kgrid[0] + edge + hw)
                & (k_pred < kgrid[-1] - edge - hw))
        if rnd == 0:
            # first round: unambiguous lines only (no comparable listed line within 2 tol)
            d = np.abs(k_pred[:, None] - k_pred[None, :])
            d[w_line[None, :] < 0.2 * w_line[:, None]] = np.inf
            np.fill_diagonal(d, np.inf)
            cand &= (d.min(1) > 2 * tol)
        idx = np.flatnonzero(cand)
        if idx.size < (1 if coef_start is not None else 3):
            continue
        # start at the highest stack sample within +-tol of the prediction
        grid = k_pred[idx, None] + np.linspace(-tol, tol, int(4 * tol) * 2 + 1)[None, :]
        start = grid[np.arange(idx.size), np.argmax(np.interp(grid, kgrid, sm), axis=1)]
        c_idx = np.rint(start).astype(np.int64) - int(kgrid[0])
        offs = np.arange(-hw, hw + 1)
        t = np.clip(c_idx[:, None] + offs, 0, nk - 1)
        yw = kgrid[t].astype(np.float64)
        wt = np.where(_clear_of_neighbours(yw, k_pred[None, :], idx, neighbours,
                                           3.0 * sigma), 1.0 / noise[t] ** 2, 0.0)
        fit = _fit_gaussians(yw, stack[t], wt, start, sigma)
        ok = (fit.converged & (np.abs(fit.mu - k_pred[idx]) < tol)
              & (fit.amp > detect_snr * fit.err_amp) & (fit.sigma > 0.3 * sigma)
              & (fit.sigma < 3.0 * sigma) & (np.abs(fit.mu - start) < hw))
        # two list lines landing on one peak: keep neither
        mus = fit.mu[ok]
        if mus.size > 1:
            dd = np.abs(mus[:, None] - mus[None, :])
            np.fill_diagonal(dd, np.inf)
            dup = dd.min(1) < 0.5 * sigma
            okk = np.flatnonzero(ok)
            ok[okk[dup]] = False
        n_ok = int(ok.sum())
        log.debug("round %d: %d candidates, %d fitted ok (tol %.2f)", rnd, idx.size, n_ok, tol)
        if n_ok < 3 and coef_start is not None and n_ok > 0:
            # a lamp with one or two usable lines: the other arcs' relation, re-zeroed
            coef = np.array(coef_start, np.float64, copy=True)
            coef[0] += np.median(fit.mu[ok] - k_pred[idx[ok]])
            accepted[:] = False
            accepted[idx[ok]] = True
            sigma = float(np.median(fit.sigma[ok]))
            k_pred = predict(coef)
            continue
        if n_ok < 3:
            continue
        deg_use = min(deg, n_ok - 2)
        keep = ok.copy()
        for _ in range(4):
            coef = legendre.legfit(lam_u[idx[keep]], fit.mu[keep], deg_use,
                                   w=1.0 / np.maximum(fit.err_mu[keep], 1e-3))
            res = fit.mu - predict(coef)[idx]
            scale = max(1.4826 * np.median(np.abs(res[keep])), 0.02)
            new_keep = ok & (np.abs(res) < 4.0 * scale)
            if (new_keep == keep).all() or new_keep.sum() < deg_use + 2:
                break
            keep = new_keep
        accepted[:] = False
        accepted[idx[keep]] = True
        sigma = float(np.median(fit.sigma[keep]))
        k_pred = predict(coef)
    n_acc = int(accepted.sum())
    # the strongest detected peaks must be list lines (any list line, blended or not)
    strongest = peaks[np.argsort(snr[peaks])[::-1][:10]]
    kpk = kgrid[strongest]
    near = np.abs(kpk[:, None] - k_pred[None, :]).min(1) < max(1.5, 2.0 * sigma)
    frac = float(near.mean())
    if frac < min_match_fraction:
        raise BadInputError(
            f"{name}: the arc's lines do not match the line list at any offset within "
            f"+-{max_shift:g} rows and stretch +-{max_stretch:g}: {frac:.0%} of the "
            f"{kpk.size} strongest of {peaks.size} peaks fall on listed lines, {n_acc} lines "
            f"identified: wrong filter or lamp?")
    if coef is None or n_acc < min_lines:
        raise _TooFewLines(f"{name}: only {n_acc} isolated arc lines identified "
                           f"(at least {min_lines} needed on its own)")
    return coef, accepted, sigma, dict(shift=float(shift), stretch=float(stretch),
                                       peaks=int(peaks.size), match_fraction=frac)


# --------------------------------------------------------------------------------------------
# smooth surfaces across spaxels
# --------------------------------------------------------------------------------------------
def _surface(values: np.ndarray, weights: np.ndarray, mode: str, grid_shape: tuple[int, int],
             degree: int) -> np.ndarray:
    """Robust low-order fit of ``values`` (ns, m) across spaxels: per slice along i for the
    slicer, a 2-D Legendre surface in (j, i) over the field for the lenslet. Weights (ns, m),
    0 = unused. Returns the fitted surface (ns, m)."""
    ny_s, nx_s = grid_shape
    jj, ii = np.meshgrid(np.arange(ny_s), np.arange(nx_s), indexing="ij")
    a = (2.0 * jj / max(ny_s - 1, 1) - 1.0).ravel()
    b = (2.0 * ii / max(nx_s - 1, 1) - 1.0).ravel()
    out = np.zeros_like(values)
    weights = np.broadcast_to(weights, values.shape)
    if mode == "SLICER":
        groups = [np.flatnonzero(jj.ravel() == j) for j in range(ny_s)]
        terms = [(0, q) for q in range(degree + 1)]
    else:
        groups = [np.arange(ny_s * nx_s)]
        terms = [(p, q) for p in range(degree + 1) for q in range(degree + 1 - p)
                 if p < ny_s and q < nx_s]
    for g in groups:
        basis = np.stack([legendre.legval(a[g], np.eye(p + 1)[p])
                          * legendre.legval(b[g], np.eye(q + 1)[q]) for p, q in terms], -1)
        for m in range(values.shape[1]):
            w = weights[g, m].copy()
            v = values[g, m]
            use = (w > 0) & np.isfinite(v)
            if use.sum() == 0:
                # nothing measured in this group: fall back to the field median
                allw = (weights[:, m] > 0) & np.isfinite(values[:, m])
                out[g, m] = np.median(values[allw, m]) if allw.any() else 0.0
                continue
            nterm = min(len(terms), max(1, int(use.sum()) - 1))
            bas = basis[:, :nterm]
            coef = np.zeros(nterm)
            for _ in range(4):
                sw = np.sqrt(np.where(use, w, 0.0))
                coef = np.linalg.lstsq(bas * sw[:, None], v * sw, rcond=None)[0]
                res = v - bas @ coef
                scale = 1.4826 * np.median(np.abs(res[use])) + 1e-12
                new = (w > 0) & np.isfinite(v) & (np.abs(res) < 5 * scale)
                if (new == use).all() or new.sum() < nterm:
                    break
                use = new
            out[g, m] = basis[:, :nterm] @ coef
    return out


def _batched_lsq(basis: np.ndarray, y: np.ndarray, w: np.ndarray, prior: np.ndarray,
                 prior_w: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-row weighted least squares ``y[s] ~ basis[s] @ c[s]`` with a weak prior ``prior``.

    basis (ns, L, m) or (L, m); y, w (ns, L). Returns c (ns, m) and the diagonal of the
    inverse normal matrix (ns, m)."""
    if basis.ndim == 2:
        nmat = np.einsum("sl,la,lb->sab", w, basis, basis)
        rhs = np.einsum("sl,la,sl->sa", w, basis, y)
    else:
        nmat = np.einsum("sl,sla,slb->sab", w, basis, basis)
        rhs = np.einsum("sl,sla,sl->sa", w, basis, y)
    m = nmat.shape[-1]
    scale = np.maximum(np.einsum("saa->sa", nmat).max(1), 1.0) * prior_w
    nmat = nmat + scale[:, None, None] * np.eye(m)
    rhs = rhs + scale[:, None] * prior
    c = np.linalg.solve(nmat, rhs[..., None])[..., 0]
    cov_diag = np.einsum("saa->sa", np.linalg.inv(nmat))
    return c, cov_diag


# --------------------------------------------------------------------------------------------
# the solver
# --------------------------------------------------------------------------------------------
def solve_wavelengths(arcs: Sequence[ArcInput], x_at: Callable[[np.ndarray], np.ndarray],
                      design: IfsDesign, lines: LineList, *, degree: int = 3,
                      smooth_from_order: int = 2, surface_degree: int = 3,
                      lsf_nodes: int = 5, lsf_degree: int | None = None, max_shift: float = 6.0,
                      max_stretch: float = 0.006, blend_sep: float = 3.5,
                      blend_ratio: float = 0.03, detect_snr: float = 8.0,
                      min_snr: float = 10.0, line_tol: float = 1.0, clip: float = 5.0,
                      edge_rows: float = 2.0, min_lines: int = 5,
                      min_match_fraction: float = 0.6, max_saturated_fraction: float = 0.5,
                      half: int | None = None, sigma: float | None = None,
                      lsf_smooth: bool = True, min_lines_per_spaxel: int | None = None,
                      fit_halo: bool = False) -> WavelengthSolution:
    """Wavelength solution and LSF of every spaxel from arc-lamp frames.

    Parameters
    ----------
    arcs : sequence of ArcInput
        Arc rate images of one configuration (one lamp or several per frame; each frame's
        lines are those of its own ``lamps``).
    x_at : callable
        ``x_at(y)`` -> cross-dispersion centre of every spaxel at rows ``y`` (broadcastable to
        (ny_s, nx_s, n)); the trace fit's ``TraceSolution.x_at``, or :func:`design_x_at`.
    design : IfsDesign
        The configuration's design (search starting point, spaxel grid, wavelength range).
    lines : LineList
        Published vacuum wavelengths and relative intensities of the lamp lines.
    degree : int
        Legendre degree of ``y(u)`` per spaxel.
    smooth_from_order : int
        Coefficients of this order and above are smoothed across spaxels (slice or field);
        the lower ones are refitted per spaxel. ``degree + 1`` turns the smoothing off.
    surface_degree : int
        Polynomial degree of the smoothing surface.
    lsf_nodes, lsf_degree : int
        Number of LSF wavelength nodes; polynomial degree of the LSF width (rows) in
        wavelength per spaxel (default: 3 with >= 20 lines per spaxel, 2 with >= 12, else 1).
    max_shift : float
        Largest offset (rows) of the arc from the design searched for, globally and between
        spaxels.
    max_stretch : float
        Largest relative scale error of the design dispersion searched for.
    blend_sep, blend_ratio : float
        A line with a listed neighbour within ``blend_sep`` LSF sigmas brighter than
        ``blend_ratio`` times itself is not used.
    detect_snr : float
        Peak S/N in the stacked spectrum for an arc line to count as detected.
    min_snr : float
        Minimum line flux S/N for a per-spaxel measurement.
    line_tol : float
        Largest distance (rows) of a per-spaxel line centre from its prediction.
    clip : float
        Sigma-clipping threshold of the fits.
    edge_rows : float
        Lines closer than this (plus the fit window) to the spectrum's ends are not used.
    min_lines : int
        Fewest lines identified per arc.
    min_match_fraction : float
        Fraction of the ten strongest peaks that must fall on listed lines.
    max_saturated_fraction : float
        An arc whose identified strong-line measurements are saturated more often than this
        is refused.
    half, sigma : int, float
        Extraction half-width (columns) and profile sigma; default from the design.
    min_lines_per_spaxel : int
        Fewest lines per spaxel (median over the spaxels) for a solution; default
        ``degree + 4``.
    fit_halo : bool
        Measure a halo around the LSF core (fraction and width, on the isolated lines of a
        subset of spaxels) and fit every line with core + that halo, so that ``lsf_sigma``
        is the core's sigma. Off by default. Measured 2026-12-07 on the simulator's arcs
        (core + 6-7 % of the light in a 3-4 px halo): a Gaussian alone is wider than the core
        by 0.6 % (median); with the halo fitted, the 4096^2 slicer finds the simulator's halo
        exactly (0.06, 3.0 px) and the LSF comes within 0.03 % (median), but on small test
        frames and dense line lists the fraction and width are degenerate and a spurious halo
        (0.02 of 1.75 px) biases the LSF by -1 to -1.6 %; it also costs ~40 line-fit passes
        on a subset of spaxels per arc.
    lsf_smooth : bool
        Replace every spaxel's LSF by the smooth surface across spaxels (per slice / over
        the field); False keeps the per-spaxel fits (the surface only where a spaxel has
        too few lines).

    Returns
    -------
    WavelengthSolution
        ``qa`` holds ``wave_rms_resel`` (median over spaxels of the residual rms in LSF
        FWHM), ``wave_rms_resel_p95``, ``wave_rms_um``, ``lines_used``,
        ``lines_per_spaxel`` (median), ``lsf_sigma_um`` (min, median, max),
        ``resolving_power`` (min, median, max), ``spaxels_without_lines``, per-arc
        identification figures under ``arcs`` and ``seconds``.

    Raises
    ------
    BadInputError
        An arc without lines (lamp off), whose lines match no offset of the list (wrong
        filter/lamp), saturated, or of the wrong shape; the message names the file.
    """
    t_start = time.perf_counter()
    if not arcs:
        raise BadInputError("no arc frame given to the wavelength solution")
    ny_s, nx_s, nw = design.trace_y.shape
    ns = ny_s * nx_s
    lo, hi = float(design.wavelength[0]), float(design.wavelength[-1])
    sigma_x = float(design.psf_sigma if sigma is None else sigma)
    if half is None:
        half = max(1, int(round(1.5 * sigma_x)))
    ystart = design.trace_y[..., 0].reshape(ns)
    yend = design.trace_y[..., -1].reshape(ns)
    gain = (yend - ystart) / (nw - 1)  # rows per design bin
    margin = int(math.ceil(max_shift + max_stretch * nw + 2))
    nr = nw + 2 * margin + 1
    r0 = np.floor(ystart).astype(np.int64) - margin
    rows = r0[:, None] + np.arange(nr)[None, :]
    kgrid = np.arange(-margin, nw + margin, dtype=np.float64)
    disp_um = design.dispersion  # micron per design bin
    sig_guess = max(0.6, float(design.psf_sigma))

    for arc in arcs:
        if np.shape(arc.data) != (design.size, design.size):
            raise BadInputError(f"{arc.name}: arc shape {np.shape(arc.data)} does not match "
                                f"the {design.size}x{design.size} {design.mode} design")
    plan = _ExtractionPlan(x_at, rows, (ny_s, nx_s), (design.size, design.size), sigma_x, half)
    per_arc = []
    arc_qa = []
    halos: list[tuple[float, float]] = []

    def measure(arc: ArcInput, coef_start: np.ndarray | None = None) -> None:
        t0 = time.perf_counter()
        if np.shape(arc.data) != (design.size, design.size):
            raise BadInputError(f"{arc.name}: arc shape {np.shape(arc.data)} does not match "
                                f"the {design.size}x{design.size} {design.mode} design")
        wave, inten = _arc_lines(lines, tuple(arc.lamps), lo, hi, arc.name)
        u_line = 2.0 * (wave - lo) / (hi - lo) - 1.0
        k_line = np.asarray(design.row_of(wave), np.float64)
        flux, fvar, valid, fsat = plan.apply(arc)
        if not valid.any():
            raise BadInputError(f"{arc.name}: no usable pixel along the spectra")
        fluxn = np.where(valid, flux, np.nan)
        delta, stack, sub = _align(fluxn, r0.astype(np.float64), ystart, gain, kgrid,
                                   max_shift)
        ysub = ystart[sub, None] + delta[sub, None] + kgrid[None, :] * gain[sub, None]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            vs = _sample_rows(np.where(valid[sub], fvar[sub], np.nan), r0[sub].astype(np.float64),
                              ysub)
            nval = np.isfinite(vs).sum(0)
            stack_noise = np.sqrt(np.pi / 2 * np.nanmean(vs, axis=0) / np.maximum(nval, 1))
        stack_noise = np.nan_to_num(stack_noise, nan=np.inf)
        del fluxn, vs
        if arc.saturated is not None and fsat.any():
            # an arc whose strong lines are mostly saturated cannot be identified or measured
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                sat_k = np.nanmean(_sample_rows(fsat[sub].astype(np.float64),
                                                r0[sub].astype(np.float64), ysub), axis=0)
            # saturated cores are masked out of the stack (their wings remain): count each
            # saturated stretch as one line, and the unsaturated peaks away from them
            sat_reg = np.nan_to_num(sat_k) > 0.5
            n_sat_pk = int(ndimage.label(sat_reg)[1])
            near_sat = ndimage.binary_dilation(sat_reg, iterations=4)
            peak = ((stack > 0.05 * stack.max()) & (stack >= np.roll(stack, 1))
                    & (stack >= np.roll(stack, -1)) & ~near_sat)
            n_pk = int(peak.sum()) + n_sat_pk
            if n_pk and n_sat_pk > max_saturated_fraction * n_pk:
                raise BadInputError(f"{arc.name}: {n_sat_pk} of the {n_pk} strongest arc "
                                    f"lines are saturated: saturated arc (shorter exposure?)")

        def blended_fn(sig_bins, wave=wave, inten=inten):
            return _blended(wave, inten, blend_sep * sig_bins * disp_um, blend_ratio)

        neighbours = _neighbours(inten, blend_ratio)
        coef_t, accepted, sig_t, info = _identify_template(
            stack, stack_noise, kgrid, k_line, inten, u_line, blended_fn, neighbours, sig_guess,
            max_shift, max_stretch, degree, arc.name, detect_snr,
            min_lines if coef_start is None else 1, min_match_fraction, edge_rows, coef_start)
        # per-spaxel measurement of the template's lines, twice: the template plus the
        # spaxel's offset predicts well in the middle of the band, but the dispersion scale
        # differs across the field (0.1-0.2 % is several rows at the ends of a 4k spectrum),
        # so a per-spaxel linear correction from the first pass re-centres the second
        use = np.flatnonzero(accepted)
        nl = use.size
        no_variance = arc.variance is None or not np.any(fvar > 0)
        halo = (0.0, 0.0)
        k_t = legendre.legval(u_line[use], coef_t)
        pred = ystart[:, None] + delta[:, None] + gain[:, None] * k_t[None, :]
        k_all = legendre.legval(u_line, coef_t)
        pred_all = ystart[:, None] + delta[:, None] + gain[:, None] * k_all[None, :]
        lin = legendre.legvander(u_line[use], 1)  # (nl, 2)
        for pass_ in range(2):
            hw = max(3, int(math.ceil(3.0 * sig_t + 1.5 * halo[1])))
            yw, f, v, okw, tc = _windows(flux, fvar, valid, r0, pred, hw)
            if no_variance:
                wt = okw.astype(np.float64)
            else:
                # a floor keeps noiseless or tiny-variance samples from dominating
                peak = np.max(np.where(okw, np.abs(f), 0.0), axis=-1, keepdims=True)
                wt = np.where(okw, 1.0 / (v + (1e-4 * peak) ** 2 + 1e-30), 0.0)
            wt = wt * _clear_of_neighbours(yw, pred_all, use, neighbours, 3.0 * sig_t)
            fit = _fit_gaussians(yw.reshape(ns * nl, -1), f.reshape(ns * nl, -1),
                                 wt.reshape(ns * nl, -1), pred.ravel(), sig_t,
                                 n_iter=8, relative_weights=no_variance, halo=halo)
            mu = fit.mu.reshape(ns, nl)
            sg = fit.sigma.reshape(ns, nl)
            # usable pixels in the core (+-1.5 sigma) of every measured line
            core = np.abs(yw - mu[..., None]) <= max(1.0, 1.5 * sig_t)
            core_ok = ~(core & ~okw).any(-1)
            sat_core = (core & fsat[np.arange(ns)[:, None, None], tc]).any(-1)
            snr_l = fit.amp.reshape(ns, nl) / np.maximum(fit.err_amp.reshape(ns, nl), 1e-300)
            ok = (fit.converged.reshape(ns, nl) & core_ok & (np.abs(mu - pred) < line_tol)
                  & (snr_l > min_snr) & (sg > 0.4 * sig_t) & (sg < 2.5 * sig_t) & ~sat_core)
            if pass_ == 1:
                break
            res = np.where(ok, mu - pred, 0.0)
            wl = ok.astype(np.float64)
            corr, _ = _batched_lsq(lin, res, wl, np.zeros((ns, 2)), 1e-6)
            # spaxels with too few lines, or lines from too short a stretch of the band,
            # take the correction of the smooth surface across spaxels
            span = np.where(ok, u_line[use][None, :], np.nan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                span = np.nan_to_num(np.nanmax(span, 1) - np.nanmin(span, 1))
            good_corr = (ok.sum(1) >= 4) & (span > 0.5)
            if not good_corr.any():
                break
            smooth = _surface(corr, np.where(good_corr[:, None], 1.0, 0.0), design.mode,
                              (ny_s, nx_s), surface_degree)
            # a correction far from its neighbours' (lines matched to the wrong peaks) is
            # not trusted either
            far = np.abs((corr - smooth) @ lin.T).max(1) > line_tol
            corr = np.where((good_corr & ~far)[:, None], corr, smooth)
            pred = pred + corr @ lin.T
            pred_all = pred_all + corr @ legendre.legvander(u_line, 1).T
            if fit_halo:
                halo = _halo_from_spaxels(flux, fvar, valid, r0, pred, pred_all, use, ok,
                                          neighbours, sig_t, no_variance)
                if halo[0] == 0.0 and halos:
                    halo = halos[0]
                elif halo[0] > 0:
                    halos.append(halo)
        strong = fit.converged.reshape(ns, nl) & (snr_l > min_snr)
        n_sat = int((sat_core & strong).sum())
        n_strong = int(strong.sum())
        if n_strong and n_sat > max_saturated_fraction * n_strong:
            raise BadInputError(f"{arc.name}: {n_sat} of {n_strong} arc-line measurements "
                                f"touch saturated pixels: saturated arc (shorter exposure?)")
        if not ok.any():
            raise BadInputError(f"{arc.name}: no arc line could be measured in any spaxel")
        err_mu = np.nan_to_num(fit.err_mu.reshape(ns, nl), nan=np.inf)
        err_sg = np.nan_to_num(fit.err_sigma.reshape(ns, nl), nan=np.inf)
        per_arc.append(dict(u=u_line[use], wave=wave[use], mu=mu, sg=sg, ok=ok,
                            err_mu=err_mu, err_sg=err_sg, delta=delta, coef_t=coef_t))
        arc_qa.append(dict(name=arc.name, lamps=",".join(arc.lamps), identified=int(nl),
                           halo_fraction=halo[0], halo_sigma_rows=halo[1],
                           listed=int(wave.size), template_sigma_rows=sig_t,
                           saturated_measurements=n_sat,
                           delta_range=(float(delta.min()), float(delta.max())),
                           seconds=round(time.perf_counter() - t0, 2), **info))
        log.info("%s: %d of %d listed lines identified (shift %.2f, stretch %.1e, LSF %.2f "
                 "rows); %d saturated measurements", arc.name, nl, wave.size, info["shift"],
                 info["stretch"], sig_t, n_sat)


    deferred = []
    for arc in arcs:
        try:
            measure(arc)
        except _TooFewLines as exc:
            deferred.append((arc, exc))
    for arc, exc in deferred:
        if not per_arc:
            raise BadInputError(f"{exc} and no other arc identified enough lines either: "
                                f"wrong filter or lamp, or lines blended?")
        # identified from the relation the richer arcs gave (taken in the same set)
        log.info("%s; identifying its lines with the other arcs' relation", exc)
        try:
            measure(arc, per_arc[0]["coef_t"])
        except _TooFewLines as again:
            log.warning("%s: not used", again)
            arc_qa.append(dict(name=arc.name, lamps=",".join(arc.lamps), identified=0,
                               skipped=str(again)))

    # ---- all measurements together ------------------------------------------------------
    n_distinct = np.unique(np.round(np.concatenate([p["wave"] for p in per_arc]), 7)).size
    if n_distinct < degree + 3:
        raise BadInputError(
            f"{', '.join(a.name for a in arcs)}: only {n_distinct} isolated arc lines "
            f"identified, a degree-{degree} solution needs at least {degree + 3} (lines "
            f"blended at this dispersion? one lamp per frame separates them)")
    u = np.concatenate([p["u"] for p in per_arc])
    wave_l = np.concatenate([p["wave"] for p in per_arc])
    mu = np.concatenate([p["mu"] for p in per_arc], axis=1)
    sg = np.concatenate([p["sg"] for p in per_arc], axis=1)
    ok = np.concatenate([p["ok"] for p in per_arc], axis=1)
    err_mu = np.concatenate([p["err_mu"] for p in per_arc], axis=1)
    err_sg = np.concatenate([p["err_sg"] for p in per_arc], axis=1)
    ncw = degree + 1
    basis = legendre.legvander(u, degree)  # (L, ncw)
    # a priori: the first arc's template, shifted to each spaxel
    p0 = per_arc[0]
    prior = gain[:, None] * np.pad(p0["coef_t"], (0, max(0, ncw - p0["coef_t"].size)))[None, :ncw]
    prior[:, 0] += ystart + p0["delta"]
    err_floor = 0.003  # rows: keeps noiseless fits from weighting lines by round-off
    w = np.where(ok, 1.0 / (err_mu**2 + err_floor**2), 0.0)
    c = prior.copy()
    line_ok = np.ones(mu.shape[1], bool)
    rows_s = np.arange(ns)
    # The arcs of a set were exposed minutes apart: each sits at its own flexure offset
    # along the dispersion (tenths of a pixel). One offset per arc, zero on average, is
    # fitted with the solution, so the solution refers to the arcs' mean position.
    arc_id = np.concatenate([np.full(p["u"].size, a) for a, p in enumerate(per_arc)])
    arc_off = np.zeros(len(per_arc))
    mu_raw = mu.copy()
    for _ in range(30):
        c, cov = _batched_lsq(basis, np.where(ok, mu, 0.0), w, prior, 1e-9)
        res = mu - c @ basis.T
        if len(per_arc) > 1:
            step = np.array([np.median(res[:, arc_id == a][w[:, arc_id == a] > 0])
                             if (w[:, arc_id == a] > 0).any() else 0.0
                             for a in range(len(per_arc))])
            step -= step.mean()
            if np.abs(step).max() > 1e-4:
                arc_off += step
                mu = mu_raw - arc_off[arc_id][None, :]
                continue
        typical = 1.4826 * np.median(np.abs(res[w > 0])) if (w > 0).any() else 0.0
        thresh = clip * np.sqrt(err_mu**2 + typical**2 + err_floor**2)
        # a line off in every spaxel (a blend the list does not show, a wrong wavelength)
        line_ok &= ~_line_outliers(res, w > 0, clip, 0.01)
        # one line at a time per spaxel, the worst: a gross outlier pulls the first fit
        # enough to push good lines beyond a threshold that is set by the typical scatter
        ratio = np.where(w > 0, np.abs(res) / thresh, 0.0)
        worst = np.argmax(ratio, axis=1)
        new_w = np.where(line_ok[None, :], w, 0.0)
        drop = ratio[rows_s, worst] >= 1.0
        new_w[rows_s[drop], worst[drop]] = 0.0
        if ((new_w > 0) == (w > 0)).all():
            break
        w = new_w
    n_used = (w > 0).sum(1)
    need = degree + 4 if min_lines_per_spaxel is None else int(min_lines_per_spaxel)
    if np.median(n_used) < need:
        raise BadInputError(
            f"{', '.join(a.name for a in arcs)}: a median of {np.median(n_used):.0f} isolated "
            f"arc lines per spaxel, a degree-{degree} solution needs at least {need} "
            f"(lines blended at this dispersion? one lamp per frame separates them)")
    # ---- smoothing of the higher orders across spaxels, low orders refitted ----------------
    k_s = int(np.clip(smooth_from_order, 1, ncw))
    full = n_used >= ncw + 2
    if k_s < ncw:
        sw = np.where(full[:, None], 1.0 / np.maximum(cov[:, k_s:], 1e-30), 0.0)
        high = _surface(c[:, k_s:], sw, design.mode, (ny_s, nx_s), surface_degree)
        y_high = high @ basis[:, k_s:].T
        low_prior = _surface(c[:, :k_s], np.where((n_used >= k_s + 1)[:, None], 1.0, 0.0),
                             design.mode, (ny_s, nx_s), surface_degree)
        enough = n_used >= k_s + 1
        c_low, _ = _batched_lsq(basis[:, :k_s], np.where(w > 0, mu - y_high, 0.0), w,
                                np.where(enough[:, None], c[:, :k_s], low_prior), 1e-9)
        # spaxels with fewer lines than low-order terms: surface, zero point from their lines
        few = ~enough
        if few.any():
            c_low[few] = low_prior[few]
            n1 = few & (n_used >= 1)
            if n1.any():
                r1 = np.where(w > 0, mu - y_high - c_low @ basis[:, :k_s].T, 0.0)
                c_low[n1, 0] += (r1[n1] * w[n1]).sum(1) / w[n1].sum(1)
        c = np.concatenate([c_low, high], axis=1)
    # a spaxel whose lines scatter far more than everybody else's, or that kept fewer lines
    # than unknowns, takes the smooth surfaces of all its coefficients
    res = np.where(w > 0, mu - c @ basis.T, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rms_rows = np.sqrt(np.nanmean(res**2, axis=1))
    fine = np.isfinite(rms_rows) & (n_used >= ncw + 1)
    typical_rms = float(np.median(rms_rows[fine])) if fine.any() else 0.0
    failed = ~fine | (rms_rows > max(5.0 * typical_rms, 0.05))
    if failed.any() and (~failed).sum() >= 3:
        whole = _surface(c, np.where(failed[:, None], 0.0, 1.0), design.mode, (ny_s, nx_s),
                         surface_degree)
        c[failed] = whole[failed]
        w[failed] = 0.0
        n_used = (w > 0).sum(1)
        log.warning("%d spaxels with too few or scattered lines take the smooth solution of "
                    "their neighbours", int(failed.sum()))
    res = np.where(w > 0, mu - c @ basis.T, np.nan)

    # ---- local dispersion, LSF -------------------------------------------------------------
    dy_du = legendre.legval(u, legendre.legder(c.T))  # (ns, L)  rows per unit u
    du_dlam = 2.0 / (hi - lo)
    um_per_row = 1.0 / np.abs(dy_du * du_dlam)
    # The LSF is fitted in rows (a smooth property of the optics) and converted to micron
    # with the solution's own dispersion at the nodes, so that a non-linear dispersion does
    # not have to be absorbed by the LSF polynomial.
    lsf_wave = np.linspace(lo, hi, int(lsf_nodes))
    lsf_u = 2.0 * (lsf_wave - lo) / (hi - lo) - 1.0
    if lsf_degree is None:
        # the LSF width in rows follows the optics' field variation along the spectrum
        # (cubic along a slicer spectrum that spans the detector): as many terms as the
        # lines support
        med_n = float(np.median(n_used))
        ldeg = 3 if med_n >= 20 else 2 if med_n >= 12 else 1
    else:
        ldeg = int(lsf_degree)
    med_sig = float(np.nanmedian(sg[w > 0]))
    lw = np.where(w > 0, 1.0 / (err_sg**2 + (1e-3 * med_sig) ** 2), 0.0)
    lbasis = legendre.legvander(u, ldeg)
    lprior = np.zeros((ns, ldeg + 1))
    lprior[:, 0] = med_sig
    for _ in range(3):
        lc, _ = _batched_lsq(lbasis, np.where(lw > 0, sg, 0.0), lw, lprior, 1e-9)
        lres = sg - lc @ lbasis.T
        typ = 1.4826 * np.median(np.abs(lres[lw > 0]))
        lsf_line_ok = ~_line_outliers(lres / np.maximum(sg, 1e-3), lw > 0, clip, 0.005)
        new_lw = np.where((lw > 0) & (np.abs(lres) < clip * np.sqrt(err_sg**2 + typ**2))
                          & lsf_line_ok[None, :], lw, 0.0)
        if ((new_lw > 0) == (lw > 0)).all():
            break
        lw = new_lw
    n_lsf = (lw > 0).sum(1)
    lsf_full = n_lsf >= ldeg + 3
    lsf_rows = lc @ legendre.legvander(lsf_u, ldeg).T  # (ns, nlw)
    # beyond the spaxel's bluest / reddest line the polynomial is continued with the slope
    # of a straight-line fit to all its lines (a cubic, or the end slope of one,
    # extrapolated over the last tenth of the band runs away)
    if ldeg > 1:
        lc1, _ = _batched_lsq(lbasis[:, :2], np.where(lw > 0, sg, 0.0), lw, lprior[:, :2], 1e-9)
        used_u = np.where(lw > 0, u[None, :], np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            u_min = np.nan_to_num(np.nanmin(used_u, 1), nan=-1.0)
            u_max = np.nan_to_num(np.nanmax(used_u, 1), nan=1.0)
        for edge, beyond in ((u_min, lsf_u[None, :] < u_min[:, None]),
                             (u_max, lsf_u[None, :] > u_max[:, None])):
            val = np.einsum("sk,sk->s", lc, legendre.legvander(edge, ldeg))
            lin = val[:, None] + lc1[:, 1:2] * (lsf_u[None, :] - edge[:, None])
            lsf_rows = np.where(beyond, lin, lsf_rows)
    if lsf_smooth or not lsf_full.all():
        # the LSF is a smooth property of the optics: a surface across spaxels averages the
        # per-spaxel scatter (and replaces the spaxels with too few lines)
        smooth = _surface(lsf_rows, np.where(lsf_full[:, None], 1.0, 0.0), design.mode,
                          (ny_s, nx_s), surface_degree)
        replace = np.ones(ns, bool) if lsf_smooth else ~lsf_full
        lsf_rows[replace] = smooth[replace]
    node_um_per_row = 1.0 / np.abs(legendre.legval(lsf_u, legendre.legder(c.T)) * du_dlam)
    lsf_nodes_v = lsf_rows * node_um_per_row
    lsf_l = np.array([np.interp(u, lsf_u, row) for row in lsf_rows]) * um_per_row

    # ---- residuals, QA -------------------------------------------------------------------
    res_um = res * um_per_row
    res_resel = res_um / (FWHM_PER_SIGMA * lsf_l)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # spaxels without lines: NaN
        rms_um = np.sqrt(np.nanmean(res_um**2, axis=1))
        rms_resel = np.sqrt(np.nanmean(res_resel**2, axis=1))
    rms_um[n_used == 0] = np.nan
    rms_resel[n_used == 0] = np.nan
    lines_used = int(np.unique(np.round(wave_l[(w > 0).any(0)], 7)).size)
    r_nodes = lsf_wave[None, :] / (FWHM_PER_SIGMA * lsf_nodes_v)
    fin = np.isfinite(rms_resel)
    qa = dict(
        wave_rms_resel=float(np.median(rms_resel[fin])) if fin.any() else float("nan"),
        wave_rms_resel_p95=float(np.percentile(rms_resel[fin], 95)) if fin.any() else
        float("nan"),
        wave_rms_um=float(np.median(rms_um[fin])) if fin.any() else float("nan"),
        lines_used=lines_used,
        lines_per_spaxel=float(np.median(n_used)),
        lines_per_spaxel_min=int(n_used.min()),
        spaxels_without_lines=int((n_used == 0).sum()),
        spaxels_from_surface=int(failed.sum()),
        spaxels_smoothed_lsf=int((~lsf_full).sum()),
        lsf_sigma_um=(float(lsf_nodes_v.min()), float(np.median(lsf_nodes_v)),
                      float(lsf_nodes_v.max())),
        resolving_power=(float(r_nodes.min()), float(np.median(r_nodes)),
                         float(r_nodes.max())),
        arcs=arc_qa,
        arc_offsets_rows=[round(float(v), 4) for v in arc_off],
        seconds=round(time.perf_counter() - t_start, 2),
    )
    log.info("wavelength solution %s %s %s: rms %.4f resel (median), %d lines, R %.0f-%.0f, "
             "%.1f s", design.mode, design.scale, design.filter, qa["wave_rms_resel"],
             lines_used, qa["resolving_power"][0], qa["resolving_power"][2], qa["seconds"])
    return WavelengthSolution(
        design=design, y_coeffs=c.reshape(ny_s, nx_s, ncw), wave_limits=(lo, hi),
        lsf_wave=lsf_wave, lsf_sigma=lsf_nodes_v.reshape(ny_s, nx_s, -1),
        rms=rms_um.reshape(ny_s, nx_s), lines_used=lines_used, qa=qa,
        n_lines=n_used.reshape(ny_s, nx_s), rms_resel=rms_resel.reshape(ny_s, nx_s),
        lines=dict(wavelength=wave_l, rows=mu.reshape(ny_s, nx_s, -1),
                   sigma_rows=sg.reshape(ny_s, nx_s, -1),
                   used=(w > 0).reshape(ny_s, nx_s, -1)))
