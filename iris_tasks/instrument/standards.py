"""What is published about telluric/photometric standard stars: hydrogen line wavelengths,
Vega-system zero points, and the temperatures of the hot dwarfs used as standards.

Data files (``iris_tasks/instrument/data``, each with its source in its ``#`` header):

``hydrogen_lines.csv``
    H I Paschen and Brackett vacuum wavelengths (Rydberg formula, CODATA 2018 constants).
``vega_zero_points.csv``
    Cohen, Wheaton & Megeath 2003 (AJ 126, 1090) 2MASS J/H/Ks zero points.
``extinction_maunakea.csv``
    Typical Maunakea extinction in J/H/Ks (UKIRT, MKO-NIR filters), for the imager zero points.

Both the simulator (which makes standard stars) and the telluric builder (which divides by
their model) read them; nothing here is fitted to data.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources

import numpy as np

__all__ = [
    "EXTINCTION_SOURCE", "STANDARD_TEFF", "HydrogenLines", "extinction_coefficient", "filter_band",
    "hydrogen_lines", "standard_teff", "vega_zero_point",
]

_DATA_PACKAGE = "iris_tasks.instrument.data"

# Effective temperature (K) of the main-sequence spectral types usable as telluric standards
# in the near-infrared: a featureless continuum apart from hydrogen lines. Rounded values of
# the dwarf temperature scale of Pecaut & Mamajek 2013 (ApJS 208, 9). Cooler stars have metal
# lines a blackbody model does not describe; hotter ones helium lines.
STANDARD_TEFF: dict[str, float] = {
    "B9V": 10500.0, "A0V": 9700.0, "A1V": 9300.0, "A2V": 8800.0, "A3V": 8600.0,
}

# IRIS filter (imager or IFS) -> the photometric band its zero point is taken from.
_FILTER_BAND = {"J": "J", "JBB": "J", "JN1": "J", "H": "H", "HBB": "H", "K": "Ks", "KS": "Ks",
                "KBB": "Ks"}


@dataclass(frozen=True)
class HydrogenLines:
    """Hydrogen lines: vacuum wavelength (micron), name (Pa-beta, Br-gamma, Br12...), levels."""

    wavelength_um: np.ndarray
    name: tuple[str, ...]
    n_lower: np.ndarray
    n_upper: np.ndarray

    def __len__(self) -> int:
        return int(self.wavelength_um.size)


def _rows(filename: str) -> list[dict[str, str]]:
    text = resources.files(_DATA_PACKAGE).joinpath(filename).read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return list(csv.DictReader(lines))


@functools.lru_cache(maxsize=1)
def _all_hydrogen() -> HydrogenLines:
    rows = _rows("hydrogen_lines.csv")
    return HydrogenLines(np.array([float(r["wavelength_um_vacuum"]) for r in rows]),
                         tuple(r["name"] for r in rows),
                         np.array([int(r["n_lower"]) for r in rows]),
                         np.array([int(r["n_upper"]) for r in rows]))


def hydrogen_lines(lo_um: float = 0.0, hi_um: float = np.inf) -> HydrogenLines:
    """Paschen and Brackett lines with ``lo_um <= wavelength <= hi_um`` (vacuum micron)."""
    h = _all_hydrogen()
    sel = (h.wavelength_um >= lo_um) & (h.wavelength_um <= hi_um)
    return HydrogenLines(h.wavelength_um[sel], tuple(np.asarray(h.name)[sel]), h.n_lower[sel],
                         h.n_upper[sel])


def filter_band(filter_name: str) -> str:
    """The zero-point band (J, H, Ks) of an IRIS filter such as Kbb or Ks; ValueError if none."""
    key = str(filter_name or "").strip().upper()
    try:
        return _FILTER_BAND[key]
    except KeyError:
        raise ValueError(f"no photometric zero point for filter {filter_name!r} (known: "
                         f"{', '.join(sorted(_FILTER_BAND))})") from None


@functools.lru_cache(maxsize=1)
def _zero_points() -> dict[str, tuple[float, float]]:
    return {r["band"]: (float(r["wavelength_um"]), float(r["flam_erg_s_cm2_A"]))
            for r in _rows("vega_zero_points.csv")}


def vega_zero_point(band: str) -> tuple[float, float]:
    """(isophotal wavelength in micron, F_lambda of magnitude 0 in erg/s/cm^2/A) of ``band``
    (J, H, Ks; K means Ks; an IRIS filter name is mapped with :func:`filter_band`)."""
    zp = _zero_points()
    name = str(band).strip()
    if name not in zp:
        name = filter_band(name)
    return zp[name]


EXTINCTION_SOURCE = "UKIRT MKO-NIR average (extinction_maunakea.csv)"


@functools.lru_cache(maxsize=1)
def _extinction() -> dict[str, float]:
    return {r["band"]: float(r["k_mag_per_airmass"]) for r in _rows("extinction_maunakea.csv")}


def extinction_coefficient(band: str) -> float:
    """Typical Maunakea extinction (mag per airmass) in ``band`` (J, H, Ks; a filter name is
    mapped to its band), from ``extinction_maunakea.csv`` (UKIRT's MKO-NIR averages)."""
    try:
        key = filter_band(band)
    except ValueError:
        key = band
    try:
        return _extinction()[key]
    except KeyError:
        raise ValueError(f"no extinction coefficient for band {band!r} (known: "
                         f"{', '.join(_extinction())})") from None


def standard_teff(sptype: str) -> float:
    """Effective temperature of a standard's spectral type (``A0V``...); ValueError naming the
    usable types for any other (a cool star is not a blackbody with hydrogen lines)."""
    key = str(sptype or "").strip().upper().replace(" ", "")
    if key not in STANDARD_TEFF:
        raise ValueError(f"spectral type {sptype!r} is not a telluric standard this model "
                         f"describes (a hot dwarf: {', '.join(STANDARD_TEFF)})")
    return STANDARD_TEFF[key]
