"""Plain numpy twins of the readout_cy kernels (slow, for tests and as a readable spec).

Each function has the name and the meaning of its Cython counterpart in
:mod:`readout_cy` and repeats its arithmetic in the same order and precision (float32 per
read, exact integer reference-pixel sums, float64 estimator coefficients and combination),
so the kernels can be checked bit for bit or within a documented float tolerance.
Pixels that need per-segment work are handled by a Python loop: keep arrays small.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._api import (
    REFPIX_BORDER,
    BorderMask,
    DQFlags,
    FlickerSums,
    JumpResult,
    LinearityResult,
    RampResult,
    SaturationResult,
    _as_ramps_float,
    _as_ramps_uint16,
    _coeffs,
    _dq_bits,
    _edge_tie,
    _flicker_apply_check,
    _flicker_fill,
    _jump_threshold,
    _map,
    _mode,
    _ngood,
    _refpix_check,
    _refpix_dq,
    _refpix_mask_arg,
    _refpix_prepare,
    _refpix_tables_from_sums,
    _refpix_var_arg,
    _refpix_variance,
    _reject_threshold,
    _times,
)

POWERS = (0.0, 0.4, 1.0, 3.0, 6.0, 10.0)
F32 = np.float32
# per-ramp status codes of the fit (internal, as R_* in the kernels; not DQ bits)
R_NOSLOPE, R_SAT, R_JUMP = 1, 2, 4
DQArg = DQFlags | Mapping[str, int]


def _full(m: np.ndarray, ny: int, nx: int) -> np.ndarray:
    return np.broadcast_to(m.reshape(()) if m.ndim == 1 else m, (ny, nx)).astype(F32)


# ----------------------------------------------------------------------------------------
# reference pixels
# ----------------------------------------------------------------------------------------


def refpix_sums(
    frames: np.ndarray, nch: int, gtb: np.ndarray | None, gsd: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer sums of the usable reference pixels per frame: channels (nf, nch) over the
    4 top + 4 bottom rows, left and right side columns per row (nf, ny)."""
    nf, ny, nx = frames.shape
    chw = nx // nch
    f = frames.astype(np.int64)
    tbp = np.concatenate([f[:, :4, :], f[:, ny - 4 :, :]], axis=1)  # (nf, 8, nx)
    sdp = np.concatenate([f[:, :, :4], f[:, :, nx - 4 :]], axis=2)  # (nf, ny, 8)
    if gtb is not None:
        tbp = tbp * gtb.astype(np.int64)
        sdp = sdp * gsd.astype(np.int64)
    tb = tbp.sum(axis=1).reshape(nf, nch, chw).sum(axis=2)
    return tb, sdp[:, :, :4].sum(axis=2), sdp[:, :, 4:].sum(axis=2)


