/* readout_cy/src/iris_ingest.h -- the fused per-read loop of _ingest_row over one channel:
   saturation count, reference-pixel offset, optional bias, optional 4- or 5-coefficient
   linearity, and the difference with the previous read, in one pass. */

#ifndef IRIS_INGEST_H
#define IRIS_INGEST_H

#include "iris_common.h"

/* The fused per-read loop of _ingest_row over one channel (n pixels), in C so that the
   pointers can be declared restrict: GCC then vectorises without the run-time alias
   checks it otherwise repeats for every channel of every read.  Same float32
   operations in the same order as the Cython loops they replace (see _ingest_row). */
#define IRIS_SAT_COUNT \
    float v = (float)raw[x], sv = sat[x]; \
    int32_t m = ng[x]; \
    ng[x] = m + ((m == i) & ((v < sv) | (sv != sv)));
static void iris_ingest_k0(const uint16_t* __restrict raw, const float* __restrict sat,
                           const float* __restrict bias, int32_t* __restrict ng,
                           float* __restrict prev, float* __restrict dout, float f,
                           int32_t i, Py_ssize_t n) {
    for (Py_ssize_t x = 0; x < n; x++) {
        IRIS_SAT_COUNT
        float w = (v - f) - bias[x];
        dout[x] = w - prev[x];
        prev[x] = w;
    }
}
static void iris_ingest_k4(const uint16_t* __restrict raw, const float* __restrict sat,
                           const float* __restrict c0, const float* __restrict c1,
                           const float* __restrict c2, const float* __restrict c3,
                           int32_t* __restrict ng, float* __restrict prev,
                           float* __restrict dout, float f, int32_t i, Py_ssize_t n) {
    for (Py_ssize_t x = 0; x < n; x++) {
        IRIS_SAT_COUNT
        float w = v - f;
        float r = ((c3[x] * w + c2[x]) * w + c1[x]) * w + c0[x];
        w = r == r ? r : w;
        dout[x] = w - prev[x];
        prev[x] = w;
    }
}
static void iris_ingest_k5(const uint16_t* __restrict raw, const float* __restrict sat,
                           const float* __restrict bias, const float* __restrict c0,
                           const float* __restrict c1, const float* __restrict c2,
                           const float* __restrict c3, const float* __restrict c4,
                           int32_t* __restrict ng, float* __restrict prev,
                           float* __restrict dout, float f, int32_t i, Py_ssize_t n) {
    for (Py_ssize_t x = 0; x < n; x++) {
        IRIS_SAT_COUNT
        float w = (v - f) - bias[x];
        float r = (((c4[x] * w + c3[x]) * w + c2[x]) * w + c1[x]) * w + c0[x];
        w = r == r ? r : w;
        dout[x] = w - prev[x];
        prev[x] = w;
    }
}

/* Software prefetch of nbytes from p (one per 64-byte line) into all cache levels.  The
   row loop asks for the next row's reads and maps while it works on this row, a piece per
   read and channel: the hardware prefetchers follow each 8-16 KB row stream only after a
   few misses per 4 KiB page, and the maps are read once per row from memory.  No value
   depends on it. */
static inline void iris_prefetch(const void* p, Py_ssize_t nbytes) {
    const char* c = (const char*)p;
    for (Py_ssize_t o = 0; o < nbytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

#endif  /* IRIS_INGEST_H */
