"""What the master builders share: input headers, grouping, night and USEAFTER, QA numbers."""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from .. import metadata
from ..errors import BadInputError

log = logging.getLogger(__name__)


class MasterBuildError(BadInputError, ValueError):
    """Inputs that cannot make a master (wrong kind, mixed groups, too few frames)."""


@dataclass
class InputFrame:
    """A calibration rate image known by its primary header (pixels stay on disk)."""

    path: str
    header: dict[str, Any] = field(repr=False)

    @property
    def detector(self) -> str:
        return str(self.header.get("DETECTOR", ""))

    @property
    def obsname(self) -> str:
        return str(self.header.get("OBSNAME", ""))

    @property
    def when(self) -> dt.datetime:
        return metadata.parse_obs_datetime(self.header.get("DATE-OBS", "1970-01-01"),
                                           self.header.get("TIME-OBS", "00:00:00"))

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)


def read_inputs(paths: Iterable[str | os.PathLike]) -> list[InputFrame]:
    """Primary headers of rate images; ramps and unreadable files are errors naming the file."""
    frames = []
    for path in paths:
        path = os.fspath(path)
        try:
            with fits.open(path, memmap=True) as hdul:
                header = dict(hdul[0].header)
                naxis = hdul["SCI"].header.get("NAXIS", 0) if "SCI" in hdul else 0
        except (OSError, ValueError) as exc:
            raise MasterBuildError(f"{path}: not a readable FITS file ({exc})") from exc
        if naxis != 2:
            raise MasterBuildError(
                f"{path}: SCI has {naxis} axes; master builders take 2-D rate images "
                "(run raw ramps through `iris-drs readout` first)"
            )
        frames.append(InputFrame(path, header))
    return frames


def readpatt_of(header: dict[str, Any]) -> str:
    patt = header.get("READPATT")
    if patt:
        return str(patt)
    if header.get("SAMPMODE") and header.get("NUMREADS"):
        return metadata.readpatt(str(header["SAMPMODE"]), int(header["NUMREADS"]))
    return "UNKNOWN"


def group_by(frames: Sequence[InputFrame], keys: Sequence[str]) -> dict[tuple, list[InputFrame]]:
    """Frames grouped by the values of header ``keys`` (EXPTIME rounded to 1 ms)."""
    groups: dict[tuple, list[InputFrame]] = {}
    for frame in frames:
        values = []
        for key in keys:
            if key == "READPATT":
                values.append(readpatt_of(frame.header))
            elif key == "EXPTIME":
                value = frame.get("EXPTIME")
                values.append(round(float(value), 3) if value is not None else None)
            else:
                values.append(frame.get(key))
        groups.setdefault(tuple(values), []).append(frame)
    return groups


def single_group(groups: dict[tuple, list[InputFrame]], keys: Sequence[str], what: str,
                 min_frames: int) -> tuple[tuple, list[InputFrame]]:
    """The one group a master is built from, in observing order; mixed or short input is an error."""
    if len(groups) != 1:
        detail = "; ".join(f"{dict(zip(keys, k, strict=True))}: {len(v)} frame(s)"
                           for k, v in groups.items())
        raise MasterBuildError(f"{what} inputs mix several groups ({detail}); "
                               f"build one master per {'/'.join(keys)}")
    (key, frames), = groups.items()
    if len(frames) < min_frames:
        label = " ".join(f"{k}={v}" for k, v in zip(keys, key, strict=True))
        raise MasterBuildError(f"{what} {label}: {len(frames)} frame(s), need at least {min_frames}")
    frames.sort(key=lambda f: f.when)
    return key, frames


def night_of(frames: Sequence[InputFrame]) -> str:
    first = min(frames, key=lambda f: f.when)
    return metadata.observing_night(first.get("DATE-OBS"), first.get("TIME-OBS", "00:00:00"))


def night_start_utc(night: str) -> str:
    """USEAFTER for a night's masters: local noon of the night's date, in UTC.

    A master made from a night's calibrations then applies to every frame of that night,
    which is what reprocessing after the nightly build expects.
    """
    local_noon = dt.datetime.fromisoformat(f"{night}T12:00:00")
    utc = local_noon - dt.timedelta(hours=metadata.SITE_UTC_OFFSET_HOURS)
    return utc.strftime("%Y-%m-%dT%H:%M:%S")


def pedigree_of(frames: Sequence[InputFrame]) -> str:
    dates = sorted(f.when.date().isoformat() for f in frames)
    return f"INFLIGHT {dates[0]} {dates[-1]}"


def robust_stats(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 x MAD) of the finite values; NaN, NaN when there are none."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    med = float(np.median(values))
    return med, float(1.4826 * np.median(np.abs(values - med)))


def copy_input_meta(model: Any, frame: InputFrame) -> None:
    """Instrument/exposure keywords of a master, from its first input frame."""
    h = frame.header
    inst = model.meta.instrument
    inst.name = "IRIS"
    inst.detector = h.get("DETECTOR")
    if h.get("DET_ID") is not None:
        inst.det_id = str(h["DET_ID"])
    exp = model.meta.exposure
    if h.get("SAMPMODE") is not None:
        exp.sampmode = h["SAMPMODE"]
    exp.readpatt = readpatt_of(h)
    for attr, key in (("nreads", "NUMREADS"), ("nfowler", "NFOWLER"), ("read_time", "READTIME"),
                      ("exposure_time", "EXPTIME"), ("gain", "GAIN")):
        if h.get(key) is not None:
            setattr(exp, attr, h[key])
    for attr, key in (("xstart", "XSTART"), ("ystart", "YSTART"), ("xsize", "XSIZE"),
                      ("ysize", "YSIZE")):
        if h.get(key) is not None:
            setattr(model.meta.subarray, attr, h[key])


def save_master(model: Any, out_dir: str | os.PathLike, filename: str) -> Path:
    """Write a master's model as ``out_dir/filename`` (the directory made if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    model.save(str(path))
    return path
