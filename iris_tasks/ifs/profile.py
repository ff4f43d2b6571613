"""The cross-dispersion profile of the IFS spectra: how a sample's flux spreads over columns.

A cube sample centred at detector column ``x`` puts the fraction ``w_b`` of its flux in column
``rint(x) - half + b`` (``b = 0 .. nb - 1``, ``nb = 2 half + 1``), the profile integrated over
each pixel. ``w`` depends on the sub-pixel phase ``x - rint(x)`` (in [-0.5, 0.5]) and, for an
as-built instrument, on where on the detector the sample falls (the PSF changes across the
field and with wavelength).

:class:`CrossProfile` holds it as a table ``(nzy, nzx, nb, nphase)``: one pixel-integrated
profile per zone of the detector (zone centres ``zone_y`` x ``zone_x``) and per phase node
``-0.5 + p / (nphase - 1)``. A sample's weights are the table interpolated linearly in phase and
bilinearly between the zone centres (clamped at the outer centres). Every (zone, phase) column
sums to 1 over ``b``: the profile is a fraction of the sample's flux, whatever the throughput.

The ``ifstrace`` reference (model version 2, IFSMVER = 2) stores the table as PROFILE with
PROF_ZY / PROF_ZX; a version-1 reference has only the Gaussian sigma PSFSIG, which
:meth:`CrossProfile.gaussian` turns into the table the extraction has always used (truncated
at ``ceil(4 sigma)`` columns and renormalised). See docs/ifs.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import erf

log = logging.getLogger(__name__)

__all__ = ["FINE_PHASES", "CrossProfile"]

# Phase nodes of the Gaussian table a version-1 reference (PSFSIG only) is extracted with: the
# extraction's historical table (1/16384 pixel; linear interpolation within ~1e-9 of the erf
# values), so a v1 trace gives the same cube, bit for bit, as before profiles existed.
FINE_PHASES = 16385

# |sum over b - 1| allowed in a table handed in (a float32 PROFILE read from a file is ~1e-7
# off; anything larger is a table that was not normalised). The accepted table is then
# normalised exactly.
_SUM_TOL = 1e-4

# Samples per chunk of :meth:`CrossProfile.weights` (bounds its temporaries to ~10 (n, nb)
# float64 arrays of this length).
_CHUNK = 1 << 18


def _zone_axis(centres: np.ndarray, name: str, size: int) -> np.ndarray:
    c = np.array(centres, dtype=np.float64).reshape(-1)
    if c.size != size:
        raise ValueError(f"{name} has {c.size} zone centres but the table has {size} zones "
                         "along that axis")
    if not np.isfinite(c).all():
        raise ValueError(f"{name} contains NaN or infinite zone centres")
    if c.size > 1 and not np.all(np.diff(c) > 0):
        raise ValueError(f"{name} must be strictly increasing, got {c.tolist()[:8]}...")
    c.setflags(write=False)
    return c


def _locate(centres: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lower zone index, fraction towards the next zone) of positions ``v``, clamped to the
    outer centres (fraction 0 or 1 beyond them)."""
    nz = centres.size
    lower = np.searchsorted(centres, v, side="right") - 1
    np.clip(lower, 0, nz - 2, out=lower)
    left = centres[lower]
    frac = (v - left) / (centres[lower + 1] - left)
    np.clip(frac, 0.0, 1.0, out=frac)
    return lower, frac


