"""Nightly IFS instrument model: lamp flats + arc frames -> the ``ifstrace`` reference (version 2).

The extraction (``extract_cube``) inverts an instrument model: where every spaxel's spectrum
falls on the detector at each wavelength, with which cross-dispersion profile. This module
learns that model from the calibration frames of the night, one model per
DETECTOR/IFSMODE/IFSSCALE/FILTER, starting from the optical design
(:func:`iris_tasks.instrument.nominal_design`):

1. **Trace and profile** (:func:`iris_tasks.ifs.tracefit.fit_traces`) from the continuum-lamp
   flats (LEN-SPX, SLI-NFF): each spaxel's cross-dispersion centre as a smooth function of the
   detector row, the empirical cross-dispersion profile in zones of the detector, and the
   relative spaxel throughput.
2. **Wavelengths and line-spread function** (:func:`iris_tasks.ifs.wavecal.solve_wavelengths`)
   from the arc frames (LEN-IDP, SLI-IDP) along those traces, against the published vacuum
   wavelengths of the lamps' lines (:mod:`iris_tasks.instrument.lines`).
3. **Sampling**: one linear wavelength grid for every spaxel, spanning the filter with the
   median dispersion (about one bin per detector row), so cubes of one configuration share a
   grid; each spaxel's ``TRACE_Y`` is its own solution evaluated on that grid and ``TRACE_X``
   its trace at those rows. The extraction then resamples onto the common grid as it fits.

Inputs are dark-subtracted ``_rate`` images (the darks given, else the CRDS dark); they are not
flat-fielded (the pixel flat of the IFS is itself modelled through this reference, see
:mod:`iris_tasks.masters.ifs_flat`, so the nightly order is darks -> this model -> IFS flats).

A model that cannot be built (lamp off, no arc lines, the wrong filter, a pattern that does not
match the design) raises :class:`MasterBuildError` naming the file; the nightly QA then keeps the
previous model operational (``iris_tasks.orchestration.nightly``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..datamodels import IfsTraceModel, open_model
from ..datamodels.dqflags import pixel
from ..errors import BadInputError
from ..instrument import nominal_design
from ..instrument.lines import arc_lines
from .common import (
    InputFrame,
    MasterBuildError,
    copy_input_meta,
    group_by,
    night_of,
    night_start_utc,
    pedigree_of,
    read_inputs,
    save_master,
)
from .flat import frame_darks

log = logging.getLogger(__name__)

__all__ = [
    "ARC_OBSNAMES", "FLAT_OBSNAMES", "GROUP_KEYS", "MasterIfsModel", "build_ifs_model",
    "group_model_inputs", "ifs_model_filename", "output_wavelengths", "save_ifs_model",
]

GROUP_KEYS = ("DETECTOR", "IFSMODE", "IFSSCALE", "FILTER")
FLAT_OBSNAMES = ("LEN-SPX", "SLI-NFF")
ARC_OBSNAMES = ("LEN-IDP", "SLI-IDP")
DEFAULT_LAMPS = ("Ar", "Kr", "Ne", "Xe")
MODEL_VERSION = 2
# Pixels the fits must not use: unusable, saturated, dead, reference or non-science pixels.
UNUSABLE = np.uint32(pixel["DO_NOT_USE"] | pixel["SATURATED"] | pixel["DEAD"]
                     | pixel["REFERENCE_PIXEL"] | pixel["NON_SCIENCE"])


@dataclass
class MasterIfsModel:
    """A built instrument model, what it was built from and its QA numbers."""

    model: IfsTraceModel
    flats: list[str]
    arcs: list[str]
    darks: dict[str, str]
    qa: dict[str, float]
    seconds: float
    solutions: dict[str, Any] = field(default_factory=dict, repr=False)


def group_model_inputs(flats: Sequence[str | os.PathLike], arcs: Sequence[str | os.PathLike]
                       ) -> dict[tuple, tuple[list[InputFrame], list[InputFrame]]]:
    """Lamp flats and arcs grouped by (DETECTOR, IFSMODE, IFSSCALE, FILTER): {key: (flats, arcs)}.

    A file of another kind is an error naming it; a group with flats but no arc (or the
    reverse) is returned as is and refused by :func:`build_ifs_model`.
    """
    out: dict[tuple, tuple[list[InputFrame], list[InputFrame]]] = {}
    for role, paths, names in (("flat", flats, FLAT_OBSNAMES), ("arc", arcs, ARC_OBSNAMES)):
        frames = read_inputs(paths)
        for frame in frames:
            if frame.obsname not in names:
                raise MasterBuildError(f"{frame.path}: OBSNAME={frame.obsname or 'missing'} is "
                                       f"not an IFS {role} frame ({', '.join(names)})")
        for key, group in group_by(frames, GROUP_KEYS).items():
            slot = out.setdefault(key, ([], []))
            slot[0 if role == "flat" else 1].extend(group)
    return out


def _lamps(frame: InputFrame) -> tuple[str, ...]:
    """The arc lamps that were on (header LAMPS, e.g. 'Ar,Kr'); all four when not recorded."""
    value = str(frame.get("LAMPS") or "").strip()
    if value.upper() in ("OFF", "NONE", "CONT"):
        raise MasterBuildError(f"{frame.path}: LAMPS={value!r}: no arc lamp was on")
    if not value or value.upper() == "N/A":
        return DEFAULT_LAMPS
    return tuple(p.strip().capitalize() for p in value.replace(";", ",").split(",") if p.strip())


def _read_rate(frame: InputFrame, dark: np.ndarray | None, flat: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(dark-subtracted, flat-fielded DN/s, variance, usable-pixel mask, saturated mask) of
    one rate image (``flat``: a pixel flat, NaN where it has no value)."""
    from ..ifs.cube import rate_variance

    model = open_model(frame.path)
    try:
        data = np.array(model.data, np.float64)
        if data.ndim != 2:
            raise MasterBuildError(f"{frame.path}: SCI has {data.ndim} axes; expected a 2-D "
                                   "rate image")
        if dark is not None:
            data -= dark
        var = rate_variance(model.err, model.var_poisson, model.var_rnoise)
        dq = np.asarray(model.dq, np.uint32)
    finally:
        model.close()
    good = ((dq & UNUSABLE) == 0) & np.isfinite(data) & np.isfinite(var) & (var > 0)
    if flat is not None:
        usable = np.isfinite(flat) & (flat > 0)
        data = np.divide(data, flat, out=np.zeros_like(data), where=usable)
        var = np.divide(var, flat * flat, out=np.zeros_like(var), where=usable)
        good &= usable
    return data, var, good, (dq & np.uint32(pixel["SATURATED"])) != 0


