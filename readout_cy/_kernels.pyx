# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython kernels of readout_cy: one pass over the uint16 reads, row by row.

Everything here works on rows of ``nx`` pixels with per-thread scratch buffers, so the
working set of a row (all reads of that row, as float32 differences) stays in L2 and the
full-size input is streamed through exactly once.  The Python face (``readout_cy/_api.py``)
validates inputs and builds a :class:`Plan`; the numpy twins in ``readout_cy/reference.py``
repeat the same arithmetic, in the same order, so tests can compare them tightly.

Hot loops are written as plain loops over the row (no calls, no branches the compiler
cannot if-convert) so that GCC vectorises them; per-pixel scalar code only runs for the
few pixels that saturate or have a jump.  The hot spots that need C are headers in
``readout_cy/src/`` (one role per header, included below with ``cdef extern from``): the
fused per-read loop (``restrict`` pointers, iris_ingest.h) and, on AVX2 builds, the fused
jump test + clean-pixel fit that keeps a pixel's differences in vector registers
(``iris_block_row``, iris_block.h).

DQ: the kernels define no DQ bits.  The values they write come from the caller through
``Plan(dq_bits=...)`` (readout_cy._api.DQFlags, from iris_tasks.datamodels.dqflags).

Arithmetic conventions (kept identical in the twins, see docs/readout.md):
  * per-read values (reference-pixel correction, linearity, differences, the jump test,
    slope dot products) are float32, summed sequentially over reads;
  * reference-pixel sums are exact integer sums, turned into float64 offsets;
  * estimator coefficients, variance coefficients and the inverse-variance combination
    are float64.
"""

from cython.parallel cimport prange
from libc.math cimport INFINITY, NAN, fabs, fabsf, pow, sqrt, sqrtf
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import numpy as np

# The C parts live in readout_cy/src/*.h, one role per header (setup.py puts that directory
# on the include path).  They are header-only static functions rather than separately
# compiled .c sources on purpose: they then land in the one translation unit Cython
# generates from this file, exactly as the verbatim C blocks they were before, so GCC
# inlines and vectorises them with the calling loops (iris_block8 is always_inline into its
# row driver; iris_cmpswap and the ingest loops are called per row and channel and are
# inlined into the Cython row loops when GCC finds it pays) and the object code -- hence
# every computed value -- is the same.  A separate .c would add a call and an alias barrier
# per row and channel.
cdef extern from "iris_openmp.h":
    int iris_openmp() nogil
    int iris_max_threads() nogil
    int iris_thread_num() nogil

cdef extern from "iris_sortnet.h":
    void iris_cmpswap(float* qa, float* qb, Py_ssize_t n) nogil

cdef extern from "iris_median.h":
    float iris_median_scalar(const float* d, Py_ssize_t dk, int nu, const float* inv_dt32,
                             float* buf) nogil

cdef extern from "iris_block.h":
    ctypedef struct IrisBlockArgs:
        int nd
        int nr
        int weighted
        int uniform
        float thr2
        int32_t nuf
        const float* inv_dt32
        const float* dt32
        const float* ctabT
        const float* rtab
        const float* ptab
    int iris_block_row(const IrisBlockArgs* A, Py_ssize_t nx, const float* d, Py_ssize_t dk,
                       const int32_t* ng, const float* r2, const float* ig, const float* rn,
                       const float* g, float* med, int32_t* jmp, int32_t* nj, float* ob,
                       float* oR, float* oP, float* om, int32_t* onu, int32_t* ofl,
                       float* mbuf, int32_t* fix) nogil

cdef extern from "iris_ingest.h":
    void iris_ingest_k0(const uint16_t* raw, const float* sat, const float* bias, int32_t* ng,
                        float* prev, float* dout, float f, int32_t i, Py_ssize_t n) nogil
    void iris_ingest_k4(const uint16_t* raw, const float* sat, const float* c0, const float* c1,
                        const float* c2, const float* c3, int32_t* ng, float* prev, float* dout,
                        float f, int32_t i, Py_ssize_t n) nogil
    void iris_ingest_k5(const uint16_t* raw, const float* sat, const float* bias,
                        const float* c0, const float* c1, const float* c2, const float* c3,
                        const float* c4, int32_t* ng, float* prev, float* dout, float f,
                        int32_t i, Py_ssize_t n) nogil
    void iris_prefetch(const void* p, Py_ssize_t nbytes) nogil


cdef inline void* _ptr(arr):
    """Address of a C-contiguous numpy array's data (the caller keeps the array alive)."""
    cdef size_t a = arr.__array_interface__["data"][0]
    return <void*>a


# Per-ramp status codes of the fit (internal, not DQ bits): the DQ bit values come from the
# caller through Plan(dq_bits=...) -- the project's one definition is
# iris_tasks.datamodels.dqflags, which the kernels (numpy only) must not import -- and
# _dq_row turns these codes into them.
cdef int32_t R_NOSLOPE = 1
cdef int32_t R_SAT = 2
cdef int32_t R_JUMP = 4

cdef enum:
    NPOW = 6
    CHUNK = 64
    MAXK = 5
    SEGCACHE_MAX = 64
    INGEST_BLOCK = 256     # columns per piece of _ingest_ramp_row (at most one channel)

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
    const double* rvar     # (ny, nch) variance of the per-read correction (DN^2) or NULL
    int border             # 4 if the frame has a reference border (DQ flag), else 0
    # maps: either (ny, nx) or a scalar spread over a scratch row
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
    int dt_uniform         # all float32 read intervals equal (the usual case)
    float tspan32          # t[nr-1] - t[0]
    # jumps
    int do_jump
    float thr2
    const int32_t* net     # comparator pairs of the sorting network
    int nnet
    # fit
    int mode
    int fowler_k
    int weighted
    int nused_full         # reads used by the full-ramp estimator
    const float* ctabT     # (nd, NPOW) float32 coefficients of the full-ramp estimators
    const float* rtab      # (NPOW,) float32
    const float* ptab      # (NPOW,) float32
    # per-segment estimator cache for UTR: index (pi*nr + a)*nr + b
    const float* segC      # flat float32 coefficients
    const int64_t* segoff  # offset of segment (pi, a, b) in segC
    const double* segR
    const double* segP
    # DQ bit values written to the outputs (Plan's dq_bits, in this order)
    uint32_t dq_do_not_use
    uint32_t dq_saturated
    uint32_t dq_jump_det
    uint32_t dq_no_gain_value
    uint32_t dq_no_lin_corr
    uint32_t dq_no_sat_check
    uint32_t dq_reference_pixel
    # (ny, nx) DQ bits OR'ed into every pixel's DQ (the caller's, e.g. the mask reference's)
    # or NULL
    const uint32_t* dq_or


ctypedef struct Scratch:
    float* prev
    float* S
    float* acc
    float* med
    float* rn2x2
    float* ig
    float* satb
    float* biasb
    float* rnb
    float* gainb
    float* zero
    float* dummy
    float* val
    int32_t* ngood
    int32_t* njump
    int32_t* pidx
    int32_t* linok
    int32_t* fix           # pixels left to the scalar fit (iris_block_row)
    float* d
    float* q
    int32_t* jmp
    double* cbuf
    double* cseg
    float* rb
    float* rR
    float* rP
    float* rm
    int32_t* rnused
    int32_t* rflags
    float* mbuf
    double* rn2d           # per row: rn^2 + reference-correction variance (float64)
    # the next row's map rows (coefficient planes, saturation, read noise, gain, bias
    # maps), which _ingest_ramp_row prefetches while it works on this row
    const float* pf_map[8]
    int pf_nmap


cdef extern from "iris_flicker.h":
    float iris_median_rank(const float* a, int n) nogil
    void iris_flicker_sums_row(const float* sl, const float* er, const uint8_t* ring,
                               Py_ssize_t R, Py_ssize_t y, Py_ssize_t ny, Py_ssize_t nx,
                               Py_ssize_t nch, int dilate, uint8_t* rb, uint8_t* hb,
                               double* vbg, double* vev, double* ve2, int64_t* cbg,
                               int64_t* cev) nogil
    void iris_flicker_apply_row(float* sl, float* vr, const float* vp, float* err,
                                const float* stripes, const float* acn, const float* add,
                                Py_ssize_t nx, Py_ssize_t nch, float* sgn, int pf) nogil

cdef extern from "iris_map_stats.h":
    void iris_map_stats(const float* a, Py_ssize_t n, float* out) nogil


def map_stats(const float[::1] a, int threads):
    """(any NaN, NaN-ignoring min, NaN-ignoring max) of a float32 array in one pass.

    min/max are NaN when every value is NaN (like np.fmin/np.fmax.reduce).  Validating a
    4096^2 map this way costs one read of it instead of three numpy reductions.  With
    threads > 1 the 1 MiB blocks are shared out by OpenMP.
    """
    cdef Py_ssize_t n = a.shape[0], blk = 262144, nb, b, lo_i, hi_i
    nb = (n + blk - 1) // blk if n > 0 else 0
    part = np.zeros((max(nb, 1), 3), np.float32)
    cdef float[:, ::1] pv = part
    if nb == 0:
        return False, np.float32("nan"), np.float32("nan")
    for b in prange(nb, nogil=True, num_threads=max(threads, 1), schedule="static"):
        lo_i = b * blk
        hi_i = min(lo_i + blk, n)
        iris_map_stats(&a[lo_i], hi_i - lo_i, &pv[b, 0])
    anynan = bool(part[:, 0].any())
    lo = np.fmin.reduce(part[:, 1])
    hi = np.fmax.reduce(part[:, 2])
    if lo > hi:  # no non-NaN value anywhere (every block kept its +inf/-inf start)
        return anynan, np.float32("nan"), np.float32("nan")
    return anynan, lo, hi

# ----------------------------------------------------------------------------------------
# estimator coefficients (shared by the full-ramp tables and the per-segment path)
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


def coefficients(double[::1] t, int a, int b, double power):
    """UTR estimator over reads a..b (for tests and the twin): (C, R, P)."""
    cdef int nr = t.shape[0]
    C = np.zeros(max(b - a, 1), np.float64)
    cb = np.zeros(max(b - a + 1, 1), np.float64)
    dt = np.ascontiguousarray(np.diff(np.asarray(t)) if nr > 1 else np.ones(1))
    cdef double[::1] cv = C, bv = cb, dv = dt
    cdef double R = 0.0, P = 0.0
    _coef_utr(&t[0], &dv[0], a, b, power, &cv[0], &R, &P, &bv[0])
    return C, R, P


def mcds_coefficients(double[::1] t, int ns, int kk):
    """MCDS estimator over usable reads 0..ns-1 (for tests and the twin): (C, R, P)."""
    cdef int nr = t.shape[0]
    C = np.zeros(max(ns - 1, 1), np.float64)
    dt = np.ascontiguousarray(np.diff(np.asarray(t)) if nr > 1 else np.ones(1))
    cdef double[::1] cv = C, dv = dt
    cdef double R = 0.0, P = 0.0
    _coef_mcds(&t[0], &dv[0], ns, kk, &cv[0], &R, &P)
    return C, R, P


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


def powers():
    """The optimal-weighting exponents, by SNR bucket."""
    return [POWERS[i] for i in range(NPOW)]


cdef inline int32_t _bucket(float data, float rn, float g) noexcept nogil:
    """stcal's signal-to-noise buckets (electrons) -> index into POWERS (float32)."""
    cdef float den = rn * rn * g * g + data * g
    cdef float snr = data * g / sqrtf(den)
    return (snr >= 5.0) + (snr >= 10.0) + (snr >= 20.0) + (snr >= 50.0) + (snr >= 100.0)


