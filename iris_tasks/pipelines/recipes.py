"""Frame-level entry points: what the CLI and the Airflow tasks call (no Airflow imports).

* :func:`run_readout` - raw ramp -> ``<root>_rate.fits`` (stage 1);
* :func:`run_reduction` - ``_rate`` -> the frame's recipe product: ``<root>_cal.fits``
  (imager science/sky/telluric) or the cube ``<root>_s3d.fits`` (IFS science/sky/telluric);
  calibration frames have nothing more to do (None);
* :func:`build_master_darks` / :func:`build_master_flats` - a night's darks/flats -> masters
  (IFS lamp flats through the trace model, :mod:`iris_tasks.masters.ifs_flat`);
* :func:`build_ifs_models` - a night's IFS lamp flats + arcs -> instrument models (``ifstrace``,
  :mod:`iris_tasks.masters.ifs_model`);
* :func:`build_telluric_references` - a night's telluric-standard cubes (LEN-TEL / SLI-TEL
  ``_s3d``) -> one ``telluric`` reference per configuration holding the night's standards
  (:mod:`iris_tasks.masters.telluric`);
* :func:`build_photom_references` - a night's imager standards (IMG1-TEL ``_cal``) -> one
  ``photom`` zero point per standard (:mod:`iris_tasks.masters.photom`);
* :func:`reduce_path` / :func:`build_masters_dir` - the ``iris-drs reduce|masters`` drivers.

Products are written to a temporary name in the output directory and renamed into place,
so a watcher never sees a half-written file.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astropy.io import fits

from .. import metadata
from ..steps.base import remove_suffix

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def product_path(source: PathLike, out_dir: PathLike, suffix: str) -> Path:
    """``<out_dir>/<root>_<suffix>.fits`` with any known suffix of ``source`` replaced."""
    stem = Path(source).name
    for ext in (".fits.gz", ".fits", ".fit"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    root, _ = remove_suffix(stem)
    if not (root.isascii() and root.isprintable()):
        # The product's name becomes its FITS FILENAME, which must be printable ASCII: a raw
        # frame landed as e.g. "científico_0006.fits" gets the key-safe form of its name.
        from ..storage.keys import key_filename

        root = key_filename(root)
    return Path(out_dir) / f"{root}_{suffix}.fits"


def save_atomically(model: Any, path: PathLike) -> Path:
    """Save ``model`` to ``path`` via a temporary directory beside it and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        tmp = tmp_dir / path.name  # same basename: FILENAME in the header is the final name
        model.save(str(tmp))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def is_raw(path: PathLike) -> bool:
    """True for a raw ramp (RampModel / 3- or 4-D SCI), False for products and references."""
    with fits.open(path, memmap=True) as hdul:
        header = hdul[0].header
        if "REFTYPE" in header:
            return False
        model = header.get("DATAMODL")
        if model:
            return model == "RampModel"
        return "SCI" in hdul and hdul["SCI"].header.get("NAXIS", 0) in (3, 4)


# -- single frames --------------------------------------------------------------------------


def run_readout(raw_path: PathLike, out_dir: PathLike, *, context: str | None = None,
                mode: str = "auto", output: PathLike | None = None, validate: bool = True) -> Path:
    """Stage 1 of one raw frame; returns the ``_rate`` path.

    The raw header is validated first (:func:`iris_tasks.metadata.validate_file`), so a bad
    frame fails with the list of header problems rather than deep inside a step.
    """
    path, result = run_readout_model(raw_path, out_dir, context=context, mode=mode, output=output,
                                     validate=validate)
    result.close()
    return path


def run_readout_model(raw_path: PathLike, out_dir: PathLike, *, context: str | None = None,
                      mode: str = "auto", output: PathLike | None = None,
                      validate: bool = True) -> tuple[Path, Any]:
    """:func:`run_readout`, also returning the saved rate model, for a caller that goes on to
    stage 2 in the same process (``run_reduction(..., rate_model=)``): the ~320 MB of a
    4096^2 rate image are then not read back and converted again. The caller closes it."""
    from ..steps.readout_step import ReadoutStep

    if validate:
        metadata.validate_file(os.fspath(raw_path))
    step = ReadoutStep(crds_context=context, mode=mode)
    result = step.run(os.fspath(raw_path))
    try:
        path = Path(output) if output else product_path(raw_path, out_dir, "rate")
        return save_atomically(result, path), result
    except BaseException:
        result.close()
        raise


