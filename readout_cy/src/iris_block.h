/* readout_cy/src/iris_block.h -- fused jump test + clean-pixel fit of one row on AVX2.

   8 pixels per AVX2 vector with all of a pixel's differences in registers (UTR with jump
   detection, equal read intervals, 3 <= nd <= IRIS_BLOCK_MAXND).  Same float32 operations,
   in the same order, as _jump_row + the vectorised part of _fit_row; only the median comes
   from a different (fully unrolled, register-resident) network, and the median of a column
   is the same value whichever network selects it.  Pixels with fewer usable differences get
   the scalar median (iris_median_scalar), as in _jump_row.  Returns -1 when the case is not
   covered (the caller then runs the generic row code), else the number of pixels listed in
   fix[] that still need the scalar per-segment fit.

   Without AVX2 iris_block_row always returns -1 (generic row code only). */

#ifndef IRIS_BLOCK_H
#define IRIS_BLOCK_H

#include "iris_common.h"
#include "iris_median.h"

#define IRIS_BLOCK_MAXND 16

typedef struct {
    int nd, nr, weighted, uniform;
    float thr2;
    int32_t nuf;
    const float* inv_dt32;
    const float* dt32;
    const float* ctabT;   /* (nd, 6) */
    const float* rtab;    /* (6,) */
    const float* ptab;    /* (6,) */
} IrisBlockArgs;

#if defined(__AVX2__)
#include <immintrin.h>

