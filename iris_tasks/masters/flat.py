"""Master flat builder: a night's flat-field rate images -> FlatModel reference (``_flat``).

This is the imager recipe (uniformly lit detector). IFS lamp flats (LEN-SPX, SLI-NFF) light
only the spectral traces and are built by :mod:`iris_tasks.masters.ifs_flat`, which models
the lamp through the trace; :func:`build_master_flat` refuses them.

Algorithm (per DETECTOR / FILTER / IFSMODE group):

1. **Dark**: each frame's dark rate is subtracted: a master dark given by the caller for its
   DETECTOR and READPATT, else the CRDS dark for the frame (``context``), else an error
   (``subtract_dark=False`` skips it, e.g. for lamp flats far above the dark).
2. **Normalise**: each frame is divided by the median of its good pixels (measured on a
   4 x 4-subsampled grid: 1/16 of the pixels fixes the median to ~1e-4), so lamp drifts
   between frames do not enter the combine.
3. **Combine**: sigma-clipped mean of the normalised frames (as for darks: values more than
   4 x their own ERR from the median are clipped) in row bands of memory-mapped inputs
   (:mod:`iris_tasks.masters.combine`); ERR = clipped std / sqrt(nused).
4. **Renormalise** so the median of good pixels is exactly 1.
5. **Flag**: no data or NaN -> NO_FLAT_FIELD | DO_NOT_USE (value set to 1.0); below
   ``dead_threshold`` (including <= 0), or no data where the inputs say DEAD ->
   DEAD | NO_FLAT_FIELD | DO_NOT_USE (value 1.0);
   below ``low_qe_threshold`` -> LOW_QE (kept and corrected). Reference pixels keep their
   REFERENCE_PIXEL bit and the value 1.0.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from ..datamodels import FlatModel, open_model
from ..datamodels.dqflags import pixel
from .combine import DEFAULT_MAX_MEMORY_MB, combine_files, sample_frame, static_dq
from .common import (
    InputFrame,
    MasterBuildError,
    copy_input_meta,
    group_by,
    night_of,
    night_start_utc,
    pedigree_of,
    read_inputs,
    readpatt_of,
    robust_stats,
    save_master,
    single_group,
)

log = logging.getLogger(__name__)

GROUP_KEYS = ("DETECTOR", "FILTER", "IFSMODE")
FLAT_OBSNAMES = ("IMG1-NFF", "SLI-NFF", "LEN-SPX")
SAMPLE_STEP = 4

_NO_FLAT = np.uint32(pixel["NO_FLAT_FIELD"] | pixel["DO_NOT_USE"])
_DEAD = np.uint32(pixel["DEAD"]) | _NO_FLAT


@dataclass
class MasterFlat:
    """A built master flat and its QA numbers."""

    model: FlatModel
    frames: list[str]
    darks: dict[str, str]  # READPATT -> dark used ("" if none)
    levels: list[float]  # each frame's median level (DN/s) before normalisation
    n_dead: int
    n_low_qe: int
    n_no_flat: int
    seconds: float


def group_flats(paths: Sequence[str | os.PathLike]) -> dict[tuple, list[InputFrame]]:
    """Flat rate images grouped by (DETECTOR, FILTER, IFSMODE)."""
    frames = read_inputs(paths)
    for frame in frames:
        if frame.obsname and frame.obsname not in FLAT_OBSNAMES:
            raise MasterBuildError(f"{frame.path}: OBSNAME={frame.obsname} is not a flat "
                                   f"({', '.join(FLAT_OBSNAMES)})")
    return group_by(frames, GROUP_KEYS)


def dark_for(frame: InputFrame, darks: Sequence[str | os.PathLike], context: str | None) -> str:
    """Path of the dark for ``frame``: a given master matching DETECTOR/READPATT, else CRDS."""
    patt = readpatt_of(frame.header)
    for path in darks:
        header = fits.getheader(path, 0)
        if header.get("DETECTOR") == frame.detector and readpatt_of(dict(header)) == patt:
            return os.fspath(path)
    try:
        from .. import calib

        return str(calib.get_reference(frame.header, "dark", context=context))
    except Exception as exc:
        raise MasterBuildError(
            f"{frame.path}: no dark for DETECTOR={frame.detector} READPATT={patt}: none of the "
            f"given masters matches and CRDS has none ({exc})"
        ) from exc


def load_dark(path: str, shape: tuple[int, ...]) -> np.ndarray:
    model = open_model(path)
    try:
        data = np.array(model.data, dtype=np.float32)
    finally:
        model.close()
    if data.shape != shape:
        raise MasterBuildError(f"dark {path}: shape {data.shape} does not match the flats {shape}")
    return np.where(np.isfinite(data), data, 0.0).astype(np.float32)


def frame_darks(frames: Sequence[InputFrame], darks: Sequence[str | os.PathLike],
                context: str | None, shape: tuple[int, ...], label: str
                ) -> tuple[dict[str, str], list[np.ndarray]]:
    """The dark for each flat frame, loaded once per READPATT: ({readpatt: dark path}, one map
    per frame). ``label`` names the master being built in the log."""
    paths: dict[str, str] = {}
    maps: dict[str, np.ndarray] = {}
    for frame in frames:
        patt = readpatt_of(frame.header)
        if patt not in paths:
            paths[patt] = dark_for(frame, darks, context)
            maps[patt] = load_dark(paths[patt], shape)
            log.info("%s: dark for %s is %s", label, patt, paths[patt])
    return paths, [maps[readpatt_of(f.header)] for f in frames]


def flat_reference(flat: np.ndarray, err: np.ndarray, dq: np.ndarray,
                   frames: Sequence[InputFrame], filt: str, ifsmode: str, *, author: str,
                   description: str, good: np.ndarray, counted_bad: np.uint32
                   ) -> tuple[FlatModel, float]:
    """The FLAT reference model of a night's master (imager or IFS) with the metadata CRDS
    matches on and the QA numbers; also returns the robust RMS over ``good`` pixels.
    ``counted_bad``: the DQ bits QA_NBAD counts."""
    model = FlatModel(data=flat, err=err, dq=dq)
    copy_input_meta(model, frames[0])
    night = night_of(frames)
    model.meta.night = night
    model.meta.instrument.filter = filt
    model.meta.instrument.ifsmode = ifsmode
    model.meta.reftype = "FLAT"
    model.meta.useafter = night_start_utc(night)
    model.meta.pedigree = pedigree_of(frames)
    model.meta.description = description
    model.meta.author = author
    model.meta.provenance.parents = ",".join(os.path.basename(f.path) for f in frames)
    med, spread = robust_stats(flat[good])
    qa = model.meta.qa
    qa.nframes = len(frames)
    qa.median = float(med)
    qa.rms = float(spread)
    qa.nbad = int(np.count_nonzero(dq & counted_bad))
    return model, float(spread)


def build_master_flat(
    paths: Sequence[str | os.PathLike],
    *,
    darks: Sequence[str | os.PathLike] = (),
    context: str | None = None,
    subtract_dark: bool = True,
    sigma: float = 4.0,
    maxiters: int = 3,
    low_qe_threshold: float = 0.7,
    dead_threshold: float = 0.1,
    min_frames: int = 3,
    author: str = "iris_tasks.masters",
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
    threads: int | None = None,
) -> MasterFlat:
    """Combine one group of flat rate images into a normalised master flat."""
    start = time.perf_counter()
    key, frames = single_group(group_flats(paths), GROUP_KEYS, "master flat", min_frames)
    detector, filt, ifsmode = key
    if ifsmode in ("LENSLET", "SLICER"):
        # A normalised combine of trace-lit frames is the lamp pattern, not a pixel flat.
        raise MasterBuildError(f"master flat {detector} {filt}: IFSMODE={ifsmode} lamp flats light "
                               "only the spectral traces; build them with "
                               "iris_tasks.masters.ifs_flat.build_master_ifs_flat")
    sci_header = fits.getheader(frames[0].path, "SCI")
    shape = (int(sci_header["NAXIS2"]), int(sci_header["NAXIS1"]))

    dark_paths: dict[str, str] = {}
    darks_of_frames: list[np.ndarray | None] = [None] * len(frames)
    if subtract_dark:
        dark_paths, darks_of_frames = frame_darks(frames, darks, context, shape,
                                                  f"master flat {detector} {filt}")

    levels = []
    for frame, dark in zip(frames, darks_of_frames, strict=True):
        sample = sample_frame(frame.path, SAMPLE_STEP)
        if dark is not None:
            sample = sample - dark[::SAMPLE_STEP, ::SAMPLE_STEP]
        level, _ = robust_stats(sample)
        if not level > 0:
            raise MasterBuildError(f"{frame.path}: median illumination {level:.4g} DN/s after "
                                   "dark subtraction; not a usable flat")
        levels.append(level)

    def normalise(i: int, r0: int, r1: int, band: np.ndarray, err: np.ndarray | None):
        if darks_of_frames[i] is not None:
            band -= darks_of_frames[i][r0:r1]
        band /= np.float32(levels[i])
        if err is not None:
            err /= np.float32(levels[i])
        return band, err

    combined = combine_files([f.path for f in frames], sigma=sigma, maxiters=maxiters,
                             preprocess=normalise, max_memory_mb=max_memory_mb, threads=threads)
    dq = static_dq(frames[0].path, shape)
    science = dq == 0
    covered = combined.nused > 0
    norm, _ = robust_stats(combined.mean[covered & science & (combined.mean > 0)])
    if not norm > 0:
        raise MasterBuildError(f"master flat {detector} {filt}: no positive pixels after combining")
    with np.errstate(invalid="ignore", divide="ignore"):
        flat = combined.mean / np.float32(norm)
        err = np.where(combined.nused > 1, combined.std / np.sqrt(combined.nused) / norm, 0.0)

    no_flat = science & (~covered | ~np.isfinite(flat))
    dead = science & ~no_flat & (flat < dead_threshold)  # including <= 0: no response
    # Pixels the mask already calls DEAD are excluded from the combine (DO_NOT_USE): keep the
    # name rather than reporting them as merely "no flat".
    known_dead = no_flat & (static_dq(frames[0].path, shape, pixel["DEAD"]) != 0)
    dead |= known_dead
    no_flat &= ~known_dead
    low_qe = science & ~no_flat & ~dead & (flat < low_qe_threshold)
    dq[no_flat] |= _NO_FLAT
    dq[dead] |= _DEAD
    dq[low_qe] |= np.uint32(pixel["LOW_QE"])
    unusable = no_flat | dead | ~science
    flat = np.where(unusable, 1.0, flat).astype(np.float32)
    err = np.where(unusable | ~np.isfinite(err), 0.0, err).astype(np.float32)

    night = night_of(frames)
    model, spread = flat_reference(
        flat, err, dq, frames, filt, "N/A", author=author, good=science & ~unusable,
        counted_bad=~np.uint32(pixel["REFERENCE_PIXEL"]),
        description=f"Master flat {detector} {filt} N/A night {night}")
    seconds = time.perf_counter() - start
    log.info("master flat %s %s: %d frames, rms %.4f, %d dead, %d low QE, %d without flat (%.1f s)",
             detector, filt, len(frames), spread, int(dead.sum()), int(low_qe.sum()),
             int(no_flat.sum()), seconds)
    return MasterFlat(model, [f.path for f in frames], dark_paths, levels, int(dead.sum()),
                      int(low_qe.sum()), int(no_flat.sum()), seconds)


def flat_filename(master: MasterFlat) -> str:
    m = master.model.meta
    mode = m.instrument.ifsmode if m.instrument.ifsmode != "N/A" else "img"
    return f"iris_{m.instrument.detector}_{m.instrument.filter}_{mode}_{m.night}_flat.fits".lower()


def save_master_flat(master: MasterFlat, out_dir: str | os.PathLike) -> Path:
    return save_master(master.model, out_dir, flat_filename(master))
