"""IFS spectral extraction: the exact weighted least-squares inverse of the trace forward model.

Forward model (the one :func:`iris_tasks.simulate.ifs.project_cube` implements, and the one the
``ifstrace`` reference describes). Every cube sample ``s = (k, j, i)`` - wavelength k of spaxel
(row j, column i) - lands at the detector position ``(x_s, y_s) = (TRACE_X, TRACE_Y)[j, i, k]``
(0-based pixel centres). Its flux ``g_s`` is

* spread in x over the columns ``rint(x_s) - h .. rint(x_s) + h`` (``h = ceil(4 sigma)``) with a
  pixel-integrated Gaussian of width ``sigma`` (PSFSIG), truncated there and renormalised;
* split linearly in y between rows ``y0 = floor(y_s)`` (weight ``1 - f``) and ``y0 + 1``
  (weight ``f``), ``f = y_s - y0``.

So the detector image is ``D = A g + noise`` with a sparse design matrix ``A`` holding
``2 (2h + 1)`` weights per sample. Extraction is the weighted least-squares solution

    g = argmin (D - A g)^T W (D - A g),   W = diag(1 / variance), 0 on unusable pixels,

i.e. the normal equations ``N g = A^T W D`` with ``N = A^T W A``. This is the
"spectro-perfectionism" idea (Bolton & Schlegel 2010) for a 2-D trace model: no boxcar, every
pixel used with its weight, neighbouring spaxels that blend on the detector (the slicer puts
them one column apart) fitted jointly. Nothing is regularised - except, in the slicer, weak
smoothness priors on the spaxel pairs that masked pixels leave undetermined and on those whose
alternation the detector does not see (see :func:`extract`) - so on noiseless data the cube
comes back to round-off wherever the data determine it.

Solution: preconditioned conjugate gradients, ``N`` applied matrix-free as ``A^T (W (A g))``.
``A`` is stored once per trace as a CSC matrix ``X0`` holding the ``2h + 1`` x-weights of every
sample in its first row ``y0``; the second row is the same matrix applied to ``f g`` and read
one detector row further down, so ``A g = S0 X0 ((1 - f) g) + S1 X0 (f g)``.

The preconditioner is a separable (Kronecker-style) product of two exact banded blocks of
``N``, normalised to unit diagonal with ``D = diag(N)``:

* ``C_x``: couplings between samples of one wavelength plane (neighbouring spaxels that share
  detector pixels - the slicer's blending), banded along the spaxel index;
* ``C_k``: couplings between consecutive wavelengths of one spaxel (they share the detector row
  between them), banded along the spectrum.

With the banded Cholesky factors ``C_x = U_x^T U_x`` and ``C_k = U_k^T U_k``,
``P^-1 = D^-1/2 U_k^-1 U_x^-1 U_x^-T U_k^-T D^-1/2`` is symmetric positive definite by
construction and equals ``N^-1`` when ``N`` is separable. A band narrower than the couplings
can make a nearly singular block indefinite; such a block is detected at its failing pivot and
falls back to the diagonal (logged). Where the blend prior is on, ``C_x`` holds every coupling
within a plane (a principal block of the regularised ``N``: positive definite). The traces are nearly so: CG needs
2-4 iterations on noisy frames and ~10 to reach round-off (18 with the x block alone, 120-150
with a diagonal preconditioner, for the slicer).

Variances: ``var(g_u) = (N^-1)_uu`` is estimated from the same separable model,
``(N^-1)_uu ~ (C_x^-1)_uu (C_k^-1)_uu / D_uu``, with the diagonals of the two banded inverses
computed exactly (Takahashi's recurrence on the Cholesky factor). Where no two spaxels share a
pixel (the lenslet on the real detector) ``C_x`` is the identity and this is the exact
``(N^-1)_uu``; for the slicer it is exact for a separable ``N`` and agrees with the exact
inverse to < 1 % (uniform weights) and a few % (strongly varying weights) in the tests. The
estimate keeps the band of ``C_x`` that :func:`_bandwidths` picks even where the preconditioner
holds the whole plane: with a builder-made slicer model that band is not positive definite
and ``C_x`` is then the identity (each sample's error with its in-plane neighbours known),
which underestimates single spaxels of the pairs the detector cannot tell apart.
Neighbouring slicer spaxels are anti-correlated (that is what deconvolving their blend does),
so a sum over spaxels is better than the quadrature sum of their errors:
:func:`aperture_variance` gives the exact variance of such a sum with a few extra solves.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import scipy.sparse as sp
from scipy.linalg.blas import daxpy as _daxpy

from .background import (
    BackgroundFit,
    BackgroundSpec,
    background_pixels,
    fit_background,
    halo_image,
)
from .banded import EndToEndBand, band_rows, band_storage
from .profile import FINE_PHASES, CrossProfile

try:  # accumulate into a caller's buffer (y += A x): a 4k frame's (ny+1) nx output is 134 MB,
    # and allocating it afresh for every product costs more page faults than the product
    from scipy.sparse._sparsetools import csc_matvecs as _csc_matvecs
    from scipy.sparse._sparsetools import csr_matvec as _csr_matvec
except ImportError:  # pragma: no cover - private scipy API; fall back to the public one
    _csc_matvecs = _csr_matvec = None

log = logging.getLogger(__name__)

__all__ = [
    "BAND_TOL", "ExtractionResult", "NormalBlocks", "TraceGeometry", "aperture_variance",
    "build_geometry", "extract", "normal_blocks",
]

# Normalised couplings |N_uv| / sqrt(N_uu N_vv) below this are left out of the banded blocks.
# They only shape the preconditioner (CG still solves with the exact N) and change the
# variance estimate by ~BAND_TOL^2.
BAND_TOL = 5e-3
# Strength of the first-difference prior on blended neighbours, relative to sqrt(N_uu N_vv),
# where the data do not see their alternation, and the visibility below which it applies
# (see _blend_pairs and extract()).
BLEND_PRIOR = 1e-4
BLEND_VISIBILITY = 1.5e-3
# Samples per chunk in the block computations (bounds the temporaries to ~100 MB).
_CHUNK = 1 << 20


@lru_cache(maxsize=8)
def _gaussian_profile(sigma: float) -> CrossProfile:
    """The Gaussian profile of a version-1 trace (PSFSIG): the historical fine table."""
    return CrossProfile.gaussian(sigma, nphase=FINE_PHASES)


@dataclass
class TraceGeometry:
    """The design matrix of one trace on one detector shape (independent of the frame).

    Samples are in cube order: ``s = (k * ny_s + j) * nx_s + i`` for the cube (nwave, ny_s, nx_s).
    """

    shape: tuple[int, int]  # detector (ny, nx)
    cube_shape: tuple[int, int, int]  # (nwave, ny_s, nx_s)
    half: int
    xs: np.ndarray  # (n,) first column of each sample's x window
    y0: np.ndarray  # (n,) first detector row
    fy: np.ndarray  # (n,) float64 weight of the second row
    wx: np.ndarray  # (n, nb) float64 x-weights; 0 where the window leaves the detector
    on_detector: np.ndarray  # (n,) bool: the sample puts some weight on the detector
    X0: sp.csc_matrix = field(repr=False)  # ((ny + 1) * nx, n): weights at padded row y0 + 1
    _reach: np.ndarray | None = field(default=None, repr=False)
    _bands: tuple[float, tuple[int, int]] | None = field(default=None, repr=False)
    _by_row: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _lit: np.ndarray | None = field(default=None, repr=False)

    @property
    def nb(self) -> int:
        return 2 * self.half + 1

    @property
    def n(self) -> int:
        return int(self.xs.size)

    @property
    def plane(self) -> int:
        """Samples per wavelength plane (spaxels)."""
        return self.cube_shape[1] * self.cube_shape[2]

    def project(self, flux: np.ndarray) -> np.ndarray:
        """``A @ flux``: the detector image (ny, nx) of per-sample fluxes (cube order)."""
        ny, nx = self.shape
        g = np.asarray(flux, dtype=np.float64).ravel()
        top = self.X0 @ (g * (1.0 - self.fy))
        bottom = self.X0 @ (g * self.fy)
        # padded row r + 1 holds detector row r for the first-row weights; the second-row
        # weights belong one detector row further down.
        image = top[nx:]
        image += bottom[: ny * nx]
        return image.reshape(ny, nx)

    def adjoint(self, image: np.ndarray) -> np.ndarray:
        """``A^T @ image`` (cube order)."""
        ny, nx = self.shape
        pad = np.zeros((ny + 2) * nx)
        pad[nx:(ny + 1) * nx] = np.asarray(image, dtype=np.float64).ravel()
        return self.adjoint_padded(pad)

    def adjoint_padded(self, pad: np.ndarray) -> np.ndarray:
        """``A^T`` of an image stored in rows 1..ny of a zero-bordered ((ny + 2) nx) buffer:
        the first-row weights read it from row 0 on, the second-row weights from row 1 on,
        both as views (no copy)."""
        ny, nx = self.shape
        first = self.X0.T @ pad[: (ny + 1) * nx]
        second = self.X0.T @ pad[nx:]
        first *= 1.0 - self.fy
        second *= self.fy
        first += second
        return first

    def samples_by_row(self) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices sorted by first row y0, the sorted y0), cached."""
        if self._by_row is None:
            order = np.argsort(self.y0, kind="stable")
            self._by_row = (order, self.y0[order])
        return self._by_row

    def light(self) -> np.ndarray:
        """Total profile weight of all samples on each detector pixel (``A 1``), (ny, nx)
        float64: ~1 inside a trace, the profile wings' fraction beside it, 0 unlit. Not
        cached (128 MB at 4k; only the background fit needs it, once per frame)."""
        return self.project(np.ones(self.n))

    def lit(self) -> np.ndarray:
        """Detector pixels that some sample puts weight on, (ny, nx) bool, cached."""
        if self._lit is None:
            self._lit = self.light() > 0
        return self._lit

    def reach(self) -> np.ndarray:
        """Total profile weight of each sample on the detector (``A^T 1``), cached."""
        if self._reach is None:
            self._reach = self.adjoint(np.ones(self.shape))
        return self._reach