def refpix_tables(
    frames: np.ndarray, nch: int, smooth: int, excluded: BorderMask | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Channel offsets (nf, nch) and smoothed side-column row offsets (nf, ny), float64
    (before the tie of :func:`readout_cy._api._retie`), from the usable reference pixels."""
    nf, ny, nx = frames.shape
    gtb = gsd = None
    if excluded is not None and excluded.any():
        gtb, gsd = excluded.good()
    else:
        excluded = None
    tb, left, right = refpix_sums(frames, nch, gtb, gsd)
    off, rowc, _, _ = _refpix_tables_from_sums(tb, left, right, excluded, ny, nx, nch, smooth)
    return off, rowc


def refpix_pattern_correction(
    top_bottom: np.ndarray, side: np.ndarray, nch: int, smooth: int,
    excluded: BorderMask | tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """What the reference-pixel correction makes of a fixed pattern whose amplitude changes
    over the ramp: off (nch,) and rowc (ny,) float64, such that a pattern ``a(t) * p`` in the
    reads changes the corrected slope of a pixel (y, x) of channel c by
    ``da/dt * (p[y, x] - off[c] - rowc[y])``.

    ``top_bottom`` (8, nx): p on rows 0-3 and ny-4..ny-1; ``side`` (ny, 8): p on columns 0-3
    and nx-4..nx-1 (the layout of :class:`BorderMask`); ``excluded``: the reference pixels the
    correction left out (``RampResult.refpix.excluded``: (y, x) indices, or a BorderMask).  The same linear
    arithmetic as :func:`readout_cy._api._refpix_prepare` (channel means of the top/bottom
    rows, the side columns' running means over ``smooth`` rows, tied to the mean of all
    channel offsets), in float64 instead of exact integer sums; the tie's first-read constant
    does not enter a slope and is left out.  Used by the readout step's picture-frame
    correction to know the part of the pattern that the reference pixels carry to the frame.
    """
    tbp = np.asarray(top_bottom, np.float64)
    sdp = np.asarray(side, np.float64)
    ny, nx = sdp.shape[0], tbp.shape[1]
    if tbp.shape != (8, nx) or sdp.shape != (ny, 8) or nx % nch:
        raise ValueError(f"refpix_pattern_correction: top_bottom must be (8, nx) and side (ny, 8) "
                         f"with nx % nch == 0, got {tbp.shape}, {sdp.shape}, nch={nch}")
    if isinstance(excluded, tuple):
        m = BorderMask.empty(ny, nx)
        y, x = (np.asarray(a, np.intp) for a in excluded)
        if len(y):
            if ((y >= 4) & (y < ny - 4) & (x >= 4) & (x < nx - 4)).any():
                raise ValueError("refpix_pattern_correction: excluded holds pixels off the border")
            top = y < 4
            bot = y >= ny - 4
            m.tb[np.where(top, y, y - (ny - 8))[top | bot], x[top | bot]] = True
            lft = x < 4
            rgt = x >= nx - 4
            m.sd[y[lft | rgt], np.where(lft, x, x - (nx - 8))[lft | rgt]] = True
        excluded = m
    excl = excluded if excluded is not None and excluded.any() else None
    if excl is not None:
        tbp = tbp * ~excl.tb
        sdp = sdp * ~excl.sd
    tb = tbp.sum(axis=0).reshape(nch, nx // nch).sum(axis=1)[None]
    left = sdp[:, :4].sum(axis=1)[None]
    right = sdp[:, 4:].sum(axis=1)[None]
    off, rowc, _, _ = _refpix_tables_from_sums(tb, left, right, excl, ny, nx, nch, smooth)
    if smooth > 0:
        rowc = rowc + _edge_tie(off)[:, None]
    return off[0], rowc[0]


def refpix_border_stats(
    frames: np.ndarray, nramps: int, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Twin of the kernel: per border pixel mean level, slope (sum_i c_i v_i, mean over
    ramps) and residual sum of squares about each ramp's line (summed), float64, in the
    kernel's pixel order and arithmetic order."""
    nf, ny, nx = frames.shape
    nr = len(c)
    tbp = np.concatenate([frames[:, :4, :], frames[:, ny - 4 :, :]], axis=1).reshape(nf, -1)
    sdp = np.concatenate([frames[:, 4 : ny - 4, :4], frames[:, 4 : ny - 4, nx - 4 :]],
                         axis=2).reshape(nf, -1)
    v = np.concatenate([tbp, sdp], axis=1).astype(np.float64).reshape(nramps, nr, -1)
    tt2 = 0.0
    for i in range(nr):
        tt2 = tt2 + c[i] * c[i]
    tt2 = 1.0 / tt2 if tt2 > 0 else 0.0
    npix = v.shape[2]
    level = np.zeros(npix)
    slope = np.zeros(npix)
    rss = np.zeros(npix)
    for r in range(nramps):
        base = v[r, 0]
        a0 = np.zeros(npix)
        a1 = np.zeros(npix)
        a2 = np.zeros(npix)
        for i in range(nr):
            x = v[r, i] - base
            a0 = a0 + x
            a1 = a1 + c[i] * x
            a2 = a2 + x * x
        ybar = a0 / nr
        level = level + (base + ybar) / nramps
        slope = slope + a1 / nramps
        rss = rss + (a2 - nr * ybar * ybar - a1 * a1 * tt2)
    return level, slope, rss


def _refpix_apply(r4: np.ndarray, off: np.ndarray, rowc: np.ndarray, nch: int) -> np.ndarray:
    nramps, nr, ny, nx = r4.shape
    chw = nx // nch
    f = (off[:, None, :] + rowc[:, :, None]).astype(F32)  # (nf, ny, nch)
    fx = np.repeat(f, chw, axis=2).reshape(nramps, nr, ny, nx)
    return r4.astype(F32) - fx


def _prepare(r4: np.ndarray, t: np.ndarray, nch: int, sm: int, mask: Any,
             reject: float | None) -> tuple[np.ndarray, ...]:
    ny, nx = r4.shape[-2:]
    return _refpix_prepare(r4, t, nch, sm, _refpix_mask_arg(mask, ny, nx),
                           _reject_threshold(reject), border_stats=refpix_border_stats,
                           sums=refpix_sums)


def refpix_correct(
    reads: np.ndarray, *, channels: int = 32, smooth: int | None = 11, threads: Any = None,
    read_times: Any = None, mask: Any = None, reject: float | None = 5.0,
) -> np.ndarray:
    was3d = reads.ndim == 3
    r4 = _as_ramps_uint16(reads)
    nramps, nr, ny, nx = r4.shape
    sm = _refpix_check(ny, nx, channels, smooth)
    t = np.arange(nr, dtype=np.float64) if read_times is None else _times(read_times, nr)
    off, rowc, _, _ = _prepare(r4, t, channels, sm, mask, reject)
    out = _refpix_apply(r4, off, rowc, channels)
    return out[0] if was3d else out


# ----------------------------------------------------------------------------------------
# saturation, linearity
# ----------------------------------------------------------------------------------------


def _ngood_from_raw(r4: np.ndarray, sat: np.ndarray) -> np.ndarray:
    nramps, nr, ny, nx = r4.shape
    s = _full(sat, ny, nx)
    below = (r4.astype(F32) < s) | np.isnan(s)  # (nramps, nr, ny, nx)
    return np.cumprod(below, axis=1).sum(axis=1).astype(np.int32)


def flag_saturation(
    reads: np.ndarray, saturation: Any, *, dqflags: DQArg, threads: Any = None
) -> SaturationResult:
    bits = _dq_bits(dqflags)
    was3d = reads.ndim == 3
    r4 = _as_ramps_uint16(reads)
    nramps, nr, ny, nx = r4.shape
    sat = _map("saturation", saturation, ny, nx, minimum=0, strict=True, allow_nan=True)
    ng = _ngood_from_raw(r4, sat)
    dq = np.zeros((ny, nx), np.uint32)
    dq[(ng < nr).any(axis=0)] |= bits.saturated
    dq[(ng < 2).any(axis=0)] |= bits.do_not_use
    dq[np.isnan(_full(sat, ny, nx))] |= bits.no_sat_check
    ng16 = ng.astype(np.uint16)
    return SaturationResult(ngood=ng16[0] if was3d else ng16, dq=dq)


def _horner(x: np.ndarray, coef: np.ndarray) -> np.ndarray:
    r = coef[-1].copy()
    for k in range(coef.shape[0] - 2, -1, -1):
        r = r * x + coef[k]
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(r), x, r).astype(F32)


