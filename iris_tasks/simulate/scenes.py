"""Imager scenes in e-/s per pixel, before the detector response (flat) is applied.

Coordinates are 0-based pixel centres: pixel (y, x) covers [x - 0.5, x + 0.5] x [y - 0.5, y + 0.5].
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from .detector import REFPIX

log = logging.getLogger(__name__)

PIXEL_SCALE_MAS = 4.0  # IRIS imager plate scale
DEFAULT_FWHM_PX = 4.0  # ~16 mas: the diffraction core of TMT (1.03 lambda/D at 2.2 um)

# Sky background through each imager filter at 4 mas/pixel (e-/s/pixel). Maunakea-like
# broad-band values scaled to the pixel area; they set the noise floor, not photometry.
SKY_RATE_E_PER_S: dict[str, float] = {
    "Z": 0.2, "Y": 0.3, "J": 0.6, "H": 2.0, "Ks": 3.0, "K": 3.5, "BLANK": 0.0,
}
IMAGER_FILTERS = tuple(k for k in SKY_RATE_E_PER_S if k != "BLANK")


def sky_rate(filter_name: str) -> float:
    """Sky background (e-/s/pixel) for an imager filter (unknown filters: the K value)."""
    return SKY_RATE_E_PER_S.get(filter_name, SKY_RATE_E_PER_S["K"])


def moffat_alpha(fwhm: float, beta: float) -> float:
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _psf_profile(r2: np.ndarray, fwhm: float, psf: str, beta: float) -> np.ndarray:
    if psf == "gaussian":
        sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        return np.exp(-0.5 * r2 / sigma**2)
    if psf == "moffat":
        alpha = moffat_alpha(fwhm, beta)
        return (1.0 + r2 / alpha**2) ** (-beta)
    raise ValueError(f"unknown PSF {psf!r}; expected 'moffat' or 'gaussian'")


@dataclass
class StarField:
    """Point sources with known positions (pixels, at zero dither) and fluxes (e-/s).

    ``flux`` is the total count rate of each star: the PSF is truncated to a square stamp of
    half-width ``stamp_radius`` pixels and renormalised, so an aperture covering the stamp
    recovers ``flux`` exactly (times the flat) before noise. ``ra``/``dec`` (degrees, ICRS)
    are the true sky positions when the field has been placed on the sky (frames.py does).
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    fwhm_px: float = DEFAULT_FWHM_PX
    psf: str = "moffat"
    beta: float = 2.5
    oversample: int = 5
    filter: str = "Ks"
    stamp_radius: int = field(default=0)
    ra: np.ndarray | None = None
    dec: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.x = np.asarray(self.x, np.float64)
        self.y = np.asarray(self.y, np.float64)
        self.flux = np.asarray(self.flux, np.float64)
        if self.ra is not None and self.dec is not None:
            self.ra = np.asarray(self.ra, np.float64)
            self.dec = np.asarray(self.dec, np.float64)
        if not self.stamp_radius:
            self.stamp_radius = int(math.ceil(5.0 * self.fwhm_px))

    def at(self, x: np.ndarray, y: np.ndarray) -> StarField:
        """The same stars (flux, PSF, sky position) at other pixel positions (another pointing)."""
        return dataclasses.replace(self, x=np.asarray(x, np.float64), y=np.asarray(y, np.float64))

    def __len__(self) -> int:
        return int(self.x.size)

    def stamp(self, xc: float, yc: float) -> tuple[int, int, np.ndarray]:
        """Normalised PSF stamp (sum 1) around (xc, yc): (x0, y0, stamp) with pixel-integrated
        values (``oversample``^2 sub-pixel samples per pixel)."""
        R = self.stamp_radius
        ix, iy = int(round(xc)), int(round(yc))
        n = 2 * R + 1
        os_ = self.oversample
        sub = (np.arange(n * os_) + 0.5) / os_ - 0.5 - R  # sub-pixel centres relative to ix
        dx = sub + (ix - xc)
        dy = sub + (iy - yc)
        prof = _psf_profile(dy[:, None] ** 2 + dx[None, :] ** 2, self.fwhm_px, self.psf, self.beta)
        prof = prof.reshape(n, os_, n, os_).sum(axis=(1, 3))
        prof /= prof.sum()
        return ix - R, iy - R, prof

    def render(self, shape: tuple[int, int], dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
        """Rate image (e-/s per pixel) with the field shifted by (dx, dy) pixels."""
        ny, nx = shape
        image = np.zeros(shape, np.float64)
        for xs, ys, f in zip(self.x + dx, self.y + dy, self.flux, strict=True):
            x0, y0, prof = self.stamp(xs, ys)
            n = prof.shape[0]
            ya, yb = max(y0, 0), min(y0 + n, ny)
            xa, xb = max(x0, 0), min(x0 + n, nx)
            if ya >= yb or xa >= xb:
                continue
            image[ya:yb, xa:xb] += f * prof[ya - y0:yb - y0, xa - x0:xb - x0]
        return image.astype(np.float32)

    def to_json(self, dx: float = 0.0, dy: float = 0.0) -> dict:
        out = {
            "x": [round(float(v), 6) for v in self.x + dx],
            "y": [round(float(v), 6) for v in self.y + dy],
            "flux_e_per_s": [round(float(v), 4) for v in self.flux],
            "psf": self.psf, "fwhm_px": self.fwhm_px, "beta": self.beta,
            "stamp_radius_px": self.stamp_radius, "filter": self.filter,
            "pixel_scale_mas": PIXEL_SCALE_MAS,
        }
        if self.ra is not None and self.dec is not None:
            # Full float64 (JSON round-trips it): 1e-7 deg would already be 0.09 pixel.
            out["ra_deg"] = [float(v) for v in self.ra]
            out["dec_deg"] = [float(v) for v in self.dec]
        return out


def make_star_field(size: int, rng: np.random.Generator, n_stars: int | None = None,
                    flux_range: tuple[float, float] = (30.0, 1.0e5),
                    fwhm_px: float = DEFAULT_FWHM_PX, psf: str = "moffat",
                    filter_name: str = "Ks", margin: float | None = None) -> StarField:
    """Random star field: positions uniform inside the active area (``margin`` px from the
    reference border, default 2 FWHM plus the dither range), fluxes log-uniform in
    ``flux_range`` (e-/s). The default density is ~30 stars per 1024x1024 pixels."""
    active = size - 2 * REFPIX
    if n_stars is None:
        n_stars = max(3, int(round(30 * (active / 1024) ** 2)))
    if margin is None:
        margin = 2 * fwhm_px + max_dither(size)
    margin = min(margin, active / 2 - 1)
    lo, hi = REFPIX + margin, size - REFPIX - 1 - margin
    x = rng.uniform(lo, hi, n_stars)
    y = rng.uniform(lo, hi, n_stars)
    flux = 10 ** rng.uniform(math.log10(flux_range[0]), math.log10(flux_range[1]), n_stars)
    return StarField(x=x, y=y, flux=flux, fwhm_px=fwhm_px, psf=psf, filter=filter_name)


def max_dither(size: int) -> float:
    """Largest dither offset (pixels) used for a detector of ``size``: 1 % of the array."""
    return max(1.0, round(0.01 * size))


DITHER_PATTERN = ((0.0, 0.0), (1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0),
                  (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0), (0.0, -0.5))


def dither_offset(size: int, index: int) -> tuple[float, float]:
    """(dx, dy) pixels of dither position ``index`` (a 9-point box pattern, cycled)."""
    fx, fy = DITHER_PATTERN[index % len(DITHER_PATTERN)]
    step = max_dither(size)
    # A fractional extra so dithers are not whole pixels (sub-pixel sampling of the PSF).
    return (fx * step + 0.25 * (index % 2), fy * step + 0.25 * (index % 3 == 1))


def uniform_rate(shape: tuple[int, int], level: float) -> np.ndarray:
    """A flat illumination of ``level`` e-/s per pixel (dome flat lamp or sky)."""
    return np.full(shape, float(level), np.float32)


def flat_lamp_rate(nreads: int, read_time: float, fill_dn: float = 20000.0, gain: float = 2.0) -> float:
    """Lamp level (e-/s) that brings the last read to ~``fill_dn`` DN above bias (~40 % of the
    ~50k DN signal range): a well-exposed flat that stays linear enough."""
    return fill_dn * gain / (nreads * read_time)