# ----------------------------------------------------------------------------------------
# reference pixels
# ----------------------------------------------------------------------------------------

cdef void _refpix_sums(const uint16_t* fr, Py_ssize_t ny, Py_ssize_t nx, int nch,
                       const uint8_t* gtb, const uint8_t* gsd, int64_t* tb, int64_t* left,
                       int64_t* right) noexcept nogil:
    """Integer sums of the usable reference pixels of one frame: per channel over the 4 top
    + 4 bottom rows (``tb``), per row over the 4 left and the 4 right columns.

    ``gtb`` (8, nx) and ``gsd`` (ny, 8) are 1 for a usable pixel (NULL: all are).  Sums are
    integers (exact, order-free), so the twin reproduces them bit for bit; the offsets are
    formed from them in numpy (readout_cy._api._refpix_tables_from_sums, shared with the
    twin).
    """
    cdef Py_ssize_t chw = nx // nch, y, x, row
    cdef int c, j
    cdef int64_t s
    for c in range(nch):
        s = 0
        for j in range(8):
            row = j if j < 4 else ny - 8 + j
            if gtb == NULL:
                for x in range(c * chw, (c + 1) * chw):
                    s = s + fr[row * nx + x]
            else:
                for x in range(c * chw, (c + 1) * chw):
                    s = s + fr[row * nx + x] * gtb[j * nx + x]
        tb[c] = s
    for y in range(ny):
        s = 0
        for x in range(4):
            s = s + fr[y * nx + x] * (1 if gsd == NULL else gsd[y * 8 + x])
        left[y] = s
        s = 0
        for x in range(4):
            s = s + fr[y * nx + nx - 4 + x] * (1 if gsd == NULL else gsd[y * 8 + 4 + x])
        right[y] = s


def refpix_sums(const uint16_t[:, :, ::1] frames, int nch, gtb, gsd, int threads):
    """Per-frame integer sums of usable reference pixels: channels (nframes, nch), left and
    right side columns per row (nframes, ny).  ``gtb`` (8, nx) / ``gsd`` (ny, 8) uint8
    (1 = usable), or None for all."""
    cdef Py_ssize_t nf = frames.shape[0], ny = frames.shape[1], nx = frames.shape[2], f
    tb = np.zeros((nf, nch), dtype=np.int64)
    left = np.zeros((nf, ny), dtype=np.int64)
    right = np.zeros((nf, ny), dtype=np.int64)
    cdef int64_t[:, ::1] tv = tb, lv = left, rv = right
    cdef const uint8_t[:, ::1] gt
    cdef const uint8_t[:, ::1] gs
    cdef const uint8_t* gtp = NULL
    cdef const uint8_t* gsp = NULL
    if gtb is not None:
        gt = gtb
        gs = gsd
        if gt.shape[0] != 8 or gt.shape[1] != nx or gs.shape[0] != ny or gs.shape[1] != 8:
            raise ValueError("refpix_sums: gtb must be (8, nx) and gsd (ny, 8)")
        gtp = &gt[0, 0]
        gsp = &gs[0, 0]
    if nf == 0:
        return tb, left, right
    for f in prange(nf, nogil=True, num_threads=threads, schedule="dynamic"):
        _refpix_sums(&frames[f, 0, 0], ny, nx, nch, gtp, gsp, &tv[f, 0], &lv[f, 0], &rv[f, 0])
    return tb, left, right


def refpix_border_stats(const uint16_t[:, :, ::1] frames, int nramps, const double[::1] c):
    """Time behaviour of every reference pixel, pooled over ramps.

    ``frames`` is (nramps * nr, ny, nx); ``c`` (nr,) the unweighted least-squares slope
    coefficients of a read (sum c = 0, sum c (t - tbar) = 1).  Pixels are ordered: the 8
    top/bottom rows (rows 0-3, ny-4..ny-1) times nx, then rows 4..ny-5 times the 8 side
    columns (0-3, nx-4..nx-1).  Returns float64 arrays (npix,): mean level (DN), slope (DN per
    unit of t, mean over ramps) and the residual sum of squares about each ramp's straight
    line (summed over ramps).  One serial pass over the border (< 2 % of the frame).
    """
    cdef Py_ssize_t nf = frames.shape[0], ny = frames.shape[1], nx = frames.shape[2]
    cdef int nr = c.shape[0]
    cdef Py_ssize_t ntb = 8 * nx, nsd = 8 * (ny - 8), npix = ntb + nsd, p, x, y
    cdef Py_ssize_t plane = ny * nx
    cdef int r, i, j, k
    cdef double v, tt2 = 0.0, ybar, m, ci
    cdef double s0[8]
    cdef double s1[8]
    cdef double s2[8]
    cdef double b0[8]
    if nramps < 1 or nf != nramps * nr or ny < 8 or nx < 8:
        raise ValueError("refpix_border_stats: frames must hold nramps * len(c) reads of a "
                         "frame with a border")
    level = np.zeros(npix, np.float64)
    slope = np.zeros(npix, np.float64)
    rss = np.zeros(npix, np.float64)
    acc = np.zeros((4, ntb), np.float64)
    cdef double* lv = <double*>_ptr(level)
    cdef double* sv = <double*>_ptr(slope)
    cdef double* rv = <double*>_ptr(rss)
    cdef double* a0 = <double*>_ptr(acc)
    cdef double* a1 = a0 + ntb
    cdef double* a2 = a1 + ntb
    cdef double* bv = a2 + ntb
    cdef const uint16_t* f0
    cdef const uint16_t* fr
    cdef const double* cc = &c[0]
    for i in range(nr):
        tt2 = tt2 + c[i] * c[i]
    # sum (t - tbar)^2 = 1 / sum c^2 for the least-squares coefficients
    tt2 = 1.0 / tt2 if tt2 > 0 else 0.0
    with nogil:
        for r in range(nramps):
            f0 = &frames[r * nr, 0, 0]
            # top/bottom rows: reads outer, contiguous pixels inner
            for j in range(8):
                y = j if j < 4 else ny - 8 + j
                for x in range(nx):
                    p = j * nx + x
                    bv[p] = <double>f0[y * nx + x]
                    a0[p] = 0.0
                    a1[p] = 0.0
                    a2[p] = 0.0
            for i in range(nr):
                fr = f0 + i * plane
                ci = cc[i]
                for j in range(8):
                    y = j if j < 4 else ny - 8 + j
                    for x in range(nx):
                        p = j * nx + x
                        v = <double>fr[y * nx + x] - bv[p]
                        a0[p] += v
                        a1[p] += ci * v
                        a2[p] += v * v
            for p in range(ntb):
                ybar = a0[p] / nr
                m = a1[p]
                lv[p] += (bv[p] + ybar) / nramps
                sv[p] += m / nramps
                rv[p] += a2[p] - nr * ybar * ybar - m * m * tt2
            # side columns: one row at a time, its 8 pixels' sums in registers over the reads
            for y in range(4, ny - 4):
                for k in range(8):
                    x = k if k < 4 else nx - 8 + k
                    b0[k] = <double>f0[y * nx + x]
                    s0[k] = 0.0
                    s1[k] = 0.0
                    s2[k] = 0.0
                for i in range(nr):
                    fr = f0 + i * plane + y * nx
                    ci = cc[i]
                    for k in range(8):
                        x = k if k < 4 else nx - 8 + k
                        v = <double>fr[x] - b0[k]
                        s0[k] += v
                        s1[k] += ci * v
                        s2[k] += v * v
                for k in range(8):
                    p = ntb + (y - 4) * 8 + k
                    ybar = s0[k] / nr
                    m = s1[k]
                    lv[p] += (b0[k] + ybar) / nramps
                    sv[p] += m / nramps
                    rv[p] += s2[k] - nr * ybar * ybar - m * m * tt2
    return level, slope, rss


# ----------------------------------------------------------------------------------------
# row kernels
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
        s.biasb[x] = p.bias[0] if p.bias != NULL else 0.0
        s.zero[x] = 0.0


cdef void _linok_row(const float* coefrow, Py_ssize_t plane, int K, Py_ssize_t nx,
                     int32_t* linok) noexcept nogil:
    """1 where all coefficients of the pixel are finite numbers (not NaN)."""
    cdef Py_ssize_t x
    cdef int k
    cdef const float* c
    for x in range(nx):
        linok[x] = 1
    for k in range(K):
        c = coefrow + k * plane
        for x in range(nx):
            linok[x] = linok[x] & (c[x] == c[x])


cdef void _horner_generic(float* val, float* acc, const float* coefrow, Py_ssize_t plane,
                          int K, Py_ssize_t nx) noexcept nogil:
    """val <- sum_k c_k val^k for any K (multi-pass); NaN results keep val."""
    cdef Py_ssize_t x
    cdef int k
    cdef const float* c
    c = coefrow + (K - 1) * plane
    for x in range(nx):
        acc[x] = c[x]
    for k in range(K - 2, -1, -1):
        c = coefrow + k * plane
        for x in range(nx):
            acc[x] = acc[x] * val[x] + c[x]
    for x in range(nx):
        val[x] = acc[x] if acc[x] == acc[x] else val[x]


cdef inline void _coef_rows(const Params* p, const float* zero, Py_ssize_t y,
                            const float** c0, const float** c1, const float** c2,
                            const float** c3, const float** c4) noexcept nogil:
    """Row y of the first MAXK linearity coefficient planes; ``zero`` (a row of zeros) for
    the planes beyond the polynomial's order, so the padded Horner loops stay exact."""
    cdef const float* cr = p.coef + y * p.nx
    cdef Py_ssize_t plane = p.coef_plane
    cdef int K = p.ncoef
    c0[0] = cr if K > 0 else zero
    c1[0] = cr + plane if K > 1 else zero
    c2[0] = cr + 2 * plane if K > 2 else zero
    c3[0] = cr + 3 * plane if K > 3 else zero
    c4[0] = cr + 4 * plane if K > 4 else zero


cdef void _ingest_row(const Params* p, Scratch* s, const uint16_t* raw, Py_ssize_t y, int i,
                      const double* off, const double* rowc, const float* satrow,
                      const float* biasrow, float* dout, int32_t* ng,
                      float* prev) noexcept nogil:
    """One read of one row, fused: saturation count, refpix, bias, linearity, difference.

    ng counts the leading reads below saturation (raw DN; a NaN saturation means no
    check).  Linearity uses Horner's scheme; up to MAXK coefficients the polynomial is
    padded with leading zero rows (exact: 0*w + c == c) so one loop serves all orders.
    A NaN polynomial value (NaN coefficients) leaves the value uncorrected.
    """
    cdef Py_ssize_t x, x0, x1, nx = p.nx, chw = p.chw, plane = p.coef_plane
    cdef int c, nch = p.nch, K = p.ncoef
    cdef float f, v, sv, w, r
    cdef int32_t n
    cdef const float *c0, *c1, *c2, *c3, *c4
    cdef float* val = s.val
    if dout == NULL:
        dout = s.dummy
    cdef int nobias = biasrow == NULL
    if biasrow == NULL:
        biasrow = s.zero
    _coef_rows(p, s.zero, y, &c0, &c1, &c2, &c3, &c4)
    for c in range(nch):
        f = 0.0
        if off != NULL:
            f = <float>(off[c] + rowc[y])
        x0 = c * chw
        x1 = x0 + chw
        if K == 0:
            iris_ingest_k0(raw + x0, satrow + x0, biasrow + x0, ng + x0, prev + x0, dout + x0,
                           f, i, chw)
        elif K == 4 and nobias:
            # the common case, without the zero padding and the zero bias row (both exact
            # no-ops in the general loop, so the values are the same)
            iris_ingest_k4(raw + x0, satrow + x0, c0 + x0, c1 + x0, c2 + x0, c3 + x0, ng + x0,
                           prev + x0, dout + x0, f, i, chw)
        elif K <= MAXK:
            iris_ingest_k5(raw + x0, satrow + x0, biasrow + x0, c0 + x0, c1 + x0, c2 + x0,
                           c3 + x0, c4 + x0, ng + x0, prev + x0, dout + x0, f, i, chw)
        else:
            for x in range(x0, x1):
                v = <float>raw[x]
                sv = satrow[x]
                n = ng[x]
                ng[x] = n + ((n == i) & ((v < sv) | (sv != sv)))
                val[x] = (v - f) - biasrow[x]
    if K > MAXK:
        _horner_generic(val, s.acc, p.coef + y * nx, plane, K, nx)
        for x in range(nx):
            dout[x] = val[x] - prev[x]
            prev[x] = val[x]


