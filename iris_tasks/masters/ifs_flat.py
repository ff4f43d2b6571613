"""IFS master flat from the night's lamp frames (LEN-SPX, SLI-NFF): the detector pixel flat
behind the spectral traces.

A continuum lamp through the IFS lights only the traces, and how much light a pixel gets
depends on where it sits in the cross-dispersion profile of its spectrum, on the lamp
spectrum and on the spaxel throughput. A plain normalised combine (the imager's recipe) is
that illumination pattern, not a pixel flat. So the lamp is modelled with the instrument model
itself - the ``ifstrace`` reference that ``extract_cube`` inverts - and the pixel flat at a lit
pixel is the measured lamp rate over the modelled one.

Algorithm, per lamp frame (DN/s, dark-subtracted):

1. **Extract** the lamp cube ``g`` with a unit flat: the same joint weighted least-squares
   inverse of the trace model as ``extract_cube`` (:func:`iris_tasks.ifs.extract.extract`), so
   the model and the science reduction share one forward model ``A`` (to a looser CG
   tolerance, :data:`LAMP_NOISE_TOL`). ``g`` includes the spaxel throughput and, per sample,
   the profile-weighted mean of the pixel flat under it.
2. **Model the lamp** as separable, ``m(k, j, i) = S(k) T(j, i)``: one lamp spectrum for every
   spaxel (a continuum lamp seen through one filter) times the spaxel throughput.
   ``T`` is THRUPUT of the trace reference (``spaxel_throughput='trace'``, default) or fitted
   from the lamp (``'lamp'``: alternating medians, for a lamp that does not illuminate the
   field uniformly). ``S(k)`` is the median over all well-covered spaxels of ``g / T`` in plane
   k: the pixel flat under one sample enters ``S`` only as one value among hundreds to
   thousands, so no smoothing along the spectrum is needed (and none blurs filter edges).
3. **Project** the model back, ``I = A m`` (DN/s a pixel would get with a flat of 1), and
   take ``F = D / I`` where ``I`` is at least ``lit_fraction`` (5 %) of the lamp's typical
   level - the light-weighted median of ``I``, i.e. the level above which half the lamp light
   falls (a plain median over the pixels the profile reaches depends on where the profile
   window is truncated).

Then per DETECTOR / FILTER / IFSMODE group: the per-frame estimates ``F`` (NaN where unlit)
are combined with the imager flats' clipped mean on their own errors (ERR / I), in bands of
memory-mapped inputs (:mod:`iris_tasks.masters.combine`), renormalised to median 1 over lit
good pixels, and flagged. Each frame is modelled with its own trace (IFSSCALE may differ
within a group: the pixel flat is a detector property, so frames of several plate scales
make one master, lit where any of them lit it).

Flags: pixels no frame lit -> value 1.0 and UNRELIABLE_FLAT. Not NO_FLAT_FIELD: the flat_field
step treats NO_FLAT_FIELD as "cannot flat-field" and marks the science pixel DO_NOT_USE (and
refuses a flat more than half unusable, which a lenslet flat is), whereas these pixels are
fine - they just carry little trace light, and dividing by 1 leaves them as they are. Lit
pixels without data -> NO_FLAT_FIELD | DO_NOT_USE; below ``dead_threshold`` or DEAD in the
inputs -> DEAD | NO_FLAT_FIELD | DO_NOT_USE; below ``low_qe_threshold`` -> LOW_QE (as the
imager flats).

What a lamp flat cannot tell apart (documented in docs/ifs.md):

* Along the spectrum: a detector response that depends only on the row (wavelength) is
  indistinguishable from the lamp spectrum ``S(k)`` - exactly so in the slicer, where every
  spaxel's wavelength k falls on the same row. That part of the flat ends up in ``S``; for the
  science it acts as a spectral response common to all spaxels, which the telluric
  calibration removes.
* Across the field: with ``'trace'`` any per-spaxel difference between the lamp and THRUPUT
  (large-scale detector response, throughput drift, lamp non-uniformity) goes into the flat
  of that spaxel's pixels. For science that is right for the first two (they multiply the
  science light the same way) and wrong for the last. With ``'lamp'`` it goes into the fitted
  throughput instead and the flat keeps only the structure within each trace footprint.
  Either way the per-spaxel lamp throughput relative to THRUPUT is reported
  (``QA_TPRMS``/``QA_TPMAX``) so a change of lamp or trace shows up in QA.

And the flat is only as good as the trace: the lamp / model ratio in the profile wings is very
sensitive to a trace offset or a wrong profile width, which :func:`profile_bias` measures
(``QA_PROF``; the nightly QA stops a flat whose trace does not fit the lamp).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..datamodels import IfsTraceModel, open_model
from ..datamodels.dqflags import pixel
from .combine import DEFAULT_MAX_MEMORY_MB, combine_files, static_dq
from .common import (
    InputFrame,
    MasterBuildError,
    night_of,
    robust_stats,
    single_group,
)
from .flat import GROUP_KEYS, MasterFlat, flat_reference, frame_darks, group_flats

log = logging.getLogger(__name__)

__all__ = [
    "IFS_FLAT_OBSNAMES", "IFS_MODES", "LAMP_NOISE_TOL", "LampFit", "MasterIfsFlat",
    "build_master_ifs_flat", "fit_lamp", "lamp_spectrum", "lit_pixels", "model_lamp_frame",
    "profile_bias", "spaxel_ratio",
]

IFS_FLAT_OBSNAMES = ("LEN-SPX", "SLI-NFF")
IFS_MODES = ("LENSLET", "SLICER")
SPAXEL_THROUGHPUT = ("trace", "lamp")
# CG tolerance of the lamp extraction, in sigma rms per sample. extract_cube's 1e-3 is for
# science; on a bright lamp the slicer's un-blending is so ill-conditioned that it takes 140
# iterations (220 s a 4k frame), 0.1 still 54 (80 s), 1.0 26 (40 s). The model only uses
# S(k), a median over thousands of spaxels, and what is left unconverged are mostly
# alternating patterns between blended neighbours: on a 4k slicer lamp frame the flat from
# 1.0 differs from the one from 0.1 by 1.3e-4 rms, 7 % of its own per-pixel noise.
LAMP_NOISE_TOL = 1.0

# Pixel DQ bits given zero weight in the lamp extraction: those extract_cube ignores by default.
EXTRACT_BAD = np.uint32(pixel["DO_NOT_USE"] | pixel["SATURATED"] | pixel["DEAD"]
                        | pixel["REFERENCE_PIXEL"] | pixel["NON_SCIENCE"])
UNLIT = np.uint32(pixel["UNRELIABLE_FLAT"])
_NO_FLAT = np.uint32(pixel["NO_FLAT_FIELD"] | pixel["DO_NOT_USE"])
_DEAD = np.uint32(pixel["DEAD"]) | _NO_FLAT
# Flags counted in QA_NBAD: real defects, not "the lamp does not light this pixel".
_COUNTED_BAD = np.uint32(pixel["DO_NOT_USE"] | pixel["NO_FLAT_FIELD"] | pixel["DEAD"]
                         | pixel["LOW_QE"])


# ---------------------------------------------------------------------- array level
def _nanmedian(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: NaN, handled by callers
        return np.nanmedian(values, axis=axis)


def _usable_samples(flux: np.ndarray, coverage: np.ndarray, min_coverage: float) -> np.ndarray:
    """Samples whose fitted flux rests on their own pixels (most of their weight usable)."""
    return (coverage >= min_coverage) & np.isfinite(flux)


def lamp_spectrum(flux: np.ndarray, coverage: np.ndarray, throughput: np.ndarray, *,
                  min_coverage: float = 0.5) -> np.ndarray:
    """``S(k)``: per wavelength plane, the median over spaxels of ``flux / throughput``.

    ``flux``/``coverage`` are (nwave, ny_s, nx_s) extraction results, ``throughput`` (ny_s,
    nx_s). Only samples with ``coverage >= min_coverage`` and a positive throughput count;
    a plane without any gives 0 (no model there: its pixels stay unlit).
    """
    t = np.asarray(throughput, np.float64)[None]
    ok = _usable_samples(flux, coverage, min_coverage) & np.isfinite(t) & (t > 0)
    ratio = np.where(ok, flux / np.where(ok, t, 1.0), np.nan)
    spectrum = _nanmedian(ratio.reshape(ratio.shape[0], -1), axis=1)
    # A continuum lamp is positive; a negative median is noise on an almost dark plane.
    return np.where(np.isfinite(spectrum) & (spectrum > 0), spectrum, 0.0)


def spaxel_ratio(flux: np.ndarray, coverage: np.ndarray, spectrum: np.ndarray,
                 throughput: np.ndarray, *, min_coverage: float = 0.5) -> np.ndarray:
    """Per-spaxel lamp throughput relative to ``throughput``, median 1 (ny_s, nx_s).

    ``median_k(flux / (S(k) T))`` over the spaxel's well-covered samples, NaN where none
    (or no usable throughput). With the unit-flat extraction of a uniform lamp this is the
    detector response averaged along the spaxel's trace times any throughput change.
    """
    s = np.asarray(spectrum, np.float64)[:, None, None]
    t = np.asarray(throughput, np.float64)[None]
    denom = s * t
    ok = _usable_samples(flux, coverage, min_coverage) & np.isfinite(denom) & (denom > 0)
    ratio = _nanmedian(np.where(ok, flux / np.where(ok, denom, 1.0), np.nan), axis=0)
    norm = np.nanmedian(ratio) if np.isfinite(ratio).any() else np.nan
    if not norm > 0:
        return np.full(ratio.shape, np.nan)
    return ratio / norm


def fit_lamp(flux: np.ndarray, coverage: np.ndarray, throughput: np.ndarray, *,
             spaxel_throughput: str = "trace", min_coverage: float = 0.5, iterations: int = 3
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Separable lamp model ``S(k) T(j, i)`` of an extracted lamp cube.

    Returns (spectrum S (nwave,), throughput T used (ny_s, nx_s), per-spaxel lamp throughput
    relative to ``throughput`` (median 1, NaN where unmeasured)). ``spaxel_throughput``:
    ``'trace'`` keeps T = ``throughput`` (the trace reference's THRUPUT); ``'lamp'`` fits T
    from the lamp by alternating medians (``iterations`` rounds; the rank-one fit converges
    in one or two), falling back to THRUPUT for spaxels the lamp does not measure.
    """
    if spaxel_throughput not in SPAXEL_THROUGHPUT:
        raise ValueError(f"spaxel_throughput must be one of {SPAXEL_THROUGHPUT}, "
                         f"not {spaxel_throughput!r}")
    t_ref = np.asarray(throughput, np.float64)
    t_ref = np.where(np.isfinite(t_ref) & (t_ref > 0), t_ref, 0.0)
    t = t_ref
    spectrum = lamp_spectrum(flux, coverage, t, min_coverage=min_coverage)
    if spaxel_throughput == "lamp":
        for _ in range(max(1, int(iterations))):
            s = spectrum[:, None, None]
            ok = _usable_samples(flux, coverage, min_coverage) & (s > 0)
            fitted = _nanmedian(np.where(ok, flux / np.where(ok, s, 1.0), np.nan), axis=0)
            usable = np.isfinite(fitted) & (fitted > 0)
            # The overall scale is shared with S: tie it to THRUPUT so the spectrum keeps its
            # meaning (DN/s per sample per unit reference throughput).
            both = usable & (t_ref > 0)
            scale = float(np.median(fitted[both] / t_ref[both])) if both.any() else 1.0
            t = np.where(usable, fitted / scale, t_ref)
            spectrum = lamp_spectrum(flux, coverage, t, min_coverage=min_coverage)
    ratio = spaxel_ratio(flux, coverage, spectrum, t_ref, min_coverage=min_coverage)
    return spectrum, t, ratio


