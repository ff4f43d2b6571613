/* readout_cy/src/iris_flicker.h -- the per-row loops of clean_flicker's kernels.

   iris_flicker_sums_row: background sums of one row per output channel.  The row's
   "code" bytes come from the source pass (bit 0: source, bit 1: usable); the sources of
   rows y-dilate..y+dilate (held in a ring of 2 dilate + 1 rows) are OR-ed and widened by
   +-dilate columns, and background = usable and no source within reach.  The sums run 8
   pixels at a time into 8 float64 lane accumulators (AVX2: two 4-double vectors; without
   AVX2 the same 8 lanes in scalar code, so both builds give the same values), reduced at
   the end of the channel; masked lanes add +0.0, which leaves a float64 sum unchanged.
   The order differs from numpy's pairwise sums: the twin agrees to rounding (~1e-16
   relative).

   iris_flicker_apply_row: slope -= stripe (then -acn on even, +acn on odd columns of the
   channel), var_rnoise += add where the new slope is not NaN, and err = sqrt(var_rnoise +
   var_poisson) if asked, in one loop per channel.  (v - s) - (-a) is (v - s) + a exactly,
   so the signed acn of a column gives the twin's values bit for bit. */

#ifndef IRIS_FLICKER_H
#define IRIS_FLICKER_H

#include "iris_common.h"
#include "iris_ingest.h"  /* iris_prefetch */
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* numpy's median of a[0..n), n <= 64, by ranks: the k-th smallest value is the largest
   a[i] with #(a < a[i]) <= k (every value up to the k-th smallest has at most k values
   below it, every larger one more).  n^2 branch-free comparisons counted for all i at
   once (GCC vectorises over i), one count per value instead of the two (< and <=) of a
   rank test for ties; the same value. */
#if defined(__AVX2__)
/* the same for n = 32 (the usual sample: 128-column channels, every 4th pixel) with the
   32 values and their counts in 8 AVX2 registers */
static float iris_median_rank32(const float* restrict a) {
    __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
    __m256 a2 = _mm256_loadu_ps(a + 16), a3 = _mm256_loadu_ps(a + 24), b, ninf, lo, hi;
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, k;
    float l8[8], h8[8], l, h;
    int j;
    for (j = 0; j < 32; j++) {
        b = _mm256_broadcast_ss(a + j);
        c0 = _mm256_sub_epi32(c0, _mm256_castps_si256(_mm256_cmp_ps(b, a0, _CMP_LT_OQ)));
        c1 = _mm256_sub_epi32(c1, _mm256_castps_si256(_mm256_cmp_ps(b, a1, _CMP_LT_OQ)));
        c2 = _mm256_sub_epi32(c2, _mm256_castps_si256(_mm256_cmp_ps(b, a2, _CMP_LT_OQ)));
        c3 = _mm256_sub_epi32(c3, _mm256_castps_si256(_mm256_cmp_ps(b, a3, _CMP_LT_OQ)));
    }
    ninf = _mm256_set1_ps(-INFINITY);
    /* values with count <= 15 (count < 16), <= 16 (count < 17): their maxima */
    k = _mm256_set1_epi32(16);
#define IRIS_SEL(a_, c_) _mm256_blendv_ps(ninf, a_, _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, c_)))
    lo = _mm256_max_ps(_mm256_max_ps(IRIS_SEL(a0, c0), IRIS_SEL(a1, c1)),
                       _mm256_max_ps(IRIS_SEL(a2, c2), IRIS_SEL(a3, c3)));
    k = _mm256_set1_epi32(17);
    hi = _mm256_max_ps(_mm256_max_ps(IRIS_SEL(a0, c0), IRIS_SEL(a1, c1)),
                       _mm256_max_ps(IRIS_SEL(a2, c2), IRIS_SEL(a3, c3)));
#undef IRIS_SEL
    _mm256_storeu_ps(l8, lo);
    _mm256_storeu_ps(h8, hi);
    l = l8[0];
    h = h8[0];
    for (j = 1; j < 8; j++) {
        l = l8[j] > l ? l8[j] : l;
        h = h8[j] > h ? h8[j] : h;
    }
    return (l + h) / 2.0f;
}
#endif