def run_reduction(rate_path: PathLike, out_dir: PathLike, *, sky_paths: Sequence[PathLike] = (),
                  context: str | None = None, sky_method: str = "auto",
                  output: PathLike | None = None, rate_model: Any = None,
                  step_options: Mapping[str, Mapping[str, Any]] | None = None) -> Path | None:
    """The frame's stage-2 recipe on its ``_rate``; returns the product path or None.

    ``step_options``: step name -> options for the recipe's pipeline (the real-time chain's
    flexure prior, ``{"flexure": {"prior_dy": ..., ...}}``), over the recipe's own.

    ``rate_model``: the model saved as ``rate_path`` (from :func:`run_readout_model`), handed
    over: stage 2 works on it in place instead of reading the file again, and closes it.

    Imager science and telluric frames get image2 with sky subtraction from ``sky_paths``
    (or the documented Background2D fallback; ``sky_method='frames'`` makes missing skies
    an error), then the ``photom`` step (MJy/sr from the CRDS zero point; skipped for the
    standards themselves). Sky frames get image2 without sky subtraction or photom (a sky
    ``_cal`` stays in the science frames' unit for their sky subtraction). IFS science, telluric and sky
    frames get iris_ifs2 (cube extraction + cube sky subtraction) and an ``_s3d`` cube; the
    telluric step calibrates science cubes only (a sky cube stays in e-/s for the science
    cubes' sky subtraction; a standard's own cube is left as it is by the step).
    """
    try:
        return _reduce(rate_path, out_dir, sky_paths=sky_paths, context=context,
                       sky_method=sky_method, output=output, rate_model=rate_model,
                       step_options=step_options or {})
    finally:
        if rate_model is not None:
            rate_model.close()


def _reduce(rate_path: PathLike, out_dir: PathLike, *, sky_paths: Sequence[PathLike],
            context: str | None, sky_method: str, output: PathLike | None,
            rate_model: Any, step_options: Mapping[str, Mapping[str, Any]]) -> Path | None:
    header = fits.getheader(rate_path, 0)
    recipe = metadata.recipe_for(header)
    if "ifs2" in recipe.stages:
        from ..ifs import Ifs2Pipeline as pipeline_class
    elif "image2" in recipe.stages:
        from .image2 import Image2Pipeline as pipeline_class
    else:
        log.info("%s: %s (%s) has no stage 2; its _rate is the product", Path(rate_path).name,
                 recipe.obsname, recipe.kind)
        return None
    steps: dict[str, dict[str, Any]] = {"sky_sub": {"method": sky_method}}
    if recipe.kind == "sky":
        steps["sky_sub"]["skip"] = True  # a sky frame is the background; nothing to subtract
        # A sky frame is subtracted from science frames still in e-/s or DN/s (sky_sub refuses
        # one in other units): it must not be flux-calibrated when CRDS serves it a standard.
        steps["telluric" if "ifs2" in recipe.stages else "photom"] = {"skip": True}
    for name, opts in step_options.items():
        steps.setdefault(name, {}).update(opts)
    pipeline = pipeline_class(crds_context=context, steps=steps,
                              sky_files=[os.fspath(p) for p in sky_paths] or None)
    if rate_model is not None:
        from ..steps.base import handing_over

        with handing_over(rate_model):
            result = pipeline.run(rate_model)
    else:
        result = pipeline.run(os.fspath(rate_path))
    try:
        path = Path(output) if output else product_path(rate_path, out_dir, recipe.final_suffix)
        return save_atomically(result, path)
    finally:
        result.close()


# -- nightly masters ------------------------------------------------------------------------


def _rates(paths: Iterable[PathLike], out_dir: PathLike, context: str | None) -> list[str]:
    """Rate images for ``paths``: raw ramps are taken through stage 1 into ``out_dir``."""
    rates = []
    for path in paths:
        if is_raw(path):
            rates.append(os.fspath(run_readout(path, out_dir, context=context)))
        else:
            rates.append(os.fspath(path))
    return rates