cdef inline void _linok_piece(const float* c0, const float* c1, const float* c2,
                              const float* c3, const float* c4, int K, int32_t* linok,
                              Py_ssize_t n) noexcept nogil:
    """linok over n pixels for K <= MAXK coefficients in one pass (the planes beyond K
    are the zero row: always finite): 1 where every coefficient is a number."""
    cdef Py_ssize_t x
    for x in range(n):
        linok[x] = ((c0[x] == c0[x]) & (c1[x] == c1[x]) & (c2[x] == c2[x]) & (c3[x] == c3[x])
                    & (c4[x] == c4[x]))


cdef void _ingest_ramp_row(const Params* p, Scratch* s, const uint16_t* reads, int r,
                          Py_ssize_t y, const float* satrow, const float* biasrow,
                          Py_ssize_t nextoff) noexcept nogil:
    """All reads of ramp r for row y, a piece of the row at a time (a channel, or
    INGEST_BLOCK columns of a wider one): the same per-read loops as _ingest_row (same
    values: every pixel still sees its reads in order, with its channel's offsets), but a
    piece's maps, saturation counts, previous values and differences (~11 kB for 128
    columns and 10 reads) stay in L1 over the reads instead of streaming the row's ~300 kB
    through L2 once per read.  Up to MAXK coefficients (the generic path: _ingest_row).
    With ``nextoff`` > 0, the reads of row y + nextoff (the row fitted next) and its maps
    (s.pf_map) are prefetched a piece and a read at a time.  Differences into s.d, saturation counts into s.ngood (zeroed here),
    the last corrected read in s.prev, and (first ramp, with linearity) the linearity-OK
    flags into s.linok, a piece at a time as its coefficients come into L1."""
    cdef Py_ssize_t x0, xb, w, nx = p.nx, ny = p.ny, chw = p.chw, plane = p.coef_plane
    cdef int c, i, j, nch = p.nch, K = p.ncoef, nr = p.nr, nmap = s.pf_nmap
    cdef float f
    cdef const float *c0, *c1, *c2, *c3, *c4
    cdef const uint16_t* raw0 = reads + (r * nr * ny + y) * nx
    cdef Py_ssize_t rstride = ny * nx
    cdef const double* off = NULL
    cdef const double* rowc = NULL
    cdef int32_t* ng = s.ngood
    cdef float* prev = s.prev
    cdef float* dout
    cdef int nobias = biasrow == NULL
    if biasrow == NULL:
        biasrow = s.zero
    _coef_rows(p, s.zero, y, &c0, &c1, &c2, &c3, &c4)
    memset(ng, 0, nx * sizeof(int32_t))
    for c in range(nch):
        xb = c * chw
        while xb < (c + 1) * chw:
            x0 = xb
            w = (c + 1) * chw - x0
            if w > INGEST_BLOCK:
                w = INGEST_BLOCK
            xb = x0 + w
            if K >= 1 and r == 0:
                # the piece's linearity-OK flags (_linok_row's values), while its
                # coefficients come into L1 for the reads below
                _linok_piece(c0 + x0, c1 + x0, c2 + x0, c3 + x0, c4 + x0, K, s.linok + x0, w)
            for i in range(nr):
                if nextoff > 0:
                    # spread over the reads (a burst of ~90 lines per piece would wait for
                    # free line-fill buffers): the next row's read i, and map i (mod nr)
                    iris_prefetch(raw0 + i * rstride + nextoff * nx + x0,
                                  w * sizeof(uint16_t))
                    j = i
                    while j < nmap:
                        iris_prefetch(s.pf_map[j] + x0, w * sizeof(float))
                        j = j + nr
                f = 0.0
                if p.off != NULL:
                    off = p.off + (r * nr + i) * nch
                    rowc = p.rowc + (r * nr + i) * ny
                    f = <float>(off[c] + rowc[y])
                dout = s.d + (i - 1) * nx if i > 0 else s.dummy
                if K == 0:
                    iris_ingest_k0(raw0 + i * rstride + x0, satrow + x0, biasrow + x0,
                                   ng + x0, prev + x0, dout + x0, f, i, w)
                elif K == 4 and nobias:
                    iris_ingest_k4(raw0 + i * rstride + x0, satrow + x0, c0 + x0, c1 + x0,
                                   c2 + x0, c3 + x0, ng + x0, prev + x0, dout + x0, f, i, w)
                else:
                    iris_ingest_k5(raw0 + i * rstride + x0, satrow + x0, biasrow + x0,
                                   c0 + x0, c1 + x0, c2 + x0, c3 + x0, c4 + x0, ng + x0,
                                   prev + x0, dout + x0, f, i, w)


cdef void _jump_row(const Params* p, Scratch* s, const float* d, Py_ssize_t dk,
                    const int32_t* ng) noexcept nogil:
    """Two-point-difference jump test against the pixel's median rate (float32).

    Writes s.med (median rate, DN/s), s.jmp (nd x nx flags) and s.njump.
    """
    cdef Py_ssize_t x, x0, x1, nx = p.nx
    cdef int k, n, nd = p.nd, nr = p.nr, h, nnet = p.nnet, npart
    cdef float* q = s.q
    cdef float* qa
    cdef float* qb
    cdef float* qk
    cdef float* med = s.med
    cdef int32_t* jk
    cdef int32_t* nj = s.njump
    cdef const float* dp
    cdef const float* r2 = s.rn2x2
    cdef const float* ig = s.ig
    cdef float ik, a, b, m, e, s2, dtk, thr2 = p.thr2
    cdef int32_t fl
    for k in range(nd):
        qk = q + k * nx
        dp = d + k * dk
        ik = p.inv_dt32[k]
        for x in range(nx):
            a = dp[x] * ik
            qk[x] = a if k < ng[x] - 1 else INFINITY
    # sorting network over the read axis, vectorised along the row, in L1-sized chunks
    x0 = 0
    while x0 < nx:
        x1 = x0 + CHUNK
        if x1 > nx:
            x1 = nx
        for n in range(nnet):
            qa = q + p.net[2 * n] * nx
            qb = q + p.net[2 * n + 1] * nx
            iris_cmpswap(qa + x0, qb + x0, x1 - x0)
        x0 = x1
    # median: all nd differences usable (the common case) from the median-selection
    # network, vectorised; pixels with fewer usable differences are sorted one by one
    h = nd // 2
    if nd >= 3 and nd % 2:
        for x in range(nx):
            med[x] = q[h * nx + x]
    elif nd >= 3:
        for x in range(nx):
            med[x] = <float>0.5 * (q[(h - 1) * nx + x] + q[h * nx + x])
    npart = 0
    for x in range(nx):
        npart = npart + (ng[x] != nr)
    if nd < 3 or npart > 0:
        for x in range(nx):
            if nd < 3 or ng[x] != nr:
                med[x] = iris_median_scalar(d + x, dk, ng[x] - 1, p.inv_dt32, s.mbuf)
    for x in range(nx):
        nj[x] = 0
    if p.dt_uniform:
        # equal intervals: m*dt and the threshold thr^2 * s2 do not depend on k; computed
        # once per pixel they are the same float32 values as per difference (s.S, s.acc
        # and s.pidx are free here: the fit re-initialises them)
        dtk = p.dt32[0]
        for x in range(nx):
            m = med[x]
            s2 = r2[x] + fabsf(m) * dtk * ig[x]
            s.S[x] = m * dtk
            s.acc[x] = thr2 * s2
            s.pidx[x] = (ng[x] >= 3) & (s2 > 0)
        for k in range(nd):
            dp = d + k * dk
            jk = s.jmp + k * nx
            for x in range(nx):
                e = dp[x] - s.S[x]
                fl = (k < ng[x] - 1) & s.pidx[x] & (e * e > s.acc[x])
                jk[x] = fl
                nj[x] = nj[x] + fl
        return
    for k in range(nd):
        dp = d + k * dk
        dtk = p.dt32[k]
        jk = s.jmp + k * nx
        for x in range(nx):
            m = med[x]
            e = dp[x] - m * dtk
            s2 = r2[x] + fabsf(m) * dtk * ig[x]
            fl = (k < ng[x] - 1) & (ng[x] >= 3) & (e * e > thr2 * s2) & (s2 > 0)
            jk[x] = fl
            nj[x] = nj[x] + fl


cdef inline void _seg_add(double bs, double Rs, double Ps, double rn2, double mig,
                          double* W, double* Sb, double* SR, double* SP) noexcept nogil:
    cdef double v = rn2 * Rs + mig * Ps
    if not (v > 0.0):
        v = 1e-30
    W[0] = W[0] + 1.0 / v
    Sb[0] = Sb[0] + bs / v
    SR[0] = SR[0] + Rs / (v * v)
    SP[0] = SP[0] + Ps / (v * v)


cdef void _fit_pixel(const Params* p, Scratch* s, const float* d, Py_ssize_t dk, Py_ssize_t x,
                     int ns, const int32_t* jmp, const int32_t* njump, const float* med,
                     float rn, float g, float* ob, float* oR, float* oP, float* om,
                     int32_t* onused, int32_t* oflags) noexcept nogil:
    """Scalar fit of one pixel: segments between jumps, combined by inverse variance."""
    cdef Py_ssize_t nx = p.nx
    cdef int nr = p.nr, k, a, bb, L, nseg = 0, nused = 0, kk, pi
    cdef int32_t fl = 0
    cdef float m, sf, bs
    cdef double mig, rn2, ig, Rs, Ps, W = 0.0, Sb = 0.0, SR = 0.0, SP = 0.0
    cdef double b1 = NAN, R1 = 0.0, P1 = 0.0
    cdef double* C = s.cseg
    cdef const float* Cf
    cdef Py_ssize_t ix
    if ns < nr:
        fl = fl | R_SAT
    rn2 = s.rn2d[x]
    ig = 1.0 / <double>g
    # rate estimate for the variance weights: the jump detector's median, else the
    # average rate over the usable reads
    if med != NULL:
        m = med[x]
    else:
        m = NAN
        if ns >= 2:
            sf = 0.0
            for k in range(ns - 1):
                sf = sf + d[k * dk + x]
            m = sf / <float>(p.t[ns - 1] - p.t[0])
    mig = <double>m * ig if m > 0 else 0.0
    if p.mode == MODE_UTR:
        if jmp != NULL and njump[x] > 0:
            fl = fl | R_JUMP
        a = 0
        for k in range(ns):
            # a segment ends at read k when it is the last usable read or the difference
            # k -> k+1 is a jump
            if k == ns - 1 or (jmp != NULL and jmp[k * nx + x]):
                bb = k
                L = bb - a + 1
                if L >= 2:
                    pi = 0
                    if p.weighted:
                        sf = 0.0
                        for kk in range(a, bb):
                            sf = sf + d[kk * dk + x]
                        pi = _bucket(sf, rn, g)
                    bs = 0.0
                    if p.segoff != NULL:
                        ix = (pi * nr + a) * nr + bb
                        Cf = p.segC + p.segoff[ix]
                        Rs = p.segR[ix]
                        Ps = p.segP[ix]
                        for kk in range(a, bb):
                            bs = bs + Cf[kk - a] * d[kk * dk + x]
                    else:
                        _coef_utr(p.t, p.dt, a, bb, POWERS[pi], C, &Rs, &Ps, s.cbuf)
                        for kk in range(a, bb):
                            bs = bs + <float>C[kk - a] * d[kk * dk + x]
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
            _coef_mcds(p.t, p.dt, ns, kk, C, &Rs, &Ps)
            bs = 0.0
            for k in range(ns - 1):
                bs = bs + <float>C[k] * d[k * dk + x]
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
    om[x] = m
    onused[x] = nused
    oflags[x] = fl