/* 8 pixels; d: nd rows of stride dk; jmp: nd rows of stride js; everything else 8-wide */
static inline __attribute__((always_inline)) int iris_block8(
        const int N, const IrisBlockArgs* A, const __m256* ctab8, __m256 rtab8, __m256 ptab8,
        const float* d, Py_ssize_t dk, const int32_t* ng, const float* r2, const float* ig,
        const float* rn, const float* g, float* med, int32_t* jmp, Py_ssize_t js,
        int32_t* nj, float* ob, float* oR, float* oP, float* om, int32_t* onu,
        int32_t* ofl, float* mbuf) {
    __m256 q[IRIS_BLOCK_MAXND], dv[IRIS_BLOCK_MAXND];
    __m256 m, lo, hi, S, s2, thr, e, acc, den, snr, dtk, zero = _mm256_setzero_ps();
    __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256i ngv = _mm256_loadu_si256((const __m256i*)ng);
    __m256i one = _mm256_set1_epi32(1), njv = _mm256_setzero_si256(), nu, pv, fl, pidx;
    __m256i part;
    int k, r, i, lane, pmask, need;
    #pragma GCC unroll 16
    for (k = 0; k < N; k++) {
        dv[k] = _mm256_loadu_ps(d + k * dk);
        q[k] = _mm256_mul_ps(dv[k], _mm256_set1_ps(A->inv_dt32[k]));
    }
    /* odd-even transposition sort; GCC drops the comparator halves the median does
       not depend on */
    #pragma GCC unroll 16
    for (r = 0; r < N; r++) {
        #pragma GCC unroll 16
        for (i = r & 1; i + 1 < N; i += 2) {
            lo = _mm256_min_ps(q[i], q[i + 1]);
            hi = _mm256_max_ps(q[i], q[i + 1]);
            q[i] = lo;
            q[i + 1] = hi;
        }
    }
    if (N % 2)
        m = q[N / 2];
    else
        m = _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_add_ps(q[N / 2 - 1], q[N / 2]));
    part = _mm256_xor_si256(_mm256_cmpeq_epi32(ngv, _mm256_set1_epi32(A->nr)),
                            _mm256_set1_epi32(-1));
    pmask = _mm256_movemask_ps(_mm256_castsi256_ps(part));
    if (pmask) {
        _mm256_storeu_ps(med, m);
        for (lane = 0; lane < 8; lane++)
            if (pmask & (1 << lane))
                med[lane] = iris_median_scalar(d + lane, dk, ng[lane] - 1, A->inv_dt32, mbuf);
        m = _mm256_loadu_ps(med);
    } else {
        _mm256_storeu_ps(med, m);
    }
    /* jump test: flag (k < ng-1) & (ng >= 3) & (s2 > 0) & (e^2 > thr^2 s2), with equal
       read intervals (m dt and thr^2 s2 once per pixel, as in _jump_row).  The flags are
       only needed by the scalar fit, so they are stored only for blocks that have a
       pixel for it (saturated or with a jump); a first pass just looks for jumps in the
       full-ramp pixels, for which k < ng-1 and ng >= 3 always hold. */
    dtk = _mm256_set1_ps(A->dt32[0]);
    s2 = _mm256_add_ps(_mm256_loadu_ps(r2),
                       _mm256_mul_ps(_mm256_mul_ps(_mm256_and_ps(m, absmask), dtk),
                                     _mm256_loadu_ps(ig)));
    S = _mm256_mul_ps(m, dtk);
    thr = _mm256_mul_ps(_mm256_set1_ps(A->thr2), s2);
    pv = _mm256_castps_si256(_mm256_cmp_ps(s2, zero, _CMP_GT_OQ));
    #pragma GCC unroll 16
    for (k = 0; k < N; k++) {
        e = _mm256_sub_ps(dv[k], S);
        njv = _mm256_sub_epi32(njv, _mm256_castps_si256(
                _mm256_cmp_ps(_mm256_mul_ps(e, e), thr, _CMP_GT_OQ)));
    }
    njv = _mm256_and_si256(njv, pv);
    part = _mm256_or_si256(part, _mm256_cmpgt_epi32(njv, _mm256_setzero_si256()));
    need = _mm256_movemask_ps(_mm256_castsi256_ps(part));
    njv = _mm256_setzero_si256();
    if (need) {
        nu = _mm256_sub_epi32(ngv, one);
        pv = _mm256_and_si256(pv, _mm256_cmpgt_epi32(ngv, _mm256_set1_epi32(2)));
        for (k = 0; k < N; k++) {
            e = _mm256_sub_ps(dv[k], S);
            fl = _mm256_and_si256(_mm256_cmpgt_epi32(nu, _mm256_set1_epi32(k)), pv);
            fl = _mm256_and_si256(fl, _mm256_castps_si256(
                    _mm256_cmp_ps(_mm256_mul_ps(e, e), thr, _CMP_GT_OQ)));
            fl = _mm256_and_si256(fl, one);
            _mm256_storeu_si256((__m256i*)(jmp + k * js), fl);
            njv = _mm256_add_epi32(njv, fl);
        }
    }
    _mm256_storeu_si256((__m256i*)nj, njv);
    /* clean-pixel fit: full-ramp estimator of the pixel's SNR bucket */
    S = zero;
    #pragma GCC unroll 16
    for (k = 0; k < N; k++)
        S = _mm256_add_ps(S, dv[k]);
    pidx = _mm256_setzero_si256();
    if (A->weighted) {
        __m256 rnv = _mm256_loadu_ps(rn), gv = _mm256_loadu_ps(g);
        __m256 dg = _mm256_mul_ps(S, gv);
        den = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(rnv, rnv), gv), gv), dg);
        snr = _mm256_div_ps(dg, _mm256_sqrt_ps(den));
        pidx = _mm256_sub_epi32(pidx, _mm256_castps_si256(_mm256_cmp_ps(snr, _mm256_set1_ps(5.0f), _CMP_GE_OQ)));
        pidx = _mm256_sub_epi32(pidx, _mm256_castps_si256(_mm256_cmp_ps(snr, _mm256_set1_ps(10.0f), _CMP_GE_OQ)));
        pidx = _mm256_sub_epi32(pidx, _mm256_castps_si256(_mm256_cmp_ps(snr, _mm256_set1_ps(20.0f), _CMP_GE_OQ)));
        pidx = _mm256_sub_epi32(pidx, _mm256_castps_si256(_mm256_cmp_ps(snr, _mm256_set1_ps(50.0f), _CMP_GE_OQ)));
        pidx = _mm256_sub_epi32(pidx, _mm256_castps_si256(_mm256_cmp_ps(snr, _mm256_set1_ps(100.0f), _CMP_GE_OQ)));
    }
    acc = zero;
    #pragma GCC unroll 16
    for (k = 0; k < N; k++)
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_permutevar8x32_ps(ctab8[k], pidx), dv[k]));
    _mm256_storeu_ps(ob, acc);
    _mm256_storeu_ps(oR, _mm256_permutevar8x32_ps(rtab8, pidx));
    _mm256_storeu_ps(oP, _mm256_permutevar8x32_ps(ptab8, pidx));
    _mm256_storeu_ps(om, m);
    _mm256_storeu_si256((__m256i*)onu, _mm256_set1_epi32(A->nuf));
    _mm256_storeu_si256((__m256i*)ofl, _mm256_setzero_si256());
    /* lanes that need the scalar per-segment fit: saturated or with a jump */
    return need;
}