def build_master_darks(paths: Sequence[PathLike], out_dir: PathLike, *, context: str | None = None,
                       min_frames: int = 3, **options: Any) -> list[Path]:
    """One master dark per DETECTOR/EXPTIME/READPATT group of ``paths`` (rates or raw ramps).

    Groups with fewer than ``min_frames`` frames are skipped with a warning.
    """
    from ..masters.dark import build_master_dark, group_darks, save_master_dark

    rates = _rates(paths, out_dir, context)
    written = []
    for key, frames in group_darks(rates).items():
        if len(frames) < min_frames:
            log.warning("master dark %s: %d frame(s) < %d, not built", key, len(frames), min_frames)
            continue
        master = build_master_dark([f.path for f in frames], min_frames=min_frames, **options)
        written.append(save_master_dark(master, out_dir))
        log.info("wrote %s", written[-1])
    return written


@dataclass
class ModelBuildFailure:
    """A reference that could not be built, and why: an IFS configuration's instrument model
    (``ifstrace``), a telluric standard's response (``telluric``) or an imager standard's zero
    point (``photom``)."""

    key: dict[str, Any]
    inputs: list[str]
    reason: str
    reftype: str = "ifstrace"
    # A standard left out by QA (:func:`build_telluric_references` with ``limits``): its QA
    # numbers and the ones outside the thresholds.
    metrics: dict[str, float] | None = None
    failed: list[str] | None = None


def build_ifs_models(flats: Sequence[PathLike], arcs: Sequence[PathLike], out_dir: PathLike, *,
                     darks: Sequence[PathLike] = (), context: str | None = None,
                     **options: Any) -> tuple[list[Path], list[ModelBuildFailure]]:
    """One IFS instrument model (``ifstrace``) per DETECTOR/IFSMODE/IFSSCALE/FILTER group of
    lamp flats (LEN-SPX, SLI-NFF) and arcs (LEN-IDP, SLI-IDP) (rates or raw ramps).

    Imager flats in ``flats`` are ignored. The frames are flat-fielded with the pixel flat
    ``context`` selects (the previous night's), when there is one. A group that cannot be built (no arc, lamp off, no
    lines, a pattern that does not match the design...) does not stop the others: it is
    returned as a :class:`ModelBuildFailure` naming the reason (the caller keeps the
    previous model for it).
    """
    from ..masters.common import MasterBuildError, read_inputs
    from ..masters.ifs_model import (
        ARC_OBSNAMES,
        FLAT_OBSNAMES,
        GROUP_KEYS,
        build_ifs_model,
        group_model_inputs,
        save_ifs_model,
    )

    def of_kind(paths: Sequence[PathLike], names: tuple[str, ...]) -> list[str]:
        return [f.path for f in read_inputs(paths) if f.obsname in names]

    lamp = of_kind(_rates(flats, out_dir, context), FLAT_OBSNAMES)
    arc = of_kind(_rates(arcs, out_dir, context), ARC_OBSNAMES)
    written: list[Path] = []
    failures: list[ModelBuildFailure] = []
    for key, (group_flats_, group_arcs) in group_model_inputs(lamp, arc).items():
        inputs = [f.path for f in (*group_flats_, *group_arcs)]
        try:
            master = build_ifs_model([f.path for f in group_flats_], [f.path for f in group_arcs],
                                     darks=darks, context=context, **{"flat": "crds", **options})
        except MasterBuildError as exc:
            failures.append(ModelBuildFailure(dict(zip(GROUP_KEYS, key, strict=True)), inputs,
                                              str(exc)))
            log.error("IFS model %s not built: %s", key, exc)
            continue
        written.append(save_ifs_model(master, out_dir))
        log.info("wrote %s", written[-1])
    return written, failures


TELLURIC_KEYS = ("DETECTOR", "IFSMODE", "IFSSCALE", "FILTER")
PHOTOM_KEYS = ("DETECTOR", "FILTER")


