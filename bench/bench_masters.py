"""Benchmark of the master dark/flat builders against a plain numpy median of the same stack.

    python bench/bench_masters.py                 # 20 frames of 4096 x 4096 (needs ~8 GB disk)
    python bench/bench_masters.py --size 1024 --nframes 10

Writes synthetic dark and flat rate images, then runs each job in its own process so that
its peak memory is its own:

* ``numpy median``: the whole stack read into memory and ``np.median(axis=0)`` (the naive
  approach, the reference of the ratios);
* ``master dark``: :func:`iris_tasks.masters.build_master_dark` (memory-mapped, banded,
  sigma-clipped mean, hot pixels, read-noise estimate);
* ``master flat``: :func:`iris_tasks.masters.build_master_flat` with the master dark.

Prints wall time, peak RSS (VmHWM) and peak anonymous memory (RssAnon, sampled) of each job
and their ratios to the numpy median. No assertions: figures for the README. The machine's
load average is printed too: on a shared machine the times move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _write_frames(workdir: Path, size: int, nframes: int, kind: str) -> list[Path]:
    from astropy.io import fits

    rng = np.random.default_rng(1 if kind == "dark" else 2)
    dq = np.zeros((size, size), np.uint32)
    dq[:4] = dq[-4:] = 2**31 | 1
    dq[:, :4] = dq[:, -4:] = 2**31 | 1
    yy = np.linspace(-1, 1, size, dtype=np.float32)[:, None]
    pattern = 1.0 + 0.03 * yy * yy
    paths = []
    for i in range(nframes):
        header = fits.Header()
        header.update({
            "DATAMODL": "ImageModel", "INSTRUME": "IRIS", "DETECTOR": "IMG1",
            "OBSTYPE": "CAL", "OBSNAME": "IMG1-DRK" if kind == "dark" else "IMG1-NFF",
            "FILTER": "N/A" if kind == "dark" else "Kbb", "IFSMODE": "N/A",
            "SAMPMODE": "UTR", "NUMREADS": 10, "READTIME": 1.4, "EXPTIME": 12.6,
            "READPATT": "UTR10", "GAIN": 2.0, "DATE-OBS": "2026-11-23",
            "TIME-OBS": f"0{i // 10}:{i % 60:02d}:00", "EXP_NO": i,
        })
        noise = 0.3 if kind == "dark" else 3.0
        if kind == "dark":
            data = rng.normal(0.01, noise, (size, size)).astype(np.float32)
        else:
            data = (1000.0 * (1 + 0.05 * i / nframes) * pattern
                    + rng.normal(0, noise, (size, size))).astype(np.float32)
        err = np.full((size, size), noise, np.float32)
        path = workdir / f"{kind}{i:02d}_rate.fits"
        fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(data, name="SCI"),
                      fits.ImageHDU(err, name="ERR"), fits.ImageHDU(dq, name="DQ")]
                     ).writeto(path, overwrite=True)
        paths.append(path)
    return paths


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (Linux) in MB; ru_maxrss as a fallback."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _AnonPeak:
    """Samples RssAnon of this process (Linux) every few ms; ``peak`` in MB."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with open("/proc/self/status") as fh:
                    for line in fh:
                        if line.startswith("RssAnon:"):
                            self.peak = max(self.peak, int(line.split()[1]) / 1024)
            except OSError:
                return
            time.sleep(0.005)

    def __enter__(self) -> _AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _worker(job: str, workdir: Path, threads: int) -> dict:
    from astropy.io import fits

    from iris_tasks.masters import build_master_dark, build_master_flat, save_master_dark

    darks = sorted(workdir.glob("dark*_rate.fits"))
    flats = sorted(workdir.glob("flat*_rate.fits"))
    base_rss = _status_mb("VmRSS")
    with _AnonPeak() as anon:
        start = time.perf_counter()
        if job == "median":
            stack = np.stack([fits.getdata(p, "SCI") for p in darks])
            loaded = time.perf_counter() - start
            np.median(stack, axis=0)
            extra = {"load_s": loaded}
        elif job == "dark":
            master = build_master_dark(darks, threads=threads)
            save_master_dark(master, workdir / "masters")
            extra = {"hot": master.n_hot, "readnoise": master.readnoise}
        elif job == "flat":
            dark = sorted((workdir / "masters").glob("*_dark.fits"))
            build_master_flat(flats, darks=dark, threads=threads)
            extra = {}
        else:
            raise ValueError(job)
        seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux carries the parent's maxrss across fork/exec into the
    # child's rusage, so a parent that just wrote 2 GB of frames would inflate every job.
    peak = _status_mb("VmHWM")
    return {"job": job, "seconds": seconds, "peak_rss_mb": peak, "import_rss_mb": base_rss,
            "peak_anon_mb": anon.peak, **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="frame size (pixels a side)")
    parser.add_argument("--nframes", type=int, default=20, help="frames per stack")
    parser.add_argument("--threads", type=int, default=2, help="builder threads")
    parser.add_argument("--workdir", help="where to write the frames (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the frames afterwards")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        print(json.dumps(_worker(args._worker, Path(args.workdir), args.threads)))
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_masters_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        _write_frames(workdir, args.size, args.nframes, "dark")
        _write_frames(workdir, args.size, args.nframes, "flat")
        os.sync()  # the writes' flush to disk must not land inside the timed jobs
        stack_gb = args.nframes * args.size**2 * 4 / 1e9
        print(f"{args.nframes} frames of {args.size}x{args.size} float32 ({stack_gb:.2f} GB of SCI "
              f"per stack) written in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs, "
              f"{args.threads} builder threads; load average {os.getloadavg()[0]:.1f}")
        results = {}
        for job in ("median", "dark", "flat"):
            cmd = [sys.executable, __file__, "--_worker", job, "--workdir", str(workdir),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results[job] = json.loads(out.stdout.strip().splitlines()[-1])
        ref = results["median"]
        print(f"{'job':<14}{'time s':>9}{'x median':>10}{'peak RSS MB':>13}{'x median':>10}"
              f"{'peak anon MB':>14}{'x median':>10}")
        names = {"median": "numpy median", "dark": "master dark", "flat": "master flat"}
        for job, r in results.items():
            print(f"{names[job]:<14}{r['seconds']:>9.2f}{r['seconds'] / ref['seconds']:>10.2f}"
                  f"{r['peak_rss_mb']:>13.0f}{r['peak_rss_mb'] / ref['peak_rss_mb']:>10.2f}"
                  f"{r['peak_anon_mb']:>14.0f}{r['peak_anon_mb'] / ref['peak_anon_mb']:>10.2f}")
        print(f"(load average now {os.getloadavg()[0]:.1f}; numpy median: {ref['load_s']:.2f} s of it reading the stack; "
              f"import baseline RSS {ref['import_rss_mb']:.0f} MB; master dark: "
              f"{results['dark']['hot']} hot pixels, RN estimate {results['dark']['readnoise']:.2f} DN)")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
