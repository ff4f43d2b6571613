"""The as-built IFS of the simulator and its own forward model (not the extraction's).

The optical design (:func:`iris_tasks.instrument.nominal_design`) says where each spaxel's
spectrum should land. The simulated instrument departs from it the way a real one does, by
amounts the pipeline has to measure from calibration frames:

* a smooth field distortion (cubic polynomial displacement, 0.5-0.9 px in x and 0.3-0.7 px
  in y across the field) and a small rotation (0.015-0.025 deg) of the whole pattern;
* SLICER: per-slice offsets (x ~0.25 px, y ~0.2 px rms) and a per-slice spaxel pitch of
  0.99-1.01 columns (spaxels of one slice stay one column apart, smoothly); LENSLET: a
  per-lenslet jitter of 0.05 px rms;
* a non-linear dispersion: the row of a wavelength is the design row plus a quadratic and a
  cubic term that vanish at the band edges and reach up to ~3 px inside the band (scaled down
  on small test detectors), varying smoothly across the field;
* a 2-D PSF: a Gaussian core whose sigma grows with wavelength (diffraction, sigma ~ lambda)
  and varies by up to +-10 % across the field, different in x and y, plus a halo (6-7 % of
  the light in a Gaussian of 3-4 px sigma) around the core;
* per-exposure flexure (:class:`Flexure`: shift and rotation of the whole pattern).

Rendering (:func:`render`) is separable per PSF component. For each spaxel the spectrum is
first put onto detector rows along the as-built, non-linear y(lambda): the continuum exactly
(the difference of its cumulative integral at the wavelengths of the row boundaries) and then
convolved with the core's y profile, each emission line as a pixel-integrated Gaussian of the
core's y width at its own wavelength and position (plus its intrinsic width). Each row sample
is then spread over columns with the pixel-integrated core x profile (analytic, erf) and
accumulated with ``np.bincount``; the halo is the core image convolved with the halo Gaussian.
So the line-spread function is the PSF's y profile, spectra are integrated, not sampled on the
extraction's grid, and nothing here shares a sample/row identity with ``iris_tasks.ifs``.

Coordinates are 0-based detector pixel centres; arrays ``(ny_s, nx_s, nw)`` follow the design.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.ndimage import convolve1d, gaussian_filter
from scipy.special import erf

from ..instrument import IfsDesign, nominal_design
from .detector import seed_sequence

log = logging.getLogger(__name__)

__all__ = ["AsBuiltIfs", "Flexure", "IfsTruth", "PsfModel", "SpectralComponent",
           "as_built_truth", "build_as_built", "continuum_component", "flexure_at", "render"]

# Gaussian sigma (rows) of the line-spread function's core at the band centre: a resolution
# element of ~2.4 rows (lenslet) / ~2 rows (slicer). The x core is the design's psf_sigma.
LSF_SIGMA_DESIGN = {"LENSLET": 1.0, "SLICER": 0.85}
# (fraction of the light, Gaussian sigma in pixels) of the halo around the core.
HALO = {"LENSLET": (0.07, 4.0), "SLICER": (0.06, 3.0)}
PSF_FIELD_VARIATION = 0.10  # peak relative change of the core sigma across the field
_PAD = 3  # design samples added at each end of a trace (row boundaries beyond the band)
_SQRT2 = math.sqrt(2.0)


# ---------------------------------------------------------------------- flexure
@dataclass(frozen=True)
class Flexure:
    """Rigid motion of the whole spectral pattern in one exposure: rotation by ``rot_deg``
    (counter-clockwise in (x, y)) about the detector centre, then a shift (dx, dy) pixels."""

    dx_px: float = 0.0
    dy_px: float = 0.0
    rot_deg: float = 0.0

    @property
    def is_zero(self) -> bool:
        return self.dx_px == 0.0 and self.dy_px == 0.0 and self.rot_deg == 0.0

    def apply(self, x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions (x, y) moved by this flexure on a ``size``^2 detector."""
        if self.is_zero:
            return x, y
        c = (size - 1) / 2.0
        t = math.radians(self.rot_deg)
        cos, sin = math.cos(t), math.sin(t)
        dx, dy = x - c, y - c
        return c + cos * dx - sin * dy + self.dx_px, c + sin * dx + cos * dy + self.dy_px

    def key(self) -> tuple[float, float, float]:
        return (round(self.dx_px, 9), round(self.dy_px, 9), round(self.rot_deg, 9))

    def to_json(self, size: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"dx_px": round(self.dx_px, 6), "dy_px": round(self.dy_px, 6),
                               "rot_deg": round(self.rot_deg, 7)}
        if size is not None:
            c = (size - 1) / 2.0
            out["rotation_centre_xy_px"] = [c, c]
        return out


