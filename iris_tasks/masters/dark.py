"""Master dark builder: a night's dark rate images -> DarkModel reference (``_dark``).

Algorithm (per DETECTOR / EXPTIME / READPATT group):

1. **Combine**: sigma-clipped mean of the frames' SCI (DN/s), pixel by pixel: a value more
   than ``sigma`` (4) times its own ERR from the median of the frames is clipped (see
   :mod:`iris_tasks.masters.combine` for why not the sample spread); row bands of
   memory-mapped inputs; DQ-bad input pixels are excluded. ERR = std / sqrt(nused) of the
   surviving values (the between-frame dispersion).
2. **Hot pixels**: with m the median and s the robust (MAD) spread of the master over good
   pixels, WARM where dark > m + ``warm_nsigma`` s and HOT where dark > m + ``hot_nsigma`` s
   (or the absolute ``warm_threshold`` / ``hot_threshold`` in DN/s when given), in both
   cases only where dark - m also exceeds ``warm_nsigma`` times the pixel's own ERR (noisy
   pixels and cosmic-ray residues are not hot).
   Pixels no frame covers: dark 0, DQ DO_NOT_USE | UNRELIABLE_DARK.
3. **Read noise** (QA, from the dispersion between frames): the per-pixel between-frame
   variance of the rate (clipped std**2, corrected for the clipping truncation and for the
   bias of a median of chi-square values) is, for an unweighted straight-line fit of N reads
   spaced dt, ``12 rn**2 / (N (N**2 - 1) dt**2)`` plus the dark's Poisson term
   ``6 (N**2 + 1) / (5 N (N**2 - 1)) * D / (g dt)`` (CDS is N = 2; MCDS with k reads at each
   end: ``2 rn**2 / (k T**2)`` and ``D / (g T)``, T = (N - k) dt). Darks are read-noise
   limited, where the optimal weights of the ramp fit are uniform, so these apply. The
   median over good pixels is inverted for rn (DN per read) and reported in DESCRIP and
   :class:`MasterDark.readnoise`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..datamodels import DarkModel
from ..datamodels.dqflags import pixel
from .combine import DEFAULT_MAX_MEMORY_MB, clip_variance_factor, combine_files, static_dq
from .common import (
    InputFrame,
    MasterBuildError,
    copy_input_meta,
    group_by,
    night_of,
    night_start_utc,
    pedigree_of,
    read_inputs,
    robust_stats,
    save_master,
    single_group,
)

log = logging.getLogger(__name__)

GROUP_KEYS = ("DETECTOR", "EXPTIME", "READPATT")
DARK_OBSNAMES = ("IMG1-DRK", "LEN-DRK", "SLI-DRK")


@dataclass
class MasterDark:
    """A built master dark and its QA numbers."""

    model: DarkModel
    frames: list[str]
    readnoise: float  # DN per read, from the between-frame dispersion (NaN if not estimable)
    n_hot: int
    n_warm: int
    seconds: float


def group_darks(paths: Sequence[str | os.PathLike]) -> dict[tuple, list[InputFrame]]:
    """Dark rate images grouped by (DETECTOR, EXPTIME, READPATT)."""
    frames = read_inputs(paths)
    for frame in frames:
        if frame.obsname and frame.obsname not in DARK_OBSNAMES:
            raise MasterBuildError(f"{frame.path}: OBSNAME={frame.obsname} is not a dark "
                                   f"({', '.join(DARK_OBSNAMES)})")
    return group_by(frames, GROUP_KEYS)


def build_master_dark(
    paths: Sequence[str | os.PathLike],
    *,
    sigma: float = 4.0,
    maxiters: int = 3,
    warm_nsigma: float = 5.0,
    hot_nsigma: float = 25.0,
    warm_threshold: float | None = None,
    hot_threshold: float | None = None,
    min_frames: int = 3,
    gain: float | None = None,
    author: str = "iris_tasks.masters",
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
    threads: int | None = None,
) -> MasterDark:
    """Combine one group of dark rate images into a master dark (see the module docstring)."""
    start = time.perf_counter()
    key, frames = single_group(group_darks(paths), GROUP_KEYS, "master dark", min_frames)
    detector, exptime, patt = key
    combined = combine_files([f.path for f in frames], sigma=sigma, maxiters=maxiters,
                             max_memory_mb=max_memory_mb, threads=threads)
    data = combined.mean
    covered = combined.nused > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.where(combined.nused > 1, combined.std / np.sqrt(combined.nused), np.nan)
    dq = static_dq(frames[0].path, data.shape)
    science = dq == 0
    dq[~covered & science] |= np.uint32(pixel["DO_NOT_USE"] | pixel["UNRELIABLE_DARK"])
    data = np.where(covered, data, 0.0).astype(np.float32)
    err = np.where(np.isfinite(err), err, 0.0).astype(np.float32)

    good = covered & science
    median, spread = robust_stats(data[good])
    warm_level = warm_threshold if warm_threshold is not None else median + warm_nsigma * spread
    hot_level = hot_threshold if hot_threshold is not None else median + hot_nsigma * spread
    # Above the level and significant for the pixel itself: a noisy pixel (3x read noise)
    # or a cosmic-ray residue can exceed the level by chance but not its own error bars.
    significant = (data - median) > warm_nsigma * np.where(err > 0, err, np.inf)
    hot = good & significant & (data > hot_level)
    warm = good & significant & (data > warm_level) & ~hot
    dq[hot] |= np.uint32(pixel["HOT"])
    dq[warm] |= np.uint32(pixel["WARM"])

    rn = estimate_readnoise(frames[0], combined.std, combined.nused, good & ~hot & ~warm,
                            median, sigma=sigma, gain=gain)

    model = DarkModel(data=data, err=err, dq=dq)
    copy_input_meta(model, frames[0])
    night = night_of(frames)
    model.meta.night = night
    model.meta.instrument.filter = "N/A"
    ifsmode = frames[0].get("IFSMODE")
    model.meta.instrument.ifsmode = ifsmode if ifsmode in ("LENSLET", "SLICER") else "N/A"
    model.meta.reftype = "DARK"
    model.meta.useafter = night_start_utc(night)
    model.meta.pedigree = pedigree_of(frames)
    rn_text = f"; RN {rn:.2f} DN/read" if math.isfinite(rn) else ""
    model.meta.description = f"Master dark {detector} {patt} {exptime:g}s night {night}{rn_text}"
    model.meta.author = author
    model.meta.provenance.parents = ",".join(os.path.basename(f.path) for f in frames)
    qa = model.meta.qa
    qa.nframes = len(frames)
    qa.median = float(median)
    qa.rms = float(spread)
    qa.nbad = int(np.count_nonzero(dq))
    if math.isfinite(rn):
        qa.readnoise = float(rn)
    seconds = time.perf_counter() - start
    log.info("master dark %s %s %gs: %d frames, median %.4g DN/s, %d hot, %d warm, RN %.3g DN "
             "(%.1f s)", detector, patt, exptime, len(frames), median, int(hot.sum()),
             int(warm.sum()), rn, seconds)
    return MasterDark(model, [f.path for f in frames], rn, int(hot.sum()), int(warm.sum()), seconds)


def rate_variance_coefficients(sampmode: str, nreads: int, read_time: float,
                               nfowler: int | None = None) -> tuple[float, float]:
    """(c_read, c_poisson): var(rate) = c_read rn**2 + c_poisson D / g for one ramp.

    rn in DN per read, D in DN/s, g in e-/DN, variance in (DN/s)**2; see the module docstring.
    """
    n, dt = int(nreads), float(read_time)
    mode = str(sampmode).upper()
    if mode == "MCDS":
        k = int(nfowler or max(n // 2, 1))
        span = (n - k) * dt
        return 2.0 / (k * span**2), 1.0 / span
    if mode == "CDS":
        n = 2
    if n < 2:
        raise ValueError(f"{n} read(s): no slope, no read-noise estimate")
    c_read = 12.0 / (n * (n * n - 1) * dt * dt)
    c_poisson = 6.0 * (n * n + 1) / (5.0 * n * (n * n - 1) * dt)
    return c_read, c_poisson


def estimate_readnoise(frame: InputFrame, std: np.ndarray, nused: np.ndarray, good: np.ndarray,
                       dark_level: float, *, sigma: float, gain: float | None) -> float:
    """Read noise (DN per read) from the between-frame dispersion; NaN when not estimable."""
    try:
        c_read, c_poisson = rate_variance_coefficients(
            frame.get("SAMPMODE", "UTR"), int(frame.get("NUMREADS", 0)),
            float(frame.get("READTIME", 0.0)), frame.get("NFOWLER"))
    except (TypeError, ValueError) as exc:
        log.warning("no read-noise estimate for %s: %s", frame.path, exc)
        return math.nan
    sel = good & (nused >= 3) & np.isfinite(std)
    if not sel.any():
        return math.nan
    dof = float(np.median(nused[sel])) - 1.0
    # Median of s**2 / sigma**2 for chi-square with k dof ~ (1 - 2 / (9 k))**3 (Wilson-Hilferty).
    median_bias = (1.0 - 2.0 / (9.0 * dof)) ** 3
    var_rate = float(np.median(std[sel].astype(np.float64) ** 2)) / median_bias
    var_rate /= clip_variance_factor(sigma)
    g = gain if gain is not None else frame.get("GAIN")
    if g and dark_level > 0:
        var_rate -= c_poisson * dark_level / float(g)
    return math.sqrt(var_rate / c_read) if var_rate > 0 else math.nan


def dark_filename(master: MasterDark) -> str:
    m = master.model.meta
    return (f"iris_{m.instrument.detector}_{m.exposure.readpatt}_"
            f"{float(m.exposure.exposure_time or 0):g}s_{m.night}_dark.fits").lower()


def save_master_dark(master: MasterDark, out_dir: str | os.PathLike) -> Path:
    return save_master(master.model, out_dir, dark_filename(master))