def lit_pixels(illumination: np.ndarray, fraction: float = 0.05) -> tuple[np.ndarray, float]:
    """(lit mask, typical level): pixels whose modelled lamp light is at least ``fraction`` of
    the light-weighted median illumination (the level above which half the light falls).

    Weighting by the light makes the level a property of the profile core, independent of how
    many far-wing pixels the truncated profile window happens to reach.
    """
    values = np.asarray(illumination, np.float64)
    positive = np.sort(values[values > 0], kind="stable")
    if positive.size == 0:
        return np.zeros(values.shape, bool), 0.0
    cumulative = np.cumsum(positive)
    level = float(positive[np.searchsorted(cumulative, 0.5 * cumulative[-1])])
    return values >= fraction * level, level


def profile_bias(data: np.ndarray, illumination: np.ndarray, lit: np.ndarray, good: np.ndarray,
                 level: float, *, min_pixels: int = 50) -> float:
    """Largest |median(D / I) - 1| over four classes of lit pixels: rising or falling side of
    the cross-dispersion profile (sign of dI/dx) x core or wing (I above or below half the
    typical ``level``); ``D / I`` is first divided by its overall median.

    The pixel flat does not know where the traces fall, so with the right trace model every
    class has median 1 (measured <= 0.002 on the simulated lenslet, ~0.01 on the small slicer
    where a few slice-edge columns carry their channel's gain). The ratio in the profile wings
    is very sensitive to the model: a trace 0.05 pixel off in x biases one wing by +10 % and
    the other by -8 %, a PSF width 5 % off both wings by -10 % and the core by +6 %. Classes
    with fewer than ``min_pixels`` pixels are ignored (NaN if none is left).
    """
    use = lit & good & np.isfinite(data)
    if not use.any():
        return float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.asarray(data, np.float64) / np.asarray(illumination, np.float64)
    norm = np.median(ratio[use])
    if not norm > 0:
        return float("nan")
    slope = np.gradient(np.asarray(illumination, np.float64), axis=1)
    core = illumination >= 0.5 * level
    worst = float("nan")
    for side in (slope > 0, slope < 0):
        for part in (core, ~core):
            values = ratio[use & side & part]
            if values.size >= min_pixels:
                bias = abs(float(np.median(values) / norm) - 1.0)
                worst = bias if not worst >= bias else worst
    return worst