# ---------------------------------------------------------------------- PSF
def _field_terms(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Smooth low-order terms of normalised field position (p, q in [-1, 1])."""
    return np.stack([p, q, p * q, p * p - 0.5, q * q - 0.5], axis=-1)


def _field_coefficients(rng: np.random.Generator, peak: float) -> np.ndarray:
    """Random coefficients of :func:`_field_terms` scaled to a peak |value| of ``peak``."""
    coeffs = rng.normal(0.0, 1.0, 5)
    g = np.linspace(-1.0, 1.0, 21)
    p, q = np.meshgrid(g, g)
    worst = float(np.abs(_field_terms(p, q) @ coeffs).max())
    return coeffs * (peak / max(worst, 1e-12))


@dataclass(frozen=True)
class PsfModel:
    """Core (Gaussian, separable in x and y) + halo (Gaussian) PSF of the as-built IFS.

    ``sigma_x(wave, x, y)`` / ``sigma_y(...)``: core sigma in pixels at wavelength ``wave``
    (micron) and detector position (x, y): ``sigma0 * wave / wave_ref * (1 + field(x, y))``.
    The halo holds ``halo_fraction`` of the light; it is the core convolved with a Gaussian
    of ``halo_sigma_px``. ``sigma_y`` is the line-spread function's core (rows).
    """

    sigma_x0: float
    sigma_y0: float
    wave_ref_um: float
    field_x: np.ndarray  # (5,) coefficients of _field_terms
    field_y: np.ndarray
    size: int
    halo_fraction: float
    halo_sigma_px: float

    def _field(self, coeffs: np.ndarray, x, y) -> np.ndarray:
        c = (self.size - 1) / 2.0
        p = (np.asarray(x, np.float64) - c) / c
        q = (np.asarray(y, np.float64) - c) / c
        return 1.0 + _field_terms(p, q) @ coeffs

    def sigma_x(self, wave, x, y) -> np.ndarray:
        return self.sigma_x0 * (np.asarray(wave) / self.wave_ref_um) * self._field(self.field_x, x, y)

    def sigma_y(self, wave, x, y) -> np.ndarray:
        return self.sigma_y0 * (np.asarray(wave) / self.wave_ref_um) * self._field(self.field_y, x, y)

    def to_json(self) -> dict[str, Any]:
        return {"core": "Gaussian, separable; sigma = sigma0 * wave / wave_ref * (1 + field)",
                "sigma_x0_px": self.sigma_x0, "sigma_y0_px": self.sigma_y0,
                "wave_ref_um": self.wave_ref_um,
                "field_terms": "p, q, p*q, p^2-1/2, q^2-1/2 with p, q = (x, y - c) / c, "
                               "c = (size - 1) / 2",
                "field_x": [float(v) for v in self.field_x],
                "field_y": [float(v) for v in self.field_y],
                "halo": "core convolved with a 2-D Gaussian", "halo_fraction": self.halo_fraction,
                "halo_sigma_px": self.halo_sigma_px}


# ---------------------------------------------------------------------- as-built geometry
@dataclass(frozen=True)
class AsBuiltIfs:
    """The simulated instrument of one (mode, scale, filter) at zero flexure.

    ``x_ext``/``y_ext`` hold the as-built positions of the design wavelengths extended by
    ``pad`` samples at each end (so that row boundaries just outside the band can be mapped
    to wavelengths); :attr:`trace_x`/:attr:`trace_y` are the design-grid part.
    """

    design: IfsDesign
    pad: int
    x_ext: np.ndarray  # (ny_s, nx_s, nw + 2 pad) float64
    y_ext: np.ndarray
    throughput: np.ndarray  # (ny_s, nx_s)
    psf: PsfModel
    perturbation: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.design.mode

    @property
    def wavelength(self) -> np.ndarray:
        return self.design.wavelength

    @property
    def trace_x(self) -> np.ndarray:
        return self.x_ext[..., self.pad:-self.pad]

    @property
    def trace_y(self) -> np.ndarray:
        return self.y_ext[..., self.pad:-self.pad]

    @property
    def cube_shape(self) -> tuple[int, int, int]:
        return self.design.cube_shape

    @property
    def wave_ext0(self) -> float:
        """Wavelength (micron) of the first extended sample."""
        return float(self.design.wavelength[0] - self.pad * self.design.dispersion)

    def positions(self, flexure: Flexure | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Extended (x, y) after ``flexure``."""
        if flexure is None or flexure.is_zero:
            return self.x_ext, self.y_ext
        return flexure.apply(self.x_ext, self.y_ext, self.design.size)

    def dispersion_um_per_row(self) -> np.ndarray:
        """d(lambda)/dy (micron per row) of the as-built at the design wavelengths."""
        dydk = np.gradient(self.y_ext, axis=-1)[..., self.pad:-self.pad]
        return self.design.dispersion / dydk

    def psf_sigmas(self, wave: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Core sigma (x, y) in pixels per spaxel at ``wave`` (default: design grid), at the
        spaxel's as-built position, zero flexure: arrays (ny_s, nx_s, nwave)."""
        if wave is None:
            x, y, w = self.trace_x, self.trace_y, self.wavelength
        else:
            w = np.asarray(wave, np.float64)
            k = (w - self.wavelength[0]) / self.design.dispersion + self.pad
            x = _interp_last(self.x_ext, k)
            y = _interp_last(self.y_ext, k)
        return self.psf.sigma_x(w, x, y), self.psf.sigma_y(w, x, y)


def _interp_last(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``a`` (..., n) at fractional indices ``k`` (m,) -> (..., m)."""
    n = a.shape[-1]
    k0 = np.clip(np.floor(k).astype(np.int64), 0, n - 2)
    f = k - k0
    return a[..., k0] * (1.0 - f) + a[..., k0 + 1] * f


def _extend(a: np.ndarray, pad: int) -> np.ndarray:
    """Extend (..., n) by ``pad`` linearly extrapolated samples at each end."""
    steps = np.arange(1, pad + 1, dtype=np.float64)
    lo = a[..., :1] - (a[..., 1:2] - a[..., :1]) * steps[::-1]
    hi = a[..., -1:] + (a[..., -1:] - a[..., -2:-1]) * steps
    return np.concatenate([lo, a, hi], axis=-1)


def build_as_built(mode: str, size: int, filter_name: str = "Kbb", scale: str | None = None,
                   seed: int = 0, throughput: np.ndarray | None = None,
                   design: IfsDesign | None = None) -> AsBuiltIfs:
    """The as-built instrument for ``mode``/``scale``/``filter_name`` on ``size``^2.

    The geometry (distortion, rotation, slice offsets, lenslet jitter, PSF field) depends on
    the seed, mode and size only (the same optics for every plate scale and filter); the
    non-linear dispersion also on the filter. Every random parameter is in ``perturbation``.
    """
    design = design or nominal_design(mode, size, filter_name, scale)
    ny_s, nx_s, nw = design.trace_x.shape
    pad = _PAD
    xd = _extend(np.array(design.trace_x), pad)
    yd = _extend(np.array(design.trace_y), pad)
    geo = np.random.default_rng(seed_sequence(seed, "ifsoptics", design.mode, size))
    disp = np.random.default_rng(seed_sequence(seed, "ifsdispersion", design.mode, size,
                                               filter_name))
    c = (size - 1) / 2.0
    p, q = (xd - c) / c, (yd - c) / c

    # Field distortion: cubic displacement polynomial, different peak in x and y.
    def cubic(cf: np.ndarray, pp, qq) -> np.ndarray:
        """sum cf_i T_i, T = p^2, pq, q^2, p^3, p^2 q, p q^2, q^3 (few whole-array passes)."""
        p2, q2 = pp * pp, qq * qq
        return (p2 * (cf[0] + cf[3] * pp + cf[4] * qq) + q2 * (cf[2] + cf[5] * pp + cf[6] * qq)
                + cf[1] * pp * qq)

    g = np.linspace(-1.0, 1.0, 33)
    gp, gq = np.meshgrid(g, g)
    amp_x, amp_y = float(geo.uniform(0.5, 0.9)), float(geo.uniform(0.3, 0.7))
    cx, cy = geo.normal(0.0, 1.0, 7), geo.normal(0.0, 1.0, 7)
    cx *= amp_x / max(float(np.abs(cubic(cx, gp, gq)).max()), 1e-12)
    cy *= amp_y / max(float(np.abs(cubic(cy, gp, gq)).max()), 1e-12)
    rot_deg = float(geo.choice([-1.0, 1.0]) * geo.uniform(0.015, 0.025))
    t = math.radians(rot_deg)
    x = c + math.cos(t) * (xd - c) - math.sin(t) * (yd - c) + cubic(cx, p, q)
    y = c + math.sin(t) * (xd - c) + math.cos(t) * (yd - c) + cubic(cy, p, q)
    pert: dict[str, Any] = {
        "distortion": "x += sum cx_i T_i(p, q), y += sum cy_i T_i(p, q); T = p^2, pq, q^2, p^3, "
                      "p^2 q, p q^2, q^3; p, q = (design x, y - c) / c, c = (size - 1) / 2",
        "distortion_cx": [float(v) for v in cx], "distortion_cy": [float(v) for v in cy],
        "distortion_peak_px": [amp_x, amp_y], "rotation_deg": rot_deg,
    }
    i_idx = np.arange(nx_s, dtype=np.float64)
    if design.mode == "SLICER":
        sdx = geo.normal(0.0, 0.25, ny_s)
        sdy = geo.normal(0.0, 0.2, ny_s)
        pitch = 1.0 + geo.uniform(-0.01, 0.01, ny_s)
        along = (pitch[:, None] - 1.0) * (i_idx[None, :] - (nx_s - 1) / 2.0)
        x = x + (sdx[:, None] + along)[..., None]
        y = y + sdy[:, None, None]
        pert.update(slice_dx_px=[float(v) for v in sdx], slice_dy_px=[float(v) for v in sdy],
                    slice_pitch=[float(v) for v in pitch])
    else:
        jx = geo.normal(0.0, 0.05, (ny_s, nx_s))
        jy = geo.normal(0.0, 0.05, (ny_s, nx_s))
        x = x + jx[..., None]
        y = y + jy[..., None]
        pert.update(lenslet_jitter_rms_px=0.05,
                    lenslet_jitter_x_rms_drawn=float(jx.std()),
                    lenslet_jitter_y_rms_drawn=float(jy.std()))
    # Non-linear dispersion along each spectrum: a quadratic and a cubic of the normalised
    # wavelength u that vanish at the band edges (the design places the band on the detector;
    # the as-built bends in between, by up to ~3 px on a full-size detector).
    amp = float(min(3.0, 0.012 * nw))
    k = np.arange(-pad, nw + pad, dtype=np.float64)
    u = 2.0 * k / max(1, nw - 1) - 1.0
    p2 = u * u - 1.0  # -1 at the band centre, 0 at the edges
    p3 = (u ** 3 - u) / 0.3849  # +-1 at u = -+0.577, 0 at the centre and the edges
    centre_p = (design.trace_x[..., nw // 2] - c) / c
    centre_q = (design.trace_y[..., nw // 2] - c) / c
    f2 = _field_coefficients(disp, 0.25)
    f3 = _field_coefficients(disp, 0.25)
    c2 = amp * float(disp.uniform(0.8, 1.0)) * (1.0 + _field_terms(centre_p, centre_q) @ f2)
    c3 = 0.35 * amp * float(disp.choice([-1.0, 1.0])) * (1.0 + _field_terms(centre_p, centre_q) @ f3)
    y = y + c2[..., None] * p2 + c3[..., None] * p3
    pert.update(dispersion="y += c2 (u^2 - 1) + c3 (u^3 - u) / 0.3849, u = 2 k / (nw - 1) - 1 "
                           "(design sample k)",
                dispersion_c2_px_range=[float(c2.min()), float(c2.max())],
                dispersion_c3_px_range=[float(c3.min()), float(c3.max())])
    if np.any(np.diff(y, axis=-1) <= 0.2):
        raise RuntimeError("as-built dispersion is not monotonic (simulator bug)")
    lo, hi = design.wavelength[0], design.wavelength[-1]
    psf = PsfModel(sigma_x0=float(design.psf_sigma), sigma_y0=LSF_SIGMA_DESIGN[design.mode],
                   wave_ref_um=float(0.5 * (lo + hi)),
                   field_x=_field_coefficients(geo, PSF_FIELD_VARIATION),
                   field_y=_field_coefficients(geo, PSF_FIELD_VARIATION), size=int(size),
                   halo_fraction=HALO[design.mode][0], halo_sigma_px=HALO[design.mode][1])
    if throughput is None:
        throughput = np.ones((ny_s, nx_s))
    x.setflags(write=False)
    y.setflags(write=False)
    return AsBuiltIfs(design=design, pad=pad, x_ext=x, y_ext=y,
                      throughput=np.asarray(throughput, np.float64), psf=psf, perturbation=pert)


# ---------------------------------------------------------------------- spectra
@dataclass(frozen=True)
class SpectralComponent:
    """One separable part of a scene: ``spatial[j, i]`` times a spectrum.

    The spectrum is a continuum (``density`` in e-/s per micron on the increasing grid
    ``wave_um``, zero outside it) plus emission lines (``line_flux`` e-/s at ``line_um``,
    intrinsic Gaussian sigma ``line_sigma_um``). Fluxes are per unit of ``spatial``, before the
    spaxel throughput.
    """

    spatial: np.ndarray  # (ny_s, nx_s)
    wave_um: np.ndarray | None = None
    density: np.ndarray | None = None
    line_um: np.ndarray = field(default_factory=lambda: np.zeros(0))
    line_flux: np.ndarray = field(default_factory=lambda: np.zeros(0))
    line_sigma_um: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def scaled(self, factor: float) -> SpectralComponent:
        return SpectralComponent(self.spatial * factor, self.wave_um, self.density, self.line_um,
                                 self.line_flux, self.line_sigma_um)

    def cumulative(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(wavelength grid, cumulative integral of the continuum) or None."""
        if self.wave_um is None or self.density is None:
            return None
        w, d = np.asarray(self.wave_um, np.float64), np.asarray(self.density, np.float64)
        cum = np.concatenate([[0.0], np.cumsum(0.5 * (d[1:] + d[:-1]) * np.diff(w))])
        return w, cum


def continuum_component(spatial: np.ndarray, band_edges: tuple[float, float], density_fn,
                        samples: int) -> SpectralComponent:
    """A continuum ``density_fn(wave)`` (e-/s per micron) sampled on ``samples`` points between
    the band edges (a hard-edged filter: nothing outside)."""
    w = np.linspace(band_edges[0], band_edges[1], int(samples))
    return SpectralComponent(spatial=np.asarray(spatial, np.float64), wave_um=w,
                             density=np.asarray(density_fn(w), np.float64))


# ---------------------------------------------------------------------- rendering
def _pixel_gaussian(centre: np.ndarray, sigma: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Fraction of a Gaussian (centre, sigma) in pixels ``cells`` (integer centres)."""
    s = _SQRT2 * sigma
    return 0.5 * (erf((cells + 0.5 - centre) / s) - erf((cells - 0.5 - centre) / s))


def _fractional_index(y: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each row of ``y`` (m, n; increasing), the fractional sample index where it reaches
    each of ``targets`` (t,), linear between samples and linearly extrapolated at the ends."""
    m, n = y.shape
    lo = min(float(y.min()), float(targets.min()))
    step = max(float(y.max()), float(targets.max())) - lo + 16.0
    off = step * np.arange(m, dtype=np.float64)[:, None] - lo
    flat = (y + off).ravel()
    query = (targets[None, :] + off).ravel()
    idx = np.searchsorted(flat, query, side="right") - 1
    base = np.repeat(np.arange(m, dtype=np.int64) * n, targets.size)
    local = np.clip(idx - base, 0, n - 2)
    lo = flat[base + local]
    hi = flat[base + local + 1]
    return (local + (query - lo) / (hi - lo)).reshape(m, targets.size)


def render(optics: AsBuiltIfs, components: Sequence[SpectralComponent],
           shape: tuple[int, int], flexure: Flexure | None = None) -> np.ndarray:
    """Detector illumination (e-/s per pixel, float32) of ``components`` through ``optics``.

    One row of spaxels at a time: the spectra are put on detector rows along the as-built,
    flexed y(lambda) (continuum integrated exactly over each row and convolved with the LSF
    core; lines as pixel-integrated Gaussians of the local LSF width), each row sample is spread
    in x with the pixel-integrated core profile, then the halo is added to the whole image.
    """
    ny, nx = shape
    xs_all, ys_all = optics.positions(flexure)
    ny_s, nx_s, nk = xs_all.shape
    dlam = optics.design.dispersion
    lam0 = optics.wave_ext0
    psf = optics.psf
    cums = [comp.cumulative() for comp in components]
    has_lines = [comp.line_um.size > 0 for comp in components]
    core = np.zeros(ny * nx, np.float64)
    for j in range(ny_s):
        weights = [comp.spatial[j] * optics.throughput[j] for comp in components]
        if not any(np.any(w != 0) for w in weights):
            continue
        X, Y = xs_all[j], ys_all[j]  # (nx_s, nk)
        wing = int(math.ceil(6.0 * psf.sigma_y0 * 1.3)) + 2
        r0 = max(0, int(math.floor(Y.min())) - wing)
        r1 = min(ny - 1, int(math.ceil(Y.max())) + wing)
        if r1 < r0:
            continue
        nr = r1 - r0 + 1
        half_rows = r0 - 0.5 + 0.5 * np.arange(2 * nr + 1)
        kq = _fractional_index(Y, half_rows)  # (nx_s, 2 nr + 1)
        lam_q = lam0 + kq * dlam
        k_centre = kq[:, 1::2]
        rows = np.arange(r0, r1 + 1, dtype=np.float64)
        flux = np.zeros((nx_s, nr), np.float64)
        # -- continuum: exact integral over each row, then the LSF core (one sigma per row of
        #    spaxels at the band centre: the continuum is smooth on that scale)
        cont = np.zeros((nx_s, nr), np.float64)
        for w, cum in zip(weights, cums, strict=True):
            if cum is None or not np.any(w != 0):
                continue
            c_at = np.interp(lam_q[:, 0::2], cum[0], cum[1], left=0.0, right=float(cum[1][-1]))
            cont += w[:, None] * np.diff(c_at, axis=1)
        if np.any(cont != 0):
            mid = nk // 2
            sig = float(np.mean(psf.sigma_y(lam0 + mid * dlam, X[:, mid], Y[:, mid])))
            h = int(math.ceil(4.0 * sig)) + 1
            kern = _pixel_gaussian(np.zeros(1), np.array(sig), np.arange(-h, h + 1.0))
            flux += convolve1d(cont, kern / kern.sum(), axis=1, mode="constant")
        # -- emission lines: pixel-integrated Gaussians at the as-built row of each line
        for w, comp, lines in zip(weights, components, has_lines, strict=True):
            if not lines or not np.any(w != 0):
                continue
            kl = (comp.line_um - lam0) / dlam
            inside = (kl >= 0) & (kl <= nk - 1)
            if not inside.any():
                continue
            kl = kl[inside]
            lflux = comp.line_flux[inside]
            lsig = np.broadcast_to(comp.line_sigma_um, comp.line_um.shape)[inside]
            yl = _interp_last(Y, kl)  # (nx_s, nl)
            xl = _interp_last(X, kl)
            slope = _interp_last(np.gradient(Y, axis=1), kl)  # rows per design sample
            sig = np.sqrt(psf.sigma_y(comp.line_um[inside], xl, yl) ** 2
                          + (lsig / dlam * slope) ** 2)
            h = int(math.ceil(5.0 * float(sig.max()))) + 1
            cells = np.floor(yl)[..., None] + np.arange(-h, h + 1)  # (nx_s, nl, nwin)
            prof = _pixel_gaussian(yl[..., None], sig[..., None], cells)
            prof /= prof.sum(axis=-1, keepdims=True)
            amount = (w[:, None] * lflux[None, :])[..., None] * prof
            local = (cells - r0).astype(np.int64)
            ok = (local >= 0) & (local < nr) & (amount != 0)
            spax = np.broadcast_to(np.arange(nx_s)[:, None, None], local.shape)
            flux += np.bincount((spax * nr + local)[ok], weights=amount[ok],
                                minlength=nx_s * nr).reshape(nx_s, nr)
        # -- spread every row sample in x with the core's x profile
        sel = flux != 0
        if not sel.any():
            continue
        si, ri = np.nonzero(sel)
        f = flux[si, ri]
        kc = k_centre[si, ri]
        xc = _interp_last_rows(X, si, kc)
        yr = rows[ri]
        sx = psf.sigma_x(lam0 + kc * dlam, xc, yr)
        half = int(math.ceil(4.0 * float(sx.max())))
        offs = np.arange(-half, half + 1)
        xi = np.rint(xc).astype(np.int64)[:, None] + offs
        wx = _pixel_gaussian(xc[:, None], sx[:, None], xi)
        wx *= (f / wx.sum(axis=1))[:, None]
        ok = (xi >= 0) & (xi < nx)
        idx = (ri[:, None] + r0) * nx + xi
        core += np.bincount(idx[ok], weights=wx[ok], minlength=ny * nx)
    image = core.reshape(ny, nx).astype(np.float32)
    frac = psf.halo_fraction
    if frac > 0:
        halo = gaussian_filter(image, psf.halo_sigma_px, mode="constant", truncate=4.0)
        image = np.float32(1.0 - frac) * image + np.float32(frac) * halo
    return image


def _interp_last_rows(a: np.ndarray, rows: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``a[rows, k]`` linearly interpolated in the last axis (k fractional, extrapolated)."""
    n = a.shape[-1]
    k0 = np.clip(np.floor(k).astype(np.int64), 0, n - 2)
    f = k - k0
    return a[rows, k0] * (1.0 - f) + a[rows, k0 + 1] * f


# ---------------------------------------------------------------------- flexure model
def flexure_at(seed: int, night: str, hours: float, *, rms_px: float = 0.1,
               drift_px_per_hour: float = 0.04, jumps_per_night: float = 1.0,
               exposure_key: str = "") -> Flexure:
    """Flexure of the IFS ``hours`` after the start of the afternoon calibrations of ``night``.

    Deterministic from (seed, night, hours, exposure_key): a slow wander (two sinusoids of
    1.5-6 h period per axis, ~``rms_px``), a linear drift of ``drift_px_per_hour`` in a random
    direction, occasional jumps (Poisson, ``jumps_per_night`` expected, ~0.12 px each) and a
    0.01 px jitter per exposure; the rotation wanders by ~0.003 deg and drifts 0.0005 deg/h.
    """
    rng = np.random.default_rng(seed_sequence(seed, "flexure", night))
    period = rng.uniform(1.5, 6.0, (3, 2))
    phase = rng.uniform(0.0, 2.0 * math.pi, (3, 2))
    amp = rng.uniform(0.6, 1.0, (3, 2)) * np.array([[rms_px], [rms_px], [0.003]]) / math.sqrt(2.0)
    wander = (amp * np.sin(2.0 * math.pi * hours / period + phase)).sum(axis=1)
    direction = rng.uniform(0.0, 2.0 * math.pi)
    rate = drift_px_per_hour * rng.uniform(0.7, 1.0)
    rot_rate = 0.0005 * rng.choice([-1.0, 1.0])
    n_jumps = int(rng.poisson(max(jumps_per_night, 0.0)))
    jump_t = rng.uniform(1.0, 14.0, n_jumps)
    jump_a = rng.normal(0.0, 0.12, (n_jumps, 2))
    jumped = jump_a[jump_t <= hours].sum(axis=0) if n_jumps else np.zeros(2)
    jit = np.random.default_rng(seed_sequence(seed, "flexure-jitter", night, exposure_key,
                                              round(hours * 3600.0, 3))).normal(0.0, 0.01, 2)
    dx = wander[0] + rate * hours * math.cos(direction) + jumped[0] + jit[0]
    dy = wander[1] + rate * hours * math.sin(direction) + jumped[1] + jit[1]
    return Flexure(float(dx), float(dy), float(wander[2] + rot_rate * hours))


# ---------------------------------------------------------------------- truth for scoring
@dataclass(frozen=True)
class IfsTruth:
    """What the pipeline should measure of one IFS configuration, at zero flexure.

    ``trace_x``/``trace_y`` (ny_s, nx_s, nw): where the design wavelengths land (the true
    dispersion relation y(lambda) per spaxel is ``trace_y`` against ``wavelength``);
    ``dispersion_um_per_row`` d(lambda)/dy there; ``psf_sigma_x``/``psf_sigma_y``
    (ny_s, nx_s, nlw) the PSF core sigma (px, before pixel integration) at ``lsf_wave``;
    ``lsf_sigma_um`` = psf_sigma_y * d(lambda)/dy (the LSF core in micron); the halo holds
    ``halo_fraction`` of the light in a Gaussian of ``halo_sigma_px`` around the core.
    """

    optics: str
    mode: str
    scale: str
    filter: str
    wavelength: np.ndarray
    trace_x: np.ndarray
    trace_y: np.ndarray
    dispersion_um_per_row: np.ndarray
    lsf_wave: np.ndarray
    psf_sigma_x: np.ndarray
    psf_sigma_y: np.ndarray
    lsf_sigma_um: np.ndarray
    halo_fraction: float
    halo_sigma_px: float
    throughput: np.ndarray
    parameters: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"optics": self.optics, "ifsmode": self.mode, "ifsscale": self.scale,
                "filter": self.filter, "halo_fraction": self.halo_fraction,
                "halo_sigma_px": self.halo_sigma_px, "lsf_wave_um": [float(w) for w in self.lsf_wave],
                "parameters": self.parameters}


def as_built_truth(optics: AsBuiltIfs, nlw: int = 16) -> IfsTruth:
    """The :class:`IfsTruth` of an as-built instrument (``nlw`` LSF wavelengths)."""
    d = optics.design
    lsf_wave = np.linspace(d.wavelength[0], d.wavelength[-1], nlw)
    sx, sy = optics.psf_sigmas(lsf_wave)
    k = (lsf_wave - d.wavelength[0]) / d.dispersion + optics.pad
    dydk = _interp_last(np.gradient(optics.y_ext, axis=-1), k)
    return IfsTruth(optics="realistic", mode=d.mode, scale=d.scale, filter=d.filter,
                    wavelength=np.array(d.wavelength), trace_x=np.array(optics.trace_x),
                    trace_y=np.array(optics.trace_y),
                    dispersion_um_per_row=optics.dispersion_um_per_row(), lsf_wave=lsf_wave,
                    psf_sigma_x=sx, psf_sigma_y=sy, lsf_sigma_um=sy * d.dispersion / dydk,
                    halo_fraction=optics.psf.halo_fraction,
                    halo_sigma_px=optics.psf.halo_sigma_px,
                    throughput=np.array(optics.throughput),
                    parameters={"psf": optics.psf.to_json(), **optics.perturbation})
