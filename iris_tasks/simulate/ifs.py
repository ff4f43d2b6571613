"""IFS instrument model (spectral traces) and IFS scenes (source cubes) for the simulator.

Two instrument models:

``realistic`` (the default of :class:`~iris_tasks.simulate.frames.FrameFactory`)
    the as-built instrument of :mod:`iris_tasks.simulate.ifs_optics` (design + distortion +
    non-linear dispersion + per-slice offsets, a core + halo PSF varying with wavelength and
    position, flexure per exposure) rendered by its own forward model
    (:func:`~iris_tasks.simulate.ifs_optics.render`), with the published arc-lamp and OH lines
    (:mod:`iris_tasks.instrument.lines`): :func:`build_as_built_ifs`,
    :func:`build_realistic_scene`.
``ideal``
    the design geometry with a single Gaussian PSF, one wavelength sample per row and linear
    interpolation between rows (:func:`build_trace`, :func:`project_cube`, :func:`build_scene`):
    the extraction's own model, kept for unit tests of solver mechanics only.

Two layouts (:mod:`iris_tasks.instrument.ifs_design`), both sized to the detector:

LENSLET
    A grid of short spectra, one per lenslet, dispersed along +y (one wavelength sample per
    detector row) and tilted in x by ~1.5 pixels over their length; lenslets on a pitch of
    >= 6 columns. Cross-dispersion profile Gaussian, sigma 1.0 pixel.
SLICER
    Slices side by side in x, each a long slit: the spaxels of one slice sit in adjacent
    columns and their spectra run down the whole active height with a small smile. Cross-
    dispersion sigma 0.6 pixel (neighbouring spaxels blend a little, as in a real slicer).

Trace coordinates are 0-based detector pixel centres; ``trace_x/y[j, i, k]`` is where spaxel
(row j, column i) at wavelength ``wavelength[k]`` lands. Cubes are (nwave, ny, nx) in e-/s per
spaxel per wavelength bin arriving at the IFS (after the atmosphere, before the spaxel
throughput and the detector flat).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from ..instrument import lines as line_lists
from ..instrument.ifs_design import nominal_design
from .detector import seed_sequence
from .ifs_optics import AsBuiltIfs, SpectralComponent, build_as_built, continuum_component

log = logging.getLogger(__name__)

# Broad-band IFS filters (micron); the trace spans the band.
IFS_BANDS: dict[str, tuple[float, float]] = {
    "Zbb": (0.928, 1.121), "Jbb": (1.180, 1.416), "Hbb": (1.473, 1.803), "Kbb": (1.965, 2.381),
}
# A bright emission line for the science source in each band (micron).
SOURCE_LINES: dict[str, tuple[str, float]] = {
    "Zbb": ("[SIII]", 0.9533), "Jbb": ("Pa-beta", 1.2822), "Hbb": ("[FeII]", 1.6440),
    "Kbb": ("Br-gamma", 2.1661),
}
MODE_SCALES = {"LENSLET": ("4", "9"), "SLICER": ("25", "50")}
PSF_FWHM_MAS = 16.0  # diffraction-limited core at K
DEFAULT_ARC_LAMPS = "Ar,Kr,Ne,Xe"
# Realistic sky: the brightest OH line of the band in e-/s per 4 mas spaxel; lines fainter
# than OH_MIN_RELATIVE of it are left out (they are far below the continuum and the noise).
OH_PEAK_E_PER_S = 0.04
OH_MIN_RELATIVE = 1e-3
SKY_CONTINUUM_PER_BIN = 2e-4  # e-/s per 4 mas spaxel per design wavelength bin
CONTINUUM_SAMPLES_PER_BIN = 8  # continuum grids: samples per design bin (integrated exactly)


def band(filter_name: str) -> tuple[float, float]:
    try:
        return IFS_BANDS[filter_name]
    except KeyError:
        raise ValueError(f"unknown IFS filter {filter_name!r}; expected one of {', '.join(IFS_BANDS)}") from None


@dataclass
class IfsTrace:
    """Where every spaxel's spectrum lands on the detector (the IfsTraceModel content)."""

    mode: str
    scale: str
    filter: str
    trace_x: np.ndarray  # (ny_s, nx_s, nwave) float32
    trace_y: np.ndarray
    wavelength: np.ndarray  # (nwave,) micron
    throughput: np.ndarray  # (ny_s, nx_s) float32
    psf_sigma: float

    @property
    def spaxel_scale_arcsec(self) -> float:
        return float(self.scale) / 1000.0

    @property
    def cube_shape(self) -> tuple[int, int, int]:
        ny_s, nx_s, nw = self.trace_x.shape
        return (nw, ny_s, nx_s)

    def to_model(self):
        from ..datamodels import IfsTraceModel

        model = IfsTraceModel(trace_x=self.trace_x, trace_y=self.trace_y,
                              wavelength=self.wavelength, throughput=self.throughput)
        model.meta.psf_sigma = float(self.psf_sigma)
        model.meta.spaxel_scale = self.spaxel_scale_arcsec
        return model


