/* readout_cy/src/iris_openmp.h -- OpenMP queries that also compile without OpenMP.

   iris_openmp(): 1 when built with -fopenmp; iris_max_threads(): OpenMP's default team
   size (1 without OpenMP); iris_thread_num(): index of the calling thread, used to pick
   its scratch buffers. */

#ifndef IRIS_OPENMP_H
#define IRIS_OPENMP_H

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

#endif  /* IRIS_OPENMP_H */
