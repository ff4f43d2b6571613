"""Same-run A/B of two readout_cy builds on the bench frame (prints, asserts nothing).

    git archive <commit> readout_cy setup.py pyproject.toml | tar -x -C /tmp/old
    (cd /tmp/old && /work/main/.venv/bin/python setup.py build_ext --inplace)
    .venv/bin/python bench/bench_readout_ab.py /tmp/old --repeats 9

The other build is imported under another package name (``readout_cy_ab``, a copy of its
readout_cy directory), so both run in one process, interleaved round-robin with a numpy
copy of the input: they see the same load.  Wall and CPU seconds, minimum over the repeats.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import shutil
import sys
import tempfile
import time

import numpy as np

import readout_cy as rc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_readout import full_kwargs, make_data  # noqa: E402


def load_other(build_dir: str):
    tmp = tempfile.mkdtemp(prefix="readout_ab_")
    atexit.register(shutil.rmtree, tmp, True)  # the copy is loaded; gone when we exit
    shutil.copytree(os.path.join(build_dir, "readout_cy"), os.path.join(tmp, "readout_cy_ab"))
    sys.path.insert(0, tmp)
    return importlib.import_module("readout_cy_ab")


def step_chains(other, reads: np.ndarray, t: np.ndarray, kw: dict) -> dict:
    """The readout step's order with clean_flicker on (process_ramp with the mask DQ, the
    snowball check, clean_flicker), 1 thread, for both builds: this one
    with the background sums in the row loop where it has them (``flicker=``), the other as
    its step ran (process_ramp, then clean_flicker's own pass).  clean_flicker
    (iris_tasks.steps.readout, this checkout) imports readout_cy when called, so for the
    other build ``sys.modules["readout_cy"]`` points at it during the call."""
    try:
        from iris_tasks.steps import readout as ro
    except ImportError:
        return {}
    if not hasattr(other, "flicker_sums") or not hasattr(rc, "flicker_sums") or (
            "pixel_dq" not in other.process_ramp.__code__.co_varnames):
        return {}

    shape = reads.shape[-2:]
    maps = ro.detector_maps(gain=np.full(shape, kw["gain"], np.float32),
                            read_noise=kw["read_noise"], saturation=kw["saturation"],
                            nonlinearity=kw["nonlinearity"])
    mask_dq = np.zeros(shape, np.uint32)  # a mask reference's DQ (none bad), as the step

    def chain(mod, fused: bool):
        def run() -> None:
            # process_ramp with the mask DQ (and the sums, where fused), the snowball check,
            # clean_flicker: the step's order
            extra = {"flicker": ro.flicker_spec(32)} if fused else {}
            r = mod.process_ramp(reads, t, threads=1, pixel_dq=mask_dq, **kw, **extra)
            saved = sys.modules["readout_cy"]
            sys.modules["readout_cy"] = mod
            try:
                if len(ro.expand_snowballs(reads, t, r, maps, channels=32).y):
                    r.flicker = None
                ro.clean_flicker(r.slope, r.err, r.dq, channels=32, var_rnoise=r.var_rnoise,
                                 var_poisson=r.var_poisson, threads=1,
                                 **({"sums": r.flicker} if fused and r.flicker else {}))
            finally:
                sys.modules["readout_cy"] = saved
        return run

    fused = hasattr(ro, "flicker_spec") and hasattr(rc, "FlickerSpec")
    out = {"this build, + clean_flicker as the step": chain(rc, fused),
           "other build, + clean_flicker as the step": chain(other, False)}
    if fused:
        out["this build, + clean_flicker, separate pass"] = chain(rc, False)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("other", help="directory holding the other build's readout_cy/")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--reads", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args(argv)
    other = load_other(a.other)
    d = make_data(a.size, a.reads)
    reads, t = d["reads"], d["t"]
    kw = full_kwargs(d)
    calls = {
        "copy": lambda: reads.copy(),
        "this build, full UTR 1 thread": lambda: rc.process_ramp(reads, t, threads=1, **kw),
        "other build, full UTR 1 thread": lambda: other.process_ramp(reads, t, threads=1, **kw),
    }
    if "refpix_reject" in rc.process_ramp.__code__.co_varnames:
        calls["this build, refpix_reject=None"] = lambda: rc.process_ramp(
            reads, t, threads=1, refpix_reject=None, **kw)
    calls.update(step_chains(other, reads, t, kw))
    wall = {k: np.inf for k in calls}
    cpu = dict(wall)
    load0 = os.getloadavg()[0]
    for _ in range(a.repeats):
        for k, fn in calls.items():
            for _ in range(3 if k == "copy" else 1):
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                wall[k] = min(wall[k], time.perf_counter() - t0)
                cpu[k] = min(cpu[k], time.process_time() - c0)
    print(f"A/B {a.reads} x {a.size}^2, min of {a.repeats}; other build: {other.__file__}")
    for k in calls:
        print(f"  {k:44s} wall {wall[k]:.3f} s ({wall[k] / wall['copy']:4.1f} x copy)  "
              f"CPU {cpu[k]:.3f} s ({cpu[k] / cpu['copy']:4.1f} x copy)")
    print(f"  load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after (2 cores)")


if __name__ == "__main__":
    main()