def _throughput(mode: str, ny_s: int, nx_s: int, seed: int, size: int) -> np.ndarray:
    """Relative spaxel throughput (the same draw for the ideal and the realistic model)."""
    rng = np.random.default_rng(seed_sequence(seed, "ifstrace", mode, size))
    if mode == "LENSLET":
        return np.clip(rng.normal(1.0, 0.03, (ny_s, nx_s)), 0.85, 1.15)
    per_slice = rng.normal(1.0, 0.05, (ny_s, 1))
    along = 1.0 + 0.02 * np.cos(np.pi * (np.arange(nx_s) + 0.5) / nx_s)[None, :]
    return np.clip(per_slice * along, 0.8, 1.2)


def as_built_trace(optics: AsBuiltIfs) -> IfsTrace:
    """The as-built geometry (zero flexure) as an :class:`IfsTrace`: truth, for scoring."""
    d = optics.design
    return IfsTrace(mode=d.mode, scale=d.scale, filter=d.filter,
                    trace_x=optics.trace_x.astype(np.float32),
                    trace_y=optics.trace_y.astype(np.float32),
                    wavelength=np.array(d.wavelength),
                    throughput=optics.throughput.astype(np.float32),
                    psf_sigma=float(optics.psf.sigma_x0))


def build_trace(mode: str, size: int, filter_name: str = "Kbb", scale: str | None = None,
                seed: int = 0) -> IfsTrace:
    """The ideal IFS instrument model: the design geometry (:func:`nominal_design`) with its
    Gaussian PSF, for ``mode`` on a ``size`` x ``size`` detector.

    The geometry depends on mode and size only (the same optics for every plate scale); the
    wavelength grid on the filter; the spaxel throughput on the seed and mode.
    """
    design = nominal_design(mode, size, filter_name, scale)  # checks mode and filter
    ny_s, nx_s, _ = design.trace_x.shape
    throughput = _throughput(design.mode, ny_s, nx_s, seed, size)
    return IfsTrace(mode=design.mode, scale=design.scale, filter=filter_name,
                    trace_x=design.trace_x.astype(np.float32),
                    trace_y=design.trace_y.astype(np.float32),
                    wavelength=np.array(design.wavelength), throughput=throughput.astype(np.float32),
                    psf_sigma=design.psf_sigma)


def build_as_built_ifs(mode: str, size: int, filter_name: str = "Kbb", scale: str | None = None,
                       seed: int = 0) -> AsBuiltIfs:
    """The realistic (as-built) IFS for ``mode``: see :mod:`iris_tasks.simulate.ifs_optics`.
    Same spaxel throughput as :func:`build_trace` for the same seed."""
    design = nominal_design(mode, size, filter_name, scale)  # checks mode and filter
    ny_s, nx_s, _ = design.trace_x.shape
    return build_as_built(design.mode, size, filter_name, design.scale, seed,
                          throughput=_throughput(design.mode, ny_s, nx_s, seed, size),
                          design=design)