def build_geometry(trace_x: np.ndarray, trace_y: np.ndarray,
                   profile: float | CrossProfile, shape: tuple[int, int]) -> TraceGeometry:
    """The design matrix of the trace (TRACE_X/TRACE_Y of shape (ny_s, nx_s, nwave), 0-based
    pixel centres) on a detector of ``shape``.

    ``profile`` is the cross-dispersion profile: a :class:`CrossProfile` (one table per
    detector zone, e.g. an empirical one from the ``ifstrace`` reference) or a float, the
    Gaussian sigma of a version-1 reference (the historical fine table,
    ``CrossProfile.gaussian(sigma, nphase=FINE_PHASES)``: the same matrix, bit for bit, as
    before profiles existed).
    """
    tx = np.asarray(trace_x, dtype=np.float32)  # the reference precision, native byte order
    ty = np.asarray(trace_y, dtype=np.float32)
    if tx.ndim != 3 or tx.shape != ty.shape:
        raise ValueError(f"trace_x {tx.shape} and trace_y {ty.shape} must be equal 3-D arrays "
                         "(ny, nx, nwave)")
    if not isinstance(profile, CrossProfile):
        sigma = float(profile)
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"psf_sigma must be positive, got {profile!r}")
        profile = _gaussian_profile(sigma)
    if not (np.isfinite(tx).all() and np.isfinite(ty).all()):
        raise ValueError("trace positions contain NaN or infinite values")
    ny_s, nx_s, nw = tx.shape
    ny, nx = (int(v) for v in shape)
    half = profile.half
    nb = profile.nb
    n = nw * ny_s * nx_s
    big = n * nb > np.iinfo(np.int32).max or (ny + 2) * nx > np.iinfo(np.int32).max
    itype = np.int64 if big else np.int32
    # cube order (k, j, i)
    xcube = np.moveaxis(tx, 2, 0).reshape(n)
    ycube = np.moveaxis(ty, 2, 0).reshape(n)
    xs = np.empty(n, itype)
    y0 = np.empty(n, itype)
    fy = np.empty(n, np.float64)
    wx = np.empty((n, nb), np.float64)
    indices = np.empty((n, nb), itype)
    on_detector = np.empty(n, bool)
    offsets = np.arange(nb)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        xc = xcube[lo:hi].astype(np.float64)
        yc = ycube[lo:hi].astype(np.float64)
        w = wx[lo:hi]
        first, _ = profile.weights(xc, yc, out=w)
        yf = np.floor(yc)
        f = yc - yf
        yi = yf.astype(np.int64)
        # The padded row y0 + 1 must lie in [0, ny]; some row with weight must be on the detector.
        rows_ok = (yi >= -1) & (yi <= ny - 1)
        row_weight = np.where(yi >= 0, 1.0 - f, 0.0) + np.where(yi + 1 <= ny - 1, f, 0.0)
        col = first[:, None] + offsets[None, :]
        ok = (col >= 0) & (col < nx)
        ok &= rows_ok[:, None]
        w[~ok] = 0.0
        col += ((yi + 1) * nx)[:, None]
        col[~ok] = 0
        indices[lo:hi] = col
        xs[lo:hi] = first
        y0[lo:hi] = yi
        fy[lo:hi] = f
        on_detector[lo:hi] = rows_ok & (row_weight > 0) & (w.sum(axis=1) > 0)
    indptr = np.arange(0, n * nb + 1, nb, dtype=itype)
    X0 = sp.csc_matrix((wx.reshape(-1), indices.reshape(-1), indptr), shape=((ny + 1) * nx, n))
    return TraceGeometry(shape=(ny, nx), cube_shape=(nw, ny_s, nx_s), half=half, xs=xs, y0=y0,
                         fy=fy, wx=wx, on_detector=on_detector, X0=X0)


# ---------------------------------------------------------------------- blocks of N
def _padded_weights(weight: np.ndarray) -> np.ndarray:
    """W with one zero row above and below, flattened: X0 row index + a * nx -> row y0 + a."""
    ny, nx = weight.shape
    pad = np.zeros((ny + 2) * nx)
    pad[nx:(ny + 1) * nx] = np.asarray(weight, np.float64).ravel()
    return pad


