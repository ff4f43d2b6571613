"""Python face of readout_cy: validation, result objects, batch and streaming drivers.

The heavy lifting is in the Cython extension ``readout_cy._kernels``; this module checks
inputs (clear ``TypeError``/``ValueError`` messages), converts them to the contiguous
float32/float64 layouts the kernels expect and allocates the outputs.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from typing import Any

import numpy as np

from . import _kernels as _k

log = logging.getLogger(__name__)

MODES = ("cds", "mcds", "utr")
WEIGHTINGS = ("unweighted", "optimal")
REFPIX_BORDER = 4
_MODE_CODE = {"utr": 0, "mcds": 1, "cds": 1}

ArrayLike = Any


@dataclass(frozen=True)
class DQFlags:
    """The DQ bit values readout_cy sets, as given by the caller.

    readout_cy imports numpy only, so it does not hold the project's DQ definition
    (``iris_tasks.datamodels.dqflags.pixel``): every function that writes DQ takes a
    ``dqflags`` argument, a :class:`DQFlags` or a mapping with (at least) the JWST names
    below, e.g. ``pixel`` itself -- as stcal's ``ramp_fit`` takes ``dqflags``.  Each value
    must be a single bit of a uint32.  BAD_REF_PIXEL marks reference pixels the correction
    did not use; UNRELIABLE_BIAS the pixels whose channel (or rows) had no usable reference.
    """

    do_not_use: int
    saturated: int
    jump_det: int
    no_gain_value: int
    no_lin_corr: int
    no_sat_check: int
    reference_pixel: int
    bad_ref_pixel: int
    unreliable_bias: int

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"DQ bit {f.name.upper()} must be an int, got {type(v).__name__}")
            if not (0 < v < 2**32) or v & (v - 1):
                raise ValueError(f"DQ bit {f.name.upper()} must be a single bit of a uint32, got {v}")
            object.__setattr__(self, f.name, int(v))

    @classmethod
    def from_mapping(cls, flags: Mapping[str, int]) -> DQFlags:
        """From a name -> value mapping such as ``iris_tasks.datamodels.dqflags.pixel``."""
        names = [f.name.upper() for f in fields(cls)]
        missing = [n for n in names if n not in flags]
        if missing:
            raise ValueError(f"dqflags lacks the DQ bit(s) {', '.join(missing)} readout_cy sets")
        return cls(*(flags[n] for n in names))


def _dq_bits(dqflags: DQFlags | Mapping[str, int]) -> DQFlags:
    """The ``dqflags`` argument of the public functions as a :class:`DQFlags`."""
    if isinstance(dqflags, DQFlags):
        return dqflags
    if isinstance(dqflags, Mapping):
        return DQFlags.from_mapping(dqflags)
    raise TypeError(
        "dqflags must be a readout_cy.DQFlags or a mapping of DQ names to bit values "
        f"(e.g. iris_tasks.datamodels.dqflags.pixel), got {type(dqflags).__name__}"
    )


@dataclass
class RefpixReport:
    """What the reference-pixel correction used.

    ``excluded``: (y, x) index arrays of the border pixels left out (flagged by the caller,
    or outliers in their own behaviour over the reads); ``rejected``: how many of those were found from the
    data (not flagged); ``bad_channels``: output channels whose top/bottom reference was
    unusable (too few good pixels: their offsets follow the mean of the usable channels);
    ``bad_rows``: rows whose side-column window had no usable pixel (no row correction);
    ``off`` / ``rowc``: the offset tables applied (:meth:`correction`; None from the
    streaming accumulator, which does not keep them).
    """

    excluded: tuple[np.ndarray, np.ndarray]
    rejected: int
    bad_channels: tuple[int, ...]
    bad_rows: tuple[int, ...]
    off: np.ndarray | None = None  # (nramps * nreads, nch) channel offsets, DN
    rowc: np.ndarray | None = None  # (nramps * nreads, ny) row offsets, DN (tied)

    def correction(self, ramp: int, nreads: int, rows: slice, cols: slice, nx: int) -> np.ndarray:
        """(nreads, nrows, ncols) float32 DN the correction subtracted from the raw reads of
        ``ramp`` in that window (for re-fitting a few pixels with the kernels one by one)."""
        nch = self.off.shape[1]
        chan = (np.arange(nx)[cols] * nch) // nx
        f = slice(ramp * nreads, (ramp + 1) * nreads)
        return (self.off[f][:, None, chan] + self.rowc[f][:, rows, None]).astype(np.float32)


@dataclass
class RampResult:
    """Slope image of one exposure (rates in DN/s, variances in (DN/s)^2)."""

    slope: np.ndarray
    var_poisson: np.ndarray
    var_rnoise: np.ndarray
    err: np.ndarray
    dq: np.ndarray
    nused: np.ndarray
    refpix: RefpixReport | None = None
    # clean_flicker's background sums of this result, when process_ramp(flicker=) was
    # asked for them; whoever changes slope, err or dq afterwards must drop them (None)
    flicker: FlickerSums | None = None


@dataclass(frozen=True)
class FlickerSpec:
    """What :func:`process_ramp` (``flicker=``) needs to compute clean_flicker's background
    sums (:func:`flicker_sums` of its result) inside its row loop: the output ``channels``,
    the DQ bits of pixels that are not background (``skip``), the source threshold
    ``nsigma`` and the ``dilate`` of the source mask.  ``chunk_rows``: rows a thread fits
    in one go (the sums of a chunk's first and last ``dilate`` rows wait until the loop
    ends); the values do not depend on it."""

    channels: int
    skip: int
    nsigma: float = 3.0
    dilate: int = 2
    chunk_rows: int = 256

    def same_sums(self, other: FlickerSpec) -> bool:
        """True when ``other`` asks for the same sums (``chunk_rows`` aside)."""
        return (int(self.channels) == int(other.channels)
                and int(self.skip) == int(other.skip)
                and np.float32(self.nsigma) == np.float32(other.nsigma)
                and max(int(self.dilate), 0) == max(int(other.dilate), 0))


@dataclass
class FlickerSums:
    """:func:`flicker_sums`'s six outputs for a slope image and the :class:`FlickerSpec`
    they were computed with (``RampResult.flicker``)."""

    spec: FlickerSpec
    sums: tuple[np.ndarray, ...]


@dataclass
class SaturationResult:
    """``ngood``: leading reads below saturation (per ramp); ``dq``: pixel DQ."""

    ngood: np.ndarray
    dq: np.ndarray


@dataclass
class LinearityResult:
    data: np.ndarray
    dq: np.ndarray


@dataclass
class JumpResult:
    """``jumps[k]`` flags the difference between reads k and k+1; ``median_rate`` in DN/s."""

    jumps: np.ndarray
    median_rate: np.ndarray
    dq: np.ndarray


# ----------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------


def _threads(threads: int | None) -> int:
    if threads is None:
        return max(int(_k.max_threads()), 1)
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"threads must be an int or None, got {type(threads).__name__}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return int(threads)


def _as_ramps_uint16(reads: ArrayLike, name: str = "reads") -> np.ndarray:
    """(nreads, ny, nx) or (nramps, nreads, ny, nx) uint16 -> C-contiguous 4-D view."""
    if not isinstance(reads, np.ndarray):
        raise TypeError(f"{name} must be a numpy ndarray of uint16, got {type(reads).__name__}")
    if reads.dtype.kind != "u" or reads.dtype.itemsize != 2:
        raise TypeError(f"{name} must have dtype uint16 (raw DN), got {reads.dtype}")
    if reads.dtype != np.uint16:  # big-endian uint16 straight from FITS: native copy
        reads = reads.astype(np.uint16)
    if reads.ndim == 3:
        reads = reads[np.newaxis]
    elif reads.ndim != 4:
        raise ValueError(
            f"{name} must have shape (nreads, ny, nx) or (nramps, nreads, ny, nx), "
            f"got {reads.shape}"
        )
    nramps, nr, ny, nx = reads.shape
    if nramps == 0:
        raise ValueError(f"{name} has zero ramps")
    if nr == 0:
        raise ValueError(f"{name} has zero reads")
    if ny == 0 or nx == 0:
        raise ValueError(f"{name} has an empty frame shape {(ny, nx)}")
    return np.ascontiguousarray(reads)


def _as_ramps_float(data: ArrayLike, name: str = "data") -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise TypeError(f"{name} must be a numpy ndarray, got {type(data).__name__}")
    if not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {data.dtype}")
    if data.ndim == 3:
        data = data[np.newaxis]
    elif data.ndim != 4:
        raise ValueError(
            f"{name} must have shape (nreads, ny, nx) or (nramps, nreads, ny, nx), "
            f"got {data.shape}"
        )
    if data.shape[1] == 0:
        raise ValueError(f"{name} has zero reads")
    if data.shape[2] == 0 or data.shape[3] == 0 or data.shape[0] == 0:
        raise ValueError(f"{name} has an empty shape {data.shape}")
    return np.ascontiguousarray(data, dtype=np.float32)


def _times(read_times: ArrayLike, nr: int) -> np.ndarray:
    if read_times is None:
        raise TypeError("read_times is required (seconds of each read, one per read)")
    try:
        t = np.asarray(read_times, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"read_times must be a sequence of numbers: {exc}") from None
    if t.ndim != 1:
        raise ValueError(f"read_times must be 1-D, got shape {t.shape}")
    if t.shape[0] != nr:
        raise ValueError(f"read_times has {t.shape[0]} entries but the ramp has {nr} reads")
    if not np.all(np.isfinite(t)):
        raise ValueError("read_times must be finite")
    if nr > 1 and not np.all(np.diff(t) > 0):
        raise ValueError("read_times must be strictly increasing")
    return np.ascontiguousarray(t)


def _map(
    name: str,
    value: ArrayLike,
    ny: int,
    nx: int,
    *,
    minimum: float | None = None,
    strict: bool = False,
    allow_nan: bool = False,
) -> np.ndarray:
    """Scalar -> float32 array of shape (1,), map -> C-contiguous float32 (ny, nx)."""
    if value is None:
        raise TypeError(f"{name} is required (scalar or ({ny}, {nx}) map)")
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a number or an array, got bool")
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be a number or an array: {exc}") from None
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 0:
        out = np.array([arr], dtype=np.float32)
    elif arr.shape == (ny, nx):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    else:
        raise ValueError(f"{name} must be a scalar or have shape {(ny, nx)}, got {arr.shape}")
    # one pass (NaN flag, NaN-ignoring min and max; ~2 ms for a 4096^2 map) instead of
    # numpy reductions (three passes, ~10 ms) or boolean masks and masked copies (which
    # would allocate and page-fault ~130 MB per 4096^2 map on every call)
    anynan, lo, hi = _k.map_stats(out.reshape(-1), 1)
    if not allow_nan and anynan:
        raise ValueError(f"{name} contains NaN")
    if np.isinf(lo) or np.isinf(hi):
        raise ValueError(f"{name} contains infinite values")
    if minimum is not None and not np.isnan(lo):
        if (lo <= minimum) if strict else (lo < minimum):
            rel = ">" if strict else ">="
            raise ValueError(f"{name} must be {rel} {minimum} (found {lo})")
    return out


def _coeffs(nonlinearity: ArrayLike, ny: int, nx: int) -> np.ndarray | None:
    if nonlinearity is None:
        return None
    if not isinstance(nonlinearity, np.ndarray):
        nonlinearity = np.asarray(nonlinearity)
    if not np.issubdtype(nonlinearity.dtype, np.floating):
        raise TypeError(f"nonlinearity coefficients must be floating point, got {nonlinearity.dtype}")
    if nonlinearity.ndim != 3 or nonlinearity.shape[1:] != (ny, nx) or nonlinearity.shape[0] < 1:
        raise ValueError(
            f"nonlinearity must have shape (ncoeff, {ny}, {nx}) with ncoeff >= 1, "
            f"got {nonlinearity.shape}"
        )
    return np.ascontiguousarray(nonlinearity, dtype=np.float32)


def _mode(mode: str, weighting: str, fowler_k: int | None, nr: int) -> tuple[int, int, int]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if mode == "cds":
        k = 1
    elif mode == "mcds":
        if fowler_k is None:
            k = max(nr // 2, 1)
        else:
            if isinstance(fowler_k, bool) or not isinstance(fowler_k, numbers.Integral):
                raise TypeError(f"fowler_k must be an int, got {type(fowler_k).__name__}")
            if fowler_k < 1:
                raise ValueError(f"fowler_k must be >= 1, got {fowler_k}")
            k = int(fowler_k)
    else:
        k = 1
    return _MODE_CODE[mode], k, int(mode == "utr" and weighting == "optimal")


def _refpix_check(ny: int, nx: int, channels: int, smooth: int | None) -> int:
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
        raise ValueError(f"refpix_channels must be a positive int, got {channels!r}")
    if ny <= 2 * REFPIX_BORDER or nx <= 2 * REFPIX_BORDER:
        raise ValueError(
            f"refpix=True needs a frame with a {REFPIX_BORDER}-pixel reference border on all "
            f"sides, got ({ny}, {nx}); pass refpix=False for subarrays"
        )
    if nx % channels:
        raise ValueError(f"nx={nx} is not divisible by refpix_channels={channels}")
    if smooth is None:
        return 0
    if isinstance(smooth, bool) or not isinstance(smooth, numbers.Integral) or smooth < 0:
        raise ValueError(f"refpix_smooth must be an int >= 0 or None, got {smooth!r}")
    return int(smooth)


def _jump_threshold(thr: float | None) -> tuple[int, float]:
    if thr is None:
        return 0, 0.0
    if isinstance(thr, bool) or not isinstance(thr, numbers.Real) or not np.isfinite(thr):
        raise TypeError(f"jump_threshold must be a finite number or None, got {thr!r}")
    if thr <= 0:
        raise ValueError(f"jump_threshold must be > 0 (or None to disable), got {thr}")
    return 1, float(thr)


def sorting_network(n: int, median_only: bool = False) -> np.ndarray:
    """Comparator pairs (i, j), i < j, of Batcher's odd-even merge sort for n keys.

    Built for the next power of two and pruned of comparators that touch the padding
    (padding holds +inf and never moves, so those comparators are no-ops).  With
    ``median_only`` it is further pruned, backwards from the middle output(s), to the
    comparators the median depends on (a median-selection network).
    """
    size = 1
    while size < n:
        size *= 2
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        a, b = i + j, i + j + k
                        if b < n:
                            pairs.append((a, b))
            k //= 2
        p *= 2
    if median_only and n >= 3:
        need = {n // 2, (n - 1) // 2}
        kept = []
        for a, b in reversed(pairs):
            if a in need or b in need:
                kept.append((a, b))
                need.update((a, b))
        pairs = kept[::-1]
    return np.asarray(pairs, dtype=np.int32).reshape(-1, 2)


# A channel's top/bottom reference is unusable below this fraction of good pixels (or 4).
REFPIX_MIN_FRACTION = 0.25
# Outlier tests on the reference pixels' own behaviour never fire below these floors, so that
# noiseless or quantised test frames (zero scatter) do not reject everything.
_REJECT_FLOOR_SLOPE_DN = 2.0  # DN over the ramp
_REJECT_FLOOR_LOG_NOISE = np.log(1.5)  # "noisy": residual rms above 1.5x its neighbours'
# a "dead" reference pixel (no read noise) has an rms < 0.1x its neighbours'; the low tail of
# an 8-degree-of-freedom rms reaches 0.3x about once in 1500 pixels, 0.1x once in 10^7
_REJECT_FLOOR_LOG_QUIET = np.log(10.0)
_REJECT_RMS_TINY = 0.05  # DN: floor of the rms before its log (a noiseless pixel)
_REJECT_FLOOR_LEVEL_DN = 50.0


def _tb_rows(ny: int) -> np.ndarray:
    return np.r_[0:REFPIX_BORDER, ny - REFPIX_BORDER:ny]


def _sd_cols(nx: int) -> np.ndarray:
    return np.r_[0:REFPIX_BORDER, nx - REFPIX_BORDER:nx]


@dataclass
class BorderMask:
    """Reference pixels not to use, border only: ``tb`` (8, nx) the top rows 0-3 and bottom
    rows ny-4..ny-1, ``sd`` (ny, 8) the left columns 0-3 and right nx-4..nx-1 (the corners
    are in both and kept equal).  Compact, so no full-frame map is built per call."""

    tb: np.ndarray
    sd: np.ndarray

    @classmethod
    def empty(cls, ny: int, nx: int) -> BorderMask:
        return cls(np.zeros((8, nx), bool), np.zeros((ny, 8), bool))

    @classmethod
    def from_map(cls, m: np.ndarray) -> BorderMask:
        ny, nx = m.shape
        return cls(np.ascontiguousarray(m[_tb_rows(ny)]),
                   np.ascontiguousarray(m[:, _sd_cols(nx)]))

    def any(self) -> bool:
        return bool(self.tb.any() or self.sd.any())

    def count(self) -> int:
        """Excluded pixels (corners once)."""
        return int(self.tb.sum() + self.sd[4:-4].sum())

    def indices(self) -> tuple[np.ndarray, np.ndarray]:
        """(y, x) of the excluded pixels (corners once)."""
        ny, nx = self.sd.shape[0], self.tb.shape[1]
        jt, xt = np.nonzero(self.tb)
        ys, ks = np.nonzero(self.sd[4:ny - 4])
        return (np.concatenate([_tb_rows(ny)[jt], ys + 4]),
                np.concatenate([xt, _sd_cols(nx)[ks]]))

    def good(self) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (8, nx) and (ny, 8): 1 where usable, for the kernel's sums."""
        return ((~self.tb).astype(np.uint8), (~self.sd).astype(np.uint8))

    def border_order(self) -> np.ndarray:
        """(npix,) bool in the pixel order of ``refpix_border_stats``."""
        return np.concatenate([self.tb.ravel(), self.sd[4:-4].ravel()])

    def add_border_order(self, flags: np.ndarray) -> None:
        """OR flags given in ``refpix_border_stats`` order into the mask (corners: both)."""
        ny, nx = self.sd.shape[0], self.tb.shape[1]
        ntb = 8 * nx
        self.tb |= flags[:ntb].reshape(8, nx)
        self.sd[4:ny - 4] |= flags[ntb:].reshape(ny - 8, 8)
        cols = _sd_cols(nx)
        self.sd[:4] |= self.tb[:4][:, cols]
        self.sd[ny - 4:] |= self.tb[4:][:, cols]


