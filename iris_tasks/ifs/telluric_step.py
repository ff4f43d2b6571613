"""TelluricStep (``telluric``): telluric correction + flux calibration of an IFS cube (S_TELLUR).

Divides the sky-subtracted cube by the ``telluric`` reference - a standard star's response,
atmosphere x telescope x instrument in e-/s per bin per erg/s/cm^2/A, built by
:func:`iris_tasks.masters.telluric.build_telluric` - and by the spaxel's solid angle, so the
cube comes out in erg/s/cm^2/A/arcsec^2 (BUNIT) with ERR including the response's error.

Which standard: ``telluric_files`` (candidates; the one nearest in time and airmass with this
cube's DETECTOR/IFSMODE/IFSSCALE/FILTER, within ``max_hours``), else the override, else CRDS
(the latest reference before the exposure). A reference may hold one standard (format 1) or
the night's standards of the configuration (format 2, TELFORMT=2, as the nightly build
publishes them): each standard it holds is a candidate (:func:`standards_in`). Where the standard's airmass (TELAIRM) differs
from the cube's (AIRMASS), its absorption is rescaled by the ratio
(:func:`~iris_tasks.ifs.telluric.airmass_exponent_response`, TELMETH=SCALED); where two
applicable standards bracket the cube's airmass, their responses are interpolated per bin in
airmass instead (:func:`~iris_tasks.ifs.telluric.interpolate_in_airmass`, TELMETH=BRACKET),
which follows the deep water bands that a power law cannot. Recorded: R_TELLUR, TELMETH,
TELSTAR, TELAIRM, TELAMEXP, TELDTIME (TELREF2, TELAIRM2, TELDTIM2, TELWGT2 for the second
standard), PHOTFLAM, PHOTMJSR, PIXAR_A2.

No applicable standard (none given or in CRDS, other filter/mode, too far in time), a
telluric standard's own cube, or a cube already corrected: the step is SKIPPED with a
warning saying why, and the cube stays in e-/s - the science frame still reduces.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from typing import Any, ClassVar

import numpy as np

from ..datamodels import CubeModel, TelluricModel
from ..instrument.standards import filter_band, vega_zero_point
from ..metadata import parse_obs_datetime
from ..steps.base import IrisStep
from .telluric import (
    SURFACE_UNIT,
    airmass_exponent_response,
    apply_response,
    interpolate_in_airmass,
    photmjsr,
)

log = logging.getLogger(__name__)

__all__ = ["TelluricStep", "bracketing_standards", "choose_standard", "standards_in"]

MATCH_KEYS = ("detector", "ifsmode", "ifsscale", "filter")
TEL_OBSNAMES = ("LEN-TEL", "SLI-TEL")
# Telluric reference layouts this step reads (TELFORMT; absent = 1): 1 one standard, 2 the
# night's standards (iris_tasks.masters.telluric.combine_standards).
READ_FORMATS = (1, 2)


def _text(value: Any) -> str:
    return value.decode().strip() if isinstance(value, bytes) else str(value).strip()


def standards_in(name: str, ref: TelluricModel) -> list[tuple[str, TelluricModel]]:
    """The standards a telluric reference holds, each as a one-standard (format-1) model named
    ``<file>[<i>]`` with its own DATE-OBS/TIME-OBS, TELAIRM and star: the reference itself
    for format 1; one per STANDARDS row for format 2 (the night's standards)."""
    version = int(ref.meta.format_version or 1)
    label = os.path.basename(name)
    if version not in READ_FORMATS:
        raise ValueError(f"{label}: telluric reference format TELFORMT={version} is not one "
                         f"this step reads ({', '.join(map(str, READ_FORMATS))}); a newer "
                         "iris_tasks wrote it")
    if version == 1:
        return [(name, ref)]
    rows = ref.standards
    resp = np.asarray(ref.std_response) if rows is not None else None
    if rows is None or resp is None or resp.ndim != 2 or resp.shape[0] != len(rows) \
            or resp.shape[1] != np.asarray(ref.wavelength).size:
        raise ValueError(f"{label}: TELFORMT=2 but its STANDARDS table and STDRESP rows do not "
                         "match (a damaged telluric reference)")
    err, dq = np.asarray(ref.std_err), np.asarray(ref.std_dq)
    out = []
    for i, row in enumerate(rows):
        one = TelluricModel(data=resp[i].astype(np.float64), err=err[i].astype(np.float64),
                            dq=dq[i].astype(np.uint32),
                            wavelength=np.asarray(ref.wavelength, np.float64))
        meta = one.meta
        for key in MATCH_KEYS:
            setattr(meta.instrument, key, getattr(ref.meta.instrument, key))
        meta.observation.date = _text(row["date_obs"]) or None
        meta.observation.time = _text(row["time_obs"]) or None
        airmass = float(row["airmass"])
        meta.telluric.airmass = airmass if np.isfinite(airmass) else None
        meta.observation.airmass = meta.telluric.airmass
        meta.provenance.parents = _text(row["cube"])
        meta.reftype = "TELLURIC"
        meta.filename = f"{label}[{i}]"
        out.append((f"{label}[{i}]", one))
    return out


def _when(meta: Any) -> dt.datetime | None:
    obs = meta.observation
    if not obs.date:
        return None
    return parse_obs_datetime(obs.date, obs.time or "00:00:00")


def _applicable(cube: CubeModel, candidates: list[tuple[str, TelluricModel]], max_hours: float
                ) -> tuple[list[tuple[str, TelluricModel, float, float | None]], list[str]]:
    """The candidates with the cube's configuration within ``max_hours`` as (name, model,
    hours apart, airmass), and the reasons the others were left out."""
    reasons: list[str] = []
    usable = []
    t_sci = _when(cube.meta)
    for name, ref in candidates:
        diff = [f"{k.upper()}={getattr(ref.meta.instrument, k)} (cube "
                f"{getattr(cube.meta.instrument, k)})" for k in MATCH_KEYS
                if str(getattr(ref.meta.instrument, k)) != str(getattr(cube.meta.instrument, k))]
        if diff:
            reasons.append(f"{name}: {', '.join(diff)}")
            continue
        t_ref = _when(ref.meta)
        hours = abs((t_ref - t_sci).total_seconds()) / 3600.0 if t_ref and t_sci else 0.0
        if hours > max_hours:
            reasons.append(f"{name}: taken {hours:.1f} h from the exposure (max {max_hours:g})")
            continue
        usable.append((name, ref, hours, ref.meta.telluric.airmass))
    return usable, reasons


def choose_standard(cube: CubeModel, candidates: list[tuple[str, TelluricModel]], *,
                    max_hours: float, hours_per_airmass: float
                    ) -> tuple[tuple[str, TelluricModel] | None, list[str]]:
    """The candidate with the cube's configuration nearest in |hours| + hours_per_airmass x
    |airmass difference| (within ``max_hours``), and the reasons the others were left out."""
    usable, reasons = _applicable(cube, candidates, max_hours)
    x_sci = cube.meta.observation.airmass

    def score(entry: tuple[str, TelluricModel, float, float | None]) -> float:
        _, _, hours, x_ref = entry
        dx = abs(x_sci - x_ref) if x_sci is not None and x_ref is not None else 0.0
        return hours + hours_per_airmass * dx

    if not usable:
        return None, reasons
    name, ref, _, _ = min(usable, key=score)
    return (name, ref), reasons


def bracketing_standards(cube: CubeModel, candidates: list[tuple[str, TelluricModel]], *,
                         max_hours: float, min_difference: float = 0.01
                         ) -> tuple[tuple[str, TelluricModel], tuple[str, TelluricModel]] | None:
    """Two applicable standards, one below and one above the cube's airmass (by more than
    ``min_difference``), each the nearest in airmass on its side (then in time), or None."""
    usable, _ = _applicable(cube, candidates, max_hours)
    x_sci = cube.meta.observation.airmass
    if x_sci is None:
        return None
    below = [e for e in usable if e[3] is not None and e[3] < x_sci - min_difference]
    above = [e for e in usable if e[3] is not None and e[3] > x_sci + min_difference]
    if not below or not above:
        return None
    low = min(below, key=lambda e: (x_sci - e[3], e[2]))
    high = min(above, key=lambda e: (e[3] - x_sci, e[2]))
    return (low[0], low[1]), (high[0], high[1])


class TelluricStep(IrisStep):
    """Telluric correction and flux calibration of an IFS cube from a standard's response."""

    class_alias = "telluric"
    cal_step = "telluric"
    reference_file_types: ClassVar[list[str]] = ["telluric"]

    spec = """
    telluric_files = force_list(default=None)  # telluric references to choose from (nearest in time and airmass); none: the override or CRDS
    max_hours = float(default=12.0)  # standards taken further than this from the exposure are not used
    hours_per_airmass = float(default=10.0)  # when choosing: 0.1 airmass counts as 1 hour apart
    scale_airmass = boolean(default=True)  # rescale the standard's absorption to the cube's airmass
    bracket_airmass = boolean(default=True)  # with standards below and above the cube's airmass: interpolate their responses per bin in airmass instead of rescaling one
    """  # noqa: E501

    def process(self, step_input):
        cube = self.prepare_input(step_input)
        if not isinstance(cube, CubeModel):
            raise TypeError(f"{self.name}: expected a CubeModel, got {type(cube).__name__}")
        name = cube.meta.filename or "cube"
        if str(cube.meta.observation.obsname or "") in TEL_OBSNAMES:
            log.info("%s: %s is a telluric standard: not corrected by itself", self.name, name)
            return self._skip(cube)
        if cube.meta.cal_step.telluric == "COMPLETE":
            log.warning("%s: %s is already telluric-corrected; left as it is", self.name, name)
            return self._skip(cube)
        candidates, why_none = self._candidates(cube)
        chosen, reasons = choose_standard(cube, candidates, max_hours=self.max_hours,
                                          hours_per_airmass=self.hours_per_airmass)
        if chosen is None:
            detail = "; ".join(reasons) or why_none or "no candidates"
            inst = cube.meta.instrument
            log.warning("%s: %s: no telluric standard applies to DETECTOR=%s IFSMODE=%s "
                        "IFSSCALE=%s FILTER=%s (%s); the cube stays in %s without telluric "
                        "correction", self.name, name, inst.detector, inst.ifsmode, inst.ifsscale,
                        inst.filter, detail, cube.meta.bunit_data or "e-/s")
            return self._skip(cube)
        for other in reasons:
            log.info("%s: not used: %s", self.name, other)
        pair = None
        if self.scale_airmass and self.bracket_airmass:
            pair = bracketing_standards(cube, candidates, max_hours=self.max_hours)
        used = list(pair) if pair else [chosen]
        self._correct(cube, used)
        if self.telluric_files:
            self._reference_files_used.append(
                ("telluric", re.sub(r"\[\d+\]$", "", os.path.basename(used[0][0]))))
        return cube

    def _skip(self, cube: CubeModel) -> CubeModel:
        cube.meta.cal_step.telluric = "SKIPPED"
        return cube

    def _candidates(self, cube: CubeModel) -> tuple[list[tuple[str, TelluricModel]], str]:
        paths = list(self.telluric_files or [])
        if not paths:
            override = self.get_ref_override("telluric")
            if isinstance(override, TelluricModel):
                return standards_in(override.meta.filename or "override", override), ""
            try:
                path = self.get_reference_file(cube, "telluric")
            except (Exception, SystemExit) as exc:
                # CRDS raises many types, and exits (-1) when it has no cache configured: a
                # missing standard must not stop the science frame; the warning says why.
                cause = exc.__context__ if isinstance(exc, SystemExit) and exc.__context__ else exc
                return [], f"CRDS: {type(cause).__name__}: {cause}"
            if not path or path.strip().upper() == "N/A":
                return [], "CRDS returned N/A"
            paths = [path]
        out = []
        for path in paths:
            if isinstance(path, TelluricModel):
                out.extend(standards_in(path.meta.filename or "telluric model", path))
                continue
            ref = TelluricModel(os.fspath(path))
            if str(ref.meta.reftype or "").lower() != "telluric":
                raise ValueError(f"{self.name}: {path} has REFTYPE={ref.meta.reftype}; "
                                 "expected TELLURIC")
            out.extend(standards_in(os.fspath(path), ref))
        return out, ""

    def _on_cube_grid(self, wave: np.ndarray, ref_name: str, ref: TelluricModel
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(response, error, dq) of ``ref`` on the cube's wavelengths."""
        rwave = np.asarray(ref.wavelength, np.float64)
        response = np.asarray(ref.data, np.float64)
        response_err = np.asarray(ref.err, np.float64)
        rdq = np.asarray(ref.dq, np.uint32)
        if rwave.shape != wave.shape or not np.allclose(rwave, wave, rtol=0, atol=1e-3 * float(
                np.median(np.abs(np.diff(wave))))):
            log.warning("%s: %s is on another wavelength grid than the cube; interpolating it",
                        self.name, os.path.basename(ref_name))
            good = np.isfinite(response)
            response = np.interp(wave, rwave[good], response[good], left=np.nan, right=np.nan)
            response_err = np.interp(wave, rwave, response_err)
            rdq = np.where(np.isfinite(response), 0, 1).astype(np.uint32)
        return response, response_err, rdq

    def _correct(self, cube: CubeModel, used: list[tuple[str, TelluricModel]]) -> None:
        """Divide ``cube`` by the response of ``used``: one standard (its absorption rescaled
        to the cube's airmass) or two bracketing the cube's airmass (interpolated per bin)."""
        wave = np.asarray(cube.wavelength, np.float64)
        x_sci = cube.meta.observation.airmass
        (ref_name, ref), second = used[0], (used[1] if len(used) > 1 else None)
        response, response_err, rdq = self._on_cube_grid(wave, ref_name, ref)
        x_std = ref.meta.telluric.airmass
        exponent, weight, method = 1.0, None, "MEASURED"
        if second is not None:
            response, response_err, rdq, weight = interpolate_in_airmass(
                (response, response_err, rdq, float(x_std)),
                (*self._on_cube_grid(wave, *second), float(second[1].meta.telluric.airmass)),
                float(x_sci))
            method = "BRACKET"
        elif self.scale_airmass and x_sci is not None and x_std is not None:
            exponent = float(x_sci) / float(x_std)
            response = airmass_exponent_response(wave, response, exponent)
            method = "SCALED"
        elif self.scale_airmass:
            log.warning("%s: airmass of the %s unknown (AIRMASS/TELAIRM missing): the "
                        "standard's absorption is applied as measured", self.name,
                        "cube" if x_sci is None else "standard")
        scale_arcsec = float(cube.meta.instrument.ifsscale) / 1000.0
        area = scale_arcsec**2
        cube.data, cube.err, cube.dq = apply_response(cube.data, cube.err, cube.dq, response,
                                                      response_err, rdq, area)
        cube.meta.bunit_data = SURFACE_UNIT
        cube.meta.bunit_err = SURFACE_UNIT
        good = np.isfinite(response) & (response > 0)
        phot = cube.meta.photometry
        phot.pixel_area_arcsec2 = area
        phot.photflam = float(np.median(1.0 / response[good] / area))
        lam0, _ = vega_zero_point(filter_band(cube.meta.instrument.filter))
        r0 = float(np.interp(lam0, wave[good], response[good]))
        phot.photmjsr = photmjsr(1.0 / r0 / area, lam0)
        tel = cube.meta.telluric
        tel.method = method
        tel.airmass = x_std
        tel.airmass_exponent = exponent
        t_sci = _when(cube.meta)

        def hours_to(model: TelluricModel) -> float | None:
            t_ref = _when(model.meta)
            return (t_ref - t_sci).total_seconds() / 3600.0 if t_sci and t_ref else None

        tel.hours = hours_to(ref)
        tel.star = os.path.basename(str(ref.meta.provenance.parents or ref_name))
        if second is not None:
            tel.airmass2 = second[1].meta.telluric.airmass
            tel.hours2 = hours_to(second[1])
            tel.reference2 = os.path.basename(second[0])
            tel.weight2 = weight
            log.info("%s: %s: divided by %s and %s interpolated in airmass (standards at %s "
                     "and %s, cube %s, weight %.3f on the second); BUNIT %s", self.name,
                     cube.meta.filename or "cube", os.path.basename(ref_name),
                     os.path.basename(second[0]), x_std, tel.airmass2, x_sci, weight,
                     SURFACE_UNIT)
            return
        log.info("%s: %s: divided by %s (standard at airmass %s, cube %s, exponent %.3f, "
                 "%s h apart); BUNIT %s", self.name, cube.meta.filename or "cube",
                 os.path.basename(ref_name), x_std, x_sci, exponent,
                 None if tel.hours is None else round(tel.hours, 2), SURFACE_UNIT)