def _linok(coef: np.ndarray) -> np.ndarray:
    return ~np.isnan(coef).any(axis=0)


def linearity_correct(
    data: np.ndarray, coeffs: np.ndarray, *, dqflags: DQArg, threads: Any = None
) -> LinearityResult:
    bits = _dq_bits(dqflags)
    ny, nx = data.shape[-2:]
    coef = _coeffs(coeffs, ny, nx)
    x = np.asarray(data, dtype=F32)
    out = _horner(x, coef)
    dq = np.where(_linok(coef), 0, bits.no_lin_corr).astype(np.uint32)
    return LinearityResult(data=out, dq=dq)


# ----------------------------------------------------------------------------------------
# jumps
# ----------------------------------------------------------------------------------------


def _median_of(col: np.ndarray, nu: int) -> F32:
    """Median rule of the kernel on a sorted column with nu usable entries."""
    if nu >= 3:
        h = nu // 2
        if nu % 2:
            return col[h]
        return F32(0.5) * (col[h - 1] + col[h])
    if nu == 2:
        a, b = col[0], col[1]
        return a if abs(a) <= abs(b) else b
    if nu == 1:
        return col[0]
    return F32(np.nan)


def _jumps_one(
    d: np.ndarray, ng: np.ndarray, t: np.ndarray, rn: np.ndarray, g: np.ndarray, thr: float
) -> tuple[np.ndarray, np.ndarray]:
    """(nd, ny, nx) float32 differences of one ramp -> (jump flags, median rate)."""
    nd = d.shape[0]
    dt = np.diff(t)
    dt32 = dt.astype(F32)
    inv32 = (1.0 / dt).astype(F32)
    k = np.arange(nd)[:, None, None]
    nu = ng.astype(np.int64) - 1
    q = np.where(k < nu, d * inv32[:, None, None], F32(np.inf)).astype(F32)
    qs = np.sort(q, axis=0)
    med = np.empty(ng.shape, F32)
    for iy, ix in np.ndindex(*ng.shape):
        med[iy, ix] = _median_of(qs[:, iy, ix], int(nu[iy, ix]))
    rn2x2 = F32(2.0) * rn * rn
    ig = F32(1.0) / g
    e = d - med * dt32[:, None, None]
    s2 = rn2x2 + np.abs(med) * dt32[:, None, None] * ig
    thr2 = F32(thr * thr)
    with np.errstate(invalid="ignore"):
        jmp = (k < nu) & (ng >= 3) & (e * e > thr2 * s2) & (s2 > 0)
    return jmp, med


