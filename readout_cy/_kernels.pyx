# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython kernels of readout_cy: one pass over the uint16 reads, row by row.

Everything here works on rows of ``nx`` pixels with per-thread scratch buffers, so the
working set of a row (all reads of that row, as float32 differences) stays in L2 and the
full-size input is streamed through exactly once.  The Python face (``readout_cy/_api.py``)
validates inputs and builds a :class:`Plan`; the numpy twins in ``readout_cy/reference.py``
repeat the same arithmetic, in the same order, so tests can compare them tightly.

Arithmetic conventions (kept identical in the twins, see docs/readout.md):
  * per-read values (reference-pixel correction, linearity, differences, the jump test) are
    float32;
  * reference-pixel sums are exact integer sums, turned into float64 offsets;
  * everything inside the slope fit (estimator coefficients, dot products, variances,
    inverse-variance combination) is float64, summed sequentially.
"""

from cython.parallel cimport prange
from libc.math cimport INFINITY, NAN, fabs, fabsf, pow, sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import numpy as np

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int iris_openmp(void) { return 1; }
    static int iris_max_threads(void) { return omp_get_max_threads(); }
    static int iris_thread_num(void) { return omp_get_thread_num(); }
    #else
    static int iris_openmp(void) { return 0; }
    static int iris_max_threads(void) { return 1; }
    static int iris_thread_num(void) { return 0; }
    #endif
    """
    int iris_openmp() nogil
    int iris_max_threads() nogil
    int iris_thread_num() nogil

cdef inline void* _ptr(arr):
    """Address of a C-contiguous numpy array's data (the caller keeps the array alive)."""
    cdef size_t a = arr.__array_interface__["data"][0]
    return <void*>a


# JWST DQ bit values (duplicated from iris_tasks.datamodels.dqflags on purpose: kernels
# import numpy only).
cdef uint32_t F_DO_NOT_USE = 1
cdef uint32_t F_SATURATED = 2
cdef uint32_t F_JUMP_DET = 4
cdef uint32_t F_NO_GAIN_VALUE = 524288
cdef uint32_t F_NO_LIN_CORR = 1048576
cdef uint32_t F_NO_SAT_CHECK = 2097152
cdef uint32_t F_REFERENCE_PIXEL = 2147483648u

# per-ramp internal flags
cdef uint8_t R_NOSLOPE = 1
cdef uint8_t R_SAT = 2
cdef uint8_t R_JUMP = 4

cdef enum:
    NPOW = 6

# stcal's SNR -> exponent buckets for "optimal" weighting
cdef double POWERS[NPOW]
POWERS[:] = [0.0, 0.4, 1.0, 3.0, 6.0, 10.0]

cdef int MODE_UTR = 0
cdef int MODE_MCDS = 1


def openmp_enabled() -> bool:
    """True when the extension was compiled with OpenMP."""
    return bool(iris_openmp())


def max_threads() -> int:
    """OpenMP's default team size (1 without OpenMP)."""
    return iris_max_threads()


ctypedef struct Params:
    Py_ssize_t ny
    Py_ssize_t nx
    int nramps
    int nr
    int nd
    # reference pixels: per read a table of channel offsets and smoothed row offsets
    int nch
    Py_ssize_t chw
    const double* off      # (nramps*nr, nch) or NULL
    const double* rowc     # (nramps*nr, ny) or NULL
    int border             # 4 if the frame has a reference border (DQ flag), else 0
    # maps: either (ny, nx) or a scalar that is spread over a scratch row
    const float* sat
    int sat_map
    const float* bias      # NULL: no bias subtraction
    int bias_map
    const float* coef      # (ncoef, ny, nx) or NULL
    int ncoef
    Py_ssize_t coef_plane
    const float* rn
    int rn_map
    const float* gain
    int gain_map
    # times
    const double* t        # (nr,)
    const double* dt       # (nd,)
    const float* dt32
    const float* inv_dt32
    # jumps
    int do_jump
    float thr2
    const int32_t* net     # comparator pairs of the sorting network
    int nnet
    # fit
    int mode
    int fowler_k
    int weighted
    const double* ctab     # (NPOW, nd) coefficients of the full-ramp estimator
    const double* rtab     # (NPOW,)
    const double* ptab     # (NPOW,)


ctypedef struct Scratch:
    float* val
    float* acc
    float* prev
    int32_t* ngood
    float* d
    float* q
    uint8_t* jmp
    float* med
    int32_t* njump
    float* rn2x2
    float* ig
    float* satb
    float* biasb
    float* rnb
    float* gainb
    uint8_t* linok
    double* cbuf
    double* cseg
    float* rb
    float* rR
    float* rP
    float* rm
    int32_t* rnused
    uint8_t* rflags


# ----------------------------------------------------------------------------------------
# estimator coefficients (shared by the fast table and the per-segment path)
# ----------------------------------------------------------------------------------------

cdef void _coef_utr(const double* t, const double* dt, int a, int b, double power,
                    double* C, double* R, double* P, double* cbuf) noexcept nogil:
    """Least-squares slope of reads a..b as a linear form of the differences.

    The slope is sum_j c_j y_j; with y_j = sum of the differences up to j it is
    sum_k C_k d_k, C_k the tail sums of c.  R = sum c^2 (read-noise variance / rn^2),
    P = sum C_k^2 dt_k (Poisson variance / (rate / gain)): both exact for any weights.
    """
    cdef int L = b - a + 1
    cdef int j
    cdef double mid = (L - 1) * 0.5
    cdef double w, x, sw = 0.0, sx = 0.0, xb, sxx = 0.0, acc, r = 0.0, p = 0.0
    for j in range(L):
        if power != 0.0:
            w = pow(fabs((j - mid) / mid), power)
        else:
            w = 1.0
        cbuf[j] = w
        x = t[a + j] - t[a]
        sw = sw + w
        sx = sx + w * x
    xb = sx / sw
    for j in range(L):
        x = t[a + j] - t[a]
        sxx = sxx + cbuf[j] * (x - xb) * (x - xb)
    for j in range(L):
        x = t[a + j] - t[a]
        cbuf[j] = cbuf[j] * (x - xb) / sxx
        r = r + cbuf[j] * cbuf[j]
    acc = 0.0
    for j in range(L - 1, 0, -1):
        acc = acc + cbuf[j]
        C[j - 1] = acc
        p = p + acc * acc * dt[a + j - 1]
    R[0] = r
    P[0] = p