@dataclass
class LampFit:
    """The lamp model of one frame."""

    spectrum: np.ndarray  # (nwave,) S(k), DN/s per sample per unit throughput
    throughput: np.ndarray  # (ny_s, nx_s) spaxel throughput used in the model
    spaxel_ratio: np.ndarray  # (ny_s, nx_s) lamp throughput / trace THRUPUT, median 1
    illumination: np.ndarray  # (ny, nx) float32 modelled lamp rate with a unit flat (DN/s)
    lit: np.ndarray  # (ny, nx) bool
    level: float  # light-weighted median illumination (DN/s)
    iterations: int  # CG iterations of the extraction
    profile_bias: float  # trace-model check, see profile_bias()


def model_lamp_frame(geom: Any, data: np.ndarray, variance: np.ndarray, good: np.ndarray, *,
                     throughput: np.ndarray | None = None, spaxel_throughput: str = "trace",
                     lit_fraction: float = 0.05, min_coverage: float = 0.5,
                     noise_tol: float = LAMP_NOISE_TOL) -> LampFit:
    """Extract a lamp frame through ``geom`` (a :class:`~iris_tasks.ifs.extract.TraceGeometry`)
    with a unit flat, fit the separable lamp model and project it back.

    ``data``/``variance`` in DN/s (dark-subtracted), ``good`` the usable pixels.
    ``noise_tol``: CG stops when the extraction error is below this many sigma rms per
    sample (see :data:`LAMP_NOISE_TOL`).
    """
    from ..ifs.extract import extract

    # Weights from the data variance, no refit with the model variance (extract_cube's
    # reweight): the faint-flux bias it removes is ~1/SNR^2 per sample on a lamp (< 1e-4) and
    # the same for every spaxel, so it cancels in S(k) and in the normalisation.
    result = extract(geom, data, variance, good, noise_tol=noise_tol, want_variance=False)
    if throughput is None:
        throughput = np.ones(geom.cube_shape[1:])
    spectrum, used, ratio = fit_lamp(result.flux, result.coverage, throughput,
                                     spaxel_throughput=spaxel_throughput,
                                     min_coverage=min_coverage)
    illumination = geom.project(spectrum[:, None, None] * used[None]).astype(np.float32)
    lit, level = lit_pixels(illumination, lit_fraction)
    return LampFit(spectrum=spectrum, throughput=used, spaxel_ratio=ratio,
                   illumination=illumination, lit=lit, level=level,
                   iterations=result.iterations,
                   profile_bias=profile_bias(data, illumination, lit, good, level))