def _build_standards(frames: Sequence[PathLike], *, reftype: str, keys: tuple[str, ...],
                     build: Any) -> tuple[list[tuple[tuple[str, ...], Any]],
                                          list[ModelBuildFailure]]:
    """``build`` a reference from each standard star's product in ``frames``, in order of
    exposure start: [(configuration ``keys`` values, built master)], and the standards that
    cannot give one (:class:`~iris_tasks.masters.common.MasterBuildError`: no star, saturated,
    mismatched filter...) as :class:`ModelBuildFailure` naming the reason - they do not stop
    the others."""
    from ..masters.common import MasterBuildError

    def start_of(path: str) -> tuple[str, tuple[str, ...]]:
        try:
            h = fits.getheader(path, 0)
        except (OSError, ValueError):
            return "", ("",) * len(keys)
        return (f"{h.get('DATE-OBS', '')}T{h.get('TIME-OBS', '')}",
                tuple(str(h.get(k, "")) for k in keys))

    ordered = sorted((os.fspath(f) for f in frames), key=lambda f: (start_of(f)[0], f))
    built: list[tuple[tuple[str, ...], Any]] = []
    failures: list[ModelBuildFailure] = []
    for frame in ordered:
        config = start_of(frame)[1]
        try:
            built.append((config, build(frame)))
        except MasterBuildError as exc:
            failures.append(ModelBuildFailure(dict(zip(keys, config, strict=True)), [frame],
                                              str(exc), reftype=reftype))
            log.error("%s reference from %s not built: %s", reftype, Path(frame).name, exc)
    return built, failures


def _standard_references(frames: Sequence[PathLike], out_dir: PathLike, *, reftype: str,
                         keys: tuple[str, ...], build: Any, save: Any, night: str | None,
                         per_config: Any = None) -> tuple[list[Path], list[ModelBuildFailure]]:
    """One ``reftype`` reference per standard star's product in ``frames`` (``build`` it,
    ``save`` it into ``out_dir``), in order of exposure start.

    Each reference keeps USEAFTER = its standard's exposure start, except the night's first
    standard built of each configuration (``keys``) when ``night`` is given: its USEAFTER is
    the night's start (:func:`iris_tasks.masters.common.night_start_utc`), so CRDS serves it
    to that night's frames taken before it too (UseAfter serves the latest reference starting
    before a frame; without this, frames before the first standard would get the previous
    night's). DATE-OBS/TIME-OBS stay the standard's. A standard that cannot give a reference
    does not stop the others (:func:`_build_standards`). ``per_config`` is called with each
    configuration's built masters before they are saved.
    """
    from ..masters.common import night_start_utc

    built, failures = _build_standards(frames, reftype=reftype, keys=keys, build=build)
    if per_config is not None:
        groups: dict[tuple[str, ...], list[Any]] = {}
        for config, master in built:
            groups.setdefault(config, []).append(master)
        for masters in groups.values():
            per_config(masters)
    written: list[Path] = []
    covered: set[tuple[str, ...]] = set()
    for config, master in built:
        if night and config not in covered and night_start_utc(night) < str(master.model.meta.useafter):
            log.info("%s: first standard of %s on night %s: USEAFTER %s (night start) instead "
                     "of %s", master.model.meta.provenance.parents, "/".join(config), night,
                     night_start_utc(night), master.model.meta.useafter)
            master.model.meta.useafter = night_start_utc(night)
        covered.add(config)
        written.append(save(master, out_dir))
        log.info("wrote %s", written[-1])
    return written, failures


