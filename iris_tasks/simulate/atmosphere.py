"""The atmosphere, the telescope's light grasp and standard stars, in physical units.

What a spectrophotometric calibration needs from a simulated night:

* **Transmission** (:func:`transmission`): the published Maunakea model curve at airmass 1.5
  and 1.6 mm of precipitable water (``iris_tasks/instrument/data/atm_transmission_maunakea.csv``,
  source in its header) turned into an optical depth per airmass and rescaled to the frame's
  airmass (Beer-Lambert, ``T = exp(-X tau)``) and water vapour. The one published curve does
  not say which molecule absorbs where; a band model does the split: the optical depth is
  water's everywhere except in the CO2 (1.575-1.615, 1.955-1.970, 1.995-2.020,
  2.045-2.075 micron) and CH4 (1.630-1.700, 2.200-2.400 micron) bands, where half of it is
  taken as the well-mixed gases' (not scaled with water). An approximation, documented as such
  in docs/telluric.md; the reduction never sees it (it measures the atmosphere from standards).
* **Light grasp** (:func:`photon_density`): F_lambda (erg/s/cm^2/A) -> e-/s per micron through
  the TMT aperture and a smooth telescope + AO + IRIS efficiency (:func:`efficiency`, not flat,
  so the reduction has an instrument response to measure).
* **Standards** (:class:`TelluricStandard`): a hot dwarf as a blackbody of its type's
  temperature with Lorentzian hydrogen (Paschen, Brackett) absorption lines, normalised to its
  magnitude with the Vega zero points (:mod:`iris_tasks.instrument.standards`).
* **Science source** (:class:`PhysicalSource`): a power-law continuum and one emission line.

:func:`ifs_components` turns these into the renderer's spectral components of an IFS
science or telluric frame at the frame's own airmass; :func:`truth_record` is what the truth
file keeps.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from importlib import resources

import numpy as np

from ..instrument.standards import hydrogen_lines, standard_teff, vega_zero_point
from .ifs_optics import SpectralComponent

__all__ = [
    "IMAGER_BANDPASS", "REFERENCE_AIRMASS", "REFERENCE_PWV_MM", "TMT_AREA_CM2", "Atmosphere",
    "PhysicalSource", "TelluricStandard", "efficiency", "ifs_components", "imager_star_rate",
    "photon_density", "transmission", "truth_record",
]

TRANSMISSION_FILE = "atm_transmission_maunakea.csv"
REFERENCE_AIRMASS = 1.5  # of the published curve
REFERENCE_PWV_MM = 1.6
TMT_AREA_CM2 = 6.55e6  # TMT primary: 492 segments, ~655 m^2 of collecting area
HC_ERG_UM = 6.62607015e-27 * 2.99792458e14  # h c in erg micron
# Bands where part of the optical depth is CO2 / CH4 rather than water (micron).
_DRY_BANDS = ((1.575, 1.615), (1.630, 1.700), (1.955, 1.970), (1.995, 2.020), (2.045, 2.075),
              (2.200, 2.400))
_DRY_SHARE = 0.5
# Samples per micron of the continuum grids handed to the renderer: finer than the published
# curve (0.0005 micron), so the renderer's exact row integrals see every feature.
_SAMPLES_PER_UM = 20000


@functools.lru_cache(maxsize=1)
def _published_curve() -> tuple[np.ndarray, np.ndarray]:
    text = resources.files("iris_tasks.instrument.data").joinpath(TRANSMISSION_FILE).read_text()
    rows = [ln.split(",") for ln in text.splitlines()
            if ln.strip() and not ln.startswith("#") and not ln.startswith("wavelength")]
    data = np.array(rows, np.float64)
    return data[:, 0], data[:, 1]


def _dry_share(wave_um: np.ndarray) -> np.ndarray:
    share = np.zeros_like(wave_um)
    for lo, hi in _DRY_BANDS:
        share[(wave_um >= lo) & (wave_um <= hi)] = _DRY_SHARE
    return share


def transmission(wave_um: np.ndarray, airmass: float = 1.0,
                 pwv_mm: float = REFERENCE_PWV_MM) -> np.ndarray:
    """Atmospheric transmission at ``wave_um`` (micron) for ``airmass`` and precipitable water
    ``pwv_mm``: 1 outside 0.90-2.46 micron (the published curve's range here)."""
    if not (math.isfinite(airmass) and airmass >= 1.0):
        raise ValueError(f"airmass must be >= 1, not {airmass}")
    if not (math.isfinite(pwv_mm) and pwv_mm >= 0.0):
        raise ValueError(f"precipitable water must be >= 0 mm, not {pwv_mm}")
    w = np.asarray(wave_um, np.float64)
    cw, ct = _published_curve()
    t_ref = np.interp(w, cw, ct, left=1.0, right=1.0)
    tau = -np.log(np.clip(t_ref, 1e-6, 1.0)) / REFERENCE_AIRMASS
    dry = _dry_share(w)
    tau = tau * (dry + (1.0 - dry) * pwv_mm / REFERENCE_PWV_MM)
    return np.exp(-airmass * tau)


def efficiency(wave_um: np.ndarray) -> np.ndarray:
    """Telescope + AO + IRIS efficiency (e- per photon at the primary): ~25 % with slow
    wiggles of a few per cent (coatings, dichroics, grating blaze) that a lamp flat does not
    record and the telluric standard does."""
    w = np.asarray(wave_um, np.float64)
    return 0.25 * (1.0 + 0.12 * np.sin(2.0 * np.pi * (w - 1.0) / 0.55)
                   + 0.04 * np.cos(2.0 * np.pi * (w - 1.0) / 0.13))


def photon_density(wave_um: np.ndarray, flam: np.ndarray) -> np.ndarray:
    """e-/s per micron detected from F_lambda ``flam`` (erg/s/cm^2/A) at ``wave_um``."""
    w = np.asarray(wave_um, np.float64)
    return np.asarray(flam, np.float64) * 1e4 * TMT_AREA_CM2 * efficiency(w) * w / HC_ERG_UM


def _planck_shape(wave_um: np.ndarray, teff: float) -> np.ndarray:
    """B_lambda(T) up to a constant (lambda in micron)."""
    c2 = 14387.7688  # h c / k in micron K
    w = np.asarray(wave_um, np.float64)
    return w ** -5 / np.expm1(c2 / (w * teff))


@dataclass(frozen=True)
class TelluricStandard:
    """A hot dwarf standard: spectral type (header STDSPTYP), temperature (STDTEFF), magnitude
    (STDMAG) in a Vega-system band (STDMAGBD: J, H or Ks)."""

    sptype: str = "A0V"
    mag: float = 12.0
    band: str = "Ks"
    teff: float | None = None  # None: the type's temperature
    line_depth: float = 0.45  # central depth of the strongest hydrogen lines (Pa-beta, Br-gamma)
    line_fwhm_um: float = 0.0025  # their Lorentzian FWHM at Br-gamma (scales with wavelength)

    @property
    def temperature(self) -> float:
        return float(self.teff) if self.teff is not None else standard_teff(self.sptype)

    def continuum(self, wave_um: np.ndarray) -> np.ndarray:
        """F_lambda (erg/s/cm^2/A) without lines: the blackbody through the magnitude."""
        lam0, f0 = vega_zero_point(self.band)
        shape = _planck_shape(wave_um, self.temperature)
        norm = f0 * 10.0 ** (-0.4 * self.mag) / float(_planck_shape(np.array([lam0]),
                                                                    self.temperature)[0])
        return shape * norm

    def line_profile(self, wave_um: np.ndarray) -> np.ndarray:
        """The hydrogen absorption (1 = no line): Lorentzians, depth falling with the upper
        level beyond n = 7, as the Brackett and Paschen series of an A0 dwarf do."""
        w = np.asarray(wave_um, np.float64)
        lines = hydrogen_lines(float(w.min()) - 0.1, float(w.max()) + 0.1)
        absorb = np.zeros_like(w)
        for lam, n_up in zip(lines.wavelength_um, lines.n_upper, strict=True):
            depth = self.line_depth * min(1.0, 8.0 / float(n_up))
            half = 0.5 * self.line_fwhm_um * lam / 2.1661
            absorb += depth / (1.0 + ((w - lam) / half) ** 2)
        return np.clip(1.0 - absorb, 0.05, 1.0)

    def flam(self, wave_um: np.ndarray) -> np.ndarray:
        return self.continuum(wave_um) * self.line_profile(wave_um)


@dataclass(frozen=True)
class PhysicalSource:
    """The science source: F_lambda = flam_ref (lambda / ref_um)^slope (erg/s/cm^2/A, total
    over the source) and one Gaussian emission line (erg/s/cm^2) at ``line_um``."""

    flam_ref: float = 3.0e-17
    ref_um: float = 2.17
    slope: float = -1.5
    line_um: float = 2.1661
    line_flux: float = 2.0e-17
    line_sigma_um: float = 0.0004

    def continuum(self, wave_um: np.ndarray) -> np.ndarray:
        return self.flam_ref * (np.asarray(wave_um, np.float64) / self.ref_um) ** self.slope


@dataclass(frozen=True)
class Atmosphere:
    """The atmosphere of a simulation and what stands behind it: water vapour, the default
    telluric standard and the science source (FrameSpec.airmass/pwv_mm/standard override).

    ``oh_variation``: relative amplitude of the OH airglow's variation in time (0 = constant).
    The OH lines are split into groups of ``oh_group_um`` in wavelength (a stand-in for the
    vibrational bands, which the line list does not label), each group's intensity
    ``1 + oh_variation sin(2 pi t / oh_period_h + phase)`` with its own phase: minutes apart,
    groups differ by tens of per cent at 0.3.
    """

    pwv_mm: float = REFERENCE_PWV_MM
    standard: TelluricStandard = TelluricStandard()
    source: PhysicalSource = PhysicalSource()
    oh_variation: float = 0.0
    oh_period_h: float = 0.5
    oh_group_um: float = 0.02

    def oh_factors(self, line_um: np.ndarray, hours: float, seed: int = 0) -> np.ndarray:
        """Intensity factor of each OH line at ``hours`` (any clock)."""
        w = np.asarray(line_um, np.float64)
        if self.oh_variation == 0 or w.size == 0:
            return np.ones_like(w)
        group = np.floor(w / self.oh_group_um).astype(np.int64)
        phase = 2.0 * np.pi * ((group * 0.6180339887 + 0.37 * seed) % 1.0)
        return 1.0 + self.oh_variation * np.sin(2.0 * np.pi * hours / self.oh_period_h + phase)


# Imager filters as top hats at their half-power points (micron; MKO-like J, H, Ks, K): the
# simulator's bandpasses, which the reduction never sees (it calibrates on standards).
IMAGER_BANDPASS: dict[str, tuple[float, float]] = {
    "J": (1.17, 1.33), "H": (1.49, 1.78), "Ks": (1.99, 2.31), "K": (2.03, 2.36),
}


def imager_star_rate(standard: TelluricStandard, filter_name: str, airmass: float,
                     pwv_mm: float) -> float:
    """e-/s detected from ``standard`` through imager filter ``filter_name`` at ``airmass``."""
    try:
        lo, hi = IMAGER_BANDPASS[filter_name]
    except KeyError:
        raise ValueError(f"no bandpass for imager filter {filter_name!r} (known: "
                         f"{', '.join(IMAGER_BANDPASS)})") from None
    w = _grid((lo, hi))
    density = photon_density(w, standard.flam(w)) * transmission(w, airmass, pwv_mm)
    return float(np.trapezoid(density, w))


def _grid(band_edges: tuple[float, float]) -> np.ndarray:
    lo, hi = band_edges
    n = max(2, int(math.ceil((hi - lo) * _SAMPLES_PER_UM)) + 1)
    return np.linspace(lo, hi, n)


def ifs_components(kind: str, spatial: np.ndarray, band_edges: tuple[float, float],
                   sky: list[SpectralComponent], *, airmass: float, pwv_mm: float,
                   standard: TelluricStandard | None = None,
                   source: PhysicalSource | None = None) -> list[SpectralComponent]:
    """Renderer components (e-/s per micron per unit of ``spatial``) of an IFS ``science`` or
    ``telluric`` frame seen through the atmosphere at ``airmass``, plus the ``sky`` components
    (airglow, not absorbed). ``spatial``: the source's or the star's map on the field."""
    w = _grid(band_edges)
    t = transmission(w, airmass, pwv_mm)
    if kind == "telluric":
        star = standard or TelluricStandard()
        comp = SpectralComponent(np.asarray(spatial, np.float64), w,
                                 photon_density(w, star.flam(w)) * t)
        return [comp, *sky]
    if kind == "science":
        src = source or PhysicalSource()
        lam = np.array([src.line_um])
        line_e = (src.line_flux * TMT_AREA_CM2 * efficiency(lam) * lam / HC_ERG_UM
                  * transmission(lam, airmass, pwv_mm))
        comp = SpectralComponent(np.asarray(spatial, np.float64), w,
                                 photon_density(w, src.continuum(w)) * t, line_um=lam,
                                 line_flux=line_e, line_sigma_um=np.array([src.line_sigma_um]))
        return [comp, *sky]
    raise ValueError(f"no atmospheric model for IFS frame kind {kind!r} (science, telluric)")


def truth_record(kind: str, band_edges: tuple[float, float], *, airmass: float, pwv_mm: float,
                 standard: TelluricStandard | None = None,
                 source: PhysicalSource | None = None) -> dict:
    """JSON-able truth: the conditions, the object's definition and the transmission on a
    0.001 micron grid over the band (for plots and scoring)."""
    w = np.arange(band_edges[0], band_edges[1], 0.001)
    out = {"airmass": float(airmass), "pwv_mm": float(pwv_mm),
           "transmission_source": f"iris_tasks/instrument/data/{TRANSMISSION_FILE} "
                                  f"(airmass {REFERENCE_AIRMASS}, {REFERENCE_PWV_MM} mm) "
                                  "rescaled; water/dry split by band model",
           "transmission_wave_um": [round(float(v), 4) for v in w],
           "transmission": [round(float(v), 5) for v in transmission(w, airmass, pwv_mm)],
           "collecting_area_cm2": TMT_AREA_CM2}
    if kind == "telluric" and standard is not None:
        out["standard"] = {**asdict(standard), "teff_used": standard.temperature}
    if kind == "science" and source is not None:
        out["source_physical"] = asdict(source)
    return out
