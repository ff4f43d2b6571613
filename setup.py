"""Build the readout_cy Cython extensions, with OpenMP where the compiler supports it."""

import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def _compiler_supports_openmp() -> bool:
    if os.environ.get("IRIS_NO_OPENMP"):
        return False
    code = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as fh:
            fh.write(code)
        cc = os.environ.get("CC", "cc")
        result = subprocess.run(
            [cc, "-fopenmp", src, "-o", os.path.join(tmp, "t")],
            capture_output=True,
        )
        return result.returncode == 0


def _cpu_has_avx2() -> bool:
    """AVX2 on the build machine (the extension is built in place where it runs)."""
    if os.environ.get("IRIS_PORTABLE"):
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            return " avx2" in fh.read()
    except OSError:
        return False


openmp = sys.platform.startswith("linux") and _compiler_supports_openmp()
# No -ffast-math: the kernels must follow IEEE float32/float64 rules so that they agree
# with their numpy twins (readout_cy/reference.py) and treat NaN maps predictably;
# -ffp-contract=off keeps the compiler from fusing a*b+c into FMAs numpy does not use.
# -fno-trapping-math / -fno-math-errno do not change any computed value; they let GCC
# if-convert selects and sqrt in the row loops so that those loops vectorise.  The alias
# parameter lets it version the fused per-read loop (a dozen pointer streams) for SIMD.
compile_args = [
    "-O3",
    "-ffp-contract=off",
    "-fno-trapping-math",
    "-fno-math-errno",
    "--param=vect-max-version-for-alias-checks=200",
]
link_args = []
# readout_cy's row loops are written for the vectoriser: AVX2 doubles their width over the
# x86-64 baseline (SSE2).  IRIS_PORTABLE=1 builds for the baseline, e.g. for a wheel.
if _cpu_has_avx2():
    compile_args.append("-mavx2")
if openmp:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")

# The kernels' C code: header-only static functions in readout_cy/src/*.h (one role per
# header), pulled into the Cython module's translation unit by `cdef extern from "x.h"` so
# that GCC inlines and vectorises them with the Cython loops (see the note in
# readout_cy/_kernels.pyx).  Hence no .c in `sources`; `depends` makes an edited header
# recompile the extension.
C_SRC = "readout_cy/src"
c_headers = sorted(glob.glob(f"{C_SRC}/*.h"))

# Every readout_cy/*.pyx becomes readout_cy.<stem>, so adding a kernel module needs no edit here.
extensions = [
    Extension(
        f"readout_cy.{Path(pyx).stem}",
        [pyx],
        include_dirs=[C_SRC, np.get_include()],
        depends=c_headers,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for pyx in sorted(glob.glob("readout_cy/*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
