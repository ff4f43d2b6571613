"""Sky/background subtraction: the algorithm of the sky_sub step (pure functions over arrays).

Two estimates of the background under a science frame:

1. **Sky frames** (IMG1-SKY taken for this science): each sky frame is divided by its own
   sigma-clipped median level, the normalised frames are combined pixel by pixel with a
   sigma-clipped median (astropy ``sigma_clip``), and the combined pattern is scaled to the
   science frame by the sigma-clipped median of ``science / pattern`` (stars are clipped
   away). If a sky level is not positive (e.g. a narrow band after dark subtraction) the
   combine is additive instead: frames minus their level, median, plus the science offset.
   Variance of the sky estimate: mean of the frames' ERR**2 / n, times pi/2 for a median of
   three or more frames. Pixels where no sky frame has a valid value get the scaled sky
   level and the NO_SKY flag.

2. **Model fallback** (no sky frames): a 2-D background with photutils ``Background2D``
   (sigma-clipped median in ``box_size`` boxes, median-filtered over ``filter_size`` boxes when
   the grid has at least 2 x ``filter_size`` boxes a side, interpolated), computed
   twice: the second pass masks sources found above the first background
   (> ``source_nsigma`` x background RMS, dilated). Its variance is the mesh estimate's,
   (pi/2) x rms**2 / box_size**2. The step records this fallback in SKYFILES.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from astropy.stats import SigmaClip, sigma_clip, sigma_clipped_stats
from astropy.utils.exceptions import AstropyUserWarning

from ..datamodels.dqflags import BAD_FOR_SCIENCE, pixel
from . import _mesh
from ._stats import nanmedian_axis0, row_blocks

log = logging.getLogger(__name__)

NO_SKY = np.uint32(pixel["NO_SKY"])


@dataclass
class SkyFrame:
    """One sky exposure at the science frame's calibration level."""

    data: np.ndarray
    err: np.ndarray
    dq: np.ndarray
    name: str = "<sky>"


@dataclass
class SkyEstimate:
    """Background to subtract, its variance and where it could not be estimated."""

    background: np.ndarray
    variance: np.ndarray
    no_sky: np.ndarray  # bool: no valid sky value at this pixel
    method: str  # "frames" | "model"
    level: float  # background level in the science frame (median of ``background``)
    detail: str  # one line for the log / SKYFILES


def good_pixels(data: np.ndarray, dq: np.ndarray, bad_bits: int = BAD_FOR_SCIENCE) -> np.ndarray:
    return np.isfinite(data) & ((dq.astype(np.uint32, copy=False) & np.uint32(bad_bits)) == 0)


