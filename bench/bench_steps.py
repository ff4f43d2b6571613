"""Warm per-stage times of the real-time recipes at full frame (prints ratios, asserts nothing).

    .venv/bin/python bench/bench_steps.py                  # imager + IFS, 3 repeats
    .venv/bin/python bench/bench_steps.py --modes imager --oracle

In one warm process: stage 1 (:func:`run_readout`: raw ramp -> ``_rate``) and stage 2
(:func:`run_reduction`: ``_rate`` -> ``_cal`` / ``_s3d``, no sky frames, so the imager takes
the background-model path) for one simulated 4096^2 frame per mode, plus the pieces of the
imager path that used to dominate (opening the raw ramp, the background model). Every
figure is the minimum over ``--repeats`` runs after one warm-up run (the machine is shared),
given as wall and CPU seconds and as a ratio to a numpy copy of the raw ramp's bytes timed
in the same run, so figures from differently loaded runs compare. ``--oracle`` also runs
photutils Background2D on the same rate image and prints how far the fast background model
is from it, relative to the background RMS.

Frames and references come from ``--sim`` (default ``var/bench/sim4096``, the cache of
bench/bench_latency.py; simulated there if missing). The references are published into a
throw-away CRDS cache under a temporary state directory, removed at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger(__name__)

MODES = {"imager": "IMG1_IMG1-SCI", "ifs": "IFS_LEN-SCI"}


def load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"load {one:.2f} {five:.2f} {fifteen:.2f}"
    except OSError:
        return "load n/a"


def best_of(fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None
            ) -> tuple[float, float]:
    """(min wall, min CPU) seconds of ``fn`` over ``repeats`` runs (``before`` untimed)."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def frames(sim: Path, modes: list[str]) -> dict[str, Path]:
    raws = {m: sim / "raw" / f"{MODES[m]}_001.fits" for m in modes}
    if not all(p.is_file() for p in raws.values()) or not (sim / "references").is_dir():
        sys.path.insert(0, str(REPO / "bench"))
        from bench_latency import simulate_bases

        simulate_bases(sim, 4096, 1)
    return raws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim", type=Path, default=REPO / "var" / "bench" / "sim4096")
    ap.add_argument("--modes", default="imager,ifs", help="comma list of imager, ifs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--oracle", action="store_true",
                    help="also run photutils Background2D and print the model difference")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    logging.basicConfig(level=logging.WARNING)

    state = Path(tempfile.mkdtemp(prefix="iris-bench-steps-"))
    os.environ["IRIS_STATE_DIR"] = str(state)
    os.environ["IRIS_CRDS_PATH"] = str(state / "crds")
    try:
        run(args, modes, state)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def run(args: argparse.Namespace, modes: list[str], state: Path) -> None:
    from iris_tasks import calib
    from iris_tasks.datamodels import open_model
    from iris_tasks.pipelines import recipes
    from iris_tasks.steps import sky_sub

    raws = frames(args.sim, modes)
    refs = sorted(str(p) for p in (args.sim / "references").glob("*.fits"))
    calib.cache_dir()
    ctx = calib.publish_references(refs, "bench_steps: simulated references")
    out = state / "out"
    out.mkdir()
    print(f"bench_steps: {', '.join(modes)}; {args.repeats} repeats; {load()}")

    # Reference operation: a copy of the raw ramp's bytes, in memory, same run.
    first = next(iter(raws.values()))
    ramp = np.fromfile(first, dtype=np.uint8)
    copy_wall, copy_cpu = best_of(ramp.copy, max(args.repeats, 3))
    print(f"  numpy copy of {ramp.nbytes / 1e6:.0f} MB (raw ramp bytes): {copy_wall:.3f} s "
          f"wall, {copy_cpu:.3f} s CPU")
    del ramp
    rows: list[tuple[str, float, float]] = []

    def record(label: str, wall: float, cpu: float) -> None:
        rows.append((label, wall, cpu))
        print(f"  {label:<34s} {wall:7.3f} s wall {cpu:7.3f} s CPU {wall / copy_wall:8.1f} x copy",
              flush=True)

    for mode in modes:
        raw = raws[mode]
        rate = recipes.product_path(raw, out, "rate")

        def stage1(raw: Path = raw) -> None:
            recipes.run_readout(raw, out, context=ctx, validate=False)

        def stage2(rate: Path = rate) -> Path | None:
            return recipes.run_reduction(rate, out, sky_paths=[], context=ctx)

        def clear(suffixes: tuple[str, ...], raw: Path = raw) -> None:
            # A rename over an existing 0.5 GB product frees its pages inside the timing;
            # real-time products are new files.
            for suffix in suffixes:
                recipes.product_path(raw, out, suffix).unlink(missing_ok=True)

        stage1()  # warm-up (imports, CRDS, caches)
        record(f"{mode} stage 1 (readout)",
               *best_of(stage1, args.repeats, lambda: clear(("rate",))))
        product = stage2()  # warm-up (IFS: builds and caches the trace geometry)
        suffix = product.name.rsplit("_", 1)[1].removesuffix(".fits") if product else "cal"
        record(f"{mode} stage 2 (reduce -> _{suffix})",
               *best_of(stage2, args.repeats, lambda s=suffix: clear((s,))))
        record(f"{mode} open raw ramp", *best_of(lambda r=raw: open_model(r).close(), args.repeats))
        if mode == "imager":
            model = open_model(rate)
            data, dq = np.asarray(model.data), np.asarray(model.dq)
            model.close()
            record("imager background model (mesh)",
                   *best_of(lambda d=data, q=dq: sky_sub.model_background(d, q), args.repeats))
            if args.oracle:
                t0 = time.perf_counter()
                ref = sky_sub.model_background(data, dq, engine="photutils")
                record("imager background model (photutils)", time.perf_counter() - t0,
                       float("nan"))
                fast = sky_sub.model_background(data, dq)
                rms = np.sqrt(ref.variance * np.float32(64 * 64 * 2 / np.pi))
                diff = np.abs(fast.background - ref.background) / rms
                print(f"  mesh vs photutils: background |diff|/RMS max {diff.max():.2e}, "
                      f"p99.99 {np.quantile(diff, 0.9999):.2e}, mean {diff.mean():.2e}; "
                      f"variance max rel {np.max(np.abs(fast.variance / ref.variance - 1)):.2e}; "
                      f"level {fast.level:.6g} vs {ref.level:.6g}")
    print(f"bench_steps: done; {load()}")


if __name__ == "__main__":
    main()
