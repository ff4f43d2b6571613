"""CPU seconds of a running dev stack, per component, and a machine-speed reference.

Used by ``bench_latency.py`` (imported from the ``bench/`` directory). The accounting is exact
at each reading, whatever the sampling rate: a component's CPU is the sum, over the live
processes of its process tree, of their own CPU time plus the time of the children they have
reaped (the kernel adds a waited-for child's whole subtree to its parent). Task processes live
a few seconds; they are counted when their parent (the executor worker) reaps them, so nothing
needs to catch them alive. Processes outside the stack (other work on the machine, the bench's
own landing copies) are not counted, unlike a whole-machine busy-time reading.

Roles:

    s3 server        SeaweedFS (weed and its wrapper)
    compute server   the warm workers: science (readout, stage 2, quicklook)
    scheduler        the scheduler process itself (and its non-worker helpers)
    task processes   executor workers: Airflow's task supervisor, the task processes
                     (imports, DAG parse, execution-API calls, the tasks' own code: claim,
                     storage uploads), and forks made for lineage events
    api-server, triggerer, dag-processor
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from typing import Any

import numpy as np

ROLES = ("compute server", "s3 server", "scheduler", "task processes", "api-server",
         "triggerer", "dag-processor")
_COMPONENT_ROLE = {"seaweedfs": "s3 server", "compute": "compute server",
                   "api-server": "api-server", "triggerer": "triggerer",
                   "dag-processor": "dag-processor"}


def _own(p: Any) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _reaped(p: Any) -> float:
    t = p.cpu_times()
    return t.children_user + t.children_system


def _subtree(p: Any) -> float:
    """Own + reaped-children CPU of ``p`` and of its live descendants."""
    import psutil

    total = 0.0
    with contextlib.suppress(psutil.Error):
        total += _own(p) + _reaped(p)
        for c in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += _own(c) + _reaped(c)
    return total


def stack_cpu(stack: Any) -> dict[str, float]:
    """CPU seconds used so far by each role of ``stack`` (an ``iris_devstack.stack.Stack``)."""
    import psutil

    out = dict.fromkeys(ROLES, 0.0)
    for name in stack.component_names():
        proc = stack._process(name)  # noqa: SLF001 - the bench reads the stack's own records
        if proc is None:
            continue
        if name in _COMPONENT_ROLE:
            out[_COMPONENT_ROLE[name]] += _subtree(proc)
            continue
        if name != "scheduler":
            continue
        with contextlib.suppress(psutil.Error):
            # Executor workers are long-lived children of the scheduler: their subtree is the
            # task processes; workers that ended were reaped by the scheduler.
            out["scheduler"] += _own(proc)
            out["task processes"] += _reaped(proc)
            for child in proc.children():
                role = ("task processes" if "worker" in " ".join(child.cmdline())
                        else "scheduler")
                out[role] += _subtree(child)
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def machine_reference(gib: float = 1.0) -> dict[str, float]:
    """Machine speed in the same run: a numpy copy of ``gib`` GiB (memory bandwidth), a fixed
    float32 workload (2048^2 matmul + FFT, one thread's worth of numpy) and SHA-256 of 256 MiB
    (what the store's checksums cost). Each the best of three, in seconds."""
    n = int(gib * 2**30) // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    blob = rng.integers(0, 255, size=256 << 20, dtype=np.uint8).tobytes()

    def best(fn) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    out = {
        "copy_1gib_s": best(lambda: np.copyto(dst, src)) / gib,
        "numpy_fixed_s": best(lambda: (np.fft.rfft2(a), a @ a)),
        "sha256_256mib_s": best(lambda: hashlib.sha256(blob).digest()),
    }
    return out


def format_reference(ref: dict[str, float]) -> str:
    return (f"machine reference: numpy copy {ref['copy_1gib_s'] * 1e3:.0f} ms/GiB, fixed numpy "
            f"workload {ref['numpy_fixed_s']:.2f} s, SHA-256 {256 / ref['sha256_256mib_s']:.0f} MiB/s")
