"""The IRIS observation vocabulary: OBSTYPE/OBSNAME table, processing recipes, validation.

Every raw frame says what it is through two keywords: OBSTYPE (CAL, ENG, SCI) and OBSNAME, whose
prefix names the optical path (IMG1 imager, LEN lenslet IFS, SLI slicer IFS) and whose suffix
names the kind of exposure. The table below is the single place that maps an OBSNAME to what the
DRS does with the frame; the CLI, the pipelines and the DAGs all read it.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BadInputError

log = logging.getLogger(__name__)

IMAGER_DETECTORS = ("IMG1", "IMG2", "IMG3", "IMG4")
IFS_DETECTORS = ("IFS",)
DETECTORS = IMAGER_DETECTORS + IFS_DETECTORS
SAMPMODES = ("CDS", "MCDS", "UTR")
IFSMODES = ("LENSLET", "SLICER")
IFSSCALES = ("4", "9", "25", "50")  # mas per spaxel
OBSTYPES = ("CAL", "ENG", "SCI")

# Maunakea local time is UTC-10 with no daylight saving; the observing night is named after
# the local date on which it starts (so 03:00 local still belongs to the previous evening).
SITE_UTC_OFFSET_HOURS = -10.0

# No IRIS frame can be older than this (the simulated pre-night references have USEAFTER
# 2020-01-01): an earlier DATE-OBS means a readout computer whose clock was reset, and the
# frame would be filed under a wrong night and matched to the wrong references.
EARLIEST_DATE_OBS = dt.date(2020, 1, 1)

# Real-time requirement from the operations concept: reduced image 30 s, reduced cube 60 s.
DEADLINE_SECONDS = {"imager": 30.0, "lenslet": 60.0, "slicer": 60.0}


@dataclass(frozen=True)
class Recipe:
    """What the DRS does with one kind of frame."""

    obsname: str
    obstype: str
    mode: str  # imager | lenslet | slicer
    kind: str  # science | sky | dark | flat | telluric | engineering
    description: str
    stages: tuple[str, ...]  # processing chain applied in real time
    nightly: str | None = None  # role in the nightly calibrations: "dark" | "flat"
    final_suffix: str = "rate"

    @property
    def detectors(self) -> tuple[str, ...]:
        return IMAGER_DETECTORS if self.mode == "imager" else IFS_DETECTORS

    @property
    def ifsmode(self) -> str:
        return {"imager": "N/A", "lenslet": "LENSLET", "slicer": "SLICER"}[self.mode]

    @property
    def deadline_seconds(self) -> float:
        return DEADLINE_SECONDS[self.mode]


def _r(obsname, obstype, kind, description, stages, nightly=None, final_suffix="rate"):
    prefix = obsname.split("-")[0]
    mode = {"IMG1": "imager", "LEN": "lenslet", "SLI": "slicer"}[prefix]
    return Recipe(obsname, obstype, mode, kind, description, stages, nightly, final_suffix)


_IMAGE = ("readout", "image2")
_CUBE = ("readout", "ifs2")
_RATE = ("readout",)

RECIPES: dict[str, Recipe] = {
    r.obsname: r
    for r in (
        # Calibrations: combined each night into masters, rate images kept in real time.
        _r("IMG1-NFF", "CAL", "flat", "Imager dome/night flat field", _RATE, nightly="flat"),
        _r("SLI-NFF", "CAL", "flat", "Slicer flat field", _RATE, nightly="flat"),
        _r("LEN-SPX", "CAL", "flat", "Lenslet spaxel flat (per-lenslet throughput)", _RATE, nightly="flat"),
        _r("IMG1-DRK", "CAL", "dark", "Imager dark", _RATE, nightly="dark"),
        _r("SLI-DRK", "CAL", "dark", "Slicer IFS dark", _RATE, nightly="dark"),
        _r("LEN-DRK", "CAL", "dark", "Lenslet IFS dark", _RATE, nightly="dark"),
        _r("IMG1-TEL", "CAL", "telluric", "Imager photometric/telluric standard", _IMAGE, final_suffix="cal"),
        _r("SLI-TEL", "CAL", "telluric", "Slicer telluric standard", _CUBE, final_suffix="s3d"),
        _r("LEN-TEL", "CAL", "telluric", "Lenslet telluric standard", _CUBE, final_suffix="s3d"),
        # Engineering: instrument-model frames (arc lamps), archived as rate images and used
        # each night with the lamp flats to build the IFS instrument model (ifstrace).
        _r("SLI-IDP", "ENG", "engineering", "Slicer instrument data product (trace/arc)", _RATE,
           nightly="arc"),
        _r("LEN-IDP", "ENG", "engineering", "Lenslet instrument data product (trace/arc)", _RATE,
           nightly="arc"),
        # Science and sky.
        _r("IMG1-SCI", "SCI", "science", "Imager science", _IMAGE, final_suffix="cal"),
        _r("LEN-SCI", "SCI", "science", "Lenslet IFS science", _CUBE, final_suffix="s3d"),
        _r("SLI-SCI", "SCI", "science", "Slicer IFS science", _CUBE, final_suffix="s3d"),
        _r("IMG1-SKY", "SCI", "sky", "Imager sky (background for science)", _IMAGE, final_suffix="cal"),
        _r("LEN-SKY", "SCI", "sky", "Lenslet IFS sky", _CUBE, final_suffix="s3d"),
        _r("SLI-SKY", "SCI", "sky", "Slicer IFS sky", _CUBE, final_suffix="s3d"),
    )
}

OBSNAMES_BY_OBSTYPE: dict[str, tuple[str, ...]] = {
    t: tuple(n for n, r in RECIPES.items() if r.obstype == t) for t in OBSTYPES
}


class MetadataError(BadInputError, ValueError):
    """Raw or product metadata that does not describe a valid IRIS frame.

    ``problems`` holds one (keyword, message) pair per problem so callers (quarantine, UI) can
    show them individually; ``str()`` gives one line naming the file.
    """

    def __init__(self, filename: str, problems: list[tuple[str, str]]):
        self.filename = filename
        self.problems = problems
        detail = "; ".join(f"{kw}: {msg}" for kw, msg in problems)
        super().__init__(f"{filename}: invalid IRIS metadata: {detail}")


def readpatt(sampmode: str, nreads: int) -> str:
    """The read-pattern name CRDS matches darks on, e.g. ('UTR', 10) -> 'UTR10'."""
    return f"{sampmode}{int(nreads)}"


def observing_night(date_obs: str, time_obs: str = "00:00:00") -> str:
    """Name of the observing night (YYYY-MM-DD, local date at the start of the night)."""
    when = parse_obs_datetime(date_obs, time_obs)
    local = when + dt.timedelta(hours=SITE_UTC_OFFSET_HOURS)
    return (local - dt.timedelta(hours=12)).date().isoformat()


def parse_obs_datetime(date_obs: str, time_obs: str = "00:00:00") -> dt.datetime:
    date_obs = str(date_obs).strip()
    if "T" in date_obs:
        date_obs, time_obs = date_obs.split("T", 1)
    time_obs = str(time_obs).strip()
    leap = 0.0
    if time_obs[6:8] == "60":  # a leap second, 23:59:60.x: datetime has no such instant
        leap, time_obs = float(time_obs[6:]) - 59.0, time_obs[:6] + "59"
    when = dt.datetime.fromisoformat(f"{date_obs}T{time_obs}")
    return when + dt.timedelta(seconds=leap) if leap else when


_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TIME_RE = re.compile(r"^\d{2}:\d{2}:\d{2}(\.\d+)?$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_header(header: Mapping[str, Any], filename: str = "<header>", *,
                    data_shape: tuple[int, ...] | None = None, raw: bool = True) -> Recipe:
    """Check the required IRIS keywords and return the frame's :class:`Recipe`.

    All problems are collected before raising so an operator fixes a bad header in one pass.
    ``data_shape`` (the SCI shape) is checked against NUMRAMPS/NUMREADS for raw ramps.
    """
    problems: list[tuple[str, str]] = []

    def get(key: str) -> Any:
        value = header.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            problems.append((key, "missing"))
            return None
        return value.strip() if isinstance(value, str) else value

    def expect(key: str, value: Any, allowed: tuple[str, ...]) -> None:
        if value is not None and value not in allowed:
            problems.append((key, f"{value!r} is not one of {', '.join(allowed)}"))

    instrume = get("INSTRUME")
    if instrume is not None and instrume != "IRIS":
        problems.append(("INSTRUME", f"{instrume!r}; expected 'IRIS'"))
    detector = get("DETECTOR")
    expect("DETECTOR", detector, DETECTORS)
    obstype = get("OBSTYPE")
    expect("OBSTYPE", obstype, OBSTYPES)
    obsname = get("OBSNAME")
    recipe = RECIPES.get(obsname) if obsname else None
    if obsname is not None and recipe is None:
        problems.append(("OBSNAME", f"{obsname!r} is not one of {', '.join(RECIPES)}"))
    if recipe is not None and obstype in OBSTYPES and recipe.obstype != obstype:
        problems.append(("OBSNAME", f"{obsname!r} is not an OBSTYPE={obstype} name; expected one of "
                         f"{', '.join(OBSNAMES_BY_OBSTYPE[obstype])}"))
    if recipe is not None and detector in DETECTORS and detector not in recipe.detectors:
        problems.append(("DETECTOR", f"{detector!r} cannot take {obsname}; expected one of "
                         f"{', '.join(recipe.detectors)}"))
    if recipe is not None and recipe.mode != "imager":
        ifsmode = get("IFSMODE")
        if ifsmode is not None and ifsmode != recipe.ifsmode:
            problems.append(("IFSMODE", f"{ifsmode!r} does not match {obsname}; expected {recipe.ifsmode!r}"))
        scale = header.get("IFSSCALE")
        if scale is not None and str(scale).strip() not in IFSSCALES:
            problems.append(("IFSSCALE", f"{scale!r} is not one of {', '.join(IFSSCALES)} (mas)"))
    if recipe is not None and recipe.kind != "dark":
        get("FILTER")

    exp_no = get("EXP_NO")
    if exp_no is not None and not (_is_int(exp_no) and exp_no >= 0):
        problems.append(("EXP_NO", f"{exp_no!r}; expected an integer >= 0"))
    sampmode = get("SAMPMODE")
    expect("SAMPMODE", sampmode, SAMPMODES)
    nreads = get("NUMREADS")
    if nreads is not None and not (_is_int(nreads) and nreads >= 1):
        problems.append(("NUMREADS", f"{nreads!r}; expected an integer >= 1"))
        nreads = None
    nramps = get("NUMRAMPS")
    if nramps is not None and not (_is_int(nramps) and nramps >= 1):
        problems.append(("NUMRAMPS", f"{nramps!r}; expected an integer >= 1"))
        nramps = None
    if sampmode == "CDS" and nreads is not None and nreads != 2:
        problems.append(("NUMREADS", f"{nreads} reads with SAMPMODE=CDS; expected 2"))
    if sampmode == "MCDS" and nreads is not None:
        nfowler = header.get("NFOWLER")
        if not (_is_int(nfowler) and nfowler >= 1 and 2 * nfowler <= nreads):
            problems.append(("NFOWLER", f"{nfowler!r} with NUMREADS={nreads}; expected an integer "
                             "k >= 1 with 2k <= NUMREADS"))
    if sampmode == "UTR" and nreads is not None and nreads < 2:
        problems.append(("NUMREADS", f"{nreads} read with SAMPMODE=UTR; expected >= 2"))
    for key in ("READTIME", "EXPTIME"):
        value = get(key)
        if value is not None and not (_is_number(value) and value > 0):
            problems.append((key, f"{value!r}; expected a positive number of seconds"))
    gain = header.get("GAIN")
    if gain is not None and not (_is_number(gain) and gain > 0):
        problems.append(("GAIN", f"{gain!r}; expected a positive number (e-/DN)"))

    date_obs = get("DATE-OBS")
    if date_obs is not None and not _DATE_RE.match(str(date_obs)):
        problems.append(("DATE-OBS", f"{date_obs!r}; expected YYYY-MM-DD"))
    elif date_obs is not None:
        try:
            day = dt.date.fromisoformat(str(date_obs))
        except ValueError:
            problems.append(("DATE-OBS", f"{date_obs!r} is not a calendar date"))
        else:
            if day < EARLIEST_DATE_OBS:
                problems.append(("DATE-OBS", f"{date_obs!r} is before {EARLIEST_DATE_OBS}, earlier "
                                 "than any IRIS frame (a reset clock?)"))
    time_obs = get("TIME-OBS")
    if time_obs is not None and not _TIME_RE.match(str(time_obs)):
        problems.append(("TIME-OBS", f"{time_obs!r}; expected hh:mm:ss[.sss]"))
    elif time_obs is not None:
        hh, mm, ss = (float(x) for x in str(time_obs).split(":"))
        if not (hh < 24 and mm < 60 and ss < 61):  # 60.x: a leap second
            problems.append(("TIME-OBS", f"{time_obs!r} is not a time of day"))
    mjd = header.get("MJD-OBS")
    if mjd is not None and not _is_number(mjd):
        problems.append(("MJD-OBS", f"{mjd!r}; expected a number"))

    if obstype == "SCI" or (recipe is not None and recipe.kind == "telluric"):
        for key, low, high in (("RA", 0.0, 360.0), ("DEC", -90.0, 90.0), ("PA", -360.0, 360.0)):
            value = get(key)
            if value is not None and not (_is_number(value) and low <= value <= high):
                problems.append((key, f"{value!r}; expected a number in [{low:g}, {high:g}]"))

    subarray = {k: header.get(k) for k in ("XSTART", "YSTART", "XSIZE", "YSIZE")}
    if any(v is not None for v in subarray.values()):
        for key, value in subarray.items():
            if not (_is_int(value) and value >= 1 and value <= 4096):
                problems.append((key, f"{value!r}; expected an integer in [1, 4096]"))
        if all(_is_int(v) for v in subarray.values()):
            if subarray["XSTART"] + subarray["XSIZE"] - 1 > 4096 or subarray["YSTART"] + subarray["YSIZE"] - 1 > 4096:
                problems.append(("XSIZE", "subarray extends beyond the 4096x4096 detector"))

    if raw and data_shape is not None:
        if len(data_shape) != 4:
            problems.append(("SCI", f"raw data has shape {data_shape}; expected (NUMRAMPS, NUMREADS, ny, nx)"))
        else:
            if nramps is not None and data_shape[0] != nramps:
                problems.append(("NUMRAMPS", f"{nramps} but the data hold {data_shape[0]} ramps"))
            if nreads is not None and data_shape[1] != nreads:
                problems.append(("NUMREADS", f"{nreads} but the data hold {data_shape[1]} reads"))
            if _is_int(subarray["XSIZE"]) and _is_int(subarray["YSIZE"]) and \
                    (data_shape[2], data_shape[3]) != (subarray["YSIZE"], subarray["XSIZE"]):
                problems.append(("XSIZE", f"subarray {subarray['YSIZE']}x{subarray['XSIZE']} does not "
                                 f"match the data ({data_shape[2]}x{data_shape[3]})"))

    if problems:
        raise MetadataError(filename, problems)
    assert recipe is not None
    return recipe


@dataclass(frozen=True)
class FileVerdict:
    """What :func:`inspect_file` found in a valid raw file."""

    path: str
    recipe: Recipe
    warnings: tuple[tuple[str, str], ...]  # QA findings that do not stop the frame
    stats: Mapping[str, Any]  # figures of the data sample (see iris_tasks.rawcheck)
    header: Mapping[str, Any]  # the primary header as validated (no need to read it again)


def inspect_file(path: str | os.PathLike[str]) -> FileVerdict:
    """Validate a raw ramp file: structure, header cards, keywords, data type, shape and a
    sample of the data (:mod:`iris_tasks.rawcheck`), every problem collected in one pass.

    Raises :class:`MetadataError` (the file named, one ``(keyword, message)`` per problem)
    for anything that must be quarantined, whatever is wrong with the file: an unreadable or
    truncated file gives problems, never another exception. Structural problems stop the
    checks (the header of a broken file is not trusted); otherwise the header keywords and
    the data are both checked. Returns the recipe plus the QA warnings, which are logged.
    """
    from . import rawcheck

    name = os.fspath(path)
    check = rawcheck.inspect_structure(name)
    if not check.structure_ok:
        raise MetadataError(name, check.problems)
    header = check.values(0)
    problems = list(check.problems)  # invalid cards: the header may still say more
    shape = rawcheck.ramp_shape(check) if check.data_ok else None
    recipe: Recipe | None = None
    try:
        recipe = validate_header(header, name, data_shape=shape)
    except MetadataError as exc:
        # A keyword whose card is invalid is reported once, as invalid, not also as missing.
        problems += [(k, m) for k, m in exc.problems
                     if not (m == "missing" and k in check.invalid_keywords)]
    obsname = header.get("OBSNAME")
    kind = RECIPES[obsname].kind if isinstance(obsname, str) and obsname in RECIPES else None
    before = len(check.problems)
    rawcheck.check_ramp_data(check, dark=kind == "dark")
    problems += check.problems[before:]
    if problems or recipe is None:
        raise MetadataError(name, problems or [("FILE", "invalid")])
    for keyword, message in check.warnings:
        log.warning("%s: QA warning: %s: %s", name, keyword, message)
    return FileVerdict(name, recipe, tuple(check.warnings), dict(check.stats), header)


def validate_file(path: str | os.PathLike[str]) -> Recipe:
    """The frame's :class:`Recipe` if :func:`inspect_file` finds it valid, else
    :class:`MetadataError` naming the file and every problem."""
    return inspect_file(path).recipe


def recipe_for(header: Mapping[str, Any]) -> Recipe:
    """Recipe of an already validated header (products keep OBSNAME from their raw frame)."""
    obsname = header.get("OBSNAME")
    if obsname not in RECIPES:
        raise MetadataError(str(header.get("FILENAME", "<header>")),
                            [("OBSNAME", f"{obsname!r} is not one of {', '.join(RECIPES)}")])
    return RECIPES[obsname]