static inline __attribute__((always_inline)) int iris_block_row_n(
        const int N, const IrisBlockArgs* A, Py_ssize_t nx, const float* d, Py_ssize_t dk,
        const int32_t* ng, const float* r2, const float* ig, const float* rn,
        const float* g, float* med, int32_t* jmp, int32_t* nj, float* ob, float* oR,
        float* oP, float* om, int32_t* onu, int32_t* ofl, float* mbuf, int32_t* fix) {
    __m256 ctab8[IRIS_BLOCK_MAXND];
    __m256 rtab8, ptab8;
    const float* c;
    Py_ssize_t x, nt, j;
    int k, nfix = 0, need;
    for (k = 0; k < N; k++) {
        c = A->ctabT + k * 6;
        ctab8[k] = _mm256_setr_ps(c[0], c[1], c[2], c[3], c[4], c[5], 0.0f, 0.0f);
    }
    c = A->rtab;
    rtab8 = _mm256_setr_ps(c[0], c[1], c[2], c[3], c[4], c[5], 0.0f, 0.0f);
    c = A->ptab;
    ptab8 = _mm256_setr_ps(c[0], c[1], c[2], c[3], c[4], c[5], 0.0f, 0.0f);
    for (x = 0; x + 8 <= nx; x += 8) {
        need = iris_block8(N, A, ctab8, rtab8, ptab8, d + x, dk, ng + x, r2 + x, ig + x,
                           rn + x, g + x, med + x, jmp + x, nx, nj + x, ob + x, oR + x,
                           oP + x, om + x, onu + x, ofl + x, mbuf);
        while (need) {
            fix[nfix++] = (int32_t)(x + __builtin_ctz(need));
            need &= need - 1;
        }
    }
    nt = nx - x;
    if (nt > 0) {
        /* the last < 8 pixels through padded local copies (pads: full, harmless values) */
        float ld[IRIS_BLOCK_MAXND * 8], lr2[8], lig[8], lrn[8], lg[8], lmed[8];
        float lob[8], loR[8], loP[8], lom[8];
        int32_t lng[8], ljmp[IRIS_BLOCK_MAXND * 8], lnj[8], lonu[8], lofl[8];
        for (j = 0; j < 8; j++) {
            int in = j < nt;
            for (k = 0; k < N; k++)
                ld[k * 8 + j] = in ? d[k * dk + x + j] : 0.0f;
            lng[j] = in ? ng[x + j] : A->nr;
            lr2[j] = in ? r2[x + j] : 1.0f;
            lig[j] = in ? ig[x + j] : 1.0f;
            lrn[j] = in ? rn[x + j] : 1.0f;
            lg[j] = in ? g[x + j] : 1.0f;
        }
        need = iris_block8(N, A, ctab8, rtab8, ptab8, ld, 8, lng, lr2, lig, lrn, lg, lmed,
                           ljmp, 8, lnj, lob, loR, loP, lom, lonu, lofl, mbuf);
        need &= (1 << nt) - 1;
        while (need) {
            fix[nfix++] = (int32_t)(x + __builtin_ctz(need));
            need &= need - 1;
        }
        for (j = 0; j < nt; j++) {
            med[x + j] = lmed[j];
            for (k = 0; k < N; k++)
                jmp[k * nx + x + j] = ljmp[k * 8 + j];
            nj[x + j] = lnj[j];
            ob[x + j] = lob[j];
            oR[x + j] = loR[j];
            oP[x + j] = loP[j];
            om[x + j] = lom[j];
            onu[x + j] = lonu[j];
            ofl[x + j] = lofl[j];
        }
    }
    return nfix;
}

#define IRIS_BLOCK_CASE(n) case n: return iris_block_row_n(n, A, nx, d, dk, ng, r2, ig, rn, g, \
    med, jmp, nj, ob, oR, oP, om, onu, ofl, mbuf, fix);

static int iris_block_row(const IrisBlockArgs* A, Py_ssize_t nx, const float* d,
        Py_ssize_t dk, const int32_t* ng, const float* r2, const float* ig,
        const float* rn, const float* g, float* med, int32_t* jmp, int32_t* nj,
        float* ob, float* oR, float* oP, float* om, int32_t* onu, int32_t* ofl,
        float* mbuf, int32_t* fix) {
    if (!A->uniform)
        return -1;
    switch (A->nd) {
        IRIS_BLOCK_CASE(3) IRIS_BLOCK_CASE(4) IRIS_BLOCK_CASE(5) IRIS_BLOCK_CASE(6)
        IRIS_BLOCK_CASE(7) IRIS_BLOCK_CASE(8) IRIS_BLOCK_CASE(9) IRIS_BLOCK_CASE(10)
        IRIS_BLOCK_CASE(11) IRIS_BLOCK_CASE(12) IRIS_BLOCK_CASE(13) IRIS_BLOCK_CASE(14)
        IRIS_BLOCK_CASE(15) IRIS_BLOCK_CASE(16)
        default: return -1;
    }
}
#else
static int iris_block_row(const IrisBlockArgs* A, Py_ssize_t nx, const float* d,
        Py_ssize_t dk, const int32_t* ng, const float* r2, const float* ig,
        const float* rn, const float* g, float* med, int32_t* jmp, int32_t* nj,
        float* ob, float* oR, float* oP, float* om, int32_t* onu, int32_t* ofl,
        float* mbuf, int32_t* fix) {
    return -1;
}
#endif

#endif  /* IRIS_BLOCK_H */
