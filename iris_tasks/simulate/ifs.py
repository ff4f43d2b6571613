"""IFS instrument model (spectral traces) and IFS scenes (source cubes) for the simulator.

Two layouts, both sized to the detector:

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

from .detector import REFPIX, seed_sequence

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


def build_trace(mode: str, size: int, filter_name: str = "Kbb", scale: str | None = None,
                seed: int = 0) -> IfsTrace:
    """The simulated IFS instrument model for ``mode`` on a ``size`` x ``size`` detector.

    The geometry depends on mode and size only (the same optics for every plate scale); the
    wavelength grid on the filter; the spaxel throughput on the seed and mode.
    """
    mode = mode.upper()
    if mode not in MODE_SCALES:
        raise ValueError(f"unknown IFS mode {mode!r}; expected LENSLET or SLICER")
    scale = scale or MODE_SCALES[mode][0]
    lo, hi = band(filter_name)
    active = size - 2 * REFPIX
    margin = 3
    usable = active - 2 * margin
    rng = np.random.default_rng(seed_sequence(seed, "ifstrace", mode, size))
    if mode == "LENSLET":
        length = int(min(200, max(12, active // 4 - 4)))
        dy = length + 4
        ny_s = max(1, usable // dy)
        nx_s = int(min(128, max(1, (usable - 2) // 6)))
        pitch = (usable - 2) // nx_s
        tilt = 1.5 / length  # columns per row
        k = np.arange(length, dtype=np.float64)
        j = np.arange(ny_s, dtype=np.float64)[:, None, None]
        i = np.arange(nx_s, dtype=np.float64)[None, :, None]
        x0 = REFPIX + margin + 1 + i * pitch
        y0 = REFPIX + margin + j * dy
        # a gentle field distortion: rows of spectra bow by up to 0.3 pixel across the field
        bow = 0.3 * np.sin(np.pi * (i + 0.5) / nx_s)
        trace_x = x0 + tilt * k
        trace_y = y0 + k + bow
        throughput = np.clip(rng.normal(1.0, 0.03, (ny_s, nx_s)), 0.85, 1.15)
        psf_sigma = 1.0
    else:
        nx_s = int(min(88, max(6, active // 4 - 3)))
        gap = 4
        width = nx_s + gap
        ny_s = int(min(45, max(1, usable // width)))
        length = usable - 2
        k = np.arange(length, dtype=np.float64)
        j = np.arange(ny_s, dtype=np.float64)[:, None, None]
        i = np.arange(nx_s, dtype=np.float64)[None, :, None]
        x0 = REFPIX + margin + 1 + j * width + i
        smile = 0.4 * ((k - length / 2) / (length / 2)) ** 2
        trace_x = x0 + smile + 0 * j
        # line tilt: a monochromatic slit image is tilted by 0.5 pixel across the slice
        trace_y = REFPIX + margin + 1 + k + 0.5 * (i / max(1, nx_s - 1) - 0.5) + 0 * j
        per_slice = rng.normal(1.0, 0.05, (ny_s, 1))
        along = 1.0 + 0.02 * np.cos(np.pi * (np.arange(nx_s) + 0.5) / nx_s)[None, :]
        throughput = np.clip(per_slice * along, 0.8, 1.2)
        psf_sigma = 0.6
    wavelength = np.linspace(lo, hi, length)
    shape = (ny_s, nx_s, length)
    return IfsTrace(mode=mode, scale=str(scale), filter=filter_name,
                    trace_x=np.broadcast_to(trace_x, shape).astype(np.float32),
                    trace_y=np.broadcast_to(trace_y, shape).astype(np.float32),
                    wavelength=wavelength, throughput=throughput.astype(np.float32),
                    psf_sigma=psf_sigma)


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