def project_cube(trace: IfsTrace, cube: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Detector illumination (e-/s per pixel) of ``cube`` through ``trace``.

    Each (spaxel, wavelength) sample is multiplied by the spaxel throughput and spread with the
    pixel-integrated Gaussian cross-dispersion profile in x and linear interpolation between
    the two nearest rows in y (flux conserving; the profile is truncated at 4 sigma and
    renormalised).
    """
    nw, ny_s, nx_s = trace.cube_shape
    if cube.shape != (nw, ny_s, nx_s):
        raise ValueError(f"cube shape {cube.shape} does not match the trace {(nw, ny_s, nx_s)}")
    ny, nx = shape
    sigma = trace.psf_sigma
    half = int(math.ceil(4 * sigma))
    offsets = np.arange(-half, half + 1)
    image = np.zeros(ny * nx, np.float64)
    s2 = math.sqrt(2.0) * sigma
    for j in range(ny_s):  # one row of spaxels at a time keeps the temporaries small
        flux = (cube[:, j, :].T * trace.throughput[j][:, None]).ravel().astype(np.float64)
        xc = trace.trace_x[j].ravel().astype(np.float64)
        yc = trace.trace_y[j].ravel().astype(np.float64)
        keep = flux != 0
        if not keep.any():
            continue
        flux, xc, yc = flux[keep], xc[keep], yc[keep]
        xi = np.rint(xc).astype(np.int64)[:, None] + offsets  # (n, no)
        wx = 0.5 * (erf((xi + 0.5 - xc[:, None]) / s2) - erf((xi - 0.5 - xc[:, None]) / s2))
        wx /= wx.sum(axis=1, keepdims=True)
        y0 = np.floor(yc).astype(np.int64)
        fy = yc - y0
        for yrow, wy in ((y0, 1.0 - fy), (y0 + 1, fy)):
            w = (flux * wy)[:, None] * wx
            ok = (yrow[:, None] >= 0) & (yrow[:, None] < ny) & (xi >= 0) & (xi < nx)
            idx = (yrow[:, None] * nx + xi)[ok]
            image += np.bincount(idx, weights=w[ok], minlength=ny * nx)
    return image.reshape(ny, nx).astype(np.float32)


# ---------------------------------------------------------------------- spectra and cubes
def _gaussian_lines(wave: np.ndarray, centres, fluxes, sigma_um: float) -> np.ndarray:
    """Sum of Gaussian lines; each line's integral over the bins equals its flux (e-/s)."""
    out = np.zeros_like(wave)
    for c, f in zip(centres, fluxes, strict=True):
        prof = np.exp(-0.5 * ((wave - c) / sigma_um) ** 2)
        if prof.sum() > 0:
            out += f * prof / prof.sum()
    return out


def atmosphere_transmission(wave: np.ndarray) -> np.ndarray:
    """Telluric transmission: 1 with a few broad absorption bands (deterministic)."""
    lo, hi = wave[0], wave[-1]
    span = hi - lo
    t = np.ones_like(wave)
    for frac, depth, width in ((0.05, 0.35, 0.02), (0.3, 0.15, 0.01), (0.62, 0.2, 0.008),
                               (0.9, 0.4, 0.03)):
        t *= 1.0 - depth * np.exp(-0.5 * ((wave - (lo + frac * span)) / (width * span)) ** 2)
    return t


def sky_spectrum(wave: np.ndarray, scale_mas: float) -> np.ndarray:
    """Sky emission per spaxel (e-/s per bin): continuum + OH-like lines, scaled with the
    spaxel area (the values are for 4 mas spaxels times (scale/4)^2)."""
    lo, hi = wave[0], wave[-1]
    n_lines = 12
    centres = lo + (hi - lo) * (np.arange(n_lines) + 0.37) / n_lines
    fluxes = 0.02 * (1.0 + 0.8 * np.cos(np.arange(n_lines) * 2.1))
    dw = (hi - lo) / max(1, wave.size - 1)
    lines = _gaussian_lines(wave, centres, fluxes, 0.8 * dw)
    continuum = np.full_like(wave, 2e-4)
    return (continuum + lines) * (scale_mas / 4.0) ** 2


def arc_lines(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Arc-lamp line list (micron, relative strength) inside the band, deterministic."""
    lo, hi = wave[0], wave[-1]
    n = 8
    centres = lo + (hi - lo) * (np.arange(n) + 0.5) / n + 0.013 * (hi - lo) * np.sin(np.arange(n))
    strength = 0.5 + 0.5 * np.abs(np.cos(np.arange(n) * 1.3))
    return centres, strength


def spatial_profile(ny_s: int, nx_s: int, xc: float, yc: float, fwhm_spaxels: float) -> np.ndarray:
    """Spaxel-integrated Gaussian (sum 1 over an infinite field) centred at (xc, yc) spaxels."""
    sigma = max(fwhm_spaxels, 1e-3) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    s2 = math.sqrt(2.0) * sigma
    ix = np.arange(nx_s)
    iy = np.arange(ny_s)
    px = 0.5 * (erf((ix + 0.5 - xc) / s2) - erf((ix - 0.5 - xc) / s2))
    py = 0.5 * (erf((iy + 0.5 - yc) / s2) - erf((iy - 0.5 - yc) / s2))
    return np.outer(py, px)


@dataclass
class IfsScene:
    """Everything the IFS frames of one mode are made of (saved to truth/)."""

    trace: IfsTrace
    wavelength: np.ndarray
    transmission: np.ndarray
    sky: np.ndarray  # per spaxel, e-/s per bin
    source_spectrum: np.ndarray  # total over the source, e-/s per bin, before the atmosphere
    source_profile: np.ndarray  # (ny_s, nx_s), sum of the part on the field
    source_xy: tuple[float, float]
    line: tuple[str, float, float]  # name, micron, flux e-/s
    continuum_e_per_s: float
    telluric_spectrum: np.ndarray  # star, before the atmosphere
    telluric_xy: tuple[float, float]
    lamp: np.ndarray  # continuum lamp per spaxel, e-/s per bin (shape only; scaled per frame)
    arc: np.ndarray  # arc lamp per spaxel, e-/s per bin (shape only)
    arc_wavelengths: np.ndarray
    # realistic scenes only: the as-built optics and the spectra as continuum + lines
    optics: AsBuiltIfs | None = None
    spectra: RealisticSpectra | None = None

    @property
    def realistic(self) -> bool:
        return self.optics is not None

    def cube(self, kind: str, lamp_level: float = 1.0) -> np.ndarray:
        """(nwave, ny_s, nx_s) e-/s for a frame kind: science, sky, telluric, flat, arc."""
        nw, ny_s, nx_s = self.trace.cube_shape
        ones = np.ones((1, ny_s, nx_s))
        sky = self.sky[:, None, None] * ones
        if kind == "sky":
            return sky
        if kind == "science":
            src = (self.source_spectrum * self.transmission)[:, None, None] * self.source_profile[None]
            return src + sky
        if kind == "telluric":
            prof = spatial_profile(ny_s, nx_s, *self.telluric_xy, self._fwhm_spaxels())
            return (self.telluric_spectrum * self.transmission)[:, None, None] * prof[None] + sky
        if kind == "flat":
            return lamp_level * self.lamp[:, None, None] * ones
        if kind == "arc":
            return lamp_level * self.arc[:, None, None] * ones
        if kind == "dark":
            return np.zeros((nw, ny_s, nx_s))
        raise ValueError(f"unknown IFS frame kind {kind!r}")

    def _fwhm_spaxels(self) -> float:
        return PSF_FWHM_MAS / float(self.trace.scale)

    def components(self, kind: str, lamp_level: float = 1.0,
                   lamps: str | None = None) -> list[SpectralComponent]:
        """The separable parts (spatial map x spectrum) of a frame kind, for the realistic
        renderer: science, sky, telluric, flat, arc (``lamps``: e.g. "Ar,Kr,Ne,Xe"), dark."""
        if self.spectra is None:
            raise ValueError("components() needs a realistic scene (build_realistic_scene)")
        sp = self.spectra
        nw, ny_s, nx_s = self.trace.cube_shape
        ones = np.ones((ny_s, nx_s))
        sky = [sp.sky_continuum, sp.sky_lines]
        if kind == "sky":
            return sky
        if kind == "science":
            return [SpectralComponent(self.source_profile, sp.source.wave_um, sp.source.density,
                                      sp.source.line_um, sp.source.line_flux,
                                      sp.source.line_sigma_um), *sky]
        if kind == "telluric":
            prof = spatial_profile(ny_s, nx_s, *self.telluric_xy, self._fwhm_spaxels())
            return [SpectralComponent(prof, sp.telluric.wave_um, sp.telluric.density), *sky]
        if kind == "flat":
            return [sp.lamp.scaled(lamp_level)]
        if kind == "arc":
            arc = sp.arc_lines(lamps or DEFAULT_ARC_LAMPS)
            peak = max(float(arc.intensity.max(initial=0.0)), 1e-30)
            return [SpectralComponent(ones * lamp_level, line_um=arc.wavelength_um,
                                      line_flux=arc.intensity / peak,
                                      line_sigma_um=np.zeros(len(arc)))]
        if kind == "dark":
            return []
        raise ValueError(f"unknown IFS frame kind {kind!r}")


def build_scene(trace: IfsTrace, seed: int = 0) -> IfsScene:
    """Source, sky, telluric star and lamps for ``trace`` (deterministic from the seed)."""
    rng = np.random.default_rng(seed_sequence(seed, "ifsscene", trace.mode, trace.scale,
                                              trace.filter, trace.trace_x.shape[1]))
    wave = trace.wavelength
    nw, ny_s, nx_s = trace.cube_shape
    scale = float(trace.scale)
    fwhm = PSF_FWHM_MAS / scale
    dw = (wave[-1] - wave[0]) / max(1, nw - 1)
    # Point source near the field centre (sub-spaxel offset) with a red continuum and one line.
    xc = (nx_s - 1) / 2 + rng.uniform(-0.3, 0.3)
    yc = (ny_s - 1) / 2 + rng.uniform(-0.3, 0.3)
    continuum_total = 3.0e4  # e-/s over the band: bright enough to see in one frame
    slope = (wave / wave.mean()) ** -1.0
    continuum = continuum_total * slope / slope.sum()
    line_name, line_wave = SOURCE_LINES.get(trace.filter, ("line", float(wave.mean())))
    line_flux = 1.0e4
    source = continuum + _gaussian_lines(wave, [line_wave], [line_flux], 1.2 * dw)
    profile = spatial_profile(ny_s, nx_s, xc, yc, fwhm)
    # Telluric standard: a hot star (Rayleigh-Jeans slope), brighter, at another position.
    txy = ((nx_s - 1) * 0.4, (ny_s - 1) * 0.6)
    tel = (wave / wave[0]) ** -4.0
    tel = 1.0e5 * tel / tel.sum()
    lamp = (wave / wave.mean()) ** 1.5  # warm continuum lamp rising to the red
    lamp = lamp / lamp.mean()
    arc_w, arc_s = arc_lines(wave)
    arc = _gaussian_lines(wave, arc_w, arc_s, 0.8 * dw)
    arc = arc / max(arc.max(), 1e-30)
    return IfsScene(trace=trace, wavelength=wave, transmission=atmosphere_transmission(wave),
                    sky=sky_spectrum(wave, scale), source_spectrum=source, source_profile=profile,
                    source_xy=(float(xc), float(yc)), line=(line_name, line_wave, line_flux),
                    continuum_e_per_s=continuum_total, telluric_spectrum=tel, telluric_xy=txy,
                    lamp=lamp, arc=arc, arc_wavelengths=arc_w)


# ---------------------------------------------------------------------- realistic scenes
@dataclass(frozen=True)
class RealisticSpectra:
    """Spectra of a realistic scene as continuum densities and line lists (per spaxel weight
    unit, before throughput); the arc lines are looked up per lamp set."""

    band_edges: tuple[float, float]
    sky_continuum: SpectralComponent
    sky_lines: SpectralComponent
    source: SpectralComponent
    telluric: SpectralComponent
    lamp: SpectralComponent

    def arc_lines(self, lamps: str) -> line_lists.LineList:
        return line_lists.arc_lines(lamps, *self.band_edges)


def _bin_lines(edges: np.ndarray, centres, fluxes, sigmas) -> np.ndarray:
    """Flux of Gaussian lines in each bin between ``edges`` (exact integral; sigma 0 = delta)."""
    out = np.zeros(edges.size - 1)
    for c, f, sg in zip(np.atleast_1d(centres), np.atleast_1d(fluxes), np.atleast_1d(sigmas),
                        strict=True):
        s2 = math.sqrt(2.0) * max(float(sg), 1e-12)
        out += f * np.diff(0.5 * erf((edges - c) / s2))
    return out


def _bin_continuum(comp: SpectralComponent, edges: np.ndarray) -> np.ndarray:
    """Integral of a component's continuum over each bin between ``edges``."""
    cum = comp.cumulative()
    if cum is None:
        return np.zeros(edges.size - 1)
    return np.diff(np.interp(edges, cum[0], cum[1], left=0.0, right=float(cum[1][-1])))


def transmission_at(wave: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The telluric transmission of :func:`atmosphere_transmission` at any wavelength, for a
    band whose design grid runs from ``lo`` to ``hi``."""
    span = hi - lo
    t = np.ones_like(np.asarray(wave, np.float64))
    for frac, depth, width in ((0.05, 0.35, 0.02), (0.3, 0.15, 0.01), (0.62, 0.2, 0.008),
                               (0.9, 0.4, 0.03)):
        t = t * (1.0 - depth * np.exp(-0.5 * ((wave - (lo + frac * span)) / (width * span)) ** 2))
    return t


def build_realistic_scene(optics: AsBuiltIfs, seed: int = 0) -> IfsScene:
    """Source, sky (continuum + Rousselot OH lines), telluric star, continuum lamp and arc
    lamps (NIST lines) for the as-built ``optics`` (deterministic from the seed).

    The design-grid arrays of the scene (``sky``, ``source_spectrum``, ``arc``...) are the
    truth integrated over the design wavelength bins (no instrument); the renderer uses
    :meth:`IfsScene.components` instead.
    """
    trace = as_built_trace(optics)
    design = optics.design
    rng = np.random.default_rng(seed_sequence(seed, "ifsscene", trace.mode, trace.scale,
                                              trace.filter, trace.trace_x.shape[1]))
    wave = np.array(design.wavelength)
    nw, ny_s, nx_s = trace.cube_shape
    scale = float(trace.scale)
    fwhm = PSF_FWHM_MAS / scale
    dw = design.dispersion
    lo, hi = float(wave[0]), float(wave[-1])
    edges_band = (lo - 0.5 * dw, hi + 0.5 * dw)
    bin_edges = np.concatenate([wave - 0.5 * dw, [hi + 0.5 * dw]])
    nsamp = CONTINUUM_SAMPLES_PER_BIN * nw + 1
    ones = np.ones((ny_s, nx_s))
    xc = (nx_s - 1) / 2 + rng.uniform(-0.3, 0.3)
    yc = (ny_s - 1) / 2 + rng.uniform(-0.3, 0.3)
    area = (scale / 4.0) ** 2

    def trans(w):
        return transmission_at(w, lo, hi)

    # sky: flat continuum + OH lines
    sky_cont = continuum_component(ones, edges_band,
                                   lambda w: np.full_like(w, SKY_CONTINUUM_PER_BIN * area / dw), nsamp)
    oh = line_lists.oh_lines(*edges_band)
    if len(oh):
        oh = oh.between(*edges_band)
        keep = oh.intensity >= OH_MIN_RELATIVE * oh.intensity.max()
        oh_w = oh.wavelength_um[keep]
        oh_f = OH_PEAK_E_PER_S * area * oh.intensity[keep] / oh.intensity.max()
    else:
        oh_w = oh_f = np.zeros(0)
    sky_lines = SpectralComponent(ones, line_um=oh_w, line_flux=oh_f,
                                  line_sigma_um=np.zeros(oh_w.size))
    sky_binned = SKY_CONTINUUM_PER_BIN * area + _bin_lines(bin_edges, oh_w, oh_f, np.zeros(oh_w.size))
    # source: red continuum (same total as the ideal scene) and one line
    continuum_total = 3.0e4
    norm = float(((wave / wave.mean()) ** -1.0).sum())
    line_name, line_wave = SOURCE_LINES.get(trace.filter, ("line", float(wave.mean())))
    line_flux = 1.0e4
    line_sigma = 1.2 * dw
    src = continuum_component(np.ones((ny_s, nx_s)), edges_band,
                              lambda w: continuum_total * (w / wave.mean()) ** -1.0 / norm / dw
                              * trans(w), nsamp)
    src = SpectralComponent(src.spatial, src.wave_um, src.density,
                            line_um=np.array([line_wave]),
                            line_flux=np.array([line_flux * float(trans(np.array(line_wave)))]),
                            line_sigma_um=np.array([line_sigma]))
    source_binned = (continuum_total * (wave / wave.mean()) ** -1.0 / norm
                     + _bin_lines(bin_edges, [line_wave], [line_flux], [line_sigma]))
    profile = spatial_profile(ny_s, nx_s, xc, yc, fwhm)
    # telluric standard (hot star) and continuum lamp
    txy = ((nx_s - 1) * 0.4, (ny_s - 1) * 0.6)
    tnorm = float(((wave / wave[0]) ** -4.0).sum())
    tel = 1.0e5 * (wave / wave[0]) ** -4.0 / tnorm
    tel_comp = continuum_component(ones, edges_band,
                                   lambda w: 1.0e5 * (w / wave[0]) ** -4.0 / tnorm / dw * trans(w),
                                   nsamp)
    lnorm = float(((wave / wave.mean()) ** 1.5).mean())
    lamp = (wave / wave.mean()) ** 1.5 / lnorm
    lamp_comp = continuum_component(ones, edges_band,
                                    lambda w: (w / wave.mean()) ** 1.5 / lnorm / dw, nsamp)
    arc_list = line_lists.arc_lines(DEFAULT_ARC_LAMPS, *edges_band)
    # the arc truth on the design bins, on the renderer's scale (brightest line = 1)
    arc = _bin_lines(bin_edges, arc_list.wavelength_um,
                     arc_list.intensity / max(float(arc_list.intensity.max(initial=0.0)), 1e-30),
                     np.zeros(len(arc_list)))
    # the transmission per design bin that the source's binned spectrum actually sees (the
    # absorption bands can be narrower than a bin on small test detectors)
    seen = _bin_continuum(src, bin_edges) + _bin_lines(bin_edges, src.line_um, src.line_flux,
                                                       src.line_sigma_um)
    transmission = np.where(source_binned > 0, seen / np.maximum(source_binned, 1e-300),
                            trans(wave))
    spectra = RealisticSpectra(band_edges=edges_band, sky_continuum=sky_cont, sky_lines=sky_lines,
                               source=src, telluric=tel_comp, lamp=lamp_comp)
    return IfsScene(trace=trace, wavelength=wave, transmission=transmission, sky=sky_binned,
                    source_spectrum=source_binned, source_profile=profile,
                    source_xy=(float(xc), float(yc)), line=(line_name, line_wave, line_flux),
                    continuum_e_per_s=continuum_total, telluric_spectrum=tel, telluric_xy=txy,
                    lamp=lamp, arc=arc, arc_wavelengths=np.array(arc_list.wavelength_um),
                    optics=optics, spectra=spectra)
