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

i.e. the normal equations ``N g = A^T W D`` with ``N = A^T W A``. This is the spectro-
perfectionism idea (Bolton & Schlegel 2010) for a 2-D trace model: no boxcar, every pixel used
with its weight, neighbouring spaxels that blend on the detector (the slicer puts them one
column apart) fitted jointly. Nothing is regularised: on noiseless data the cube comes back to
round-off.

Solution: preconditioned conjugate gradients with ``N`` applied matrix-free as ``A^T (W (A g))``.
``A`` is stored once per trace as a CSC matrix ``X0`` with the ``2h + 1`` x-weights of every
sample placed in its first row ``y0``; the second row is the same matrix applied to ``f g``
and shifted down one detector row, so ``A g = S0 X0 ((1 - f) g) + S1 X0 (f g)``. The
preconditioner is a Kronecker-style product of two exact banded blocks of ``N``:

* the *x block*: couplings between samples of the same wavelength plane (neighbouring spaxels
  that share detector pixels; the slicer's strong blending), banded in cube order;
* the *k block*: couplings between consecutive wavelengths of one spaxel (they share the
  detector row between them), banded along each spectrum.

With ``D = diag(N)`` and the unit-diagonal blocks ``C_x = U_x^T U_x``, ``C_k = U_k^T U_k``
(banded Cholesky), ``P^-1 = D^-1/2 U_x^-1 U_k^-1 U_k^-T U_x^-T D^-1/2`` is symmetric positive
definite by construction and equals ``N^-1`` when ``N`` is separable; the trace is nearly
so, and CG needs a handful of iterations.

Variances: ``var(g_u) = (N^-1)_uu``. It is estimated from the same separable model,
``(N^-1)_uu ~ D_uu (M_x^-1)_uu (M_k^-1)_uu`` with ``M_x``, ``M_k`` the two banded blocks, whose
inverse diagonals are computed exactly (Takahashi's recurrence on the banded Cholesky
factor). For spectra that share no pixel with another spaxel (the lenslet on the real
detector) ``M_x`` is diagonal and the result is the exact ``(N^-1)_uu``; for the slicer it is
exact for a separable ``N`` and tested against Monte-Carlo scatter. Neighbouring slicer
spaxels are anti-correlated (the deconvolution), so sums over spaxels are better than the
quadrature sum of their errors: :func:`aperture_variance` gives the exact variance of such a
sum with a few extra solves.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack
from scipy.special import erf

log = logging.getLogger(__name__)

__all__ = [
    "ExtractionResult", "TraceGeometry", "aperture_variance", "build_geometry", "extract",
    "normal_operator",
]

# Samples per pixel of the x-weight table: linear interpolation between nodes 1/16384 pixel
# apart is within ~1e-9 of the erf values (second derivative <= 0.5 / sigma^2), far below the
# float32 precision of the trace positions themselves, and ~5x cheaper than 8 erf per sample.
_TABLE_STEPS = 16384
# Couplings below this fraction of sqrt(N_uu N_vv) are left out of the banded blocks (they
# only shape the preconditioner and the variance estimate; the solution uses the exact N).
BAND_TOL = 1e-3
# Samples per chunk in the block computations (bounds the temporaries to ~100 MB).
_CHUNK = 1 << 20


@lru_cache(maxsize=8)
def _profile_table(sigma: float, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-integrated Gaussian weights of the 2 half + 1 columns around rint(x),
    tabulated against phi = x - rint(x) in [-0.5, 0.5]: (values, slopes) of shape (steps+1, nb)."""
    phi = np.linspace(-0.5, 0.5, _TABLE_STEPS + 1)
    s2 = math.sqrt(2.0) * sigma
    edges = (np.arange(-half, half + 2) - 0.5)[None, :] - phi[:, None]
    cdf = erf(edges / s2)
    w = 0.5 * np.diff(cdf, axis=1)
    w /= w.sum(axis=1, keepdims=True)
    slope = np.empty_like(w)
    slope[:-1] = np.diff(w, axis=0)
    slope[-1] = 0.0
    return w, slope


def _x_weights(xc: np.ndarray, sigma: float, half: int) -> tuple[np.ndarray, np.ndarray]:
    """(first column, weights (n, nb)) of the truncated, renormalised profile at ``xc``."""
    table, slope = _profile_table(float(sigma), int(half))
    xr = np.rint(xc)
    pos = (xc - xr + 0.5) * _TABLE_STEPS
    node = np.clip(pos.astype(np.int64), 0, _TABLE_STEPS)
    frac = (pos - node)[:, None]
    w = table[node]
    w += frac * slope[node]
    return (xr - half).astype(np.int64), w


@dataclass
class TraceGeometry:
    """The design matrix of one trace on one detector shape (independent of the frame).

    Samples are in cube order: ``s = (k * ny_s + j) * nx_s + i`` for the cube (nwave, ny_s, nx_s).
    """

    shape: tuple[int, int]  # detector (ny, nx)
    cube_shape: tuple[int, int, int]  # (nwave, ny_s, nx_s)
    half: int
    xs: np.ndarray  # (n,) int64 first column of each sample's x window
    y0: np.ndarray  # (n,) int64 first detector row
    fy: np.ndarray  # (n,) float64 weight of the second row
    wx: np.ndarray  # (n, nb) float64 x-weights; 0 where the window leaves the detector
    on_detector: np.ndarray  # (n,) bool: the sample puts some weight on the detector
    X0: sp.csc_matrix = field(repr=False)  # ((ny + 1) * nx, n): weights at padded row y0 + 1

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
        """A @ flux: the detector image (ny, nx) of per-sample fluxes (cube order)."""
        ny, nx = self.shape
        g = np.asarray(flux, dtype=np.float64).ravel()
        top = self.X0 @ (g * (1.0 - self.fy))
        bottom = self.X0 @ (g * self.fy)
        # padded row r + 1 holds detector row r for the first-row weights; the second-row
        # weights belong one detector row further down.
        image = top[nx:]
        image += bottom[: ny * nx]
        return image.reshape(ny, nx)

    def adjoint(self, image: np.ndarray, _buf: np.ndarray | None = None) -> np.ndarray:
        """A^T @ image (cube order)."""
        ny, nx = self.shape
        v = np.asarray(image, dtype=np.float64).ravel()
        buf = np.zeros((ny + 1) * nx) if _buf is None else _buf
        buf[:nx] = 0.0
        buf[nx:] = v
        first = self.X0.T @ buf
        buf[ny * nx:] = 0.0
        buf[: ny * nx] = v
        second = self.X0.T @ buf
        first *= 1.0 - self.fy
        first += second * self.fy
        return first


def build_geometry(trace_x: np.ndarray, trace_y: np.ndarray, psf_sigma: float,
                   shape: tuple[int, int]) -> TraceGeometry:
    """The design matrix of the trace (TRACE_X/TRACE_Y of shape (ny_s, nx_s, nwave), 0-based
    pixel centres) on a detector of ``shape``."""
    tx = np.asarray(trace_x, dtype=np.float32)  # the reference precision (native byte order)
    ty = np.asarray(trace_y, dtype=np.float32)
    if tx.ndim != 3 or tx.shape != ty.shape:
        raise ValueError(f"trace_x {tx.shape} and trace_y {ty.shape} must be equal (ny, nx, nwave)")
    if not (np.isfinite(psf_sigma) and psf_sigma > 0):
        raise ValueError(f"psf_sigma must be positive, got {psf_sigma!r}")
    ny_s, nx_s, nw = tx.shape
    ny, nx = (int(v) for v in shape)
    half = int(math.ceil(4.0 * psf_sigma))
    nb = 2 * half + 1
    n = nw * ny_s * nx_s
    # cube order (k, j, i)
    xc = np.moveaxis(tx, 2, 0).astype(np.float64).ravel()
    yc = np.moveaxis(ty, 2, 0).astype(np.float64).ravel()
    if not (np.isfinite(xc).all() and np.isfinite(yc).all()):
        raise ValueError("trace positions contain NaN or infinite values")
    xs = np.empty(n, np.int64)
    wx = np.empty((n, nb), np.float64)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        xs[lo:hi], wx[lo:hi] = _x_weights(xc[lo:hi], psf_sigma, half)
    y0f = np.floor(yc)
    fy = yc - y0f
    y0 = y0f.astype(np.int64)
    del xc, yc, y0f
    # Rows y0 (weight 1 - fy) and y0 + 1 (weight fy) on the detector: the padded row y0 + 1
    # must lie in [0, ny] and some row with weight must be a detector row.
    rows_ok = (y0 >= -1) & (y0 <= ny - 1)
    row_weight = np.where(y0 >= 0, 1.0 - fy, 0.0) + np.where(y0 + 1 <= ny - 1, fy, 0.0)
    cols = xs[:, None] + np.arange(nb)
    col_ok = (cols >= 0) & (cols < nx)
    col_ok &= rows_ok[:, None]
    wx[~col_ok] = 0.0
    on_detector = rows_ok & (row_weight > 0) & (wx.sum(axis=1) > 0)
    index = np.where(col_ok, (y0 + 1)[:, None] * nx + cols, 0)
    del cols, col_ok
    big = n * nb > np.iinfo(np.int32).max or (ny + 1) * nx > np.iinfo(np.int32).max
    itype = np.int64 if big else np.int32
    indices = index.astype(itype).ravel()
    del index
    indptr = np.arange(0, n * nb + 1, nb, dtype=itype)
    X0 = sp.csc_matrix((wx.reshape(-1), indices, indptr), shape=((ny + 1) * nx, n))
    return TraceGeometry(shape=(ny, nx), cube_shape=(nw, ny_s, nx_s), half=half, xs=xs, y0=y0,
                         fy=fy, wx=wx, on_detector=on_detector, X0=X0)


# ---------------------------------------------------------------------- banded blocks of N
def _padded_weights(weight: np.ndarray) -> np.ndarray:
    """W with one zero row above and below, flattened: X0 row index + a * nx -> row y0 + a."""
    ny, nx = weight.shape
    pad = np.zeros((ny + 2) * nx)
    pad[nx:(ny + 1) * nx] = weight.ravel()
    return pad


def _diagonal(geom: TraceGeometry, wpad: np.ndarray) -> np.ndarray:
    """diag(N) = sum over the sample's pixels of weight^2 W."""
    nx = geom.shape[1]
    out = np.empty(geom.n)
    idx = geom.X0.indices.reshape(geom.n, geom.nb)
    for lo in range(0, geom.n, _CHUNK):
        hi = min(geom.n, lo + _CHUNK)
        w2 = geom.wx[lo:hi] ** 2
        fy = geom.fy[lo:hi]
        d0 = np.einsum("ub,ub->u", w2, wpad[idx[lo:hi]])
        d1 = np.einsum("ub,ub->u", w2, wpad[idx[lo:hi] + nx])
        out[lo:hi] = (1.0 - fy) ** 2 * d0 + fy**2 * d1
    return out


def _coupling(geom: TraceGeometry, wpad: np.ndarray, stride: int, same_block) -> np.ndarray:
    """N[u, u + stride] for every u (0 where u + stride is out of range or another block).

    Two samples share pixels only in a common detector row: rows y0_u + a and y0_v + a' with
    a - a' = y0_v - y0_u in {-1, 0, 1}; in that row the x-windows overlap where the column
    offset c = xs_v - xs_u is smaller than the window.
    """
    n, nb, nx = geom.n, geom.nb, geom.shape[1]
    out = np.zeros(n)
    if stride >= n:
        return out
    idx = geom.X0.indices.reshape(n, nb)
    for lo in range(0, n - stride, _CHUNK):
        hi = min(n - stride, lo + _CHUNK)
        u = slice(lo, hi)
        v = slice(lo + stride, hi + stride)
        dy = geom.y0[v] - geom.y0[u]
        c = geom.xs[v] - geom.xs[u]
        ok = (np.abs(dy) <= 1) & (np.abs(c) < nb) & same_block(lo, hi)
        if not ok.any():
            continue
        sel = np.flatnonzero(ok)
        wu, wv = geom.wx[u][sel], geom.wx[v][sel]
        iu = idx[u][sel]
        q0 = wu * wpad[iu]  # weight x W in the sample's first row
        q1 = wu * wpad[iu + nx]  # ... and in its second row
        cs, dys = c[sel], dy[sel]
        s0 = np.zeros(sel.size)
        s1 = np.zeros(sel.size)
        for cval in np.unique(cs):
            m = cs == cval
            every = bool(m.all())
            b0, b1 = max(0, int(cval)), min(nb, nb + int(cval))
            wvs = (wv if every else wv[m])[:, b0 - cval:b1 - cval]
            q0s = (q0 if every else q0[m])[:, b0:b1]
            q1s = (q1 if every else q1[m])[:, b0:b1]
            s0[m] = np.einsum("ub,ub->u", q0s, wvs)
            s1[m] = np.einsum("ub,ub->u", q1s, wvs)
        fu, fv = geom.fy[u][sel], geom.fy[v][sel]
        val = np.where(dys == 0, (1 - fu) * (1 - fv) * s0 + fu * fv * s1,
                       np.where(dys == 1, fu * (1 - fv) * s1, (1 - fu) * fv * s0))
        out[lo + sel] = val
    return out


@dataclass
class _Band:
    """A banded block of N (unit-diagonal normalised) and its Cholesky factor.

    ``order`` 'cube' means the band runs along the cube order (x block, blocks = planes);
    'spectrum' means along each spaxel's spectrum (k block): vectors are transposed to
    spaxel-major order before the LAPACK calls.
    """

    order: str
    kd: int
    factor: np.ndarray | None  # LAPACK upper band storage (kd + 1, n) of U, C = U^T U
    shape2: tuple[int, int]  # (nwave, nspaxel)

    def _to(self, v: np.ndarray) -> np.ndarray:
        if self.order == "cube":
            return v
        nw, m = self.shape2
        return np.ascontiguousarray(v.reshape(nw, m).T).ravel()

    def _back(self, v: np.ndarray) -> np.ndarray:
        if self.order == "cube":
            return v
        nw, m = self.shape2
        return np.ascontiguousarray(v.reshape(m, nw).T).ravel()

    def solve(self, v: np.ndarray, trans: str) -> np.ndarray:
        """U^-1 v ('N') or U^-T v ('T')."""
        if self.factor is None:
            return v
        x, info = lapack.dtbtrs(self.factor, self._to(v)[:, None], uplo="U", trans=trans)
        if info != 0:
            raise np.linalg.LinAlgError(f"banded triangular solve failed (info={info})")
        return self._back(x[:, 0])

    def diag_inverse(self) -> np.ndarray:
        """diag(C^-1) (cube order) by Takahashi's recurrence on the factor, vectorised over
        the independent blocks (planes or spectra)."""
        nw, m = self.shape2
        if self.factor is None:
            return np.ones(nw * m)
        nblocks, length = (nw, m) if self.order == "cube" else (m, nw)
        kd = self.kd
        U = self.factor.reshape(kd + 1, nblocks, length)
        # z[e][:, i] = Z[i, i + e] within each block
        z = np.zeros((kd + 1, nblocks, length))
        for i in range(length - 1, -1, -1):
            uii = U[kd, :, i]
            top = min(kd, length - 1 - i)
            for e in range(top, -1, -1):
                acc = np.zeros(nblocks)
                for t in range(1, top + 1):
                    uit = U[kd - t, :, i + t]  # U[i, i + t]
                    # Z[i + t, i + e] = Z[min, min + |e - t|]
                    acc += uit * z[abs(e - t), :, i + min(t, e)]
                if e == 0:
                    z[0, :, i] = (1.0 / uii - acc) / uii
                else:
                    z[e, :, i] = -acc / uii
        d = z[0].ravel()
        return d if self.order == "cube" else self._back(d)


def _band(geom: TraceGeometry, wpad: np.ndarray, diag: np.ndarray, order: str,
          max_kd: int, tol: float = BAND_TOL) -> _Band:
    """The normalised banded block along ``order`` and its Cholesky factor."""
    nw, ny_s, nx_s = geom.cube_shape
    m = ny_s * nx_s
    n = geom.n
    if order == "cube":
        stride0 = 1

        def same_block(lo, hi, d):
            u = np.arange(lo, hi)
            return (u // m) == ((u + d) // m)
    else:
        stride0 = m

        def same_block(lo, hi, d):
            return np.ones(hi - lo, bool)
    scale = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 0.0)
    rows = []
    for d in range(1, max_kd + 1):
        stride = stride0 * d
        if stride >= n:
            break
        raw = _coupling(geom, wpad, stride, lambda lo, hi, d=d: same_block(lo, hi, d))
        norm = raw * scale
        norm[: n - stride] *= scale[stride:]
        norm[n - stride:] = 0.0
        if not np.any(np.abs(norm) > tol):
            break
        rows.append(norm)
    kd = len(rows)
    shape2 = (nw, m)
    if kd == 0:
        return _Band(order, 0, None, shape2)
    band = np.zeros((kd + 1, n), order="F")  # LAPACK layout: no copy in dpbtrf
    band[kd] = 1.0
    for e, norm in enumerate(rows, start=1):
        # entry (u, u + e) in upper storage row kd - e at column u + e
        if order == "cube":
            band[kd - e, e:] = norm[: n - e * stride0]
        else:
            # spaxel-major order: sample (k, s) -> position s * nw + k
            nrm = norm.reshape(nw, m)  # coupling of (k, s) with (k + e, s)
            col = np.zeros((m, nw))
            col[:, e:] = nrm[: nw - e].T
            band[kd - e] = col.ravel()
    del rows
    factor, info = lapack.dpbtrf(band, lower=0, overwrite_ab=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"banded Cholesky of the {order} block failed (info={info})")
    return _Band(order, kd, factor, shape2)


# ---------------------------------------------------------------------- the solve
def normal_operator(geom: TraceGeometry, weight: np.ndarray, active: np.ndarray | None = None):
    """g -> N g = A^T W A g restricted to ``active`` samples (others map to themselves)."""
    w = np.asarray(weight, np.float64).reshape(geom.shape)
    buf = np.zeros((geom.shape[0] + 1) * geom.shape[1])

    def apply(g: np.ndarray) -> np.ndarray:
        if active is not None:
            g = np.where(active, g, 0.0)
        out = geom.adjoint(w * geom.project(g), buf)
        if active is not None:
            out = np.where(active, out, 0.0)
        return out

    return apply


@dataclass
class ExtractionResult:
    """Per-sample results in cube order, reshaped to the cube by :meth:`cube`."""

    flux: np.ndarray  # (nwave, ny_s, nx_s) fitted flux (detector units, before throughput)
    variance: np.ndarray  # estimated (N^-1)_uu
    coverage: np.ndarray  # fraction of the sample's profile weight on usable pixels
    iterations: int
    converged: bool
    residual: float  # final preconditioned residual, relative to the start
    timings: dict[str, float]


class _Preconditioner:
    def __init__(self, diag: np.ndarray, active: np.ndarray, bx: _Band, bk: _Band):
        self.dinv = np.where(active, 1.0 / np.sqrt(np.where(active, diag, 1.0)), 0.0)
        self.bx, self.bk = bx, bk

    def __call__(self, r: np.ndarray) -> np.ndarray:
        z = r * self.dinv
        z = self.bx.solve(z, "T")
        z = self.bk.solve(z, "T")
        z = self.bk.solve(z, "N")
        z = self.bx.solve(z, "N")
        z *= self.dinv
        return z


def _pcg(apply_n, b: np.ndarray, precond, x0: np.ndarray | None, rtol: float, noise_tol: float,
         maxiter: int, n_active: int) -> tuple[np.ndarray, int, bool, float]:
    """Preconditioned CG. Stops when r^T P^-1 r (~ the error's N-norm squared) falls below
    rtol^2 of its start, or below noise_tol^2 per unknown (an error of noise_tol sigma rms:
    the solution noise itself has N-norm^2 = number of unknowns)."""
    x = np.zeros_like(b) if x0 is None else x0.copy()
    r = b - apply_n(x) if x0 is not None else b.copy()
    z = precond(r)
    rz = float(r @ z)
    start = rz if rz > 0 else 1.0
    target = max(rtol**2 * start, noise_tol**2 * max(n_active, 1))
    p = z.copy()
    it = 0
    while rz > target and it < maxiter:
        q = apply_n(p)
        pq = float(p @ q)
        if not pq > 0:
            break
        alpha = rz / pq
        x += alpha * p
        r -= alpha * q
        z = precond(r)
        rz_new = float(r @ z)
        p *= rz_new / rz
        p += z
        rz = rz_new
        it += 1
    return x, it, rz <= target, math.sqrt(max(rz, 0.0) / start)


def _coverage(geom: TraceGeometry, good: np.ndarray) -> np.ndarray:
    """Fraction of each sample's profile weight that falls on usable detector pixels."""
    g = good.astype(np.float64)
    reach = geom.adjoint(g)
    total = geom.adjoint(np.ones(geom.shape))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, reach / total, 0.0)


def extract(geom: TraceGeometry, data: np.ndarray, variance: np.ndarray, good: np.ndarray, *,
            rtol: float = 1e-8, noise_tol: float = 1e-3, maxiter: int = 200,
            x0: np.ndarray | None = None, want_variance: bool = True) -> ExtractionResult:
    """Weighted least-squares fluxes of every cube sample from a detector image.

    ``data``/``variance``: (ny, nx) in any consistent units (variance in units^2); ``good``:
    pixels that may be used (False -> weight 0). Non-finite data or variance <= 0 are unusable.
    Samples without any usable pixel are left out of the fit (flux 0, coverage 0).
    """
    t0 = time.perf_counter()
    shape = geom.shape
    d = np.asarray(data, dtype=np.float64)
    v = np.asarray(variance, dtype=np.float64)
    if d.shape != shape or v.shape != shape or np.shape(good) != shape:
        raise ValueError(f"data {d.shape}, variance {v.shape}, good {np.shape(good)} must all be "
                         f"the detector shape {shape}")
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.asarray(good, bool) & np.isfinite(d) & np.isfinite(v) & (v > 0)
        weight = np.where(ok, 1.0 / np.where(ok, v, 1.0), 0.0)
    d = np.where(ok, d, 0.0)
    wpad = _padded_weights(weight)
    timings: dict[str, float] = {}
    diag = _diagonal(geom, wpad)
    active = (diag > 0) & geom.on_detector
    n_active = int(active.sum())
    nw, ny_s, nx_s = geom.cube_shape
    # k block: consecutive wavelengths share one detector row -> usually tridiagonal;
    # x block: spaxels within the reach of two windows.
    bx = _band(geom, wpad, np.where(active, diag, 0.0), "cube", max_kd=2 * geom.half)
    bk = _band(geom, wpad, np.where(active, diag, 0.0), "spectrum", max_kd=4)
    timings["setup"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    apply_n = normal_operator(geom, weight, active)
    b = geom.adjoint(weight * d)
    b[~active] = 0.0
    pre = _Preconditioner(diag, active, bx, bk)
    flux, it, converged, res = _pcg(apply_n, b, pre, x0, rtol, noise_tol, maxiter, n_active)
    flux[~active] = 0.0
    timings["solve"] = time.perf_counter() - t1
    if not converged:
        log.warning("IFS extraction: CG stopped after %d iterations at relative residual %.2e "
                    "(rtol %.1e)", it, res, rtol)
    t2 = time.perf_counter()
    if want_variance:
        # D_uu (M_x^-1)_uu (M_k^-1)_uu with M = D^1/2 C D^1/2 is diag(C_x^-1) diag(C_k^-1) / D.
        var = bx.diag_inverse() * bk.diag_inverse()
        var = np.where(active, var / np.where(active, diag, 1.0), np.inf)
    else:
        var = np.full(geom.n, np.nan)
    coverage = _coverage(geom, ok)
    timings["variance"] = time.perf_counter() - t2
    log.info("IFS extraction: %d unknowns (%d constrained), %d CG iterations, residual %.1e, "
             "setup %.2f s, solve %.2f s, variance %.2f s", geom.n, n_active, it, res,
             timings["setup"], timings["solve"], timings["variance"])
    cube = (nw, ny_s, nx_s)
    return ExtractionResult(flux=flux.reshape(cube), variance=var.reshape(cube),
                            coverage=coverage.reshape(cube), iterations=it, converged=converged,
                            residual=res, timings=timings)


def aperture_variance(geom: TraceGeometry, variance: np.ndarray, good: np.ndarray,
                      aperture: np.ndarray, *, period: int = 6, rtol: float = 1e-6,
                      maxiter: int = 200) -> np.ndarray:
    """Exact variance (per wavelength) of the spectrum summed over ``aperture`` spaxels
    ((ny_s, nx_s) weights, e.g. a boolean mask), including the covariance between spaxels.

    var_k = c_k^T N^-1 c_k with c_k the aperture at plane k. Planes ``period`` apart are
    probed together (one solve for every ``period``-th plane): N^-1 decays fast along the
    spectrum (consecutive planes share one detector row), so the cross terms between probed
    planes are negligible. Costs ``period`` CG solves; meant for analysis and tests, not for
    the real-time path.
    """
    v = np.asarray(variance, dtype=np.float64)
    ok = np.asarray(good, bool) & np.isfinite(v) & (v > 0)
    weight = np.where(ok, 1.0 / np.where(ok, v, 1.0), 0.0)
    wpad = _padded_weights(weight)
    diag = _diagonal(geom, wpad)
    active = (diag > 0) & geom.on_detector
    bx = _band(geom, wpad, np.where(active, diag, 0.0), "cube", max_kd=2 * geom.half)
    bk = _band(geom, wpad, np.where(active, diag, 0.0), "spectrum", max_kd=4)
    pre = _Preconditioner(diag, active, bx, bk)
    apply_n = normal_operator(geom, weight, active)
    nw = geom.cube_shape[0]
    ap = np.asarray(aperture, np.float64)
    out = np.zeros(nw)
    for start in range(period):
        c = np.zeros(geom.cube_shape)
        c[start::period] = ap
        c = c.ravel() * active
        z, _, _, _ = _pcg(apply_n, c, pre, None, rtol, 0.0, maxiter, 1)
        prod = (c * z).reshape(geom.cube_shape).sum(axis=(1, 2))
        out[start::period] = prod[start::period]
    return out