cdef void _fit_row(const Params* p, Scratch* s, const float* d, Py_ssize_t dk,
                   const int32_t* ng, const int32_t* jmp, const int32_t* njump,
                   const float* med, const float* rnrow, const float* grow, float* ob,
                   float* oR, float* oP, float* om, int32_t* onused,
                   int32_t* oflags, const int32_t* fix, int nfix) noexcept nogil:
    """Slope of one ramp for one row.

    With ``fix`` given, the clean pixels are already done (iris_block_row) and ``fix``
    lists the nfix pixels that still need the scalar path.

    Clean pixels (no saturation, no jump) use the precomputed full-ramp estimator,
    vectorised over the row (optimal weighting: the coefficient set is gathered by the
    pixel's SNR bucket); the others go through the scalar per-segment path.
    """
    cdef Py_ssize_t x, nx = p.nx
    cdef int k, j, nd = p.nd, nr = p.nr
    cdef const float* dp
    cdef const float* ck
    cdef float cj, q0, q1, q2, q3, q4, q5, r0, r1, r2, r3, r4, r5, v0, v1, v2, v3, v4, v5
    cdef int32_t pi
    cdef float* S = s.S
    cdef float* acc = s.acc
    cdef int32_t* pidx = s.pidx
    cdef float tspan = p.tspan32
    cdef int32_t nuf = p.nused_full
    if fix != NULL:
        for j in range(nfix):
            x = fix[j]
            _fit_pixel(p, s, d, dk, x, ng[x], jmp, njump, med, rnrow[x], grow[x], ob, oR, oP,
                       om, onused, oflags)
        return
    if nr >= 2:
        for x in range(nx):
            S[x] = 0.0
            acc[x] = 0.0
            pidx[x] = 0
        for k in range(nd):
            dp = d + k * dk
            for x in range(nx):
                S[x] = S[x] + dp[x]
        if p.weighted:
            for x in range(nx):
                pidx[x] = _bucket(S[x], rnrow[x], grow[x])
        if p.weighted:
            # the pixel's estimator only: per difference, its coefficient is picked from
            # the NPOW candidates by blends (vectorises; GCC does not vectorise the
            # gather ck[pidx[x]]).  Same sum, same order as accumulating every bucket and
            # picking afterwards (what the twin does), so the bits are the same.
            for k in range(nd):
                dp = d + k * dk
                ck = p.ctabT + k * NPOW
                q0 = ck[0]
                q1 = ck[1]
                q2 = ck[2]
                q3 = ck[3]
                q4 = ck[4]
                q5 = ck[5]
                for x in range(nx):
                    pi = pidx[x]
                    cj = q0
                    cj = q1 if pi == 1 else cj
                    cj = q2 if pi == 2 else cj
                    cj = q3 if pi == 3 else cj
                    cj = q4 if pi == 4 else cj
                    cj = q5 if pi == 5 else cj
                    acc[x] = acc[x] + cj * dp[x]
        else:
            for k in range(nd):
                dp = d + k * dk
                cj = p.ctabT[k * NPOW]
                for x in range(nx):
                    acc[x] = acc[x] + cj * dp[x]
        # variance coefficients of the pixel's bucket: blends again instead of a gather
        r0 = p.rtab[0]
        r1 = p.rtab[1]
        r2 = p.rtab[2]
        r3 = p.rtab[3]
        r4 = p.rtab[4]
        r5 = p.rtab[5]
        v0 = p.ptab[0]
        v1 = p.ptab[1]
        v2 = p.ptab[2]
        v3 = p.ptab[3]
        v4 = p.ptab[4]
        v5 = p.ptab[5]
        for x in range(nx):
            pi = pidx[x]
            ob[x] = acc[x]
            cj = r0
            cj = r1 if pi == 1 else cj
            cj = r2 if pi == 2 else cj
            cj = r3 if pi == 3 else cj
            cj = r4 if pi == 4 else cj
            cj = r5 if pi == 5 else cj
            oR[x] = cj
            cj = v0
            cj = v1 if pi == 1 else cj
            cj = v2 if pi == 2 else cj
            cj = v3 if pi == 3 else cj
            cj = v4 if pi == 4 else cj
            cj = v5 if pi == 5 else cj
            oP[x] = cj
            onused[x] = nuf
            oflags[x] = 0
        if med != NULL:
            memcpy(om, med, nx * sizeof(float))
        else:
            for x in range(nx):
                om[x] = S[x] / tspan
    for x in range(nx):
        if nr < 2 or ng[x] != nr or (jmp != NULL and njump[x] > 0):
            _fit_pixel(p, s, d, dk, x, ng[x], jmp, njump, med, rnrow[x], grow[x], ob, oR, oP,
                       om, onused, oflags)


cdef void _dq_row(const Params* p, Py_ssize_t y, const int32_t* flags, const float* grow,
                  const float* satrow, const int32_t* linok, const int32_t* nu,
                  uint32_t* dq, uint16_t* nused) noexcept nogil:
    """Pixel DQ and nused of one row (flags: the per-ramp codes R_NOSLOPE/R_SAT/R_JUMP)."""
    cdef Py_ssize_t x, nx = p.nx, b = p.border
    cdef uint32_t q
    cdef int32_t n, f
    cdef float g, sv
    # the bits in locals: dq[] is uint32_t like the Params fields, so GCC would otherwise
    # reload them after every store and not vectorise the loops
    cdef uint32_t dnu = p.dq_do_not_use, sat = p.dq_saturated, jump = p.dq_jump_det
    cdef uint32_t nogain = p.dq_no_gain_value | p.dq_do_not_use, nosat = p.dq_no_sat_check
    cdef uint32_t nolin = p.dq_no_lin_corr, refpx = p.dq_reference_pixel
    for x in range(nx):
        g = grow[x]
        sv = satrow[x]
        f = flags[x]
        q = ((dnu if f & R_NOSLOPE else 0) | (sat if f & R_SAT else 0)
             | (jump if f & R_JUMP else 0))
        q = q | (nogain if g != g else 0)
        q = q | (nosat if sv != sv else 0)
        dq[x] = q
        n = nu[x]
        nused[x] = <uint16_t>(n if n < 65535 else 65535)
    if linok != NULL:
        for x in range(nx):
            dq[x] = dq[x] | (0 if linok[x] else nolin)
    if p.dq_or != NULL:
        for x in range(nx):
            dq[x] = dq[x] | p.dq_or[y * nx + x]
    if b > 0:
        if y < b or y >= p.ny - b:
            for x in range(nx):
                dq[x] = dq[x] | refpx
        else:
            for x in range(b):
                dq[x] = dq[x] | refpx
                dq[nx - 1 - x] = dq[nx - 1 - x] | refpx


cdef void _combine_row(const Params* p, Scratch* s, Py_ssize_t y, const float* rnrow,
                       const float* grow, const float* satrow, const int32_t* linok,
                       float* slope, float* vp, float* vr, float* err, uint32_t* dq,
                       uint16_t* nused) noexcept nogil:
    """Combine the ramps (inverse variance), variances, ERR and pixel DQ of one row."""
    cdef Py_ssize_t x, nx = p.nx, ix
    cdef int r, nr_ok, cnt, nu
    cdef double msum, mbar, mig, rn2, ig, W, Sb, SR, SP, b, R, P, vpo, vrr
    cdef int32_t f, bad
    cdef float mr, g
    cdef int32_t* fl = s.rflags
    cdef int32_t* nuse = s.rnused
    if p.nramps == 1:
        # vectorised single-ramp case
        for x in range(nx):
            g = grow[x]
            rn2 = s.rn2d[x]
            ig = 1.0 / <double>g
            b = <double>s.rb[x]
            R = <double>s.rR[x]
            P = <double>s.rP[x]
            vpo = b * ig * P if b > 0.0 else 0.0
            vrr = rn2 * R
            bad = (fl[x] & R_NOSLOPE) | (g != g)
            slope[x] = NAN if bad else <float>b
            vp[x] = 0.0 if bad else <float>vpo
            vr[x] = 0.0 if bad else <float>vrr
            err[x] = 0.0 if bad else <float>sqrt(vrr + vpo)
        _dq_row(p, y, fl, grow, satrow, linok, nuse, dq, nused)
        return
    for x in range(nx):
        rn2 = s.rn2d[x]
        ig = 1.0 / <double>grow[x]
        f = 0
        nr_ok = 0
        cnt = 0
        nu = 0
        msum = 0.0
        for r in range(p.nramps):
            ix = r * nx + x
            f = f | (fl[ix] & (R_SAT | R_JUMP))
            if not (fl[ix] & R_NOSLOPE):
                nr_ok = nr_ok + 1
                nu = nu + nuse[ix]
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
                if not (fl[ix] & R_NOSLOPE):
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
                if not (fl[ix] & R_NOSLOPE):
                    _seg_add(s.rb[ix], s.rR[ix], s.rP[ix], rn2, mig, &W, &Sb, &SR, &SP)
            b = Sb / W
            R = SR / (W * W)
            P = SP / (W * W)
        if nr_ok == 0:
            f = f | R_NOSLOPE
        if (f & R_NOSLOPE) or not (grow[x] == grow[x]):
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
        s.pidx[x] = f
        s.njump[x] = nu
    _dq_row(p, y, s.pidx, grow, satrow, linok, s.njump, dq, nused)


cdef inline void _row_params(const Params* p, Scratch* s, Py_ssize_t y) noexcept nogil:
    """Per-row float32 helpers of the jump test: 2 rn^2 and 1/gain."""
    cdef Py_ssize_t x, nx = p.nx
    cdef const float* rnrow = _maprow(p.rn, p.rn_map, y, nx, s.rnb)
    cdef const float* grow = _maprow(p.gain, p.gain_map, y, nx, s.gainb)
    for x in range(nx):
        s.rn2x2[x] = <float>2.0 * rnrow[x] * rnrow[x]
        s.ig[x] = <float>1.0 / grow[x]


