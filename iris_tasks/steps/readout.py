"""Stage 1 algorithm: raw reads + detector references -> rate arrays, via readout_cy.

readout_cy does the per-pixel work in one pass (reference pixels, saturation, linearity,
jumps, CDS/MCDS/UTR fit, variances, multi-ramp combination by inverse variance). This
module only turns reference models into the maps it takes and records what each reference
flag means for the kernel:

* saturation DQ NO_SAT_CHECK -> saturation NaN (the kernel skips the check there);
* linearity DQ NO_LIN_CORR -> coefficients NaN (the kernel flags NO_LIN_CORR, no correction);
* read noise NaN -> replaced by the median read noise, pixel flagged UNRELIABLE_ERROR;
* gain NaN -> passed on (the kernel flags NO_GAIN_VALUE | DO_NOT_USE);
* mask DQ on a reference (border) pixel with any of :data:`REFPIX_EXCLUDE_FLAGS` -> that
  reference pixel is not used by the reference-pixel correction (``refpix_mask``); the
  kernel also leaves out reference pixels whose own behaviour over the reads is an outlier
  (``refpix_reject``) and flags them BAD_REF_PIXEL.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ..datamodels.dqflags import pixel

SAMPMODE_TO_MODE = {"UTR": "utr", "CDS": "cds", "MCDS": "mcds"}

# Mask-reference bits that keep a reference pixel out of the reference-pixel correction.
# REFERENCE_PIXEL and NON_SCIENCE do not: every border pixel carries them.
REFPIX_EXCLUDE_FLAGS: int = (
    pixel["DO_NOT_USE"] | pixel["BAD_REF_PIXEL"] | pixel["DEAD"] | pixel["HOT"] | pixel["WARM"]
    | pixel["TELEGRAPH"] | pixel["RC"] | pixel["OTHER_BAD_PIXEL"]
)


@dataclass
class DetectorMaps:
    """Per-pixel detector calibration in the units readout_cy takes."""

    gain: np.ndarray  # e-/DN
    read_noise: np.ndarray  # DN per read
    saturation: np.ndarray  # DN
    nonlinearity: np.ndarray | None  # (ncoeff, ny, nx)
    dq: np.ndarray  # flags to OR into the output (mask, reference DQ, substitutions)
    refpix_mask: np.ndarray | None = None  # reference pixels not to use (from the mask DQ)


def detector_maps(
    *,
    gain: np.ndarray,
    read_noise: np.ndarray,
    saturation: np.ndarray,
    saturation_dq: np.ndarray | None = None,
    nonlinearity: np.ndarray | None = None,
    linearity_dq: np.ndarray | None = None,
    mask_dq: np.ndarray | None = None,
) -> DetectorMaps:
    """Reference arrays -> :class:`DetectorMaps` (see the module docstring for the rules).

    The inputs are never modified. A map is copied only where a rule changes a value (a
    4096^2 reference usually has no pixel to change, and the linearity cube alone is 400 MB),
    so with native float32 inputs the maps share their memory.
    """
    shape = np.shape(gain)
    dq = _or_flags(shape, mask_dq, saturation_dq, linearity_dq)
    sat = np.asarray(saturation, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        no_sat = ~(sat > 0)  # NaN and non-positive levels cannot be checked
    if saturation_dq is not None:
        no_sat |= (np.asarray(saturation_dq) & pixel["NO_SAT_CHECK"]) != 0
    if no_sat.any():
        sat = np.where(no_sat, np.float32(np.nan), sat)
        dq[no_sat] |= np.uint32(pixel["NO_SAT_CHECK"])
    rn = np.asarray(read_noise, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        bad_rn = ~(np.isfinite(rn) & (rn >= 0))
    if bad_rn.any():
        good = rn[~bad_rn]
        fill = float(np.median(good)) if good.size else 0.0
        rn = np.where(bad_rn, np.float32(fill), rn)
        dq[bad_rn] |= np.uint32(pixel["UNRELIABLE_ERROR"])
    g = np.asarray(gain, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        bad_g = g <= 0  # zero/negative gain is as unusable as NaN
    if bad_g.any():
        g = np.where(bad_g, np.float32(np.nan), g)
    coeffs = None
    if nonlinearity is not None:
        coeffs = np.asarray(nonlinearity, dtype=np.float32)
        if linearity_dq is not None:
            no_lin = (np.asarray(linearity_dq) & pixel["NO_LIN_CORR"]) != 0
            if no_lin.any():
                coeffs = np.where(no_lin, np.float32(np.nan), coeffs)
    refmask = None
    if mask_dq is not None:
        refmask = (np.asarray(mask_dq) & np.uint32(REFPIX_EXCLUDE_FLAGS)) != 0
    return DetectorMaps(g, rn, sat, coeffs, dq, refmask)


def _or_flags(shape: tuple[int, ...], *flags: np.ndarray | None) -> np.ndarray:
    """uint32 OR of the given DQ arrays (zeros when none), a new array."""
    dq = np.zeros(shape, np.uint32)
    for f in flags:
        if f is not None:
            np.bitwise_or(dq, f, out=dq, casting="unsafe")
    return dq


def readout_mode(sampmode: str | None, requested: str = "auto") -> str:
    """readout_cy mode: the requested one, else from SAMPMODE (UTR/CDS/MCDS)."""
    if requested and requested != "auto":
        return requested
    if sampmode is None or str(sampmode).upper() not in SAMPMODE_TO_MODE:
        raise ValueError(f"SAMPMODE={sampmode!r}: cannot choose a readout mode "
                         f"(expected one of {', '.join(SAMPMODE_TO_MODE)}); pass mode=")
    return SAMPMODE_TO_MODE[str(sampmode).upper()]


def process(
    reads: np.ndarray,
    read_times: np.ndarray,
    maps: DetectorMaps,
    *,
    mode: str,
    fowler_k: int | None = None,
    refpix: bool = True,
    bias: np.ndarray | None = None,
    jump_threshold: float | None = 4.0,
    weighting: str = "optimal",
    threads: int | None = None,
    channels: int = 32,
    refpix_reject: float | None = 5.0,
    flicker=None,
):
    """Run readout_cy on (nramps, nreads, ny, nx) reads; returns its RampResult with the
    detector-map flags OR'ed into ``dq``. ``channels``: the detector's output channels, whose
    offsets the reference-pixel correction measures one by one. ``refpix_reject``: robust
    sigma of the outlier test on the reference pixels' own behaviour (None: mask only);
    ``result.refpix`` reports what was left out. ``flicker``: None, or a
    ``readout_cy.FlickerSpec`` (:func:`flicker_spec`) whose :func:`clean_flicker` background
    sums are computed in the readout's row loop (``result.flicker``, for
    ``clean_flicker(..., sums=)``)."""
    import readout_cy

    # FITS data arrive big-endian; the kernels take native uint16.
    reads = np.ascontiguousarray(reads, dtype=np.uint16)
    if jump_threshold is not None and (not math.isfinite(jump_threshold) or jump_threshold <= 0):
        jump_threshold = None
    result = readout_cy.process_ramp(
        reads, read_times, gain=maps.gain, read_noise=maps.read_noise, saturation=maps.saturation,
        nonlinearity=maps.nonlinearity, mode=mode, refpix=refpix, jump_threshold=jump_threshold,
        threads=threads, fowler_k=fowler_k if mode == "mcds" else None, bias=bias,
        weighting=weighting if mode == "utr" else "optimal", refpix_channels=channels,
        refpix_mask=maps.refpix_mask if refpix else None, refpix_reject=refpix_reject,
        dqflags=pixel,  # the project's one DQ definition; readout_cy defines no bits
        pixel_dq=maps.dq,  # OR'ed in the row loop (no second pass over the frame)
        flicker=flicker,
    )
    return result


@dataclass
class FlickerResult:
    """What :func:`clean_flicker` removed: ``stripes`` (ny, nch) DN/s per row and output
    channel, ``acn`` (ny, nch) DN/s (+ on even, - on odd columns of the channel, or None), and
    the fraction of the usable pixels taken as background."""

    stripes: np.ndarray
    acn: np.ndarray | None
    background_fraction: float


# DQ bits of pixels that clean_flicker neither uses as background nor needs (they are
# corrected like every other pixel of their row).
FLICKER_SKIP_FLAGS: int = (
    pixel["DO_NOT_USE"] | pixel["REFERENCE_PIXEL"] | pixel["SATURATED"] | pixel["JUMP_DET"]
    | pixel["HOT"] | pixel["DEAD"]
)


# clean_flicker's source mask: nsigma x ERR above the (row, channel) median, dilated by
# FLICKER_DILATE px
FLICKER_NSIGMA: float = 3.0
FLICKER_DILATE: int = 2


def flicker_spec(channels: int, *, nsigma: float = FLICKER_NSIGMA, dilate: int = FLICKER_DILATE,
                 skip_flags: int = FLICKER_SKIP_FLAGS):
    """The ``readout_cy.FlickerSpec`` of :func:`clean_flicker`'s background sums with these
    arguments, for :func:`process` (``flicker=``): the readout then computes them in its
    row loop, while each row's slopes are in cache, instead of clean_flicker reading the
    slope, err and DQ planes again."""
    import readout_cy as rc

    return rc.FlickerSpec(channels=int(channels), skip=int(skip_flags), nsigma=float(nsigma),
                          dilate=int(dilate))


def _running_median_rows(level: np.ndarray, window: int) -> np.ndarray:
    """Smooth (ny, nch) along the rows over ~``window`` rows: medians of blocks of
    window / 4 rows, a running median of 5 blocks, interpolated back to every row (a full
    running median over 256 rows costs ~0.7 s at 4096 rows x 32 channels)."""
    ny = level.shape[0]
    block = max(window // 4, 1)
    nb = -(-ny // block)
    pad = np.concatenate([level, np.repeat(level[-1:], nb * block - ny, axis=0)])
    bm = np.median(pad.reshape(nb, block, -1), axis=1)  # (nb, nch)
    from scipy import ndimage

    bm = ndimage.median_filter(bm, size=(min(5, nb), 1), mode="nearest")
    centres = (np.arange(nb) + 0.5) * block - 0.5
    rows = np.arange(ny)
    return np.stack([np.interp(rows, centres, bm[:, c]) for c in range(bm.shape[1])], axis=1)


def clean_flicker(
    slope: np.ndarray,
    err: np.ndarray,
    dq: np.ndarray,
    *,
    channels: int,
    var_rnoise: np.ndarray | None = None,
    var_poisson: np.ndarray | None = None,
    nsigma: float = FLICKER_NSIGMA,
    dilate: int = FLICKER_DILATE,
    smooth_rows: int = 256,
    acn: bool = True,
    skip_flags: int = FLICKER_SKIP_FLAGS,
    threads: int | None = 1,
    sums=None,
) -> FlickerResult:
    """Remove residual 1/f row stripes and alternating column noise from a slope image, in place.

    The 1/f noise of an H4RG output is a function of time, i.e. of the row within each output
    channel: in a slope image it leaves an offset per (row, channel) -- what the border's
    reference pixels could not follow (the part of each channel's noise not common to all,
    and the common part faster than the side columns' 11-row mean). Alternating column noise
    (ACN) is the same for the even-minus-odd columns of a channel. Both are measured on
    background pixels of the slope image, the approach of JWST's ``clean_flicker_noise``
    (NSClean) for imaging: sources are masked (``nsigma`` x ERR above their row and channel's
    median, dilated by ``dilate`` pixels), each (row, channel) level is the mean of the
    rest, and what departs from a running median of those levels over ``smooth_rows`` rows
    is removed (longer windows remove more of the slow 1/f, shorter ones keep more of a
    sky that changes along the columns). ACN: half the even-minus-odd difference of the
    background means of each (row, channel).

    ``slope`` is corrected in place, every pixel of a row and channel by the same amount
    (NaN stays NaN); pixels with ``skip_flags`` are not used as background.
    ``var_rnoise`` (if given) gets the variance of the subtracted estimates (not where the
    slope is NaN); with ``var_poisson`` too, ``err`` becomes sqrt(var_rnoise + var_poisson)
    in the same pass (after the sources were judged on the old ``err``).  Not for IFS frames, whose pixels are mostly spectra (their 1/f: stage 2's
    ``destripe``).

    ``sums``: the background sums of this very slope, err and DQ computed beforehand (a
    ``readout_cy.FlickerSums``: ``RampResult.flicker`` of ``process(..., flicker=
    flicker_spec(...))``, the same values as the pass they replace); they must have been
    asked for with the same channels, nsigma, dilate and skip_flags (ValueError otherwise),
    and the caller must drop them if anything changed the slopes, err or DQ since.
    """
    import readout_cy as rc

    ny, nx = slope.shape
    if nx % channels:
        raise ValueError(f"clean_flicker: nx={nx} is not divisible by channels={channels}")
    chw = nx // channels
    if slope.dtype != np.float32 or not slope.flags.c_contiguous:
        raise TypeError("clean_flicker: slope must be a C-contiguous float32 array (in place)")
    if sums is not None:
        want = rc.FlickerSpec(channels=channels, skip=skip_flags, nsigma=nsigma, dilate=dilate)
        if not sums.spec.same_sums(want):
            raise ValueError(f"clean_flicker: the sums given were computed for {sums.spec}, not "
                             f"channels={channels}, skip={skip_flags}, nsigma={nsigma}, "
                             f"dilate={dilate}")
        if sums.sums[0].shape != (ny, channels):
            raise ValueError(f"clean_flicker: the sums given are for {sums.sums[0].shape} "
                             f"(rows, channels), not ({ny}, {channels})")
        s_bg, s_ev, s_e2, n_bg, n_ev, n_use = sums.sums
    else:
        # one kernel pass over the rows: source mask and background sums (readout_cy)
        s_bg, s_ev, s_e2, n_bg, n_ev, n_use = rc.flicker_sums(
            slope, err, dq, skip=skip_flags, channels=channels, nsigma=nsigma,
            dilate=max(int(dilate), 0), threads=threads)
    with np.errstate(invalid="ignore", divide="ignore"):
        level = s_bg / n_bg
    ok = n_bg >= 4
    col = np.where(ok, level, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cmed = np.nanmedian(col, axis=0, keepdims=True)
    filled = np.where(ok, level, np.where(np.isfinite(cmed), cmed, 0.0))
    # The window is at most the frame's height: from 2x the height on the running median
    # becomes one median per channel, which takes every smooth gradient along the columns
    # (sky, illumination, a bright star's unmasked wings) for stripes. On the nightly photom
    # test's 128 px, 4-read standard (2026-12-08) its zero point was -0.008 mag off the
    # simulator's truth with 256 rows, -0.0002 with 128 (docs/readout.md).
    smooth = _running_median_rows(filled, min(int(smooth_rows), ny))
    stripes = np.where(ok, filled - smooth, 0.0).astype(np.float32)
    acn_off = None
    if acn and chw >= 4 and chw % 2 == 0:
        n_od = n_bg - n_ev
        with np.errstate(invalid="ignore", divide="ignore"):
            even = s_ev / n_ev
            odd = (s_bg - s_ev) / n_od
        oka = (n_ev >= 2) & (n_od >= 2)
        acn_off = np.where(oka, 0.5 * (even - odd), 0.0).astype(np.float32)
    add = None
    if var_rnoise is not None:
        # each subtracted level is a mean of n background pixels: variance <s^2> / n per
        # estimate (ACN: half the difference of two means of n/2: the same again); not
        # where there is no slope (DO_NOT_USE: zero variances by convention)
        add = s_e2 / np.maximum(n_bg, 1) ** 2
        if acn_off is not None:
            add = 2.0 * add
        add = np.where(ok, add, 0.0).astype(np.float32)
    if var_poisson is not None and var_rnoise is None:
        raise ValueError("clean_flicker: var_poisson needs var_rnoise (err is recomputed from both)")
    rc.flicker_apply(slope, stripes, acn_off, var_rnoise, add, threads=threads,
                     var_poisson=var_poisson, err=None if var_poisson is None else err)
    nus = int(n_bg.sum())
    usable = int(n_use[::4].sum()) * 16  # usable pixels of every 4th row and column, x 16
    return FlickerResult(stripes=stripes, acn=acn_off,
                         background_fraction=min(nus / max(usable, 1), 1.0))


# Picture frame ------------------------------------------------------------------------
# The analytic model's scales (px) tried when none is given: the best on the frame is then
# refined by a parabola in log(scale) through its neighbours.
PICTURE_FRAME_SCALES: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


@dataclass
class PictureFrameResult:
    """What :func:`correct_picture_frame` removed: ``amplitude`` (DN/s) the rate of the
    pattern exp(-d / ``scale``) at the edge (d = 0) and its 1-sigma ``amplitude_err``,
    ``offset`` the median background level after it (DN/s, not removed), ``npix`` the
    background pixels of the fit and ``scale_fitted`` whether the scale was fitted."""

    amplitude: float
    amplitude_err: float
    scale: float
    offset: float
    npix: int
    scale_fitted: bool


def _edge_distance(n: int) -> np.ndarray:
    a = np.arange(n, dtype=np.float32)
    return np.minimum(a, n - 1 - a)


class _PictureFrameTemplate:
    """T = p - R(p): the picture-frame pattern p = exp(-d / scale) as the slope image sees
    it after the reference-pixel correction R (the part the border carries to the frame)."""

    def __init__(self, ny: int, nx: int, channels: int, smooth: int, refpix: bool,
                 excluded: tuple[np.ndarray, np.ndarray] | None) -> None:
        self.ny, self.nx, self.nch, self.smooth = ny, nx, channels, smooth
        self.refpix, self.excluded = refpix, excluded
        self.dy, self.dx = _edge_distance(ny), _edge_distance(nx)
        self.chan = (np.arange(nx) * channels) // nx

    def _refpix(self, scale: float) -> tuple[np.ndarray, np.ndarray]:
        from readout_cy.reference import refpix_pattern_correction

        if not self.refpix:
            return np.zeros(self.nch), np.zeros(self.ny)
        rows = np.r_[0:4, self.ny - 4:self.ny]
        cols = np.r_[0:4, self.nx - 4:self.nx]
        tb = np.exp(-np.minimum(self.dy[rows][:, None], self.dx[None, :]) / scale)
        sd = np.exp(-np.minimum(self.dy[:, None], self.dx[cols][None, :]) / scale)
        return refpix_pattern_correction(tb, sd, self.nch, self.smooth, self.excluded)

    def at(self, scale: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """float64 T at the pixels (y, x)."""
        off, rowc = self._refpix(scale)
        # exp(-min(dy, dx) / s) = max(exp(-dy / s), exp(-dx / s)): no exp per pixel
        ey = np.exp(-self.dy.astype(np.float64) / scale)
        ex = np.exp(-self.dx.astype(np.float64) / scale)
        return np.maximum(ey[y], ex[x]) - off[self.chan[x]] - rowc[y]

    def subtract(self, slope: np.ndarray, scale: float, amplitude: float) -> None:
        """slope -= amplitude * T, in place, row block by row block (float32)."""
        off, rowc = self._refpix(scale)
        a = np.float32(amplitude)
        ey = (a * np.exp(-self.dy.astype(np.float64) / scale)).astype(np.float32)
        ex = (a * np.exp(-self.dx.astype(np.float64) / scale)).astype(np.float32)
        if a < 0:  # a * max(.) = min(a * .) for a < 0
            ey, ex = -ey, -ex
        offx = (a * off[self.chan]).astype(np.float32)
        rowy = (a * rowc).astype(np.float32)
        step = max(1, (1 << 18) // self.nx)
        t = np.empty((step, self.nx), np.float32)
        for y0 in range(0, self.ny, step):
            y1 = min(self.ny, y0 + step)
            b = t[:y1 - y0]
            np.maximum(ey[y0:y1, None], ex[None, :], out=b)
            if a < 0:
                np.negative(b, out=b)
            b -= offx
            b -= rowy[y0:y1, None]
            slope[y0:y1] -= b


def _fit_pixels(ny: int, nx: int, border: int, width: int,
                budget: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of the pixels the picture-frame fit looks at, whole rows at a time (the fit
    has a level per row, so a row's edge pixels count against its interior): in every
    ``sr``-th row all pixels within ``width`` of the left and right edges and 1 in ``si`` of
    the rest, as many of those as of the edge pixels; ``sr`` keeps the total near ``budget``
    (every pixel up to 256^2)."""
    w = max(min(int(width), nx // 2), border + 1)
    si = max(1, -(-(nx - 2 * w) // (2 * (w - border))))
    xs = np.concatenate([np.arange(border, w), np.arange(w, nx - w, si),
                         np.arange(max(nx - w, w), nx - border)])
    sr = max(1, -(-(ny - 2 * border) * len(xs) // max(int(budget), 1)))
    ys = np.arange(border, ny - border, sr)
    return np.repeat(ys, len(xs)), np.tile(xs, len(ys))


class _Demean:
    """x minus its per-row and per-output-channel means over a set of pixels (alternating
    projections, 2 passes)."""

    def __init__(self, row: np.ndarray, chan: np.ndarray, ny: int, nch: int) -> None:
        self.row, self.chan, self.ny, self.nch = row, chan, ny, nch
        self.nr = np.maximum(np.bincount(row, minlength=ny), 1)
        self.nc = np.maximum(np.bincount(chan, minlength=nch), 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x.copy()
        for _ in range(2):
            x -= (np.bincount(self.row, x, minlength=self.ny) / self.nr)[self.row]
            x -= (np.bincount(self.chan, x, minlength=self.nch) / self.nc)[self.chan]
        return x


def _fit_amp(s: np.ndarray, t: np.ndarray) -> tuple[float, float, float]:
    """Least squares s = a t (both demeaned): (a, residual sum of squares, var factor of a)."""
    stt = float((t * t).sum())
    if len(s) < 3 or not stt > 0:
        return 0.0, float("inf"), float("inf")
    a = float((s * t).sum()) / stt
    r = s - a * t
    return a, float((r * r).sum()), 1.0 / stt


def correct_picture_frame(
    slope: np.ndarray,
    dq: np.ndarray,
    *,
    channels: int,
    refpix: bool = True,
    excluded: tuple[np.ndarray, np.ndarray] | None = None,
    smooth: int = 11,
    scale: float | None = None,
    nsigma: float = 3.0,
    edge_width: int = 128,
    budget: int = 200_000,
    detect: float = 5.0,
    fallback_scale: float = 16.0,
    skip_flags: int = FLICKER_SKIP_FLAGS,
) -> PictureFrameResult:
    """Remove the picture-frame pattern from a slope image, in place.

    An H4RG's picture frame is an offset pattern strongest at the array's edges whose amplitude
    changes over the ramp. Its reference border sits where it is strongest, so the
    reference-pixel correction subtracts the border's share of it from every pixel: in the
    slope image a drift rate A leaves A * (p - R(p)), p the pattern and R(p) what the
    correction (channel offsets from the top/bottom rows, side-column running means, as
    ``readout_cy`` does it, with the reference pixels it left out: ``excluded``) makes of
    it. The model (as JWST's NIRSpec ``picture_frame`` step, which scales a reference
    pattern to the background of the edges and the centre) is analytic here: p = exp(-d /
    scale), d the distance (px) from the nearest edge; ``scale`` given, or fitted on the
    frame among :data:`PICTURE_FRAME_SCALES` (refined by a parabola in log scale; where the
    amplitude at the fitted scale is below ``detect`` x its error, the ``fallback_scale``
    is used instead: a scale fitted to noise makes A ~4x noisier). The
    amplitude A is fitted by least squares, s = A T + a level per row + a level per output
    channel (what the reference-pixel correction's own noise leaves in the slopes, which
    would otherwise triple A's scatter; T's own row and channel parts go there too), on the
    background pixels of the illuminated area (no ``skip_flags``, finite; sources clipped at
    ``nsigma`` x the robust residual rms, twice), whole rows at a time: those within
    ``edge_width`` px of the left and right edges and as many from the rest of the row,
    ~``budget`` in all (every pixel up to 256^2; at 4096^2 every 10th row, 1 in 16 of its
    interior: the cost does not grow with the frame). Then slope -= A * T
    everywhere (the levels stay). Assumes the background is flat over the frame to well
    below A (a sky gradient towards the edges would be taken for the pattern). The
    variances are not changed (A's error, ~0.01-0.02 DN/s at 256^2 with 0.5 DN/s pixel noise,
    adds < 0.2 % to a pixel's variance).
    ``refpix``: whether the slopes had the reference-pixel correction (else T = p).
    """
    ny, nx = slope.shape
    if slope.dtype != np.float32 or not slope.flags.c_contiguous:
        raise TypeError("correct_picture_frame: slope must be a C-contiguous float32 array")
    if dq.shape != slope.shape:
        raise ValueError(f"correct_picture_frame: dq {dq.shape} and slope {slope.shape} differ")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"correct_picture_frame: scale must be > 0 px, got {scale}")
    if refpix and nx % channels:
        raise ValueError(f"correct_picture_frame: nx={nx} is not divisible by channels={channels}")
    border = 4 if refpix else 0
    yi, xi = _fit_pixels(ny, nx, border, edge_width, int(budget))
    s = slope[yi, xi].astype(np.float64)
    ok = np.isfinite(s) & ((dq[yi, xi] & skip_flags) == 0)
    yi, xi, s = yi[ok], xi[ok], s[ok]
    if len(s) < 100:
        raise ValueError(f"correct_picture_frame: only {len(s)} usable background pixels")
    tpl = _PictureFrameTemplate(ny, nx, channels, smooth, refpix, excluded)
    ci = tpl.chan[xi]
    med = float(np.median(s))
    sig = 1.4826 * float(np.median(np.abs(s - med))) or 1.0
    keep = np.abs(s - med) < 2 * nsigma * sig  # sources out; the pattern (<< sig) stays

    cache: list = [None, None, None]  # keep (held, so compared by identity), projector, data

    def fit(sc: float, keep: np.ndarray) -> tuple[float, float, float, np.ndarray]:
        # the data's projection is computed once per set of pixels kept
        if cache[0] is not keep:
            dm = _Demean(yi[keep], ci[keep], ny, channels)
            cache[:] = [keep, dm, dm(s[keep])]
        _, dm, sk = cache
        t = tpl.at(sc, yi, xi)
        return (*_fit_amp(sk, dm(t[keep])), t)

    fitted = scale is None
    if fitted:
        scales = np.asarray(PICTURE_FRAME_SCALES)
        chi = np.array([fit(float(sc), keep)[1] for sc in scales])
        k = int(np.argmin(chi))
        scale = float(scales[k])
        if 0 < k < len(scales) - 1 and np.isfinite(chi[k - 1:k + 2]).all():
            lg = np.log(scales[k - 1:k + 2])
            c2, c1, _ = np.polyfit(lg, chi[k - 1:k + 2], 2)
            if c2 > 0:
                scale = float(np.exp(np.clip(-c1 / (2 * c2), lg[0], lg[2])))

    def clipped(sc: float, keep: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
        for _ in range(2):
            a, _, _, t = fit(sc, keep)
            r = s - a * t
            r -= np.median(r[keep])
            rs = 1.4826 * float(np.median(np.abs(r[keep]))) or 1.0
            keep = np.abs(r) < nsigma * rs
        a, rss, vf, t = fit(sc, keep)
        err = math.sqrt(rss / max(int(keep.sum()) - 2, 1) * vf) if math.isfinite(vf) else math.inf
        return a, err, t, keep

    a, aerr, t, keep1 = clipped(scale, keep)
    if fitted and not abs(a) >= detect * aerr:
        # no pattern seen: a scale fitted to noise would make A noisier (0.04 vs 0.01 DN/s
        # rms at 256^2); A at the fallback scale instead (unbiased, its own noise)
        fitted = False
        scale = float(fallback_scale)
        a, aerr, t, keep1 = clipped(scale, keep)
    keep = keep1
    c = float(np.median((s - a * t)[keep]))
    n = int(keep.sum())
    if a != 0.0:
        tpl.subtract(slope, scale, a)
    return PictureFrameResult(amplitude=a, amplitude_err=aerr, scale=float(scale), offset=c,
                              npix=n, scale_fitted=fitted)


@dataclass
class SnowballResult:
    """Snowballs found by :func:`expand_snowballs`: per event ``ramp``, ``diff`` (the read
    difference of the jump; -1 if no ramp's core jumped together), centre ``y``/``x``, core
    ``radius`` (px, from its area) and the number of halo pixels re-fitted."""

    ramp: np.ndarray
    diff: np.ndarray
    y: np.ndarray
    x: np.ndarray
    radius: np.ndarray
    n_refit: np.ndarray


def expand_snowballs(
    reads: np.ndarray,
    read_times: np.ndarray,
    result,
    maps: DetectorMaps,
    *,
    channels: int,
    min_area: int = 9,
    expand_factor: float = 2.0,
    margin: float = 1.0,
    weighting: str = "optimal",
    jump_threshold: float = 4.0,
    refpix: bool = True,
    bias: np.ndarray | None = None,
) -> SnowballResult:
    """Flag and re-fit the halos of large cosmic-ray events (snowballs), in place.

    A snowball leaves a round core of pixels with large jumps, which the two-point test finds,
    inside a diffuse halo whose jumps are too small for it and bias those slopes. As JWST's
    jump step does (``expand_large_events``), a cluster of at least ``min_area`` jump pixels
    (8-connected) is taken as a snowball's core; its read difference is the one most of its
    pixels jumped in; every pixel within ``expand_factor`` x the core's radius (from its
    area) + ``margin`` gets a jump at that difference too, and those pixels are re-fitted
    with the kernels one by one (reference-pixel offsets of the fused call, bias, linearity,
    saturation, two-point jumps plus the forced one, the same fit) and flagged JUMP_DET.
    The segments on either side are fitted separately, so the halo's charge does not
    enter the slope; the cost is a larger error for those pixels.

    ``result`` (``process`` output, with ``result.refpix`` when ``refpix``) and its arrays
    are updated in place (``result.flicker``, clean_flicker's sums of the slopes before, is
    dropped when a halo was re-fitted); ``bias``: the bias ``process`` was given
    (subarrays).
    """
    from scipy import ndimage

    import readout_cy as rc

    r4 = reads if reads.ndim == 4 else reads[None]  # cutouts are converted, not the frame
    nramps, nr, ny, nx = r4.shape
    empty = SnowballResult(*(np.zeros(0) for _ in range(6)))
    if nr < 3:
        return empty
    if not rc._kernels.has_flag_block(np.ascontiguousarray(result.dq, np.uint32),
                                      pixel["JUMP_DET"]):
        return empty  # no 2x2 block of jump pixels, so no cluster of >= 4 (the usual frame)
    jump = (result.dq & np.uint32(pixel["JUMP_DET"])) != 0
    if refpix and (result.refpix is None or result.refpix.off is None):
        # without the offsets the re-fitted reads would keep the ~12000 DN reset level,
        # which the linearity polynomial must not see
        raise ValueError("expand_snowballs: the result has no reference-pixel offset tables "
                         "(result.refpix.off, from process_ramp); pass refpix=False only for "
                         "frames read without reference pixels")
    lab, nlab = ndimage.label(jump, structure=np.ones((3, 3), bool))
    if nlab == 0:
        return empty
    area = np.bincount(lab.ravel(), minlength=nlab + 1)
    big = np.nonzero(area >= min_area)[0]
    big = big[big > 0]
    if big.size == 0:
        return empty
    chw = nx // channels
    objs = ndimage.find_objects(lab)
    t = np.asarray(read_times, np.float64)
    out: dict[str, list] = {k: [] for k in ("ramp", "diff", "y", "x", "radius", "n_refit")}
    rvar_full = None
    if refpix:
        rvar_full = rc.refpix_variance(maps.read_noise, (ny, nx), channels=channels,
                                       excluded=result.refpix.excluded)
    for lb in big:
        sl = objs[lb - 1]
        core = lab[sl] == lb
        cy, cx = (np.nonzero(core)[0].mean() + sl[0].start, np.nonzero(core)[1].mean() + sl[1].start)
        rad = float(np.sqrt(area[lb] / np.pi))
        reach = expand_factor * rad + margin
        y0, y1 = max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)) + 1, ny)
        x0, x1 = max(int(np.floor(cx - reach)), 0), min(int(np.ceil(cx + reach)) + 1, nx)
        # whole channels across, so that the reference-noise table applies as it is
        c0, c1 = x0 // chw, -(-x1 // chw)
        rows, cols = slice(y0, y1), slice(c0 * chw, c1 * chw)
        raw = np.ascontiguousarray(r4[:, :, rows, cols], dtype=np.uint16)
        val = raw.astype(np.float32)
        if refpix:
            for r in range(nramps):
                val[r] -= result.refpix.correction(r, nr, rows, cols, nx)
        sub = (rows, cols)
        if bias is not None:
            val -= np.asarray(bias, np.float32)[sub]
        if maps.nonlinearity is not None:
            val = rc.linearity_correct(val, maps.nonlinearity[:, rows, cols], dqflags=pixel).data
        sat = rc.flag_saturation(raw, maps.saturation[sub], dqflags=pixel)
        jr = rc.detect_jumps(val, t, gain=maps.gain[sub], read_noise=maps.read_noise[sub],
                             threshold=jump_threshold, ngood=sat.ngood, dqflags=pixel)
        jumps = jr.jumps.copy()
        yy, xx = np.mgrid[rows, cols]
        in_core = lab[sub] == lb
        halo = (np.hypot(yy - cy, xx - cx) <= reach) & (maps.gain[sub] == maps.gain[sub])
        ev_ramp = ev_diff = -1
        for r in range(nramps):  # the event is in one ramp: the one whose core pixels jumped
            counts = jumps[r][:, in_core].sum(axis=1)
            if counts.max() < max(min_area // 2, 1):
                continue
            k = int(np.argmax(counts))
            jumps[r, k][halo] = True
            if ev_ramp < 0:
                ev_ramp, ev_diff = r, k
        out["ramp"].append(ev_ramp)
        out["diff"].append(ev_diff)
        rvar = None if rvar_full is None else rvar_full[rows, c0:c1]
        fit = rc.fit_slopes(val, t, gain=maps.gain[sub], read_noise=maps.read_noise[sub],
                            ngood=sat.ngood, jumps=jumps, median_rate=jr.median_rate,
                            weighting=weighting, refpix_var=rvar, dqflags=pixel)
        # the fit's own bits replace those of the fused call; the others stay
        own = np.uint32(pixel["SATURATED"] | pixel["JUMP_DET"] | pixel["DO_NOT_USE"])
        gy, gx = np.nonzero(halo)
        ty, tx = gy + y0, gx + c0 * chw
        result.slope[ty, tx] = fit.slope[gy, gx]
        result.var_poisson[ty, tx] = fit.var_poisson[gy, gx]
        result.var_rnoise[ty, tx] = fit.var_rnoise[gy, gx]
        result.err[ty, tx] = fit.err[gy, gx]
        result.nused[ty, tx] = fit.nused[gy, gx]
        result.dq[ty, tx] = (result.dq[ty, tx] & ~own) | fit.dq[gy, gx] | np.uint32(pixel["JUMP_DET"])
        out["y"].append(cy)
        out["x"].append(cx)
        out["radius"].append(rad)
        out["n_refit"].append(int(halo.sum()))
    if out["y"] and getattr(result, "flicker", None) is not None:
        result.flicker = None  # clean_flicker's sums were of the slopes before the re-fit
    return SnowballResult(**{k: np.asarray(v) for k, v in out.items()})


def ipc_kernel(alpha: float) -> np.ndarray:
    """3x3 inter-pixel capacitance kernel: ``alpha`` to each nearest neighbour, 1 - 4 alpha
    kept.  The step's ``ipc='alpha'`` (and legacy ``ipc_alpha > 0``); a measured, possibly
    asymmetric kernel comes from the ``ipc`` reference (``ipc='reference'``)."""
    if not 0.0 <= alpha < 0.2:
        raise ValueError(f"ipc alpha must be in [0, 0.2), got {alpha}")
    k = np.zeros((3, 3))
    k[0, 1] = k[2, 1] = k[1, 0] = k[1, 2] = alpha
    k[1, 1] = 1.0 - 4.0 * alpha
    return k


# Relative error left by the Jacobi iterations of ipc_deconvolve.
IPC_TOLERANCE = 1e-7


def check_ipc_kernel(kernel, what: str = "IPC kernel") -> np.ndarray:
    """The kernel as a float64 (3, 3) array, or ValueError naming ``what`` and the problem.

    Convention (the ``ipc`` reference's): ``kernel[1 + dy, 1 + dx]`` is the fraction of a
    pixel's charge seen by the pixel at row offset dy and column offset dx (the forward
    kernel), so the measured image is the true one *convolved* with it. It must be finite,
    sum to 1 (within 1e-3: it neither makes nor loses charge), have nearest neighbours that
    share charge (their sum >= 0; an inverse kernel has negative ones) and a centre k0 with
    sum |neighbours| < k0 (the Jacobi iterations then converge; IPC is a few per cent).
    """
    k = np.asarray(kernel, dtype=np.float64)
    if k.shape != (3, 3):
        raise ValueError(f"{what}: must be 3x3, not {k.shape}")
    if not np.isfinite(k).all():
        raise ValueError(f"{what}: has non-finite elements")
    if abs(k.sum() - 1.0) > 1e-3:
        raise ValueError(f"{what}: elements sum to {k.sum():.6f}, not 1 (a forward IPC kernel "
                         "neither makes nor loses charge)")
    arms = k[0, 1] + k[2, 1] + k[1, 0] + k[1, 2]
    if arms < 0:
        raise ValueError(f"{what}: the nearest neighbours sum to {arms:.4f} < 0: that is an "
                         "inverse (deconvolution) kernel, as JWST's ipc reference holds; the "
                         "IRIS ipc reference holds the forward kernel (charge shared, >= 0)")
    nb = np.abs(k).sum() - abs(k[1, 1])
    if not k[1, 1] > nb:
        raise ValueError(f"{what}: centre {k[1, 1]:.4f} is not larger than the sum of the "
                         f"neighbours' magnitudes {nb:.4f}; not an IPC kernel (or the inverse "
                         "kernel, which is not what the ipc reference holds)")
    return k


def _convolve3(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """sum_ij k[i, j] x[y - (i - 1), x - (j - 1)] with zeros outside (float64): the image
    ``x`` with each pixel's value spread to its neighbours by the forward kernel ``k``."""
    out = np.zeros_like(x)
    ny, nx = x.shape
    for i in range(3):
        for j in range(3):
            if k[i, j] == 0:
                continue
            dy, dx = i - 1, j - 1  # the value of (y, x) lands on (y + dy, x + dx)
            ys, yd = slice(max(-dy, 0), ny + min(-dy, 0)), slice(max(dy, 0), ny + min(dy, 0))
            xs, xd = slice(max(-dx, 0), nx + min(-dx, 0)), slice(max(dx, 0), nx + min(dx, 0))
            out[yd, xd] += k[i, j] * x[ys, xs]
    return out


def ipc_iterations(kernel: np.ndarray, tolerance: float = IPC_TOLERANCE) -> int:
    """Jacobi iterations that bring the relative error below ``tolerance`` (at least 1)."""
    k = check_ipc_kernel(kernel)
    ratio = (np.abs(k).sum() - abs(k[1, 1])) / k[1, 1]
    if ratio <= 0:
        return 1
    return max(1, math.ceil(math.log(tolerance) / math.log(ratio)))


def ipc_deconvolve(result, kernel: np.ndarray, *, border: int = 4,
                   iterations: int | None = None) -> float:
    """Undo inter-pixel capacitance in a slope image, in place; returns the factor by which
    the deconvolution multiplies white (read) noise variance.

    IPC makes the measured signal the true one convolved with a 3x3 ``kernel`` (the forward
    kernel, see :func:`check_ipc_kernel`; any 3x3 kernel, symmetric or not). It is linear in
    the signal, so it commutes with the ramp fit and is undone on the slopes (Jacobi
    iterations x <- (y - N * x) / k0, N the kernel without its centre; the error shrinks by
    sum|N| / k0 per iteration: ``iterations`` None runs until it is below 1e-7, 7 for alpha =
    2 %). The active area is deconvolved with zero signal outside it (the border has no
    light to couple); a pixel without a slope (NaN) counts as zero for its neighbours.

    Variances (the fit's, per pixel): the read noise was added after the coupling, so it is
    white in the measured image and the deconvolution amplifies its variance by
    sum((K^-1)^2), about 1 / (1 - 4 alpha)^2 for the nearest-neighbour kernel (the centre of
    K^-1 is ~1 / k0: +19 % at alpha = 2 %);
    the shot noise was coupled with the signal, and after deconvolution it is that of the
    pixel's own charge again, i.e. VAR_POISSON evaluated at the deconvolved slope (scaled by
    x / y). The covariances the deconvolution creates between neighbours (order alpha) are
    not in ERR.
    """
    k = check_ipc_kernel(kernel)
    if iterations is None:
        iterations = ipc_iterations(k)
    ny, nx = result.slope.shape
    act = (slice(border, ny - border), slice(border, nx - border))
    y = result.slope[act].astype(np.float64)
    bad = ~np.isfinite(y)
    y0 = np.where(bad, 0.0, y)
    nb = k.copy()
    nb[1, 1] = 0.0
    x = y0 / k[1, 1]
    for _ in range(iterations):
        x = (y0 - _convolve3(x, nb)) / k[1, 1]
    # white-noise amplification: the deconvolved image of a single white-noise pixel
    d = np.zeros((9, 9))
    d[4, 4] = 1.0
    kinv = d / k[1, 1]
    for _ in range(iterations + 4):
        kinv = (d - _convolve3(kinv, nb)) / k[1, 1]
    gain_w = float((kinv * kinv).sum())
    vp = result.var_poisson[act].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where((y0 > 0) & (x > 0), x / y0, 1.0)
    result.slope[act] = np.where(bad, np.nan, x).astype(np.float32)
    result.var_poisson[act] = np.where(bad, 0.0, vp * scale).astype(np.float32)
    result.var_rnoise[act] = np.where(bad, 0.0, result.var_rnoise[act] * gain_w).astype(np.float32)
    result.err[act] = np.sqrt(result.var_poisson[act] + result.var_rnoise[act])
    if getattr(result, "flicker", None) is not None:
        result.flicker = None  # clean_flicker's sums were of the slopes before
    return gain_w