@dataclass(frozen=True, eq=False)
class CrossProfile:
    """Pixel-integrated cross-dispersion profile per detector zone and sub-pixel phase.

    ``table[zy, zx, b, p]``: fraction of a sample's flux in column ``rint(x) - half + b`` when
    the sample sits at phase ``x - rint(x) = -0.5 + p / (nphase - 1)`` in zone (zy, zx); sums
    to 1 over ``b``. ``zone_y`` / ``zone_x``: detector row / column of the zone centres
    (increasing). The constructor checks the table (shape, finite, non-negative, sums within
    1e-4 of 1) and stores a float64 copy normalised to sum 1 exactly.
    """

    table: np.ndarray  # (nzy, nzx, nb, nphase) float64
    zone_y: np.ndarray  # (nzy,) detector rows of the zone centres, increasing
    zone_x: np.ndarray  # (nzx,) detector columns of the zone centres, increasing

    def __post_init__(self) -> None:
        t = np.array(self.table, dtype=np.float64)  # own copy, native byte order
        if t.ndim != 4:
            raise ValueError(f"profile table must be 4-D (nzy, nzx, nb, nphase), got shape "
                             f"{t.shape}")
        nzy, nzx, nb, nphase = t.shape
        if nzy < 1 or nzx < 1:
            raise ValueError(f"profile table has no zones: shape {t.shape}")
        if nb < 1 or nb % 2 == 0:
            raise ValueError(f"profile table needs an odd number of columns (nb = 2 half + 1), "
                             f"got nb={nb}")
        if nphase < 2:
            raise ValueError(f"profile table needs at least 2 phase nodes, got {nphase}")
        if not np.isfinite(t).all():
            raise ValueError("profile table contains NaN or infinite values")
        if t.min() < 0:
            where = np.unravel_index(int(np.argmin(t)), t.shape)
            raise ValueError(f"profile table has negative values (min {t.min():.3g} at zone "
                             f"({where[0]}, {where[1]}), column {where[2]}, phase node "
                             f"{where[3]}); a flux fraction cannot be negative")
        sums = t.sum(axis=2)
        worst = float(np.max(np.abs(sums - 1.0)))
        if worst > _SUM_TOL:
            where = np.unravel_index(int(np.argmax(np.abs(sums - 1.0))), sums.shape)
            raise ValueError(f"profile table columns must sum to 1 over b; zone "
                             f"({where[0]}, {where[1]}) phase node {where[2]} sums to "
                             f"{sums[where]:.6g}")
        if worst > 0:
            t /= sums[:, :, None, :]
        t.setflags(write=False)
        object.__setattr__(self, "table", t)
        object.__setattr__(self, "zone_y", _zone_axis(self.zone_y, "zone_y", nzy))
        object.__setattr__(self, "zone_x", _zone_axis(self.zone_x, "zone_x", nzx))

    # ------------------------------------------------------------------ shape
    @property
    def nb(self) -> int:
        return int(self.table.shape[2])

    @property
    def half(self) -> int:
        return (self.nb - 1) // 2

    @property
    def nphase(self) -> int:
        return int(self.table.shape[3])

    @property
    def zones(self) -> tuple[int, int]:
        return int(self.table.shape[0]), int(self.table.shape[1])

    def __repr__(self) -> str:
        nzy, nzx = self.zones
        return (f"CrossProfile(zones={nzy}x{nzx}, nb={self.nb}, nphase={self.nphase}, "
                f"rows {self.zone_y[0]:.1f}..{self.zone_y[-1]:.1f}, "
                f"columns {self.zone_x[0]:.1f}..{self.zone_x[-1]:.1f})")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def gaussian(cls, sigma: float, half: int | None = None, nphase: int = 257
                 ) -> CrossProfile:
        """The pixel-integrated Gaussian of width ``sigma`` over the ``2 half + 1`` columns
        around ``rint(x)`` (``half = ceil(4 sigma)`` by default), truncated there and
        renormalised: the extraction's model of a version-1 ``ifstrace`` (PSFSIG). One zone.
        ``nphase = FINE_PHASES`` reproduces the historical table exactly."""
        sigma = float(sigma)
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"psf_sigma must be positive, got {sigma!r}")
        if half is None:
            half = int(math.ceil(4.0 * sigma))
        half = int(half)
        if half < 0:
            raise ValueError(f"half must be >= 0, got {half}")
        nphase = int(nphase)
        if nphase < 2:
            raise ValueError(f"nphase must be >= 2, got {nphase}")
        phi = np.linspace(-0.5, 0.5, nphase)
        s2 = math.sqrt(2.0) * sigma
        edges = (np.arange(-half, half + 2) - 0.5)[None, :] - phi[:, None]
        w = 0.5 * np.diff(erf(edges / s2), axis=1)
        w /= w.sum(axis=1, keepdims=True)
        return cls._trusted(w.T[None, None], np.zeros(1), np.zeros(1))

    @classmethod
    def _trusted(cls, table: np.ndarray, zone_y: np.ndarray, zone_x: np.ndarray
                 ) -> CrossProfile:
        """Built without the constructor's renormalisation (the table is normalised by
        construction; dividing again would move its values by an ulp)."""
        self = object.__new__(cls)
        t = np.ascontiguousarray(table, dtype=np.float64)
        t.setflags(write=False)
        object.__setattr__(self, "table", t)
        object.__setattr__(self, "zone_y", _zone_axis(zone_y, "zone_y", t.shape[0]))
        object.__setattr__(self, "zone_x", _zone_axis(zone_x, "zone_x", t.shape[1]))
        return self

    @classmethod
    def from_model(cls, trace_model: Any) -> CrossProfile:
        """The profile of an ``ifstrace`` reference: its PROFILE table (with PROF_ZY/PROF_ZX)
        when it has one (model version 2), else the Gaussian of its PSFSIG with the
        historical fine phase table (version 1: the extraction is unchanged).

        Raises ValueError naming the file when the table is unusable.
        """
        name = getattr(getattr(trace_model, "meta", None), "filename", None) or "<ifstrace>"
        table = _optional(trace_model, "profile")
        if table is None:
            sigma = getattr(trace_model.meta, "psf_sigma", None)
            if sigma is None or not np.isfinite(sigma) or sigma <= 0:
                raise ValueError(f"{name}: no PROFILE and PSFSIG={sigma!r}; the extraction "
                                 "needs one of them")
            version = getattr(trace_model.meta, "model_version", None)
            if version is not None and int(version) >= 2:
                log.warning("%s: IFSMVER=%s but no PROFILE; using the Gaussian PSFSIG=%.4g",
                            name, version, float(sigma))
            return cls.gaussian(float(sigma), nphase=FINE_PHASES)
        table = np.asarray(table)
        zy = _optional(trace_model, "profile_y")
        zx = _optional(trace_model, "profile_x")
        if table.ndim == 4:
            # a single zone along an axis needs no centre
            if zy is None and table.shape[0] == 1:
                zy = np.zeros(1)
            if zx is None and table.shape[1] == 1:
                zx = np.zeros(1)
        if zy is None or zx is None:
            raise ValueError(f"{name}: PROFILE {table.shape} without its zone centres "
                             f"(PROF_ZY {'missing' if zy is None else 'present'}, PROF_ZX "
                             f"{'missing' if zx is None else 'present'})")
        try:
            return cls(table=table, zone_y=zy, zone_x=zx)
        except ValueError as exc:
            raise ValueError(f"{name}: PROFILE: {exc}") from None

    def to_model(self, trace_model: Any) -> None:
        """Write PROFILE (float32, as the schema stores it), PROF_ZY and PROF_ZX."""
        trace_model.profile = self.table.astype(np.float32)
        trace_model.profile_y = np.array(self.zone_y, dtype=np.float64)
        trace_model.profile_x = np.array(self.zone_x, dtype=np.float64)

    # ------------------------------------------------------------------ evaluation
    def _phase_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, slopes), each (nzones * nphase, nb): row ``zone * nphase + p`` holds the
        nb weights at phase node p (contiguous, so a sample's weights are one row gather);
        the slope to the next node, 0 at the last node."""
        cached = self.__dict__.get("_tables")
        if cached is None:
            nzy, nzx, nb, nphase = self.table.shape
            values = np.ascontiguousarray(
                self.table.reshape(nzy * nzx, nb, nphase).transpose(0, 2, 1))
            slopes = np.zeros_like(values)
            slopes[:, :-1] = np.diff(values, axis=1)
            cached = (values.reshape(-1, nb), slopes.reshape(-1, nb))
            object.__setattr__(self, "_tables", cached)
        return cached

    def weights(self, x: np.ndarray, y: np.ndarray, *, renormalise: bool | None = None,
                out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(first column (n,) int64, weights (n, nb) float64) of samples centred at (x, y).

        The weights are the table interpolated linearly in phase (``x - rint(x)``) and
        bilinearly between the zone centres (clamped outside them), then renormalised to sum
        1 (``renormalise=None``: only when zones are blended - interpolating in phase alone
        keeps the sum to round-off, and skipping the division keeps the one-zone table's
        values bit for bit). Columns that fall off the detector are the caller's business.
        """
        xa = np.asarray(x, dtype=np.float64).reshape(-1)
        ya = np.asarray(y, dtype=np.float64).reshape(-1)
        if xa.shape != ya.shape:
            raise ValueError(f"x {np.shape(x)} and y {np.shape(y)} must have the same size")
        n, nb = xa.size, self.nb
        if out is None:
            out = np.empty((n, nb), np.float64)
        elif out.shape != (n, nb) or out.dtype != np.float64:
            raise ValueError(f"out must be a ({n}, {nb}) float64 array")
        first = np.empty(n, np.int64)
        for lo in range(0, n, _CHUNK):
            hi = min(n, lo + _CHUNK)
            first[lo:hi] = self._weights_chunk(xa[lo:hi], ya[lo:hi], out[lo:hi], renormalise)
        return first, out

    def _weights_chunk(self, x: np.ndarray, y: np.ndarray, out: np.ndarray,
                       renormalise: bool | None, slope_only: bool = False) -> np.ndarray:
        values, slopes = self._phase_tables()
        nzy, nzx = self.zones
        nphase = self.nphase
        xr = np.rint(x)
        first = xr.astype(np.int64) - self.half
        # phase node and fraction, as the historical Gaussian table did it (truncation of a
        # non-negative position; the last node has slope 0)
        pos = x - xr
        pos += 0.5
        pos *= nphase - 1
        node = pos.astype(np.int64)
        np.clip(node, 0, nphase - 1, out=node)
        frac = pos - node
        frac = frac[:, None]
        corners: list[tuple[np.ndarray, np.ndarray | None]] = []
        if nzy == 1 and nzx == 1:
            corners.append((node, None))
        else:
            if nzy > 1:
                iy, ty = _locate(self.zone_y, y)
                ys = [(iy, 1.0 - ty), (iy + 1, ty)]
            else:
                ys = [(np.zeros(x.size, np.int64), None)]
            if nzx > 1:
                ix, tx = _locate(self.zone_x, x)
                xs = [(ix, 1.0 - tx), (ix + 1, tx)]
            else:
                xs = [(np.zeros(x.size, np.int64), None)]
            for zy, wy in ys:
                for zx, wxz in xs:
                    w = wy if wxz is None else (wxz if wy is None else wy * wxz)
                    corners.append(((zy * nzx + zx) * nphase + node, w))
        for c, (rows, cw) in enumerate(corners):
            if slope_only:
                val = np.take(slopes, rows, axis=0)
                val *= nphase - 1
            else:
                val = np.take(values, rows, axis=0)
                val += frac * np.take(slopes, rows, axis=0)
            if cw is not None:
                val *= cw[:, None]
            if c == 0:
                out[...] = val
            else:
                out += val
        if renormalise is None:
            renormalise = len(corners) > 1
        if renormalise and not slope_only:
            total = out.sum(axis=1, keepdims=True)
            np.divide(out, total, out=out, where=total > 0)
        return first

    def sigma_equivalent(self) -> float:
        """rms width (pixels) of the profile at phase 0 averaged over the zones (a summary
        for logs and for masks that need a width, e.g. the unlit-pixel mask)."""
        nb, nphase = self.nb, self.nphase
        b = np.arange(nb) - self.half
        p0 = (nphase - 1) // 2
        col = self.table[:, :, :, p0].reshape(-1, nb)
        mean = col @ b
        var = col @ (b**2) - mean**2
        return float(np.sqrt(np.mean(np.maximum(var, 0.0))))

    def derivative(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first column (n,), d weights / d x (n, nb) per pixel) of samples at (x, y), in the
        windows of :meth:`weights`: the phase slope of the table, blended between zones like
        the weights (the zones' own dependence on x, over tens of pixels, is left out). For
        the flexure fit's Gauss-Newton step."""
        xa = np.asarray(x, dtype=np.float64).reshape(-1)
        ya = np.asarray(y, dtype=np.float64).reshape(-1)
        if xa.shape != ya.shape:
            raise ValueError(f"x {np.shape(x)} and y {np.shape(y)} must have the same size")
        n, nb = xa.size, self.nb
        out = np.empty((n, nb), np.float64)
        first = np.empty(n, np.int64)
        for lo in range(0, n, _CHUNK):
            hi = min(n, lo + _CHUNK)
            first[lo:hi] = self._weights_chunk(xa[lo:hi], ya[lo:hi], out[lo:hi], False,
                                               slope_only=True)
        return first, out


def _optional(model: Any, name: str) -> np.ndarray | None:
    """An optional array attribute of a datamodel: None when absent or empty."""
    try:
        value = getattr(model, name, None)
    except (AttributeError, KeyError):
        return None
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.size == 0 or arr.ndim == 0:
        return None
    return arr