def _blocks_chunk(geom: TraceGeometry, wpad: np.ndarray, lo: int, hi: int,
                  strides: list[tuple[int, int | None]], want_diag: bool = True
                  ) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """diag(N)[lo:hi] and N[u, u + stride] for u in [lo, hi) (0 where there is no partner).

    Two samples share pixels only in a common detector row - rows y0_u + a and y0_v + a' with
    a - a' = y0_v - y0_u in {-1, 0, 1} - and there where their x windows overlap, i.e. when
    the column offset c = xs_v - xs_u is smaller than the window. ``strides`` holds
    (stride, plane) pairs; with ``plane`` set, u and u + stride must lie in one plane
    (u % plane + stride < plane).
    """
    n, nb, nx = geom.n, geom.nb, geom.shape[1]
    idx = geom.X0.indices.reshape(n, nb)[lo:hi]
    wu = geom.wx[lo:hi]
    q0 = wu * wpad[idx]  # weight x W along the sample's first row
    q1 = wu * wpad[idx + nx]  # ... and its second row
    fu = geom.fy[lo:hi]
    diag = None
    if want_diag:
        diag = (1.0 - fu) ** 2 * np.einsum("ub,ub->u", q0, wu)
        diag += fu**2 * np.einsum("ub,ub->u", q1, wu)
    outs = [np.zeros(hi - lo) for _ in strides]
    where = None  # position of each u in its plane (only for in-plane strides)
    for (stride, plane), out in zip(strides, outs, strict=True):
        top = min(hi, n - stride)
        if top <= lo:
            continue
        cnt = top - lo
        u = slice(lo, top)
        v = slice(lo + stride, top + stride)
        dy = geom.y0[v] - geom.y0[u]
        c = geom.xs[v] - geom.xs[u]
        ok = np.abs(dy) <= 1
        ok &= np.abs(c) < nb
        if plane is not None:
            if where is None:
                where = np.arange(lo, hi) % plane
            ok &= where[:cnt] < plane - stride
        if not ok.any():
            continue
        wv = geom.wx[v]
        fv = geom.fy[v]
        f0 = fu[:cnt]
        dy_ok = dy[ok]
        same = dy_ok.min() == dy_ok.max()
        need0 = not same or dy_ok[0] <= 0
        need1 = not same or dy_ok[0] >= 0
        # Most pairs of a plane or of a spectrum have one column offset: those go through
        # slices, the rest (window jumps, slice edges) through gathers.
        common = int(np.argmax(np.bincount(c[ok] + nb, minlength=2 * nb + 1))) - nb
        b0, b1 = max(0, common), min(nb, nb + common)
        wvc = wv[:, b0 - common:b1 - common]
        s0 = np.einsum("ub,ub->u", q0[:cnt, b0:b1], wvc) if need0 else None
        s1 = np.einsum("ub,ub->u", q1[:cnt, b0:b1], wvc) if need1 else None
        odd = np.flatnonzero(ok & (c != common))
        if odd.size:
            wide = np.zeros((odd.size, 3 * nb))
            wide[:, nb:2 * nb] = wv[odd]
            col = np.arange(nb)[None, :] - c[odd][:, None] + nb
            wal = np.take_along_axis(wide, col, axis=1)  # wv[b - c], 0 outside its window
            if need0:
                s0[odd] = np.einsum("ub,ub->u", q0[odd], wal)
            if need1:
                s1[odd] = np.einsum("ub,ub->u", q1[odd], wal)
        # shared row: (first, first) and (second, second) for dy = 0; (second of u, first of
        # v) for dy = 1; (first of u, second of v) for dy = -1
        if same and dy_ok[0] == 1:
            val = s1 * f0
            val *= 1.0 - fv
        elif same and dy_ok[0] == -1:
            val = s0 * (1.0 - f0)
            val *= fv
        elif same:
            val = s0 * (1.0 - f0)
            val *= 1.0 - fv
            val += s1 * f0 * fv
        else:
            val = np.where(dy == 0, (1 - f0) * (1 - fv) * s0 + f0 * fv * s1,
                           np.where(dy == 1, f0 * (1 - fv) * s1, (1 - f0) * fv * s0))
        val[~ok] = 0.0
        out[:cnt] = val
    return diag, outs


@dataclass
class NormalBlocks:
    """diag(N) and its two bands (see the module docstring), not normalised."""

    diag: np.ndarray  # (n,) N_uu (prior included, see _add_prior)
    active: np.ndarray  # (n,) bool: samples in the fit
    x_rows: list[np.ndarray]  # N[u, u + e], e = 1..kd_x, 0 across planes; cube order
    k_rows: list[np.ndarray]  # N[u, u + e * plane], e = 1..kd_k
    # LAPACK band storage that the x rows are views of (banded.band_storage), or None: the
    # preconditioner then normalises and factors the x band in place, without a copy
    x_band: np.ndarray | None = None