cdef void _rn2_row(const Params* p, Scratch* s, Py_ssize_t y,
                   const float* rnrow) noexcept nogil:
    """Per-row float64 read-noise variance of one read: rn^2, plus the white noise the
    reference-pixel correction adds to every read (p.rvar, per row and channel) so that
    VAR_RNOISE and the segment weights include it."""
    cdef Py_ssize_t x, x0, nx = p.nx, chw = p.chw
    cdef int c
    cdef double v
    for x in range(nx):
        s.rn2d[x] = <double>rnrow[x] * <double>rnrow[x]
    if p.rvar != NULL:
        for c in range(p.nch):
            v = p.rvar[y * p.nch + c]
            x0 = c * chw
            for x in range(x0, x0 + chw):
                s.rn2d[x] = s.rn2d[x] + v


cdef void _lin_apply_row(const Params* p, Scratch* s, float* val, Py_ssize_t y) noexcept nogil:
    """Linearity of one row of values in place (the fused path's arithmetic)."""
    cdef Py_ssize_t x, nx = p.nx, plane = p.coef_plane
    cdef int K = p.ncoef
    cdef float w, r
    cdef const float* cr = p.coef + y * nx
    cdef const float *c0, *c1, *c2, *c3, *c4
    if K > MAXK:
        _horner_generic(val, s.acc, cr, plane, K, nx)
        return
    _coef_rows(p, s.zero, y, &c0, &c1, &c2, &c3, &c4)
    for x in range(nx):
        w = val[x]
        r = (((c4[x] * w + c3[x]) * w + c2[x]) * w + c1[x]) * w + c0[x]
        val[x] = r if r == r else w


# ----------------------------------------------------------------------------------------
# Plan: parameters + per-thread scratch
# ----------------------------------------------------------------------------------------

