/* readout_cy/src/iris_common.h -- what every kernel header of readout_cy needs.

   The C parts of readout_cy are header-only: each header holds static functions that are
   compiled into the one translation unit Cython generates from readout_cy/_kernels.pyx
   (see the note there and in setup.py).  Py_ssize_t comes from Python.h, which Cython
   includes before anything else; it is included here too so that a header is
   self-contained (Python.h must precede the standard headers, and is a no-op when
   already included). */

#ifndef IRIS_COMMON_H
#define IRIS_COMMON_H

#include <Python.h>
#include <math.h>
#include <stdint.h>

#endif  /* IRIS_COMMON_H */