def _refpix_mask_arg(mask: ArrayLike | None, ny: int, nx: int) -> BorderMask:
    """Validate ``refpix_mask`` ((ny, nx), True = do not use) -> its border part."""
    if mask is None:
        return BorderMask.empty(ny, nx)
    m = np.asarray(mask)
    if m.shape != (ny, nx):
        raise ValueError(f"refpix_mask must have shape {(ny, nx)}, got {m.shape}")
    if m.dtype != bool and not np.issubdtype(m.dtype, np.integer):
        raise TypeError(f"refpix_mask must be bool (True = do not use), got dtype {m.dtype}")
    b = BorderMask.from_map(m)
    return BorderMask(b.tb != 0, b.sd != 0)


def _reject_threshold(nsigma: float | None) -> float | None:
    if nsigma is None:
        return None
    if isinstance(nsigma, bool) or not isinstance(nsigma, numbers.Real) or not np.isfinite(nsigma):
        raise TypeError(f"refpix_reject must be a finite number or None, got {nsigma!r}")
    if nsigma <= 0:
        raise ValueError(f"refpix_reject must be > 0 (or None to disable), got {nsigma}")
    return float(nsigma)


def _slope_coefficients(t: np.ndarray) -> np.ndarray:
    """(nr,) unweighted least-squares slope coefficients of the reads (sum c = 0)."""
    tt = t - t.mean()
    den = float((tt * tt).sum())
    return np.ascontiguousarray(tt / den if den > 0 else np.zeros_like(tt))


