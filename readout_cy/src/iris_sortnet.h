/* readout_cy/src/iris_sortnet.h -- one comparator of the median sorting network, applied
   to a whole row (the generic, row-wise jump median of _jump_row). */

#ifndef IRIS_SORTNET_H
#define IRIS_SORTNET_H

#include "iris_common.h"

/* One comparator of the sorting network over a row: (a, b) -> (min, max).  The values
   are never NaN (unusable slots hold +inf); finite-math/no-signed-zeros let GCC emit
   plain vminps/vmaxps instead of masked conditional stores.  A -0/+0 tie can only
   change the sign of a zero median, which no later result depends on. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("finite-math-only", "no-signed-zeros")))
#endif
static void iris_cmpswap(float * __restrict qa, float * __restrict qb, Py_ssize_t n) {
    for (Py_ssize_t x = 0; x < n; x++) {
        float a = qa[x], b = qb[x];
        qa[x] = a < b ? a : b;
        qb[x] = a < b ? b : a;
    }
}

#endif  /* IRIS_SORTNET_H */