def detect_jumps(
    data: np.ndarray,
    read_times: Sequence[float] | np.ndarray,
    *,
    gain: Any,
    read_noise: Any,
    dqflags: DQArg,
    threshold: float = 4.0,
    ngood: Any = None,
    threads: Any = None,
) -> JumpResult:
    bits = _dq_bits(dqflags)
    was3d = data.ndim == 3
    d4 = _as_ramps_float(data)
    nramps, nr, ny, nx = d4.shape
    t = _times(read_times, nr)
    _, thr = _jump_threshold(threshold)
    g = _full(_map("gain", gain, ny, nx, minimum=0, strict=True, allow_nan=True), ny, nx)
    rn = _full(_map("read_noise", read_noise, ny, nx, minimum=0), ny, nx)
    ng = _ngood(ngood, nramps, nr, ny, nx).astype(np.int32)
    jumps = np.zeros((nramps, max(nr - 1, 0), ny, nx), bool)
    med = np.full((nramps, ny, nx), np.nan, F32)
    if nr >= 2:
        for r in range(nramps):
            d = (d4[r, 1:] - d4[r, :-1]).astype(F32)
            jumps[r], med[r] = _jumps_one(d, ng[r], t, rn, g, thr)
    dq = np.where(jumps.any(axis=(0, 1)), bits.jump_det, 0).astype(np.uint32)
    return JumpResult(jumps=jumps[0] if was3d else jumps, median_rate=med[0] if was3d else med, dq=dq)


# ----------------------------------------------------------------------------------------
# slopes
# ----------------------------------------------------------------------------------------


def utr_coefficients(t: np.ndarray, a: int, b: int, power: float) -> tuple[np.ndarray, float, float]:
    """Weighted least-squares slope over reads a..b as sum_k C_k d_k; R = sum c^2,
    P = sum C_k^2 dt_k (same loop order as the kernel)."""
    L = b - a + 1
    mid = (L - 1) * 0.5
    w = []
    sw = sx = 0.0
    for j in range(L):
        wj = math.pow(abs((j - mid) / mid), power) if power != 0.0 else 1.0
        w.append(wj)
        x = float(t[a + j] - t[a])
        sw = sw + wj
        sx = sx + wj * x
    xb = sx / sw
    sxx = 0.0
    for j in range(L):
        x = float(t[a + j] - t[a])
        sxx = sxx + w[j] * (x - xb) * (x - xb)
    c = []
    r = 0.0
    for j in range(L):
        x = float(t[a + j] - t[a])
        cj = w[j] * (x - xb) / sxx
        c.append(cj)
        r = r + cj * cj
    C = np.zeros(max(L - 1, 1))
    acc = 0.0
    p = 0.0
    for j in range(L - 1, 0, -1):
        acc = acc + c[j]
        C[j - 1] = acc
        p = p + acc * acc * float(t[a + j] - t[a + j - 1])
    return C, r, p


def mcds_coefficients(t: np.ndarray, ns: int, kk: int) -> tuple[np.ndarray, float, float]:
    """Fowler-kk estimator over usable reads 0..ns-1 as sum_k C_k d_k, with R and P."""
    t1 = t2 = 0.0
    for j in range(kk):
        t1 = t1 + float(t[j])
        t2 = t2 + float(t[ns - kk + j])
    t1 = t1 / kk
    t2 = t2 / kk
    c = 1.0 / (kk * (t2 - t1))
    C = np.zeros(max(ns - 1, 1))
    acc = 0.0
    p = 0.0
    for j in range(ns - 1, 0, -1):
        cj = c if j >= ns - kk else (-c if j < kk else 0.0)
        acc = acc + cj
        C[j - 1] = acc
        p = p + acc * acc * float(t[j] - t[j - 1])
    return C, 2.0 * kk * c * c, p


def _bucket(data: Any, rn: Any, g: Any) -> Any:
    """stcal's SNR buckets, in float32 like the kernel."""
    with np.errstate(invalid="ignore", divide="ignore"):
        den = rn * rn * g * g + data * g
        snr = data * g / np.sqrt(den)
        return (
            (snr >= 5.0).astype(np.int32)
            + (snr >= 10.0)
            + (snr >= 20.0)
            + (snr >= 50.0)
            + (snr >= 100.0)
        )


def _seg_add(acc: list[float], bs: float, Rs: float, Ps: float, rn2: float, mig: float) -> None:
    v = rn2 * Rs + mig * Ps
    if not (v > 0.0):
        v = 1e-30
    acc[0] += 1.0 / v
    acc[1] += bs / v
    acc[2] += Rs / (v * v)
    acc[3] += Ps / (v * v)