def _robust_outliers(x: np.ndarray, use: np.ndarray, nsigma: float, floor: float,
                     low_floor: float | None = None) -> np.ndarray:
    """x - median > max(nsigma * 1.4826 MAD, floor) or < -max(nsigma * 1.4826 MAD,
    ``low_floor`` (default: floor)), median and MAD over ``use``.

    Median and MAD from every k-th value (~4k of them: a 5-sigma limit then moves by ~2 %)."""
    step = max(x.size // 4096, 1)
    v = x[::step][use[::step]]
    if v.size == 0:
        return np.zeros(x.shape, bool)
    med = float(np.median(v))
    sig = 1.4826 * float(np.median(np.abs(v - med)))
    d = x - med
    return (d > max(nsigma * sig, floor)) | (
        d < -max(nsigma * sig, floor if low_floor is None else low_floor))


def _others_median(x: np.ndarray, size: int) -> np.ndarray:
    """For every value, the median of the *other* values of its group of ``size`` consecutive
    values (leave-one-out: a plain group median pulls towards the value under test in small
    groups, which makes the differences peaked and their MAD too small)."""
    g = x.reshape(-1, size)
    if size < 2:
        return np.zeros_like(x)
    if size == 4:  # the side columns: median of the other three, without sorting
        out = np.empty_like(g)
        for k in range(4):
            a, b, c = (g[:, j] for j in range(4) if j != k)
            out[:, k] = np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))
        return out.reshape(-1)
    if size >= 32:  # leaving one value out of 32 or more hardly moves the median (nor does
        # taking it over every other value: the groups share a 1/f level, not a fine pattern)
        return np.repeat(np.median(g[:, ::2], axis=1), size)
    order = np.argsort(g, axis=1, kind="stable")
    srt = np.take_along_axis(g, order, axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(size)[None, :], axis=1)
    n = size - 1  # values left
    if n % 2:  # odd: one middle value, at position h of the others
        h = n // 2
        out = np.where(rank <= h, srt[:, h + 1:h + 2], srt[:, h:h + 1])
    else:  # even: the mean of the two middle values, positions h - 1 and h of the others
        h = n // 2
        lo = np.where(rank <= h - 1, srt[:, h:h + 1], srt[:, h - 1:h])
        hi = np.where(rank <= h, srt[:, h + 1:h + 2], srt[:, h:h + 1])
        out = 0.5 * (lo + hi)
    return out.reshape(-1)


