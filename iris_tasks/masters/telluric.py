"""Telluric reference: a standard star's cube (LEN-TEL / SLI-TEL ``_s3d``) -> ``telluric``.

The standard is reduced like any IFS frame (``iris_ifs2``: its own flexure, extraction with
the night's ``ifstrace``, sky subtraction) and then, here:

1. the header says what the star is: STDSPTYP (a hot dwarf, B9V-A3V) or STDTEFF, and its
   Vega magnitude STDMAG in the band STDMAGBD, which must be the band of the cube's filter
   (Jbb -> J, Hbb -> H, Kbb -> Ks);
2. the star is found and extracted in an aperture (:func:`iris_tasks.ifs.telluric.find_star`,
   :func:`~iris_tasks.ifs.telluric.extract_star`);
3. its spectrum is divided by the blackbody of its temperature scaled to its magnitude, the
   hydrogen-line windows bridged (:func:`~iris_tasks.ifs.telluric.compute_response`).

The result - atmosphere x telescope x instrument, in e-/s per bin per erg/s/cm^2/A - is one
reference per DETECTOR/IFSMODE/IFSSCALE/FILTER and standard, with USEAFTER = the standard's
exposure start and TELAIRM its airmass, so that CRDS serves the latest standard before a
science frame and the telluric step can rescale it to the frame's airmass. QA keywords:
QA_SNR (median S/N per bin), QA_HRES (residual hydrogen-line structure), QA_HMASK.

A cube that cannot give a response (not a TEL frame, no or unknown spectral type, magnitude
in another band than the filter, no star, a saturated star) raises :class:`MasterBuildError`
naming the file and the reason.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..datamodels import CubeModel, TelluricModel
from ..datamodels.dqflags import pixel
from ..ifs.telluric import (
    TelluricError,
    blackbody_flam,
    compute_response,
    extract_star,
    find_star,
)
from ..instrument.standards import STANDARD_TEFF, filter_band, standard_teff
from .common import MasterBuildError, save_master

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "MasterTelluric", "build_telluric", "combine_standards", "describe",
           "field_aperture", "save_telluric", "select_standards", "standard_qa", "telluric_filename",
           "undefined_fraction"]

TEL_OBSNAMES = ("LEN-TEL", "SLI-TEL")
# Aperture radius on the sky: ~4 FWHM of TMT's K-band diffraction core (16 mas), and at least
# 1.5 spaxels so a coarse scale still takes the star's neighbours.
APERTURE_ARCSEC = 0.1
MIN_APERTURE_SPAXELS = 1.5
# A bin whose star spectrum rests on unusable voxels for more than this share of the star's
# profile is left out of the response (DO_NOT_USE).
MAX_LOST = 0.25
# An aperture more than this share of whose area lies beyond the field would give a response
# missing the light the field cuts off (the 4 mas lenslet field of a small detector is a few
# spaxel rows, narrower than the aperture): refused.
MAX_APERTURE_OUTSIDE = 0.1
# Layout written by :func:`combine_standards` (TELFORMT): 2 = the night's standards in one
# reference. A reference without TELFORMT is format 1 (one standard); the telluric step reads
# both and refuses a newer one.
FORMAT_VERSION = 2
# Columns of the STANDARDS table (telluric.schema.yaml).
STANDARDS_DTYPE = np.dtype([
    ("cube", "S128"), ("date_obs", "S10"), ("time_obs", "S12"), ("mjd", "f8"), ("airmass", "f8"),
    ("target", "S64"), ("sptype", "S16"), ("teff", "f8"), ("mag", "f8"), ("band", "S8"),
    ("snr", "f8"), ("line_residual", "f8"), ("masked_fraction", "f8"), ("star_x", "f8"),
    ("star_y", "f8"), ("aperture_radius", "f8")])
# Plausible temperatures of the standards the blackbody model describes (K).
TEFF_RANGE = (min(STANDARD_TEFF.values()) - 600.0, max(STANDARD_TEFF.values()) + 600.0)


@dataclass
class MasterTelluric:
    """A built telluric reference and its QA numbers."""

    model: TelluricModel
    cube: str
    qa: dict[str, float] = field(default_factory=dict)


def _star_identity(cube: CubeModel, label: str, sptype: str | None, teff: float | None,
                   mag: float | None, band: str | None) -> tuple[str, float, float, str]:
    std = cube.meta.standard
    sptype = sptype or std.sptype
    teff = teff if teff is not None else std.teff
    mag = mag if mag is not None else std.mag
    band = band or std.band
    if sptype:
        try:
            typed = standard_teff(sptype)
        except ValueError as exc:
            raise MasterBuildError(f"{label}: STDSPTYP: {exc}") from None
        teff = typed if teff is None else float(teff)
    if teff is None:
        raise MasterBuildError(f"{label}: the standard's spectral type (STDSPTYP) or temperature "
                               "(STDTEFF) is missing from the header")
    if not (TEFF_RANGE[0] <= float(teff) <= TEFF_RANGE[1]):
        raise MasterBuildError(f"{label}: STDTEFF={teff} K is outside {TEFF_RANGE[0]:.0f}-"
                               f"{TEFF_RANGE[1]:.0f} K, where a blackbody with hydrogen lines "
                               "does not describe the star")
    if mag is None or not math.isfinite(float(mag)):
        raise MasterBuildError(f"{label}: the standard's magnitude (STDMAG) is missing")
    filt = str(cube.meta.instrument.filter or "")
    try:
        want = filter_band(filt)
    except ValueError as exc:
        raise MasterBuildError(f"{label}: {exc}") from None
    if not band:
        raise MasterBuildError(f"{label}: the band of the standard's magnitude (STDMAGBD) is "
                               "missing")
    try:
        given = filter_band(band)
    except ValueError:
        given = str(band)
    if given != want:
        raise MasterBuildError(f"{label}: mismatched filter: the standard's magnitude is in "
                               f"{band} but the cube is {filt} (needs a {want} magnitude)")
    return str(sptype or "UNKNOWN"), float(teff), float(mag), want


def build_telluric(cube: str | os.PathLike | CubeModel, *, sptype: str | None = None,
                   teff: float | None = None, mag: float | None = None, band: str | None = None,
                   aperture_arcsec: float | None = None, min_snr: float = 30.0,
                   max_core_lost: float = 0.2, author: str = "iris_tasks.masters"
                   ) -> MasterTelluric:
    """The ``telluric`` reference from a standard star's cube (a path or an open CubeModel).

    ``sptype``/``teff``/``mag``/``band`` override the header's STDSPTYP/STDTEFF/STDMAG/
    STDMAGBD. The star must be detected at ``min_snr``; more than ``max_core_lost`` of its
    core voxels unusable (saturation, bad pixels) is an error.

    ``aperture_arcsec``: the radius of the star's aperture. None: :data:`APERTURE_ARCSEC`, or,
    where the field cannot hold that aperture even around its centre (the 4 mas lenslet
    field is 9-20 spaxel rows), the largest aperture it holds (warned, recorded as the
    reference's aperture radius). Point-source fluxes measured in the same aperture are then
    right; an extended source's surface brightness comes out too bright by the share of the
    standard's light beyond it. A given aperture that does not fit around the star is refused.
    """
    owned = not isinstance(cube, CubeModel)
    model = CubeModel(os.fspath(cube)) if owned else cube
    label = os.path.basename(str(cube if owned else (model.meta.filename or "telluric cube")))
    try:
        return _build(model, label, sptype, teff, mag, band, aperture_arcsec, min_snr,
                      max_core_lost, author)
    finally:
        if owned:
            model.close()


def field_aperture(radius: float, shape: tuple[int, int],
                   at: tuple[float, float] | None = None) -> float:
    """The largest radius (spaxels, at most ``radius``, at least
    :data:`MIN_APERTURE_SPAXELS`) whose aperture around ``at`` (x, y; default the centre of
    the field) has at most :data:`MAX_APERTURE_OUTSIDE` of its area beyond a field of
    ``shape`` (ny, nx) spaxels."""
    ny, nx = shape
    x, y = at if at is not None else ((nx - 1) / 2.0, (ny - 1) / 2.0)
    if aperture_outside_fraction(x, y, radius, shape) <= MAX_APERTURE_OUTSIDE:
        return radius
    low, high = MIN_APERTURE_SPAXELS, radius
    if aperture_outside_fraction(x, y, low, shape) > MAX_APERTURE_OUTSIDE:
        return low  # not even the smallest aperture fits: the caller's check refuses it
    for _ in range(20):  # bisection to ~1e-5 of the range: the outside share grows with r
        mid = 0.5 * (low + high)
        if aperture_outside_fraction(x, y, mid, shape) <= MAX_APERTURE_OUTSIDE:
            low = mid
        else:
            high = mid
    return low


def _build(cube: CubeModel, label: str, sptype, teff, mag, band, aperture_arcsec: float | None,
           min_snr: float, max_core_lost: float, author: str) -> MasterTelluric:
    obsname = str(cube.meta.observation.obsname or "")
    if obsname not in TEL_OBSNAMES:
        raise MasterBuildError(f"{label}: OBSNAME={obsname or 'missing'} is not a telluric "
                               f"standard ({', '.join(TEL_OBSNAMES)})")
    if cube.meta.cal_step.extract_cube != "COMPLETE":
        raise MasterBuildError(f"{label}: not an extracted cube (S_CUBE="
                               f"{cube.meta.cal_step.extract_cube}); reduce it with iris_ifs2")
    if cube.meta.cal_step.telluric == "COMPLETE":
        raise MasterBuildError(f"{label}: already telluric-corrected (S_TELLUR=COMPLETE)")
    sptype, teff, mag, band = _star_identity(cube, label, sptype, teff, mag, band)
    data = np.asarray(cube.data, np.float64)
    err = np.asarray(cube.err, np.float64)
    dq = np.asarray(cube.dq, np.uint32)
    wave = np.asarray(cube.wavelength, np.float64)
    if data.ndim != 3 or wave.shape != (data.shape[0],):
        raise MasterBuildError(f"{label}: cube {data.shape} and wavelength {wave.shape} "
                               "do not match")
    scale_mas = float(cube.meta.instrument.ifsscale)
    radius = max(MIN_APERTURE_SPAXELS,
                 (APERTURE_ARCSEC if aperture_arcsec is None else aperture_arcsec) * 1000.0 / scale_mas)
    try:
        x, y, snr = find_star(data, err, dq, min_snr=min_snr)
        # A field that cannot hold the default aperture even around its centre (a design
        # limit, not a pointing error): the largest aperture it holds around the star. A
        # field that could hold it, around a star too near its edge, is refused below.
        capacity = field_aperture(radius, data.shape[1:]) if aperture_arcsec is None else radius
        if capacity < radius:
            # Around the star, but not much smaller than around the centre: a star far off
            # the field's middle is a pointing problem (the check below refuses it), not a
            # reason for a response of a fraction of its light.
            fitted = max(field_aperture(radius, data.shape[1:], at=(x, y)), 0.8 * capacity)
            log.warning("%s: the %d x %d-spaxel field cannot hold the %.2f arcsec aperture "
                        "(%.1f spaxels): %.1f spaxels (%.3f arcsec) around the star, the largest "
                        "it holds; point-source fluxes in that aperture are right, an extended "
                        "source's surface brightness is too bright by the standard's light "
                        "beyond it", label, data.shape[2], data.shape[1], APERTURE_ARCSEC,
                        radius, fitted, fitted * scale_mas / 1000.0)
            radius = fitted
        star = extract_star(data, err, dq, x, y, radius, snr=snr)
    except TelluricError as exc:
        raise MasterBuildError(f"{label}: {exc}") from None
    outside = aperture_outside_fraction(x, y, radius, data.shape[1:])
    if outside > MAX_APERTURE_OUTSIDE:
        ny, nx = data.shape[1:]
        raise MasterBuildError(
            f"{label}: {100 * outside:.0f}% of the {radius:.1f}-spaxel aperture around the star "
            f"at ({x:.1f}, {y:.1f}) lies beyond the {nx} x {ny}-spaxel field: the response would "
            "miss the light the field cuts off; centre the standard in a larger field or use a "
            "coarser scale")
    lost_bins = float(np.mean(~(star.lost <= MAX_LOST)))
    if star.core_lost > max_core_lost or lost_bins > 0.3:
        raise MasterBuildError(
            f"{label}: {100 * star.core_lost:.0f}% of the star's core voxels (within 1.5 "
            f"spaxels of ({x:.1f}, {y:.1f})) are unusable, and more than {100 * MAX_LOST:.0f}% "
            f"of its light is lost in {100 * lost_bins:.0f}% of the bins: saturated or on bad "
            "pixels; take a shorter exposure or a fainter standard")
    model_flam = blackbody_flam(wave, teff, mag, band)
    response, response_err, rdq, qa = compute_response(wave, star, model_flam, max_lost=MAX_LOST)
    if np.mean(np.isfinite(response)) < 0.5:
        raise MasterBuildError(f"{label}: the response is undefined in "
                               f"{100 * np.mean(~np.isfinite(response)):.0f}% of the band")
    if star.edge_fraction > 0.02:
        log.warning("%s: %.1f%% of the star's light sits at the aperture's or field's edge "
                    "(star at %.1f, %.1f; radius %.1f spaxels): the response may be low",
                    label, 100 * star.edge_fraction, x, y, radius)
    qa.update(star_x=x, star_y=y, star_snr=snr, core_lost=star.core_lost,
              edge_fraction=star.edge_fraction, radius=radius)

    ref = TelluricModel(data=response, err=np.nan_to_num(response_err, nan=0.0), dq=rdq,
                        wavelength=wave)
    meta = ref.meta
    inst, src = meta.instrument, cube.meta.instrument
    inst.name = "IRIS"
    for key in ("detector", "det_id", "filter", "ifsmode", "ifsscale"):
        setattr(inst, key, getattr(src, key))
    obs = cube.meta.observation
    for key in ("obsname", "obs_id", "date", "time", "mjd", "target", "airmass"):
        setattr(meta.observation, key, getattr(obs, key))
    std = meta.standard
    std.sptype, std.teff, std.mag, std.band = sptype, teff, mag, band
    meta.telluric.airmass = obs.airmass
    if obs.airmass is None:
        log.warning("%s: no AIRMASS in the header: the telluric step will not rescale this "
                    "standard to other airmasses", label)
    meta.night = cube.meta.night
    meta.reftype = "TELLURIC"
    meta.useafter = f"{obs.date}T{str(obs.time or '00:00:00')[:8]}"
    meta.pedigree = f"INFLIGHT {obs.date} {obs.date}"
    meta.author = author
    meta.description = (f"IFS response {src.ifsmode} {src.ifsscale} mas {src.filter} from "
                        f"standard {obs.target or ''} {sptype} {band}={mag:g} at airmass "
                        f"{obs.airmass}")
    meta.provenance.parents = label
    meta.response_snr = round(qa["snr"], 2)
    meta.line_residual = round(qa["line_residual"], 5)
    meta.masked_fraction = round(qa["masked_fraction"], 4)
    meta.aperture_radius = round(radius, 3)
    meta.star_x, meta.star_y = round(x, 3), round(y, 3)
    log.info("%s: response from %s %s=%.2f (%.0f K) at (%.2f, %.2f), r=%.1f spaxels: median "
             "S/N %.0f, hydrogen-line residual %.4f", label, sptype, band, mag, teff, x, y,
             radius, qa["snr"], qa["line_residual"])
    return MasterTelluric(model=ref, cube=label, qa=qa)


def aperture_outside_fraction(x: float, y: float, radius: float, shape: tuple[int, int]) -> float:
    """Share of the area of the circle of ``radius`` spaxels around (``x``, ``y``) (0-based
    spaxel centres) that lies beyond a field of ``shape`` (ny, nx) spaxels, on a 0.1-spaxel
    grid."""
    ny, nx = shape
    step = 0.1
    offsets = np.arange(-radius, radius + step / 2, step)
    dx, dy = np.meshgrid(offsets, offsets)
    disk = dx**2 + dy**2 <= radius**2
    px, py = x + dx[disk], y + dy[disk]
    inside = (px >= -0.5) & (px <= nx - 0.5) & (py >= -0.5) & (py <= ny - 0.5)
    return float(1.0 - inside.mean()) if disk.any() else 0.0


def undefined_fraction(response: Any, dq: Any) -> float:
    """Share of a response's bins without a value (DQ DO_NOT_USE, not finite or not > 0): the
    nightly QA's ``masked_fraction``."""
    resp = np.asarray(response, np.float64)
    if not resp.size:
        return 1.0
    bad = ((np.asarray(dq, np.uint32) & pixel["DO_NOT_USE"]) != 0) | ~np.isfinite(resp) \
        | ~(resp > 0)
    return float(np.mean(bad))


def standard_qa(master: MasterTelluric) -> dict[str, float]:
    """One standard's numbers the nightly QA holds a telluric reference to
    (``orchestration.nightly.QA_THRESHOLDS['telluric']``): ``response_snr`` (QA_SNR),
    ``line_residual`` (QA_HRES), ``masked_fraction`` (:func:`undefined_fraction`)."""
    meta = master.model.meta
    return {"response_snr": float(meta.response_snr), "line_residual": float(meta.line_residual),
            "masked_fraction": undefined_fraction(master.model.data, master.model.dq)}


def select_standards(masters: list[MasterTelluric],
                     limits: dict[str, tuple[float | None, float | None]]
                     ) -> tuple[list[MasterTelluric], list[tuple[MasterTelluric, dict, str]]]:
    """The standards whose own QA numbers (:func:`standard_qa`) lie within ``limits``
    (metric -> (low, high), None unbounded: the nightly QA's thresholds) and the others as
    (master, their numbers, why), so that one bad standard is left out of the night's
    reference instead of failing it for the good ones."""
    kept: list[MasterTelluric] = []
    rejected: list[tuple[MasterTelluric, dict, str]] = []
    for m in masters:
        numbers = standard_qa(m)
        why = []
        for name, (low, high) in limits.items():
            value = numbers.get(name)
            if value is None:
                continue
            if low is not None and not value >= low:
                why.append(f"{name}={value:.4g} < {low:g}")
            elif high is not None and not value <= high:
                why.append(f"{name}={value:.4g} > {high:g}")
        if why:
            rejected.append((m, numbers, ", ".join(why)))
            log.warning("%s: left out of the night's telluric reference: %s", m.cube,
                        ", ".join(why))
        else:
            kept.append(m)
    return kept, rejected


def combine_standards(masters: list[MasterTelluric], *, useafter: str | None = None,
                      night: str | None = None,
                      rejected: Sequence[tuple[str, str]] = ()) -> MasterTelluric:
    """The night's standards of one DETECTOR/IFSMODE/IFSSCALE/FILTER as one reference
    (format 2): row i of STDRESP/STDERR/STDDQ and of the STANDARDS table (cube, DATE-OBS/
    TIME-OBS, airmass, star, QA) is ``masters[i]`` (in exposure order); SCI/ERR/DQ and the
    primary keywords are the first standard's, so a format-1 reader still gets one valid
    response. QA keywords are the worst of the standards' (QA_SNR the lowest, QA_HRES the
    highest); TELAIRLO/TELAIRHI the airmass range; USEAFTER ``useafter`` (default the first
    standard's start). ``rejected``: the night's standards of the configuration left out,
    as (cube, why): counted in TELNREJ and named in HISTORY.

    Why one file for the night rather than one per standard: CRDS serves a frame one best
    reference per type (the latest USEAFTER before it), so with one file per standard the
    telluric step only ever sees one and can only rescale it in airmass; a reference holding
    the night's standards with their airmasses and times lets the step choose, or bracket the
    frame's airmass with two, under the same one-reference selection - the way time-dependent
    calibrations (HST's TDS tables, JWST's time-dependent photom) keep their epochs inside one
    reference. A later standard then also changes the reference the night's earlier frames
    select, so the reprocessing re-reduces them with it without any change to its selection.
    """
    if not masters:
        raise MasterBuildError("combine_standards: no standards given")
    ordered = sorted(masters, key=lambda m: (
        f"{m.model.meta.observation.date}T{m.model.meta.observation.time}", m.cube))
    first = ordered[0].model
    keys = ("detector", "ifsmode", "ifsscale", "filter")
    want = [str(getattr(first.meta.instrument, k)) for k in keys]
    wave = np.asarray(first.wavelength, np.float64)
    rows_r, rows_e, rows_d, table = [], [], [], []
    for m in ordered:
        ref = m.model
        have = [str(getattr(ref.meta.instrument, k)) for k in keys]
        if have != want:
            raise MasterBuildError(f"{m.cube}: {'/'.join(have)} is not the configuration of "
                                   f"{ordered[0].cube} ({'/'.join(want)}); one reference per "
                                   "configuration")
        rw = np.asarray(ref.wavelength, np.float64)
        resp = np.asarray(ref.data, np.float64)
        err = np.asarray(ref.err, np.float64)
        dq = np.asarray(ref.dq, np.uint32)
        if rw.shape != wave.shape or not np.allclose(rw, wave, rtol=0, atol=1e-6):
            log.warning("%s: on another wavelength grid than %s (another instrument model?); "
                        "interpolated onto it", m.cube, ordered[0].cube)
            ok = np.isfinite(resp)
            resp = np.interp(wave, rw[ok], resp[ok], left=np.nan, right=np.nan)
            err = np.interp(wave, rw, err)
            dq = np.where(np.isfinite(resp), np.interp(wave, rw, dq.astype(float)) > 0, 1)
            dq = np.where(dq, pixel["DO_NOT_USE"], 0).astype(np.uint32)
        rows_r.append(resp)
        rows_e.append(err)
        rows_d.append(dq)
        obs, std, meta = ref.meta.observation, ref.meta.standard, ref.meta
        table.append((m.cube, str(obs.date or ""), str(obs.time or ""),
                      float(obs.mjd) if obs.mjd is not None else np.nan,
                      float(meta.telluric.airmass) if meta.telluric.airmass is not None
                      else np.nan, str(obs.target or ""), str(std.sptype or ""),
                      float(std.teff), float(std.mag), str(std.band or ""),
                      float(meta.response_snr), float(meta.line_residual),
                      float(meta.masked_fraction), float(meta.star_x), float(meta.star_y),
                      float(meta.aperture_radius)))
    out = TelluricModel(data=np.asarray(first.data, np.float64).copy(),
                        err=np.asarray(first.err, np.float64).copy(),
                        dq=np.asarray(first.dq, np.uint32).copy(), wavelength=wave.copy())
    out.update(first)
    meta = out.meta
    out.std_response = np.stack(rows_r)
    out.std_err = np.nan_to_num(np.stack(rows_e), nan=0.0)
    out.std_dq = np.stack(rows_d).astype(np.uint32)
    out.standards = np.array(table, dtype=STANDARDS_DTYPE)
    airmasses = [row[4] for row in table if np.isfinite(row[4])]
    meta.format_version = FORMAT_VERSION
    meta.n_standards = len(ordered)
    if airmasses:
        meta.airmass_min, meta.airmass_max = float(min(airmasses)), float(max(airmasses))
    meta.reftype = "TELLURIC"
    meta.useafter = useafter or first.meta.useafter
    meta.night = night or first.meta.night
    dates = sorted(str(row[1]) for row in table if row[1])
    if dates:
        meta.pedigree = f"INFLIGHT {dates[0]} {dates[-1]}"
    meta.response_snr = min(float(m.model.meta.response_snr) for m in ordered)
    meta.line_residual = max(float(m.model.meta.line_residual) for m in ordered)
    meta.masked_fraction = max(float(m.model.meta.masked_fraction) for m in ordered)
    inst = meta.instrument
    meta.description = (f"IFS responses {inst.ifsmode} {inst.ifsscale} mas {inst.filter} from "
                        f"{len(ordered)} standard(s) of night {meta.night} at airmass "
                        + ", ".join(f"{x:.3f}" for x in airmasses))
    meta.provenance.parents = ", ".join(m.cube for m in ordered)
    meta.n_rejected = len(rejected)
    for cube, why in rejected:
        out.add_history_entry(f"standard {cube} left out by QA: {why}")
    qa = {"snr": meta.response_snr, "line_residual": meta.line_residual,
          "masked_fraction": meta.masked_fraction, "n_standards": float(len(ordered)),
          "n_rejected": float(len(rejected))}
    return MasterTelluric(model=out, cube=", ".join(m.cube for m in ordered), qa=qa)


def telluric_filename(master: MasterTelluric) -> str:
    m = master.model.meta
    inst = m.instrument
    if (m.format_version or 1) >= 2:  # the night's standards: named after the night
        when = str(m.night or m.useafter or "unknown").replace("-", "").replace(":", "")
        return (f"iris_{inst.detector}_{inst.ifsmode}_{inst.ifsscale}mas_{inst.filter}_night"
                f"{when}_telluric.fits").lower()
    # The standard's exposure start, not USEAFTER: the nightly build moves the night's first
    # standard's USEAFTER to the night's start, and the name must still tell standards apart.
    start = f"{m.observation.date}T{str(m.observation.time or '00:00:00')[:8]}" \
        if m.observation.date else m.useafter
    when = str(start or "unknown").replace("-", "").replace(":", "")
    return (f"iris_{inst.detector}_{inst.ifsmode}_{inst.ifsscale}mas_{inst.filter}_{when}"
            "_telluric.fits").lower()


def save_telluric(master: MasterTelluric, out_dir: str | os.PathLike) -> Path:
    return save_master(master.model, out_dir, telluric_filename(master))


def describe(master: MasterTelluric) -> dict[str, Any]:
    """QA numbers of a built reference (for logs and the nightly report)."""
    return {"cube": master.cube, **{k: round(float(v), 5) for k, v in master.qa.items()}}