def _pixel_flat(frame: InputFrame, flat: str | os.PathLike | None, context: str | None,
                shape: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    """The pixel flat the lamp frames are divided by, and its name: ``flat`` if a path,
    the CRDS ``flat`` for the frame under ``context`` if ``flat == "crds"`` (the previous
    night's: the new flat is itself modelled through the model being built), else none.

    Why: a lamp frame that is not flat-fielded carries the detector's pixel response (~3 %)
    and channel gain steps (~2 %) into the trace fit (measured: 1024 px slicer traces 0.009 px
    rms instead of 0.004). Pixels the flat marks unusable or that it did not measure
    (DO_NOT_USE / NO_FLAT_FIELD, and the IFS flat's unlit pixels, value 1) are handled as
    the flat_field step does.
    """
    if flat is None:
        return None, None
    if str(flat).lower() == "crds":
        try:
            from .. import calib

            flat = calib.get_reference(frame.header, "flat", context=context)
        except Exception as exc:  # none yet (a first night): the fit goes on without one
            log.warning("%s: no pixel flat for the IFS model's lamp frames (%s); fitting "
                        "them as they are", frame.path, exc)
            return None, None
    from ..datamodels import FlatModel

    model = open_model(os.fspath(flat), FlatModel)
    try:
        values = np.array(model.data, np.float64)
        dq = np.asarray(model.dq, np.uint32) if model.dq is not None else None
    finally:
        model.close()
    if values.shape != shape:
        raise MasterBuildError(f"flat {flat}: shape {values.shape} does not match the "
                               f"frames {shape}")
    if dq is not None:
        values[(dq & np.uint32(pixel["DO_NOT_USE"] | pixel["NO_FLAT_FIELD"])) != 0] = np.nan
    return values, os.path.basename(os.fspath(flat))


# Percentile of the spaxels' rows-per-micron (over the band) that sets the grid step.
SAMPLING_PERCENTILE = 0.1


def output_wavelengths(y_at: Any, band: tuple[float, float], shape: tuple[int, int]) -> np.ndarray:
    """The model's common wavelength grid (micron): linear over the filter band, at most one
    bin per detector row anywhere (about one in most spaxels).

    Why at most one: the extraction splits each bin's light between two rows, so a spaxel whose
    bins are denser than its rows has more unknowns than equations along its spectrum. With
    the non-linear dispersion a grid at the *median* dispersion put 2/3 of a slicer's samples
    0.97-1.0 row apart: the normal matrix became singular in those directions and the joint
    slicer fit stopped converging (fluxes ~15 % low). So the step is the one that gives one
    row per bin where the spectra are most compressed (the :data:`SAMPLING_PERCENTILE`
    percentile of rows per micron over every spaxel and wavelength, against outliers).

    ``y_at(wavelength)`` gives every spaxel's row at those wavelengths, shape (ny_s, nx_s, n).
    """
    lo, hi = band
    probe = np.linspace(lo, hi, 65)
    rows = np.asarray(y_at(probe), np.float64)
    slope = np.gradient(rows, probe, axis=-1)  # rows per micron
    usable = np.isfinite(slope) & (slope > 0)
    if not usable.any():
        raise MasterBuildError("the wavelength solution is not monotonic for any spaxel")
    median = float(np.median(slope[usable]))
    # never coarser than 10 % below the median: a few bad spaxels must not decide the grid
    densest = max(float(np.percentile(slope[usable], SAMPLING_PERCENTILE)), 0.9 * median)
    step = 1.0 / densest
    n = int(np.floor((hi - lo) / step)) + 1
    if n < 8 or n > 4 * max(shape):
        raise MasterBuildError(f"the wavelength solution gives {n} bins over {lo}-{hi} micron "
                               "(dispersion not plausible)")
    return lo + step * np.arange(n)


def _model_from(trace: Any, waves: Any, wavelength: np.ndarray, shape: tuple[int, int]
                ) -> IfsTraceModel:
    trace_y = np.asarray(waves.y_at(wavelength), np.float64)
    trace_x = np.asarray(trace.x_at(trace_y), np.float64)
    if trace_x.shape != trace_y.shape:
        raise MasterBuildError(f"trace {trace_x.shape} and wavelength {trace_y.shape} solutions "
                               "disagree on the spaxel layout")
    model = IfsTraceModel(trace_x=trace_x.astype(np.float32), trace_y=trace_y.astype(np.float32),
                          wavelength=np.asarray(wavelength, np.float64),
                          throughput=np.asarray(trace.throughput, np.float32))
    trace.profile.to_model(model)
    model.lsf_wave = np.asarray(waves.lsf_wave, np.float64)
    model.lsf_sigma = np.asarray(waves.lsf_sigma, np.float32)
    model.wave_rms = np.asarray(waves.rms, np.float32)
    model.meta.model_version = MODEL_VERSION
    # PSFSIG: the Gaussian sigma of the profile's core, for the readers that only need a width
    # (the destripe mask) and for version-1 tools.
    model.meta.psf_sigma = float(trace.qa.get("psf_sigma") or trace.design.psf_sigma)
    return model


def _qa_numbers(trace: Any, waves: Any) -> dict[str, float]:
    qa = {"trace_rms": float(trace.qa.get("trace_rms", np.nanmedian(trace.rms))),
          "profile_residual": float(trace.qa.get("profile_residual", np.nan)),
          "wave_rms_resel": float(waves.qa.get("wave_rms_resel", np.nan)),
          "arc_lines": float(waves.lines_used)}
    lsf = np.asarray(waves.lsf_sigma, np.float64)
    wave = np.asarray(waves.lsf_wave, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        resolving = wave / (2.0 * np.sqrt(2.0 * np.log(2.0)) * lsf)
    finite = resolving[np.isfinite(resolving) & (resolving > 0)]
    if finite.size:
        qa["resolving_min"] = float(np.percentile(finite, 1))
        qa["resolving_max"] = float(np.percentile(finite, 99))
    traced = trace.qa.get("traced_fraction")
    if traced is not None:
        qa["traced_fraction"] = float(traced)
    return qa


def build_ifs_model(
    flats: Sequence[str | os.PathLike],
    arcs: Sequence[str | os.PathLike],
    *,
    darks: Sequence[str | os.PathLike] = (),
    context: str | None = None,
    subtract_dark: bool = True,
    flat: str | os.PathLike | None = None,
    author: str = "iris_tasks.masters",
    trace_options: dict[str, Any] | None = None,
    wave_options: dict[str, Any] | None = None,
) -> MasterIfsModel:
    """Build the instrument model of one DETECTOR/IFSMODE/IFSSCALE/FILTER group.

    ``flats``: continuum-lamp rate images (LEN-SPX or SLI-NFF, at least one); ``arcs``: arc
    rate images (LEN-IDP or SLI-IDP, at least one; header LAMPS names the lamps that were on).
    Darks as for the master flats (a given master for the frame's DETECTOR/READPATT, else the
    CRDS dark under ``context``). ``flat``: a pixel flat to divide the frames by (a path, or
    ``"crds"`` for the one ``context`` selects, the previous night's; see :func:`_pixel_flat`),
    None for none. ``trace_options``/``wave_options`` go to the two fits.
    """
    from ..ifs.tracefit import FlatInput, fit_traces
    from ..ifs.wavecal import ArcInput, solve_wavelengths

    start = time.perf_counter()
    groups = group_model_inputs(flats, arcs)
    if len(groups) != 1:
        detail = "; ".join(f"{dict(zip(GROUP_KEYS, k, strict=True))}: {len(f)} flat(s), "
                           f"{len(a)} arc(s)" for k, (f, a) in groups.items())
        raise MasterBuildError(f"IFS model inputs mix several configurations ({detail}); build "
                               f"one model per {'/'.join(GROUP_KEYS)}")
    (key, (flat_frames, arc_frames)), = groups.items()
    detector, mode, scale, filt = key
    label = f"IFS model {detector} {mode} {scale} mas {filt}"
    if not flat_frames:
        raise MasterBuildError(f"{label}: no lamp flat ({'/'.join(FLAT_OBSNAMES)})")
    if not arc_frames:
        raise MasterBuildError(f"{label}: no arc frame ({'/'.join(ARC_OBSNAMES)})")
    flat_frames.sort(key=lambda f: f.when)
    arc_frames.sort(key=lambda f: f.when)
    from astropy.io import fits

    sci = fits.getheader(flat_frames[0].path, "SCI")
    shape = (int(sci["NAXIS2"]), int(sci["NAXIS1"]))
    if shape[0] != shape[1]:
        raise MasterBuildError(f"{flat_frames[0].path}: {shape[0]}x{shape[1]} frame; the IFS "
                               "design is for a square detector")
    try:
        design = nominal_design(str(mode), shape[0], str(filt), str(scale))
    except ValueError as exc:
        raise MasterBuildError(f"{flat_frames[0].path}: {exc}") from exc
    everything = [*flat_frames, *arc_frames]
    dark_paths: dict[str, str] = {}
    dark_maps: list[np.ndarray | None] = [None] * len(everything)
    if subtract_dark:
        dark_paths, dark_maps = frame_darks(everything, darks, context, shape, label)

    pixel_flat, flat_name = _pixel_flat(flat_frames[0], flat, context, shape)
    flat_inputs = []
    for frame, dark in zip(flat_frames, dark_maps[: len(flat_frames)], strict=True):
        data, var, good, saturated = _read_rate(frame, dark, pixel_flat)
        flat_inputs.append(FlatInput(data=data, variance=var, good=good, name=frame.path,
                                     saturated=saturated))
    try:
        trace = fit_traces(flat_inputs, design, **(trace_options or {}))
    except BadInputError as exc:
        raise MasterBuildError(f"{label}: {exc}") from exc
    del flat_inputs
    log.info("%s: traces from %d flat(s), rms %.4f px", label, len(flat_frames),
             float(trace.qa.get("trace_rms", np.nanmedian(trace.rms))))

    arc_inputs = []
    lamps: set[str] = set()
    for frame, dark in zip(arc_frames, dark_maps[len(flat_frames):], strict=True):
        data, var, good, saturated = _read_rate(frame, dark, pixel_flat)
        on = _lamps(frame)
        lamps.update(on)
        arc_inputs.append(ArcInput(data=data, variance=var, good=good, name=frame.path,
                                   lamps=on, saturated=saturated))
    lo, hi = design.wavelength[0], design.wavelength[-1]
    pad = 0.05 * (hi - lo)  # lines just outside the design band may still reach the detector
    lines = arc_lines(sorted(lamps), lo - pad, hi + pad)
    try:
        waves = solve_wavelengths(arc_inputs, trace.x_at, design, lines, **(wave_options or {}))
    except BadInputError as exc:
        raise MasterBuildError(f"{label}: {exc}") from exc
    del arc_inputs

    from ..instrument import band

    wavelength = output_wavelengths(waves.y_at, band(str(filt)), shape)
    model = _model_from(trace, waves, wavelength, shape)
    qa = _qa_numbers(trace, waves)
    copy_input_meta(model, flat_frames[0])
    night = night_of(everything)
    meta = model.meta
    meta.instrument.ifsmode = mode
    meta.instrument.ifsscale = str(scale)
    meta.instrument.filter = filt
    meta.spaxel_scale = float(scale) / 1000.0
    meta.subarray.name = "FULL"
    meta.subarray.xstart, meta.subarray.ystart = 1, 1
    meta.subarray.ysize, meta.subarray.xsize = shape
    meta.reftype = "IFSTRACE"
    meta.useafter = night_start_utc(night)
    meta.pedigree = pedigree_of(everything)
    meta.author = author
    meta.description = (f"IFS instrument model {detector} {mode} {scale} mas {filt} night "
                        f"{night}: traces and profile from {len(flat_frames)} lamp flat(s), "
                        f"wavelengths and LSF from {len(arc_frames)} arc(s)")
    meta.provenance.parents = ",".join(os.path.basename(f.path) for f in everything)
    meta.flat_files = ",".join(os.path.basename(f.path) for f in flat_frames)
    meta.arc_files = ",".join(os.path.basename(f.path) for f in arc_frames)
    meta.trace_rms = qa["trace_rms"]
    meta.profile_residual = qa["profile_residual"]
    meta.wave_rms_resel = qa["wave_rms_resel"]
    meta.arc_lines = int(qa["arc_lines"])
    cards = [[name, round(qa[k], 3), comment] for name, k, comment in (
        ("QA_RMIN", "resolving_min", "1st percentile of the resolving power"),
        ("QA_RMAX", "resolving_max", "99th percentile of the resolving power"),
        ("QA_TRACD", "traced_fraction", "fraction of spaxels traced")) if k in qa]
    cards.append(["ARCLAMPS", ",".join(sorted(lamps)), "arc lamps of the wavelength solution"])
    cards.append(["TRPFLAT", flat_name or "NONE", "pixel flat of the lamp and arc frames"])
    model["extra_fits"] = {"PRIMARY": {"header": cards}}
    seconds = time.perf_counter() - start
    log.info("%s: model built in %.1f s: %s", label, seconds,
             {k: round(v, 4) for k, v in qa.items()})
    return MasterIfsModel(model=model, flats=[f.path for f in flat_frames],
                          arcs=[f.path for f in arc_frames], darks=dark_paths, qa=qa,
                          seconds=seconds, solutions={"trace": trace, "waves": waves})


def ifs_model_filename(master: MasterIfsModel) -> str:
    m = master.model.meta
    night = (m.useafter or "")[:10] or "unknown"
    if master.flats:
        night = night_of(read_inputs(master.flats[:1]))
    inst = m.instrument
    return (f"iris_{inst.detector}_{inst.ifsmode}_{inst.ifsscale}mas_{inst.filter}_{night}"
            "_ifstrace.fits").lower()


def save_ifs_model(master: MasterIfsModel, out_dir: str | os.PathLike) -> Path:
    return save_master(master.model, out_dir, ifs_model_filename(master))
