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
    must be a single bit of a uint32.
    """

    do_not_use: int
    saturated: int
    jump_det: int
    no_gain_value: int
    no_lin_corr: int
    no_sat_check: int
    reference_pixel: int

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
class RampResult:
    """Slope image of one exposure (rates in DN/s, variances in (DN/s)^2)."""

    slope: np.ndarray
    var_poisson: np.ndarray
    var_rnoise: np.ndarray
    err: np.ndarray
    dq: np.ndarray
    nused: np.ndarray


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


def _refpix_variance(read_noise: np.ndarray, ny: int, nx: int, nch: int, smooth: int) -> np.ndarray:
    """(ny, nch) float64 variance (DN^2) that the reference-pixel correction adds to each
    read of a pixel in row y, channel c, from the white read noise of the reference pixels.

    The correction of read i is off[c] + rowc[y] with off[c] the mean of the channel's
    8 * chw top/bottom pixels and rowc[y] = 0.5 * (L_y + R_y) - mean(off) (+ a constant per ramp),
    L_y/R_y the running means of the 4 side columns over the n_y rows of the window.  Each
    is linear in independent reference pixels, so the variance is a sum of rn^2 times
    squared weights.  The 32 corner pixels that are both side and top/bottom pixels are
    counted as independent (a < 1 % effect on this term).  ``read_noise`` is the (1,)
    scalar or (ny, nx) map given to the kernels.  Computed once here (numpy), shared by
    the kernels and their twins.
    """
    chw = nx // nch
    r = np.broadcast_to(read_noise.reshape(() if read_noise.ndim == 1 else (ny, nx)), (ny, nx))

    def sq(a: np.ndarray) -> np.ndarray:  # only border strips are converted (not the map)
        a = a.astype(np.float64)
        return a * a

    tb = (sq(r[:4]).sum(axis=0) + sq(r[ny - 4:]).sum(axis=0)).reshape(nch, chw).sum(axis=1)
    a = tb / (8.0 * chw) ** 2  # var(off[c])
    m = np.eye(nch)
    if smooth > 0:
        m -= 1.0 / nch  # the side correction is tied to the mean of all channel offsets
    var_off = (m * m) @ a
    out = np.empty((ny, nch), np.float64)
    out[:] = var_off
    if smooth > 0:
        half = smooth // 2
        y = np.arange(ny)
        lo = np.maximum(y - half, 0)
        hi = np.minimum(y + half, ny - 1)
        n = (hi - lo + 1).astype(np.float64)
        pl = np.concatenate([[0.0], np.cumsum(sq(r[:, :4]).sum(axis=1))])
        pr = np.concatenate([[0.0], np.cumsum(sq(r[:, nx - 4:]).sum(axis=1))])
        side = 0.25 * ((pl[hi + 1] - pl[lo]) + (pr[hi + 1] - pr[lo])) / (4.0 * n) ** 2
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


def refpix_variance(
    read_noise: ArrayLike,
    shape: tuple[int, int],
    *,
    channels: int = 32,
    smooth: int | None = 11,
) -> np.ndarray:
    """(ny, channels) variance (DN^2) the reference-pixel correction adds to every read.

    ``read_noise`` is the DN-per-read scalar or (ny, nx) map (its border values are the
    reference pixels' noise).  :func:`process_ramp` adds this to rn^2 in VAR_RNOISE;
    pass it as ``refpix_var`` to :func:`fit_slopes` to do the same on corrected reads.
    """
    ny, nx = (int(v) for v in shape)
    sm = _refpix_check(ny, nx, channels, smooth)
    rn = _map("read_noise", read_noise, ny, nx, minimum=0)
    return _refpix_variance(rn, ny, nx, int(channels), sm)


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
) -> _k.Plan:
    """``dq``: the bits the plan writes; None only for plans that write no DQ (refpix)."""
    nd = max(len(t) - 1, 1)
    return _k.Plan(
        ny=ny, nx=nx, nramps=nramps, t=t, sat=sat, rn=rn, gain=gain, bias=bias, coef=coef,
        nch=nch, off=off, rowc=rowc, rvar=rvar, border=border, thr=thr, do_jump=do_jump,
        net=sorting_network(nd, median_only=True), mode=mode, fowler_k=fowler_k, weighted=weighted,
        threads=threads, dq_bits=(0,) * len(fields(DQFlags)) if dq is None else astuple(dq),
    )


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
    off = rowc = rvar = None
    nch = 1
    if not isinstance(refpix, bool | np.bool_):
        raise TypeError(f"refpix must be a bool, got {type(refpix).__name__}")
    if refpix:
        smooth = _refpix_check(ny, nx, refpix_channels, refpix_smooth)
        nch = int(refpix_channels)
        off, rowc = _k.refpix_tables(r4.reshape(nramps * nr, ny, nx), nch, smooth, 1)
        rowc = _retie(off, rowc, nramps, nr, smooth)
        rvar = _refpix_variance(rn, ny, nx, nch, smooth)
    plan = _plan(
        ny=ny, nx=nx, nramps=nramps, t=t, sat=sat, rn=rn, gain=gn, bias=bs, coef=coef,
        nch=nch, off=off, rowc=rowc, rvar=rvar, border=REFPIX_BORDER if refpix else 0, thr=thr,
        do_jump=do_jump, mode=mode_code, fowler_k=k, weighted=weighted, threads=nt, dq=bits,
    )
    res = _outputs(ny, nx)
    log.debug("process_ramp %s mode=%s threads=%d", r4.shape, mode, nt)
    plan.run_raw(r4, res.slope, res.var_poisson, res.var_rnoise, res.err, res.dq, res.nused)
    return res


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
) -> np.ndarray:
    """Reference-pixel corrected reads (float32, same shape as ``reads``)."""
    was3d = isinstance(reads, np.ndarray) and reads.ndim == 3
    r4 = _as_ramps_uint16(reads)
    nramps, nr, ny, nx = r4.shape
    sm = _refpix_check(ny, nx, channels, smooth)
    nt = _threads(threads)
    off, rowc = _k.refpix_tables(r4.reshape(nramps * nr, ny, nx), int(channels), sm, nt)
    rowc = _retie(off, rowc, nramps, nr, sm)
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
            self._rvar = _refpix_variance(self._rn, ny, nx, self._nch, self._smooth)
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
            o, r = _k.refpix_tables(frame[np.newaxis], self._nch, self._smooth, 1)
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
        return res