# ---------------------------------------------------------------------- builder
@dataclass
class MasterIfsFlat(MasterFlat):
    """A built IFS master flat, its QA numbers and what it was modelled with."""

    traces: dict[str, str] = field(default_factory=dict)  # input frame -> ifstrace used
    n_unlit: int = 0  # science pixels no lamp frame lit (value 1, UNRELIABLE_FLAT)
    lit_fraction: float = 0.0  # fraction of the science pixels with a measured flat
    thruput_rms: float = float("nan")  # worst frame: robust rms of lamp/trace spaxel throughput
    thruput_max: float = float("nan")  # worst frame: largest |lamp/trace - 1| of a spaxel
    profile_bias: float = float("nan")  # worst frame: trace-model check (profile_bias())


TraceChoice = str | os.PathLike | IfsTraceModel | Mapping[tuple, str | os.PathLike] | None


def _trace_for(frame: InputFrame, trace: TraceChoice,
               context: str | None) -> tuple[IfsTraceModel, str]:
    """The ifstrace model for ``frame`` and its name: ``trace`` if given (a mapping is looked
    up by the frame's (DETECTOR, IFSMODE, IFSSCALE, FILTER): the night's new models), else
    CRDS."""
    if isinstance(trace, Mapping):
        key = tuple(str(frame.get(k)) for k in ("DETECTOR", "IFSMODE", "IFSSCALE", "FILTER"))
        trace = trace.get(key)
    if isinstance(trace, IfsTraceModel):
        return trace, str(trace.meta.filename or "ifstrace override")
    if trace is not None:
        path = os.fspath(trace)
    else:
        try:
            from .. import calib

            path = str(calib.get_reference(frame.header, "ifstrace", context=context))
        except Exception as exc:
            raise MasterBuildError(
                f"{frame.path}: no ifstrace reference for DETECTOR={frame.detector} "
                f"IFSMODE={frame.get('IFSMODE')} IFSSCALE={frame.get('IFSSCALE')} "
                f"FILTER={frame.get('FILTER')} ({exc})") from exc
    try:
        model = open_model(path, IfsTraceModel)
    except Exception as exc:
        raise MasterBuildError(f"ifstrace {path}: cannot be read ({exc})") from exc
    return model, path


