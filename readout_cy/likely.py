"""Generalised least-squares ramp fit with the full covariance of the read differences.

For a ramp of single-frame reads at a uniform spacing dt, the differences d_k = y_{k+1} - y_k
(k = 0..nd-1) have mean b dt and covariance

    C = a I + rn^2 T,    a = b dt / gain (shot noise: one independent term per difference),
    T = tridiag(-1, 2, -1) (each read's noise is shared by the two differences around it).

The best linear unbiased slope is b = 1'C^-1 d / (dt 1'C^-1 1), variance 1 / (dt^2 1'C^-1 1)
-- the covariance-aware fit in the spirit of Brandt (2024) and stcal's ``LIKELY`` (written
from the method, not their code).  T is diagonalised by the discrete sine basis
(V_ik = sqrt(2/(nd+1)) sin(pi i k/(nd+1)), eigenvalues 2 - 2 cos(pi k/(nd+1))), so C^-1 for
every pixel is a diagonal in that basis: the fit is one (nd x nd) @ (nd x npix) product and a
few element-wise operations per pixel.  ``a`` comes from the pixel's rate, estimated first by
the unweighted mean difference and refined once with the GLS estimate.

Pixels with a jump or a saturated read keep the segment-wise fit of :func:`fit_slopes`
(optimal weighting); only complete, clean ramps are re-fitted.  numpy only (no kernel, no
twin: it is its own reference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._api import DQFlags, RampResult, _as_ramps_float, _map, _times, fit_slopes


def _sine_basis(nd: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(1, nd + 1)
    v = np.sqrt(2.0 / (nd + 1)) * np.sin(np.pi * np.outer(i, i) / (nd + 1))
    lam = 2.0 - 2.0 * np.cos(np.pi * i / (nd + 1))
    return v, lam


def fit_slopes_gls(
    data: np.ndarray,
    read_times: Sequence[float] | np.ndarray,
    *,
    gain: Any,
    read_noise: Any,
    dqflags: DQFlags | Mapping[str, int],
    ngood: Any = None,
    jumps: np.ndarray | None = None,
    refpix_var: Any = None,
    iterations: int = 2,
) -> RampResult:
    """Slopes of corrected reads (float DN, (nreads, ny, nx), one ramp) by generalised least
    squares with the read-difference covariance (see the module docstring).

    Same inputs and result as :func:`readout_cy.fit_slopes` (``refpix_var`` adds to rn^2
    for the clean pixels too); ``var_poisson`` / ``var_rnoise`` are the shot- and read-noise
    parts of the GLS variance.  Needs uniformly spaced reads.
    """
    d4 = _as_ramps_float(data)
    if d4.shape[0] != 1:
        raise ValueError("fit_slopes_gls fits one ramp (nreads, ny, nx)")
    _, nr, ny, nx = d4.shape
    t = _times(read_times, nr)
    if nr < 3:
        raise ValueError("fit_slopes_gls needs at least 3 reads")
    dts = np.diff(t)
    if not np.allclose(dts, dts[0], rtol=1e-6):
        raise ValueError("fit_slopes_gls needs uniformly spaced reads")
    dt = float(dts[0])
    base = fit_slopes(data, read_times, gain=gain, read_noise=read_noise, dqflags=dqflags,
                      ngood=ngood, jumps=jumps, refpix_var=refpix_var)
    g = np.broadcast_to(_map("gain", gain, ny, nx, minimum=0, strict=True, allow_nan=True)
                        .reshape(() if np.ndim(gain) == 0 else (ny, nx)), (ny, nx))
    rn = np.broadcast_to(_map("read_noise", read_noise, ny, nx, minimum=0)
                         .reshape(() if np.ndim(read_noise) == 0 else (ny, nx)), (ny, nx))
    rn2 = rn.astype(np.float64) ** 2
    if refpix_var is not None:
        rv = np.asarray(refpix_var, np.float64)
        rn2 = rn2 + np.repeat(rv, nx // rv.shape[1], axis=1)
    clean = np.isfinite(base.slope) & np.isfinite(g)
    clean &= (base.dq & np.uint32(_bits(dqflags, "SATURATED") | _bits(dqflags, "JUMP_DET"))) == 0
    if not clean.any():
        return base
    d = np.diff(d4[0].astype(np.float64), axis=0)[:, clean]  # (nd, npix)
    nd = nr - 1
    v, lam = _sine_basis(nd)
    u = v.T @ np.ones(nd)  # V'1
    p = v.T @ d  # V'd
    r2 = rn2[clean][None, :]
    gc = g[clean].astype(np.float64)[None, :]
    b = d.mean(axis=0) / dt
    for _ in range(max(int(iterations), 1)):
        a = np.maximum(b, 0.0)[None, :] * dt / gc
        inv = 1.0 / (a + r2 * lam[:, None])  # (nd, npix)
        s = (u[:, None] ** 2 * inv).sum(axis=0)
        b = (u[:, None] * p * inv).sum(axis=0) / (dt * s)
    a = np.maximum(b, 0.0)[None, :] * dt / gc
    inv = 1.0 / (a + r2 * lam[:, None])
    s = (u[:, None] ** 2 * inv).sum(axis=0)
    b = (u[:, None] * p * inv).sum(axis=0) / (dt * s)
    q = (u[:, None] ** 2 * inv * inv)
    norm = 1.0 / (s * dt) ** 2
    var_r = (r2 * lam[:, None] * q).sum(axis=0) * norm
    var_p = (a * q).sum(axis=0) * norm
    base.slope[clean] = b.astype(np.float32)
    base.var_poisson[clean] = var_p.astype(np.float32)
    base.var_rnoise[clean] = var_r.astype(np.float32)
    base.err[clean] = np.sqrt(var_p + var_r).astype(np.float32)
    return base


def _bits(dqflags: DQFlags | Mapping[str, int], name: str) -> int:
    if isinstance(dqflags, DQFlags):
        return int(getattr(dqflags, name.lower()))
    return int(dqflags[name])