def _bandwidths(geom: TraceGeometry, tol: float) -> tuple[int, int]:
    """Band widths of the x and k blocks from the geometry alone (W = 1 on a few windows).

    The couplings are normalised, so they depend on W only through its variation across a
    sample's window; the geometry decides which neighbours can matter at all.
    """
    n, m = geom.n, geom.plane
    width = min(n, max(4 * m, 20000))
    starts = sorted({0, max(0, n // 2 - width // 2), max(0, n - width)})
    wpad = _padded_weights(np.ones(geom.shape))
    cand_x = [(d, m) for d in range(1, min(2 * geom.half, m - 1) + 1)]
    cand_k = [(d * m, None) for d in range(1, min(4, geom.cube_shape[0] - 1) + 1)]
    cand = cand_x + cand_k
    peak = np.zeros(len(cand))
    reach = max((st for st, _ in cand), default=0)
    for lo in starts:
        hi = min(n, lo + width)
        ext = min(n, hi + reach)  # the partners' diagonal too
        diag, _ = _blocks_chunk(geom, wpad, lo, ext, [])
        _, outs = _blocks_chunk(geom, wpad, lo, hi, cand, want_diag=False)
        scale = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 0.0)
        for q, ((stride, _), out) in enumerate(zip(cand, outs, strict=True)):
            cnt = min(hi, n - stride) - lo
            if cnt <= 0:
                continue
            norm = np.abs(out[:cnt] * scale[:cnt] * scale[stride:stride + cnt])
            peak[q] = max(peak[q], float(norm.max()))
    px, pk = peak[:len(cand_x)], peak[len(cand_x):]
    kd_x = int(np.flatnonzero(px > tol).max() + 1) if (px > tol).any() else 0
    kd_k = int(np.flatnonzero(pk > tol).max() + 1) if (pk > tol).any() else 0
    log.debug("IFS extraction: coupling peaks x %s, k %s -> bands %d, %d",
              np.round(px, 4).tolist(), np.round(pk, 4).tolist(), kd_x, kd_k)
    return kd_x, kd_k


def _default_bandwidths(geom: TraceGeometry, tol: float = BAND_TOL) -> tuple[int, int]:
    """The x and k band widths of :func:`_bandwidths`, cached on the geometry."""
    if geom._bands is None or geom._bands[0] != tol:
        geom._bands = (tol, _bandwidths(geom, tol))
    return geom._bands[1]


def normal_blocks(geom: TraceGeometry, weight: np.ndarray, tol: float = BAND_TOL,
                  bandwidths: tuple[int, int] | None = None,
                  exclude: np.ndarray | None = None) -> NormalBlocks:
    """diag(N) and the normalised x and k bands of N for pixel weights ``weight`` (ny, nx).

    Samples in ``exclude`` are treated as unconstrained (left out of the fit)."""
    n, m = geom.n, geom.plane
    if bandwidths is None:
        bandwidths = _default_bandwidths(geom, tol)
    kd_x, kd_k = bandwidths
    wpad = _padded_weights(weight)
    strides: list[tuple[int, int | None]] = [(d, m) for d in range(1, kd_x + 1)]
    strides += [(d * m, None) for d in range(1, kd_k + 1)]
    diag = np.empty(n)
    # the x rows are written straight into the LAPACK band storage the preconditioner factors
    # in place (a separate copy of them cost 1.3 GB at 4k, at the peak of the setup)
    x_band = band_storage(n, kd_x) if kd_x else None
    raw = (band_rows(x_band) if kd_x else []) + [np.empty(n) for _ in range(kd_k)]
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        d, outs = _blocks_chunk(geom, wpad, lo, hi, strides)
        diag[lo:hi] = d
        for r, o in zip(raw, outs, strict=True):
            r[lo:hi] = o
    active = (diag > 0) & geom.on_detector
    if exclude is not None:
        active &= ~exclude
    everything = bool(active.all())  # the usual case: no pair to take out
    for (stride, _), r in zip(strides, raw, strict=True):
        if not everything:
            r[: n - stride] *= active[: n - stride] & active[stride:]
        r[n - stride:] = 0.0
    return NormalBlocks(diag=diag, active=active, x_rows=raw[:kd_x], k_rows=raw[kd_x:],
                        x_band=x_band)


def _prior_pairs(geom: TraceGeometry, active: np.ndarray, coverage: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(k pairs, x pairs) of the masked-pixel prior: k[u] penalises g_u - g_(u+m) (m = spaxels
    per plane: the same spaxel at consecutive wavelengths), x[u] penalises g_u - g_(u+1)
    (neighbouring spaxels of one row of one plane whose windows overlap).

    Where spaxels sit one column apart (the slicer), each detector row carries about one
    equation per spaxel; a masked pixel removes one and leaves a combination of neighbours
    (the alternating one the blend hardly shows) undetermined in the planes that share that
    row. A weak first-difference prior along the spectrum, on the samples within two windows
    (along their plane's spaxel row) of a sample touching an unusable pixel, pins it with the
    neighbouring wavelengths, which the data determine: spectra are smooth at the resolution
    element, while a compact source is not smooth across spaxels (a prior along the spaxel row,
    used alone until 2026-12-07, took 9 % of a standard star's flux in the one plane whose core
    pixel was dead). Where the neighbouring wavelengths lose pixels too (a saturated core, a
    bad column along the dispersion) they cannot pin it, and the pairs along the spaxel row
    near such samples get the prior as well. The rest of the cube stays an exact inverse.
    """
    n, m = geom.n, geom.plane
    touched = (coverage < 1.0 - 1e-9) & active
    reach = 2 * geom.half + 1

    def widened(mask: np.ndarray) -> np.ndarray:
        # the undetermined combination reaches a couple of windows beyond the samples that
        # touch the bad pixel: widen by 2 h + 1 spaxels each way along the row
        near = mask.copy()
        for shift in range(1, reach + 1):
            near[shift:] |= mask[:-shift]
            near[:-shift] |= mask[shift:]
        return near

    kpairs = np.zeros(n, bool)
    if n > m:
        near = widened(touched)
        kpairs[:-m] = (near[:-m] | near[m:]) & active[:-m] & active[m:]
        del near
    # samples whose both spectral neighbours lose pixels too
    deep = touched.copy()
    deep[m:] &= touched[:-m]
    deep[:m] = False
    deep[:-m] &= touched[m:]
    deep[-m:] = False
    xpairs = np.zeros(n, bool)
    if deep.any():
        nx_s = geom.cube_shape[2]
        u = np.arange(n - 1)
        xpairs[:-1] = ((u % nx_s) != nx_s - 1) & active[:-1] & active[1:]
        xpairs[:-1] &= (np.abs(geom.xs[1:] - geom.xs[:-1]) < geom.nb)
        xpairs[:-1] &= (np.abs(geom.y0[1:] - geom.y0[:-1]) <= 1)
        xpairs &= widened(deep)
    return kpairs, xpairs


def _blend_pairs(geom: TraceGeometry, active: np.ndarray) -> np.ndarray:
    """Relative prior strength of each pair (u, u + 1) of neighbouring spaxels of one row of
    one plane, both in the fit, about one column apart (they blend on the detector: the
    slicer); 0 for other pairs.

    Spaxels one column apart cannot be told apart in the alternating pattern
    (+1, -1, +1, ...) where they sit half a pixel off the pixel centres: for a symmetric
    profile every pixel then receives +w and -w and that pattern is invisible. A sample's
    visibility of it is ``v = (sum_b (-1)^b w_b)^2 / sum_b w_b^2`` (~0.1 on a pixel centre,
    0 half-way; the normalised eigenvalue of the alternating mode of a uniform row); the pair
    (mean v of its two samples) gets ``1 / (1 + (v / BLEND_VISIBILITY)^4)``: ~1 where the
    data do not see the alternation, < 1e-3 where they do (the Gaussian version-1 profile
    has v >= 0.01 everywhere).
    """
    n, nx_s, nb = geom.n, geom.cube_shape[2], geom.nb
    out = np.zeros(n)
    if n < 2:
        return out
    sign = np.where(np.arange(nb) % 2 == 0, 1.0, -1.0)
    vis = np.empty(n)
    for lo in range(0, n, _CHUNK):
        w = geom.wx[lo:lo + _CHUNK]
        alt = w @ sign
        ssq = np.einsum("ub,ub->u", w, w)
        vis[lo:lo + _CHUNK] = alt * alt / np.where(ssq > 0, ssq, 1.0)
    u = np.arange(n - 1)
    pairs = ((u % nx_s) != nx_s - 1) & active[:-1] & active[1:]
    pairs &= np.abs(geom.xs[1:] - geom.xs[:-1]) <= 2  # about one column apart
    pairs &= np.abs(geom.y0[1:] - geom.y0[:-1]) <= 1
    pv = 0.5 * (vis[:-1] + vis[1:])
    del vis
    strength = 1.0 / (1.0 + (pv / BLEND_VISIBILITY) ** 4)
    # below 1e-3 the weight (< 1e-7 sqrt(N_uu N_vv)) changes nothing but would make the prior
    # touch every pair in every CG product: left out (a version-1 trace then has no prior)
    pairs &= strength >= 1e-3
    out[:-1] = np.where(pairs, strength, 0.0)
    return out


def _prior_weights(diag: np.ndarray, active: np.ndarray,
                   mask_pairs: tuple[np.ndarray, np.ndarray] | None, mask_prior: float,
                   blend_pairs: np.ndarray | None, blend_prior: float
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """First-difference weights (pairs (u, u + 1), pairs (u, u + m)), from diag(N) without the
    prior: ``blend_prior`` x sqrt(N_uu N_vv) on each blended pair (u, u + 1) - scale-free: the
    same relative strength on a bright source and on the sky -, and ``mask_prior`` x the median
    N_uu on the masked-pixel pairs of :func:`_prior_pairs`; None where there is none."""
    lam_x = lam_k = None
    if mask_pairs is not None and mask_prior > 0:
        kpairs, xpairs = mask_pairs
        lam = mask_prior * float(np.median(diag[active]))
        if kpairs.any():
            lam_k = lam * kpairs
        if xpairs.any():
            lam_x = lam * xpairs
    if blend_pairs is not None and blend_prior > 0 and np.any(blend_pairs):
        d = np.where(active, diag, 0.0)
        w = np.zeros_like(d)
        w[:-1] = np.sqrt(d[:-1] * d[1:])
        w *= blend_prior * blend_pairs
        lam_x = w if lam_x is None else lam_x + w
    return lam_x, lam_k


def _add_prior(blocks: NormalBlocks, weights: tuple[np.ndarray | None, np.ndarray | None],
               m: int) -> None:
    """N += sum over pairs of w_u (e_u - e_v)(e_u - e_v)^T in the blocks: v = u + 1 for the
    first weights (the x band), v = u + m for the second (the k band)."""
    wx, wk = weights
    if wx is not None and wx.any():
        blocks.diag += wx
        blocks.diag[1:] += wx[:-1]
        if not blocks.x_rows:
            blocks.x_rows.append(np.zeros_like(blocks.diag))
        blocks.x_rows[0] -= wx
    if wk is not None and wk.any():
        blocks.diag += wk
        blocks.diag[m:] += wk[:-m]
        if not blocks.k_rows:
            blocks.k_rows.append(np.zeros_like(blocks.diag))
        blocks.k_rows[0] -= wk


# A pivot of a unit-diagonal block below this is a breakdown: the block is (numerically) not
# positive definite. Above it the factor is finite; its entries grow at most by 1/sqrt(PIVOT_TOL)
# per position before the next pivot fails.
PIVOT_TOL = 1e-10


def _band_cholesky(rows: list[np.ndarray], kd: int
                   ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Cholesky factors u[e][p, b] = U[p, p + e] of unit-diagonal bands, vectorised over the
    blocks b; the blocks where a pivot was not positive (below PIVOT_TOL, or not finite: their
    u is not usable) and each block's first failing position (-1: none).

    A block whose pivot fails is frozen from there on (its off-diagonal entries set to 0), so
    that its arithmetic stays finite: before, a failed block kept being factored with the
    entries of an indefinite matrix, which grow by a power at every position, overflowed
    ('overflow encountered in square') and turned into inf - inf = NaN ('invalid value').
    """
    L, B = rows[0].shape
    # u[e] (e >= 1) overwrites rows[e - 1] in place: position p of a row is read once, at
    # step p, before its factor entry is written there (the raw rows are not kept; at 4k each
    # is 126 MB)
    u = [np.zeros((L, B))] + list(rows)
    failed = np.zeros(B, bool)
    first = np.full(B, -1)
    s = np.empty(B)
    for p in range(L):
        s[:] = 1.0
        for t in range(1, min(kd, p) + 1):
            s -= u[t][p - t] ** 2
        bad = ~(s > PIVOT_TOL)  # NaN too
        bad &= ~failed
        if bad.any():
            failed |= bad
            first[bad] = p
        if failed.any():
            s[failed] = 1.0
        d = np.sqrt(s)
        u[0][p] = d
        for e in range(1, min(kd, L - 1 - p) + 1):
            acc = u[e][p].copy()  # still rows[e - 1][p]
            for t in range(1, min(kd - e, p) + 1):
                acc -= u[t][p - t] * u[t + e][p - t]
            u[e][p] = acc / d
        for e in range(max(1, L - p), kd + 1):  # beyond the block's end: no coupling
            u[e][p] = 0.0
        if failed.any():
            for e in range(1, kd + 1):
                u[e][p, failed] = 0.0
    finite = np.logical_and.reduce([np.isfinite(v).all(axis=0) for v in u])
    if not finite.all():  # not expected with finite input; never let it reach the solves
        failed |= ~finite
        first[~finite & (first < 0)] = 0
    return u, failed, first


class _Band:
    """Unit-diagonal banded SPD blocks along axis 0 of (L, B) arrays, B independent blocks.

    The rows are factored in place (they are the factor's storage afterwards).

    ``rows[e - 1][p, b]`` is C[p, p + e] of block b. Cholesky, triangular solves and the
    diagonal of the inverse run as loops over the L positions with numpy vectors over the B
    blocks (the blocks are many and short-banded: planes of the slicer, spectra of every
    spaxel), in place of one LAPACK call per block.
    """

    def __init__(self, rows: list[np.ndarray], what: str = "banded preconditioner",
                 level: int = logging.WARNING):
        self.kd = len(rows)
        self.failed = np.zeros(0, bool)
        if not self.kd:
            return
        L, B = rows[0].shape
        if not all(np.isfinite(r).all() for r in rows):
            raise FloatingPointError("banded preconditioner: non-finite couplings in N (the "
                                     "pixel weights or the trace's profile weights)")
        u, failed, first = _band_cholesky(rows, self.kd)
        nfail = int(failed.sum())
        self.failed = failed
        if nfail:
            # The blocks are bands of N (couplings beyond the band and below BAND_TOL dropped):
            # a principal block of N is positive definite, but a nearly singular one (slicer
            # spaxels whose alternation the detector hardly sees) can become indefinite once
            # the dropped couplings are gone. Such blocks fall back to the diagonal; CG still
            # solves with the exact N, slower.
            for v in u:
                v[:, failed] = 0.0
            u[0][:, failed] = 1.0
            log.log(level, "%s: %d of %d blocks (length %d, %d band(s)) not "
                    "positive definite, first failing pivot at position %d (median); "
                    "the diagonal is used for them", what, nfail, B, L, self.kd,
                    int(np.median(first[first >= 0])))
        self.u = u

    def solve_t(self, y: np.ndarray) -> None:
        """y <- U^-T y in place ((L, B))."""
        if not self.kd:
            return
        u, L = self.u, y.shape[0]
        for p in range(L):
            for t in range(1, min(self.kd, p) + 1):
                y[p] -= u[t][p - t] * y[p - t]
            y[p] /= u[0][p]

    def solve_n(self, y: np.ndarray) -> None:
        """y <- U^-1 y in place ((L, B))."""
        if not self.kd:
            return
        u, L = self.u, y.shape[0]
        for p in range(L - 1, -1, -1):
            for e in range(1, min(self.kd, L - 1 - p) + 1):
                y[p] -= u[e][p] * y[p + e]
            y[p] /= u[0][p]

    def diag_inverse(self, shape: tuple[int, int]) -> np.ndarray:
        """diag(C^-1), (L, B), by Takahashi's recurrence Z = U^-1 U^-T:
        Z[p, p+e] = (delta_e0 / U_pp - sum_t U[p, p+t] Z[p+t, p+e]) / U_pp."""
        if not self.kd:
            return np.ones(shape)
        u, kd = self.u, self.kd
        L, B = u[0].shape
        z = np.zeros((kd + 1, L, B))  # z[e, p] = Z[p, p + e]
        for p in range(L - 1, -1, -1):
            top = min(kd, L - 1 - p)
            for e in range(top, -1, -1):
                acc = np.zeros(B)
                for t in range(1, top + 1):
                    acc += u[t][p] * z[abs(e - t), p + min(t, e)]
                z[e, p] = ((1.0 / u[0][p] - acc) if e == 0 else -acc) / u[0][p]
        return z[0]


class _Preconditioner:
    """P^-1 = D^-1/2 U_k^-1 U_x^-1 U_x^-T U_k^-T D^-1/2 (see the module docstring).

    The x blocks (one per wavelength plane) are contiguous in cube order: they are factored
    and solved as one banded matrix by LAPACK (:class:`~iris_tasks.ifs.banded.EndToEndBand`,
    since 2026-12-08; before, Python loops over the spaxel positions on the cube's transpose).
    The k blocks (one per spectrum, 1-2 bands) stay :class:`_Band` loops on the cube layout:
    their vectors are whole planes, so the loops cost little.
    """

    def __init__(self, blocks: NormalBlocks, cube_shape: tuple[int, int, int],
                 error_kd: int | None = None, x_prior: np.ndarray | None = None):
        nw, ny_s, nx_s = cube_shape
        self.shape = (nw, ny_s * nx_s)
        n = nw * ny_s * nx_s
        m = ny_s * nx_s
        self.set_diagonal(blocks.diag, blocks.active)
        dinv = self.dinv

        def normalised(rows, stride0):
            out = []
            for e in range(1, len(rows) + 1):  # in place; each raw row let go once used
                r, rows[e - 1] = rows[e - 1], None
                st = e * stride0
                r *= dinv
                r[: n - st] *= dinv[st:]
                r[n - st:] = 0.0
                out.append(r.reshape(self.shape))
                del r
            rows.clear()
            return out

        # the error estimate's x blocks, when they differ from the preconditioner's (the first
        # error_kd bands of them, see _system): only the diagonal of their inverse is kept.
        # As before 2026-12-08 (when they were copied ahead of the prior), their couplings
        # leave out the prior's (``x_prior``, taken off the first band again here) while D
        # includes it.
        self.cx = None
        kd = len(blocks.x_rows)
        if error_kd is not None and blocks.x_band is not None:
            # the inner error_kd + 1 rows of the band storage are that band's storage
            ab = np.asfortranarray(blocks.x_band[kd - error_kd:, :n + error_kd])
            if x_prior is not None and error_kd:
                ab[error_kd - 1, 1:n + 1] += x_prior
            band = EndToEndBand([], m, scale=dinv, what="error estimate's x blocks",
                                level=logging.INFO, storage=ab)
            self.cx = band.diag_inverse()
            del band, ab
        elif error_kd is not None:
            rows = blocks.x_rows[:error_kd]
            if x_prior is not None and rows:
                rows[0] = rows[0] + x_prior
            band = EndToEndBand(rows, m, scale=dinv, what="error estimate's x blocks",
                                level=logging.INFO)
            self.cx = band.diag_inverse()
            del band
        # x band: positions = spaxels, blocks = planes, contiguous in cube order
        if blocks.x_band is not None:
            self.bx = EndToEndBand([], m, scale=dinv, storage=blocks.x_band)
        else:
            self.bx = EndToEndBand(blocks.x_rows, m, scale=dinv)
        blocks.x_rows, blocks.x_band = [], None
        # k band: positions = planes, blocks = spaxels -> cube layout as it is
        self.bk = _Band(normalised(blocks.k_rows, m))

    def set_diagonal(self, diag: np.ndarray, active: np.ndarray) -> None:
        """New D (the reweighting pass): the normalised bands depend on the weights only
        through their variation across a window and are kept."""
        self.diag = diag
        self.active = active
        self.dinv = np.where(active, 1.0 / np.sqrt(np.where(active, diag, 1.0)), 0.0)

    def __call__(self, r: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        # k outside, x inside: the k solves run on the cube layout, the x solve (U_x^-1 U_x^-T
        # = C_x^-1, one dpbtrs) on the same layout, in place.
        z = np.multiply(r, self.dinv, out=out).reshape(self.shape)
        self.bk.solve_t(z)
        self.bx.solve(z)
        self.bk.solve_n(z)
        z = z.reshape(-1)
        z *= self.dinv
        return z

    def variance(self) -> tuple[np.ndarray, np.ndarray]:
        """(variance estimate diag(C_x^-1) diag(C_k^-1) / D, inflation diag(C_x^-1)
        diag(C_k^-1)), cube order; inf outside the fit."""
        cx = (self.cx if self.cx is not None else self.bx.diag_inverse()).reshape(self.shape)
        ck = self.bk.diag_inverse(self.shape)
        infl = np.where(self.active, (cx * ck).reshape(-1), np.inf)
        var = np.where(self.active, infl / np.where(self.active, self.diag, 1.0), np.inf)
        return var, infl


# ---------------------------------------------------------------------- the solve
class _NormalOperator:
    """g -> (A^T W A + prior) g on the ``active`` samples (0 elsewhere).

    ``prior`` holds the first-difference weights of the pairs (u, u + 1) and (u, u + m) (see
    _prior_weights).
    Work buffers are kept between calls: at 4k each is 126-134 MB.
    """

    def __init__(self, geom: TraceGeometry, weight: np.ndarray, active: np.ndarray,
                 prior: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
                 buffers: dict | None = None):
        self.geom = geom
        ny, nx = geom.shape
        self.w = np.asarray(weight, np.float64).ravel()
        self.active = active
        self.everything = bool(active.all())
        self.pairs: tuple[np.ndarray | None, np.ndarray | None] = (None, None)  # see _system
        self.terms = []  # (stride, pairs, weights)
        for stride, w in zip((1, geom.plane), prior, strict=True):
            if w is not None and w.any():
                sel = np.flatnonzero(w)
                self.terms.append((stride, sel, w[sel]))
        n = geom.n
        # kept between passes: fresh 130 MB arrays cost their page faults on first touch
        self.buffers = buf = {} if buffers is None else buffers
        # "ab": the two rows' sample vectors, interleaved ((n, 2): one pass of X0 serves both,
        # csc_matvecs, 11 % less than two csc_matvec at 1k, 2026-12-08) for A, then reused as
        # two contiguous halves for the two A^T products; "t": X0's output for each, (R, 2).
        for name, size in (("ab", 2 * n), ("wy0", n), ("t", 2 * (ny + 1) * nx),
                           ("pad", (ny + 2) * nx)):
            if name not in buf or buf[name].size != size:
                buf[name] = np.zeros(size)
        np.subtract(1.0, geom.fy, out=buf["wy0"])
        self.ab, self.wy0 = buf["ab"], buf["wy0"]
        self.a, self.b = self.ab[:n], self.ab[n:]
        self.t, self.pad = buf["t"], buf["pad"]

    def _at_dot(self, v: np.ndarray, out: np.ndarray) -> None:
        X0 = self.geom.X0
        if _csr_matvec is None:
            out[:] = X0.T @ v
            return
        out[:] = 0.0
        # X0 is CSC: its arrays read as CSR are X0^T
        _csr_matvec(X0.shape[1], X0.shape[0], X0.indptr, X0.indices, X0.data, v, out)

    def __call__(self, g: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        geom = self.geom
        ny, nx = geom.shape
        if not self.everything:
            g = np.where(self.active, g, 0.0)
        rows = (ny + 1) * nx
        pair = self.ab.reshape(-1, 2)
        np.multiply(g, self.wy0, out=pair[:, 0])
        np.multiply(g, geom.fy, out=pair[:, 1])
        t = self.t.reshape(-1, 2)
        X0 = geom.X0
        if _csc_matvecs is None:
            t[:] = X0 @ pair
        else:
            self.t[:] = 0.0
            _csc_matvecs(rows, X0.shape[1], 2, X0.indptr, X0.indices, X0.data, self.ab, self.t)
        image = self.pad[nx:(ny + 1) * nx]
        np.add(t[nx:, 0], t[: ny * nx, 1], out=image)
        image *= self.w
        self._at_dot(self.pad[: (ny + 1) * nx], self.a)
        self._at_dot(self.pad[nx:], self.b)
        out = np.multiply(self.a, self.wy0, out=out)
        self.b *= geom.fy
        out += self.b
        for stride, sel, pw in self.terms:
            diff = pw * (g[sel] - g[sel + stride])
            out[sel] += diff
            out[sel + stride] -= diff
        if not self.everything:
            out[~self.active] = 0.0
        return out


def _pcg(apply_n, b: np.ndarray, precond, rtol: float, noise_tol: float, maxiter: int,
         n_active: int, x0: np.ndarray | None = None, overwrite_b: bool = False
         ) -> tuple[np.ndarray, int, bool, float]:
    """Preconditioned CG from ``x0`` (default 0).

    Stops when r^T P^-1 r (~ the squared N-norm of the error) is below rtol^2 of b^T P^-1 b or
    below noise_tol^2 per unknown: the solution's own noise has squared N-norm = the number of
    unknowns, so that is an error of noise_tol sigma rms. The residual returned is relative to
    b^T P^-1 b (the start from 0). With ``overwrite_b`` the residual is kept in ``b`` and the
    iterate in ``x0`` (the caller's arrays are consumed).
    """
    # Every n-vector is 126 MB at 4k: the loop works in five kept buffers (x, r, z, p, q), the
    # updates x += alpha p and r -= alpha q in place (BLAS daxpy: one pass, no temporary),
    # since each fresh array of that size costs its page faults (as much as the arithmetic).
    z = precond(b)
    start = float(b @ z)
    start = start if start > 0 else 1.0
    r = b if overwrite_b else b.copy()
    q = np.empty_like(b)
    if x0 is None:
        x = np.zeros_like(b)
    else:
        x = x0 if overwrite_b else x0.copy()
        r -= apply_n(x, out=q)
        z = precond(r, out=z)
    rz = float(r @ z)
    target = max(rtol**2 * start, noise_tol**2 * max(n_active, 1))
    p = z.copy()
    it = 0
    while rz > target and it < maxiter:
        apply_n(p, out=q)
        pq = float(p @ q)
        if not pq > 0:
            break
        alpha = rz / pq
        _daxpy(p, x, a=alpha)  # x += alpha p, in place
        _daxpy(q, r, a=-alpha)  # r -= alpha q
        precond(r, out=z)
        rz_new = float(r @ z)
        p *= rz_new / rz
        p += z
        rz = rz_new
        it += 1
    return x, it, rz <= target, math.sqrt(max(rz, 0.0) / start)


def _coverage(geom: TraceGeometry, ok: np.ndarray) -> np.ndarray:
    """Fraction of each sample's detector weight that falls on usable pixels.

    Only the unusable pixels that some sample reaches matter (a few thousand dead or
    saturated pixels on a 4k frame): their weight is taken off the samples that cover them,
    found through the samples sorted by first row, instead of a full adjoint product.
    """
    ny, nx = geom.shape
    reach = geom.reach()
    rows, cols = np.nonzero(~np.asarray(ok, bool) & geom.lit())
    lost = np.zeros(geom.n)
    if rows.size:
        order, y0s = geom.samples_by_row()
        nb = geom.nb
        urows = np.unique(rows)
        # samples with y0 in {r - 1, r}; queries in the array's own dtype (a mismatch makes
        # searchsorted convert the whole 16M-element array on every call)
        los = np.searchsorted(y0s, (urows - 1).astype(y0s.dtype))
        his = np.searchsorted(y0s, (urows + 1).astype(y0s.dtype))
        for r, lo, hi in zip(urows, los, his, strict=True):
            c = cols[rows == r]
            cand = order[lo:hi]
            a = r - geom.y0[cand]  # which of its two rows this is
            wy = np.where(a == 0, 1.0 - geom.fy[cand], geom.fy[cand])
            off = c[None, :] - geom.xs[cand][:, None]  # (cand, bad columns in this row)
            inside = (off >= 0) & (off < nb)
            if not inside.any():
                continue
            ci, bi = np.nonzero(inside)
            w = geom.wx[cand[ci], off[ci, bi]] * wy[ci]
            np.add.at(lost, cand[ci], w)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = np.where(reach > 0, 1.0 - lost / np.where(reach > 0, reach, 1.0), 0.0)
    return np.clip(cov, 0.0, 1.0)


@dataclass
class ExtractionResult:
    """Per-sample results reshaped to the cube (nwave, ny_s, nx_s)."""

    flux: np.ndarray  # fitted flux (data units; the spaxel throughput is not divided out)
    variance: np.ndarray  # estimated (N^-1)_uu; inf where unconstrained
    coverage: np.ndarray  # fraction of the sample's detector weight on usable pixels
    inflation: np.ndarray  # variance x N_uu: the joint fit's variance over fitting it alone
    iterations: int
    converged: bool
    residual: float  # final sqrt(r^T P^-1 r), relative to the start
    timings: dict[str, float]
    background: BackgroundFit | None = None  # the residual background subtracted (``background=``)


def pixel_weights(data: np.ndarray, variance: np.ndarray, good: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data with unusable pixels zeroed, W = 1/variance or 0, usable mask).

    Unusable: ``good`` False, non-finite data or variance, variance <= 0.
    """
    d = np.array(data, dtype=np.float64)  # a native-order copy that may be changed
    v = np.asarray(variance, dtype=np.float64)
    ok = np.isfinite(d)
    ok &= np.isfinite(v)
    with np.errstate(invalid="ignore"):
        ok &= v > 0
    ok &= np.asarray(good, bool)
    weight = np.zeros(d.shape)
    np.divide(1.0, v, out=weight, where=ok)
    d[~ok] = 0.0
    return d, weight, ok


def _system(geom: TraceGeometry, weight: np.ndarray, coverage: np.ndarray, *,
            min_fit_coverage: float, mask_prior: float, blend_prior: float,
            bandwidths: tuple[int, int] | None) -> tuple[_Preconditioner, _NormalOperator]:
    """Blocks, prior, preconditioner and operator of one weighting."""
    exclude = coverage < min_fit_coverage
    error_kd = None
    kd_x, kd_k = _default_bandwidths(geom) if bandwidths is None else bandwidths
    blend_pairs = None
    if blend_prior > 0 and kd_x > 0:  # only where neighbouring spectra blend
        blend_pairs = _blend_pairs(geom, geom.on_detector & ~exclude)
        blend_pairs = blend_pairs if blend_pairs.any() else None
    full = min(2 * geom.half, geom.plane - 1)
    if bandwidths is None and blend_pairs is not None and kd_x < full:
        # the preconditioner's x blocks hold every coupling within a plane, so that each is a
        # principal block of N (+ prior) and positive definite; the band of _bandwidths leaves
        # nearly singular blocks indefinite (see _Band). The error estimate keeps that band
        # (see extract()).
        blocks = normal_blocks(geom, weight, bandwidths=(full, kd_k), exclude=exclude)
        error_kd = kd_x
    else:
        blocks = normal_blocks(geom, weight, bandwidths=(kd_x, kd_k), exclude=exclude)
    if blend_pairs is not None:
        blend_pairs[:-1] *= blocks.active[:-1] & blocks.active[1:]
    mask_pairs = None
    # only where neighbouring spectra blend (an x band exists): elsewhere a masked pixel is
    # one equation of many and the fit stays determined
    if blocks.x_rows and mask_prior > 0 and bool(np.any(coverage < 1.0 - 1e-9)):
        mask_pairs = _prior_pairs(geom, blocks.active, coverage)
        mask_pairs = mask_pairs if any(p.any() for p in mask_pairs) else None
    prior = _prior_weights(blocks.diag, blocks.active, mask_pairs, mask_prior, blend_pairs,
                           blend_prior)
    _add_prior(blocks, prior, geom.plane)
    pre = _Preconditioner(blocks, geom.cube_shape, error_kd=error_kd, x_prior=prior[0])
    op = _NormalOperator(geom, weight, blocks.active, prior)
    op.pairs = (mask_pairs, blend_pairs)
    return pre, op


def extract(geom: TraceGeometry, data: np.ndarray, variance: np.ndarray, good: np.ndarray, *,
            read_variance: np.ndarray | None = None, poisson_coef: np.ndarray | float | None = None,
            reweight: int = 0, rtol: float = 1e-8, noise_tol: float = 1e-3, maxiter: int = 100,
            min_fit_coverage: float = 1e-3, mask_prior: float = 1e-4,
            blend_prior: float | None = None, want_variance: bool = True,
            bandwidths: tuple[int, int] | None = None,
            background: BackgroundSpec | None = None) -> ExtractionResult:
    """Weighted least-squares flux of every cube sample from a detector image.

    ``data`` and ``variance`` (ny, nx) in consistent units; ``good`` marks the pixels that may
    be used. Samples without any usable pixel are left out of the fit (flux 0, variance inf,
    coverage 0). ``noise_tol`` = 0 iterates to ``rtol`` (noiseless data). Samples with less than
    ``min_fit_coverage`` of their detector weight on usable pixels (a far wing left beside a
    masked core) are not fitted either: they would be determined only to ~1/coverage^2 of
    their variance and make the system nearly singular; their light (less than that
    fraction) is left to their neighbours.

    Where the slicer's one-column spaxel pitch leaves a combination of neighbours undetermined
    by a masked pixel, a weak first-difference prior along the spectrum (``mask_prior`` x the
    median N_uu, between consecutive wavelengths of the samples within two windows of the bad
    pixel only, see :func:`_prior_pairs`) picks the spectrally smooth solution.

    Slicer spaxels sit one column apart; where a row of them lies half a pixel off the pixel
    centres, their alternating pattern (+1, -1, +1, ...) puts +w and -w on every pixel and is
    invisible for a symmetric profile. With a halo-wide profile (a builder-made model) the
    normal matrix then has eigenvalues ~1e-8 of its largest (one per plane and crossing): the
    exact inverse amplifies the noise there without bound and CG never converges (it stopped at
    its iteration limit, the cube carrying a growing alternating noise). ``blend_prior`` (x
    sqrt(N_uu N_vv), scaled down by ``1 / (1 + (v / BLEND_VISIBILITY)^4)`` with ``v`` the
    pair's visibility of the alternation, see :func:`_blend_pairs`) picks the smooth solution
    in just those modes; elsewhere it is < 1e-3 of that and the fit stays the exact inverse
    (0: no prior; None, the default: ``BLEND_PRIOR``, or 0 when ``noise_tol`` is 0, i.e. when
    the caller asks for the exact inverse of noiseless data to round-off).

    Weights from the data's own Poisson variance favour pixels that fluctuated low and bias
    faint fluxes low (by several % summed over a lenslet field). With ``reweight`` = n > 0 the
    fit is repeated n times with the variance of the fitted model,
    ``read_variance + poisson_coef * max(A g, 0)`` (Horne 1986), starting from the previous
    solution. The first pass then only needs to be good to ~5 % of the noise; later passes
    recompute diag(N) and keep the normalised bands (they depend on the weights only through
    their variation across a window). The errors are those of the final weights.

    With ``background`` (:class:`~iris_tasks.ifs.background.BackgroundSpec`) the frame's
    residual 1/f background is fitted on the first pass's residual ``D - A g`` where the trace
    puts little light (slice gaps, spectrum ends, the space between lenslet spectra;
    :func:`~iris_tasks.ifs.background.fit_background`), subtracted from the data, and the
    fit repeated (at least one more pass, reweighted or not); ``result.background`` holds it.
    """
    t0 = time.perf_counter()
    shape = geom.shape
    for name, arr in (("data", data), ("variance", variance), ("good", good)):
        if np.shape(arr) != shape:
            raise ValueError(f"{name} has shape {np.shape(arr)}; the trace was built for {shape}")
    if reweight and (read_variance is None or poisson_coef is None):
        raise ValueError("reweight needs read_variance and poisson_coef")
    passes = int(reweight) + 1
    if background is not None:
        passes = max(passes, 2)
    if blend_prior is None:  # the exact inverse when asked to iterate to round-off
        blend_prior = BLEND_PRIOR if noise_tol > 0 else 0.0
    d, weight, ok = pixel_weights(data, variance, good)
    coverage = _coverage(geom, ok)
    pre, apply_n = _system(geom, weight, coverage, min_fit_coverage=min_fit_coverage,
                           mask_prior=mask_prior, blend_prior=blend_prior,
                           bandwidths=bandwidths)
    timings = {"setup": time.perf_counter() - t0, "solve": 0.0}
    flux = None
    bkg = None
    total_it = 0
    for rnd in range(passes):
        t1 = time.perf_counter()
        model = geom.project(flux) if rnd > 0 else None
        if model is not None and background is not None and bkg is None:
            light = geom.light()
            halo = (halo_image(model, background.halo_px, geom.half)
                    if background.halo_px > 0 else None)
            bkg = fit_background(d - model, weight,
                                 background_pixels(light, ok, background.max_light,
                                                   background.border, background.use_ends),
                                 background, lit=ok & (light > 0), halo=halo)
            del light, halo
            data = np.asarray(data, np.float64) - bkg.image
            if not reweight:  # same weights, corrected data
                d = np.where(ok, data, 0.0)
        if model is not None and reweight:
            model *= poisson_coef
            var = np.maximum(model, 0.0, out=model)
            var += read_variance
            d, weight, ok_new = pixel_weights(data, var, good)
            del model, var
            if not np.array_equal(ok_new, ok):
                ok = ok_new
                coverage = _coverage(geom, ok)
            blocks = normal_blocks(geom, weight, bandwidths=(0, 0),
                                   exclude=coverage < min_fit_coverage)
            diag, active = blocks.diag, blocks.active
            mask_pairs, blend_pairs = apply_n.pairs
            prior = _prior_weights(diag, active,
                                   None if mask_pairs is None else
                                   tuple(p & active for p in mask_pairs),
                                   mask_prior,
                                   None if blend_pairs is None else blend_pairs * active,
                                   blend_prior)
            m = geom.plane
            if prior[0] is not None:
                prior[0][:-1] *= active[1:]
            if prior[1] is not None:
                prior[1][:-m] *= active[m:]
            _add_prior(blocks, prior, m)
            pre.set_diagonal(diag, active)
            pairs = apply_n.pairs
            apply_n = _NormalOperator(geom, weight, active, prior, buffers=apply_n.buffers)
            apply_n.pairs = pairs
        active = apply_n.active
        n_active = int(active.sum())
        t2 = time.perf_counter()
        timings["setup"] += t2 - t1
        b = geom.adjoint(weight * d)
        b[~active] = 0.0
        last = rnd == passes - 1
        start = None if flux is None else np.where(active, flux, 0.0)
        flux = None  # the previous pass's solution lives on in start
        flux, it, converged, res = _pcg(apply_n, b, pre, rtol if last else max(rtol, 1e-4),
                                        noise_tol if last else max(noise_tol, 0.05), maxiter,
                                        n_active, x0=start, overwrite_b=True)
        del b, start
        flux[~active] = 0.0
        total_it += it
        timings["solve"] += time.perf_counter() - t2
        if last and not converged:
            log.warning("IFS extraction: CG stopped after %d iterations at relative residual "
                        "%.2e (rtol %.1e)", it, res, rtol)
    t3 = time.perf_counter()
    if want_variance:
        var, infl = pre.variance()
    else:
        var = np.full(geom.n, np.nan)
        infl = np.where(active, 1.0, np.inf)
    coverage = np.where(active, coverage, 0.0)
    timings["variance"] = time.perf_counter() - t3
    log.info("IFS extraction: %d unknowns (%d constrained), bands x=%d k=%d, %d CG iterations "
             "in %d pass(es), residual %.1e; setup %.2f s, solve %.2f s, errors %.2f s (%.2f s "
             "in all)", geom.n, n_active, pre.bx.kd, pre.bk.kd, total_it, passes, res,
             timings["setup"], timings["solve"], timings["variance"], time.perf_counter() - t0)
    cube = geom.cube_shape
    return ExtractionResult(flux=flux.reshape(cube), variance=var.reshape(cube),
                            coverage=coverage.reshape(cube), inflation=infl.reshape(cube),
                            iterations=total_it, converged=converged, residual=res,
                            timings=timings, background=bkg)


def aperture_variance(geom: TraceGeometry, variance: np.ndarray, good: np.ndarray,
                      aperture: np.ndarray, *, period: int = 6, rtol: float = 1e-6,
                      maxiter: int = 100, mask_prior: float = 1e-4,
                      blend_prior: float = BLEND_PRIOR, min_fit_coverage: float = 1e-3
                      ) -> np.ndarray:
    """Exact variance, per wavelength, of the fitted flux summed over ``aperture`` spaxels
    ((ny_s, nx_s) weights, e.g. a boolean mask), covariances between spaxels included.

    var_k = c_k^T N^-1 c_k with c_k the aperture in plane k. Planes ``period`` apart are
    probed in one solve: N^-1 decays fast along a spectrum (consecutive planes share one
    detector row), so their cross terms are negligible. Costs ``period`` CG solves: for
    analysis and tests, not the real-time path. Units: those of ``variance`` (before any
    throughput correction).
    """
    _, weight, ok = pixel_weights(np.zeros(geom.shape), variance, good)
    pre, apply_n = _system(geom, weight, _coverage(geom, ok), min_fit_coverage=min_fit_coverage,
                           mask_prior=mask_prior, blend_prior=blend_prior, bandwidths=None)
    ap = np.asarray(aperture, np.float64)
    out = np.zeros(geom.cube_shape[0])
    for start in range(period):
        c = np.zeros(geom.cube_shape)
        c[start::period] = ap
        c = c.reshape(-1) * apply_n.active
        z, _, _, _ = _pcg(apply_n, c, pre, rtol, 0.0, maxiter, 1)
        per_plane = (c * z).reshape(geom.cube_shape).sum(axis=(1, 2))
        out[start::period] = per_plane[start::period]
    return out