def _model_frame(frame: InputFrame, trace: IfsTraceModel, trace_name: str,
                 dark: np.ndarray | None, *, spaxel_throughput: str, lit_fraction: float,
                 min_coverage: float, noise_tol: float) -> LampFit:
    """Read one lamp rate, subtract its dark and model its illumination."""
    from ..datamodels import ImageModel
    from ..ifs.cube import rate_variance
    from ..ifs.extract_step import check_trace, trace_geometry
    from ..steps.base import ReferenceFileError

    model = open_model(frame.path)
    try:
        if not isinstance(model, ImageModel):
            raise MasterBuildError(f"{frame.path}: expected an IFS _rate image, got "
                                   f"{type(model).__name__}")
        try:
            check_trace(trace, model, f"ifstrace {Path(trace_name).name}")
        except ReferenceFileError as exc:
            raise MasterBuildError(str(exc)) from exc
        data = np.array(model.data, np.float64)
        if dark is not None:
            data -= dark
        var = rate_variance(model.err, model.var_poisson, model.var_rnoise)
        good = ((np.asarray(model.dq, np.uint32) & EXTRACT_BAD) == 0) & np.isfinite(data)
        # Rates stay in DN/s (no gain): the flat reference is the response to DN/s (QE / gain).
        geom = trace_geometry(trace, data.shape)
        throughput = getattr(trace, "throughput", None)
        return model_lamp_frame(geom, data, var, good, throughput=throughput,
                                spaxel_throughput=spaxel_throughput, lit_fraction=lit_fraction,
                                min_coverage=min_coverage, noise_tol=noise_tol)
    finally:
        model.close()


