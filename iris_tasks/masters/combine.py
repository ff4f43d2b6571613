"""Chunked, memory-mapped sigma-clipped combination of a stack of rate images.

A stack of 20 full frames (4096 x 4096 float32) is 1.3 GB before any temporaries, so the
frames are never loaded whole: every file is memory-mapped (astropy ``memmap=True``) and the
stack is combined a band of rows at a time. The band height follows a memory budget
(``max_memory_mb``); each band costs about ``BYTES_PER_VALUE`` bytes per stacked value
(values, errors, DQ, sorted copies, masks). Bands are independent, so ``threads`` workers
combine bands in parallel (numpy's sort and reductions release the GIL).

Clipping. A master is made of few frames (5 darks a night is common), and the spread of a
handful of values is a poor yardstick: with the sample std an outlier inflates the spread it
is judged by (among n values it can never sit more than (n - 1)/sqrt(n) std away: 1.8 for
n = 5), and the MAD of 5 values is so erratic that good values get clipped and the mean
biased. Every rate image carries ERR, the per-pixel uncertainty of its own ramp fit, so a
value is clipped when it lies more than ``sigma`` of *its own ERR* from the median of the
frames (iterated ``maxiters`` times on the surviving values). Inputs without ERR fall back to
astropy's ``sigma_clip`` with the sample std (outliers then survive in small stacks).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clip
from astropy.utils.exceptions import AstropyUserWarning

from ..datamodels.dqflags import BAD_FOR_SCIENCE, pixel
from ..steps._stats import nanmedian_axis0

log = logging.getLogger(__name__)

BYTES_PER_VALUE = 40
DEFAULT_MAX_MEMORY_MB = 256.0

# preprocess(frame_index, row0, row1, values, errors) -> (values, errors): e.g. dark
# subtraction and normalisation of flats (errors may be None when a frame has no ERR).
Preprocess = Callable[[int, int, int, np.ndarray, "np.ndarray | None"],
                      "tuple[np.ndarray, np.ndarray | None]"]


@dataclass
class CombineResult:
    """Per-pixel statistics of the clipped stack."""

    mean: np.ndarray  # float32, NaN where no frame survived
    std: np.ndarray  # float32, sample std (ddof=1) of the surviving values, NaN where < 2
    nused: np.ndarray  # uint16, frames surviving the clip
    nframes: int


class _Frame:
    """One memory-mapped input: SCI and (optional) ERR and DQ read band by band."""

    def __init__(self, path: str | os.PathLike, bad_bits: int):
        self.path = os.fspath(path)
        # do_not_scale_image_data keeps the uint32 DQ (stored as int32 + BZERO) memory-mapped
        # instead of astropy converting the whole array on first access.
        self.hdul = fits.open(self.path, memmap=True, do_not_scale_image_data=True)
        if "SCI" not in self.hdul:
            self.hdul.close()
            raise ValueError(f"{self.path}: no SCI extension")
        self.sci = self.hdul["SCI"]
        self.shape = tuple(self.sci.shape)
        self.dq = self.hdul["DQ"] if "DQ" in self.hdul else None
        self.err = self.hdul["ERR"] if "ERR" in self.hdul else None
        self.bad_bits = np.uint32(bad_bits)

    def band(self, r0: int, r1: int) -> np.ndarray:
        data = np.array(self.sci.data[r0:r1], dtype=np.float32)
        self._release(self.sci, r0, r1)
        if self.dq is not None:
            dq = _dq_values(self.dq.data[r0:r1], self.dq.header)
            self._release(self.dq, r0, r1)
            data[(dq & self.bad_bits) != 0] = np.nan
        return data

    def err_band(self, r0: int, r1: int) -> np.ndarray | None:
        if self.err is None:
            return None
        err = np.array(self.err.data[r0:r1], dtype=np.float32)
        self._release(self.err, r0, r1)
        return err

    def _release(self, hdu: fits.ImageHDU, r0: int, r1: int) -> None:
        """Unmap the pages of rows r0:r1 once copied (MADV_DONTNEED).

        Mapped file pages count in the process RSS (and a container's memory) until
        unmapped; without this a full pass over 20 x 128 MB inputs would show 2.5 GB
        resident although every page is clean page cache. The data stay in the page cache
        and are re-faulted if touched again. Uses astropy internals (the file's mmap and the
        HDU's data offset), so any surprise there just skips the release.
        """
        try:
            mm = self.hdul._file._mmap
            row = hdu.shape[1] * abs(int(hdu.header["BITPIX"])) // 8
            start = hdu._data_offset + r0 * row
            end = hdu._data_offset + r1 * row
            aligned = start - start % mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
        except Exception:  # no mmap (compressed/remote file), old Python, astropy changes
            pass

    def close(self) -> None:
        self.hdul.close()


def rows_per_band(nframes: int, nx: int, max_memory_mb: float) -> int:
    per_row = nframes * nx * BYTES_PER_VALUE
    return max(1, int(max_memory_mb * 2**20 // max(per_row, 1)))


def combine_files(
    paths: Sequence[str | os.PathLike],
    *,
    sigma: float = 4.0,
    maxiters: int = 3,
    bad_bits: int = BAD_FOR_SCIENCE,
    preprocess: Preprocess | None = None,
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
    threads: int | None = None,
) -> CombineResult:
    """Sigma-clipped mean of the SCI arrays of ``paths`` (DQ-flagged pixels excluded)."""
    if not paths:
        raise ValueError("no frames to combine")
    with contextlib.ExitStack() as stack:
        frames = []
        for path in paths:
            frame = _Frame(path, bad_bits)
            stack.callback(frame.close)
            frames.append(frame)
        shape = frames[0].shape
        for frame in frames[1:]:
            if frame.shape != shape:
                raise ValueError(f"{frame.path}: SCI shape {frame.shape} differs from "
                                 f"{frames[0].path} {shape}")
        ny, nx = shape
        n = len(frames)
        rows = rows_per_band(n, nx, max_memory_mb / max(threads or _default_threads(), 1))
        mean = np.empty(shape, np.float32)
        std = np.empty(shape, np.float32)
        nused = np.empty(shape, np.uint16)

        with_err = all(frame.err is not None for frame in frames)
        if not with_err:
            log.warning("some inputs have no ERR array: clipping on the sample std, which "
                        "cannot reject outliers among few frames")

        def work(r0: int) -> None:
            r1 = min(r0 + rows, ny)
            band = np.empty((n, r1 - r0, nx), np.float32)
            errs = np.empty((n, r1 - r0, nx), np.float32) if with_err else None
            for i, frame in enumerate(frames):
                values = frame.band(r0, r1)
                err = frame.err_band(r0, r1) if with_err else None
                if preprocess:
                    values, err = preprocess(i, r0, r1, values, err)
                band[i] = values
                if errs is not None:
                    errs[i] = err
            m, s, c = clipped_stats(band, errs, sigma=sigma, maxiters=maxiters, quiet=False)
            mean[r0:r1], std[r0:r1], nused[r0:r1] = m, s, c

        starts = range(0, ny, rows)
        nthreads = threads or _default_threads()
        log.debug("combining %d frames %s in bands of %d rows with %d threads", n, shape, rows, nthreads)
        # NaN marks excluded pixels on purpose; astropy warns about them in every band. The
        # filter is set here, around all worker threads, because warnings.catch_warnings
        # is process-global and not safe to enter and leave from several threads.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyUserWarning)
            if nthreads > 1 and len(starts) > 1:
                with ThreadPoolExecutor(nthreads) as pool:
                    list(pool.map(work, starts))
            else:
                for r0 in starts:
                    work(r0)
    return CombineResult(mean, std, nused, n)


def clip_with_errors(band: np.ndarray, err: np.ndarray, *, sigma: float, maxiters: int
                     ) -> np.ndarray:
    """``band`` with NaN where a value lies > ``sigma`` x its own ``err`` from the median.

    The median is recomputed on the surviving values up to ``maxiters`` times. A missing or
    non-finite error never clips its value. ``band`` is modified in place and returned.
    """
    limit = err * np.float32(sigma)
    with np.errstate(invalid="ignore"):
        limit[~(limit > 0)] = np.inf  # NaN or zero error: no clipping
    finite = np.isfinite(band)
    center, _ = nanmedian_axis0(band)
    keep = finite
    dev = np.empty_like(band)
    for _ in range(max(int(maxiters), 1)):
        with np.errstate(invalid="ignore"):
            np.subtract(band, center, out=dev)
            np.abs(dev, out=dev)
            new_keep = dev <= limit  # NaN values compare False
        # Only pixels whose surviving set changed need a new median: usually a few (cosmic
        # rays, hot pixels), so gather those columns instead of re-sorting the whole band.
        changed = (new_keep != keep).any(axis=0)
        keep = new_keep
        if not changed.any():
            break
        sub = np.where(keep[:, changed], band[:, changed], np.float32(np.nan))
        sub_center, count = nanmedian_axis0(sub)
        center = center.copy()
        center[changed] = np.where(count > 0, sub_center, np.nan)
    band[~keep] = np.nan
    return band


def clipped_stats(band: np.ndarray, err: np.ndarray | None = None, *, sigma: float = 4.0,
                  maxiters: int = 3, quiet: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std ddof=1, count) over axis 0 after clipping about the median.

    With ``err`` (same shape) values are clipped on their own errors (see the module
    docstring); without, astropy's ``sigma_clip`` with the sample std. ``quiet`` silences
    astropy's warning about NaN input (NaN = excluded, on purpose); pass False from worker
    threads, whose caller sets the filter once for all of them.
    """
    if err is not None:
        clipped = clip_with_errors(band, err, sigma=sigma, maxiters=maxiters)
    elif band.shape[0] >= 3:
        with warnings.catch_warnings() if quiet else contextlib.nullcontext():
            if quiet:
                warnings.simplefilter("ignore", AstropyUserWarning)
            clipped = sigma_clip(band, sigma=sigma, maxiters=maxiters, axis=0, masked=False,
                                 copy=False, cenfunc="median", stdfunc="std")
    else:  # nothing to clip against with fewer than three values
        clipped = band
    good = ~np.isnan(clipped)
    count = np.count_nonzero(good, axis=0)
    if clipped is band:
        clipped = clipped.copy()  # fewer than three frames: do not zero the caller's data
    # In place from here: clipped values become 0, then squared deviations.
    np.copyto(clipped, 0.0, where=~good)
    total = clipped.sum(axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        clipped -= mean.astype(np.float32)
        clipped *= good
        np.square(clipped, out=clipped)
        var = clipped.sum(axis=0, dtype=np.float64) / (count - 1)
    mean = np.where(count > 0, mean, np.nan)
    std = np.sqrt(np.where(count > 1, var, np.nan))
    return mean.astype(np.float32), std.astype(np.float32), count.astype(np.uint16)


def clip_variance_factor(sigma: float) -> float:
    """Variance of a normal distribution truncated at +-sigma, relative to the untruncated.

    Sigma clipping removes the tails, so the std of the surviving values underestimates the
    true std by this factor's square root (0.973 in variance for 3-sigma clipping).
    """
    from scipy.stats import norm

    kept = 2 * norm.cdf(sigma) - 1
    return float(1 - 2 * sigma * norm.pdf(sigma) / kept) if kept > 0 else 1.0


def sample_frame(path: str | os.PathLike, step: int = 4, bad_bits: int = BAD_FOR_SCIENCE) -> np.ndarray:
    """Every ``step``-th pixel of every ``step``-th row of SCI (DQ-bad -> NaN).

    Enough for a frame's median level (1/16 of 16.7 M pixels) at a fraction of a full read.
    """
    frame = _Frame(path, bad_bits)
    try:
        data = np.array(frame.sci.data[::step, ::step], dtype=np.float32)
        if frame.dq is not None:
            dq = _dq_values(frame.dq.data[::step, ::step], frame.dq.header)
            data[(dq & frame.bad_bits) != 0] = np.nan
        return data
    finally:
        frame.close()


# DQ bits that describe the pixel, not the exposure: the same in every frame of a detector.
STATIC_BITS = np.uint32(pixel["REFERENCE_PIXEL"] | pixel["NON_SCIENCE"])


def static_dq(path: str | os.PathLike, shape: tuple[int, ...], bits: int = STATIC_BITS) -> np.ndarray:
    """``bits`` (default REFERENCE_PIXEL | NON_SCIENCE) of one input frame's DQ (zeros if none)."""
    frame = _Frame(path, 0)
    try:
        if frame.dq is None:
            return np.zeros(shape, np.uint32)
        return _dq_values(frame.dq.data[:], frame.dq.header) & np.uint32(bits)
    finally:
        frame.close()


def _dq_values(raw: np.ndarray, header: fits.Header) -> np.ndarray:
    """Unscaled DQ values of a raw (do_not_scale_image_data) band: stored int32 + BZERO."""
    bzero = int(header.get("BZERO", 0))
    if bzero == 2**31 and raw.dtype.itemsize == 4 and header.get("BSCALE", 1) == 1:
        # uint32 stored as int32 - 2**31: adding 2**31 is flipping the top bit.
        return raw.view(raw.dtype.str.replace("i", "u")) ^ np.uint32(2**31)
    return (raw.astype(np.int64) + bzero).astype(np.uint32)


def _default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))