def build_telluric_references(cubes: Sequence[PathLike], out_dir: PathLike, *,
                              night: str | None = None,
                              limits: dict[str, tuple[float | None, float | None]] | None = None,
                              **options: Any) -> tuple[list[Path], list[ModelBuildFailure]]:
    """The night's telluric-standard cubes (LEN-TEL / SLI-TEL ``_s3d``) -> one ``telluric``
    reference per DETECTOR/IFSMODE/IFSSCALE/FILTER holding all of that configuration's
    standards (format 2, :func:`iris_tasks.masters.telluric.combine_standards`: each one's
    response, DATE-OBS/TIME-OBS and airmass), USEAFTER the night's start (without ``night``:
    the first standard's start). Through CRDS every frame of the night then gets all the
    night's standards, and the telluric step brackets its airmass with two where it can
    (TELMETH=BRACKET) or takes the nearest and rescales it (SCALED). A standard that gives
    no response is a :class:`ModelBuildFailure`; the others go on.

    ``limits`` (the nightly QA's telluric thresholds, metric -> (low, high)): a standard whose
    own numbers fall outside them (:func:`iris_tasks.masters.telluric.select_standards`) is
    left out of its configuration's reference (TELNREJ, HISTORY) and returned as a
    :class:`ModelBuildFailure` with its numbers; the reference is built from the standards
    that pass, and none when none passes (the previous reference then stays operational).
    Without ``limits`` every built standard goes in."""
    from ..masters.common import night_start_utc
    from ..masters.telluric import (
        build_telluric,
        combine_standards,
        save_telluric,
        select_standards,
        telluric_filename,
    )

    built, failures = _build_standards(cubes, reftype="telluric", keys=TELLURIC_KEYS,
                                       build=lambda cube: build_telluric(cube, **options))
    groups: dict[tuple[str, ...], list[Any]] = {}
    for config, master in built:
        groups.setdefault(config, []).append(master)
    paths = {Path(c).name: os.fspath(c) for c in cubes}
    written: list[Path] = []
    for config, masters in groups.items():
        rejected: list[Any] = []
        if limits:
            masters, rejected = select_standards(masters, limits)
        combined = None
        if masters:
            useafter = night_start_utc(night) if night else None
            if useafter and useafter > str(masters[0].model.meta.useafter):
                useafter = None  # a standard before the night's start (an odd night label)
            combined = combine_standards(masters, useafter=useafter, night=night,
                                         rejected=[(m.cube, why) for m, _, why in rejected])
        for m, numbers, why in rejected:
            fate = (f"left out of {telluric_filename(combined)}, built from the "
                    f"{len(masters)} standard(s) that passed ({combined.cube})" if combined else
                    f"no standard of {'/'.join(config)} passed: no telluric reference for it "
                    "tonight (the previous one stays operational)")
            failures.append(ModelBuildFailure(
                dict(zip(TELLURIC_KEYS, config, strict=True)), [paths.get(m.cube, m.cube)],
                f"{m.cube}: failed QA ({why}); {fate}", reftype="telluric",
                metrics=numbers, failed=[w.split("=")[0] for w in why.split(", ")]))
            log.error("telluric standard %s failed QA (%s): %s", m.cube, why, fate)
        if combined is None:
            continue
        written.append(save_telluric(combined, out_dir))
        log.info("wrote %s: %d standard(s) of %s at airmass %s", written[-1], len(masters),
                 "/".join(config), ", ".join(str(m.model.meta.telluric.airmass) for m in masters))
    return written, failures


def build_photom_references(frames: Sequence[PathLike], out_dir: PathLike, *,
                            night: str | None = None, **options: Any
                            ) -> tuple[list[Path], list[ModelBuildFailure]]:
    """One ``photom`` reference (imager zero point) per standard's flat-fielded frame
    (IMG1-TEL ``_cal``), the night's first of each DETECTOR/FILTER from ``night``'s start
    (:func:`_standard_references`); where a filter's standards span enough airmass, the
    night's own extinction fitted to them replaces the table value in each
    (:func:`iris_tasks.masters.photom.night_extinction`)."""
    from ..masters.photom import build_photom, night_extinction, save_photom

    return _standard_references(frames, out_dir, reftype="photom", keys=PHOTOM_KEYS,
                                build=lambda frame: build_photom(frame, **options),
                                save=save_photom, night=night, per_config=night_extinction)


def build_master_flats(paths: Sequence[PathLike], out_dir: PathLike, *,
                       darks: Sequence[PathLike] = (), context: str | None = None,
                       min_frames: int = 3, ifs_options: dict[str, Any] | None = None,
                       **options: Any) -> list[Path]:
    """One master flat per DETECTOR/FILTER/IFSMODE group of ``paths`` (rates or raw ramps).

    Each frame is dark-subtracted with the matching master in ``darks`` or the CRDS dark
    under ``context``. Imager groups are normalised combines
    (:func:`iris_tasks.masters.flat.build_master_flat`); IFS lamp groups (IFSMODE LENSLET or
    SLICER) are divided by the lamp illumination modelled through the CRDS ``ifstrace`` under
    ``context`` (:func:`iris_tasks.masters.ifs_flat.build_master_ifs_flat`, which also takes
    ``ifs_options``).
    """
    from ..masters.flat import build_master_flat, group_flats, save_master_flat
    from ..masters.ifs_flat import IFS_MODES, build_master_ifs_flat

    rates = _rates(paths, out_dir, context)
    written = []
    for key, frames in group_flats(rates).items():
        if len(frames) < min_frames:
            log.warning("master flat %s: %d frame(s) < %d, not built", key, len(frames), min_frames)
            continue
        builder = build_master_ifs_flat if key[2] in IFS_MODES else build_master_flat
        extra = (ifs_options or {}) if key[2] in IFS_MODES else {}
        master = builder([f.path for f in frames], darks=darks, context=context,
                         min_frames=min_frames, **options, **extra)
        written.append(save_master_flat(master, out_dir))
        log.info("wrote %s", written[-1])
    return written


