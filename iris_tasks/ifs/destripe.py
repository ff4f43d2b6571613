"""Row-stripe (residual 1/f) removal for IFS rate images from the unlit pixels between spectra.

The readout's reference-pixel correction follows 1/f drifts with an 11-row running mean of
the side reference pixels (docs/readout.md), so the part of the 1/f noise that changes from
row to row survives into the ``_rate`` image as an offset per row and readout channel (a
stripe along the fast-read direction x, partly common to all channels). Most of an IFS frame
sees no light - ~78 % of a lenslet frame lies between the spectra - so those pixels measure
each stripe directly: the robust (median) level of the unlit good pixels of one row of one
channel is that row segment's offset, and subtracting it from the whole segment removes the
stripe from the lit pixels too.

Channel layout (H4RG, as the readout and the simulator use it): ``nchan`` vertical bands of
columns, channel ``c`` = columns ``ceil(c nx / nchan) .. ceil((c + 1) nx / nchan) - 1``, each
read along x (a row segment is ~1 ms of one output at 4k) and row after row in y.

Pure functions over arrays; :class:`iris_tasks.ifs.destripe_step.DestripeStep` is the stpipe
layer. See docs/ifs.md, "1/f destriping from unlit pixels".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["DestripeResult", "channel_edges", "destripe", "row_channel_offsets", "unlit_mask"]


@dataclass
class DestripeResult:
    """What :func:`destripe` removed."""

    data: np.ndarray  # (ny, nx) corrected image
    offsets: np.ndarray  # (ny, nchan) offset subtracted from each row segment (0 where skipped)
    counts: np.ndarray  # (ny, nchan) usable unlit pixels behind each segment's own estimate
    n_direct: int  # row segments corrected with their own median
    n_fallback: int  # row segments corrected with their row's median over channels
    n_skipped: int  # row segments left unchanged (no estimate in the whole row)
    rms: float  # rms of the subtracted offsets over the corrected segments

    @property
    def n_segments(self) -> int:
        return self.n_direct + self.n_fallback + self.n_skipped


def channel_edges(nx: int, nchan: int) -> np.ndarray:
    """First column of every channel and ``nx``: (nchan + 1,) ints, the readout's layout."""
    if not 1 <= nchan <= nx:
        raise ValueError(f"{nchan} channels do not fit {nx} columns")
    c = np.arange(nchan + 1, dtype=np.int64)
    return -(-(c * nx) // nchan)  # ceil(c nx / nchan), exact in integers


def unlit_mask(trace_x: np.ndarray, trace_y: np.ndarray, psf_sigma: float,
               shape: tuple[int, int], mask_sigma: float = 4.0,
               min_half: int = 0) -> np.ndarray:
    """(ny, nx) bool: pixels farther than ``mask_sigma`` PSF sigmas (in x) from every trace,
    and at least ``min_half`` columns (the measured profile's window with its halo, plus the
    flexure the frame may have moved by).

    The trace (TRACE_X/TRACE_Y, (ny_s, nx_s, nwave), 0-based pixel centres) puts each sample on
    rows ``floor(y)`` and ``floor(y) + 1`` (the extraction's linear split in y) and spreads it
    in x; every pixel within ``ceil(mask_sigma * sigma)`` columns of ``rint(x)`` on those rows
    counts as lit. Built with one interval-start/-stop histogram and a cumulative sum along x,
    so a 16M-sample slicer trace costs one bincount rather than a write per masked pixel.
    """
    ny, nx = (int(v) for v in shape)
    if not (np.isfinite(psf_sigma) and psf_sigma > 0):
        raise ValueError(f"psf_sigma must be positive, got {psf_sigma!r}")
    if mask_sigma < 0:
        raise ValueError(f"mask_sigma must be >= 0, got {mask_sigma!r}")
    half = max(int(math.ceil(mask_sigma * float(psf_sigma))), int(min_half))
    x = np.asarray(trace_x, np.float32).ravel()
    y = np.asarray(trace_y, np.float32).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    xr = np.rint(x).astype(np.int64)
    lo = np.clip(xr - half, 0, nx)
    hi = np.clip(xr + half + 1, 0, nx)  # exclusive
    y0 = np.floor(y).astype(np.int64)
    width = nx + 1  # one spare column takes the stops at nx
    marks = np.zeros(ny * width, np.int64)
    for row in (y0, y0 + 1):
        ok = (row >= 0) & (row < ny) & (hi > lo)
        base = row[ok] * width
        marks += np.bincount(base + lo[ok], minlength=ny * width)
        marks -= np.bincount(base + hi[ok], minlength=ny * width)
    cover = np.cumsum(marks.reshape(ny, width), axis=1)[:, :nx]
    return cover == 0


def _segments(a: np.ndarray, edges: np.ndarray, fill) -> np.ndarray:
    """(ny, nchan, wmax) view/copy of (ny, nx) ``a`` by channel, ``fill`` past a short channel."""
    ny, nx = a.shape
    widths = np.diff(edges)
    nchan, wmax = widths.size, int(widths.max())
    if np.all(widths == wmax):
        return a.reshape(ny, nchan, wmax)  # equal channels: a view, no copy
    col = edges[:-1, None] + np.arange(wmax)[None, :]
    inside = col < edges[1:, None]
    padded = np.concatenate([a, np.full((ny, 1), fill, a.dtype)], axis=1)
    return padded[:, np.where(inside, col, nx)]


def _rank(seg: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Element ``index`` (per segment) of the sorted segments, as float64."""
    index = np.clip(index, 0, seg.shape[-1] - 1)
    return np.take_along_axis(seg, index[..., None], axis=-1)[..., 0].astype(np.float64)


def row_channel_offsets(data: np.ndarray, usable: np.ndarray, nchan: int, *, clip: float = 0.0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Level of the ``usable`` pixels of every row segment: ((ny, nchan) float64 with NaN
    where a segment has no usable pixel, (ny, nchan) int counts).

    ``clip`` = 0: the median. ``clip`` > 0: the mean of the pixels within ``clip`` sigma of
    the median, sigma = half the 15.9-84.1 % range of the segment. The median of pure noise
    scatters sqrt(pi/2) = 1.25 times more than the mean; the clipped mean keeps most of the
    mean's efficiency and still drops hot pixels, cosmic-ray hits and PSF wings.

    Vectorised over all segments: unusable pixels become +inf, each segment is sorted once
    (np.sort along the last axis; 128 values a segment at 4k) and order statistics are read
    at per-segment indices - no Python loop and no nanmedian (which falls back to per-row
    work for this shape).
    """
    d = np.asarray(data)
    m = np.asarray(usable, bool)
    if d.shape != m.shape or d.ndim != 2:
        raise ValueError(f"data {d.shape} and usable {m.shape} must be equal 2-D shapes")
    m = m & np.isfinite(d)  # a NaN would sort past +inf and be read as a value
    edges = channel_edges(d.shape[1], nchan)
    vals = np.where(m, d.astype(np.float32, copy=False), np.float32(np.inf))
    seg = _segments(vals, edges, np.float32(np.inf))
    seg = np.sort(seg, axis=-1)
    counts = np.count_nonzero(_segments(m, edges, False), axis=-1)
    empty = counts == 0
    med = 0.5 * (_rank(seg, np.maximum(counts - 1, 0) // 2) + _rank(seg, counts // 2))
    med[empty] = 0.0  # read +inf above; NaN below
    if clip > 0:
        last = np.maximum(counts - 1, 0)
        q16 = _rank(seg, np.rint(0.1587 * last).astype(np.int64))
        q84 = _rank(seg, np.rint(0.8413 * last).astype(np.int64))
        spread = np.where(empty, 0.0, q84 - np.where(empty, 0.0, q16))
        half = (clip * 0.5 * spread).astype(np.float32)[..., None]
        dev = seg - med.astype(np.float32)[..., None]  # +inf for unusable pixels
        keep = np.abs(dev) <= half
        n_keep = np.count_nonzero(keep, axis=-1)
        # mean deviation from the median (float32 sums of ~100 small numbers: exact enough)
        shift = np.where(keep, dev, np.float32(0)).sum(axis=-1, dtype=np.float64)
        med = np.where(n_keep > 0, med + shift / np.maximum(n_keep, 1), med)
    med[empty] = np.nan
    return med, counts


def destripe(data: np.ndarray, usable: np.ndarray, nchan: int, *, min_unlit: int = 16,
             fallback: bool = True, fallback_channels: int = 4, clip: float = 0.0
             ) -> DestripeResult:
    """Subtract each row segment's unlit-pixel level (median, or with ``clip`` > 0 the
    clipped mean of :func:`row_channel_offsets`) from the whole segment.

    ``usable``: (ny, nx) bool, unlit and good pixels (see :func:`unlit_mask`; DQ and
    reference pixels are the caller's to remove). A segment with fewer than ``min_unlit``
    usable pixels gets no estimate of its own: with ``fallback`` it takes the median of its
    row's estimated segments (the 1/f part common to all channels, which the simulator puts
    at half the variance), provided at least ``fallback_channels`` segments of the row have
    one; otherwise it is left unchanged. (From one channel the "common" estimate would carry
    that channel's own 1/f as well - as much noise as it removes - hence the minimum.) NaN
    pixels stay NaN. The input array is not modified.
    """
    if min_unlit < 1:
        raise ValueError(f"min_unlit must be >= 1, got {min_unlit}")
    d = np.asarray(data)
    ny, nx = d.shape
    med, counts = row_channel_offsets(d, usable, nchan, clip=clip)
    direct = counts >= min_unlit
    offsets = np.where(direct, med, np.nan)
    n_fallback = 0
    if fallback:
        enough = direct.sum(axis=1, keepdims=True) >= max(1, fallback_channels)
        need = ~direct & enough
        if need.any():
            rows = np.flatnonzero(need.any(axis=1))
            row_med = np.nanmedian(offsets[rows], axis=1)
            fill = np.broadcast_to(row_med[:, None], (rows.size, offsets.shape[1]))
            sub = offsets[rows]
            sub[need[rows]] = fill[need[rows]]
            offsets[rows] = sub
            n_fallback = int(need.sum())
    skipped = ~np.isfinite(offsets)
    offsets[skipped] = 0.0
    edges = channel_edges(nx, nchan)
    dtype = d.dtype if np.issubdtype(d.dtype, np.floating) else np.float64
    # (ny, nx) offset of every pixel, in the image's precision (no float64 temporary at 4k)
    per_col = np.repeat(offsets.astype(dtype), np.diff(edges), axis=1)
    out = np.subtract(d, per_col, dtype=dtype)
    done = ~skipped
    rms = float(np.sqrt(np.mean(offsets[done] ** 2))) if done.any() else 0.0
    return DestripeResult(data=out, offsets=offsets, counts=counts,
                          n_direct=int(direct.sum()), n_fallback=n_fallback,
                          n_skipped=int(skipped.sum()), rms=rms)