cdef class Plan:
    """Everything a run needs: validated arrays, tables and per-thread scratch."""

    cdef Params p
    cdef IrisBlockArgs blk
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
                 sat, rn, gain, bias, coef, int nch, off, rowc, rvar, int border, double thr,
                 int do_jump, net, int mode, int fowler_k, int weighted, int threads, dq_bits,
                 dq_or=None):
        """``dq_bits``: the DQ bit values the plan writes, in the order of Params' dq_*
        fields (readout_cy._api.DQFlags: do_not_use, saturated, jump_det, no_gain_value,
        no_lin_corr, no_sat_check, reference_pixel).  ``dq_or``: None or a C-contiguous
        (ny, nx) uint32 map OR'ed into the DQ as each row is written."""
        cdef int nr = t.shape[0]
        cdef int nd = max(nr - 1, 1)
        cdef Params* p = &self.p
        self.nthreads = max(threads, 1)
        memset(p, 0, sizeof(Params))
        bits = tuple(dq_bits)
        if len(bits) != 7:
            raise ValueError(f"Plan: dq_bits must hold 7 DQ bit values, got {len(bits)}")
        (p.dq_do_not_use, p.dq_saturated, p.dq_jump_det, p.dq_no_gain_value, p.dq_no_lin_corr,
         p.dq_no_sat_check, p.dq_reference_pixel) = bits
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
        ctabT = np.ascontiguousarray(ctab.T.astype(np.float32))
        rtab32 = rtab.astype(np.float32)
        ptab32 = ptab.astype(np.float32)
        netarr = np.ascontiguousarray(np.asarray(net, dtype=np.int32).reshape(-1))
        if netarr.shape[0] == 0:
            netarr = np.zeros(2, np.int32)
            p.nnet = 0
        else:
            p.nnet = netarr.shape[0] // 2
        keep = [tt, dt, dt32, inv32, ctabT, rtab32, ptab32, netarr, sat, rn, gain, bias, coef,
                off, rowc, rvar]
        self.keep = keep
        p.t = <const double*>_ptr(tt)
        p.dt = <const double*>_ptr(dt)
        p.dt32 = <const float*>_ptr(dt32)
        p.inv_dt32 = <const float*>_ptr(inv32)
        p.dt_uniform = int(bool(np.all(dt32 == dt32[0])))
        p.tspan32 = <float>(tt[nr - 1] - tt[0])
        p.ctabT = <const float*>_ptr(ctabT)
        p.rtab = <const float*>_ptr(rtab32)
        p.ptab = <const float*>_ptr(ptab32)
        p.net = <const int32_t*>_ptr(netarr)
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
        if rvar is not None:
            p.rvar = <const double*>_ptr(rvar)
        if dq_or is not None:
            keep.append(dq_or)
            p.dq_or = <const uint32_t*>_ptr(dq_or)
        p.border = border
        p.thr2 = <float>(thr * thr)
        p.do_jump = do_jump
        p.mode = mode
        p.fowler_k = fowler_k
        p.weighted = weighted
        if mode == MODE_UTR:
            p.nused_full = nr
        else:
            p.nused_full = 2 * min(fowler_k, nr // 2)
        if mode == MODE_UTR and 2 <= nr <= SEGCACHE_MAX:
            self._segment_cache()
        self.blk.nd = nd
        self.blk.nr = nr
        self.blk.weighted = weighted
        self.blk.uniform = p.dt_uniform
        self.blk.thr2 = p.thr2
        self.blk.nuf = p.nused_full
        self.blk.inv_dt32 = p.inv_dt32
        self.blk.dt32 = p.dt32
        self.blk.ctabT = p.ctabT
        self.blk.rtab = p.rtab
        self.blk.ptab = p.ptab
        self._alloc()

    cdef void _segment_cache(self):
        """Estimators of every segment (a, b) and SNR bucket: no pow() per pixel later."""
        cdef Params* p = &self.p
        cdef int nr = p.nr, pi, a, b, k
        cdef int64_t n = 0, o
        cdef double R = 0.0, P = 0.0
        for a in range(nr):
            for b in range(a + 1, nr):
                n = n + (b - a)
        segC = np.zeros(NPOW * n + 1, np.float32)
        segoff = np.zeros(NPOW * nr * nr, np.int64)
        segR = np.zeros(NPOW * nr * nr, np.float64)
        segP = np.zeros(NPOW * nr * nr, np.float64)
        cbuf = np.zeros(nr + 1, np.float64)
        cseg = np.zeros(nr + 1, np.float64)
        cdef float[::1] cv = segC
        cdef int64_t[::1] ov = segoff
        cdef double[::1] rv = segR, pv = segP, cb = cbuf, cs = cseg
        o = 0
        for pi in range(NPOW):
            for a in range(nr):
                for b in range(a + 1, nr):
                    _coef_utr(p.t, p.dt, a, b, POWERS[pi], &cs[0], &R, &P, &cb[0])
                    ov[(pi * nr + a) * nr + b] = o
                    rv[(pi * nr + a) * nr + b] = R
                    pv[(pi * nr + a) * nr + b] = P
                    for k in range(b - a):
                        cv[o + k] = <float>cs[k]
                    o = o + (b - a)
        self.keep.extend([segC, segoff, segR, segP])
        p.segC = &cv[0]
        p.segoff = &ov[0]
        p.segR = &rv[0]
        p.segP = &pv[0]

    cdef void _alloc(self):
        cdef Py_ssize_t nx = self.p.nx, nd = self.p.nd, nr = self.p.nr, nt = self.nthreads
        cdef Py_ssize_t nrm = self.p.nramps
        cdef int t
        cdef Scratch* s
        f32 = np.zeros((nt, 13, nx), dtype=np.float32)
        big = np.zeros((nt, 2, nd * nx), dtype=np.float32)
        rr = np.zeros((nt, 4, nrm * nx), dtype=np.float32)
        i32 = np.zeros((nt, 5, nx), dtype=np.int32)
        ri32 = np.zeros((nt, 2, nrm * nx), dtype=np.int32)
        ji32 = np.zeros((nt, nd * nx), dtype=np.int32)
        f64 = np.zeros((nt, 2, nr + 1), dtype=np.float64)
        mbuf = np.zeros((nt, nd + 1), dtype=np.float32)
        rn2d = np.zeros((nt, nx), dtype=np.float64)
        self.bufs = (f32, big, rr, i32, ri32, ji32, f64, mbuf, rn2d)
        self.scr = <Scratch*>malloc(nt * sizeof(Scratch))
        for t in range(nt):
            s = &self.scr[t]
            s.prev = <float*>_ptr(f32[t, 0])
            s.S = <float*>_ptr(f32[t, 1])
            s.acc = <float*>_ptr(f32[t, 2])
            s.med = <float*>_ptr(f32[t, 3])
            s.rn2x2 = <float*>_ptr(f32[t, 4])
            s.ig = <float*>_ptr(f32[t, 5])
            s.satb = <float*>_ptr(f32[t, 6])
            s.biasb = <float*>_ptr(f32[t, 7])
            s.rnb = <float*>_ptr(f32[t, 8])
            s.gainb = <float*>_ptr(f32[t, 9])
            s.zero = <float*>_ptr(f32[t, 10])
            s.dummy = <float*>_ptr(f32[t, 11])
            s.val = <float*>_ptr(f32[t, 12])
            s.d = <float*>_ptr(big[t, 0])
            s.q = <float*>_ptr(big[t, 1])
            s.rb = <float*>_ptr(rr[t, 0])
            s.rR = <float*>_ptr(rr[t, 1])
            s.rP = <float*>_ptr(rr[t, 2])
            s.rm = <float*>_ptr(rr[t, 3])
            s.ngood = <int32_t*>_ptr(i32[t, 0])
            s.njump = <int32_t*>_ptr(i32[t, 1])
            s.pidx = <int32_t*>_ptr(i32[t, 2])
            s.linok = <int32_t*>_ptr(i32[t, 3])
            s.fix = <int32_t*>_ptr(i32[t, 4])
            s.rnused = <int32_t*>_ptr(ri32[t, 0])
            s.rflags = <int32_t*>_ptr(ri32[t, 1])
            s.jmp = <int32_t*>_ptr(ji32[t])
            s.cbuf = <double*>_ptr(f64[t, 0])
            s.cseg = <double*>_ptr(f64[t, 1])
            s.mbuf = <float*>_ptr(mbuf[t])
            s.rn2d = <double*>_ptr(rn2d[t])
            s.pf_nmap = 0
            _fill_scalar_rows(&self.p, s)

    cdef void _fit_one(self, Scratch* s, const float* d, Py_ssize_t dk, const int32_t* ng,
                       int r, const float* rnrow, const float* grow, const int32_t* jin,
                       const float* min_) noexcept nogil:
        """Jump test (if on) and fit of ramp r into the per-ramp scratch rows.

        ``jin``/``min_`` are caller-given jumps/rates (standalone fit), else NULL.
        """
        cdef const Params* p = &self.p
        cdef Py_ssize_t nx = p.nx, o = r * nx, x
        cdef int k
        cdef const int32_t* jmp = jin
        cdef const float* med = min_
        cdef int nfix = -1
        if p.do_jump and p.mode == MODE_UTR and p.nr >= 3:
            # the fused register-resident row code when it covers the case (AVX2 builds,
            # 3 <= nd <= 16), else the generic jump test and fit below
            nfix = iris_block_row(&self.blk, nx, d, dk, ng, s.rn2x2, s.ig, rnrow, grow, s.med,
                                  s.jmp, s.njump, s.rb + o, s.rR + o, s.rP + o, s.rm + o,
                                  s.rnused + o, s.rflags + o, s.mbuf, s.fix)
            if nfix < 0:
                _jump_row(p, s, d, dk, ng)
            jmp = s.jmp
            med = s.med
        elif jin != NULL:
            for x in range(nx):
                s.njump[x] = 0
            for k in range(p.nd):
                for x in range(nx):
                    s.njump[x] = s.njump[x] + jin[k * nx + x]
        _fit_row(p, s, d, dk, ng, jmp, s.njump, med, rnrow, grow, s.rb + o, s.rR + o,
                 s.rP + o, s.rm + o, s.rnused + o, s.rflags + o,
                 s.fix if nfix >= 0 else NULL, nfix)

    # ----- batch: raw uint16 -> result, one row at a time --------------------------------

    def run_raw(self, const uint16_t[:, :, :, ::1] reads, float[:, ::1] slope,
                float[:, ::1] vp, float[:, ::1] vr, float[:, ::1] err, uint32_t[:, ::1] dq,
                uint16_t[:, ::1] nused):
        cdef Py_ssize_t y
        cdef int nt = self.nthreads
        with nogil:
            for y in prange(self.p.ny, num_threads=nt, schedule="dynamic", chunksize=4):
                self._raw_row(&reads[0, 0, 0, 0], y, &slope[y, 0], &vp[y, 0], &vr[y, 0],
                              &err[y, 0], &dq[y, 0], &nused[y, 0], y + 1)

    cdef void _raw_row(self, const uint16_t* reads, Py_ssize_t y, float* slope, float* vp,
                       float* vr, float* err, uint32_t* dq, uint16_t* nused,
                       Py_ssize_t ynext) noexcept nogil:
        """Row y of the batch call.  ``ynext``: the row this thread fits next, whose reads
        and maps are prefetched while this row is worked on (none if it is not > y or
        beyond the frame)."""
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
        cdef int k, nmap = 0
        cdef Py_ssize_t nextoff = ynext - y if y < ynext < ny else 0
        if nextoff > 0:
            # the next row's map rows (row ynext), prefetched during the first ramp's reads
            for k in range(p.ncoef):
                if nmap < 8:
                    s.pf_map[nmap] = p.coef + k * p.coef_plane + ynext * nx
                    nmap = nmap + 1
            if p.sat_map and nmap < 8:
                s.pf_map[nmap] = p.sat + ynext * nx
                nmap = nmap + 1
            if p.rn_map and nmap < 8:
                s.pf_map[nmap] = p.rn + ynext * nx
                nmap = nmap + 1
            if p.gain_map and nmap < 8:
                s.pf_map[nmap] = p.gain + ynext * nx
                nmap = nmap + 1
            if p.bias != NULL and p.bias_map and nmap < 8:
                s.pf_map[nmap] = p.bias + ynext * nx
                nmap = nmap + 1
        if p.ncoef > MAXK:
            # (up to MAXK coefficients _ingest_ramp_row sets s.linok piece by piece)
            _linok_row(p.coef + y * nx, p.coef_plane, p.ncoef, nx, s.linok)
        _row_params(p, s, y)
        _rn2_row(p, s, y, rnrow)
        for r in range(p.nramps):
            if p.ncoef <= MAXK:
                # channel by channel over the reads (the maps of the next row are
                # prefetched during the first ramp only)
                s.pf_nmap = nmap if r == 0 else 0
                _ingest_ramp_row(p, s, reads, r, y, satrow, biasrow, nextoff)
            else:
                for x in range(nx):
                    s.ngood[x] = 0
                for i in range(nr):
                    if p.off != NULL:
                        off = p.off + (r * nr + i) * p.nch
                        rowc = p.rowc + (r * nr + i) * ny
                    dout = s.d + (i - 1) * nx if i > 0 else NULL
                    _ingest_row(p, s, reads + ((r * nr + i) * ny + y) * nx, y, i, off, rowc,
                                satrow, biasrow, dout, s.ngood, s.prev)
            self._fit_one(s, s.d, nx, s.ngood, r, rnrow, grow, NULL, NULL)
        s.pf_nmap = 0
        _combine_row(p, s, y, rnrow, grow, satrow, s.linok if p.ncoef > 0 else NULL,
                     slope, vp, vr, err, dq, nused)

    # ----- batch, with clean_flicker's background sums in the row loop --------------------

    def run_raw_flicker(self, const uint16_t[:, :, :, ::1] reads, float[:, ::1] slope,
                        float[:, ::1] vp, float[:, ::1] vr, float[:, ::1] err,
                        uint32_t[:, ::1] dq, uint16_t[:, ::1] nused, uint32_t skip, int fnch,
                        float nsigma, int dilate, int chunk, double[:, ::1] vbg,
                        double[:, ::1] vev, double[:, ::1] ve2, int64_t[:, ::1] cbg,
                        int64_t[:, ::1] cev, int64_t[::1] cuse):
        """run_raw, and flicker_fill + flicker_sums of its result (clean_flicker's background
        sums, same arguments) without reading the frame again.  Returns the fill value.

        1. The rows y = 0 (mod 7), whose every 7th pixel flicker_fill samples: fitted first,
           each row's usable samples gathered while the row is in cache; fill = their median
           (the same selection, hence the same value).
        2. The other rows in chunks of ``chunk`` rows, one chunk per thread at a time: a
           row's sources are judged right after its fit (rows y = 0 mod 7: from the frame)
           and the sums of row y - dilate follow once the sources of its last neighbour row
           are in (its slopes still in L2).
        3. The rows within ``dilate`` of a chunk boundary, whose neighbour rows belong to
           the chunk on the other side: _flicker_block over them (their neighbours'
           sources again: 4 dilate rows per boundary).
        The sums of a row come from the same row functions over the same values as
        flicker_sums on the finished result: bit for bit the same (tested)."""
        cdef Py_ssize_t ny = self.p.ny, nx = self.p.nx, chw, step, R, n7, nc7, j, k, n
        cdef Py_ssize_t ci, y0, y1, lo, hi, a, b
        cdef int nt = self.nthreads, nchunk, tid
        cdef float fill = 0.0
        if fnch < 1 or nx % fnch:
            raise ValueError("run_raw_flicker: nx must be divisible by the flicker channels")
        if dilate < 0 or chunk < 1:
            raise ValueError("run_raw_flicker: dilate must be >= 0 and chunk >= 1")
        for name, arr in (("sums", vbg), ("even sums", vev), ("err^2 sums", ve2),
                          ("counts", cbg), ("even counts", cev)):
            if arr.shape[0] != ny or arr.shape[1] != fnch:
                raise ValueError(f"run_raw_flicker: {name} must be ({ny}, {fnch})")
        if cuse.shape[0] != ny:
            raise ValueError(f"run_raw_flicker: usable counts must be ({ny},)")
        chw = nx // fnch
        step = 4 if chw >= 64 else (2 if chw >= 16 else 1)
        R = 2 * dilate + 1
        n7 = (ny + 6) // 7
        nc7 = (nx + 6) // 7
        fbuf = np.empty(n7 * nc7 + 1, np.float32)
        fcnt = np.zeros(n7, np.intp)
        cdef float[::1] fb = fbuf
        cdef Py_ssize_t[::1] fc = fcnt
        nchunk = <int>((ny + chunk - 1) // chunk)
        # per thread (as flicker_sums): a ring of the source codes of 2 dilate + 1 rows, two
        # row buffers, the median sample and the row with the fill for unusable values
        ring = np.zeros((nt, R, nx), np.uint8)
        rowbuf = np.zeros((nt, nx), np.uint8)
        hbuf = np.zeros((nt, nx), np.uint8)
        scratch = np.zeros((nt, max(chw, 1)), np.float32)
        wrow = np.zeros((nt, nx), np.float32)
        cdef uint8_t[:, :, ::1] rg = ring
        cdef uint8_t[:, ::1] rb = rowbuf
        cdef uint8_t[:, ::1] hb = hbuf
        cdef float[:, ::1] sv = scratch
        cdef float[:, ::1] wv = wrow
        with nogil:
            for j in prange(n7, num_threads=nt, schedule="dynamic", chunksize=4):
                self._raw_row(&reads[0, 0, 0, 0], 7 * j, &slope[7 * j, 0], &vp[7 * j, 0],
                              &vr[7 * j, 0], &err[7 * j, 0], &dq[7 * j, 0], &nused[7 * j, 0],
                              7 * j + 7)
                fc[j] = _fill_gather(&slope[7 * j, 0], &err[7 * j, 0], &dq[7 * j, 0], nx,
                                     skip, &fb[j * nc7])
            # the samples in one run (in place: row j's start j * nc7 >= the run's length)
            n = 0
            for j in range(n7):
                for k in range(fc[j]):
                    fb[n + k] = fb[j * nc7 + k]
                n = n + fc[j]
            if n > 0:
                fill = _median_buf(&fb[0], n)
            for ci in prange(nchunk, num_threads=nt, schedule="dynamic", chunksize=1):
                tid = iris_thread_num()
                y0 = ci * chunk
                y1 = y0 + chunk if y0 + chunk < ny else ny
                self._flicker_chunk(&reads[0, 0, 0, 0], y0, y1, &slope[0, 0], &vp[0, 0],
                                    &vr[0, 0], &err[0, 0], &dq[0, 0], &nused[0, 0], skip,
                                    fnch, step, nsigma, fill, dilate, &rg[tid, 0, 0], R,
                                    &rb[tid, 0], &hb[tid, 0], &sv[tid, 0], &wv[tid, 0],
                                    &vbg[0, 0], &vev[0, 0], &ve2[0, 0], &cbg[0, 0], &cev[0, 0],
                                    &cuse[0])
            # the rows within dilate of a chunk boundary b (its neighbours' rows belong to
            # the chunk on the other side), one range [b - dilate, b + dilate) per boundary,
            # clipped to the frame and to the range before it (chunks shorter than
            # 2 dilate: every row once)
            for ci in prange(nchunk + 1, num_threads=nt, schedule="dynamic", chunksize=1):
                tid = iris_thread_num()
                b = ci * chunk if ci * chunk < ny else ny
                lo = b - dilate if b > dilate else 0
                a = (ci - 1) * chunk + dilate  # the end of the range before (ci >= 1)
                if ci > 0 and a > lo:
                    lo = a
                hi = b + dilate if b + dilate < ny else ny
                if hi > lo:
                    _flicker_block(slope, err, dq, lo, hi, fnch, step, skip, nsigma, fill,
                                   dilate, &rg[tid, 0, 0], R, &rb[tid, 0], &hb[tid, 0],
                                   &sv[tid, 0], &wv[tid, 0], vbg, vev, ve2, cbg, cev, cuse)
        return np.float32(fill)

    cdef void _flicker_chunk(self, const uint16_t* reads, Py_ssize_t y0, Py_ssize_t y1,
                             float* slope, float* vp, float* vr, float* err, uint32_t* dq,
                             uint16_t* nused, uint32_t skip, Py_ssize_t fnch, Py_ssize_t step,
                             float nsigma, float fill, int dilate, uint8_t* ring, Py_ssize_t R,
                             uint8_t* rb, uint8_t* hb, float* buf, float* w, double* vbg,
                             double* vev, double* ve2, int64_t* cbg, int64_t* cev,
                             int64_t* cuse) noexcept nogil:
        """Rows [y0, y1) of run_raw_flicker's second part: fit (rows y != 0 mod 7), sources,
        usable count, and the sums of the rows whose neighbours are all in the chunk."""
        cdef Py_ssize_t ny = self.p.ny, nx = self.p.nx, yy, y, x, o, yn
        cdef int64_t nu
        cdef uint8_t* code
        for yy in range(y0, y1):
            o = yy * nx
            if yy % 7 != 0:
                # prefetch the row fitted next here (across a row 0 mod 7, fitted before)
                yn = yy + 1 if (yy + 1) % 7 else yy + 2
                self._raw_row(reads, yy, slope + o, vp + o, vr + o, err + o, dq + o,
                              nused + o, yn if yn < y1 else -1)
            code = ring + (yy % R) * nx
            # (the next row's slope, err and DQ are prefetched here when it is a row 0 mod 7:
            # fitted before, out of cache)
            _flicker_src_row(slope + o, err + o, dq + o, code, nx, fnch, step, skip, nsigma,
                             fill, buf, w, yy + 1 < y1 and (yy + 1) % 7 == 0)
            nu = 0
            for x in range(0, nx, 4):
                nu = nu + (code[x] >> 1)
            cuse[yy] = nu
            y = yy - dilate
            if y >= y0 + dilate:
                iris_flicker_sums_row(slope + y * nx, err + y * nx, ring, R, y, ny, nx, fnch,
                                      dilate, rb, hb, vbg + y * fnch, vev + y * fnch,
                                      ve2 + y * fnch, cbg + y * fnch, cev + y * fnch)

    # ----- streaming ---------------------------------------------------------------------

    def ingest(self, const uint16_t[:, ::1] frame, int i, int32_t[:, ::1] ngood,
               float[:, ::1] prev, float[:, ::1] dplane, off, rowc):
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
                                       &dplane[y, 0] if i > 0 else NULL, op, rp)

    cdef void _ingest_frame_row(self, const uint16_t* raw, Py_ssize_t y, int i, int32_t* ng,
                                float* prev, float* dout, const double* off,
                                const double* rowc) noexcept nogil:
        cdef const Params* p = &self.p
        cdef Scratch* s = &self.scr[iris_thread_num()]
        cdef Py_ssize_t nx = p.nx
        cdef const float* satrow = _maprow(p.sat, p.sat_map, y, nx, s.satb)
        cdef const float* biasrow = NULL
        if p.bias != NULL:
            biasrow = _maprow(p.bias, p.bias_map, y, nx, s.biasb)
        _ingest_row(p, s, raw, y, i, off, rowc, satrow, biasrow, dout, ng, prev)

    def linok_map(self, int32_t[:, ::1] linok):
        """Per-pixel 'coefficients usable' map (1 everywhere without linearity)."""
        cdef Py_ssize_t y
        if self.p.ncoef == 0:
            linok[:, :] = 1
            return
        for y in range(self.p.ny):
            _linok_row(self.p.coef + y * self.p.nx, self.p.coef_plane, self.p.ncoef,
                       self.p.nx, &linok[y, 0])

    def fit_planes(self, const float[:, :, ::1] dplanes, const int32_t[:, ::1] ngood,
                   float[:, :, ::1] rout, int32_t[:, ::1] rnused, int32_t[:, ::1] rflags):
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
                             float* rout, int32_t* rnused, int32_t* rflags) noexcept nogil:
        cdef const Params* p = &self.p
        cdef Scratch* s = &self.scr[iris_thread_num()]
        cdef Py_ssize_t nx = p.nx, plane = p.ny * p.nx, o = y * nx
        cdef const float* rnrow = _maprow(p.rn, p.rn_map, y, nx, s.rnb)
        cdef const float* grow = _maprow(p.gain, p.gain_map, y, nx, s.gainb)
        _row_params(p, s, y)
        _rn2_row(p, s, y, rnrow)
        self._fit_one(s, d0 + o, plane, ng, 0, rnrow, grow, NULL, NULL)
        memcpy(rout + o, s.rb, nx * sizeof(float))
        memcpy(rout + plane + o, s.rR, nx * sizeof(float))
        memcpy(rout + 2 * plane + o, s.rP, nx * sizeof(float))
        memcpy(rout + 3 * plane + o, s.rm, nx * sizeof(float))
        memcpy(rnused, s.rnused, nx * sizeof(int32_t))
        memcpy(rflags, s.rflags, nx * sizeof(int32_t))

    def combine_planes(self, const float[:, :, :, ::1] rout, const int32_t[:, :, ::1] rnused,
                       const int32_t[:, :, ::1] rflags, const int32_t[:, ::1] linok,
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

    cdef void _combine_plane_row(self, const float* rout, const int32_t* rnu, const int32_t* rfl,
                                 const int32_t* linok, Py_ssize_t y, float* slope, float* vp,
                                 float* vr, float* err, uint32_t* dq,
                                 uint16_t* nused) noexcept nogil:
        cdef const Params* p = &self.p
        cdef Scratch* s = &self.scr[iris_thread_num()]
        cdef Py_ssize_t nx = p.nx, plane = p.ny * p.nx, o = y * nx
        cdef int r
        cdef const float* satrow = _maprow(p.sat, p.sat_map, y, nx, s.satb)
        cdef const float* rnrow = _maprow(p.rn, p.rn_map, y, nx, s.rnb)
        cdef const float* grow = _maprow(p.gain, p.gain_map, y, nx, s.gainb)
        _rn2_row(p, s, y, rnrow)
        for r in range(p.nramps):
            memcpy(s.rb + r * nx, rout + (4 * r) * plane + o, nx * sizeof(float))
            memcpy(s.rR + r * nx, rout + (4 * r + 1) * plane + o, nx * sizeof(float))
            memcpy(s.rP + r * nx, rout + (4 * r + 2) * plane + o, nx * sizeof(float))
            memcpy(s.rm + r * nx, rout + (4 * r + 3) * plane + o, nx * sizeof(float))
            memcpy(s.rnused + r * nx, rnu + r * plane + o, nx * sizeof(int32_t))
            memcpy(s.rflags + r * nx, rfl + r * plane + o, nx * sizeof(int32_t))
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
        cdef Py_ssize_t nx = p.nx, ny = p.ny, x, x0, o, chw = p.chw
        cdef int r, i, c
        cdef float f
        for r in range(p.nramps):
            for i in range(p.nr):
                o = ((r * p.nr + i) * ny + y) * nx
                for c in range(p.nch):
                    f = <float>(p.off[(r * p.nr + i) * p.nch + c] + p.rowc[(r * p.nr + i) * ny + y])
                    x0 = c * chw
                    for x in range(x0, x0 + chw):
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
        cdef int32_t n
        cdef uint32_t sat = p.dq_saturated, dnu = p.dq_do_not_use, nosat = p.dq_no_sat_check
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
                    n = s.ngood[x]
                    s.ngood[x] = n + ((n == i) & ((v < sv) | (sv != sv)))
            for x in range(nx):
                ngo[(r * ny + y) * nx + x] = <uint16_t>s.ngood[x]
                if s.ngood[x] < p.nr:
                    dq[x] = dq[x] | sat
                if s.ngood[x] < 2:
                    dq[x] = dq[x] | dnu
                if not (satrow[x] == satrow[x]):
                    dq[x] = dq[x] | nosat

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
        cdef uint32_t nolin = p.dq_no_lin_corr
        _linok_row(p.coef + y * nx, p.coef_plane, p.ncoef, nx, s.linok)
        for x in range(nx):
            dq[x] = 0 if s.linok[x] else nolin
        for k in range(npl):
            o = (k * p.ny + y) * nx
            memcpy(s.val, data + o, nx * sizeof(float))
            _lin_apply_row(p, s, s.val, y)
            memcpy(out + o, s.val, nx * sizeof(float))

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

    def run_jumps(self, const float[:, :, :, ::1] data, const uint16_t[:, :, ::1] ngood,
                  uint8_t[:, :, :, ::1] jumps, float[:, :, ::1] med):
        """Jump detection only, on corrected float32 reads (nramps, nr, ny, nx)."""
        cdef Py_ssize_t y
        cdef int nt = self.nthreads
        with nogil:
            for y in prange(self.p.ny, num_threads=nt, schedule="dynamic", chunksize=4):
                self._jump_only_row(&data[0, 0, 0, 0], &ngood[0, 0, 0], &jumps[0, 0, 0, 0],
                                    &med[0, 0, 0], y)

    cdef void _jump_only_row(self, const float* data, const uint16_t* ngood, uint8_t* jumps,
                             float* med, Py_ssize_t y) noexcept nogil:
        cdef const Params* p = &self.p
        cdef Scratch* s = &self.scr[iris_thread_num()]
        cdef Py_ssize_t nx = p.nx, ny = p.ny, x, o
        cdef int r, k
        _row_params(p, s, y)
        for r in range(p.nramps):
            self._diffs_from_reads(s, data, r, y)
            for x in range(nx):
                s.ngood[x] = ngood[(r * ny + y) * nx + x]
            _jump_row(p, s, s.d, nx, s.ngood)
            for k in range(p.nr - 1):
                o = ((r * (p.nr - 1) + k) * ny + y) * nx
                for x in range(nx):
                    jumps[o + x] = <uint8_t>s.jmp[k * nx + x]
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
        cdef Py_ssize_t nx = p.nx, ny = p.ny, x, o
        cdef int r, k, nd = p.nr - 1
        cdef const float* rnrow = _maprow(p.rn, p.rn_map, y, nx, s.rnb)
        cdef const float* grow = _maprow(p.gain, p.gain_map, y, nx, s.gainb)
        cdef const int32_t* jrow = NULL
        cdef const float* mrow = NULL
        _rn2_row(p, s, y, rnrow)
        for r in range(p.nramps):
            if nd > 0:
                self._diffs_from_reads(s, data, r, y)
            for x in range(nx):
                s.ngood[x] = ngood[(r * ny + y) * nx + x]
            jrow = NULL
            if jp != NULL and nd > 0:
                for k in range(nd):
                    o = ((r * nd + k) * ny + y) * nx
                    for x in range(nx):
                        s.jmp[k * nx + x] = jp[o + x]
                jrow = s.jmp
            mrow = NULL
            if mp != NULL:
                mrow = mp + (r * ny + y) * nx
            self._fit_one(s, s.d, nx, s.ngood, r, rnrow, grow, jrow, mrow)
        # no saturation map here: use the (finite) scalar fill row so no NO_SAT_CHECK is set
        _combine_row(p, s, y, rnrow, grow, s.satb, NULL, slope, vp, vr, err, dq, nused)


def has_flag_block(const uint32_t[:, ::1] dq, uint32_t bit):
    """True if some 2x2 block of pixels all carry ``bit`` in ``dq`` (e.g. JUMP_DET: a large
    cosmic-ray event's core).  One pass over pairs of rows, stopping at the first block; no
    temporary arrays (a numpy version costs several passes over the frame)."""
    cdef Py_ssize_t ny = dq.shape[0], nx = dq.shape[1], y, x
    cdef uint32_t acc = 0
    cdef const uint32_t* a
    cdef const uint32_t* b
    if ny < 2 or nx < 2:
        return False
    with nogil:
        for y in range(ny - 1):
            a = &dq[y, 0]
            b = &dq[y + 1, 0]
            # a branch-free OR over the row (vectorised), tested once per row
            for x in range(nx - 1):
                acc = acc | (a[x] & a[x + 1] & b[x] & b[x + 1])
            if acc & bit:
                break
    return bool(acc & bit)


# ----------------------------------------------------------------------------------------
# 1/f stripes and ACN on a slope image (iris_tasks.steps.readout.clean_flicker)
# ----------------------------------------------------------------------------------------

cdef float _kth(float* a, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """k-th smallest of a[0..n) (Hoare's selection; reorders a)."""
    cdef Py_ssize_t lo = 0, hi = n - 1, i, j
    cdef float pivot, tmp
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i = lo
        j = hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                tmp = a[i]
                a[i] = a[j]
                a[j] = tmp
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


cdef float _median_buf(float* a, Py_ssize_t n) noexcept nogil:
    """numpy's median of a[0..n) (mean of the two middle values for even n; reorders a)."""
    cdef float lo_v, hi_v
    cdef Py_ssize_t i
    if n % 2:
        return _kth(a, n, n // 2)
    hi_v = _kth(a, n, n // 2)
    # the largest of the lower half, which the selection left below position n // 2
    lo_v = a[0]
    for i in range(1, n // 2):
        if a[i] > lo_v:
            lo_v = a[i]
    return (lo_v + hi_v) / 2.0


cdef void _flicker_src_row(const float* sl, const float* er, const uint32_t* dqr,
                           uint8_t* src, Py_ssize_t nx, Py_ssize_t nch, Py_ssize_t step,
                           uint32_t skip, float nsigma, float fill,
                           float* buf, float* w, int pf) noexcept nogil:
    """Sources of one row: (value - median of the row and channel) > nsigma * err, unusable
    values counted as ``fill`` (the median over every ``step``-th pixel). Usable = finite
    (v - v == 0: false for NaN and +-inf, as numpy's isfinite in the twin), no ``skip`` bit,
    err > 0.  src[x]: bit 0 source, bit 1 usable.  ``w``: nx floats of scratch (the row
    with ``fill`` for the unusable values), ``buf``: the channel's sample.  ``pf``: prefetch
    the next row (the one after ``sl``) channel by channel, while this row is judged."""
    cdef Py_ssize_t x, c, x0, n, chw = nx // nch
    cdef float v, med
    cdef uint8_t usable
    for x in range(nx):  # usable test and stand-in values for the whole row (vectorised)
        v = sl[x]
        usable = (v - v == 0) & ((dqr[x] & skip) == 0) & (er[x] > 0)
        w[x] = v if usable else fill
        src[x] = usable << 1
    for c in range(nch):
        x0 = c * chw
        if pf:
            iris_prefetch(sl + nx + x0, chw * sizeof(float))
            iris_prefetch(er + nx + x0, chw * sizeof(float))
            iris_prefetch(dqr + nx + x0, chw * sizeof(uint32_t))
        n = 0
        x = x0
        while x < x0 + chw:  # every step-th pixel (a strided loop: no division per pixel)
            buf[n] = w[x]
            n = n + 1
            x = x + step
        med = iris_median_rank(buf, n) if n <= 64 else _median_buf(buf, n)
        for x in range(x0, x0 + chw):
            src[x] = src[x] | ((w[x] - med) > nsigma * er[x])


cdef Py_ssize_t _fill_gather(const float* sl, const float* er, const uint32_t* dqr,
                             Py_ssize_t nx, uint32_t skip, float* out) noexcept nogil:
    """flicker_fill's sample of one row: the usable values of every 7th column, in order,
    into ``out``; returns how many."""
    cdef Py_ssize_t x, n = 0
    cdef float v
    for x in range(0, nx, 7):
        v = sl[x]
        if (v - v == 0) and (dqr[x] & skip) == 0 and er[x] > 0:
            out[n] = v
            n = n + 1
    return n


def flicker_fill(const float[:, ::1] slope, const float[:, ::1] err,
                 const uint32_t[:, ::1] dq, uint32_t skip):
    """Stand-in value of unusable pixels in clean_flicker's first-guess medians: numpy's
    median of the usable pixels of every 7th row and column (0 if none), by selection.
    Twin: readout_cy._api._flicker_fill (numpy)."""
    cdef Py_ssize_t ny = slope.shape[0], nx = slope.shape[1], y, x, n = 0
    cdef float v
    buf_arr = np.empty(((ny + 6) // 7) * ((nx + 6) // 7) + 1, np.float32)
    cdef float[::1] buf = buf_arr
    with nogil:
        for y in range(0, ny, 7):
            for x in range(0, nx, 7):
                v = slope[y, x]
                if (v - v == 0) and (dq[y, x] & skip) == 0 and err[y, x] > 0:
                    buf[n] = v
                    n = n + 1
        if n > 0:
            v = _median_buf(&buf[0], n)
    return np.float32(v) if n > 0 else np.float32(0.0)


def flicker_sums(const float[:, ::1] slope, const float[:, ::1] err, const uint32_t[:, ::1] dq,
                 uint32_t skip, int nch, float nsigma, int dilate, float fill, int threads):
    """Background sums per (row, channel) of a slope image, for clean_flicker.

    A pixel is usable if its slope is finite, it has none of the ``skip`` DQ bits and
    err > 0; unusable values count as ``fill`` for the first-guess median of each (row,
    channel) (over every 4th pixel of channels 64 or more columns wide, every other one from
    16 columns); a pixel is
    a source if (value - median) > nsigma * err; sources are dilated by a
    (2 dilate + 1)^2 square; background = usable and not (dilated) source.  Returns float64
    (ny, nch) sums of the background slopes, of those in even columns (within the channel)
    and of err^2, int64 counts of the background and of its even-column pixels, and int64
    (ny,) counts of the usable pixels of each row in every 4th column.  One pass over the
    rows per thread (sources of row y + dilate, then the sums of row y).
    Twin: readout_cy.reference.flicker_sums (numpy).
    """
    cdef Py_ssize_t ny = slope.shape[0], nx = slope.shape[1], chw = nx // nch
    cdef Py_ssize_t step, R
    cdef int nt = max(min(threads, ny), 1), t
    s_bg = np.zeros((ny, nch), np.float64)
    s_ev = np.zeros((ny, nch), np.float64)
    s_e2 = np.zeros((ny, nch), np.float64)
    n_bg = np.zeros((ny, nch), np.int64)
    n_ev = np.zeros((ny, nch), np.int64)
    n_use = np.zeros(ny, np.int64)
    cdef double[:, ::1] vbg = s_bg, vev = s_ev, ve2 = s_e2
    cdef int64_t[:, ::1] cbg = n_bg, cev = n_ev
    cdef int64_t[::1] cuse = n_use
    if nx % nch:
        raise ValueError("flicker_sums: nx must be divisible by nch")
    if dilate < 0:
        raise ValueError("flicker_sums: dilate must be >= 0")
    R = 2 * dilate + 1
    # per thread: a ring of the source codes of 2 dilate + 1 rows, two row buffers and
    # the median sample
    ring = np.zeros((nt, R, nx), np.uint8)
    rowbuf = np.zeros((nt, nx), np.uint8)
    hbuf = np.zeros((nt, nx), np.uint8)
    scratch = np.zeros((nt, max(chw, 1)), np.float32)
    wrow = np.zeros((nt, nx), np.float32)
    cdef float[:, ::1] wv = wrow
    cdef uint8_t[:, :, ::1] rg = ring
    cdef uint8_t[:, ::1] rb = rowbuf
    cdef uint8_t[:, ::1] hb = hbuf
    cdef float[:, ::1] sv = scratch
    step = 4 if chw >= 64 else (2 if chw >= 16 else 1)
    with nogil:
        # one block of rows per thread, in one pass: the sources of row y + dilate, then the
        # sums of row y while its slopes are still in cache; a block's first and last
        # dilate rows take the sources of their neighbours' rows too (computed twice)
        for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
            _flicker_block(slope, err, dq, t * ny // nt, (t + 1) * ny // nt, nch, step, skip,
                           nsigma, fill, dilate, &rg[t, 0, 0], R, &rb[t, 0], &hb[t, 0],
                           &sv[t, 0], &wv[t, 0], vbg, vev, ve2, cbg, cev, cuse)
    return s_bg, s_ev, s_e2, n_bg, n_ev, n_use


cdef void _flicker_block(const float[:, ::1] slope, const float[:, ::1] err,
                         const uint32_t[:, ::1] dq, Py_ssize_t y0, Py_ssize_t y1,
                         Py_ssize_t nch, Py_ssize_t step, uint32_t skip, float nsigma,
                         float fill, int dilate, uint8_t* ring, Py_ssize_t R, uint8_t* rb,
                         uint8_t* hb, float* buf, float* w, double[:, ::1] vbg,
                         double[:, ::1] vev,
                         double[:, ::1] ve2, int64_t[:, ::1] cbg,
                         int64_t[:, ::1] cev, int64_t[::1] cuse) noexcept nogil:
    """flicker_sums for rows [y0, y1): sources into the ring (row yy in slot yy % R), the
    sums of row yy - dilate once the sources of its last neighbour row are in; cuse[yy]:
    usable pixels of row yy in every 4th column."""
    cdef Py_ssize_t ny = slope.shape[0], nx = slope.shape[1], yy, y, yend, x
    cdef int64_t nu
    cdef uint8_t* code
    yend = y1 + dilate if y1 + dilate < ny else ny
    for yy in range(y0 - dilate if y0 > dilate else 0, yend):
        _flicker_src_row(&slope[yy, 0], &err[yy, 0], &dq[yy, 0], ring + (yy % R) * nx, nx,
                         nch, step, skip, nsigma, fill, buf, w, yy + 1 < yend)
        if yy >= y0 and yy < y1:
            code = ring + (yy % R) * nx
            nu = 0
            for x in range(0, nx, 4):
                nu = nu + (code[x] >> 1)
            cuse[yy] = nu
        y = yy - dilate
        if y >= y0:
            iris_flicker_sums_row(&slope[y, 0], &err[y, 0], ring, R, y, ny, nx, nch, dilate,
                                  rb, hb, &vbg[y, 0], &vev[y, 0], &ve2[y, 0], &cbg[y, 0],
                                  &cev[y, 0])
    # the image's last rows: no row y + dilate to wait for
    for y in range(yend - dilate if yend - dilate > y0 else y0, y1):
        iris_flicker_sums_row(&slope[y, 0], &err[y, 0], ring, R, y, ny, nx, nch, dilate,
                              rb, hb, &vbg[y, 0], &vev[y, 0], &ve2[y, 0], &cbg[y, 0],
                              &cev[y, 0])


def flicker_apply(float[:, ::1] slope, var_rnoise, const float[:, ::1] stripes, acn, add,
                  var_poisson, err_out, int threads):
    """slope -= stripes[y, c] (then - acn[y, c] on even, + on odd columns of the channel);
    var_rnoise += add[y, c] where the new slope is not NaN; err_out = sqrt(var_rnoise +
    var_poisson) if given.  One pass (clean_flicker)."""
    cdef Py_ssize_t ny = slope.shape[0], nx = slope.shape[1], nch = stripes.shape[1]
    cdef Py_ssize_t chw = nx // nch, y
    cdef const float[:, ::1] av
    cdef const float[:, ::1] dv
    cdef const float[:, ::1] pv
    cdef float[:, ::1] vv
    cdef float[:, ::1] ev
    cdef int has_acn = acn is not None, has_var = var_rnoise is not None
    cdef int has_err = err_out is not None, nt = max(threads, 1), tid
    sgn_arr = np.zeros((nt, max(chw, 1)), np.float32)
    cdef float[:, ::1] sgn = sgn_arr
    if has_acn:
        av = acn
    if has_var:
        vv = var_rnoise
        dv = add
        if has_err:
            pv = var_poisson
            ev = err_out
    elif has_err:
        raise ValueError("flicker_apply: err_out needs var_rnoise")
    with nogil:
        for y in prange(ny, num_threads=nt, schedule="static"):
            tid = iris_thread_num()
            iris_flicker_apply_row(&slope[y, 0], &vv[y, 0] if has_var else NULL,
                                   &pv[y, 0] if has_err else NULL,
                                   &ev[y, 0] if has_err else NULL, &stripes[y, 0],
                                   &av[y, 0] if has_acn else NULL,
                                   &dv[y, 0] if has_var else NULL, nx, nch, &sgn[tid, 0],
                                   y + 1 < ny)