def _fit_ramp(
    d: np.ndarray,
    ng: np.ndarray,
    jmp: np.ndarray | None,
    med: np.ndarray | None,
    t: np.ndarray,
    rn: np.ndarray,
    g: np.ndarray,
    mode: int,
    fowler_k: int,
    weighted: int,
    rvp: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """One ramp -> (b, R, P, m) float32 and (nused, flags) int32, per pixel (flags: R_*).

    ``rvp``: (ny, nx) float64 reference-correction variance added to rn^2 (None: 0)."""
    nr = len(t)
    nd = d.shape[0]
    ny, nx = ng.shape
    if rvp is None:
        rvp = np.zeros((ny, nx))
    b = np.full((ny, nx), np.nan, F32)
    R = np.zeros((ny, nx), F32)
    P = np.zeros((ny, nx), F32)
    m_out = np.full((ny, nx), np.nan, F32)
    nused = np.zeros((ny, nx), np.int32)
    flags = np.zeros((ny, nx), np.int32)
    njump = jmp.sum(axis=0) if jmp is not None else np.zeros((ny, nx), np.int64)
    clean = (ng == nr) & (njump == 0) & (nr >= 2)
    if nr >= 2:
        # vectorised full-ramp estimator for clean pixels
        S = np.zeros((ny, nx), F32)
        for k in range(nd):
            S = S + d[k]
        pidx = _bucket(S, rn, g) if weighted else np.zeros((ny, nx), np.int32)
        tabs = []
        for pw in POWERS:
            if mode == 0:
                tabs.append(utr_coefficients(t, 0, nr - 1, pw))
            else:
                tabs.append(mcds_coefficients(t, nr, min(fowler_k, nr // 2)))
        acc = np.zeros((len(POWERS), ny, nx), F32)
        for j, (C, _, _) in enumerate(tabs):
            for k in range(nd):
                acc[j] = acc[j] + F32(C[k]) * d[k]
        bsel = np.take_along_axis(acc, pidx[None].astype(np.int64), axis=0)[0]
        rtab = np.array([x[1] for x in tabs], F32)
        ptab = np.array([x[2] for x in tabs], F32)
        b[clean] = bsel[clean]
        R[clean] = rtab[pidx][clean]
        P[clean] = ptab[pidx][clean]
        if med is not None:
            m_out[clean] = med[clean]
        else:
            m_out[clean] = (S / F32(t[nr - 1] - t[0]))[clean]
        nused[clean] = nr if mode == 0 else 2 * min(fowler_k, nr // 2)
    for iy, ix in zip(*np.nonzero(~clean), strict=True):
        ns = int(ng[iy, ix])
        col = d[:, iy, ix]
        rnv, gv = rn[iy, ix], g[iy, ix]
        fl = R_SAT if ns < nr else 0
        rn2 = float(rnv) * float(rnv) + float(rvp[iy, ix])
        ig = 1.0 / float(gv)
        if med is not None:
            m = med[iy, ix]
        else:
            m = F32(np.nan)
            if ns >= 2:
                sf = F32(0.0)
                for k in range(ns - 1):
                    sf = sf + col[k]
                m = sf / F32(t[ns - 1] - t[0])
        mig = float(m) * ig if m > 0 else 0.0
        acc4 = [0.0, 0.0, 0.0, 0.0]
        segs: list[tuple[float, float, float]] = []
        nu = 0
        if mode == 0:
            if jmp is not None and njump[iy, ix] > 0:
                fl |= R_JUMP
            a = 0
            for k in range(ns):
                if k == ns - 1 or (jmp is not None and jmp[k, iy, ix]):
                    L = k - a + 1
                    if L >= 2:
                        pi = 0
                        if weighted:
                            sf = F32(0.0)
                            for kk in range(a, k):
                                sf = sf + col[kk]
                            pi = int(_bucket(sf, rnv, gv))
                        C, Rs, Ps = utr_coefficients(t, a, k, POWERS[pi])
                        bs = F32(0.0)
                        for kk in range(a, k):
                            bs = bs + F32(C[kk - a]) * col[kk]
                        segs.append((float(bs), Rs, Ps))
                        nu += L
                        _seg_add(acc4, float(bs), Rs, Ps, rn2, mig)
                    a = k + 1
        else:
            kk = min(fowler_k, ns // 2)
            if kk >= 1:
                C, Rs, Ps = mcds_coefficients(t, ns, kk)
                bs = F32(0.0)
                for k in range(ns - 1):
                    bs = bs + F32(C[k]) * col[k]
                segs.append((float(bs), Rs, Ps))
                nu = 2 * kk
        if not segs:
            fl |= R_NOSLOPE
        elif len(segs) == 1:
            b[iy, ix], R[iy, ix], P[iy, ix] = segs[0]
        else:
            W, Sb, SR, SP = acc4
            b[iy, ix], R[iy, ix], P[iy, ix] = Sb / W, SR / (W * W), SP / (W * W)
        m_out[iy, ix] = m
        nused[iy, ix] = nu
        flags[iy, ix] = fl
    return b, R, P, m_out, nused, flags


def _combine(
    per_ramp: list[tuple[np.ndarray, ...]],
    rn: np.ndarray,
    g: np.ndarray,
    sat: np.ndarray | None,
    linok: np.ndarray | None,
    border: int,
    bits: DQFlags,
    rvp: np.ndarray | None = None,
) -> RampResult:
    ny, nx = rn.shape
    rn2 = rn.astype(np.float64) * rn.astype(np.float64)
    if rvp is not None:
        rn2 = rn2 + rvp
    ig = 1.0 / g.astype(np.float64)
    if len(per_ramp) == 1:
        b32, R32, P32, _, nu, fl = per_ramp[0]
        b = b32.astype(np.float64)
        R = R32.astype(np.float64)
        P = P32.astype(np.float64)
        flags = fl.copy()
        nused = nu.copy()
    else:
        b = np.full((ny, nx), np.nan)
        R = np.zeros((ny, nx))
        P = np.zeros((ny, nx))
        flags = np.zeros((ny, nx), np.int32)
        nused = np.zeros((ny, nx), np.int64)
        for iy, ix in np.ndindex(ny, nx):
            f = 0
            ok = []
            msum = 0.0
            cnt = 0
            for rb, rR, rP, rm, rnu, rfl in per_ramp:
                f |= int(rfl[iy, ix]) & (R_SAT | R_JUMP)
                if not rfl[iy, ix] & R_NOSLOPE:
                    ok.append((float(rb[iy, ix]), float(rR[iy, ix]), float(rP[iy, ix])))
                    nused[iy, ix] += rnu[iy, ix]
                    if rm[iy, ix] == rm[iy, ix]:
                        msum += float(rm[iy, ix])
                        cnt += 1
            if len(ok) == 1:
                b[iy, ix], R[iy, ix], P[iy, ix] = ok[0]
            elif len(ok) > 1:
                mbar = msum / cnt if cnt > 0 else 0.0
                mig = mbar * ig[iy, ix] if mbar > 0.0 else 0.0
                acc4 = [0.0, 0.0, 0.0, 0.0]
                for bs, Rs, Ps in ok:
                    _seg_add(acc4, bs, Rs, Ps, rn2[iy, ix], mig)
                W, Sb, SR, SP = acc4
                b[iy, ix], R[iy, ix], P[iy, ix] = Sb / W, SR / (W * W), SP / (W * W)
            else:
                f |= R_NOSLOPE
            flags[iy, ix] = f
    bad = ((flags & R_NOSLOPE) != 0) | np.isnan(g)
    with np.errstate(invalid="ignore"):
        vpo = np.where(b > 0.0, b * ig * P, 0.0)
        vrr = rn2 * R
        res = RampResult(
            slope=np.where(bad, np.nan, b).astype(F32),
            var_poisson=np.where(bad, 0.0, vpo).astype(F32),
            var_rnoise=np.where(bad, 0.0, vrr).astype(F32),
            err=np.where(bad, 0.0, np.sqrt(vrr + vpo)).astype(F32),
            dq=(np.where(flags & R_NOSLOPE, bits.do_not_use, 0)
                | np.where(flags & R_SAT, bits.saturated, 0)
                | np.where(flags & R_JUMP, bits.jump_det, 0)).astype(np.uint32),
            nused=np.minimum(nused, 65535).astype(np.uint16),
        )
    res.dq[np.isnan(g)] |= bits.no_gain_value | bits.do_not_use
    if sat is not None:
        res.dq[np.isnan(sat)] |= bits.no_sat_check
    if linok is not None:
        res.dq[~linok] |= bits.no_lin_corr
    if border:
        edge = np.zeros((ny, nx), bool)
        edge[:border] = edge[-border:] = True
        edge[:, :border] = edge[:, -border:] = True
        res.dq[edge] |= bits.reference_pixel
    return res


def fit_slopes(
    data: np.ndarray,
    read_times: Sequence[float] | np.ndarray,
    *,
    gain: Any,
    read_noise: Any,
    dqflags: DQArg,
    ngood: Any = None,
    jumps: np.ndarray | None = None,
    median_rate: Any = None,
    mode: str = "utr",
    fowler_k: int | None = None,
    weighting: str = "optimal",
    refpix_var: Any = None,
    threads: Any = None,
) -> RampResult:
    bits = _dq_bits(dqflags)
    d4 = _as_ramps_float(data)
    nramps, nr, ny, nx = d4.shape
    t = _times(read_times, nr)
    mode_code, k, weighted = _mode(mode, weighting, fowler_k, nr)
    g = _full(_map("gain", gain, ny, nx, minimum=0, strict=True, allow_nan=True), ny, nx)
    rn = _full(_map("read_noise", read_noise, ny, nx, minimum=0), ny, nx)
    ng = _ngood(ngood, nramps, nr, ny, nx).astype(np.int32)
    jv = None
    if jumps is not None and nr >= 2:
        jv = np.asarray(jumps, bool)
        if jv.ndim == 3:
            jv = jv[None]
    mv = None
    if median_rate is not None:
        mv = np.asarray(median_rate, F32)
        if mv.ndim == 2:
            mv = mv[None]
    rv, nch = _refpix_var_arg(refpix_var, ny, nx)
    rvp = None if rv is None else np.repeat(rv, nx // nch, axis=1)
    per = []
    for r in range(nramps):
        d = (d4[r, 1:] - d4[r, :-1]).astype(F32) if nr >= 2 else np.zeros((1, ny, nx), F32)
        per.append(
            _fit_ramp(d, ng[r], None if jv is None else jv[r], None if mv is None else mv[r],
                      t, rn, g, mode_code, k, weighted, rvp)
        )
    return _combine(per, rn, g, None, None, 0, bits, rvp)


# ----------------------------------------------------------------------------------------
# the whole pipeline
# ----------------------------------------------------------------------------------------


def process_ramp(
    reads: np.ndarray,
    read_times: Sequence[float] | np.ndarray,
    *,
    gain: Any,
    read_noise: Any,
    saturation: Any,
    dqflags: DQArg,
    nonlinearity: np.ndarray | None = None,
    mode: str = "utr",
    refpix: bool = True,
    jump_threshold: float | None = 4.0,
    threads: Any = None,
    fowler_k: int | None = None,
    weighting: str = "optimal",
    refpix_channels: int = 32,
    refpix_smooth: int | None = 11,
    bias: Any = None,
    refpix_mask: Any = None,
    refpix_reject: float | None = 5.0,
    pixel_dq: Any = None,
    flicker: Any = None,
) -> RampResult:
    """Twin of :func:`readout_cy.process_ramp`, composed from the twins above (``flicker``:
    :func:`flicker_sums` of the finished result, which the kernel computes in its row loop;
    equal to float64 rounding, see :func:`flicker_sums`)."""
    bits = _dq_bits(dqflags)
    r4 = _as_ramps_uint16(reads)
    nramps, nr, ny, nx = r4.shape
    t = _times(read_times, nr)
    mode_code, k, weighted = _mode(mode, weighting, fowler_k, nr)
    do_jump, thr = _jump_threshold(jump_threshold)
    sat = _map("saturation", saturation, ny, nx, minimum=0, strict=True, allow_nan=True)
    g = _full(_map("gain", gain, ny, nx, minimum=0, strict=True, allow_nan=True), ny, nx)
    rn = _full(_map("read_noise", read_noise, ny, nx, minimum=0), ny, nx)
    coef = _coeffs(nonlinearity, ny, nx)
    rvp = None
    report = None
    if refpix:
        sm = _refpix_check(ny, nx, refpix_channels, refpix_smooth)
        off, rowc, report, excl = _prepare(r4, t, refpix_channels, sm, refpix_mask,
                                           refpix_reject)
        val = _refpix_apply(r4, off, rowc, refpix_channels)
        rn_in = _map("read_noise", read_noise, ny, nx, minimum=0)
        rvp = np.repeat(_refpix_variance(rn_in, ny, nx, refpix_channels, sm,
                                         excl if excl.any() else None),
                        nx // refpix_channels, axis=1)
    else:
        val = r4.astype(F32)
    if bias is not None:
        val = val - _full(_map("bias", bias, ny, nx), ny, nx)
    if coef is not None:
        val = _horner(val, coef)
    ng = _ngood_from_raw(r4, sat)
    per = []
    for r in range(nramps):
        d = (val[r, 1:] - val[r, :-1]).astype(F32) if nr >= 2 else np.zeros((1, ny, nx), F32)
        jmp = med = None
        if do_jump and mode_code == 0 and nr >= 3:
            jmp, med = _jumps_one(d, ng[r], t, rn, g, thr)
        per.append(_fit_ramp(d, ng[r], jmp, med, t, rn, g, mode_code, k, weighted, rvp))
    res = _combine(
        per, rn, g, _full(sat, ny, nx), None if coef is None else _linok(coef),
        REFPIX_BORDER if refpix else 0, bits, rvp,
    )
    if report is not None:
        _refpix_dq(res.dq, report, refpix_channels, bits)
        res.refpix = report
    if pixel_dq is not None:
        res.dq |= np.asarray(pixel_dq).astype(np.uint32)
    if flicker is not None:
        res.flicker = FlickerSums(flicker, flicker_sums(
            res.slope, res.err, res.dq, skip=flicker.skip, channels=flicker.channels,
            nsigma=flicker.nsigma, dilate=max(int(flicker.dilate), 0)))
    return res


def process_exposure(
    reads: np.ndarray, read_times: Sequence[float] | np.ndarray, *, dqflags: DQArg, **kwargs: Any
) -> RampResult:
    return process_ramp(reads, read_times, dqflags=dqflags, **kwargs)


# ----------------------------------------------------------------------------------------
# 1/f stripes and ACN on a slope image
# ----------------------------------------------------------------------------------------


def flicker_apply(slope: np.ndarray, stripes: np.ndarray, acn: np.ndarray | None,
                  var_rnoise: np.ndarray | None = None, add: np.ndarray | None = None,
                  threads: Any = None, *, var_poisson: np.ndarray | None = None,
                  err: np.ndarray | None = None) -> None:
    """Twin of :func:`readout_cy.flicker_apply` (in place; the same float32 operations in
    the same order: (slope - stripe) -/+ acn; var_rnoise + add where the slope is not NaN;
    err = sqrt(var_rnoise + var_poisson))."""
    _flicker_apply_check(slope, stripes, acn, var_rnoise, add, var_poisson, err)
    ny, nx = slope.shape
    nch = stripes.shape[1]
    chw = nx // nch
    s = np.repeat(np.asarray(stripes, F32), chw, axis=1)
    out = slope - s
    if acn is not None:
        a = np.repeat(np.asarray(acn, F32), chw, axis=1)
        sign_even = ((np.arange(nx) % chw) % 2 == 0)[None, :]
        out = np.where(sign_even, out - a, out + a)
    slope[...] = out
    if var_rnoise is not None:
        d = np.repeat(np.asarray(add, F32), chw, axis=1)
        with np.errstate(invalid="ignore"):
            fin = slope == slope
        var_rnoise[...] = np.where(fin, var_rnoise + d, var_rnoise)
    if err is not None:
        np.sqrt(var_rnoise + var_poisson, out=err)


def dilate_mask(mask: np.ndarray, n: int) -> np.ndarray:
    """Binary dilation by a (2n+1)^2 square, by shifted ORs (separable, n passes)."""
    out = mask.copy()
    for _ in range(n):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        out = grown.copy()
        out[:, 1:] |= grown[:, :-1]
        out[:, :-1] |= grown[:, 1:]
    return out


def flicker_sums(
    slope: np.ndarray, err: np.ndarray, dq: np.ndarray, *, skip: int, channels: int,
    nsigma: float = 3.0, dilate: int = 2, threads: Any = None,
) -> tuple[np.ndarray, ...]:
    """Twin of :func:`readout_cy.flicker_sums` (sums in numpy's order: equal to ~1e-15)."""
    ny, nx = slope.shape
    chw = nx // channels
    slope = slope.astype(F32)
    err = err.astype(F32)
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(slope) & ((dq & np.uint32(skip)) == 0) & (err > 0)
    fill = _flicker_fill(slope, err, dq, skip)
    x = np.where(usable, slope, fill).reshape(ny, channels, chw)
    step = 4 if chw >= 64 else (2 if chw >= 16 else 1)
    med = np.median(x[:, :, ::step], axis=2).astype(F32)
    src = (x - med[:, :, None]).reshape(ny, nx) > F32(nsigma) * err
    if dilate > 0:
        src = dilate_mask(src, int(dilate))
    bg = (usable & ~src).reshape(ny, channels, chw)
    xb = np.where(bg, slope.reshape(ny, channels, chw), F32(0.0))
    e2 = np.where(bg, err.astype(np.float64).reshape(ny, channels, chw) ** 2, 0.0)
    return (xb.sum(axis=2, dtype=np.float64), xb[:, :, 0::2].sum(axis=2, dtype=np.float64),
            e2.sum(axis=2), bg.sum(axis=2).astype(np.int64),
            bg[:, :, 0::2].sum(axis=2).astype(np.int64),
            usable[:, ::4].sum(axis=1).astype(np.int64))