def build_nightly(darks: Sequence[PathLike], flats: Sequence[PathLike], arcs: Sequence[PathLike],
                  out_dir: PathLike, *, context: str | None = None, min_frames: int = 3,
                  tellurics: Sequence[PathLike] = (), photometric: Sequence[PathLike] = (),
                  night: str | None = None,
                  telluric_limits: dict[str, tuple[float | None, float | None]] | None = None
                  ) -> tuple[list[Path], list[ModelBuildFailure]]:
    """Master darks, then the IFS instrument models (lamp flats + arcs), then master flats
    (IFS lamp flats modelled with the new instrument model where there is one, else the CRDS
    ``ifstrace``), then one telluric reference per configuration holding its standards' cubes
    in ``tellurics`` (:func:`build_telluric_references`) and one imager zero point per
    standard's ``_cal`` in ``photometric`` (:func:`build_photom_references`), from ``night``'s
    start (telluric standards outside ``telluric_limits`` left out of their reference).
    Returns the references written and the ones that could not be built (IFS models,
    standards)."""
    new_darks = build_master_darks(darks, out_dir, context=context, min_frames=min_frames) \
        if darks else []
    models: list[Path] = []
    failures: list[ModelBuildFailure] = []
    if arcs:
        models, failures = build_ifs_models(flats, arcs, out_dir, darks=new_darks,
                                            context=context)
    traces = {}
    for path in models:
        h = fits.getheader(path, 0)
        traces[tuple(str(h.get(k)) for k in ("DETECTOR", "IFSMODE", "IFSSCALE", "FILTER"))] = \
            os.fspath(path)
    new_flats = (build_master_flats(flats, out_dir, darks=new_darks, context=context,
                                    min_frames=min_frames,
                                    ifs_options={"trace": traces} if traces else None)
                 if flats else [])
    responses: list[Path] = []
    if tellurics:
        responses, bad_standards = build_telluric_references(tellurics, out_dir, night=night,
                                                             limits=telluric_limits)
        failures = [*failures, *bad_standards]
    zero_points: list[Path] = []
    if photometric:
        zero_points, bad_standards = build_photom_references(photometric, out_dir, night=night)
        failures = [*failures, *bad_standards]
    return [*new_darks, *models, *new_flats, *responses, *zero_points], failures


# -- directory drivers (CLI) ----------------------------------------------------------------


