/* readout_cy/src/iris_map_stats.h -- one-pass validation statistics of a float32 map:
   any-NaN flag and NaN-ignoring min/max (AVX when available), for map_stats(). */

#ifndef IRIS_MAP_STATS_H
#define IRIS_MAP_STATS_H

#include "iris_common.h"

/* NaN flag and NaN-ignoring min/max of n floats (a NaN never replaces the running
   value: v < lo ? v : lo is vminps(v, lo)). */
#if defined(__AVX__)
#include <immintrin.h>
#endif
static void iris_map_stats(const float* a, Py_ssize_t n, float* out) {
    Py_ssize_t i = 0;
    int j, anynan = 0;
    float l = INFINITY, h = -INFINITY, v;
#if defined(__AVX__)
    float lo8[8], hi8[8];
    __m256 lo = _mm256_set1_ps(INFINITY), hi = _mm256_set1_ps(-INFINITY);
    __m256 nn = _mm256_setzero_ps(), x;
    for (; i + 8 <= n; i += 8) {
        x = _mm256_loadu_ps(a + i);
        lo = _mm256_min_ps(x, lo);
        hi = _mm256_max_ps(x, hi);
        nn = _mm256_or_ps(nn, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
    _mm256_storeu_ps(lo8, lo);
    _mm256_storeu_ps(hi8, hi);
    anynan = _mm256_movemask_ps(nn) != 0;
    for (j = 0; j < 8; j++) {
        l = lo8[j] < l ? lo8[j] : l;
        h = hi8[j] > h ? hi8[j] : h;
    }
#endif
    for (; i < n; i++) {
        v = a[i];
        l = v < l ? v : l;
        h = v > h ? v : h;
        anynan |= v != v;
    }
    out[0] = (float)anynan;
    out[1] = l;
    out[2] = h;
}

#endif  /* IRIS_MAP_STATS_H */