def build_master_ifs_flat(
    paths: Sequence[str | os.PathLike],
    *,
    darks: Sequence[str | os.PathLike] = (),
    context: str | None = None,
    trace: TraceChoice = None,
    subtract_dark: bool = True,
    spaxel_throughput: str = "trace",
    lit_fraction: float = 0.05,
    min_coverage: float = 0.5,
    noise_tol: float = LAMP_NOISE_TOL,
    sigma: float = 4.0,
    maxiters: int = 3,
    low_qe_threshold: float = 0.7,
    dead_threshold: float = 0.1,
    min_frames: int = 3,
    author: str = "iris_tasks.masters",
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
    threads: int | None = None,
) -> MasterIfsFlat:
    """Combine one DETECTOR/FILTER/IFSMODE group of IFS lamp rates into a master pixel flat.

    Darks as for :func:`iris_tasks.masters.flat.build_master_flat` (a given master for the
    frame's DETECTOR/READPATT, else the CRDS dark under ``context``). The trace of each frame
    is ``trace`` if given (one model, or a mapping (DETECTOR, IFSMODE, IFSSCALE, FILTER) ->
    model path such as the night's new instrument models; frames it does not cover use
    CRDS), else the CRDS ``ifstrace`` for its DETECTOR/IFSMODE/IFSSCALE/FILTER under
    ``context``. See the module docstring for the method.
    """
    start = time.perf_counter()
    if spaxel_throughput not in SPAXEL_THROUGHPUT:
        raise ValueError(f"spaxel_throughput must be one of {SPAXEL_THROUGHPUT}, "
                         f"not {spaxel_throughput!r}")
    key, frames = single_group(group_flats(paths), GROUP_KEYS, "IFS master flat", min_frames)
    detector, filt, ifsmode = key
    if ifsmode not in IFS_MODES:
        raise MasterBuildError(f"IFS master flat: IFSMODE={ifsmode} (expected one of "
                               f"{', '.join(IFS_MODES)}); imager flats go to build_master_flat")
    for frame in frames:
        if frame.obsname and frame.obsname not in IFS_FLAT_OBSNAMES:
            raise MasterBuildError(f"{frame.path}: OBSNAME={frame.obsname} is not an IFS lamp "
                                   f"flat ({', '.join(IFS_FLAT_OBSNAMES)})")
    from astropy.io import fits

    sci_header = fits.getheader(frames[0].path, "SCI")
    shape = (int(sci_header["NAXIS2"]), int(sci_header["NAXIS1"]))

    dark_paths: dict[str, str] = {}
    frame_dark_maps: list[np.ndarray | None] = [None] * len(frames)
    if subtract_dark:
        dark_paths, frame_dark_maps = frame_darks(frames, darks, context, shape,
                                                  f"IFS master flat {detector} {filt} {ifsmode}")

    traces: dict[str, str] = {}
    loaded: dict[tuple, tuple[IfsTraceModel, str]] = {}
    levels: list[float] = []
    ratios_rms: list[float] = []
    ratios_max: list[float] = []
    biases: list[float] = []
    lit_any = np.zeros(shape, bool)
    with tempfile.TemporaryDirectory(prefix="iris-ifsflat-") as tmp:
        # 1 / illumination of every frame (NaN where unlit), memory-mapped: at 4k it is 64 MB
        # a frame, read back band by band by the combine.
        inverse: list[np.ndarray] = []
        for i, (frame, dark) in enumerate(zip(frames, frame_dark_maps, strict=True)):
            tkey = (frame.get("IFSSCALE"), frame.get("FILTER"), frame.get("IFSMODE"))
            if tkey not in loaded:
                loaded[tkey] = _trace_for(frame, trace, context)
            trace_model, trace_name = loaded[tkey]
            traces[frame.path] = trace_name
            t0 = time.perf_counter()
            fit = _model_frame(frame, trace_model, trace_name, dark,
                               spaxel_throughput=spaxel_throughput, lit_fraction=lit_fraction,
                               min_coverage=min_coverage, noise_tol=noise_tol)
            if not fit.lit.any() or not fit.level > 0:
                raise MasterBuildError(f"{frame.path}: the lamp model lights no pixel (lamp "
                                       "off, or the trace does not match the frame?)")
            inv = np.lib.format.open_memmap(os.path.join(tmp, f"inv{i}.npy"), mode="w+",
                                            dtype=np.float32, shape=shape)
            with np.errstate(divide="ignore"):
                inv[...] = np.where(fit.lit, 1.0 / np.where(fit.lit, fit.illumination, 1.0),
                                    np.nan)
            inverse.append(inv)
            lit_any |= fit.lit
            levels.append(fit.level)
            rms = robust_stats(fit.spaxel_ratio.ravel())[1]
            worst = float(np.nanmax(np.abs(fit.spaxel_ratio - 1.0))) \
                if np.isfinite(fit.spaxel_ratio).any() else float("nan")
            ratios_rms.append(rms)
            ratios_max.append(worst)
            biases.append(fit.profile_bias)
            log.info("IFS master flat %s: %s with %s: lamp level %.4g DN/s, %.1f%% of pixels "
                     "lit, lamp/trace spaxel throughput rms %.4f (max dev %.4f), profile bias "
                     "%.4f, %d CG iterations (%.1f s)", ifsmode, Path(frame.path).name,
                     Path(trace_name).name, fit.level, 100.0 * fit.lit.mean(), rms, worst,
                     fit.profile_bias, fit.iterations, time.perf_counter() - t0)

        def normalise(i: int, r0: int, r1: int, band: np.ndarray, err: np.ndarray | None):
            if frame_dark_maps[i] is not None:
                band -= frame_dark_maps[i][r0:r1]
            scale = inverse[i][r0:r1]
            band *= scale
            if err is not None:
                err *= scale
            return band, err

        combined = combine_files([f.path for f in frames], sigma=sigma, maxiters=maxiters,
                                 preprocess=normalise, max_memory_mb=max_memory_mb,
                                 threads=threads)
        inverse.clear()  # drop the memory maps before their directory goes

    dq = static_dq(frames[0].path, shape)
    science = dq == 0
    covered = (combined.nused > 0) & np.isfinite(combined.mean)
    lit = science & lit_any
    basis = lit & covered & (combined.mean > 0)
    norm, _ = robust_stats(combined.mean[basis])
    if not norm > 0:
        raise MasterBuildError(f"IFS master flat {detector} {filt} {ifsmode}: no lit pixel "
                               "with a positive value after combining")
    with np.errstate(invalid="ignore", divide="ignore"):
        flat = combined.mean / np.float32(norm)
        err = np.where(combined.nused > 1, combined.std / np.sqrt(combined.nused) / norm, 0.0)

    known_dead = science & (static_dq(frames[0].path, shape, pixel["DEAD"]) != 0)
    unlit = science & ~lit_any & ~known_dead
    no_flat = lit & ~covered & ~known_dead
    dead = (lit & covered & (flat < dead_threshold)) | known_dead
    low_qe = lit & covered & ~dead & (flat < low_qe_threshold)
    dq[unlit] |= UNLIT
    dq[no_flat] |= _NO_FLAT
    dq[dead] |= _DEAD
    dq[low_qe] |= np.uint32(pixel["LOW_QE"])
    measured = lit & covered & ~dead
    flat = np.where(measured, flat, 1.0).astype(np.float32)
    err = np.where(measured & np.isfinite(err), err, 0.0).astype(np.float32)

    night = night_of(frames)
    scales = sorted({str(f.get("IFSSCALE")) for f in frames})
    # The flat rmap matches on IFSMODE: LENSLET/SLICER, never N/A (that would match any mode).
    model, spread = flat_reference(
        flat, err, dq, frames, filt, ifsmode, author=author, good=measured & ~low_qe,
        counted_bad=_COUNTED_BAD,
        description=(f"Master IFS flat {detector} {filt} {ifsmode} night {night}: lamp over "
                     f"ifstrace model (IFSSCALE {'/'.join(scales)}, spaxel throughput "
                     f"{spaxel_throughput})"))
    n_science = max(int(np.count_nonzero(science)), 1)
    lit_frac = float(np.count_nonzero(measured)) / n_science
    tp_rms = float(np.nanmax(ratios_rms)) if np.isfinite(ratios_rms).any() else float("nan")
    tp_max = float(np.nanmax(ratios_max)) if np.isfinite(ratios_max).any() else float("nan")
    prof = float(np.nanmax(biases)) if np.isfinite(biases).any() else float("nan")
    # Keywords outside the reference schema, written to the primary header as is.
    cards = [["QA_LIT", round(lit_frac, 6), "fraction of science pixels with a lamp flat"],
             ["LITFRAC", float(lit_fraction), "lit: lamp model >= this x typical level"],
             ["TPSOURCE", spaxel_throughput.upper(), "spaxel throughput of the lamp model"]]
    for name, value, comment in (("QA_TPRMS", tp_rms, "rms lamp/trace spaxel throughput"),
                                 ("QA_TPMAX", tp_max, "max |lamp/trace spaxel thruput - 1|"),
                                 ("QA_PROF", prof, "max lamp/model bias, profile side/part")):
        if np.isfinite(value):
            cards.append([name, round(value, 6), comment])
    model["extra_fits"] = {"PRIMARY": {"header": cards}}
    for name in sorted({Path(t).name for t in traces.values()}):
        model.add_history_entry(f"lamp modelled with ifstrace {name}")
    seconds = time.perf_counter() - start
    log.info("IFS master flat %s %s %s: %d frames, %.1f%% lit, rms %.4f, %d dead, %d low QE, "
             "%d lit without data, lamp/trace throughput rms %.4f, profile bias %.4f (%.1f s)",
             detector, filt, ifsmode, len(frames), 100.0 * lit_frac, spread, int(dead.sum()),
             int(low_qe.sum()), int(no_flat.sum()), tp_rms, prof, seconds)
    return MasterIfsFlat(model, [f.path for f in frames], dark_paths, levels, int(dead.sum()),
                         int(low_qe.sum()), int(no_flat.sum()), seconds, traces=traces,
                         n_unlit=int(unlit.sum()), lit_fraction=lit_frac, thruput_rms=tp_rms,
                         thruput_max=tp_max, profile_bias=prof)
