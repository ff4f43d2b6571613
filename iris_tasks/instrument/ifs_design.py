"""The nominal (optical-design) layout of the IRIS IFS on its detector.

An optical design predicts where each spaxel's spectrum falls and which wavelength reaches
which row; the as-built instrument departs from it by distortions of a pixel or so, a
dispersion that is not exactly linear, a PSF that is not exactly the design's, and flexure
that moves everything by tenths of a pixel during the night. The pipeline learns those from
calibration frames (``iris_tasks.ifs`` builders) and uses this module only as the starting
point of its searches (where to look for a trace, which arc line to expect near which row).

Layouts, both sized to the detector (so that 128-pixel test frames and 4096-pixel frames share
one description):

LENSLET
    A grid of short spectra, one per lenslet, dispersed along +y (about one wavelength bin per
    detector row) and tilted in x by ~1.5 pixels over their length; lenslets on a pitch of
    >= 6 columns; the rows of spectra bow by up to 0.3 pixel across the field.
SLICER
    Slices side by side in x, separated by a gap of 4 columns; the spaxels of one slice sit in
    adjacent columns (one column apart) and their spectra run down the whole active height,
    with a small smile (0.4 pixel) and a monochromatic slit image tilted by 0.5 pixel across
    the slice.

Coordinates are 0-based detector pixel centres; ``trace_x/y[j, i, k]`` is where spaxel
(row j, column i) at the nominal wavelength ``wavelength[k]`` lands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["IFS_BANDS", "MODE_SCALES", "REFPIX", "IfsDesign", "band", "nominal_design"]

# Broad-band IFS filters (micron): the spectra span the band.
IFS_BANDS: dict[str, tuple[float, float]] = {
    "Zbb": (0.928, 1.121), "Jbb": (1.180, 1.416), "Hbb": (1.473, 1.803), "Kbb": (1.965, 2.381),
}
# Plate scales (mas) of each mode.
MODE_SCALES: dict[str, tuple[str, ...]] = {"LENSLET": ("4", "9"), "SLICER": ("25", "50")}
REFPIX = 4  # reference-pixel border of the H4RG
_MARGIN = 3  # design clearance between the outermost spectra and the reference pixels
SLICE_GAP = 4  # columns between two slices


def band(filter_name: str) -> tuple[float, float]:
    """(blue, red) edge of an IFS filter in micron."""
    try:
        return IFS_BANDS[filter_name]
    except KeyError:
        raise ValueError(f"unknown IFS filter {filter_name!r}; expected one of "
                         f"{', '.join(IFS_BANDS)}") from None


@dataclass(frozen=True)
class IfsDesign:
    """The design layout of one IFS configuration on a ``size`` x ``size`` detector."""

    mode: str
    scale: str
    filter: str
    size: int
    trace_x: np.ndarray  # (ny_s, nx_s, nwave) float64, design column of each sample
    trace_y: np.ndarray  # (ny_s, nx_s, nwave) float64, design row
    wavelength: np.ndarray  # (nwave,) micron, linear: one bin per row
    psf_sigma: float  # design Gaussian sigma of the cross-dispersion core (pixels)
    pitch: float  # columns between neighbouring spaxels of a row of spectra / of a slice
    spectrum_rows: int  # rows between two lenslet spectra one above the other (LENSLET)

    @property
    def cube_shape(self) -> tuple[int, int, int]:
        ny_s, nx_s, nw = self.trace_x.shape
        return (nw, ny_s, nx_s)

    @property
    def dispersion(self) -> float:
        """Design micron per detector row."""
        return float(self.wavelength[1] - self.wavelength[0])

    @property
    def spaxel_scale_arcsec(self) -> float:
        return float(self.scale) / 1000.0

    def row_of(self, wavelength_um: np.ndarray | float) -> np.ndarray:
        """Design offset (rows) of ``wavelength_um`` from the sample k = 0 of each spectrum
        (fractional k; add ``trace_y[..., 0]`` for the detector row)."""
        return (np.asarray(wavelength_um, np.float64) - self.wavelength[0]) / self.dispersion


def nominal_design(mode: str, size: int, filter_name: str = "Kbb",
                   scale: str | None = None) -> IfsDesign:
    """The design layout of ``mode`` (LENSLET/SLICER) with ``filter_name`` on ``size``^2."""
    mode = str(mode).upper()
    if mode not in MODE_SCALES:
        raise ValueError(f"unknown IFS mode {mode!r}; expected LENSLET or SLICER")
    scale = str(scale or MODE_SCALES[mode][0])
    lo, hi = band(filter_name)
    active = int(size) - 2 * REFPIX
    usable = active - 2 * _MARGIN
    if usable < 16:
        raise ValueError(f"a {size}-pixel detector is too small for the IFS layout")
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
        x0 = REFPIX + _MARGIN + 1 + i * pitch
        y0 = REFPIX + _MARGIN + j * dy
        bow = 0.3 * np.sin(np.pi * (i + 0.5) / nx_s)
        trace_x = x0 + tilt * k + 0 * j
        trace_y = y0 + k + bow
        sigma = 1.0
        rows = dy
    else:
        nx_s = int(min(88, max(6, active // 4 - 3)))
        width = nx_s + SLICE_GAP
        ny_s = int(min(45, max(1, usable // width)))
        length = usable - 2
        k = np.arange(length, dtype=np.float64)
        j = np.arange(ny_s, dtype=np.float64)[:, None, None]
        i = np.arange(nx_s, dtype=np.float64)[None, :, None]
        x0 = REFPIX + _MARGIN + 1 + j * width + i
        smile = 0.4 * ((k - length / 2) / (length / 2)) ** 2
        trace_x = x0 + smile
        trace_y = REFPIX + _MARGIN + 1 + k + 0.5 * (i / max(1, nx_s - 1) - 0.5) + 0 * j
        sigma = 0.6
        pitch = 1
        rows = 0
    shape = (ny_s, nx_s, length)
    wavelength = np.linspace(lo, hi, length)
    tx = np.ascontiguousarray(np.broadcast_to(trace_x, shape), dtype=np.float64)
    ty = np.ascontiguousarray(np.broadcast_to(trace_y, shape), dtype=np.float64)
    tx.setflags(write=False)
    ty.setflags(write=False)
    wavelength.setflags(write=False)
    return IfsDesign(mode=mode, scale=scale, filter=filter_name, size=int(size), trace_x=tx,
                     trace_y=ty, wavelength=wavelength, psf_sigma=sigma, pitch=float(pitch),
                     spectrum_rows=int(rows))


def fwhm_to_sigma(fwhm: float) -> float:
    return fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