cdef void _coef_mcds(const double* t, const double* dt, int ns, int kk,
                     double* C, double* R, double* P) noexcept nogil:
    """Fowler-kk (MCDS) over usable reads 0..ns-1: mean of the last kk minus the first kk."""
    cdef int j
    cdef double t1 = 0.0, t2 = 0.0, c, cj, acc = 0.0, p = 0.0
    for j in range(kk):
        t1 = t1 + t[j]
        t2 = t2 + t[ns - kk + j]
    t1 = t1 / kk
    t2 = t2 / kk
    c = 1.0 / (kk * (t2 - t1))
    for j in range(ns - 1, 0, -1):
        if j >= ns - kk:
            cj = c
        elif j < kk:
            cj = -c
        else:
            cj = 0.0
        acc = acc + cj
        C[j - 1] = acc
        p = p + acc * acc * dt[j - 1]
    R[0] = 2.0 * kk * c * c
    P[0] = p


def coefficient_table(double[::1] t, int mode, int fowler_k):
    """(NPOW, nd) full-ramp estimator coefficients, with R and P per row (fast path)."""
    cdef int nr = t.shape[0]
    cdef int nd = max(nr - 1, 1)
    cdef int i, kk
    ctab = np.zeros((NPOW, nd), dtype=np.float64)
    rtab = np.zeros(NPOW, dtype=np.float64)
    ptab = np.zeros(NPOW, dtype=np.float64)
    cdef double[:, ::1] cv = ctab
    cdef double[::1] rv = rtab, pv = ptab
    dtarr = np.diff(np.asarray(t)) if nr > 1 else np.ones(1)
    cdef double[::1] dtv = np.ascontiguousarray(dtarr, dtype=np.float64)
    cbuf = np.zeros(max(nr, 1), dtype=np.float64)
    cdef double[::1] cb = cbuf
    if nr < 2:
        return ctab, rtab, ptab
    for i in range(NPOW):
        if mode == MODE_UTR:
            _coef_utr(&t[0], &dtv[0], 0, nr - 1, POWERS[i], &cv[i, 0], &rv[i], &pv[i], &cb[0])
        else:
            kk = min(fowler_k, nr // 2)
            _coef_mcds(&t[0], &dtv[0], nr, kk, &cv[i, 0], &rv[i], &pv[i])
    return ctab, rtab, ptab


cdef inline int _power_index(double data, double rn, double g) noexcept nogil:
    """stcal's signal-to-noise buckets (electrons) -> index into POWERS."""
    cdef double den = rn * rn * g * g + data * g
    cdef double snr
    if den <= 0.0 or g == 0.0 or g != g:
        return 0
    snr = data * g / sqrt(den)
    if not (snr >= 5.0):
        return 0
    if snr < 10.0:
        return 1
    if snr < 20.0:
        return 2
    if snr < 50.0:
        return 3
    if snr < 100.0:
        return 4
    return 5


# ----------------------------------------------------------------------------------------
# reference pixels
# ----------------------------------------------------------------------------------------

cdef void _refpix_tables(const uint16_t* fr, Py_ssize_t ny, Py_ssize_t nx, int nch,
                         int half, double* off, double* rowc, int64_t* pre) noexcept nogil:
    """Channel offsets from the 4 top + 4 bottom rows, smoothed row offsets from the sides.

    Sums are integers (exact, order-free), so the twin reproduces them bit for bit.
    ``pre`` is 2*(ny+1) int64 scratch for the prefix sums of the side columns.
    """
    cdef Py_ssize_t chw = nx // nch, y, x, lo, hi, n
    cdef int c, j
    cdef int64_t s
    cdef int64_t* pl = pre
    cdef int64_t* pr = pre + ny + 1
    cdef double wl, wr
    for c in range(nch):
        s = 0
        for j in range(4):
            for x in range(c * chw, (c + 1) * chw):
                s = s + fr[j * nx + x] + fr[(ny - 1 - j) * nx + x]
        off[c] = s / (8.0 * chw)
    if half < 0:
        for y in range(ny):
            rowc[y] = 0.0
        return
    pl[0] = 0
    pr[0] = 0
    for y in range(ny):
        s = 0
        for x in range(4):
            s = s + fr[y * nx + x]
        pl[y + 1] = pl[y] + s
        s = 0
        for x in range(nx - 4, nx):
            s = s + fr[y * nx + x]
        pr[y + 1] = pr[y] + s
    for y in range(ny):
        lo = y - half
        if lo < 0:
            lo = 0
        hi = y + half
        if hi > ny - 1:
            hi = ny - 1
        n = hi - lo + 1
        wl = <double>(pl[hi + 1] - pl[lo])
        wr = <double>(pr[hi + 1] - pr[lo])
        rowc[y] = 0.5 * ((wl / (4.0 * n) - off[0]) + (wr / (4.0 * n) - off[nch - 1]))


def refpix_tables(const uint16_t[:, :, ::1] frames, int nch, int smooth, int threads):
    """Per-frame channel offsets (nframes, nch) and row offsets (nframes, ny)."""
    cdef Py_ssize_t nf = frames.shape[0], ny = frames.shape[1], nx = frames.shape[2], f
    off = np.zeros((nf, nch), dtype=np.float64)
    rowc = np.zeros((nf, ny), dtype=np.float64)
    pre = np.zeros((nf, 2 * (ny + 1)), dtype=np.int64)
    cdef double[:, ::1] ov = off, rv = rowc
    cdef int64_t[:, ::1] pv = pre
    cdef int half = smooth // 2 if smooth > 0 else -1
    if nf == 0:
        return off, rowc
    for f in prange(nf, nogil=True, num_threads=threads, schedule="dynamic"):
        _refpix_tables(&frames[f, 0, 0], ny, nx, nch, half, &ov[f, 0], &rv[f, 0], &pv[f, 0])
    return off, rowc


# ----------------------------------------------------------------------------------------
# row helpers
# ----------------------------------------------------------------------------------------

cdef inline const float* _maprow(const float* base, int is_map, Py_ssize_t y, Py_ssize_t nx,
                                 float* fill) noexcept nogil:
    if is_map:
        return base + y * nx
    return fill


cdef void _fill_scalar_rows(const Params* p, Scratch* s) noexcept nogil:
    cdef Py_ssize_t x
    for x in range(p.nx):
        s.satb[x] = p.sat[0]
        s.rnb[x] = p.rn[0]
        s.gainb[x] = p.gain[0]
        if p.bias != NULL:
            s.biasb[x] = p.bias[0]


cdef void _linok_row(const float* coefrow, Py_ssize_t plane, int K, Py_ssize_t nx,
                     uint8_t* linok) noexcept nogil:
    cdef Py_ssize_t x
    cdef int k
    cdef float c
    for x in range(nx):
        linok[x] = 1
    for k in range(K):
        for x in range(nx):
            c = coefrow[k * plane + x]
            if c != c:
                linok[x] = 0


cdef inline void _horner(float* val, float* acc, const float* coefrow, Py_ssize_t plane, int K,
                         const uint8_t* linok, Py_ssize_t nx) noexcept nogil:
    """val <- sum_k c_k val^k (Horner, float32); pixels with NaN coefficients keep val."""
    cdef Py_ssize_t x
    cdef int k
    for x in range(nx):
        acc[x] = coefrow[(K - 1) * plane + x]
    for k in range(K - 2, -1, -1):
        for x in range(nx):
            acc[x] = acc[x] * val[x] + coefrow[k * plane + x]
    for x in range(nx):
        if linok[x]:
            val[x] = acc[x]


cdef void _ingest_row(const Params* p, Scratch* s, const uint16_t* raw, Py_ssize_t y, int i,
                      const double* off, const double* rowc, const float* satrow,
                      const float* biasrow, float* dout) noexcept nogil:
    """One read of one row: saturation count, refpix, bias, linearity, difference."""
    cdef Py_ssize_t x, x0, nx = p.nx
    cdef int c
    cdef float f, v, sv
    cdef int32_t* ng = s.ngood
    cdef float* val = s.val
    # saturation on the raw DN: ngood counts the leading reads below saturation
    # (a NaN saturation value means "no check")
    for x in range(nx):
        v = <float>raw[x]
        sv = satrow[x]
        ng[x] = ng[x] + ((ng[x] == i) & ((v < sv) | (sv != sv)))
    if off != NULL:
        for c in range(p.nch):
            f = <float>(off[c] + rowc[y])
            x0 = c * p.chw
            for x in range(x0, x0 + p.chw):
                val[x] = <float>raw[x] - f
    else:
        for x in range(nx):
            val[x] = <float>raw[x]
    if biasrow != NULL:
        for x in range(nx):
            val[x] = val[x] - biasrow[x]
    if p.ncoef > 0:
        _horner(val, s.acc, p.coef + y * nx, p.coef_plane, p.ncoef, s.linok, nx)
    if dout != NULL:
        for x in range(nx):
            dout[x] = val[x] - s.prev[x]
    memcpy(s.prev, val, nx * sizeof(float))


cdef void _jump_row(const Params* p, Scratch* s, const float* d, Py_ssize_t dk,
                    const int32_t* ngood) noexcept nogil:
    """Two-point-difference jump test against the pixel's median rate (float32).

    Writes s.med (median rate, DN/s), s.jmp (nd x nx flags) and s.njump.
    """
    cdef Py_ssize_t x, nx = p.nx
    cdef int k, n, nd = p.nd, nu, h
    cdef float* q = s.q
    cdef float* qa
    cdef float* qb
    cdef float* qk
    cdef const float* dp
    cdef float ik, a, b, m, e, s2, dtk
    cdef uint8_t fl
    for k in range(nd):
        qk = q + k * nx
        dp = d + k * dk
        ik = p.inv_dt32[k]
        for x in range(nx):
            if k < ngood[x] - 1:
                qk[x] = dp[x] * ik
            else:
                qk[x] = INFINITY
    # sorting network over the read axis, vectorised along the row
    for n in range(p.nnet):
        qa = q + p.net[2 * n] * nx
        qb = q + p.net[2 * n + 1] * nx
        for x in range(nx):
            a = qa[x]
            b = qb[x]
            qa[x] = a if a < b else b
            qb[x] = b if a < b else a
    for x in range(nx):
        nu = ngood[x] - 1
        if nu >= 3:
            h = nu // 2
            if nu % 2:
                m = q[h * nx + x]
            else:
                m = 0.5 * (q[(h - 1) * nx + x] + q[h * nx + x])
        elif nu == 2:
            # two differences: the smaller one is the likelier clean one (stcal does this too)
            a = q[x]
            b = q[nx + x]
            m = a if fabsf(a) <= fabsf(b) else b
        elif nu == 1:
            m = q[x]
        else:
            m = NAN
        s.med[x] = m
        s.njump[x] = 0
    for k in range(nd):
        dp = d + k * dk
        dtk = p.dt32[k]
        for x in range(nx):
            m = s.med[x]
            e = dp[x] - m * dtk
            s2 = s.rn2x2[x] + fabsf(m) * dtk * s.ig[x]
            fl = (k < ngood[x] - 1) & (ngood[x] >= 3) & (e * e > p.thr2 * s2) & (s2 > 0)
            s.jmp[k * nx + x] = fl
            s.njump[x] = s.njump[x] + fl


cdef inline void _seg_add(double bs, double Rs, double Ps, double rn2, double mig,
                          double* W, double* Sb, double* SR, double* SP) noexcept nogil:
    cdef double v = rn2 * Rs + mig * Ps
    if not (v > 0.0):
        v = 1e-30
    W[0] = W[0] + 1.0 / v
    Sb[0] = Sb[0] + bs / v
    SR[0] = SR[0] + Rs / (v * v)
    SP[0] = SP[0] + Ps / (v * v)


cdef void _fit_row(const Params* p, Scratch* s, const float* d, Py_ssize_t dk,
                   const int32_t* ngood, const uint8_t* jmp, const int32_t* njump,
                   const float* med, const float* rnrow, const float* grow, float* ob, float* oR,
                   float* oP, float* om, int32_t* onused, uint8_t* oflags) noexcept nogil:
    """Slope of one ramp for one row: segments between jumps, combined by inverse variance.

    Per pixel it writes the ramp's slope b, its variance coefficients R and P
    (var_rnoise = rn^2 R, var_poisson = max(rate, 0)/gain P), the rate estimate used for the
    weights, the number of reads used and per-ramp flags.
    """
    cdef Py_ssize_t x, nx = p.nx
    cdef int nr = p.nr, ns, k, a, bb, L, nseg, nused, kk, pi
    cdef uint8_t fl
    cdef double m, mig, rn, rn2, g, ig, data, bs, Rs, Ps, W, Sb, SR, SP, b1, R1, P1
    cdef const double* C
    for x in range(nx):
        ns = ngood[x]
        fl = 0
        if ns < nr:
            fl = fl | R_SAT
        rn = rnrow[x]
        rn2 = rn * rn
        g = grow[x]
        ig = 1.0 / g
        # rate estimate for the variance weights: the jump detector's median, else the
        # average rate over the usable reads
        m = NAN
        if med != NULL:
            m = med[x]
        if m != m and ns >= 2:
            data = 0.0
            for k in range(ns - 1):
                data = data + d[k * dk + x]
            m = data / (p.t[ns - 1] - p.t[0])
        mig = m * ig if m > 0.0 else 0.0
        W = 0.0
        Sb = 0.0
        SR = 0.0
        SP = 0.0
        nseg = 0
        nused = 0
        b1 = NAN
        R1 = 0.0
        P1 = 0.0
        if p.mode == MODE_UTR:
            if jmp != NULL and njump[x] > 0:
                fl = fl | R_JUMP
            a = 0
            for k in range(ns):
                # a segment ends at read k when it is the last usable read or the
                # difference k -> k+1 is a jump
                if k == ns - 1 or (jmp != NULL and jmp[k * nx + x]):
                    bb = k
                    L = bb - a + 1
                    if L >= 2:
                        pi = 0
                        if p.weighted:
                            data = 0.0
                            for kk in range(a, bb):
                                data = data + d[kk * dk + x]
                            pi = _power_index(data, rn, g)
                        if a == 0 and bb == nr - 1:
                            C = p.ctab + pi * p.nd
                            Rs = p.rtab[pi]
                            Ps = p.ptab[pi]
                        else:
                            _coef_utr(p.t, p.dt, a, bb, POWERS[pi], s.cseg, &Rs, &Ps, s.cbuf)
                            C = s.cseg
                        bs = 0.0
                        for kk in range(a, bb):
                            bs = bs + C[kk - a] * d[kk * dk + x]
                        nseg = nseg + 1
                        nused = nused + L
                        if nseg == 1:
                            b1 = bs
                            R1 = Rs
                            P1 = Ps
                        _seg_add(bs, Rs, Ps, rn2, mig, &W, &Sb, &SR, &SP)
                    a = k + 1
        else:
            kk = p.fowler_k
            if kk > ns // 2:
                kk = ns // 2
            if kk >= 1:
                if ns == nr:
                    C = p.ctab
                    Rs = p.rtab[0]
                    Ps = p.ptab[0]
                else:
                    _coef_mcds(p.t, p.dt, ns, kk, s.cseg, &Rs, &Ps)
                    C = s.cseg
                bs = 0.0
                for k in range(ns - 1):
                    bs = bs + C[k] * d[k * dk + x]
                nseg = 1
                nused = 2 * kk
                b1 = bs
                R1 = Rs
                P1 = Ps
        if nseg == 0:
            fl = fl | R_NOSLOPE
            ob[x] = NAN
            oR[x] = 0.0
            oP[x] = 0.0
        elif nseg == 1:
            ob[x] = <float>b1
            oR[x] = <float>R1
            oP[x] = <float>P1
        else:
            ob[x] = <float>(Sb / W)
            oR[x] = <float>(SR / (W * W))
            oP[x] = <float>(SP / (W * W))
        om[x] = <float>m
        onused[x] = nused
        oflags[x] = fl


cdef void _combine_row(const Params* p, Scratch* s, Py_ssize_t y, const float* rnrow,
                       const float* grow, const float* satrow, const uint8_t* linok,
                       float* slope, float* vp, float* vr, float* err, uint32_t* dq,
                       uint16_t* nused) noexcept nogil:
    """Combine the ramps of an exposure (inverse variance), variances, ERR and pixel DQ."""
    cdef Py_ssize_t x, nx = p.nx, ix
    cdef int r, nr_ok, cnt, nu
    cdef double msum, mbar, mig, rn2, ig, v, W, Sb, SR, SP, b, R, P, vpo
    cdef uint32_t q
    cdef uint8_t f
    cdef float mr
    for x in range(nx):
        rn2 = <double>rnrow[x] * <double>rnrow[x]
        ig = 1.0 / <double>grow[x]
        q = 0
        nr_ok = 0
        cnt = 0
        nu = 0
        msum = 0.0
        for r in range(p.nramps):
            ix = r * nx + x
            f = s.rflags[ix]
            if f & R_SAT:
                q = q | F_SATURATED
            if f & R_JUMP:
                q = q | F_JUMP_DET
            if not (f & R_NOSLOPE):
                nr_ok = nr_ok + 1
                nu = nu + s.rnused[ix]
                mr = s.rm[ix]
                if mr == mr:
                    msum = msum + mr
                    cnt = cnt + 1
        b = NAN
        R = 0.0
        P = 0.0
        if nr_ok == 1:
            for r in range(p.nramps):
                ix = r * nx + x
                if not (s.rflags[ix] & R_NOSLOPE):
                    b = s.rb[ix]
                    R = s.rR[ix]
                    P = s.rP[ix]
        elif nr_ok > 1:
            mbar = msum / cnt if cnt > 0 else 0.0
            mig = mbar * ig if mbar > 0.0 else 0.0
            W = 0.0
            Sb = 0.0
            SR = 0.0
            SP = 0.0
            for r in range(p.nramps):
                ix = r * nx + x
                if not (s.rflags[ix] & R_NOSLOPE):
                    _seg_add(s.rb[ix], s.rR[ix], s.rP[ix], rn2, mig, &W, &Sb, &SR, &SP)
            b = Sb / W
            R = SR / (W * W)
            P = SP / (W * W)
        if nr_ok == 0:
            q = q | F_DO_NOT_USE
        if not (grow[x] == grow[x]):
            q = q | F_NO_GAIN_VALUE | F_DO_NOT_USE
        if q & F_DO_NOT_USE:
            slope[x] = NAN
            vp[x] = 0.0
            vr[x] = 0.0
            err[x] = 0.0
        else:
            vpo = b * ig * P if b > 0.0 else 0.0
            slope[x] = <float>b
            vr[x] = <float>(rn2 * R)
            vp[x] = <float>vpo
            err[x] = <float>sqrt(rn2 * R + vpo)
        if satrow != NULL and not (satrow[x] == satrow[x]):
            q = q | F_NO_SAT_CHECK
        if linok != NULL and not linok[x]:
            q = q | F_NO_LIN_CORR
        if p.border and (y < p.border or y >= p.ny - p.border or x < p.border
                         or x >= nx - p.border):
            q = q | F_REFERENCE_PIXEL
        dq[x] = q
        nused[x] = <uint16_t>(nu if nu < 65535 else 65535)


cdef inline void _row_params(const Params* p, Scratch* s, Py_ssize_t y) noexcept nogil:
    """Per-row float32 helpers of the jump test: 2 rn^2 and 1/gain."""
    cdef Py_ssize_t x, nx = p.nx
    cdef const float* rnrow = _maprow(p.rn, p.rn_map, y, nx, s.rnb)
    cdef const float* grow = _maprow(p.gain, p.gain_map, y, nx, s.gainb)
    for x in range(nx):
        s.rn2x2[x] = 2.0 * rnrow[x] * rnrow[x]
        s.ig[x] = <float>1.0 / grow[x]


# ----------------------------------------------------------------------------------------
# Plan: parameters + per-thread scratch
# ----------------------------------------------------------------------------------------

cdef class Plan:
    """Everything a run needs: validated arrays, tables and per-thread scratch."""

    cdef Params p
    cdef Scratch* scr
    cdef int nthreads
    cdef object keep
    cdef object bufs

    def __cinit__(self):
        self.scr = NULL

    def __dealloc__(self):
        if self.scr != NULL:
            free(self.scr)

    def __init__(self, *, Py_ssize_t ny, Py_ssize_t nx, int nramps, double[::1] t,
                 sat, rn, gain, bias, coef, int nch, off, rowc, int border, double thr,
                 int do_jump, net, int mode, int fowler_k, int weighted, int threads):
        cdef int nr = t.shape[0]
        cdef int nd = max(nr - 1, 1)
        cdef Params* p = &self.p
        self.nthreads = max(threads, 1)
        memset(p, 0, sizeof(Params))
        p.ny = ny
        p.nx = nx
        p.nramps = nramps
        p.nr = nr
        p.nd = nd
        tt = np.ascontiguousarray(t, dtype=np.float64)
        dt = np.diff(tt) if nr > 1 else np.ones(1)
        dt32 = dt.astype(np.float32)
        inv32 = (1.0 / dt).astype(np.float32)
        ctab, rtab, ptab = coefficient_table(tt, mode, fowler_k)
        netarr = np.ascontiguousarray(np.asarray(net, dtype=np.int32).reshape(-1))
        keep = [tt, dt, dt32, inv32, ctab, rtab, ptab, netarr, sat, rn, gain, bias, coef,
                off, rowc]
        self.keep = keep
        p.t = <const double*>_ptr(tt)
        p.dt = <const double*>_ptr(dt)
        p.dt32 = <const float*>_ptr(dt32)
        p.inv_dt32 = <const float*>_ptr(inv32)
        p.ctab = <const double*>_ptr(ctab)
        p.rtab = <const double*>_ptr(rtab)
        p.ptab = <const double*>_ptr(ptab)
        p.net = <const int32_t*>_ptr(netarr)
        p.nnet = netarr.shape[0] // 2
        p.sat = <const float*>_ptr(sat)
        p.sat_map = sat.ndim == 2
        p.rn = <const float*>_ptr(rn)
        p.rn_map = rn.ndim == 2
        p.gain = <const float*>_ptr(gain)
        p.gain_map = gain.ndim == 2
        if bias is not None:
            p.bias = <const float*>_ptr(bias)
            p.bias_map = bias.ndim == 2
        if coef is not None:
            p.coef = <const float*>_ptr(coef)
            p.ncoef = coef.shape[0]
            p.coef_plane = ny * nx
        p.nch = nch
        p.chw = nx // nch if nch > 0 else nx
        if off is not None:
            p.off = <const double*>_ptr(off)
            p.rowc = <const double*>_ptr(rowc)
        p.border = border
        p.thr2 = <float>(thr * thr)
        p.do_jump = do_jump
        p.mode = mode
        p.fowler_k = fowler_k
        p.weighted = weighted
        self._alloc()

    cdef void _alloc(self):
        cdef Py_ssize_t nx = self.p.nx, nd = self.p.nd, nr = self.p.nr, nt = self.nthreads
        cdef Py_ssize_t nrm = self.p.nramps
        cdef int t
        cdef Scratch* s
        f32 = np.zeros((nt, 12, nx), dtype=np.float32)
        big = np.zeros((nt, 2, nd * nx), dtype=np.float32)
        rr = np.zeros((nt, 4, nrm * nx), dtype=np.float32)
        i32 = np.zeros((nt, 2, nx), dtype=np.int32)
        ri32 = np.zeros((nt, nrm * nx), dtype=np.int32)
        u8 = np.zeros((nt, nd * nx + nx + nrm * nx), dtype=np.uint8)
        f64 = np.zeros((nt, 2, nr + 1), dtype=np.float64)
        self.bufs = (f32, big, rr, i32, ri32, u8, f64)
        self.scr = <Scratch*>malloc(nt * sizeof(Scratch))
        for t in range(nt):
            s = &self.scr[t]
            s.val = <float*>_ptr(f32[t, 0])
            s.acc = <float*>_ptr(f32[t, 1])
            s.prev = <float*>_ptr(f32[t, 2])
            s.med = <float*>_ptr(f32[t, 3])
            s.rn2x2 = <float*>_ptr(f32[t, 4])
            s.ig = <float*>_ptr(f32[t, 5])
            s.satb = <float*>_ptr(f32[t, 6])
            s.biasb = <float*>_ptr(f32[t, 7])
            s.rnb = <float*>_ptr(f32[t, 8])
            s.gainb = <float*>_ptr(f32[t, 9])
            s.d = <float*>_ptr(big[t, 0])
            s.q = <float*>_ptr(big[t, 1])
            s.rb = <float*>_ptr(rr[t, 0])
            s.rR = <float*>_ptr(rr[t, 1])
            s.rP = <float*>_ptr(rr[t, 2])
            s.rm = <float*>_ptr(rr[t, 3])
            s.ngood = <int32_t*>_ptr(i32[t, 0])
            s.njump = <int32_t*>_ptr(i32[t, 1])
            s.rnused = <int32_t*>_ptr(ri32[t])
            s.jmp = <uint8_t*>_ptr(u8[t])
            s.linok = s.jmp + nd * nx
            s.rflags = s.linok + nx
            s.cbuf = <double*>_ptr(f64[t, 0])
            s.cseg = <double*>_ptr(f64[t, 1])
            _fill_scalar_rows(&self.p, s)

    # ----- batch: raw uint16 -> result, one row at a time --------------------------------

    def run_raw(self, const uint16_t[:, :, :, ::1] reads, float[:, ::1] slope,
                float[:, ::1] vp, float[:, ::1] vr, float[:, ::1] err, uint32_t[:, ::1] dq,
                uint16_t[:, ::1] nused):
        cdef Py_ssize_t y
        cdef int nt = self.nthreads
        with nogil:
            for y in prange(self.p.ny, num_threads=nt, schedule="dynamic", chunksize=4):
                self._raw_row(&reads[0, 0, 0, 0], y, &slope[y, 0], &vp[y, 0], &vr[y, 0],
                              &err[y, 0], &dq[y, 0], &nused[y, 0])

    cdef void _raw_row(self, const uint16_t* reads, Py_ssize_t y, float* slope, float* vp,
                       float* vr, float* err, uint32_t* dq, uint16_t* nused) noexcept nogil:
        cdef const Params* p = &self.p
        cdef Scratch* s = &self.scr[iris_thread_num()]
        cdef Py_ssize_t nx = p.nx, ny = p.ny, x
        cdef int r, i, nr = p.nr
        cdef const float* satrow = _maprow(p.sat, p.sat_map, y, nx, s.satb)
        cdef const float* biasrow = NULL
        cdef const float* rnrow = _maprow(p.rn, p.rn_map, y, nx, s.rnb)
        cdef const float* grow = _maprow(p.gain, p.gain_map, y, nx, s.gainb)
        cdef const double* off = NULL
        cdef const double* rowc = NULL
        cdef float* dout
        if p.bias != NULL:
            biasrow = _maprow(p.bias, p.bias_map, y, nx, s.biasb)
        if p.ncoef > 0:
            _linok_row(p.coef + y * nx, p.coef_plane, p.ncoef, nx, s.linok)
        _row_params(p, s, y)
        for r in range(p.nramps):
            for x in range(nx):
                s.ngood[x] = 0
            for i in range(nr):
                if p.off != NULL:
                    off = p.off + (r * nr + i) * p.nch
                    rowc = p.rowc + (r * nr + i) * ny
                dout = s.d + (i - 1) * nx if i > 0 else NULL
                _ingest_row(p, s, reads + ((r * nr + i) * ny + y) * nx, y, i, off, rowc,
                            satrow, biasrow, dout)
            self._fit_one(s, s.d, nx, y, r, rnrow, grow, NULL, NULL)
        _combine_row(p, s, y, rnrow, grow, satrow, s.linok if p.ncoef > 0 else NULL,
                     slope, vp, vr, err, dq, nused)

    cdef void _fit_one(self, Scratch* s, const float* d, Py_ssize_t dk, Py_ssize_t y, int r,
                       const float* rnrow, const float* grow, const uint8_t* jin,
                       const float* min_) noexcept nogil:
        """Jump test (if on) and fit of ramp r, results into the per-ramp scratch rows."""
        cdef const Params* p = &self.p
        cdef Py_ssize_t nx = p.nx, o = r * nx, x
        cdef int k
        cdef const uint8_t* jmp = jin
        cdef const float* med = min_
        if p.do_jump and p.mode == MODE_UTR and p.nr >= 3:
            _jump_row(p, s, d, dk, s.ngood)
            jmp = s.jmp
            med = s.med
        elif jin != NULL:
            # jumps given by the caller (standalone fit): count them per pixel
            for x in range(nx):
                s.njump[x] = 0
            for k in range(p.nd):
                for x in range(nx):
                    s.njump[x] = s.njump[x] + jin[k * nx + x]
        _fit_row(p, s, d, dk, s.ngood, jmp, s.njump, med, rnrow, grow, s.rb + o, s.rR + o,
                 s.rP + o, s.rm + o, s.rnused + o, s.rflags + o)

    # ----- streaming ---------------------------------------------------------------------

    def ingest(self, const uint16_t[:, ::1] frame, int i, int32_t[:, ::1] ngood,
               float[:, ::1] prev, float[:, ::1] dplane, uint8_t[:, ::1] linok, off, rowc):
        """Streaming: process one read of the whole frame (same row code as the batch)."""
        cdef Py_ssize_t y
        cdef int nt = self.nthreads
        cdef double[::1] ov
        cdef double[::1] rv
        cdef const double* op = NULL
        cdef const double* rp = NULL
        if off is not None:
            ov = off
            rv = rowc
            op = &ov[0]
            rp = &rv[0]
        with nogil:
            for y in prange(self.p.ny, num_threads=nt, schedule="dynamic", chunksize=4):
                self._ingest_frame_row(&frame[y, 0], y, i, &ngood[y, 0], &prev[y, 0],
                                       &dplane[y, 0] if i > 0 else NULL, &linok[y, 0], op, rp)

    cdef void _ingest_frame_row(self, const uint16_t* raw, Py_ssize_t y, int i, int32_t* ng,
                                float* prev, float* dout, uint8_t* linok, const double* off,
                                const double* rowc) noexcept nogil:
        cdef const Params* p = &self.p
        cdef Scratch* s = &self.scr[iris_thread_num()]
        cdef Py_ssize_t nx = p.nx
        cdef const float* satrow = _maprow(p.sat, p.sat_map, y, nx, s.satb)
        cdef const float* biasrow = NULL
        cdef int32_t* ng_s = s.ngood
        cdef float* prev_s = s.prev
        cdef uint8_t* lk = s.linok
        if p.bias != NULL:
            biasrow = _maprow(p.bias, p.bias_map, y, nx, s.biasb)
        # point the scratch at the frame-wide state of this row
        s.ngood = ng
        s.prev = prev
        s.linok = linok
        _ingest_row(p, s, raw, y, i, off, rowc, satrow, biasrow, dout)
        s.ngood = ng_s
        s.prev = prev_s
        s.linok = lk

    def linok_map(self, uint8_t[:, ::1] linok):
        """Per-pixel 'coefficients usable' map (1 everywhere without linearity)."""
        cdef Py_ssize_t y
        if self.p.ncoef == 0:
            linok[:, :] = 1
            return
        for y in range(self.p.ny):
            _linok_row(self.p.coef + y * self.p.nx, self.p.coef_plane, self.p.ncoef,
                       self.p.nx, &linok[y, 0])

    def fit_planes(self, const float[:, :, ::1] dplanes, const int32_t[:, ::1] ngood, int r,
                   float[:, :, ::1] rout, int32_t[:, ::1] rnused, uint8_t[:, ::1] rflags):
        """Streaming: jump test + fit of a complete ramp from its stored differences.

        ``rout`` is (4, ny, nx): b, R, P, rate estimate.
        """
        cdef Py_ssize_t y
        cdef int nt = self.nthreads
        with nogil:
            for y in prange(self.p.ny, num_threads=nt, schedule="dynamic", chunksize=4):
                self._fit_plane_row(&dplanes[0, 0, 0], y, &ngood[y, 0], &rout[0, 0, 0],
                                    &rnused[y, 0], &rflags[y, 0])

    cdef void _fit_plane_row(self, const float* d0, Py_ssize_t y, const int32_t* ng,
                             float* rout, int32_t* rnused, uint8_t* rflags) noexcept nogil:
        cdef const Params* p = &self.p
        cdef Scratch* s = &self.scr[iris_thread_num()]
        cdef Py_ssize_t nx = p.nx, plane = p.ny * p.nx, o = y * nx
        cdef const float* rnrow = _maprow(p.rn, p.rn_map, y, nx, s.rnb)
        cdef const float* grow = _maprow(p.gain, p.gain_map, y, nx, s.gainb)
        memcpy(s.ngood, ng, nx * sizeof(int32_t))
        _row_params(p, s, y)
        # ramp slot 0 of the scratch, then copy out
        self._fit_one(s, d0 + o, plane, y, 0, rnrow, grow, NULL, NULL)
        memcpy(rout + o, s.rb, nx * sizeof(float))
        memcpy(rout + plane + o, s.rR, nx * sizeof(float))
        memcpy(rout + 2 * plane + o, s.rP, nx * sizeof(float))
        memcpy(rout + 3 * plane + o, s.rm, nx * sizeof(float))
        memcpy(rnused, s.rnused, nx * sizeof(int32_t))
        memcpy(rflags, s.rflags, nx * sizeof(uint8_t))

    def combine_planes(self, const float[:, :, :, ::1] rout, const int32_t[:, :, ::1] rnused,
                       const uint8_t[:, :, ::1] rflags, const uint8_t[:, ::1] linok,
                       float[:, ::1] slope, float[:, ::1] vp, float[:, ::1] vr,
                       float[:, ::1] err, uint32_t[:, ::1] dq, uint16_t[:, ::1] nused):
        """Streaming: combine the per-ramp planes ``rout`` (nramps, 4, ny, nx)."""
        cdef Py_ssize_t y
        cdef int nt = self.nthreads
        with nogil:
            for y in prange(self.p.ny, num_threads=nt, schedule="dynamic", chunksize=4):
                self._combine_plane_row(&rout[0, 0, 0, 0], &rnused[0, 0, 0], &rflags[0, 0, 0],
                                        &linok[y, 0], y, &slope[y, 0], &vp[y, 0], &vr[y, 0],
                                        &err[y, 0], &dq[y, 0], &nused[y, 0])

    cdef void _combine_plane_row(self, const float* rout, const int32_t* rnu, const uint8_t* rfl,
                                 const uint8_t* linok, Py_ssize_t y, float* slope, float* vp,
                                 float* vr, float* err, uint32_t* dq,
                                 uint16_t* nused) noexcept nogil:
        cdef const Params* p = &self.p
        cdef Scratch* s = &self.scr[iris_thread_num()]
        cdef Py_ssize_t nx = p.nx, plane = p.ny * p.nx, o = y * nx
        cdef int r
        cdef const float* satrow = _maprow(p.sat, p.sat_map, y, nx, s.satb)
        cdef const float* rnrow = _maprow(p.rn, p.rn_map, y, nx, s.rnb)
        cdef const float* grow = _maprow(p.gain, p.gain_map, y, nx, s.gainb)
        for r in range(p.nramps):
            memcpy(s.rb + r * nx, rout + (4 * r) * plane + o, nx * sizeof(float))
            memcpy(s.rR + r * nx, rout + (4 * r + 1) * plane + o, nx * sizeof(float))
            memcpy(s.rP + r * nx, rout + (4 * r + 2) * plane + o, nx * sizeof(float))
            memcpy(s.rm + r * nx, rout + (4 * r + 3) * plane + o, nx * sizeof(float))
            memcpy(s.rnused + r * nx, rnu + r * plane + o, nx * sizeof(int32_t))
            memcpy(s.rflags + r * nx, rfl + r * plane + o, nx * sizeof(uint8_t))
        _combine_row(p, s, y, rnrow, grow, satrow, linok if p.ncoef > 0 else NULL,
                     slope, vp, vr, err, dq, nused)

    # ----- standalone kernels -------------------------------------------------------------

    def run_refpix(self, const uint16_t[:, :, :, ::1] reads, float[:, :, :, ::1] out):
        """Reference-pixel correction only: out = raw - (channel offset + row offset)."""
        cdef Py_ssize_t y
        cdef int nt = self.nthreads
        with nogil:
            for y in prange(self.p.ny, num_threads=nt, schedule="dynamic", chunksize=4):
                self._refpix_row(&reads[0, 0, 0, 0], &out[0, 0, 0, 0], y)

    cdef void _refpix_row(self, const uint16_t* reads, float* out, Py_ssize_t y) noexcept nogil:
        cdef const Params* p = &self.p
        cdef Py_ssize_t nx = p.nx, ny = p.ny, x, x0, o
        cdef int r, i, c
        cdef float f
        for r in range(p.nramps):
            for i in range(p.nr):
                o = ((r * p.nr + i) * ny + y) * nx
                for c in range(p.nch):
                    f = <float>(p.off[(r * p.nr + i) * p.nch + c] + p.rowc[(r * p.nr + i) * ny + y])
                    x0 = c * p.chw
                    for x in range(x0, x0 + p.chw):
                        out[o + x] = <float>reads[o + x] - f

    def run_saturation(self, const uint16_t[:, :, :, ::1] reads, uint16_t[:, :, ::1] ngood_out,
                       uint32_t[:, ::1] dq):
        cdef Py_ssize_t y
        cdef int nt = self.nthreads
        with nogil:
            for y in prange(self.p.ny, num_threads=nt, schedule="dynamic", chunksize=4):
                self._sat_row(&reads[0, 0, 0, 0], &ngood_out[0, 0, 0], &dq[y, 0], y)

    cdef void _sat_row(self, const uint16_t* reads, uint16_t* ngo, uint32_t* dq,
                       Py_ssize_t y) noexcept nogil:
        cdef const Params* p = &self.p
        cdef Scratch* s = &self.scr[iris_thread_num()]
        cdef Py_ssize_t nx = p.nx, ny = p.ny, x
        cdef int r, i
        cdef const float* satrow = _maprow(p.sat, p.sat_map, y, nx, s.satb)
        cdef const uint16_t* raw
        cdef float v, sv
        for x in range(nx):
            dq[x] = 0
        for r in range(p.nramps):
            for x in range(nx):
                s.ngood[x] = 0
            for i in range(p.nr):
                raw = reads + ((r * p.nr + i) * ny + y) * nx
                for x in range(nx):
                    v = <float>raw[x]
                    sv = satrow[x]
                    s.ngood[x] = s.ngood[x] + ((s.ngood[x] == i) & ((v < sv) | (sv != sv)))
            for x in range(nx):
                ngo[(r * ny + y) * nx + x] = <uint16_t>s.ngood[x]
                if s.ngood[x] < p.nr:
                    dq[x] = dq[x] | F_SATURATED
                if s.ngood[x] < 2:
                    dq[x] = dq[x] | F_DO_NOT_USE
                if not (satrow[x] == satrow[x]):
                    dq[x] = dq[x] | F_NO_SAT_CHECK

    def run_linearity(self, const float[:, :, ::1] data, float[:, :, ::1] out, uint32_t[:, ::1] dq):
        """Linearity only, on (nplanes, ny, nx) float32 data."""
        cdef Py_ssize_t y
        cdef int nt = self.nthreads
        with nogil:
            for y in prange(self.p.ny, num_threads=nt, schedule="dynamic", chunksize=4):
                self._lin_row(&data[0, 0, 0], &out[0, 0, 0], data.shape[0], &dq[y, 0], y)

    cdef void _lin_row(self, const float* data, float* out, Py_ssize_t npl, uint32_t* dq,
                       Py_ssize_t y) noexcept nogil:
        cdef const Params* p = &self.p
        cdef Scratch* s = &self.scr[iris_thread_num()]
        cdef Py_ssize_t nx = p.nx, x, k, o
        _linok_row(p.coef + y * nx, p.coef_plane, p.ncoef, nx, s.linok)
        for x in range(nx):
            dq[x] = 0 if s.linok[x] else F_NO_LIN_CORR
        for k in range(npl):
            o = (k * p.ny + y) * nx
            memcpy(s.val, data + o, nx * sizeof(float))
            _horner(s.val, s.acc, p.coef + y * nx, p.coef_plane, p.ncoef, s.linok, nx)
            memcpy(out + o, s.val, nx * sizeof(float))

    def run_jumps(self, const float[:, :, :, ::1] data, const uint16_t[:, :, ::1] ngood,
                  uint8_t[:, :, :, ::1] jumps, float[:, :, ::1] med):
        """Jump detection only, on corrected float32 reads (nramps, nr, ny, nx)."""
        cdef Py_ssize_t y
        cdef int nt = self.nthreads
        with nogil:
            for y in prange(self.p.ny, num_threads=nt, schedule="dynamic", chunksize=4):
                self._jump_only_row(&data[0, 0, 0, 0], &ngood[0, 0, 0], &jumps[0, 0, 0, 0],
                                    &med[0, 0, 0], y)

    cdef void _diffs_from_reads(self, Scratch* s, const float* data, int r,
                                Py_ssize_t y) noexcept nogil:
        cdef const Params* p = &self.p
        cdef Py_ssize_t nx = p.nx, ny = p.ny, x
        cdef const float* a
        cdef const float* b
        cdef int k
        for k in range(p.nr - 1):
            a = data + ((r * p.nr + k) * ny + y) * nx
            b = a + ny * nx
            for x in range(nx):
                s.d[k * nx + x] = b[x] - a[x]

    cdef void _jump_only_row(self, const float* data, const uint16_t* ngood, uint8_t* jumps,
                             float* med, Py_ssize_t y) noexcept nogil:
        cdef const Params* p = &self.p
        cdef Scratch* s = &self.scr[iris_thread_num()]
        cdef Py_ssize_t nx = p.nx, ny = p.ny, x
        cdef int r, k
        _row_params(p, s, y)
        for r in range(p.nramps):
            self._diffs_from_reads(s, data, r, y)
            for x in range(nx):
                s.ngood[x] = ngood[(r * ny + y) * nx + x]
            _jump_row(p, s, s.d, nx, s.ngood)
            for k in range(p.nr - 1):
                memcpy(jumps + ((r * (p.nr - 1) + k) * ny + y) * nx, s.jmp + k * nx, nx)
            memcpy(med + (r * ny + y) * nx, s.med, nx * sizeof(float))

    def run_fit(self, const float[:, :, :, ::1] data, const uint16_t[:, :, ::1] ngood,
                jumps, med, float[:, ::1] slope, float[:, ::1] vp, float[:, ::1] vr,
                float[:, ::1] err, uint32_t[:, ::1] dq, uint16_t[:, ::1] nused):
        """Slope fit only, on corrected float32 reads, with optional jumps and rate estimate."""
        cdef Py_ssize_t y
        cdef int nt = self.nthreads
        cdef const uint8_t[:, :, :, ::1] jv
        cdef const float[:, :, ::1] mv
        cdef const uint8_t* jp = NULL
        cdef const float* mp = NULL
        if jumps is not None:
            jv = jumps
            jp = &jv[0, 0, 0, 0]
        if med is not None:
            mv = med
            mp = &mv[0, 0, 0]
        with nogil:
            for y in prange(self.p.ny, num_threads=nt, schedule="dynamic", chunksize=4):
                self._fit_only_row(&data[0, 0, 0, 0], &ngood[0, 0, 0], jp, mp, y, &slope[y, 0],
                                   &vp[y, 0], &vr[y, 0], &err[y, 0], &dq[y, 0], &nused[y, 0])

    cdef void _fit_only_row(self, const float* data, const uint16_t* ngood, const uint8_t* jp,
                            const float* mp, Py_ssize_t y, float* slope, float* vp, float* vr,
                            float* err, uint32_t* dq, uint16_t* nused) noexcept nogil:
        cdef const Params* p = &self.p
        cdef Scratch* s = &self.scr[iris_thread_num()]
        cdef Py_ssize_t nx = p.nx, ny = p.ny, x
        cdef int r, k, nd = p.nr - 1
        cdef const float* rnrow = _maprow(p.rn, p.rn_map, y, nx, s.rnb)
        cdef const float* grow = _maprow(p.gain, p.gain_map, y, nx, s.gainb)
        cdef const uint8_t* jrow = NULL
        cdef const float* mrow = NULL
        for r in range(p.nramps):
            if nd > 0:
                self._diffs_from_reads(s, data, r, y)
            for x in range(nx):
                s.ngood[x] = ngood[(r * ny + y) * nx + x]
            jrow = NULL
            if jp != NULL and nd > 0:
                for k in range(nd):
                    memcpy(s.jmp + k * nx, jp + ((r * nd + k) * ny + y) * nx, nx)
                jrow = s.jmp
            mrow = NULL
            if mp != NULL:
                mrow = mp + (r * ny + y) * nx
            self._fit_one(s, s.d, nx, y, r, rnrow, grow, jrow, mrow)
        _combine_row(p, s, y, rnrow, grow, NULL, NULL, slope, vp, vr, err, dq, nused)