@dataclass
class Classified:
    """Frames of a directory sorted by what the DRS does with them."""

    nightly: dict[str, list[str]] = field(
        default_factory=lambda: {"dark": [], "flat": [], "arc": []})
    frames: list[tuple[str, metadata.Recipe]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def classify(paths: Iterable[PathLike]) -> Classified:
    """Recipe of every file (raw or _rate); products of later stages and references skipped."""
    out = Classified()
    for path in sorted(os.fspath(p) for p in paths):
        try:
            header = fits.getheader(path, 0)
        except OSError as exc:
            out.skipped.append((path, f"not FITS ({exc})"))
            continue
        if "REFTYPE" in header:
            out.skipped.append((path, "reference file"))
            continue
        if header.get("DATAMODL") not in (None, "RampModel", "ImageModel"):
            out.skipped.append((path, f"{header.get('DATAMODL')} product"))
            continue
        if header.get("DATAMODL") == "ImageModel" and header.get("S_FLAT") == "COMPLETE":
            out.skipped.append((path, "already calibrated"))
            continue
        try:
            recipe = metadata.recipe_for(header)
        except metadata.MetadataError as exc:
            out.skipped.append((path, str(exc)))
            continue
        out.frames.append((path, recipe))
        if recipe.nightly:
            out.nightly[recipe.nightly].append(path)
    return out


def _matching_skies(science: str, skies: Sequence[str]) -> list[str]:
    h = fits.getheader(science, 0)
    chosen = []
    for sky in skies:
        s = fits.getheader(sky, 0)
        if s.get("DETECTOR") == h.get("DETECTOR") and s.get("FILTER") == h.get("FILTER"):
            chosen.append(sky)
    return chosen


def reduce_path(path: PathLike, out_dir: PathLike, *, context: str | None = None,
                sky_method: str = "auto", sky_paths: Sequence[PathLike] = (),
                masters: bool = True) -> list[Path]:
    """``iris-drs reduce``: one file, or every frame of a directory, by its recipe.

    Raw frames go through stage 1 first. In a directory, imager sky frames with the science
    frame's DETECTOR and FILTER are its sky frames; nightly darks/flats (if ``masters``) are
    combined into masters after their readout.
    """
    path = Path(path)
    out_dir = Path(out_dir)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".fits") if path.is_dir() else [path]
    found = classify(files)
    for skipped, why in found.skipped:
        log.info("skipping %s: %s", skipped, why)
    if not path.is_dir() and not found.frames:
        raise ValueError(f"{path}: nothing to reduce ({found.skipped[0][1] if found.skipped else 'no frames'})")
    written: list[Path] = []
    rates: dict[str, tuple[str, metadata.Recipe]] = {}
    for frame, recipe in found.frames:
        if is_raw(frame):
            rate = run_readout(frame, out_dir, context=context)
            written.append(rate)
            rates[frame] = (os.fspath(rate), recipe)
        else:
            rates[frame] = (frame, recipe)
    sky_rates = [r for r, rec in rates.values() if rec.kind == "sky" and rec.mode == "imager"]
    ifs_sky_rates = [r for r, rec in rates.values() if rec.kind == "sky" and rec.mode != "imager"]
    for rate, recipe in rates.values():
        skies = list(sky_paths)
        if recipe.kind in ("science", "telluric") and not skies:
            if recipe.mode == "imager":
                skies = _matching_skies(rate, sky_rates)
            else:
                from ..ifs import matching_sky_frames

                skies = matching_sky_frames(rate, ifs_sky_rates)
        product = run_reduction(rate, out_dir, sky_paths=skies, context=context, sky_method=sky_method)
        if product is not None:
            written.append(product)
    if masters and path.is_dir() and any(found.nightly.values()):
        dark_rates = [rates[f][0] for f in found.nightly["dark"]]
        flat_rates = [rates[f][0] for f in found.nightly["flat"]]  # IFS lamps: trace-modelled
        arc_rates = [rates[f][0] for f in found.nightly["arc"]]
        written += build_nightly(dark_rates, flat_rates, arc_rates, out_dir, context=context)[0]
    return written


def build_masters_dir(directory: PathLike, out_dir: PathLike, *, context: str | None = None,
                      publish: bool = False, description: str | None = None
                      ) -> tuple[list[Path], str | None]:
    """``iris-drs masters``: master darks then flats (using the new darks) from a directory.

    With ``publish`` the masters become references in a new CRDS context, which is returned.
    """
    found = classify(sorted(Path(directory).glob("*.fits")))
    if not any(found.nightly.values()):
        raise ValueError(f"{directory}: no nightly dark, flat or arc frames found")
    written, _ = build_nightly(found.nightly["dark"], found.nightly["flat"],
                               found.nightly["arc"], out_dir, context=context)
    new_context = None
    if publish and written:
        from .. import calib

        text = description or f"nightly masters from {Path(directory).name}: " + ", ".join(p.name for p in written)
        new_context = calib.publish_references([os.fspath(p) for p in written], text)
        log.info("published %d master(s) as %s", len(written), new_context)
    return written, new_context


__all__ = [
    "ModelBuildFailure", "build_ifs_models", "build_master_darks", "build_master_flats",
    "build_masters_dir", "build_nightly", "build_photom_references", "build_telluric_references",
    "classify", "is_raw", "product_path", "reduce_path", "run_readout", "run_reduction", "save_atomically",
]