def clipped_median(values: np.ndarray, sigma: float = 3.0, maxiters: int = 10) -> float:
    """Sigma-clipped median of the finite ``values`` (NaN when there are none)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan
    return float(sigma_clipped_stats(values, sigma=sigma, maxiters=maxiters)[1])


def combine_sky_frames(
    science: np.ndarray,
    science_dq: np.ndarray,
    frames: Sequence[SkyFrame],
    *,
    sigma: float = 3.0,
    maxiters: int = 5,
) -> SkyEstimate:
    """Background for ``science`` from sky frames (see the module docstring)."""
    if not frames:
        raise ValueError("no sky frames to combine")
    for frame in frames:
        if frame.data.shape != science.shape:
            raise ValueError(f"sky frame {frame.name} has shape {frame.data.shape}; "
                             f"science has {science.shape}")
    goods = [good_pixels(f.data, f.dq) for f in frames]
    levels = [clipped_median(f.data[g], sigma) for f, g in zip(frames, goods, strict=True)]
    for frame, level in zip(frames, levels, strict=True):
        if not math.isfinite(level):
            raise ValueError(f"sky frame {frame.name} has no usable pixels")
    multiplicative = min(levels) > 0
    n = len(frames)
    stack = np.empty((n, *science.shape), np.float32)
    var_stack = np.empty((n, *science.shape), np.float32)
    for i, (frame, good, level) in enumerate(zip(frames, goods, levels, strict=True)):
        if multiplicative:
            stack[i] = np.where(good, frame.data / level, np.nan)
            var_stack[i] = np.where(good, (frame.err / level) ** 2, np.nan)
        else:
            stack[i] = np.where(good, frame.data - level, np.nan)
            var_stack[i] = np.where(good, frame.err**2, np.nan)
    if n >= 3:
        with warnings.catch_warnings():  # NaN marks bad pixels on purpose
            warnings.simplefilter("ignore", AstropyUserWarning)
            clipped = sigma_clip(stack, sigma=sigma, maxiters=maxiters, axis=0, masked=False,
                                 copy=False)
    else:
        clipped = stack  # with one or two frames there is nothing to clip against
    used = np.isfinite(clipped)
    pattern, nused = nanmedian_axis0(clipped)
    no_sky = nused == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        var_pattern = np.nansum(np.where(used, var_stack, 0.0), axis=0) / np.maximum(nused, 1) ** 2
    var_pattern *= np.where(nused >= 3, math.pi / 2, 1.0)
    neutral = 1.0 if multiplicative else 0.0
    pattern = np.where(no_sky, neutral, pattern)

    sci_good = good_pixels(science, science_dq) & ~no_sky
    if multiplicative:
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = clipped_median((science / pattern)[sci_good], sigma)
        background = scale * pattern
        variance = scale**2 * var_pattern
        how = f"{n} sky frame(s) scaled by {scale:.6g}"
    else:
        offset = clipped_median((science - pattern)[sci_good], sigma)
        background = pattern + offset
        variance = var_pattern
        how = f"{n} sky frame(s) combined additively (level <= 0), offset {offset:.6g}"
    if not math.isfinite(float(np.nanmedian(background))):
        raise ValueError("science frame has no usable pixels to scale the sky to")
    variance = np.where(no_sky, 0.0, variance)
    level = float(np.median(background))
    return SkyEstimate(background.astype(np.float32), variance.astype(np.float32), no_sky,
                       "frames", level, how)


def model_background(
    science: np.ndarray,
    science_dq: np.ndarray,
    *,
    box_size: int = 64,
    filter_size: int = 3,
    sigma: float = 3.0,
    source_nsigma: float = 3.0,
    dilate: int = 3,
    engine: str = "mesh",
) -> SkyEstimate:
    """2-D background model of ``science`` (Background2D's algorithm, two passes).

    ``engine='mesh'`` (default) computes Background2D's numbers with :mod:`._mesh` (~10x
    faster at 4096^2); ``engine='photutils'`` runs photutils ``Background2D`` itself (the
    oracle the tests compare against). They agree to float32 rounding on the same source
    mask; a pixel whose first-pass excess sits exactly at the source threshold can flip
    between them, which moves the second-pass background by far less than 1e-3 of its RMS.
    """
    ny, nx = science.shape
    box = int(max(8, min(box_size, ny, nx)))
    # A median filter over a grid of few meshes mostly flattens real gradients at the edges;
    # it only earns its place (suppressing star-contaminated meshes) on larger grids.
    if min(ny // box, nx // box) < 2 * filter_size:
        filter_size = 1
    bad = ~good_pixels(science, science_dq)
    if engine == "photutils":
        estimate = _background2d_estimator(science, bad, box, filter_size, sigma)
        label = "Background2D"
    elif engine == "mesh":
        estimate = _mesh_estimator(science, box, filter_size, sigma)
        label = "Background2D-equivalent mesh"
    else:
        raise ValueError(f"background model engine {engine!r}: expected 'mesh' or 'photutils'")

    first_bkg, first_rms = estimate(bad)
    with np.errstate(invalid="ignore"):
        # Bad pixels may hold NaN/inf: they compare False and are excluded below anyway.
        # float32 data: the difference goes into the first background's buffer (same values).
        excess = np.subtract(science, first_bkg,
                             out=first_bkg if science.dtype == np.float32 else None)
        first_rms *= np.float32(source_nsigma)
        sources = excess > first_rms
    del excess
    sources &= ~bad
    if dilate > 0:
        sources = _mesh.dilate_cross(sources, dilate)
    # The second pass writes into the first pass's full-frame buffers.
    buffers = (first_bkg, first_rms) if first_bkg.dtype == np.float32 else (None, None)
    try:
        background, rms = estimate(bad | sources, *buffers)
    except ValueError:  # sources fill whole boxes: keep the first pass rather than fail
        log.warning("background model: second pass failed with sources masked; using the first")
        background, rms = estimate(bad, *buffers)
    variance = _mesh.variance_of_mean(rms, box, out=rms)
    level = float(np.median(background))
    detail = f"{label} model (box {box}, filter {filter_size}); no sky frames"
    return SkyEstimate(background, variance, np.zeros(science.shape, bool), "model", level, detail)


def _mesh_estimator(science: np.ndarray, box: int, filter_size: int, sigma: float):
    """mask -> (background, rms) full-size float32 images, by :mod:`._mesh`."""

    def estimate(mask: np.ndarray, bkg_out: np.ndarray | None = None,
                 rms_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        bkg_mesh, rms_mesh = _mesh.box_statistics(science, mask, box, sigma=sigma, maxiters=10,
                                                  exclude_percentile=50.0)
        bkg_mesh = _mesh.fill_and_filter(bkg_mesh, filter_size)
        rms_mesh = _mesh.fill_and_filter(rms_mesh, filter_size)
        return (_mesh.upsample(bkg_mesh, box, science.shape, out=bkg_out),
                _mesh.upsample(rms_mesh, box, science.shape, out=rms_out))

    return estimate


def _background2d_estimator(science: np.ndarray, bad: np.ndarray, box: int, filter_size: int,
                            sigma: float):
    """mask -> (background, rms) full-size float32 images, by photutils Background2D."""
    from photutils.background import Background2D, MedianBackground

    data = np.where(bad, 0.0, science).astype(np.float32)
    clip = SigmaClip(sigma=sigma, maxiters=10)

    def estimate(mask: np.ndarray, *_buffers: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        bkg = Background2D(data, box, mask=mask, filter_size=filter_size, sigma_clip=clip,
                           bkg_estimator=MedianBackground(), exclude_percentile=50.0)
        return np.asarray(bkg.background, np.float32), np.asarray(bkg.background_rms, np.float32)

    return estimate


def subtract_sky(
    sci: np.ndarray, err: np.ndarray, dq: np.ndarray, estimate: SkyEstimate
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sci - background, ERR with the background variance added, DQ | NO_SKY where none)."""
    out_sci = np.empty(sci.shape, np.float32)
    out_err = np.empty(sci.shape, np.float32)
    out_dq = np.empty(sci.shape, np.uint32)
    for b in row_blocks(sci.shape):
        out_sci[b] = sci[b] - estimate.background[b]
        out_err[b] = np.sqrt(err[b].astype(np.float64) ** 2 + estimate.variance[b])
        dq_b = dq[b].astype(np.uint32, copy=True)
        dq_b[estimate.no_sky[b]] |= NO_SKY
        out_dq[b] = dq_b
    return out_sci, out_err, out_dq