def _neutral(x: np.ndarray, use: np.ndarray) -> np.ndarray:
    """x with the flagged values (not ``use``) replaced by the median of the others, so that
    flagged pixels do not weigh in their neighbours' group medians."""
    if use.all():
        return x
    step = max(x.size // 4096, 1)
    v = x[::step][use[::step]]
    return np.where(use, x, np.median(v) if v.size else 0.0)


def _refpix_reject(
    level: np.ndarray,
    slope: np.ndarray,
    rss: np.ndarray,
    *,
    ny: int,
    nx: int,
    nch: int,
    t: np.ndarray,
    nramps: int,
    flagged: BorderMask,
    nsigma: float,
) -> np.ndarray:
    """(npix,) bool in ``refpix_border_stats`` order: border pixels whose own behaviour over the reads is an outlier.

    From the per-pixel statistics of ``refpix_border_stats`` (kernel, or its twin): each
    statistic is compared with the median of its group -- the chw pixels of a reference row
    within one channel, or the 4 side pixels of one row and side, which share the read-to-read
    common mode (1/f) -- and a pixel is rejected when that difference is an outlier among all
    border pixels of its kind (top/bottom or side): slope (a "hot" reference pixel that ramps,
    or a telegraph jump), residual rms about its straight line (noisy, or dead: no read noise)
    at ``nsigma`` robust sigma, level at 2 * ``nsigma`` (stuck at 0 or at the ADC top).
    Shared by the kernels and the twins (numpy, ~65k values at 4096^2).
    """
    nr = len(t)
    ntb = 8 * nx
    bad = np.zeros(level.shape, bool)
    if nr < 2:
        return bad
    use = ~flagged.border_order()
    span = float(t[-1] - t[0])
    chw = nx // nch
    kinds = ((slice(0, ntb), chw if chw >= 4 else nx), (slice(ntb, None), 4))
    for part, size in kinds:
        lv, sv = level[part], slope[part]
        if lv.size == 0:
            continue
        u = use[part]
        ds = sv - _others_median(_neutral(sv, u), size)
        b = _robust_outliers(ds, u, nsigma, _REJECT_FLOOR_SLOPE_DN / span)
        dl = lv - _others_median(_neutral(lv, u), size)
        b |= _robust_outliers(dl, u, 2.0 * nsigma, _REJECT_FLOOR_LEVEL_DN)
        if nr >= 3:
            # log of the residual rms: near-symmetric scatter (the rms itself is skewed)
            rms = np.sqrt(np.maximum(rss[part], 0.0) / (nramps * (nr - 2)))
            lr = np.log(np.maximum(rms, _REJECT_RMS_TINY))
            dr = lr - _others_median(_neutral(lr, u), size)
            b |= _robust_outliers(dr, u, nsigma, _REJECT_FLOOR_LOG_NOISE,
                                  _REJECT_FLOOR_LOG_QUIET)
        bad[part] = b
    return bad


def _refpix_counts(excl: BorderMask | None, ny: int, nx: int,
                   nch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Usable pixels per channel (top/bottom rows) and per row (left, right columns)."""
    chw = nx // nch
    if excl is None:
        return (np.full(nch, 8 * chw, np.int64), np.full(ny, 4, np.int64),
                np.full(ny, 4, np.int64))
    tb = (8 - excl.tb.sum(axis=0)).reshape(nch, chw).sum(axis=1).astype(np.int64)
    return (tb, (4 - excl.sd[:, :4].sum(axis=1)).astype(np.int64),
            (4 - excl.sd[:, 4:].sum(axis=1)).astype(np.int64))


def _usable_channels(ntb: np.ndarray, chw: int) -> np.ndarray:
    return ntb >= max(4, int(np.ceil(REFPIX_MIN_FRACTION * 8 * chw)))


def _window_sums(x: np.ndarray, half: int) -> np.ndarray:
    """Sums over rows y-half..y+half (shrinking at the edges) along the last axis, exact for
    integer input (prefix sums)."""
    ny = x.shape[-1]
    pre = np.concatenate([np.zeros(x.shape[:-1] + (1,), x.dtype), np.cumsum(x, axis=-1)], axis=-1)
    y = np.arange(ny)
    lo = np.maximum(y - half, 0)
    hi = np.minimum(y + half, ny - 1)
    return pre[..., hi + 1] - pre[..., lo]


def _refpix_tables_from_sums(
    tb: np.ndarray, left: np.ndarray, right: np.ndarray, excl: BorderMask | None,
    ny: int, nx: int, nch: int, smooth: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Offsets from the integer sums of usable reference pixels (shared by kernel and twin).

    ``off`` (nf, nch) = channel sum / usable count; a channel with too few usable pixels
    (:data:`REFPIX_MIN_FRACTION`) takes the mean of the usable channels' offsets (its own
    1/f is then not followed: flagged UNRELIABLE_BIAS).  ``rowc`` (nf, ny) = running means of
    the side columns over ``smooth`` rows minus the first/last channel offsets, averaged over
    the sides that have usable pixels in the window; 0 where neither has (flagged too).
    Returns off, rowc, usable channels (nch,) and rows without side reference (ny,) bools.
    """
    chw = nx // nch
    ntb, nl, nrr = _refpix_counts(excl, ny, nx, nch)
    usable = _usable_channels(ntb, chw)
    with np.errstate(divide="ignore", invalid="ignore"):
        off = tb / ntb.astype(np.float64)
    if not usable.all():
        fill = off[:, usable].mean(axis=1) if usable.any() else np.zeros(off.shape[0])
        off[:, ~usable] = fill[:, None]
    norow = np.zeros(ny, bool)
    if smooth <= 0:
        return off, np.zeros((tb.shape[0], ny)), usable, norow
    half = smooth // 2
    wl = _window_sums(left, half).astype(np.float64)
    wr = _window_sums(right, half).astype(np.float64)
    cl = _window_sums(nl, half).astype(np.float64)
    cr = _window_sums(nrr, half).astype(np.float64)
    if excl is None or ((cl > 0).all() and (cr > 0).all()):
        rowc = 0.5 * ((wl / cl - off[:, :1]) + (wr / cr - off[:, nch - 1:nch]))
        return off, rowc, usable, norow
    with np.errstate(divide="ignore", invalid="ignore"):
        el = wl / cl - off[:, :1]
        er = wr / cr - off[:, nch - 1:nch]
    both = (cl > 0) & (cr > 0)
    rowc = np.where(both, 0.5 * (el + er), np.where(cl > 0, el, np.where(cr > 0, er, 0.0)))
    norow = (cl == 0) & (cr == 0)
    return off, rowc, usable, norow


def _refpix_variance(read_noise: np.ndarray, ny: int, nx: int, nch: int, smooth: int,
                     excl: BorderMask | None = None) -> np.ndarray:
    """(ny, nch) float64 variance (DN^2) that the reference-pixel correction adds to each
    read of a pixel in row y, channel c, from the white read noise of the reference pixels.

    The correction of read i is off[c] + rowc[y] with off[c] the mean of the channel's
    usable top/bottom pixels (or the mean of the usable channels' offsets where a channel
    has too few) and rowc[y] = 0.5 * (L_y + R_y) - mean(off) (+ a constant per ramp),
    L_y/R_y the running means of the usable side pixels over the n_y rows of the window (one
    side alone where the other has none in the window).  Each is linear in independent
    reference pixels, so the variance is a sum of rn^2 times squared weights.  The 32 corner
    pixels that are both side and top/bottom pixels are counted as independent (a < 1 %
    effect on this term).  ``read_noise`` is the (1,) scalar or (ny, nx) map given to the
    kernels; ``excl`` the reference pixels not used (None: all are used).  Computed once here (numpy),
    shared by the kernels and their twins.
    """
    chw = nx // nch
    r = np.broadcast_to(read_noise.reshape(() if read_noise.ndim == 1 else (ny, nx)), (ny, nx))

    def sq(v: np.ndarray, ex: np.ndarray | None) -> np.ndarray:
        # only border strips are converted (not the map)
        v = v.astype(np.float64)
        v = v * v
        if ex is not None:
            v = v * ~ex
        return v

    ntb, nl, nrr = _refpix_counts(excl, ny, nx, nch)
    usable = _usable_channels(ntb, chw)
    tbv = sq(r[_tb_rows(ny)], None if excl is None else excl.tb)
    sdv = sq(r[:, _sd_cols(nx)], None if excl is None else excl.sd)
    tbs = tbv.sum(axis=0).reshape(nch, chw).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(usable, tbs / np.maximum(ntb, 1).astype(np.float64) ** 2, 0.0)  # var(off[c])
    f = np.eye(nch)
    if not usable.all() and usable.any():
        f[~usable] = np.where(usable, 1.0 / usable.sum(), 0.0)
    m = f.copy()
    if smooth > 0:
        m -= f.mean(axis=0)  # the side correction is tied to the mean of all channel offsets
    var_off = (m * m) @ a
    out = np.empty((ny, nch), np.float64)
    out[:] = var_off
    if smooth > 0:
        half = smooth // 2
        cl = _window_sums(nl, half).astype(np.float64)
        cr = _window_sums(nrr, half).astype(np.float64)
        vl = _window_sums(sdv[:, :4].sum(axis=1), half)
        vr = _window_sums(sdv[:, 4:].sum(axis=1), half)
        with np.errstate(divide="ignore", invalid="ignore"):
            both = (cl > 0) & (cr > 0)
            side = np.where(both, 0.25 * (vl / cl**2 + vr / cr**2),
                            np.where(cl > 0, vl / cl**2, np.where(cr > 0, vr / cr**2, 0.0)))
        out += side[:, None]
    return np.ascontiguousarray(out)


def _edge_tie(off: np.ndarray) -> np.ndarray:
    """(nf,) float64: first/last channel tie minus the mean of all channel offsets."""
    return 0.5 * (off[:, 0] + off[:, off.shape[1] - 1]) - off.mean(axis=1)


def _retie(off: np.ndarray, rowc: np.ndarray, nramps: int, nr: int, smooth: int) -> np.ndarray:
    """Tie the side correction of every read to the mean of *all* channel offsets.

    The kernels' table is ``rowc = side - (off[0] + off[nch-1]) / 2``.  The read-to-read
    noise of that tie (the mean of only 2 * 8 * chw reference pixels) is added to every
    pixel of the frame, so it sets the frame-mean slope error (0.03 DN/s rms at 256^2,
    32 channels, white noise only).  Here the read-to-read variation of the tie comes from
    the mean of all channel offsets instead (nch times as many pixels), while the level
    stays that of the ramp's first read (a constant within a ramp: slopes do not see it,
    and the corrected reads keep the absolute level the linearity polynomial needs).
    ``off`` (nramps*nr, nch), ``rowc`` (nramps*nr, ny); returns the new ``rowc``.
    """
    if smooth <= 0:
        return rowc
    d = _edge_tie(off).reshape(nramps, nr)
    d = d - d[:, :1]
    return rowc + d.reshape(-1, 1)


def _refpix_prepare(
    r4: np.ndarray,
    t: np.ndarray,
    nch: int,
    smooth: int,
    flagged: BorderMask,
    nsigma: float | None,
    *,
    border_stats: Any = None,
    sums: Any = None,
) -> tuple[np.ndarray, np.ndarray, RefpixReport, BorderMask]:
    """Reference-pixel tables of (nramps, nr, ny, nx) raw reads, robust to bad reference pixels.

    1. the pixels flagged by the caller (``flagged``, e.g. from the mask reference) are left out;
    2. with ``nsigma``, every other reference pixel's own behaviour over the reads (slope,
       residual noise, level; kernel ``refpix_border_stats``) is compared with its
       neighbours' (:func:`_refpix_reject`) and outliers are left out too -- one set for the
       whole exposure, so the offsets of all reads average the same pixels and a left-out
       pixel's fixed level cannot step between reads;
    3. offsets from exact integer sums of the pixels kept (kernel ``refpix_sums``) and
       :func:`_refpix_tables_from_sums`; the side correction tied as :func:`_retie` does.

    ``border_stats`` / ``sums``: the numpy twins pass their own versions of the two kernels.
    Returns off, rowc, the report and the pixels left out.
    """
    nramps, nr, ny, nx = r4.shape
    frames = r4.reshape(nramps * nr, ny, nx)
    if border_stats is None:
        border_stats = _k.refpix_border_stats
    if sums is None:
        def sums(f: np.ndarray, n: int, gtb: Any, gsd: Any) -> Any:
            return _k.refpix_sums(f, n, gtb, gsd, 1)
    excl = BorderMask(flagged.tb.copy(), flagged.sd.copy())
    rejected = 0
    if nsigma is not None and nr >= 2 and ny > 8:
        level, slope, rss = border_stats(frames, nramps, _slope_coefficients(t))
        rej = _refpix_reject(level, slope, rss, ny=ny, nx=nx, nch=nch, t=t, nramps=nramps,
                             flagged=flagged, nsigma=nsigma)
        rej &= ~flagged.border_order()
        if rej.any():
            rejected = int(rej.sum())
            excl.add_border_order(rej)
    if excl.any():
        gtb, gsd = excl.good()
        tb, left, right = sums(frames, nch, gtb, gsd)
        off, rowc, usable, norow = _refpix_tables_from_sums(tb, left, right, excl, ny, nx, nch,
                                                            smooth)
    else:
        tb, left, right = sums(frames, nch, None, None)
        off, rowc, usable, norow = _refpix_tables_from_sums(tb, left, right, None, ny, nx, nch,
                                                            smooth)
    # the kernels read the tables through raw pointers: C order, float64
    off = np.ascontiguousarray(off, dtype=np.float64)
    rowc = np.ascontiguousarray(_retie(off, rowc, nramps, nr, smooth), dtype=np.float64)
    report = RefpixReport(
        excluded=excl.indices() if excl.any() else (np.zeros(0, np.intp), np.zeros(0, np.intp)),
        rejected=rejected,
        bad_channels=tuple(int(c) for c in np.nonzero(~usable)[0]),
        bad_rows=tuple(int(y) for y in np.nonzero(norow)[0]),
        off=off,
        rowc=rowc,
    )
    if rejected or report.bad_channels or report.bad_rows:
        log.info("reference pixels: %d left out (%d from their own behaviour), unusable "
                 "channels %s, rows without side reference %d", excl.count(), rejected,
                 list(report.bad_channels), len(report.bad_rows))
    return off, rowc, report, excl


def _refpix_dq(dq: np.ndarray, report: RefpixReport, nch: int, bits: DQFlags) -> None:
    """BAD_REF_PIXEL on the reference pixels left out, UNRELIABLE_BIAS on the pixels of a
    channel (or rows) without usable reference (in place; border and those columns only)."""
    ny, nx = dq.shape
    ys, xs = report.excluded
    if ys.size:
        dq[ys, xs] |= np.uint32(bits.bad_ref_pixel)
    chw = nx // nch
    for c in report.bad_channels:
        dq[:, c * chw:(c + 1) * chw] |= np.uint32(bits.unreliable_bias)
    if report.bad_rows:
        dq[np.asarray(report.bad_rows)] |= np.uint32(bits.unreliable_bias)


def refpix_variance(
    read_noise: ArrayLike,
    shape: tuple[int, int],
    *,
    channels: int = 32,
    smooth: int | None = 11,
    excluded: ArrayLike | tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """(ny, channels) variance (DN^2) the reference-pixel correction adds to every read.

    ``read_noise`` is the DN-per-read scalar or (ny, nx) map (its border values are the
    reference pixels' noise).  :func:`process_ramp` adds this to rn^2 in VAR_RNOISE;
    pass it as ``refpix_var`` to :func:`fit_slopes` to do the same on corrected reads.
    ``excluded``: the reference pixels the correction left out -- a (ny, nx) bool map or the
    (y, x) indices of ``RampResult.refpix.excluded``.
    """
    ny, nx = (int(v) for v in shape)
    sm = _refpix_check(ny, nx, channels, smooth)
    rn = _map("read_noise", read_noise, ny, nx, minimum=0)
    excl = None
    if excluded is not None:
        if isinstance(excluded, tuple):
            m = np.zeros((ny, nx), bool)
            m[excluded[0], excluded[1]] = True
        else:
            m = np.asarray(excluded, bool)
        excl = _refpix_mask_arg(m, ny, nx)
    return _refpix_variance(rn, ny, nx, int(channels), sm, excl)


def _refpix_var_arg(refpix_var: ArrayLike | None, ny: int, nx: int) -> tuple[np.ndarray | None, int]:
    """Validate a (ny, nch) reference-correction variance table -> (table, nch)."""
    if refpix_var is None:
        return None, 1
    v = np.asarray(refpix_var, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] != ny or v.shape[1] < 1 or nx % v.shape[1]:
        raise ValueError(f"refpix_var must have shape ({ny}, nch) with nx % nch == 0, got {v.shape}")
    if not np.all(np.isfinite(v)) or (v < 0).any():
        raise ValueError("refpix_var must be finite and >= 0")
    return np.ascontiguousarray(v), int(v.shape[1])


def _outputs(ny: int, nx: int) -> RampResult:
    return RampResult(
        slope=np.empty((ny, nx), np.float32),
        var_poisson=np.empty((ny, nx), np.float32),
        var_rnoise=np.empty((ny, nx), np.float32),
        err=np.empty((ny, nx), np.float32),
        dq=np.empty((ny, nx), np.uint32),
        nused=np.empty((ny, nx), np.uint16),
    )


_ONE = np.ones(1, np.float32)
# the first seven DQFlags bits are written by the kernels' row loops; the reference-pixel
# bits (BAD_REF_PIXEL, UNRELIABLE_BIAS) only touch the border and whole channels and are
# set in numpy after the row loop (_refpix_dq)
_PLAN_BITS = 7


def _plan(
    *,
    ny: int,
    nx: int,
    nramps: int,
    t: np.ndarray,
    sat: np.ndarray = _ONE,
    rn: np.ndarray = _ONE,
    gain: np.ndarray = _ONE,
    bias: np.ndarray | None = None,
    coef: np.ndarray | None = None,
    nch: int = 1,
    off: np.ndarray | None = None,
    rowc: np.ndarray | None = None,
    rvar: np.ndarray | None = None,
    border: int = 0,
    thr: float = 0.0,
    do_jump: int = 0,
    mode: int = 0,
    fowler_k: int = 1,
    weighted: int = 0,
    threads: int = 1,
    dq: DQFlags | None = None,
    dq_or: np.ndarray | None = None,
) -> _k.Plan:
    """``dq``: the bits the plan writes; None only for plans that write no DQ (refpix).
    ``dq_or``: None or a C-contiguous (ny, nx) uint32 map OR'ed into the DQ it writes."""
    nd = max(len(t) - 1, 1)
    return _k.Plan(
        ny=ny, nx=nx, nramps=nramps, t=t, sat=sat, rn=rn, gain=gain, bias=bias, coef=coef,
        nch=nch, off=off, rowc=rowc, rvar=rvar, border=border, thr=thr, do_jump=do_jump,
        net=sorting_network(nd, median_only=True), mode=mode, fowler_k=fowler_k, weighted=weighted,
        threads=threads, dq_bits=(0,) * _PLAN_BITS if dq is None else astuple(dq)[:_PLAN_BITS],
        dq_or=dq_or,
    )


def _pixel_dq(pixel_dq: ArrayLike | None, ny: int, nx: int) -> np.ndarray | None:
    """None, or the caller's (ny, nx) DQ map as C-contiguous uint32 (no copy if it is one)."""
    if pixel_dq is None:
        return None
    a = np.asarray(pixel_dq)
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise TypeError(f"pixel_dq must be an integer (DQ bit) map, got dtype {a.dtype}")
    if a.shape != (ny, nx):
        raise ValueError(f"pixel_dq must have shape {(ny, nx)}, got {a.shape}")
    if a.dtype != np.uint32 and a.size and (int(a.min()) < 0 or int(a.max()) > 0xFFFFFFFF):
        raise ValueError("pixel_dq values must fit in uint32 DQ bits")
    return np.ascontiguousarray(a, dtype=np.uint32)


# ----------------------------------------------------------------------------------------
# the fused pipeline
# ----------------------------------------------------------------------------------------


def process_ramp(
    reads: np.ndarray,
    read_times: Sequence[float] | np.ndarray,
    *,
    gain: ArrayLike,
    read_noise: ArrayLike,
    saturation: ArrayLike,
    dqflags: DQFlags | Mapping[str, int],
    nonlinearity: np.ndarray | None = None,
    mode: str = "utr",
    refpix: bool = True,
    jump_threshold: float | None = 4.0,
    threads: int | None = None,
    fowler_k: int | None = None,
    weighting: str = "optimal",
    refpix_channels: int = 32,
    refpix_smooth: int | None = 11,
    bias: ArrayLike | None = None,
    refpix_mask: ArrayLike | None = None,
    refpix_reject: float | None = 5.0,
    pixel_dq: ArrayLike | None = None,
    flicker: FlickerSpec | None = None,
) -> RampResult:
    """Raw uint16 ramp(s) -> slope image, in one pass over the reads.

    Parameters
    ----------
    reads : (nreads, ny, nx) or (nramps, nreads, ny, nx) uint16, raw DN.
    read_times : (nreads,) seconds of each read (same for every ramp), strictly increasing.
    gain : e-/DN, scalar or (ny, nx); NaN map values -> NO_GAIN_VALUE | DO_NOT_USE.
    read_noise : DN per single read, scalar or (ny, nx).
    saturation : DN, scalar or (ny, nx), compared with the raw reads; NaN -> no check.
    dqflags : the DQ bit values to set (:class:`DQFlags`, or a name -> value mapping such as
        ``iris_tasks.datamodels.dqflags.pixel``).
    nonlinearity : (ncoeff, ny, nx) polynomial coefficients, corrected = sum_k c_k x^k with x
        the reference-pixel (and bias) corrected DN; NaN coefficients -> NO_LIN_CORR.
    mode : "utr" (least squares per segment between jumps), "mcds" (Fowler-k) or "cds".
    refpix : the frame has a 4-pixel reference border (full H4RG frame); False for
        subarrays.
    jump_threshold : sigma threshold of the two-point-difference jump test (UTR only);
        None disables it.
    threads : OpenMP threads (None: OpenMP default).  Results do not depend on it.
    fowler_k : reads averaged at each end in "mcds" mode (default nreads // 2).
    weighting : "optimal" (stcal-style SNR power-law weights) or "unweighted" (UTR only).
    refpix_channels : output channels (vertical stripes) for the per-channel offsets.
    refpix_smooth : running-mean window (rows) of the side reference-pixel correction;
        0 or None: no row-wise correction.
    bias : optional bias (DN, scalar or map) subtracted after refpix, before linearity.
    refpix_mask : (ny, nx) bool (or int, nonzero = True), reference pixels not to use (e.g.
        from the mask reference); only the border is read.
    refpix_reject : robust sigma at which a reference pixel whose own behaviour over the
        reads (slope, noise, level) departs from its neighbours' is left out too; None: only
        ``refpix_mask``.  Left-out reference pixels get BAD_REF_PIXEL; the pixels of a
        channel with too few usable reference pixels get UNRELIABLE_BIAS (see
        ``RampResult.refpix``).
    pixel_dq : optional (ny, nx) integer map of DQ bits OR'ed into the output DQ (e.g. the
        mask reference's), in the row loop as each row's DQ is written -- the same bits as
        ``res.dq |= pixel_dq`` afterwards, without another pass over the frame.
    flicker : optional :class:`FlickerSpec`: also compute clean_flicker's background sums of
        the result (``res.flicker``: :func:`flicker_sums` of res.slope, res.err, res.dq
        with those arguments, the same values) in the row loop, each row's sources and
        sums while its slopes are in cache instead of a second pass over the frame.
    """
    bits = _dq_bits(dqflags)
    r4 = _as_ramps_uint16(reads)
    nramps, nr, ny, nx = r4.shape
    t = _times(read_times, nr)
    mode_code, k, weighted = _mode(mode, weighting, fowler_k, nr)
    do_jump, thr = _jump_threshold(jump_threshold)
    nt = _threads(threads)
    # the preparation runs on one thread (~7 ms at 4096^2): every OpenMP region ends with a
    # barrier that waits for all threads to check in, which costs a scheduling delay per
    # region when the cores are shared; the row loop below is the only parallel region
    sat = _map("saturation", saturation, ny, nx, minimum=0, strict=True, allow_nan=True)
    gn = _map("gain", gain, ny, nx, minimum=0, strict=True, allow_nan=True)
    rn = _map("read_noise", read_noise, ny, nx, minimum=0)
    bs = None if bias is None else _map("bias", bias, ny, nx)
    coef = _coeffs(nonlinearity, ny, nx)
    pdq = _pixel_dq(pixel_dq, ny, nx)
    off = rowc = rvar = None
    nch = 1
    if not isinstance(refpix, bool | np.bool_):
        raise TypeError(f"refpix must be a bool, got {type(refpix).__name__}")
    report = None
    if refpix:
        smooth = _refpix_check(ny, nx, refpix_channels, refpix_smooth)
        nch = int(refpix_channels)
        flagged = _refpix_mask_arg(refpix_mask, ny, nx)
        off, rowc, report, excl = _refpix_prepare(r4, t, nch, smooth, flagged,
                                                  _reject_threshold(refpix_reject))
        rvar = _refpix_variance(rn, ny, nx, nch, smooth, excl if excl.any() else None)
    plan = _plan(
        ny=ny, nx=nx, nramps=nramps, t=t, sat=sat, rn=rn, gain=gn, bias=bs, coef=coef,
        nch=nch, off=off, rowc=rowc, rvar=rvar, border=REFPIX_BORDER if refpix else 0, thr=thr,
        do_jump=do_jump, mode=mode_code, fowler_k=k, weighted=weighted, threads=nt, dq=bits,
        dq_or=pdq,
    )
    res = _outputs(ny, nx)
    log.debug("process_ramp %s mode=%s threads=%d", r4.shape, mode, nt)
    fused = flicker is not None and _flicker_fusable(flicker, nx, bits, report is not None)
    if fused:
        sums = _flicker_outputs(ny, int(flicker.channels))
        plan.run_raw_flicker(r4, res.slope, res.var_poisson, res.var_rnoise, res.err, res.dq,
                             res.nused, np.uint32(flicker.skip), int(flicker.channels),
                             np.float32(flicker.nsigma), max(int(flicker.dilate), 0),
                             int(flicker.chunk_rows), *sums)
        res.flicker = FlickerSums(flicker, sums)
    else:
        plan.run_raw(r4, res.slope, res.var_poisson, res.var_rnoise, res.err, res.dq, res.nused)
    if report is not None:
        _refpix_dq(res.dq, report, nch, bits)
        res.refpix = report
    if flicker is not None and not fused:
        # the skip bits include one set after the row loop: the sums of the finished DQ
        res.flicker = FlickerSums(flicker, flicker_sums(
            res.slope, res.err, res.dq, skip=flicker.skip, channels=flicker.channels,
            nsigma=flicker.nsigma, dilate=flicker.dilate, threads=nt))
    return res


def _flicker_fusable(spec: FlickerSpec, nx: int, bits: DQFlags, refpix: bool) -> bool:
    """Whether process_ramp can compute ``spec``'s sums in its row loop, else ValueError
    for a spec that fits no frame.  Not when ``skip`` holds a bit the reference-pixel
    report sets after the loop (BAD_REF_PIXEL, UNRELIABLE_BIAS): those sums come after."""
    if not isinstance(spec, FlickerSpec):
        raise TypeError(f"flicker must be a FlickerSpec, got {type(spec).__name__}")
    if spec.channels < 1 or nx % spec.channels:
        raise ValueError(f"flicker: nx={nx} is not divisible by channels={spec.channels}")
    if spec.chunk_rows < 1:
        raise ValueError(f"flicker: chunk_rows must be >= 1, got {spec.chunk_rows}")
    if not 0 <= int(spec.skip) <= 0xFFFFFFFF:
        raise ValueError(f"flicker: skip must be uint32 DQ bits, got {spec.skip}")
    late = int(bits.bad_ref_pixel) | int(bits.unreliable_bias)
    return not (refpix and int(spec.skip) & late)


def _flicker_outputs(ny: int, nch: int) -> tuple[np.ndarray, ...]:
    """flicker_sums' outputs, zeroed: (ny, nch) float64 x 3, int64 x 2, (ny,) int64."""
    return (np.zeros((ny, nch), np.float64), np.zeros((ny, nch), np.float64),
            np.zeros((ny, nch), np.float64), np.zeros((ny, nch), np.int64),
            np.zeros((ny, nch), np.int64), np.zeros(ny, np.int64))


def process_exposure(
    reads: np.ndarray,
    read_times: Sequence[float] | np.ndarray,
    *,
    dqflags: DQFlags | Mapping[str, int],
    **kwargs: Any,
) -> RampResult:
    """Like :func:`process_ramp` for (nramps, nreads, ny, nx): ramps combined by inverse variance."""
    if isinstance(reads, np.ndarray) and reads.ndim != 4:
        raise ValueError(f"process_exposure needs (nramps, nreads, ny, nx) reads, got {reads.shape}")
    return process_ramp(reads, read_times, dqflags=dqflags, **kwargs)


# ----------------------------------------------------------------------------------------
# the kernels one by one
# ----------------------------------------------------------------------------------------


def _squeeze_like(arr: np.ndarray, was3d: bool) -> np.ndarray:
    return arr[0] if was3d else arr


def refpix_correct(
    reads: np.ndarray,
    *,
    channels: int = 32,
    smooth: int | None = 11,
    threads: int | None = None,
    read_times: Sequence[float] | np.ndarray | None = None,
    mask: ArrayLike | None = None,
    reject: float | None = 5.0,
) -> np.ndarray:
    """Reference-pixel corrected reads (float32, same shape as ``reads``).

    ``mask`` / ``reject``: as ``refpix_mask`` / ``refpix_reject`` of :func:`process_ramp`
    (the outlier test needs ``read_times``; without them the reads are taken as evenly
    spaced, which only scales the slope statistic)."""
    was3d = isinstance(reads, np.ndarray) and reads.ndim == 3
    r4 = _as_ramps_uint16(reads)
    nramps, nr, ny, nx = r4.shape
    sm = _refpix_check(ny, nx, channels, smooth)
    nt = _threads(threads)
    t = np.arange(nr, dtype=np.float64) if read_times is None else _times(read_times, nr)
    off, rowc, _, _ = _refpix_prepare(r4, t, int(channels), sm, _refpix_mask_arg(mask, ny, nx),
                                      _reject_threshold(reject))
    plan = _plan(ny=ny, nx=nx, nramps=nramps, t=np.arange(nr, dtype=np.float64),
                 nch=int(channels), off=off, rowc=rowc, threads=nt)
    out = np.empty(r4.shape, np.float32)
    plan.run_refpix(r4, out)
    return _squeeze_like(out, was3d)


def flag_saturation(
    reads: np.ndarray,
    saturation: ArrayLike,
    *,
    dqflags: DQFlags | Mapping[str, int],
    threads: int | None = None,
) -> SaturationResult:
    """Leading unsaturated reads per pixel (and ramp) and the pixel DQ.

    A read at or above ``saturation`` and all later reads are excluded; ngood < nreads
    -> SATURATED, ngood < 2 (saturated in read 0 or 1) -> also DO_NOT_USE; NaN saturation
    -> NO_SAT_CHECK.  ``dqflags``: the bit values (see :func:`process_ramp`).
    """
    bits = _dq_bits(dqflags)
    was3d = isinstance(reads, np.ndarray) and reads.ndim == 3
    r4 = _as_ramps_uint16(reads)
    nramps, nr, ny, nx = r4.shape
    sat = _map("saturation", saturation, ny, nx, minimum=0, strict=True, allow_nan=True)
    nt = _threads(threads)
    plan = _plan(ny=ny, nx=nx, nramps=nramps, t=np.arange(nr, dtype=np.float64), sat=sat,
                 threads=nt, dq=bits)
    ngood = np.empty((nramps, ny, nx), np.uint16)
    dq = np.empty((ny, nx), np.uint32)
    plan.run_saturation(r4, ngood, dq)
    return SaturationResult(ngood=_squeeze_like(ngood, was3d), dq=dq)


def linearity_correct(
    data: np.ndarray,
    coeffs: np.ndarray,
    *,
    dqflags: DQFlags | Mapping[str, int],
    threads: int | None = None,
) -> LinearityResult:
    """Polynomial linearity correction (Horner, float32) of (..., ny, nx) data.

    Pixels with a NaN coefficient are left as they are and flagged NO_LIN_CORR
    (``dqflags``: the bit values, see :func:`process_ramp`).
    """
    bits = _dq_bits(dqflags)
    if not isinstance(data, np.ndarray):
        raise TypeError(f"data must be a numpy ndarray, got {type(data).__name__}")
    if data.ndim < 2:
        raise ValueError(f"data must be at least 2-D (ny, nx), got shape {data.shape}")
    ny, nx = data.shape[-2:]
    coef = _coeffs(coeffs, ny, nx)
    if coef is None:
        raise TypeError("coeffs is required")
    nt = _threads(threads)
    flat = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, ny, nx)
    plan = _plan(ny=ny, nx=nx, nramps=1, t=np.arange(2, dtype=np.float64), coef=coef,
                 threads=nt, dq=bits)
    out = np.empty_like(flat)
    dq = np.empty((ny, nx), np.uint32)
    plan.run_linearity(flat, out, dq)
    return LinearityResult(data=out.reshape(data.shape), dq=dq)


def _ngood(ngood: ArrayLike | None, nramps: int, nr: int, ny: int, nx: int) -> np.ndarray:
    if ngood is None:
        return np.full((nramps, ny, nx), nr, np.uint16)
    g = np.asarray(ngood)
    if g.ndim == 2:
        g = g[np.newaxis]
    if g.shape != (nramps, ny, nx):
        raise ValueError(f"ngood must have shape {(ny, nx)} or {(nramps, ny, nx)}, got {g.shape}")
    if (g < 0).any() or (g > nr).any():
        raise ValueError(f"ngood values must be in [0, {nr}]")
    return np.ascontiguousarray(g, dtype=np.uint16)


def detect_jumps(
    data: np.ndarray,
    read_times: Sequence[float] | np.ndarray,
    *,
    gain: ArrayLike,
    read_noise: ArrayLike,
    dqflags: DQFlags | Mapping[str, int],
    threshold: float = 4.0,
    ngood: ArrayLike | None = None,
    threads: int | None = None,
) -> JumpResult:
    """Two-point-difference jump detection on corrected reads (float, DN).

    Each difference d_k is compared with the pixel's median rate m (over usable
    differences): jump if |d_k - m dt_k| > threshold * sqrt(2 rn^2 + |m| dt_k / gain).
    Pixels with a jump get JUMP_DET in ``dq`` (``dqflags``: see :func:`process_ramp`).
    """
    bits = _dq_bits(dqflags)
    was3d = isinstance(data, np.ndarray) and data.ndim == 3
    d4 = _as_ramps_float(data)
    nramps, nr, ny, nx = d4.shape
    t = _times(read_times, nr)
    _, thr = _jump_threshold(threshold)
    if threshold is None:
        raise ValueError("threshold must be a number > 0")
    gn = _map("gain", gain, ny, nx, minimum=0, strict=True, allow_nan=True)
    rn = _map("read_noise", read_noise, ny, nx, minimum=0)
    ng = _ngood(ngood, nramps, nr, ny, nx)
    nt = _threads(threads)
    plan = _plan(ny=ny, nx=nx, nramps=nramps, t=t, rn=rn, gain=gn, thr=thr, do_jump=1,
                 threads=nt)
    jumps = np.zeros((nramps, max(nr - 1, 0), ny, nx), np.uint8)
    med = np.full((nramps, ny, nx), np.nan, np.float32)
    if nr >= 2:
        plan.run_jumps(d4, ng, jumps, med)
    jb = jumps.view(bool)
    dq = np.where(jb.any(axis=(0, 1)), bits.jump_det, 0).astype(np.uint32)
    return JumpResult(jumps=_squeeze_like(jb, was3d), median_rate=_squeeze_like(med, was3d), dq=dq)


def fit_slopes(
    data: np.ndarray,
    read_times: Sequence[float] | np.ndarray,
    *,
    gain: ArrayLike,
    read_noise: ArrayLike,
    dqflags: DQFlags | Mapping[str, int],
    ngood: ArrayLike | None = None,
    jumps: np.ndarray | None = None,
    median_rate: ArrayLike | None = None,
    mode: str = "utr",
    fowler_k: int | None = None,
    weighting: str = "optimal",
    refpix_var: ArrayLike | None = None,
    threads: int | None = None,
) -> RampResult:
    """Slopes from corrected reads (float DN), given saturation (ngood) and jumps.

    ``median_rate`` (DN/s, per ramp) is the rate used for the variance weights; without it
    the mean rate over the usable reads is used.  The pixel DQ carries SATURATED,
    JUMP_DET and DO_NOT_USE (no slope) only, plus NO_GAIN_VALUE | DO_NOT_USE for a NaN
    gain (``dqflags``: the bit values, see :func:`process_ramp`).  ``refpix_var`` ((ny, nch) DN^2, from
    :func:`refpix_variance`) is added to rn^2 (VAR_RNOISE and segment weights), as
    :func:`process_ramp` does for reference-pixel corrected reads.
    """
    bits = _dq_bits(dqflags)
    d4 = _as_ramps_float(data)
    nramps, nr, ny, nx = d4.shape
    t = _times(read_times, nr)
    mode_code, k, weighted = _mode(mode, weighting, fowler_k, nr)
    gn = _map("gain", gain, ny, nx, minimum=0, strict=True, allow_nan=True)
    rn = _map("read_noise", read_noise, ny, nx, minimum=0)
    ng = _ngood(ngood, nramps, nr, ny, nx)
    nt = _threads(threads)
    jv = None
    if jumps is not None and nr >= 2:
        j = np.asarray(jumps)
        if j.ndim == 3:
            j = j[np.newaxis]
        if j.shape != (nramps, nr - 1, ny, nx):
            raise ValueError(f"jumps must have shape {(nramps, nr - 1, ny, nx)} (or 3-D), got {j.shape}")
        jv = np.ascontiguousarray(j.astype(bool)).view(np.uint8)
    mv = None
    if median_rate is not None:
        m = np.asarray(median_rate, dtype=np.float32)
        if m.ndim == 2:
            m = m[np.newaxis]
        if m.shape != (nramps, ny, nx):
            raise ValueError(f"median_rate must have shape {(ny, nx)} or {(nramps, ny, nx)}, got {m.shape}")
        mv = np.ascontiguousarray(m)
    rvar, nch = _refpix_var_arg(refpix_var, ny, nx)
    plan = _plan(ny=ny, nx=nx, nramps=nramps, t=t, rn=rn, gain=gn, mode=mode_code,
                 fowler_k=k, weighted=weighted, nch=nch, rvar=rvar, threads=nt, dq=bits)
    res = _outputs(ny, nx)
    plan.run_fit(d4, ng, jv, mv, res.slope, res.var_poisson, res.var_rnoise, res.err, res.dq,
                 res.nused)
    return res


def _flicker_fill(slope: np.ndarray, err: np.ndarray, dq: np.ndarray, skip: int) -> np.float32:
    """Stand-in value of unusable pixels in the first-guess medians: the median of every 7th
    row and column of the usable pixels."""
    s, e, d = slope[::7, ::7], err[::7, ::7], dq[::7, ::7]
    with np.errstate(invalid="ignore"):
        use = np.isfinite(s) & ((d & np.uint32(skip)) == 0) & (e > 0)
    return np.float32(np.median(s[use])) if use.any() else np.float32(0.0)


def flicker_sums(
    slope: np.ndarray,
    err: np.ndarray,
    dq: np.ndarray,
    *,
    skip: int,
    channels: int,
    nsigma: float = 3.0,
    dilate: int = 2,
    threads: int | None = None,
) -> tuple[np.ndarray, ...]:
    """Background sums per (row, channel) of a slope image (kernel of clean_flicker in
    iris_tasks.steps.readout): usable = finite slope, none of the ``skip`` DQ bits, err > 0;
    sources = value more than ``nsigma`` x err above the (row, channel) median, dilated by a
    (2 ``dilate`` + 1)^2 square; background = usable and not source.  Returns float64
    (ny, nch) sums of the background slopes, of those in even columns of the channel, of
    err^2, int64 counts of the background and of its even-column pixels, and int64 (ny,)
    counts of the usable pixels of each row in every 4th column."""
    sl = np.ascontiguousarray(slope, np.float32)
    if sl.ndim != 2:
        raise ValueError(f"flicker_sums: slope must be 2-D, not {sl.shape}")
    ny, nx = sl.shape
    for name, a in (("err", err), ("dq", dq)):
        if np.shape(a) != sl.shape:
            raise ValueError(f"flicker_sums: {name} has shape {np.shape(a)}, slope {sl.shape}")
    if channels < 1 or nx % channels:
        raise ValueError(f"nx={nx} is not divisible by channels={channels}")
    e = np.ascontiguousarray(err, np.float32)
    d = np.ascontiguousarray(dq, np.uint32)
    fill = _k.flicker_fill(sl, e, d, np.uint32(skip))  # = _flicker_fill (numpy), tested
    return _k.flicker_sums(sl, e, d, np.uint32(skip), int(channels), np.float32(nsigma),
                           int(dilate), fill, _threads(threads))


def _flicker_apply_check(slope, stripes, acn, var_rnoise, add, var_poisson=None,
                         err=None) -> None:
    """flicker_apply's arguments, or TypeError/ValueError naming the one that is wrong (the
    kernel indexes them without bounds checks)."""
    for name, a in (("slope", slope), ("var_rnoise", var_rnoise), ("var_poisson", var_poisson),
                    ("err", err)):
        if a is not None and (not isinstance(a, np.ndarray) or a.dtype != np.float32
                              or not a.flags.c_contiguous):
            raise TypeError(f"flicker_apply: {name} must be C-contiguous float32")
    if slope.ndim != 2:
        raise ValueError(f"flicker_apply: slope must be 2-D, not {slope.shape}")
    ny, nx = slope.shape
    nch = np.shape(stripes)[1] if np.ndim(stripes) == 2 else 0
    if np.ndim(stripes) != 2 or np.shape(stripes)[0] != ny or nch < 1 or nx % nch:
        raise ValueError(f"flicker_apply: stripes must be (ny, channels) = ({ny}, a divisor "
                         f"of {nx}), not {np.shape(stripes)}")
    if acn is not None and np.shape(acn) != np.shape(stripes):
        raise ValueError(f"flicker_apply: acn has shape {np.shape(acn)}, stripes "
                         f"{np.shape(stripes)}")
    if var_rnoise is not None:
        if var_rnoise.shape != slope.shape:
            raise ValueError(f"flicker_apply: var_rnoise has shape {var_rnoise.shape}, slope "
                             f"{slope.shape}")
        if add is None or np.shape(add) != np.shape(stripes):
            raise ValueError(f"flicker_apply: add must be given with var_rnoise, shaped like "
                             f"stripes {np.shape(stripes)} (got "
                             f"{None if add is None else np.shape(add)})")
    if (var_poisson is None) != (err is None) or (err is not None and var_rnoise is None):
        raise ValueError("flicker_apply: var_poisson and err go together, with var_rnoise")
    for name, a in (("var_poisson", var_poisson), ("err", err)):
        if a is not None and a.shape != slope.shape:
            raise ValueError(f"flicker_apply: {name} has shape {a.shape}, slope {slope.shape}")


def flicker_apply(slope: np.ndarray, stripes: np.ndarray, acn: np.ndarray | None,
                  var_rnoise: np.ndarray | None = None, add: np.ndarray | None = None,
                  threads: int | None = None, *, var_poisson: np.ndarray | None = None,
                  err: np.ndarray | None = None) -> None:
    """In place: slope -= stripes[y, c] (+ acn on even, - on odd columns of channel c);
    var_rnoise += add[y, c] where the slope is not NaN; with ``var_poisson`` and ``err``:
    err = sqrt(var_rnoise + var_poisson) (the new variance), in the same pass.  float32
    C-contiguous arrays."""
    _flicker_apply_check(slope, stripes, acn, var_rnoise, add, var_poisson, err)
    _k.flicker_apply(slope, var_rnoise, np.ascontiguousarray(stripes, np.float32),
                     None if acn is None else np.ascontiguousarray(acn, np.float32),
                     None if add is None else np.ascontiguousarray(add, np.float32),
                     var_poisson, err, _threads(threads))


# ----------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------


class RampAccumulator:
    """Read-by-read version of :func:`process_ramp` with the same result.

    Each :meth:`add_read` does the per-read work at once (saturation count, reference
    pixels, bias, linearity, difference with the previous read) and keeps the float32
    difference; when a ramp is complete (``len(read_times)`` reads, or :meth:`end_ramp`)
    its jump test and fit run on the stored differences; :meth:`finalize` combines the
    ramps.  Same row code as the batch path, so results are bit-identical to it.

    Give either ``read_times`` (seconds of the reads of each ramp; a ramp ends by itself
    after that many reads) or ``read_time`` (uniform spacing, t_i = i * read_time; call
    :meth:`end_ramp` between ramps, :meth:`finalize` ends the last one).  ``dqflags``: the
    DQ bit values to set, as for :func:`process_ramp`.

    Reference pixels: the reads are corrected as they arrive, before the behaviour of a
    reference pixel over the ramp is known, so only ``refpix_mask`` (the flagged ones) is
    honoured; ``refpix_reject`` must be None (the default here).  With the same mask and
    ``refpix_reject=None`` the result equals :func:`process_ramp` bit for bit.
    """

    def __init__(
        self,
        ny: int,
        nx: int,
        read_times: Sequence[float] | np.ndarray | None = None,
        read_time: float | None = None,
        *,
        gain: ArrayLike,
        read_noise: ArrayLike,
        saturation: ArrayLike,
        dqflags: DQFlags | Mapping[str, int],
        nonlinearity: np.ndarray | None = None,
        mode: str = "utr",
        refpix: bool = True,
        jump_threshold: float | None = 4.0,
        threads: int | None = None,
        fowler_k: int | None = None,
        weighting: str = "optimal",
        refpix_channels: int = 32,
        refpix_smooth: int | None = 11,
        bias: ArrayLike | None = None,
        refpix_mask: ArrayLike | None = None,
        refpix_reject: float | None = None,
    ) -> None:
        for name, v in (("ny", ny), ("nx", nx)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.ny, self.nx = int(ny), int(nx)
        self._dq = _dq_bits(dqflags)
        if (read_times is None) == (read_time is None):
            raise ValueError("give exactly one of read_times or read_time")
        if read_times is not None:
            t = np.asarray(read_times, dtype=np.float64)
            if t.ndim != 1 or t.shape[0] == 0:
                raise ValueError("read_times must be a non-empty 1-D sequence")
            self._t = _times(t, t.shape[0])
            self._read_time = None
        else:
            if isinstance(read_time, bool) or not isinstance(read_time, numbers.Real):
                raise TypeError(f"read_time must be a number, got {type(read_time).__name__}")
            if not (np.isfinite(read_time) and read_time > 0):
                raise ValueError(f"read_time must be > 0, got {read_time}")
            self._t = None
            self._read_time = float(read_time)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if mode == "mcds" and fowler_k is not None:
            _mode(mode, weighting, fowler_k, 2)
        self._mode, self._weighting, self._fowler_k = mode, weighting, fowler_k
        self._do_jump, self._thr = _jump_threshold(jump_threshold)
        self._nt = _threads(threads)
        self._sat = _map("saturation", saturation, ny, nx, minimum=0, strict=True, allow_nan=True)
        self._gain = _map("gain", gain, ny, nx, minimum=0, strict=True, allow_nan=True)
        self._rn = _map("read_noise", read_noise, ny, nx, minimum=0)
        self._bias = None if bias is None else _map("bias", bias, ny, nx)
        self._coef = _coeffs(nonlinearity, ny, nx)
        if not isinstance(refpix, bool | np.bool_):
            raise TypeError(f"refpix must be a bool, got {type(refpix).__name__}")
        self._refpix = bool(refpix)
        self._nch = 1
        self._smooth = 0
        self._rvar = None
        if refpix:
            self._smooth = _refpix_check(ny, nx, refpix_channels, refpix_smooth)
            self._nch = int(refpix_channels)
            if refpix_reject is not None:
                raise ValueError("RampAccumulator corrects each read as it arrives and cannot "
                                 "judge reference pixels by their behaviour over the ramp: "
                                 "pass refpix_mask (flagged pixels) and refpix_reject=None")
            self._excl = _refpix_mask_arg(refpix_mask, ny, nx)
            excl = self._excl if self._excl.any() else None
            self._good = self._excl.good() if excl is not None else (None, None)
            self._rvar = _refpix_variance(self._rn, ny, nx, self._nch, self._smooth, excl)
            _, _, usable, norow = _refpix_tables_from_sums(
                np.zeros((1, self._nch), np.int64), np.zeros((1, ny), np.int64),
                np.zeros((1, ny), np.int64), excl, ny, nx, self._nch, self._smooth)
            self._report = RefpixReport(
                excluded=self._excl.indices(), rejected=0,
                bad_channels=tuple(int(c) for c in np.nonzero(~usable)[0]),
                bad_rows=tuple(int(y) for y in np.nonzero(norow)[0]))
        # ingestion does not depend on the read times: a 2-read dummy time axis
        self._ingest_plan = _plan(
            ny=ny, nx=nx, nramps=1, t=np.arange(2, dtype=np.float64), sat=self._sat,
            rn=self._rn, gain=self._gain, bias=self._bias, coef=self._coef, nch=self._nch,
            threads=self._nt, dq=self._dq,
        )
        self._linok = np.empty((ny, nx), np.int32)
        self._ingest_plan.linok_map(self._linok)
        cap = max(len(self._t) - 1, 1) if self._t is not None else 8
        self._d = np.empty((cap, ny, nx), np.float32)
        self._ngood = np.zeros((ny, nx), np.int32)
        self._prev = np.zeros((ny, nx), np.float32)
        self._dummy = np.empty((1, nx), np.float32)
        self._i = 0
        self._ramps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    @property
    def nreads(self) -> int:
        """Reads added to the ramp in progress."""
        return self._i

    @property
    def nramps(self) -> int:
        """Completed ramps."""
        return len(self._ramps)

    def add_read(self, frame: np.ndarray) -> None:
        """Process one raw (ny, nx) uint16 read of the ramp in progress."""
        if not isinstance(frame, np.ndarray):
            raise TypeError(f"frame must be a numpy ndarray of uint16, got {type(frame).__name__}")
        if frame.dtype.kind != "u" or frame.dtype.itemsize != 2:
            raise TypeError(f"frame must have dtype uint16 (raw DN), got {frame.dtype}")
        if frame.dtype != np.uint16:
            frame = frame.astype(np.uint16)
        if frame.shape != (self.ny, self.nx):
            raise ValueError(f"frame must have shape {(self.ny, self.nx)}, got {frame.shape}")
        frame = np.ascontiguousarray(frame)
        i = self._i
        if i == 0:
            self._ngood[:] = 0
        if i >= 1 and i - 1 >= self._d.shape[0]:
            grown = np.empty((2 * self._d.shape[0], self.ny, self.nx), np.float32)
            grown[: self._d.shape[0]] = self._d
            self._d = grown
        off = rowc = None
        if self._refpix:
            excl = self._excl if self._excl.any() else None
            tb, left, right = _k.refpix_sums(frame[np.newaxis], self._nch, self._good[0],
                                             self._good[1], 1)
            o, r, _, _ = _refpix_tables_from_sums(tb, left, right, excl, self.ny, self.nx,
                                                  self._nch, self._smooth)
            if self._smooth > 0:  # as _retie: tie to all channels, level of read 0
                tie = _edge_tie(o)
                if i == 0:
                    self._tie0 = tie
                r = r + (tie - self._tie0).reshape(-1, 1)
            off, rowc = o[0], r[0]
        dplane = self._d[i - 1] if i > 0 else self._dummy
        self._ingest_plan.ingest(frame, i, self._ngood, self._prev, dplane, off, rowc)
        self._i = i + 1
        if self._t is not None and self._i == len(self._t):
            self.end_ramp()

    def _ramp_times(self, n: int) -> np.ndarray:
        if self._t is not None:
            return np.ascontiguousarray(self._t[:n])
        return np.arange(n, dtype=np.float64) * self._read_time

    def end_ramp(self) -> None:
        """Close the ramp in progress: jump test and fit on its stored differences."""
        n = self._i
        if n == 0:
            return
        t = self._ramp_times(n)
        mode_code, k, weighted = _mode(self._mode, self._weighting, self._fowler_k, n)
        plan = _plan(
            ny=self.ny, nx=self.nx, nramps=1, t=t, sat=self._sat, rn=self._rn, gain=self._gain,
            coef=self._coef, nch=self._nch, rvar=self._rvar, thr=self._thr,
            do_jump=self._do_jump, mode=mode_code, fowler_k=k, weighted=weighted, threads=self._nt,
            dq=self._dq,
        )
        rout = np.empty((4, self.ny, self.nx), np.float32)
        rnused = np.empty((self.ny, self.nx), np.int32)
        rflags = np.empty((self.ny, self.nx), np.int32)
        plan.fit_planes(self._d[: max(n - 1, 1)], self._ngood, rout, rnused, rflags)
        self._ramps.append((rout, rnused, rflags))
        self._i = 0

    def finalize(self) -> RampResult:
        """End the ramp in progress (if any) and combine all ramps into the result."""
        self.end_ramp()
        if not self._ramps:
            raise ValueError("no reads were added")
        nr_ = len(self._ramps)
        rout = np.stack([r[0] for r in self._ramps])
        rnused = np.stack([r[1] for r in self._ramps])
        rflags = np.stack([r[2] for r in self._ramps])
        plan = _plan(
            ny=self.ny, nx=self.nx, nramps=nr_, t=np.arange(2, dtype=np.float64), sat=self._sat,
            rn=self._rn, gain=self._gain, coef=self._coef, nch=self._nch, rvar=self._rvar,
            border=REFPIX_BORDER if self._refpix else 0, threads=self._nt, dq=self._dq,
        )
        res = _outputs(self.ny, self.nx)
        plan.combine_planes(rout, rnused, rflags, self._linok, res.slope, res.var_poisson,
                            res.var_rnoise, res.err, res.dq, res.nused)
        if self._refpix:
            _refpix_dq(res.dq, self._report, self._nch, self._dq)
            res.refpix = self._report
        return res