static float iris_median_rank(const float* restrict a, int n) {
    int lt[64];
    float lo8[8], hi8[8];
    int i, j, klo = (n - 1) / 2, khi = n / 2;
    float aj, v, lo = -INFINITY, hi = -INFINITY;
#if defined(__AVX2__)
    if (n == 32) return iris_median_rank32(a);
#endif
    for (i = 0; i < n; i++) lt[i] = 0;
    for (j = 0; j < n; j++) {
        aj = a[j];
        for (i = 0; i < n; i++) lt[i] += (aj < a[i]);
    }
    /* the two maxima in 8 lanes (vmaxps, no data-dependent branch), then across lanes */
    for (j = 0; j < 8; j++) {
        lo8[j] = -INFINITY;
        hi8[j] = -INFINITY;
    }
    for (i = 0; i + 8 <= n; i += 8) {
        for (j = 0; j < 8; j++) {
            v = lt[i + j] <= klo ? a[i + j] : -INFINITY;
            lo8[j] = v > lo8[j] ? v : lo8[j];
            v = lt[i + j] <= khi ? a[i + j] : -INFINITY;
            hi8[j] = v > hi8[j] ? v : hi8[j];
        }
    }
    for (; i < n; i++) {
        v = lt[i] <= klo ? a[i] : -INFINITY;
        lo = v > lo ? v : lo;
        v = lt[i] <= khi ? a[i] : -INFINITY;
        hi = v > hi ? v : hi;
    }
    for (j = 0; j < 8; j++) {
        lo = lo8[j] > lo ? lo8[j] : lo;
        hi = hi8[j] > hi ? hi8[j] : hi;
    }
    if (n % 2) return hi;
    return (lo + hi) / 2.0f;
}

static void iris_flicker_sums_row(
        const float* restrict sl, const float* restrict er, const uint8_t* restrict ring,
        Py_ssize_t R, Py_ssize_t y, Py_ssize_t ny, Py_ssize_t nx, Py_ssize_t nch, int dilate,
        uint8_t* restrict rb, uint8_t* restrict hb, double* vbg, double* vev, double* ve2,
        int64_t* cbg, int64_t* cev) {
    Py_ssize_t x, yy, c, x0, chw = nx / nch;
    const uint8_t* own = ring + (y % R) * nx;
    const uint8_t* src;
    int k, j;
    memset(rb, 0, (size_t)nx);
    for (yy = y - dilate; yy <= y + dilate; yy++) {
        if (yy < 0 || yy >= ny) continue;
        src = ring + (yy % R) * nx;
        for (x = 0; x < nx; x++) rb[x] |= src[x];
    }
    for (x = 0; x < nx; x++) hb[x] = rb[x] & 1;
    for (k = 1; k <= dilate; k++) {
        for (x = k; x < nx; x++) hb[x] |= rb[x - k] & 1;
        for (x = 0; x < nx - k; x++) hb[x] |= rb[x + k] & 1;
    }
    /* hb <- 1 where the pixel is background: usable (bit 1 of its own code), no source */
    for (x = 0; x < nx; x++) hb[x] = (uint8_t)((hb[x] == 0) & (own[x] >> 1));
    for (c = 0; c < nch; c++) {
        double s8[8], e8[8], a_bg = 0.0, a_ev = 0.0, a_e2 = 0.0;
        int32_t n8[8];
        int64_t k_bg = 0, k_ev = 0;
        x0 = c * chw;
        x = x0;
#if defined(__AVX2__)
        {
            __m256d slo = _mm256_setzero_pd(), shi = _mm256_setzero_pd();
            __m256d elo = _mm256_setzero_pd(), ehi = _mm256_setzero_pd(), t;
            __m256i cnt = _mm256_setzero_si256(), zero = _mm256_setzero_si256(), m;
            __m256 v, e;
            for (; x + 8 <= x0 + chw; x += 8) {
                m = _mm256_cmpgt_epi32(
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(hb + x))), zero);
                v = _mm256_and_ps(_mm256_loadu_ps(sl + x), _mm256_castsi256_ps(m));
                e = _mm256_and_ps(_mm256_loadu_ps(er + x), _mm256_castsi256_ps(m));
                slo = _mm256_add_pd(slo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
                shi = _mm256_add_pd(shi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
                t = _mm256_cvtps_pd(_mm256_castps256_ps128(e));
                elo = _mm256_add_pd(elo, _mm256_mul_pd(t, t));
                t = _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1));
                ehi = _mm256_add_pd(ehi, _mm256_mul_pd(t, t));
                cnt = _mm256_sub_epi32(cnt, m);
            }
            _mm256_storeu_pd(s8, slo);
            _mm256_storeu_pd(s8 + 4, shi);
            _mm256_storeu_pd(e8, elo);
            _mm256_storeu_pd(e8 + 4, ehi);
            _mm256_storeu_si256((__m256i*)n8, cnt);
        }
