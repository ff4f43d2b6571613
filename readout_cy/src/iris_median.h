/* readout_cy/src/iris_median.h -- scalar median of one pixel's usable differences (as
   rates), for pixels whose ramp is cut short by saturation: insertion sort into buf,
   then the middle value (mean of the two middle values for an even count; for two
   differences the smaller one in absolute value, as in stcal).  Used by the AVX2 block
   code (iris_block.h) and by the Cython row code. */

#ifndef IRIS_MEDIAN_H
#define IRIS_MEDIAN_H

#include "iris_common.h"

static float iris_median_scalar(const float* d, Py_ssize_t dk, int nu,
                                const float* inv_dt32, float* buf) {
    int k, j, h;
    float v, a, b;
    for (k = 0; k < nu; k++) {
        v = d[k * dk] * inv_dt32[k];
        j = k;
        while (j > 0 && buf[j - 1] > v) {
            buf[j] = buf[j - 1];
            j = j - 1;
        }
        buf[j] = v;
    }
    if (nu >= 3) {
        h = nu / 2;
        if (nu % 2) return buf[h];
        return 0.5f * (buf[h - 1] + buf[h]);
    }
    if (nu == 2) {
        /* two differences: the smaller one is the likelier clean one (as in stcal) */
        a = buf[0];
        b = buf[1];
        return fabsf(a) <= fabsf(b) ? a : b;
    }
    if (nu == 1) return buf[0];
    return NAN;
}

#endif  /* IRIS_MEDIAN_H */
