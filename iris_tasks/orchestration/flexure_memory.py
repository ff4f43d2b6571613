"""The night's memory of IFS flexure: each reduced IFS frame's offsets go into the frame ledger
(:func:`record_frame_flexure`), and a frame that cannot measure an axis itself is handed the
offsets its neighbours of the night measured (:func:`flexure_prior_options`), as options of
the ``flexure`` step; the reduction code never reads the ledger."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from .common import run_info
from .frame import Frame
from .ledger import FrameLedger, isotime, parse_time

_MJD0 = dt.datetime(1858, 11, 17, tzinfo=dt.UTC)


def _obs_time(header: Any) -> str | None:
    """Exposure start (MJD-OBS, else DATE-OBS + TIME-OBS) as the ledger's ISO time."""
    mjd = header.get("MJD-OBS")
    try:
        if mjd is not None:
            return isotime(_MJD0 + dt.timedelta(days=float(mjd)))
        date, time = header.get("DATE-OBS"), header.get("TIME-OBS")
        if date and time:
            return isotime(dt.datetime.fromisoformat(f"{date}T{time}"))
    except (TypeError, ValueError, OverflowError):
        pass
    return None


def _flexure_key(frame: Frame, header: Any) -> dict[str, Any]:
    """What makes two IFS frames' offsets comparable: night, mode, scale, filter, CRDS
    context (the offsets are relative to its ifstrace reference), and when the frame was
    taken."""
    def text(key: str) -> str | None:
        value = header.get(key)
        return None if value is None else str(value).strip()

    return {"night": frame.night, "mode": text("IFSMODE"), "scale": text("IFSSCALE"),
            "filter": text("FILTER") or frame.filter, "obs_time": _obs_time(header),
            "crds_context": frame.crds_context}


def combine_offsets(rows: list[dict[str, Any]], axis: str) -> tuple[float, float]:
    """Inverse-variance weighted mean of the rows' ``axis`` offsets and its uncertainty: the
    larger of the mean's formal error and the rows' weighted scatter (flexure drifts between
    frames, so the scatter, not scatter/sqrt(n), is what a new frame can be off by)."""
    floor = 1e-3  # px: an error of 0 (a noiseless fit) must not take all the weight
    vals = [float(r[axis]) for r in rows]
    w = [1.0 / max(float(r.get(f"{axis}_err") or 0.0), floor) ** 2 for r in rows]
    total = sum(w)
    mean = sum(wi * v for wi, v in zip(w, vals, strict=True)) / total
    err = 1.0 / math.sqrt(total)
    if len(vals) > 1:
        scatter = sum(wi * (v - mean) ** 2 for wi, v in zip(w, vals, strict=True)) / total
        err = max(err, math.sqrt(scatter))
    return mean, err


def flexure_prior_options(frame: Frame, header: Any, ledger: FrameLedger, *,
                          window_seconds: float) -> dict[str, Any]:
    """Options for the IFS ``flexure`` step from the night's neighbouring frames: for each
    axis, the weighted mean of the offsets measured (on the frame itself) by the frames of
    the same night, mode, scale, filter and CRDS context whose exposures started within
    ``window_seconds`` of this one's (the 5 nearest in time), as ``prior_dx``/``prior_dy``
    with their errors and ``prior_source``; ``{}`` when there are none (or the window is 0).
    The step uses a prior only for an axis the frame cannot measure itself."""
    key = _flexure_key(frame, header)
    if window_seconds <= 0 or not key["obs_time"] or not key["night"]:
        return {}
    opts: dict[str, Any] = {}
    sources = []
    for axis in ("dx", "dy"):
        rows = ledger.flexure_neighbours(**key, window_seconds=window_seconds, axis=axis,
                                         exclude=frame.frame_id)
        if not rows:
            continue
        value, err = combine_offsets(rows, axis)
        opts[f"prior_{axis}"], opts[f"prior_{axis}_err"] = value, err
        t = parse_time(key["obs_time"])
        ages = [(parse_time(r["obs_time"]) - t).total_seconds() / 60.0 for r in rows]
        sources.append(f"{axis} {len(rows)} fr {min(ages):+.0f}..{max(ages):+.0f}min "
                       f"{rows[0]['frame_id'][:8]}")
    if sources:
        opts["prior_source"] = "ledger " + "; ".join(sources)
    return opts


def record_frame_flexure(frame: Frame, header: Any, ledger: FrameLedger, *,
                         ifstrace: str | None = None) -> dict[str, Any] | None:
    """Record the frame's flexure from its reduced product's header (FLEXDX ... FLEXMETH,
    FLEXSRC) in the ledger; returns what was recorded, None when the header has none (not
    an IFS frame, or its flexure step did not run)."""
    method = header.get("FLEXMETH")
    if method is None or header.get("FLEXDX") is None:
        return None
    parts = str(method).split("+")
    values = {
        "dx": float(header["FLEXDX"]), "dy": float(header.get("FLEXDY") or 0.0),
        "dx_err": header.get("FLEXEDX"), "dy_err": header.get("FLEXEDY"),
        "rotation": header.get("FLEXROT"), "method": str(method),
        "dx_measured": "LIT" in parts, "dy_measured": "OH" in parts or "ENDS" in parts,
        "source": header.get("FLEXSRC") if ("PRIORX" in parts or "PRIORY" in parts) else None,
    }
    ledger.record_flexure(frame.frame_id, **values, **_flexure_key(frame, header),
                          ifstrace=ifstrace or header.get("R_IFSTRC"),
                          run_id=run_info().get("run_id"))
    return values