#else
        for (j = 0; j < 8; j++) {
            s8[j] = 0.0;
            e8[j] = 0.0;
            n8[j] = 0;
        }
        for (; x + 8 <= x0 + chw; x += 8) {
            for (j = 0; j < 8; j++) {
                double v = hb[x + j] ? (double)sl[x + j] : 0.0;
                double e = hb[x + j] ? (double)er[x + j] : 0.0;
                s8[j] = s8[j] + v;
                e8[j] = e8[j] + e * e;
                n8[j] = n8[j] + (hb[x + j] != 0);
            }
        }
#endif
        /* lane j holds columns x0 + j (mod 8): even lanes are the channel's even columns */
        for (j = 0; j < 8; j++) {
            a_bg = a_bg + s8[j];
            a_e2 = a_e2 + e8[j];
            k_bg = k_bg + n8[j];
            if (j % 2 == 0) {
                a_ev = a_ev + s8[j];
                k_ev = k_ev + n8[j];
            }
        }
        for (; x < x0 + chw; x++) {  /* the channel's last chw % 8 columns */
            if (hb[x]) {
                a_bg = a_bg + (double)sl[x];
                a_e2 = a_e2 + (double)er[x] * (double)er[x];
                k_bg = k_bg + 1;
                if ((x - x0) % 2 == 0) {
                    a_ev = a_ev + (double)sl[x];
                    k_ev = k_ev + 1;
                }
            }
        }
        vbg[c] = a_bg;
        vev[c] = a_ev;
        ve2[c] = a_e2;
        cbg[c] = k_bg;
        cev[c] = k_ev;
    }
}

static void iris_flicker_apply_row(
        float* restrict sl, float* restrict vr, const float* restrict vp, float* restrict err,
        const float* restrict stripes, const float* restrict acn, const float* restrict add,
        Py_ssize_t nx, Py_ssize_t nch, float* restrict sgn, int pf) {
    Py_ssize_t x, c, x0, chw = nx / nch;
    float s, a, d, v;
    for (c = 0; c < nch; c++) {
        x0 = c * chw;
        if (pf) {  /* the next row's piece of this channel (no value depends on it) */
            iris_prefetch(sl + nx + x0, chw * (Py_ssize_t)sizeof(float));
            if (vr != NULL) iris_prefetch(vr + nx + x0, chw * (Py_ssize_t)sizeof(float));
            if (vp != NULL) iris_prefetch(vp + nx + x0, chw * (Py_ssize_t)sizeof(float));
        }
        s = stripes[c];
        a = acn != NULL ? acn[c] : 0.0f;
        /* the acn of each column with its sign: +a on even, -a on odd columns */
        for (x = 0; x < chw; x++) sgn[x] = (x % 2 == 0) ? a : -a;
        if (vr == NULL) {
            for (x = 0; x < chw; x++) sl[x0 + x] = (sl[x0 + x] - s) - sgn[x];
        } else if (err == NULL) {
            d = add[c];
            for (x = 0; x < chw; x++) {
                v = (sl[x0 + x] - s) - sgn[x];
                sl[x0 + x] = v;
                vr[x0 + x] = (v == v) ? vr[x0 + x] + d : vr[x0 + x];
            }
        } else {
            d = add[c];
            for (x = 0; x < chw; x++) {
                v = (sl[x0 + x] - s) - sgn[x];
                sl[x0 + x] = v;
                v = (v == v) ? vr[x0 + x] + d : vr[x0 + x];
                vr[x0 + x] = v;
                err[x0 + x] = sqrtf(v + vp[x0 + x]);
            }
        }
    }
}

#endif  /* IRIS_FLICKER_H */
