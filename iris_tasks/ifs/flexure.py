"""Per-frame flexure of the IFS: the frame's offset from the reference instrument model.

Between the afternoon calibrations and a science frame the spectra move on the detector by
tenths of a pixel (flexure, temperature). The extraction's model (the ``ifstrace`` reference)
must be moved with them: a 0.1 px cross-dispersion error costs a slicer cube 7 % of a point
source's peak, and any shift along the dispersion goes one-to-one into the wavelengths
(docs/ifs.md, "Flexure"). This module measures the offset from the frame itself:

``dx`` (across the dispersion) - from the lit/unlit pattern
    In a sample of detector rows, the pixels around each spectrum are fitted with the
    reference profile (:class:`~iris_tasks.ifs.profile.CrossProfile`) at the reference
    positions moved by ``dx``, with free amplitudes, and ``dx`` by Gauss-Newton on the
    variable-projection residual (the amplitudes solved exactly at every step, so the frame's
    content does not matter, only the shape of its light across the spectra). Lenslet: every
    spectrum has its own amplitude in every row (its two sides constrain the shift). Slicer:
    the spaxels of a slice sit one column apart and fill the slice; a shift there is the same
    as a scene shifted along the slice, except at the slice edges - so only the pixels at
    the two ends of each slice and in the gaps are used, with an amplitude linear along the
    slice over the outermost spaxels (a smooth scene there; the step is where the shift is
    seen). With ``fit_rotation`` the shift may change linearly with the row (a rotation
    about the detector centre).
``dy`` (along the dispersion) - from the OH sky lines and the ends of the spectra
    A flux per row is summed in a box around the spectra of a subset of spaxels (lenslet:
    no wider than half the pitch, fixed over a window). OH: in a window around each strong
    line of the published list (Rousselot et al. 2000,
    :func:`iris_tasks.instrument.lines.oh_lines`) the row spectra of all the spaxels are
    fitted with the line pattern the reference model predicts - every line of the list in
    that window with its listed relative intensity, Gaussian in wavelength, integrated over
    the reference wavelength bins and split between rows as the extraction splits a sample
    (linear interpolation between rows) - moved by ``dy`` rows, with ONE amplitude per
    window for all the spaxels (the sky is the same everywhere; times each spaxel's
    throughput and, lenslet, the share of its profile in the box), a quadratic continuum
    per spaxel and window (a science spectrum's shape), a common line width fitted too. Each
    window gives its own ``dy``; the result is their sigma-clipped weighted mean, its error
    the larger of the formal one and the windows' scatter. A faint sky is reported as not
    measured (4 mas lenslet, 10 x 30 s: the strongest window at 4-9 sigma summed over 256
    spaxels, 2026-12-07), never as a precise wrong value. This also fixes the wavelength
    zero point: the
    lines land where the reference wavelength solution says. Ends: where a spectrum starts
    and stops (the filter's band edges) a smooth continuum makes a one-row ramp in the row
    sum; its position gives ``dy`` without lines (used when the frame has too few lines).

The fit sees only a sample of the frame (a few hundred rows for ``dx``, a few hundred spaxels
for ``dy``): the offsets are two numbers, and their noise from a 4k frame's sky is far below
their systematic limits where the sky is bright (slicer); the 4 mas lenslet's sky is too faint
for either axis (its continuum at ~0.1 sigma per spectrum and row), the science source then
gives dx. Everything that depends only on the trace is prepared once per
reference (:class:`FlexureModel`); a frame costs the gathers and small batched solves.

Arrays only; :class:`iris_tasks.ifs.flexure_step.FlexureStep` is the stpipe layer.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.linalg import cho_solve_banded, cholesky_banded
from scipy.special import ndtr

from .profile import CrossProfile

log = logging.getLogger(__name__)

__all__ = ["METHODS", "FlexureFit", "FlexureModel", "fit_flexure", "shifted_trace"]

METHODS = ("auto", "lit", "oh", "none")

# Default budget of the x fit: about this many (row, spectrum) entries are sampled. The
# lenslet's spectra are isolated peaks and each entry measures the shift well (25k entries:
# +-0.0015 px on the realistic 4 mas frames, 1k and 4k); the slicer sees the shift only at
# the slice edges.
_DX_ENTRIES = {"LENSLET": 25_000, "SLICER": 60_000}
# Spaxels whose row spectra the y fit sums (spread over the field).
_DY_SPAXELS = 256


# ---------------------------------------------------------------------- results
@dataclass(frozen=True)
class FlexureFit:
    """The frame's offset from the reference model (pixels; rotation in radians).

    The trace to extract with is ``x' = x + dx - rotation (y - yc)``,
    ``y' = y + dy + rotation (x - xc)`` (:func:`shifted_trace`), (xc, yc) the detector
    centre. ``method`` says what measured each axis: 'LIT+OH', 'LIT+ENDS', 'LIT', 'OH',
    'ENDS' or 'NONE' (an axis not measured is 0 with error 0 and a warning in ``messages``),
    with PRIORX / PRIORY for an axis taken from a prior instead ('LIT+PRIORY').
    """

    dx: float
    dy: float
    dx_err: float
    dy_err: float
    method: str
    rotation: float = 0.0
    rotation_err: float = 0.0
    dy_oh: float | None = None  # dy from the OH lines alone (rows), if measured
    dy_oh_err: float | None = None
    n_lines: int = 0  # OH windows kept in the dy mean
    line_width: float | None = None  # fitted Gaussian sigma of the OH lines (wavelength bins)
    dy_ends: float | None = None  # dy from the spectrum ends alone, if measured
    dy_ends_err: float | None = None
    dx_groups: int = 0  # row groups (spectra or slice edges) in the x fit
    chi2_dx: float | None = None  # reduced chi^2 of the x fit
    messages: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)


def shifted_trace(trace_x: np.ndarray, trace_y: np.ndarray, dx: float, dy: float,
                  rotation: float = 0.0, shape: tuple[int, int] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The reference trace moved by a flexure offset (float64 copies): ``x + dx - rot (y - yc)``,
    ``y + dy + rot (x - xc)`` with (xc, yc) the centre of a detector of ``shape`` (needed
    only with a rotation)."""
    tx = np.asarray(trace_x, np.float64)
    ty = np.asarray(trace_y, np.float64)
    if rotation:
        if shape is None:
            raise ValueError("a rotation needs the detector shape (its centre)")
        yc, xc = (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0
        return tx + dx - rotation * (ty - yc), ty + dy + rotation * (tx - xc)
    return tx + dx, ty + dy


# ---------------------------------------------------------------------- batched least squares
def _bsolve(M: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """M^-1 rhs for batches of small SPD matrices M (G, Q, Q), rhs (G, Q, K) (closed forms
    for Q <= 2: numpy's batched LAPACK calls cost more than the arithmetic there)."""
    Q = M.shape[1]
    if Q == 1:
        return rhs / M
    if Q == 2:
        a, b, c, d = M[:, 0, 0], M[:, 0, 1], M[:, 1, 0], M[:, 1, 1]
        det = (a * d - b * c)[:, None]
        out = np.empty_like(rhs)
        out[:, 0] = (d[:, None] * rhs[:, 0] - b[:, None] * rhs[:, 1]) / det
        out[:, 1] = (a[:, None] * rhs[:, 1] - c[:, None] * rhs[:, 0]) / det
        return out
    return np.linalg.solve(M, rhs)


def _binv_diag(M: np.ndarray) -> np.ndarray:
    """diag(M^-1) for batches of small SPD matrices (G, Q, Q) -> (G, Q)."""
    Q = M.shape[1]
    if Q == 1:
        return 1.0 / M[:, :, 0]
    if Q == 2:
        a, b, c, d = M[:, 0, 0], M[:, 0, 1], M[:, 1, 0], M[:, 1, 1]
        det = a * d - b * c
        return np.stack([d / det, a / det], axis=1)
    return np.einsum("gqq->gq", np.linalg.inv(M))


def _linear_solve(B: np.ndarray, D: np.ndarray, W: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares of many small independent problems.

    B (G, P, Q) design, D and W (G, P) data and weights. Returns (p (G, Q), M = B^T W B
    regularised (G, Q, Q), BW = B W). Parameters without any weight get 0 (a tiny ridge
    keeps M invertible). Batched products go through matmul (einsum's generic loops are
    several times slower on these shapes)."""
    BW = B * W[:, :, None]
    BWt = BW.transpose(0, 2, 1)
    M = np.matmul(BWt, B)
    v = np.matmul(BWt, D[:, :, None])
    diag = np.einsum("gqq->gq", M)
    scale = diag.max(axis=1, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    diag += 1e-10 * scale + (diag <= 1e-12 * scale) * scale
    p = _bsolve(M, v)[:, :, 0]
    return p, M, BW


def _project_out(B: np.ndarray, BW: np.ndarray, M: np.ndarray, X: np.ndarray) -> np.ndarray:
    """X - B (B^T W B)^-1 B^T W X for X (G, P, K): the part of X the linear parameters
    cannot absorb."""
    rhs = np.matmul(BW.transpose(0, 2, 1), X)
    return X - np.matmul(B, _bsolve(M, rhs))


@dataclass
class _Step:
    """One variable-projection Gauss-Newton step (see :func:`_gauss_newton_step`)."""

    step: np.ndarray  # (K,) parameter update
    H: np.ndarray  # (K, K) curvature J_perp^T W J_perp (weighted J on the left, see J_full)
    meat: np.ndarray  # (K, K) J_perp^T W J_perp of the weighted J
    chi2: float
    dof: int
    chi_g: np.ndarray  # (G,) chi2 of each group
    scores: np.ndarray  # (G, K) each group's J_perp^T W r, dof-corrected

    def covariance(self) -> np.ndarray:
        """The larger (per parameter) of the curvature's covariance scaled by the reduced
        chi2 and the sandwich estimate H^-1 (sum of the groups' score products) H^-1. The
        latter also holds when the many per-group amplitudes are themselves noisy (few
        pixels per group), which makes the scatter exceed the curvature's prediction."""
        Hinv = np.linalg.inv(self.H)
        formal = Hinv @ self.meat @ Hinv.T * max(self.chi2 / self.dof, 1e-30)
        G = max(int(np.count_nonzero(np.any(self.scores != 0, axis=1))), 2)
        sand = Hinv @ (self.scores.T @ self.scores) @ Hinv.T * (G / (G - 1))
        return np.where(np.diag(sand)[:, None] > np.diag(formal)[:, None], sand, formal)


def _gauss_newton_step(B: np.ndarray, J: np.ndarray, D: np.ndarray, W: np.ndarray,
                       group_ok: np.ndarray | None = None, solved: tuple | None = None,
                       nparams: np.ndarray | None = None,
                       J_full: np.ndarray | None = None) -> _Step:
    """One variable-projection Gauss-Newton step for the global parameters.

    B (G, P, Q) linear design, J (G, P, K) derivative of the model with respect to the K
    global parameters at the linear solution's amplitudes (computed by the caller with
    :func:`_linear_solve`'s p), D, W (G, P). ``solved``: :func:`_linear_solve`'s result if
    the caller has it; ``nparams`` (G,) the linear parameters each group really has
    (default Q; for the degrees of freedom); ``group_ok`` the groups in the fit. ``J_full``:
    the model's true derivative when ``J`` is a down-weighted one (an estimating equation
    J^T W r = 0 with weights): the step is then (J^T W J_full)^-1 J^T W r, the Newton step
    of that equation, and the covariance the sandwich around it."""
    p, M, BW = _linear_solve(B, D, W) if solved is None else solved
    r = D - np.matmul(B, p[:, :, None])[:, :, 0]
    Jp = _project_out(B, BW, M, J)
    Jf = None if J_full is None else _project_out(B, BW, M, J_full)
    nq = nparams if nparams is not None else np.full(B.shape[0], B.shape[2])
    return _step_from_projected(Jp, Jf, r, W, group_ok, nq)


def _step_from_projected(Jp: np.ndarray, Jf: np.ndarray | None, r: np.ndarray, W: np.ndarray,
                         group_ok: np.ndarray | None, nq: np.ndarray) -> _Step:
    """The Gauss-Newton step from the derivatives with the linear parameters projected out
    (Jp, and Jf of the full model or None; (G, P, K)), the residuals r and weights W (G, P),
    and each group's number of linear parameters ``nq`` (G,)."""
    if group_ok is not None:
        Jp = Jp * group_ok[:, None, None]
    JW = Jp * W[:, :, None]
    K = Jp.shape[2]
    meat = JW.reshape(-1, K).T @ Jp.reshape(-1, K)
    if Jf is None:
        H = meat
    else:
        if group_ok is not None:
            Jf = Jf * group_ok[:, None, None]
        H = JW.reshape(-1, K).T @ Jf.reshape(-1, K)
    scores = np.einsum("gpk,gp->gk", JW, r)
    grad = scores.sum(axis=0)
    wr = W * r
    chi_g = np.einsum("gp,gp->g", wr, r)
    used = W > 0
    if group_ok is not None:
        used &= group_ok[:, None]
    chi2 = float(chi_g[group_ok].sum() if group_ok is not None else chi_g.sum())
    in_fit = used.any(axis=1)
    n_lin = int(np.sum(nq[in_fit]))
    dof = int(used.sum()) - n_lin - K
    # residuals of a group's own least-squares fit are smaller than its noise by
    # (n - q) / n: scale the scores back for the sandwich
    npix = used.sum(axis=1)
    corr = np.sqrt(np.where(npix > nq, npix / np.maximum(npix - nq, 1), 0.0))
    try:
        step = np.linalg.solve(H, grad)
    except np.linalg.LinAlgError:
        step = np.full(K, np.nan)
    return _Step(step=step, H=H, meat=meat, chi2=chi2, dof=max(dof, 1), chi_g=chi_g,
                 scores=scores * corr[:, None])


class _BandedRows:
    """The lenslet x fit's linear problems of one iteration, solved as banded systems.

    Where the lenslet's spectra sit closer than the profile's window (the 1k test
    detectors: 7 px pitch, 13-column core+halo profile), the windows of a row merge into
    one group with every spectrum of the row as an amplitude (plus the background): dense,
    that is a (P ~ 1000) x (Q ~ 130) design per row and 7 GFLOP per iteration. But each
    spectrum overlaps only its next neighbours, so B^T W B is banded (amplitudes in column
    order) with one dense row and column for the background: a banded Cholesky factor of
    the amplitude block (all rows stacked into one banded matrix, uncoupled between rows)
    and the Schur complement of the background solve it in O(E) per right-hand side.

    The entries of the layout must be ordered by (group, column) with one amplitude each
    (:meth:`FlexureModel._order_lenslet_entries`). Amplitude variances (for the S/N
    weights) use the diagonal of the amplitude block (its neighbours' halo overlap is a
    few per cent) and the background's exact part."""

    def __init__(self, L: _DxLayout, neighbours: list[np.ndarray], first: np.ndarray,
                 wt: np.ndarray, W: np.ndarray, background: bool):
        gx = L.e_group
        G, P = L.g_row.size, L.P
        nb = wt.shape[1]
        E = first.size
        self.G, self.P, self.gx, self.background = G, P, gx, background
        cols = (first - L.g_c0[gx])[:, None] + np.arange(nb)
        inb = (cols >= 0) & (cols < L.g_np[gx][:, None])
        self.pidx = gx[:, None] * P + np.clip(cols, 0, P - 1)
        self.pvalid = L.pvalid
        self.phi = wt * inb
        self.inb = inb
        self.W = W
        self.WPhi = W.reshape(-1)[self.pidx] * self.phi
        diag = np.einsum("en,en->e", self.WPhi, self.phi)
        gmax = np.zeros(G)
        np.maximum.at(gmax, gx, diag)
        scale = np.where(gmax > 0, gmax, 1.0)[gx]
        diag = diag + 1e-10 * scale + (diag <= 1e-12 * scale) * scale
        ab = np.zeros((len(neighbours) + 1, E))
        ab[0] = diag
        jn = np.arange(nb)[None, :]
        for k, nbr in enumerate(neighbours, 1):
            has = nbr >= 0
            n = np.where(has, nbr, 0)
            j = jn - (first[n] - first)[:, None]  # column j of e is column j - s of n
            ok = has[:, None] & (j >= 0) & (j < nb)
            phin = np.take_along_axis(self.phi[n], np.clip(j, 0, nb - 1), axis=1)
            ab[k] = np.einsum("en,en->e", self.WPhi, phin * ok)  # A[e + k, e] (lower form)
        self.diag = diag
        self.chol = cholesky_banded(ab, lower=True, check_finite=False)
        if background:
            self.b = self.WPhi.sum(axis=1)  # amplitude x background coupling
            c = W.sum(axis=1)
            self.xb = cho_solve_banded((self.chol, True), self.b, check_finite=False)
            s = c - np.bincount(gx, self.b * self.xb, minlength=G)
            self.s = np.where(s > 1e-12 * np.maximum(c, 1e-300), s, np.where(c > 0, c, 1.0))

    def _group_sum(self, x: np.ndarray) -> np.ndarray:
        return np.stack([np.bincount(self.gx, x[:, m], minlength=self.G)
                         for m in range(x.shape[1])], axis=1)

    def solve(self, u: np.ndarray, ubg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(amplitudes (E, m), backgrounds (G, m)) = M^-1 (u (E, m), ubg (G, m))."""
        xu = cho_solve_banded((self.chol, True), u, check_finite=False)
        if not self.background:
            return xu, np.zeros((self.G, u.shape[1]))
        beta = (ubg - self._group_sum(self.b[:, None] * xu)) / self.s[:, None]
        return xu - self.xb[:, None] * beta[self.gx], beta

    def normal_rhs(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """B^T W X for X (G, P, m): (amplitude part (E, m), background part (G, m))."""
        m = X.shape[2]
        Xf = X.reshape(-1, m)
        u = np.einsum("en,enm->em", self.WPhi, Xf[self.pidx])
        return u, np.einsum("gp,gpm->gm", self.W, X)

    def apply(self, amp: np.ndarray, bg: np.ndarray | None = None, phi: np.ndarray | None = None
              ) -> np.ndarray:
        """B (amp (E, m), bg (G, m)) on the pixels (G, P, m); ``phi``: another per-entry
        pattern (the profile's derivative) instead of the profile."""
        phi = self.phi if phi is None else phi * self.inb
        m = amp.shape[1]
        out = np.empty((self.G * self.P, m))
        flat = self.pidx.reshape(-1)
        for c in range(m):
            out[:, c] = np.bincount(flat, (phi * amp[:, c:c + 1]).reshape(-1),
                                    minlength=self.G * self.P)
        out = out.reshape(self.G, self.P, m)
        if bg is not None and self.background:
            out += bg[:, None, :] * self.pvalid[:, :, None]
        return out

    def project_out(self, X: np.ndarray) -> np.ndarray:
        """X - B M^-1 B^T W X for X (G, P, m)."""
        amp, bg = self.solve(*self.normal_rhs(X))
        return X - self.apply(amp, bg)

    def amplitude_variance(self) -> np.ndarray:
        """(E,) approximate variances of the amplitudes (see the class docstring)."""
        var = 1.0 / self.diag
        if self.background:
            var = var + self.xb**2 / self.s[self.gx]
        return var


# ---------------------------------------------------------------------- the trace, prepared
def _monotone_rows(ty: np.ndarray) -> None:
    d = np.diff(ty, axis=-1)
    if not (np.all(d > 0)):
        raise ValueError("trace_y must increase along the wavelength axis for every spaxel "
                         "(one detector row per wavelength bin, dispersion along +y)")


def _interp_rows(ty: np.ndarray, tx: np.ndarray, rows: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every spaxel (rows of ty/tx, (S, nw)) and detector row in ``rows`` (S, R):
    fractional sample index u, x at that row, and d u / d row. NaN outside the spectrum."""
    S, nw = ty.shape
    k = np.arange(nw, dtype=np.float64)
    u = np.empty(rows.shape)
    for s in range(S):
        u[s] = np.interp(rows[s], ty[s], k, left=np.nan, right=np.nan)
    k0 = np.clip(np.floor(np.nan_to_num(u, nan=0.0)).astype(np.int64), 0, nw - 2)
    f = u - k0
    sidx = np.arange(S)[:, None]
    x = tx[sidx, k0] * (1.0 - f) + tx[sidx, k0 + 1] * f
    dudr = 1.0 / (ty[sidx, k0 + 1] - ty[sidx, k0])
    return u, x, np.where(np.isfinite(u), dudr, np.nan)


@dataclass
class _DxLayout:
    """(row, spectrum) entries and the pixel groups of the x fit."""

    e_row: np.ndarray  # (E,) detector row (centre of the group's bin of rows)
    e_x: np.ndarray  # (E,) reference x at that row
    e_slope: np.ndarray  # (E,) d x / d row along the trace
    e_group: np.ndarray  # (E,)
    e_q: np.ndarray  # (E, 2) linear parameter of the group (-1: none)
    e_c: np.ndarray  # (E, 2) coefficient of that parameter
    g_row: np.ndarray  # (G,) first detector row of the group's bin
    g_c0: np.ndarray  # (G,) first column
    g_np: np.ndarray  # (G,) columns
    g_nq: np.ndarray  # (G,) linear parameters
    g_owner: np.ndarray  # (G, Q + 1) the amplitude each parameter goes with (slope -> level)
    P: int
    Q: int
    pix: np.ndarray  # (G, P, nbin) flat pixel index (-1 where padded)
    pvalid: np.ndarray  # (G, P) bool


def _group_regions(r_row, r_lo, r_hi, r_nq, nx):
    """Merge column ranges of one row that overlap into groups; returns the group of each
    region, its first parameter within the group, and the groups' (row, c0, ncol, nq)."""
    order = np.lexsort((r_lo, r_row))
    row, lo, hi, nq = r_row[order], r_lo[order], r_hi[order], r_nq[order]
    lo = np.clip(lo, 0, nx - 1)
    hi = np.clip(hi, 0, nx - 1)
    key_lo = row.astype(np.int64) * (nx + 10) + lo
    key_hi = row.astype(np.int64) * (nx + 10) + hi
    run_hi = np.maximum.accumulate(key_hi)
    new = np.ones(row.size, bool)
    new[1:] = key_lo[1:] > run_hi[:-1]
    gid_sorted = np.cumsum(new) - 1
    G = int(gid_sorted[-1]) + 1 if row.size else 0
    g_row = row[new]
    g_c0 = lo[new]
    g_c1 = np.zeros(G, np.int64)
    np.maximum.at(g_c1, gid_sorted, hi)
    # first parameter of each region within its group: cumulative nq within the group
    cum = np.cumsum(nq) - nq
    start_of_group = cum[new]
    q0_sorted = cum - start_of_group[gid_sorted]
    g_nq = np.bincount(gid_sorted, weights=nq, minlength=G).astype(np.int64)
    gid = np.empty(row.size, np.int64)
    q0 = np.empty(row.size, np.int64)
    gid[order] = gid_sorted
    q0[order] = q0_sorted
    return gid, q0, g_row, g_c0, g_c1 - g_c0 + 1, g_nq


class FlexureModel:
    """What the flexure fit needs from one trace on one detector shape (independent of the
    frame; prepare once per reference and keep, like the extraction's geometry).

    ``layout`` 'LENSLET' or 'SLICER' (how the x fit treats neighbouring spectra).
    ``throughput`` (ny_s, nx_s) the reference's relative spaxel throughput (THRUPUT): the
    slicer's edge amplitudes are smooth in flux arriving at the IFS, i.e. throughput times a
    linear function along the slice. ``background``: a constant level per x-fit group
    (default: lenslet yes, slicer no).
    ``lines``: (wavelength_um, intensity) of the OH lines (e.g. ``oh_lines(lo, hi)``), or None
    (the y fit then uses the spectrum ends only). ``max_shift`` (px) bounds the offsets the
    fit can follow (windows are widened by it). ``lsf_sigma_bins`` an initial guess of the
    lines' Gaussian width in wavelength bins (fitted anyway).
    """

    def __init__(self, trace_x: np.ndarray, trace_y: np.ndarray, wavelength: np.ndarray,
                 profile: CrossProfile | float, shape: tuple[int, int], layout: str, *,
                 lines: Any = None, throughput: np.ndarray | None = None,
                 max_shift: float = 1.0, dx_entries: int | None = None,
                 dy_spaxels: int = _DY_SPAXELS, edge_spaxels: int | None = None,
                 edge_slope: bool = True, background: bool | None = None,
                 lsf_sigma_bins: float = 1.0, max_windows: int = 40):
        t0 = time.perf_counter()
        tx = np.asarray(trace_x, np.float64)
        ty = np.asarray(trace_y, np.float64)
        if tx.ndim != 3 or tx.shape != ty.shape:
            raise ValueError(f"trace_x {tx.shape} and trace_y {ty.shape} must be equal 3-D "
                             "arrays (ny, nx, nwave)")
        if not (np.isfinite(tx).all() and np.isfinite(ty).all()):
            raise ValueError("trace positions contain NaN or infinite values")
        layout = str(layout).upper()
        if layout not in ("LENSLET", "SLICER"):
            raise ValueError(f"layout must be LENSLET or SLICER, got {layout!r}")
        if not isinstance(profile, CrossProfile):
            profile = CrossProfile.gaussian(float(profile))
        wave = np.asarray(wavelength, np.float64).reshape(-1)
        if wave.size != tx.shape[2]:
            raise ValueError(f"wavelength has {wave.size} values, the trace {tx.shape[2]}")
        if wave.size < 4:
            raise ValueError("the trace needs at least 4 wavelength samples")
        if not np.all(np.diff(wave) > 0):
            raise ValueError("wavelength must increase along the trace")
        _monotone_rows(ty)
        self.shape = (int(shape[0]), int(shape[1]))
        self.layout = layout
        self.profile = profile
        self.max_shift = float(max_shift)
        self.pad = int(math.ceil(self.max_shift))
        self.ny_s, self.nx_s, self.nw = tx.shape
        self.wavelength = wave
        self._tx = tx.reshape(-1, self.nw)
        self._ty = ty.reshape(-1, self.nw)
        if throughput is None:
            self._thr = np.ones(self._tx.shape[0])
        else:
            thr = np.asarray(throughput, np.float64)
            if thr.shape != tx.shape[:2]:
                raise ValueError(f"throughput has shape {thr.shape}; the trace has "
                                 f"{tx.shape[:2]} spaxels")
            self._thr = np.where(np.isfinite(thr) & (thr > 0), thr, 0.0).reshape(-1)
        self.lsf_sigma_bins = float(lsf_sigma_bins)
        self.max_windows = int(max_windows)
        self.edge_slope = bool(edge_slope)
        # a level per (row, spectrum) group: the lenslet's windows have unlit pixels to fix
        # it; at a slice gap a constant level is symmetric, the shift antisymmetric, and
        # the few dark gap pixels would pay for it with most of the edge information
        self.background = (layout == "LENSLET") if background is None else bool(background)
        self.dx_layout = self._prepare_dx(
            int(_DX_ENTRIES[layout] if dx_entries is None else dx_entries), edge_spaxels)
        self.dx_neighbours = (self._order_lenslet_entries() if layout == "LENSLET" else None)
        self.dy_spaxels = self._pick_spaxels(int(dy_spaxels))
        # the y fit's boxes: the profile's window, but in the lenslet no wider than half the
        # distance to the next spectrum of the row (at the 1k test detectors' 7 px pitch the
        # 13-column window held half of each neighbour's core: at a sub-pixel phase that
        # varies from spaxel to spaxel, which the common line amplitude cannot follow, and
        # read noise from twice the columns)
        self.box_half = profile.half
        if self.dx_neighbours is not None and self.lenslet_pitch is not None:
            self.box_half = int(np.clip(math.floor(self.lenslet_pitch / 2.0 - 0.5), 1,
                                        profile.half))
        self.oh = None if lines is None else self._prepare_oh(lines)
        self.ends = self._prepare_ends()
        self.prepare_time = time.perf_counter() - t0
        log.debug("flexure model %s %s: %d x-fit entries in %d groups, %d OH windows, %.2f s",
                  layout, self.shape, self.dx_layout.e_row.size, self.dx_layout.g_row.size,
                  0 if self.oh is None else self.oh["k"].size, self.prepare_time)

    # -------------------------------------------------------------- x fit layout
    def _prepare_dx(self, target: int, edge_spaxels: int | None) -> _DxLayout:
        ny, nx = self.shape
        S = self._tx.shape[0]
        half, pad = self.profile.half, self.pad
        y_lo = np.ceil(self._ty[:, 0]) + 1
        y_hi = np.floor(self._ty[:, -1]) - 1
        r0 = int(max(0, y_lo.min()))
        r1 = int(min(ny - 1, y_hi.max()))
        if r1 < r0:
            raise ValueError("the trace covers no complete detector row")
        if self.layout == "SLICER":
            m = edge_spaxels or (2 * half + 2)
            m = int(max(2, min(m, self.nx_s // 2 - 1)))
            per_row = 2 * m * self.ny_s
        else:
            m = 0
            rows_lit = np.clip(y_hi - y_lo + 1, 0, None).sum() / max(1, r1 - r0 + 1)
            per_row = max(1.0, rows_lit)
        # Rows are summed in bins of nbin as long as the traces move by < 0.02 px across a
        # bin (the summed profile is then the profile at the bin's mean position): the
        # slicer's traces are nearly straight along y, and binning raises each group's
        # signal without adding unknowns.
        dxdk = np.abs(np.diff(self._tx, axis=1)) / np.diff(self._ty, axis=1)
        s_max = float(dxdk.max()) if dxdk.size else 0.0
        nbin = int(np.clip(math.floor(0.02 / s_max) if s_max > 0 else 16, 1, 16))
        nbin = min(nbin, max(1, r1 - r0 + 1))
        n_bins = (r1 - r0 + 1) // nbin
        step = max(1, int(math.ceil(per_row * n_bins / max(1, target))))
        starts = r0 + nbin * np.arange(0, n_bins, step)
        rows = starts + (nbin - 1) / 2.0  # bin centres
        R = rows.size
        self.row_bin = nbin
        if self.layout == "SLICER":
            i_sel = np.r_[0:m + 1, self.nx_s - m - 1:self.nx_s]
            spx = (np.arange(self.ny_s)[:, None] * self.nx_s + i_sel[None, :]).reshape(-1)
        else:
            spx = np.arange(S)
        rr = np.broadcast_to(rows, (spx.size, R))
        u, x, dudr = _interp_rows(self._ty[spx], self._tx[spx], rr)
        # dx/drow along the trace: from the neighbouring samples
        k0 = np.clip(np.floor(np.nan_to_num(u)).astype(np.int64), 0, self.nw - 2)
        sl = (self._tx[spx][np.arange(spx.size)[:, None], k0 + 1]
              - self._tx[spx][np.arange(spx.size)[:, None], k0]) * dudr
        inside = ((rr - (nbin - 1) / 2.0 >= y_lo[spx][:, None])
                  & (rr + (nbin - 1) / 2.0 <= y_hi[spx][:, None]) & np.isfinite(x))
        xr = np.rint(np.where(inside, x, 0.0)).astype(np.int64)
        if self.layout == "LENSLET":
            s_idx, r_idx = np.nonzero(inside)
            e_row = rows[r_idx]
            e_x, e_slope = x[s_idx, r_idx], sl[s_idx, r_idx]
            r_lo = xr[s_idx, r_idx] - half - pad
            r_hi = xr[s_idx, r_idx] + half + pad
            gid, q0, g_bin, g_c0, g_np, g_nq = _group_regions(
                r_idx.astype(np.int64), r_lo, r_hi, np.ones(e_row.size, np.int64), nx)
            e_group, e_q = gid, np.stack([q0, np.full_like(q0, -1)], axis=1)
            e_c = np.stack([np.ones(e_row.size), np.zeros(e_row.size)], axis=1)
        else:
            # per slice and row: the left region (columns only spaxels 0..m-1 reach at any
            # shift up to max_shift) and the right region (spaxels nx_s-m..nx_s-1)
            nsel = i_sel.size  # 2 (m + 1): m edge spaxels + the first interior one per side
            xr3 = xr.reshape(self.ny_s, nsel, R)
            ok3 = inside.reshape(self.ny_s, nsel, R).all(axis=1)  # (ny_s, R)
            left_lo = xr3[:, 0] - half - pad
            left_hi = xr3[:, m] - half - pad - 1
            right_lo = xr3[:, m + 1] + half + pad + 1
            right_hi = xr3[:, -1] + half + pad
            jj, rr_i = np.nonzero(ok3)
            reg_row = np.concatenate([rr_i, rr_i]).astype(np.int64)
            reg_lo = np.concatenate([left_lo[jj, rr_i], right_lo[jj, rr_i]])
            reg_hi = np.concatenate([left_hi[jj, rr_i], right_hi[jj, rr_i]])
            keep = reg_hi >= reg_lo
            nreg = jj.size
            gid, q0, g_bin, g_c0, g_np, g_nq = _group_regions(
                reg_row[keep], reg_lo[keep], reg_hi[keep], np.full(int(keep.sum()), 2), nx)
            reg_gid = np.full(2 * nreg, -1)
            reg_q0 = np.full(2 * nreg, -1)
            reg_gid[keep], reg_q0[keep] = gid, q0
            # entries: edge spaxels t = 0..m-1 of each region (left: i = t, right:
            # i = nx_s - 1 - t), amplitude a + b (t - (m - 1) / 2) / m
            t = np.arange(m)
            coef = (t - (m - 1) / 2.0) / m * (1.0 if self.edge_slope else 0.0)
            e_rows, e_xs, e_sls, e_gs, e_qs, e_cs = [], [], [], [], [], []
            x3 = x.reshape(self.ny_s, nsel, R)
            s3 = sl.reshape(self.ny_s, nsel, R)
            for side, cols in ((0, t), (1, nsel - 1 - t)):
                rg = reg_gid[side * nreg:(side + 1) * nreg]
                rq = reg_q0[side * nreg:(side + 1) * nreg]
                use = rg >= 0
                jj_u, rr_u, rg_u, rq_u = jj[use], rr_i[use], rg[use], rq[use]
                for ti, col in enumerate(cols):
                    thr = self._thr[jj_u * self.nx_s + i_sel[col]]
                    e_rows.append(rows[rr_u])
                    e_xs.append(x3[jj_u, col, rr_u])
                    e_sls.append(s3[jj_u, col, rr_u])
                    e_gs.append(rg_u)
                    e_qs.append(np.stack([rq_u, rq_u + 1], axis=1))
                    e_cs.append(np.stack([thr, thr * coef[ti]], axis=1))
            e_row = np.concatenate(e_rows)
            e_x, e_slope = np.concatenate(e_xs), np.concatenate(e_sls)
            e_group, e_q, e_c = np.concatenate(e_gs), np.concatenate(e_qs), np.concatenate(e_cs)
        G = g_bin.size
        if G == 0:
            raise ValueError("no usable (row, spectrum) groups for the x fit")
        g_row = starts[g_bin].astype(np.int64)  # first detector row of each group's bin
        P = int(g_np.max())
        Q = int(g_nq.max())
        cols = g_c0[:, None] + np.arange(P)[None, :]
        pvalid = np.arange(P)[None, :] < g_np[:, None]
        brow = g_row[:, None, None] + np.arange(nbin)[None, None, :]
        pix = np.where(pvalid[:, :, None], brow * nx + cols[:, :, None], -1)
        owner = np.broadcast_to(np.arange(Q + 1), (G, Q + 1)).copy()
        if self.layout == "SLICER":
            owner[:, 1:Q:2] -= 1  # (level, slope) pairs per slice edge
        log.debug("flexure x layout: bins of %d rows, every %d bins (%d bins), %d entries, "
                  "%d groups, P=%d Q=%d", nbin, step, R, e_row.size, G, P, Q)
        return _DxLayout(e_row=e_row, e_x=e_x, e_slope=np.nan_to_num(e_slope), e_group=e_group,
                         e_q=e_q, e_c=e_c, g_row=g_row, g_c0=g_c0, g_np=g_np, g_nq=g_nq,
                         g_owner=owner, P=P, Q=Q,
                         pix=pix, pvalid=pvalid)

    def _order_lenslet_entries(self) -> list[np.ndarray]:
        """Order the lenslet's x-fit entries by (group, column), i.e. by their amplitude's
        place in the stacked banded system of :class:`_BandedRows`, and return, for k = 1,
        2, ..., the entry k places further when its window can overlap this one's (same
        group, columns closer than the profile's width; else -1)."""
        L = self.dx_layout
        g_start = np.cumsum(L.g_nq) - L.g_nq
        order = np.argsort(g_start[L.e_group] + L.e_q[:, 0], kind="stable")
        for name in ("e_row", "e_x", "e_slope", "e_group", "e_q", "e_c"):
            setattr(L, name, getattr(L, name)[order])
        E = L.e_x.size
        same = L.e_group[1:] == L.e_group[:-1]
        gaps = np.diff(L.e_x)[same]
        # distance to the next spectrum of the row (a low percentile: a few close pairs)
        self.lenslet_pitch = float(np.percentile(gaps, 2)) if gaps.size else None
        reach = self.profile.nb + 1  # rint() of both positions, and the shift
        neighbours = []
        for k in range(1, E):
            n = np.arange(k, E + k)
            n = np.where(n < E, n, -1)
            nn = np.maximum(n, 0)
            close = (n >= 0) & (L.e_group[nn] == L.e_group) & (L.e_x[nn] - L.e_x < reach)
            if not close.any():
                break
            neighbours.append(np.where(close, n, -1))
        return neighbours

    # -------------------------------------------------------------- y fit: spaxels, OH, ends
    def _pick_spaxels(self, n: int) -> np.ndarray:
        ny, nx = self.shape
        on = ((self._tx.min(axis=1) >= self.box_half_guess()) &
              (self._tx.max(axis=1) <= nx - 1 - self.box_half_guess()) &
              (self._ty[:, 0] >= 2) & (self._ty[:, -1] <= ny - 3))
        idx = np.flatnonzero(on)
        if idx.size > n:
            idx = idx[np.linspace(0, idx.size - 1, n).round().astype(np.int64)]
        return idx

    def box_half_guess(self) -> int:
        return self.profile.half + self.pad

    def _row_boxes(self, spx: np.ndarray, rows: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(u, dudr, flat pixel index of the box (…, 2 hb + 1)) of spaxels ``spx`` at detector
        rows ``rows`` (same leading shape (S, R)); rows off the detector get index -1."""
        ny, nx = self.shape
        u, x, dudr = _interp_rows(self._ty[spx], self._tx[spx], rows)
        # beyond the ends: the nearest end's x (the box still has to be somewhere)
        xe = np.where(np.isfinite(x), x,
                      np.where(rows < self._ty[spx, :1], self._tx[spx, :1], self._tx[spx, -1:]))
        hb = self.box_half
        cols = np.rint(xe).astype(np.int64)[..., None] + np.arange(-hb, hb + 1)
        r = rows.astype(np.int64)[..., None]
        ok = (cols >= 0) & (cols < nx) & (r >= 0) & (r < ny)
        return u, dudr, np.where(ok, r * nx + cols, -1)

    def _prepare_oh(self, lines: Any) -> dict | None:
        wl = np.asarray(getattr(lines, "wavelength_um", lines[0] if isinstance(lines, tuple)
                                else None), np.float64)
        inten = np.asarray(getattr(lines, "intensity", lines[1] if isinstance(lines, tuple)
                                   else None), np.float64)
        wave = self.wavelength
        k_all = np.arange(self.nw, dtype=np.float64)
        inside = (wl > wave[0]) & (wl < wave[-1]) & (inten > 0)
        wl, inten = wl[inside], inten[inside]
        if wl.size == 0 or self.dy_spaxels.size == 0:
            return None
        k_line = np.interp(wl, wave, k_all)  # fractional bin of every line
        # merge lines much closer than a bin (Lambda doublets): intensity-weighted centre
        order = np.argsort(k_line)
        k_line, inten = k_line[order], inten[order]
        brk = np.r_[True, np.diff(k_line) > 0.2]
        gid = np.cumsum(brk) - 1
        tot = np.bincount(gid, inten)
        k_m = np.bincount(gid, inten * k_line) / tot
        # windows: tiles of 2 hw + 1 bins along the spectrum (away from its ends), kept
        # where the lines in them are at least 2 % of the strongest; if there are more than
        # max_windows, those with the strongest lines
        sig = max(self.lsf_sigma_bins, 0.5)
        hw = int(math.ceil(3.0 * sig + self.pad + 1))
        first_c, last_c = hw + 2, self.nw - 3 - hw
        if last_c < first_c:
            return None
        n_tiles = int((last_c - first_c) // (2 * hw + 1)) + 1
        spare = (last_c - first_c) - (n_tiles - 1) * (2 * hw + 1)
        tiles = first_c + spare / 2.0 + np.arange(n_tiles) * (2 * hw + 1)
        peak = np.array([tot[np.abs(k_m - c) <= hw - 1].max(initial=0.0) for c in tiles])
        keep = np.flatnonzero(peak >= 0.02 * tot.max())
        if keep.size > self.max_windows:
            keep = np.sort(keep[np.argsort(peak[keep])[::-1][:self.max_windows]])
        if keep.size == 0:
            return None
        centres = tiles[keep]
        chosen_peak = peak[keep]
        # template of each window: every listed line within reach, with its listed
        # intensity (not the merged groups: a chain of lines each within 0.2 bin of the
        # next spans most of a bin in the lenslet's coarse sampling, and one Gaussian at its
        # centroid misplaces the window's pattern by ~0.01 row)
        reach = hw + 4.0 * sig + 2
        tmpl_k, tmpl_i, tmpl_w = [], [], []
        for w, kc in enumerate(centres):
            near = np.abs(k_line - kc) <= reach
            tmpl_k.append(k_line[near])
            tmpl_i.append(inten[near] / chosen_peak[w])
            tmpl_w.append(np.full(int(near.sum()), w))
        spx = self.dy_spaxels
        W, S = centres.size, spx.size
        # reference row of each window's line per spaxel, and its window of rows
        yc = np.empty((W, S))
        xw = np.empty((W, S))
        for w, kc in enumerate(centres):
            k0 = int(np.floor(kc))
            f = kc - k0
            yc[w] = self._ty[spx, k0] * (1 - f) + self._ty[spx, k0 + 1] * f
            xw[w] = self._tx[spx, k0] * (1 - f) + self._tx[spx, k0 + 1] * f
        rows = np.rint(yc)[..., None] + np.arange(-hw, hw + 1)  # (W, S, R)
        R = rows.shape[-1]
        flat_rows = rows.transpose(1, 0, 2).reshape(S, W * R)
        u, dudr, pix = self._row_boxes(spx, flat_rows)
        u = u.reshape(S, W, R).transpose(1, 0, 2)
        dudr = dudr.reshape(S, W, R).transpose(1, 0, 2)
        pix = pix.reshape(S, W, R, -1).transpose(1, 0, 2, 3)
        frac = None
        if self.dx_neighbours is not None:
            # lenslet: the box's columns fixed over the window (a box that follows the
            # trace's tilt steps by a column somewhere in the window, and with it the share
            # of the spectrum it holds), and the template scaled by the share of the
            # spectrum's profile (at the reference x) inside the box in every row
            ny, nx = self.shape
            hb = self.box_half
            c0 = np.rint(xw).astype(np.int64) - hb  # (W, S)
            cols = c0[:, :, None, None] + np.arange(2 * hb + 1)
            r = rows.astype(np.int64)[..., None]
            ok = (cols >= 0) & (cols < nx) & (r >= 0) & (r < ny)
            pix = np.where(ok, r * nx + cols, -1)
            _, x_row, _ = _interp_rows(self._ty[spx], self._tx[spx], flat_rows)
            x_row = x_row.reshape(S, W, R).transpose(1, 0, 2)
            valid = np.isfinite(x_row)
            xv = np.where(valid, x_row, xw[:, :, None]).reshape(-1)
            first, wts = self.profile.weights(xv, rows.reshape(-1))
            cb = first[:, None] + np.arange(self.profile.nb)
            lo_c = np.broadcast_to(c0[:, :, None], rows.shape).reshape(-1, 1)
            inside = (cb >= lo_c) & (cb <= lo_c + 2 * hb)
            frac = np.where(valid, (wts * inside).sum(axis=1).reshape(W, S, R), 1.0)
        # bins a window's rows can reach, with room for the shifts
        finite_u = np.where(np.isfinite(u), u, np.nan)
        lo = np.floor(np.nanmin(finite_u, axis=(1, 2))) - self.pad - 2
        hi = np.ceil(np.nanmax(finite_u, axis=(1, 2))) + self.pad + 2
        return {"k": centres, "tk": np.concatenate(tmpl_k), "ti": np.concatenate(tmpl_i),
                "tw": np.concatenate(tmpl_w), "u": u, "dudr": np.nan_to_num(dudr), "pix": pix,
                "rows": rows, "hw": hw, "kbase": lo, "x": xw, "nk": int(np.max(hi - lo)) + 2,
                "u0": lo + self.pad + 2, "frac": frac}

    def _prepare_ends(self) -> dict | None:
        """Start and end rows of the subset spaxels' spectra with the box fractions of every
        spectrum whose end falls in each box (neighbours blend in the slicer)."""
        spx = self.dy_spaxels
        if spx.size == 0:
            return None
        ny, nx = self.shape
        hb = self.box_half
        out = {}
        for end, k in (("start", 0), ("stop", self.nw - 1)):
            y_end = self._ty[:, k]
            x_end = self._tx[:, k]
            # rows: one dark row beyond the ramp, the ramp row and two lit rows inside
            if end == "start":
                rows = np.floor(y_end[spx])[:, None] + np.arange(-1, 3)
            else:
                rows = np.floor(y_end[spx])[:, None] + np.arange(-1, 3)
            cols = np.rint(x_end[spx]).astype(np.int64)[:, None] + np.arange(-hb, hb + 1)
            # neighbours: spectra whose end is within the box's rows and reach its columns
            near = ((np.abs(y_end[None, :] - y_end[spx][:, None]) < 2.5)
                    & (np.abs(x_end[None, :] - x_end[spx][:, None])
                       <= hb + self.profile.half + 1))
            si, nj = np.nonzero(near)
            first, w = self.profile.weights(x_end[nj], y_end[nj])
            c = first[:, None] + np.arange(self.profile.nb)
            lo = cols[si, 0][:, None]
            inbox = (c >= lo) & (c <= lo + 2 * hb)
            frac = (w * inbox).sum(axis=1) * self._thr[nj]
            ok = ((rows >= 0) & (rows < ny)).all(axis=1) & (cols[:, 0] >= 0) & (cols[:, -1] < nx)
            pix = (rows.astype(np.int64)[:, :, None] * nx + cols[:, None, :])
            out[end] = {"rows": rows, "pix": np.where(ok[:, None, None], pix, -1), "si": si,
                        "y": y_end[nj], "x": x_end[nj], "frac": frac, "sign": 1.0 if end == "start" else -1.0,
                        "ok": ok}
        return out


# ---------------------------------------------------------------------- the fits
class _Frame:
    """The frame's data and weights, read only at the pixels a fit asks for (a 4k frame
    converted to float64 as a whole costs more than the fit)."""

    def __init__(self, data: np.ndarray, variance: np.ndarray, good: np.ndarray):
        self.data = np.asarray(data).ravel()
        self.variance = np.asarray(variance).ravel()
        self.good = np.asarray(good, bool).ravel()

    def __call__(self, pix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(data, 1 / variance) at flat pixel indices ``pix`` (-1: no pixel -> 0, 0);
        unusable pixels (not good, non-finite, variance <= 0) have weight 0 and data 0."""
        inside = pix >= 0
        p = np.where(inside, pix, 0)
        d = self.data[p].astype(np.float64)
        v = self.variance[p].astype(np.float64)
        ok = inside & self.good[p] & np.isfinite(d) & np.isfinite(v)
        with np.errstate(invalid="ignore"):
            ok &= v > 0
        w = np.zeros(d.shape)
        np.divide(1.0, v, out=w, where=ok)
        d[~ok] = 0.0
        return d, w


def _fit_dx(model: FlexureModel, frame: _Frame, dy: float, *,
            fit_rotation: bool, min_snr: float = 2.0, min_detected: int = 20,
            maxiter: int = 10, tol: float = 5e-4
            ) -> tuple[float, float, float, float, int, float]:
    """(dx, dx_err, rotation, rotation_err, groups used, reduced chi2) from the lit pattern.

    With ``model.background`` every group also has a constant background (the frame's
    residual level between the spectra would otherwise pull each spectrum towards the
    centre of its window; lenslet). Amplitudes carry the shift's derivative with the weight
    ``1 - (min_snr / snr)^2`` (0 below ``min_snr`` sigma): see the comment in the loop."""
    L = model.dx_layout
    G, P, Q, nb = L.g_row.size, L.P, L.Q, model.profile.nb
    Qb = Q + 1  # the background's column last
    D, W = _box_sums(frame, L.pix)  # the bin's rows summed
    yc = (model.shape[0] - 1) / 2.0
    e_dr = L.e_row - yc
    rows_e = L.e_row
    K = 2 if fit_rotation else 1
    par = np.zeros(K)
    ok = np.ones(G, bool)
    rejected = False
    prev = 0.0
    gn = None
    gx = L.e_group
    nparams = L.g_nq + (1 if model.background else 0)
    gdr = L.g_row + (model.row_bin - 1) / 2.0 - yc

    def with_rotation(J1: np.ndarray) -> np.ndarray:
        if fit_rotation:
            return np.stack([J1, -J1 * gdr[:, None]], axis=2)
        return J1[:, :, None]

    def soft_weight(snr: np.ndarray) -> np.ndarray:
        # each amplitude's weight in the derivative: 1 - (min_snr / snr)^2, 0 below
        # min_snr. A spectrum at the noise level has no position to give, and its
        # noise-fitted amplitude would add curvature - a too small error - and noise to the
        # score. The weight depends on |amplitude| only, i.e. on the noise along the
        # profile, which is independent of the noise along the profile's derivative that
        # the shift is measured from; it is recomputed at every step.
        if min_snr <= 0:
            return np.ones_like(snr)
        return np.clip(1.0 - min_snr**2 / np.maximum(snr, 1e-150) ** 2, 0.0, 1.0)

    def dense_step(xe: np.ndarray):
        """Dense per-group design (slicer: small groups at the slice edges)."""
        first, wt = model.profile.weights(xe, rows_e)
        _, dwt = model.profile.derivative(xe, rows_e)
        off = first[:, None] + np.arange(nb)[None, :] - L.g_c0[gx][:, None]
        inb = (off >= 0) & (off < L.g_np[gx][:, None])
        base = (gx[:, None] * P + np.clip(off, 0, P - 1)) * Qb
        B = np.zeros(G * P * Qb)
        Bd = np.zeros(G * P * Qb)
        for a in range(2):
            qa = L.e_q[:, a]
            has = qa >= 0
            if not has.any():
                continue
            sel = inb & has[:, None]
            idx = (base + qa[:, None])[sel]
            ca = L.e_c[:, a][:, None]
            B += np.bincount(idx, (wt * ca)[sel], minlength=G * P * Qb)
            Bd += np.bincount(idx, (dwt * ca)[sel], minlength=G * P * Qb)
        B = B.reshape(G, P, Qb)
        Bd = Bd.reshape(G, P, Qb)
        if model.background:
            B[:, :, Q] = L.pvalid
        solved = _linear_solve(B, D, W)
        p = solved[0]
        var_p = _binv_diag(solved[1])
        snr = p / np.sqrt(np.maximum(var_p, 1e-300))
        snr = snr[np.arange(G)[:, None], L.g_owner]  # light is positive; slope -> level
        bright = soft_weight(snr)
        bright[:, Q] = 0.0
        J1 = np.matmul(Bd, (p * bright)[:, :, None])[:, :, 0]
        pf = p.copy()
        pf[:, Q] = 0.0
        Jf1 = np.matmul(Bd, pf[:, :, None])[:, :, 0]
        step = _gauss_newton_step(B, with_rotation(J1), D, W, ok, solved, nparams,
                                  J_full=with_rotation(Jf1))
        n5 = (snr[:, :Q] >= 5.0).any(axis=1).astype(np.int64)
        return step, n5, (bright > 0).any(axis=1), float(np.median(snr[:, :Q].max(axis=1)))

    def banded_step(xe: np.ndarray):
        """Lenslet: one amplitude per (row, spectrum) entry, banded (:class:`_BandedRows`)."""
        first, wt = model.profile.weights(xe, rows_e)
        _, dwt = model.profile.derivative(xe, rows_e)
        sys_ = _BandedRows(L, model.dx_neighbours, first, wt, W, model.background)
        p, beta = sys_.solve(*sys_.normal_rhs(D[:, :, None]))
        r = D - sys_.apply(p, beta)[:, :, 0]
        snr = p[:, 0] / np.sqrt(np.maximum(sys_.amplitude_variance(), 1e-300))
        bright = soft_weight(snr)
        amp_d = np.stack([p[:, 0] * bright, p[:, 0]], axis=1)
        Jd = sys_.apply(amp_d, phi=dwt)  # (G, P, 2): weighted and full derivative
        K = 2 if fit_rotation else 1
        both = sys_.project_out(np.concatenate([with_rotation(Jd[:, :, 0]),
                                                with_rotation(Jd[:, :, 1])], axis=2))
        Jp, Jf = both[:, :, :K], both[:, :, K:]
        step = _step_from_projected(Jp, Jf, r, W, ok, nparams)
        n5 = np.bincount(gx, snr >= 5.0, minlength=G).astype(np.int64)
        lit = np.bincount(gx, bright > 0, minlength=G) > 0
        return step, n5, lit, float(np.median(snr))

    n5 = np.zeros(G, np.int64)
    lit = np.ones(G, bool)
    for it in range(maxiter):
        shift = par[0] - (par[1] * e_dr if fit_rotation else 0.0)
        xe = L.e_x + shift - dy * L.e_slope
        # banded where spectra share pixels; isolated spectra (one per group, the 4k
        # lenslet) are cheaper as tiny dense problems
        if model.dx_neighbours:
            gn, n5, lit, snr_median = banded_step(xe)
        else:
            gn, n5, lit, snr_median = dense_step(xe)
        # detection: pure noise gives a few spectra above min_snr by chance, hardly any
        # above 5 sigma. Checked at once too (the amplitudes hardly depend on a sub-pixel
        # shift): a frame without light would otherwise iterate on its noise to maxiter.
        usable = ((W > 0).sum(axis=1) > nparams) & lit
        n_det = int(n5[usable].sum())
        if n_det < min_detected:
            raise _NoSignal(f"only {n_det} (row, spectrum) entries detected above 5 "
                            f"sigma (need {min_detected}); median S/N of a spectrum's "
                            f"light in a row {snr_median:.2f}: too faint for dx")
        step = gn.step
        if not np.all(np.isfinite(step)):
            raise _NoSignal("singular x fit")
        step = np.clip(step, -0.5, 0.5)
        # Far from the solution the amplitudes fitted at the wrong shift are too small and
        # Gauss-Newton undershoots by a nearly constant factor (linear convergence, ~0.3
        # per step): extrapolate the geometric series from two successive steps (Aitken)
        ratio = step[0] / prev if prev else 0.0
        if 0.05 < ratio < 0.8:
            step = step / (1.0 - ratio)
        prev = float(step[0])
        par = par + step
        log.debug("flexure x fit: iteration %d, shift %s, step %s", it, par, step)
        if abs(par[0]) > model.max_shift + 0.5:
            raise _NoSignal(f"x shift ran away ({par[0]:.2f} px)")
        if np.max(np.abs(step)) < tol or it == maxiter - 1:
            if rejected:
                break
            # converged once: leave out the groups the model cannot describe (a cosmic ray,
            # a bright structure at a slice edge; reduced chi2 above 5x the median, or 5)
            # and converge again. Not before: at the wrong shift the brightest groups
            # have the largest chi2.
            rejected = True
            npix = np.maximum((W > 0).sum(axis=1) - nparams, 1)
            red = gn.chi_g / npix
            has_w = ((W > 0).sum(axis=1) > nparams) & lit
            limit = 5.0 * max(float(np.median(red[has_w])), 1.0)
            new_ok = has_w & (red <= limit)
            if np.array_equal(new_ok, ok):
                break
            ok = new_ok
            prev = 0.0
    red_chi2 = gn.chi2 / gn.dof
    try:
        cov = gn.covariance()
    except np.linalg.LinAlgError as exc:
        raise _NoSignal("singular x curvature") from exc
    err = np.sqrt(np.maximum(np.diag(cov), 0.0))
    rot, rot_err = (float(par[1]), float(err[1])) if fit_rotation else (0.0, 0.0)
    return float(par[0]), float(err[0]), rot, rot_err, int(ok.sum()), float(red_chi2)


class _NoSignal(Exception):
    """The frame does not constrain this offset."""


def _box_sums(frame: _Frame, pix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the data over each box (last axis) and its weight (1 / summed variance; 0 if
    any pixel of the box is unusable)."""
    dv, wv = frame(pix)
    good = wv > 0
    s = np.where(good, dv, 0.0).sum(axis=-1)
    var = np.where(good, 1.0 / np.where(good, wv, 1.0), 0.0).sum(axis=-1)
    allgood = good.all(axis=-1)
    weight = np.where(allgood & (var > 0), 1.0 / np.where(var > 0, var, 1.0), 0.0)
    return s, weight


def _binned_gauss(dk: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian of width sigma (bins) integrated over the bin at offset dk."""
    return ndtr((dk + 0.5) / sigma) - ndtr((dk - 0.5) / sigma)


def _oh_template(oh: dict, dy: float | np.ndarray, sigma: float) -> np.ndarray:
    """Predicted row profile of each window's lines, (W, S, R), unit amplitude, the samples
    moved by ``dy`` rows (scalar, per window (W,) or per window and spaxel (W, S, 1)).

    Row r of spaxel s sees the samples around its fractional index u (linear split): the
    binned line pattern at the integer bins k0 = floor(u) and k0 + 1, interpolated. The
    pattern depends on the bin only, so it is tabulated per window over the bins reached."""
    dyw = np.asarray(dy, np.float64)
    if dyw.ndim == 1:
        dyw = dyw[:, None, None]
    u = oh["u"] - dyw * oh["dudr"]
    valid = np.isfinite(u)
    u = np.where(valid, u, oh["u0"][:, None, None])
    k0 = np.floor(u)
    f = u - k0
    base, nk = oh["kbase"], oh["nk"]
    kk = base[oh["tw"]][:, None] + np.arange(nk)[None, :] - oh["tk"][:, None]
    vals = oh["ti"][:, None] * _binned_gauss(kk, sigma)
    W = u.shape[0]
    table = np.zeros((W, nk + 1))
    np.add.at(table[:, :nk], oh["tw"], vals)
    j = np.clip((k0 - base[:, None, None]).astype(np.int64), 0, nk - 1)
    widx = np.arange(W)[:, None, None]
    out = (1.0 - f) * table[widx, j] + f * table[widx, j + 1]
    if oh.get("frac") is not None:
        out = out * oh["frac"]
    return np.where(valid, out, 0.0)


class _Continuum:
    """Weighted least-squares quadratic continuum (level, slope, curvature) of every
    (window, spaxel) row spectrum, and its projection out of other row patterns: a science
    spectrum's own shape across a window, removed exactly from data and model alike."""

    def __init__(self, weights: np.ndarray):
        R = weights.shape[-1]
        t = (np.arange(R) - (R - 1) / 2.0) / R
        self.basis = np.stack([np.ones(R), t, t**2 - np.mean(t**2)], axis=1)  # (R, 3)
        self.weights = weights
        M = np.einsum("ri,...r,rj->...ij", self.basis, weights, self.basis)
        # (window, spaxel) pairs without weight: a ridge keeps M invertible (their
        # projected patterns carry no weight anyway)
        M += np.eye(3) * (1e-12 + (np.einsum("...ii->...", M) <= 0)[..., None, None])
        self.inverse = np.linalg.inv(M)

    def coefficients(self, X: np.ndarray) -> np.ndarray:
        v = np.einsum("ri,...r->...i", self.basis, self.weights * X)
        return np.einsum("...ij,...j->...i", self.inverse, v)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """X (…, R) minus its fitted continuum."""
        return X - np.einsum("ri,...i->...r", self.basis, self.coefficients(X))


def _oh_offsets(oh: dict, dy: float | np.ndarray, rotation: float, xc: float) -> np.ndarray:
    """Row offset of every (window, spaxel): dy (scalar or per window) plus the rotation's
    rotation (x - xc)."""
    off = np.asarray(dy, np.float64)
    off = off[:, None] if off.ndim == 1 else off
    return off + rotation * (oh["x"] - xc)


def _window_amplitudes(Tp: np.ndarray, Wt: np.ndarray, Dp: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(amplitude (W,), its normal-equation weight sum Tp W Tp (W,)) of each window's line
    pattern, one amplitude for all the spaxels of the window."""
    den = np.einsum("wsr,wsr,wsr->w", Tp, Wt, Tp)
    num = np.einsum("wsr,wsr,wsr->w", Tp, Wt, Dp)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0), den


def _without_amplitude(J: np.ndarray, Tp: np.ndarray, Wt: np.ndarray, den: np.ndarray
                       ) -> np.ndarray:
    """J (W, S, R) minus its projection on each window's line pattern (the part of a
    parameter's derivative that the free amplitude cannot absorb)."""
    c = np.einsum("wsr,wsr,wsr->w", Tp, Wt, J) / np.where(den > 0, den, 1.0)
    return J - c[:, None, None] * Tp


def _fit_dy_oh(model: FlexureModel, frame: _Frame, *, min_windows: int, rotation: float = 0.0,
               clip: float = 3.0, min_snr: float = 5.0, start: tuple[float, float] | None = None
               ) -> tuple[float, float, int, float]:
    """(dy, dy_err, windows kept, line sigma in bins) from the OH lines.

    The sky is the same in every spaxel: each window's line pattern has ONE amplitude for
    all the spaxels (times their throughput), and each (window, spaxel) its own quadratic
    continuum (a science spectrum's shape), removed by projection. A free line amplitude
    per spaxel would be fitted to the noise where the sky is faint (4 mas lenslet): those
    noise amplitudes add curvature that is not information, so the per-window errors came
    out several times too small and noise-driven windows decided the mean. (window,
    spaxel) pairs the common model cannot describe (a science source's own lines; reduced
    chi2 above 5x the median, or 5) or clearly brighter than the window's typical spaxel
    are left out after a first fit; a window counts only if its common line amplitude is
    positive and above ``min_snr`` sigma."""
    oh = model.oh
    if oh is None:
        raise _NoSignal("no OH lines in the band")
    xc = (model.shape[1] - 1) / 2.0
    D, Wt = _box_sums(frame, oh["pix"])  # (W, S, R)
    Wn, S, R = D.shape
    thr = model._thr[model.dy_spaxels][None, :, None]
    Wt = Wt * (thr > 0)
    Wt = Wt * ((Wt > 0).sum(axis=2) >= 6)[:, :, None]  # a continuum and a line to fit
    if not Wt.any():
        raise _NoSignal("no usable pixels in the OH windows")
    cont = _Continuum(Wt)
    Dp = cont(D)
    dy, sigma = (0.0, max(model.lsf_sigma_bins, 0.5)) if start is None else start
    hdy, hs = 0.02, 0.02

    def tmpl(d, sg):
        return thr * _oh_template(oh, _oh_offsets(oh, d, rotation, xc)[:, :, None], sg)

    # global (dy, sigma) first: the line width is common to all windows
    for phase in range(2):
        for _ in range(10):
            T = tmpl(dy, sigma)
            Tp = cont(T)
            amp, den = _window_amplitudes(Tp, Wt, Dp)
            r = Dp - amp[:, None, None] * Tp
            Jd = _without_amplitude(
                amp[:, None, None] * cont((tmpl(dy + hdy, sigma) - tmpl(dy - hdy, sigma))
                                          / (2 * hdy)), Tp, Wt, den)
            Js = _without_amplitude(
                amp[:, None, None] * cont((tmpl(dy, sigma + hs) - tmpl(dy, sigma - hs))
                                          / (2 * hs)), Tp, Wt, den)
            JW = np.stack([Jd * Wt, Js * Wt])
            H = np.einsum("awsr,bwsr->ab", JW, np.stack([Jd, Js]))
            grad = np.einsum("awsr,wsr->a", JW, r)
            try:
                step = np.linalg.solve(H, grad)
            except np.linalg.LinAlgError:
                step = np.full(2, np.nan)
            if not np.all(np.isfinite(step)):
                raise _NoSignal("singular OH fit")
            step = np.clip(step, [-0.5, -0.5 * sigma], [0.5, 0.5 * sigma])
            dy += float(step[0])
            sigma = float(max(0.3, sigma + step[1]))
            if abs(dy) > model.max_shift + 0.5:
                raise _NoSignal(f"OH shift ran away ({dy:.2f} rows)")
            if abs(step[0]) < 1e-4 and abs(step[1]) < 1e-3:
                break
        if phase == 0:
            npix = (Wt > 0).sum(axis=2)
            red = np.einsum("wsr,wsr,wsr->ws", r, Wt, r) / np.maximum(npix - 3, 1)
            has = npix > 0
            limit = 5.0 * max(float(np.median(red[has])), 1.0)
            # the sky's lines are in every spaxel; spaxels much brighter than the typical
            # one in a window hold a science source, whose own spectrum (lines, structure
            # a quadratic does not follow) would pull the line positions (clearly brighter
            # only: selecting on a noisy level would select the noise it is correlated with)
            level = cont.coefficients(D - amp[:, None, None] * T)[..., 0]
            level_err = np.sqrt(np.maximum(cont.inverse[..., 0, 0], 0.0))
            typical = np.median(np.where(has, level, np.nan), axis=1)
            typical = np.where(np.isfinite(typical), typical, 0.0)
            faint = level <= np.abs(typical)[:, None] * 2.0 + 5.0 * level_err
            keep = has & (red <= limit) & faint
            if not keep.any():
                keep = has & (red <= limit)
            Wt = Wt * keep[:, :, None]
            cont = _Continuum(Wt)
            Dp = cont(D)
    # per window: dy_w with the common width, then a clipped weighted mean
    dyw = np.full(Wn, dy)
    for _ in range(8):
        T = tmpl(dyw, sigma)
        Tp = cont(T)
        amp, den = _window_amplitudes(Tp, Wt, Dp)
        r = Dp - amp[:, None, None] * Tp
        Jd = _without_amplitude(
            amp[:, None, None] * cont((tmpl(dyw + hdy, sigma) - tmpl(dyw - hdy, sigma))
                                      / (2 * hdy)), Tp, Wt, den)
        h = np.einsum("wsr,wsr,wsr->w", Jd, Wt, Jd)
        gr = np.einsum("wsr,wsr,wsr->w", Jd, Wt, r)
        st = np.clip(np.where(h > 0, gr / np.where(h > 0, h, 1.0), 0.0), -0.5, 0.5)
        dyw = dyw + st
        if np.max(np.abs(st)) < 1e-4:
            break
    chi = np.einsum("wsr,wsr,wsr->w", r, Wt, r)
    npts = (Wt > 0).sum(axis=(1, 2))
    nsp = ((Wt > 0).sum(axis=2) > 0).sum(axis=1)
    dof = np.maximum(npts - 3 * nsp - 2, 1)
    # the errors scaled by the reduced chi2 when it is above 1 (never below the noise's)
    s2 = np.maximum(chi / dof, 1.0)
    a_err = np.sqrt(s2 / np.where(den > 0, den, np.inf))
    snr = np.where(a_err > 0, amp / np.where(a_err > 0, a_err, 1.0), 0.0)
    detected = snr > min_snr
    var_w = np.where(h > 0, s2 / np.where(h > 0, h, 1.0), np.inf)
    good = np.isfinite(var_w) & (np.abs(dyw) <= model.max_shift + 0.5) & detected
    kept = good.copy()
    if log.isEnabledFor(logging.DEBUG):
        for w in range(Wn):
            log.debug("OH window %d (bin %.1f): dy %+.4f +- %.4f, lines %.1f sigma, %d spaxels, "
                      "chi2/dof %.2f", w, oh["k"][w], dyw[w], math.sqrt(var_w[w]), snr[w],
                      nsp[w], chi[w] / dof[w])
    # sigma-clip the windows against each other (a misidentified or blended line, a
    # science line in the window) when there are enough of them to tell
    for _ in range(5 if good.sum() >= 5 else 0):
        wts = 1.0 / var_w[kept]
        mean = float(np.sum(wts * dyw[kept]) / wts.sum())
        resid = np.abs(dyw - mean)
        scale = max(1.4826 * float(np.median(resid[kept])), float(np.sqrt(np.median(var_w[kept]))))
        new = good & (resid <= clip * scale)
        if np.array_equal(new, kept):
            break
        kept = new
    n = int(kept.sum())
    if n < min_windows:
        raise _NoSignal(f"only {n} OH windows with detected lines (need {min_windows}; "
                        f"{int(detected.sum())} of {Wn} detected above {min_snr:g} sigma, "
                        f"the strongest at {float(np.max(snr)):.1f} sigma over {S} spaxels): "
                        "the sky lines are too faint for dy")
    wts = 1.0 / var_w[kept]
    mean = float(np.sum(wts * dyw[kept]) / wts.sum())
    formal = float(np.sqrt(1.0 / wts.sum()))
    if n > 1:
        scatter = float(np.sqrt(np.sum(wts * (dyw[kept] - mean) ** 2) / wts.sum() / (n - 1)))
    else:
        scatter = 0.0
    return mean, max(formal, scatter), n, sigma


def _ramp(t: np.ndarray) -> np.ndarray:
    """Flux of a constant spectrum in a row at ``t`` = row - (first sample's row): 0 below
    -1, linear to 1 at 0, 1 beyond (the linear split of consecutive samples one row apart)."""
    return np.clip(1.0 + t, 0.0, 1.0)


def _fit_dy_ends(model: FlexureModel, frame: _Frame, *, rotation: float = 0.0,
                 min_snr: float = 5.0, max_chi2: float = 3.0, maxiter: int = 8
                 ) -> tuple[float, float]:
    """(dy, dy_err) from where the spectra start and stop.

    Assumes the spectrum is smooth over its first and last two samples; a line there, or a
    band edge inside the filter's transmission, biases it (the OH fit does not), so the
    starts and the stops are also fitted apart and must agree."""
    xc = (model.shape[1] - 1) / 2.0
    ends = model.ends
    if ends is None:
        raise _NoSignal("no spectrum ends on the detector")
    parts = []
    for e in ends.values():
        D, Wt = _box_sums(frame, e["pix"])  # (S, 4)
        Wt = Wt * e["ok"][:, None]
        parts.append((e, D, Wt))

    def fit(use: list) -> tuple[float, float]:
        dy = 0.0
        gn = None
        for _ in range(maxiter):
            Bs, Js, Ds, Ws = [], [], [], []
            for e, D, Wt in use:
                S, R = D.shape
                y_end = e["y"] + rotation * (e["x"] - xc)
                t = (e["rows"][e["si"]] - y_end[:, None] - dy) * e["sign"]
                ramp = _ramp(t) * e["frac"][:, None]
                dr = ((t > -1) & (t < 0)) * e["frac"][:, None] * (-e["sign"])
                L = np.zeros((S, R))
                dL = np.zeros((S, R))
                np.add.at(L, e["si"], ramp)
                np.add.at(dL, e["si"], dr)
                Bs.append(np.stack([L, np.ones((S, R))], axis=2))
                Js.append(dL)
                Ds.append(D)
                Ws.append(Wt)
            B = np.concatenate(Bs)
            dL = np.concatenate(Js)
            D = np.concatenate(Ds)
            Wt = np.concatenate(Ws)
            solved = _linear_solve(B, D, Wt)
            J = (dL * solved[0][:, :1])[:, :, None]
            gn = _gauss_newton_step(B, J, D, Wt, solved=solved,
                                    nparams=np.full(B.shape[0], 2))
            step = gn.step
            if not np.all(np.isfinite(step)):
                raise _NoSignal("singular end fit")
            step = np.clip(step, -0.3, 0.3)
            dy += float(step[0])
            if abs(dy) > model.max_shift + 0.5:
                raise _NoSignal(f"end shift ran away ({dy:.2f} rows)")
            if abs(step[0]) < 1e-4:
                break
        if gn is None or not gn.H[0, 0] > 0:
            raise _NoSignal("no light at the spectrum ends")
        level = solved[0][:, 0]
        level_var = _binv_diag(solved[1])[:, 0]
        used = (Wt > 0).sum(axis=1) > 2
        z = level[used].sum() / math.sqrt(max(float(level_var[used].sum()), 1e-300))
        if not z > min_snr:
            raise _NoSignal(f"the spectrum ends are not detected ({z:.1f} sigma)")
        red_chi2 = gn.chi2 / gn.dof
        if red_chi2 > max_chi2:
            # the smooth-continuum model does not describe the ends
            raise _NoSignal(f"the spectrum ends do not look like a smooth continuum "
                            f"(reduced chi2 {red_chi2:.1f} > {max_chi2:g})")
        return dy, float(np.sqrt(gn.covariance()[0, 0]))

    dy, err = fit(parts)
    if len(parts) == 2:
        (d1, e1), (d2, e2) = fit(parts[:1]), fit(parts[1:])
        if abs(d1 - d2) > 3.0 * math.hypot(e1, e2) + 0.01:
            raise _NoSignal(f"the starts ({d1:+.3f} +- {e1:.3f}) and the stops ({d2:+.3f} "
                            f"+- {e2:.3f}) of the spectra disagree: not a smooth continuum "
                            "at the band edges")
        # the two halves' difference is a check on the model: as an error floor
        err = max(err, abs(d1 - d2) / 2.0)
    return dy, err


def _usable_prior(axis: str, prior: tuple[float, float], max_shift: float, max_error: float,
                  messages: list[str]) -> tuple[float | None, float]:
    """(value, error) of a prior for ``axis`` if it can be applied, else (None, 0) with the
    reason in ``messages``."""
    val, err = float(prior[0]), float(prior[1])
    if not (np.isfinite(val) and np.isfinite(err) and err >= 0):
        messages.append(f"{axis} prior not used: {val!r} +- {err!r} is not finite")
        return None, 0.0
    if abs(val) > max_shift or not err <= max_error:
        messages.append(f"{axis} prior rejected: {val:+.3f} +- {err:.3f} px (max_shift "
                        f"{max_shift}, max_error {max_error})")
        return None, 0.0
    messages.append(f"{axis} from the prior: {val:+.4f} +- {err:.4f} px")
    return val, err


def fit_flexure(model: FlexureModel, data: np.ndarray, variance: np.ndarray,
                good: np.ndarray, *, method: str = "auto", fit_rotation: bool = False,
                max_error: float = 0.1, min_lines: int = 3,
                prior_dx: tuple[float, float] | None = None,
                prior_dy: tuple[float, float] | None = None) -> FlexureFit:
    """Measure the frame's offset (dx, dy[, rotation]) from the reference model ``model``.

    ``data``/``variance`` (ny, nx) in consistent units (a rate and its variance), ``good``
    the usable pixels. ``method``: 'auto' (dx from the lit pattern; dy from the OH lines when
    at least ``min_lines`` windows measure it, else from the spectrum ends), 'lit' (dx lit
    pattern, dy ends), 'oh' (dx lit pattern, dy OH only), 'none' (nothing measured).
    An axis whose fit fails, leaves ``max_shift``, or is less precise than ``max_error``
    (px) is set to 0 with a message (never an exception: a frame without enough signal is
    extracted with the reference as it is) - unless a prior for it is given: ``prior_dx`` /
    ``prior_dy`` = (offset, 1-sigma error) from elsewhere (the neighbouring frames' measured
    offsets, looked up by the orchestration), then used for that axis (method PRIORX /
    PRIORY; a prior dy also enters the dx fit as a measured one would). A prior beyond
    ``max_shift`` or less precise than ``max_error`` is not used either.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    shape = model.shape
    for name, arr in (("data", data), ("variance", variance), ("good", good)):
        if np.shape(arr) != shape:
            raise ValueError(f"{name} has shape {np.shape(arr)}; the model is for {shape}")
    if method == "none":
        return FlexureFit(0.0, 0.0, 0.0, 0.0, "NONE", messages=("method='none'",))
    frame = _Frame(data, variance, good)
    timings: dict[str, float] = {}

    def fit_dy(rotation: float, start: dict | None = None) -> dict:
        """dy from the OH lines and/or the ends, with the chosen one first (``start``: a
        previous result to start the OH fit from)."""
        out: dict[str, Any] = {"dy": 0.0, "dy_err": 0.0, "meth": "", "oh": (None, None, 0, None),
                               "ends": (None, None), "messages": []}
        t1 = time.perf_counter()
        if method in ("auto", "oh"):
            try:
                begin = None
                if start is not None and start["oh"][0] is not None:
                    begin = (start["oh"][0], start["oh"][3])
                out["oh"] = _fit_dy_oh(model, frame, min_windows=min_lines, rotation=rotation,
                                       start=begin)
            except _NoSignal as exc:
                out["messages"].append(f"OH: {exc}")
        timings["dy_oh"] = timings.get("dy_oh", 0.0) + time.perf_counter() - t1
        t1 = time.perf_counter()
        if method in ("auto", "lit"):
            try:
                out["ends"] = _fit_dy_ends(model, frame, rotation=rotation)
            except _NoSignal as exc:
                out["messages"].append(f"ends: {exc}")
        timings["dy_ends"] = timings.get("dy_ends", 0.0) + time.perf_counter() - t1
        for name, (val, err) in (("OH", out["oh"][:2]), ("ENDS", out["ends"])):
            if val is None:
                continue
            if abs(val) > model.max_shift or not err <= max_error:
                out["messages"].append(f"dy from {name} rejected: {val:+.3f} +- {err:.3f} "
                                       f"rows (max_shift {model.max_shift}, max_error "
                                       f"{max_error})")
                continue
            if not out["meth"]:
                out["dy"], out["dy_err"], out["meth"] = float(val), float(err), name
        if not out["meth"] and prior_dy is not None:
            val, err = _usable_prior("dy", prior_dy, model.max_shift, max_error, out["messages"])
            if val is not None:
                out["dy"], out["dy_err"], out["meth"] = val, err, "PRIORY"
        return out

    # dy first: the row sums hardly see a sub-pixel dx; dx then uses dy (the traces' tilt
    # turns a dy into a small dx); with a rotation, dy once more with the rotation's dy(x)
    ys = fit_dy(0.0)
    dx = dx_err = rot = rot_err = 0.0
    groups, chi2 = 0, None
    xmeth = ""
    xmsg: list[str] = []
    t1 = time.perf_counter()
    try:
        dx, dx_err, rot, rot_err, groups, chi2 = _fit_dx(model, frame, ys["dy"],
                                                          fit_rotation=fit_rotation)
        if abs(dx) > model.max_shift or not dx_err <= max_error:
            xmsg.append(f"dx rejected: {dx:+.3f} +- {dx_err:.3f} px (max_shift "
                        f"{model.max_shift}, max_error {max_error})")
            dx = dx_err = rot = rot_err = 0.0
        else:
            xmeth = "LIT"
    except _NoSignal as exc:
        xmsg.append(f"dx: {exc}")
    timings["dx"] = time.perf_counter() - t1
    if not xmeth and prior_dx is not None:
        val, err = _usable_prior("dx", prior_dx, model.max_shift, max_error, xmsg)
        if val is not None:
            dx, dx_err, xmeth = val, err, "PRIORX"
    # with a rotation, dy once more with its dy(x), unless it moves no spectrum by 2e-3 px
    # or the first pass measured nothing (no lines or ends detected: a rotation of a few
    # 1e-3 degrees does not change that)
    measured = ys["oh"][0] is not None or ys["ends"][0] is not None
    if fit_rotation and measured and abs(rot) * (model.shape[1] - 1) / 2.0 > 2e-3:
        ys = fit_dy(rot, ys)
    dy_oh, dy_oh_err, n_lines, sigma = ys["oh"]
    dy_end, dy_end_err = ys["ends"]
    messages = ys["messages"] + xmsg
    parts = [m for m in (xmeth, ys["meth"]) if m]
    meth = "+".join(parts) if parts else "NONE"
    timings["total"] = time.perf_counter() - t0
    return FlexureFit(dx=dx, dy=ys["dy"], dx_err=dx_err, dy_err=ys["dy_err"], method=meth,
                      rotation=rot, rotation_err=rot_err, dy_oh=dy_oh, dy_oh_err=dy_oh_err,
                      n_lines=n_lines, line_width=sigma, dy_ends=dy_end, dy_ends_err=dy_end_err,
                      dx_groups=groups, chi2_dx=chi2, messages=tuple(messages),
                      timings=timings)
