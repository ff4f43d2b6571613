"""Published emission-line lists of the IFS calibration lamps and of the night sky.

The arc lamps of IRIS (Ar, Kr, Ne, Xe) and the OH airglow give the lines a wavelength
solution is fitted to. Both the simulator (which puts the lines into arc and sky frames) and
the wavelength-calibration builder (which identifies them) read the same published lists, so
that neither invents the other's wavelengths.

Data files (``iris_tasks/instrument/data``; ``README.md`` there names every source):

``arc_ArI.csv``, ``arc_KrI.csv``, ``arc_NeI.csv``, ``arc_XeI.csv``
    NIST Atomic Spectra Database lines of the neutral atoms, 0.90-2.46 micron.
``oh_lines.csv``
    Rousselot et al. 2000 (A&A 354, 1134) OH lines, 0.90-2.46 micron.

Every file is CSV with ``#`` comment lines naming its source and the columns
``wavelength_um_vacuum, intensity, species`` (more columns are allowed and ignored).
Wavelengths are in vacuum, micron; intensities are relative within one file.
"""

from __future__ import annotations

import csv
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["LAMP_SPECIES", "LineList", "arc_lines", "line_file_source", "oh_lines"]

# Lamp name (as in the LAMPS keyword) -> species of the line list it lights.
LAMP_SPECIES: dict[str, str] = {"Ar": "ArI", "Kr": "KrI", "Ne": "NeI", "Xe": "XeI"}
_DATA_PACKAGE = "iris_tasks.instrument.data"


@dataclass(frozen=True)
class LineList:
    """Emission lines: vacuum wavelengths (micron), relative intensities, species, source.

    Sorted by wavelength. ``source`` names the publication(s) / database(s) the lines come
    from (one line per file when lists are combined).
    """

    wavelength_um: np.ndarray  # (n,) float64, vacuum micron, increasing
    intensity: np.ndarray  # (n,) float64, relative
    species: np.ndarray  # (n,) str
    source: str

    def __post_init__(self) -> None:
        n = len(self.wavelength_um)
        if len(self.intensity) != n or len(self.species) != n:
            raise ValueError("LineList: wavelength_um, intensity and species differ in length")

    def __len__(self) -> int:
        return int(len(self.wavelength_um))

    def between(self, lo_um: float, hi_um: float) -> LineList:
        """The lines with ``lo_um <= wavelength <= hi_um``."""
        keep = (self.wavelength_um >= lo_um) & (self.wavelength_um <= hi_um)
        return LineList(self.wavelength_um[keep], self.intensity[keep], self.species[keep],
                        self.source)

    def strongest(self, n: int) -> LineList:
        """The ``n`` most intense lines (still sorted by wavelength)."""
        if n >= len(self):
            return self
        keep = np.sort(np.argsort(self.intensity, kind="stable")[::-1][:n])
        return LineList(self.wavelength_um[keep], self.intensity[keep], self.species[keep],
                        self.source)


def _read_only(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=16)
def _load(filename: str) -> LineList:
    """Read one data file (cached; the arrays are read-only)."""
    try:
        text = resources.files(_DATA_PACKAGE).joinpath(filename).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"line list {filename!r} is not installed in "
                                f"{_DATA_PACKAGE}") from None
    comments = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("#")]
    rows = csv.DictReader(ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))
    required = {"wavelength_um_vacuum", "intensity", "species"}
    if rows.fieldnames is None or not required <= set(rows.fieldnames):
        raise ValueError(f"line list {filename!r}: columns {rows.fieldnames} lack "
                         f"{sorted(required)}")
    wave, inten, species = [], [], []
    for row in rows:
        wave.append(float(row["wavelength_um_vacuum"]))
        inten.append(float(row["intensity"]))
        species.append(row["species"].strip())
    # the provenance: from the "Source:" comment up to the "Retrieved" date, on one line
    start = next((k for k, c in enumerate(comments) if c.lower().startswith("source:")), None)
    if start is None:
        raise ValueError(f"line list {filename!r} names no source (a '# Source:' header line)")
    stop = next((k for k, c in enumerate(comments) if c.lower().startswith("retrieved")),
                len(comments) - 1)
    source = " ".join(comments[start:stop + 1])
    order = np.argsort(wave, kind="stable")
    return LineList(_read_only(np.asarray(wave, np.float64)[order]),
                    _read_only(np.asarray(inten, np.float64)[order]),
                    _read_only(np.asarray(species, dtype=str)[order]),
                    f"{filename}: {source}")


def line_file_source(filename: str) -> list[str]:
    """The header comment lines of a data file (its full provenance)."""
    text = resources.files(_DATA_PACKAGE).joinpath(filename).read_text(encoding="utf-8")
    return [ln[1:].strip() for ln in text.splitlines() if ln.startswith("#")]


def _combine(lists: list[LineList]) -> LineList:
    if not lists:
        return LineList(np.zeros(0), np.zeros(0), np.zeros(0, dtype=str), "")
    wave = np.concatenate([ll.wavelength_um for ll in lists])
    order = np.argsort(wave, kind="stable")
    return LineList(wave[order], np.concatenate([ll.intensity for ll in lists])[order],
                    np.concatenate([ll.species for ll in lists])[order],
                    "\n".join(ll.source for ll in lists))


def arc_lines(lamps: Iterable[str], lo_um: float, hi_um: float) -> LineList:
    """Vacuum lines of the arc ``lamps`` (any of Ar, Kr, Ne, Xe) between ``lo_um`` and ``hi_um``.

    ``lamps`` may also be one LAMPS-keyword string such as ``"Ar,Kr,Ne,Xe"``. Intensities are
    the published relative intensities, each on its own list's scale.
    """
    if isinstance(lamps, str):
        lamps = [p for p in lamps.replace(" ", ",").split(",") if p]
    lists = []
    for lamp in lamps:
        name = str(lamp).strip().capitalize()
        if name not in LAMP_SPECIES:
            raise ValueError(f"unknown arc lamp {lamp!r}; expected some of "
                             f"{', '.join(LAMP_SPECIES)}")
        lists.append(_load(f"arc_{LAMP_SPECIES[name]}.csv").between(lo_um, hi_um))
    return _combine(lists)


def oh_lines(lo_um: float, hi_um: float) -> LineList:
    """OH night-sky lines (Rousselot et al. 2000, vacuum) between ``lo_um`` and ``hi_um``."""
    return _load("oh_lines.csv").between(lo_um, hi_um)
