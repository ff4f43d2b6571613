"""Nightly calibrations: the night's darks, flats, arcs and standard stars -> QA'd
master references -> new CRDS context.

Plain functions behind ``iris_nightly_calibrations``:

1. :func:`gather_calibrations` - the night's processed dark, flat and arc frames (their
   ``_rate`` products), telluric standards (LEN-TEL / SLI-TEL, their ``_s3d`` cubes) and
   imager standards (IMG1-TEL, their flat-fielded ``_cal`` frames),
   found in the ledger and, for anything the ledger does not know, in the object store
   (``products/<night>/<detector>/<*-DRK|*-NFF|LEN-SPX|*-IDP|*-TEL>/``);
2. :func:`build_masters` - master darks per DETECTOR/EXPTIME/READPATT; then the IFS
   instrument models (``ifstrace``: traces, profile, wavelengths, LSF) per
   DETECTOR/IFSMODE/IFSSCALE/FILTER from the lamp flats and arcs (LEN-IDP, SLI-IDP;
   :mod:`iris_tasks.masters.ifs_model`); then master flats per DETECTOR/FILTER/IFSMODE
   dark-subtracted with the new darks (iris_tasks.pipelines.recipes builders); IFS lamp flats
   (LEN-SPX, SLI-NFF) are divided by their illumination modelled through the night's new
   instrument model (else the CRDS ``ifstrace``) (:mod:`iris_tasks.masters.ifs_flat`). A model
   that cannot be built becomes a ``*.failed.json`` entry that its QA task fails on, naming
   the reason, so the previous model stays operational and the operator sees why; last, one
   ``telluric`` reference per standard's cube (:mod:`iris_tasks.masters.telluric`; the
   night's first standard of each configuration gets USEAFTER = the night's start, so CRDS
   serves it to the frames taken before it) and one imager zero point (``photom``) per
   imager standard's frame (:mod:`iris_tasks.masters.photom`, the same USEAFTER rule per
   DETECTOR/FILTER). A standard that gives no reference (no star, saturated, wrong type,
   mismatched filter) is a ``*.failed.json`` in the same way;
3. :func:`qa_master` - each master against the reference the previous context selects for
   the same parameters (thresholds in :data:`QA_THRESHOLDS`, documented in docs/airflow.md);
   a master beyond a threshold raises :class:`QAError` naming every failed metric;
4. :func:`publish_masters` - the masters that passed QA and were approved (by the on-duty
   operator, the timeout default or automatically: :mod:`iris_tasks.orchestration.approval`)
   become references in a new CRDS context (made operational); the DAG announces it as an
   event of ``Asset("iris/crds-context")``. A rejection publishes nothing and is recorded;
5. :func:`archive_masters` - copies of the masters in the store under ``references/``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..config import Settings, settings
from ..errors import ProcessingError
from .common import FAILED_SUFFIX, ascii_meta, ensure_dir, run_info
from .ledger import DONE, FrameLedger, open_ledger

log = logging.getLogger(__name__)

# IFS lamp flats (LEN-SPX, SLI-NFF) light only the spectral traces; build_master_flats models
# the lamp through the ifstrace reference for them (iris_tasks.masters.ifs_flat).
CAL_OBSNAMES = {"dark": ("IMG1-DRK", "LEN-DRK", "SLI-DRK"),
                "flat": ("IMG1-NFF", "LEN-SPX", "SLI-NFF"),
                "arc": ("LEN-IDP", "SLI-IDP"),
                "telluric": ("LEN-TEL", "SLI-TEL"),  # = iris_tasks.masters.telluric.TEL_OBSNAMES
                "photom": ("IMG1-TEL",)}  # = iris_tasks.masters.photom.IMAGER_STANDARD_OBSNAMES
# The product each role contributes: the rate image, for a telluric standard its cube, for an
# imager standard its flat-fielded frame (the zero point is in the science _cal's unit).
ROLE_PRODUCT = {"dark": "rate", "flat": "rate", "arc": "rate", "telluric": "s3d", "photom": "cal"}

# Per reference type: metric -> (low, high) acceptance interval (None = unbounded).
#   dark  median_shift     |median(new) - median(old)| / RMS(new)      level change in units
#                                                                      of the pixel noise
#         residual_rms     RMS(new - old) / median(ERR new)            new vs old within the
#                                                                      new master's own errors
#         hot_change       |#hot+warm(new) - #hot+warm(old)| / #pixels
#   flat  median_ratio     median(new) / median(old)
#         rms_ratio        RMS(new) / RMS(old)                          pixel-to-pixel structure
#         bad_change       |#flagged(new) - #flagged(old)| / #pixels    flagged: DO_NOT_USE,
#                                                                      NO_FLAT_FIELD, DEAD, LOW_QE
#         thruput_rms      QA_TPRMS of the new master (IFS only)        per-spaxel lamp throughput
#                                                                      relative to the trace's THRUPUT
#         profile_bias     QA_PROF of the new master (IFS only)         lamp / trace model by side
#                                                                      and part of the profile: a
#                                                                      trace that does not fit the lamp
#   ifstrace trace_rms     QA_TRMS: median rms of the lamp trace centres about each spaxel's fit (px)
#         wave_rms_resel   QA_WRMS: median rms of the arc lines about each spaxel's wavelength
#                          solution, in resolution elements (LSF FWHM)
#         profile_residual QA_PRES: rms lamp-flat residual relative to the profile peak
#         traced_fraction  QA_TRACD: fraction of the spaxels traced (not filled in)
#         shape_change     rms over the samples of (new - old) trace position after removing the
#                          median offset (px): the optics changed, not just flexure
#         offset_change    |median (new - old)| trace position (px): a shift of the whole pattern
#   telluric response_snr  QA_SNR: median S/N per bin of the standard's response (outside the
#                          hydrogen-line windows)
#         line_residual    QA_HRES: largest |inner/outer - 1| of the response in the flanks just
#                          outside the hydrogen windows: stellar line wings left in the response
#         masked_fraction  share of the band's bins without a response (DQ DO_NOT_USE: star light
#                          lost to bad voxels, S/N < 3, a window neither fitted nor bridged)
#         (shown, no threshold: line_window_fraction QA_HMASK, the share of bins inside hydrogen
#         windows - a property of the band, 0.59 in H; response_ratio, median new/old response:
#         clouds and throughput, which differ from night to night)
#   photom star_snr        QA_SNR: S/N of the imager standard's aperture count rate
#         zero_point_err   PHOTZPER: statistical error of the zero point (mag)
#         (shown, no threshold: zero_point PHOTZP, airmass TELAIRM; zero_point_change, new - old
#         PHOTZP in mag: clouds and extinction, which differ from night to night)
# RMS is the robust 1.4826 * MAD over pixels good (DQ DO_NOT_USE clear) in both masters;
# reference pixels are excluded from every metric and from #pixels. Flat pixels flagged
# UNRELIABLE_FLAT in either master (IFS: not lit by the lamp, value 1) have no measured flat:
# they are left out of the flat metrics and of #pixels.
QA_THRESHOLDS: dict[str, dict[str, tuple[float | None, float | None]]] = {
    "dark": {"median_shift": (None, 1.0), "residual_rms": (None, 3.0), "hot_change": (None, 0.01)},
    "flat": {"median_ratio": (0.9, 1.1), "rms_ratio": (0.5, 2.0), "bad_change": (None, 0.02),
             "thruput_rms": (None, 0.1), "profile_bias": (None, 0.05)},
    "ifstrace": {"trace_rms": (None, 0.05), "wave_rms_resel": (None, 0.1),
                 "profile_residual": (None, 0.05), "traced_fraction": (0.95, None),
                 "shape_change": (None, 0.25), "offset_change": (None, 3.0)},
    "telluric": {"response_snr": (30.0, None), "line_residual": (None, 0.02),
                 "masked_fraction": (None, 0.2)},
    "photom": {"star_snr": (100.0, None), "zero_point_err": (None, 0.01)},
}
# Numbers a master carries about itself (primary header keywords), checked against the same
# thresholds even when it has no predecessor: reftype -> metric -> keyword.
HEADER_METRICS: dict[str, dict[str, str]] = {
    "flat": {"thruput_rms": "QA_TPRMS", "thruput_max": "QA_TPMAX", "profile_bias": "QA_PROF",
             "lit_fraction": "QA_LIT"},
    "ifstrace": {"trace_rms": "QA_TRMS", "wave_rms_resel": "QA_WRMS",
                 "profile_residual": "QA_PRES", "traced_fraction": "QA_TRACD",
                 "arc_lines": "QA_NLINE", "resolving_min": "QA_RMIN", "resolving_max": "QA_RMAX"},
    "telluric": {"response_snr": "QA_SNR", "line_residual": "QA_HRES",
                 "line_window_fraction": "QA_HMASK", "airmass": "TELAIRM"},
    "photom": {"star_snr": "QA_SNR", "zero_point": "PHOTZP", "zero_point_err": "PHOTZPER",
               "airmass": "TELAIRM", "extinction": "PHOTEXT"},
}
ENV_QA_THRESHOLDS = "IRIS_QA_THRESHOLDS"  # JSON with the same shape, merged over the defaults


class QAError(ProcessingError, RuntimeError):
    """A master failed QA; ``report`` holds every metric and which ones failed."""

    def __init__(self, report: dict[str, Any]):
        self.report = report
        failed = ", ".join(f"{m}={report['metrics'][m]:.4g} not in {report['thresholds'][m]}"
                           for m in report["failed"] if m in report["metrics"])
        if report.get("reason"):
            failed = "; ".join(p for p in (report["reason"], failed) if p)
        super().__init__(f"master {report['master']} failed QA against "
                         f"{report.get('previous') or 'nothing'}: {failed}")


def thresholds() -> dict[str, dict[str, tuple[float | None, float | None]]]:
    out = {k: dict(v) for k, v in QA_THRESHOLDS.items()}
    extra = os.environ.get(ENV_QA_THRESHOLDS)
    if extra:
        for reftype, metrics in json.loads(extra).items():
            for metric, bounds in metrics.items():
                out.setdefault(reftype, {})[metric] = (bounds[0], bounds[1])
    return out


# -- gather ---------------------------------------------------------------------------------
def gather_calibrations(night: str, *, ledger: FrameLedger | None = None,
                        cfg: Settings | None = None, store: Any = None) -> dict[str, Any]:
    """Products of the night's calibration frames: ``{"night", "dark": [...], "flat": [...],
    "arc": [...], "telluric": [...], "photom": [...], "frames": {path: frame_id or key}}`` -
    rate images, for the telluric standards their cubes (``_s3d``) and for the imager
    standards their flat-fielded frames (``_cal``), reduced in real time."""
    cfg = cfg or settings()
    ledger = ledger or open_ledger(cfg.ledger_path)
    found: dict[str, list[str]] = {role: [] for role in CAL_OBSNAMES}
    origin: dict[str, str] = {}
    names: set[str] = set()
    for frame in ledger.frames(night=night, status=DONE,
                               kind=("dark", "flat", "engineering", "telluric")):
        role = next((r for r, obs in CAL_OBSNAMES.items() if frame["obsname"] in obs), None)
        if role is None:
            continue
        for prod in ledger.products(frame["frame_id"], current_only=True):
            if prod["kind"] != ROLE_PRODUCT[role]:
                continue
            path = prod["path"]
            if not (path and Path(path).is_file()) and prod["key"]:
                path = str(_download(prod["key"], cfg.work_dir / "nightly" / night / "inputs", cfg, store))
            found[role].append(path)
            origin[path] = frame["frame_id"]
            names.add(Path(path).name)
    # Anything the ledger does not know (another host processed it): from the store.
    try:
        store = store or _open_store(cfg)
        for info in store.list(f"products/{night}/"):
            parts = info.key.split("/")
            if len(parts) != 5 or parts[4] in names:
                continue
            role = next((r for r, obs in CAL_OBSNAMES.items() if parts[3] in obs), None)
            # Current names only: a reprocessed version carries its context before ".fits".
            if role is None or not parts[4].endswith(f"_{ROLE_PRODUCT[role]}.fits"):
                continue
            path = str(_download(info.key, cfg.work_dir / "nightly" / night / "inputs", cfg, store))
            found[role].append(path)
            origin[path] = info.key
            names.add(parts[4])
    except Exception as exc:
        log.warning("store not searched for %s calibration frames: %s", night, exc)
    log.info("night %s: %d dark, %d flat and %d arc rate images, %d telluric standard cube(s), "
             "%d imager standard frame(s)", night, len(found["dark"]), len(found["flat"]),
             len(found["arc"]), len(found["telluric"]), len(found["photom"]))
    return {"night": night, **{role: sorted(paths) for role, paths in found.items()},
            "frames": origin}


def _open_store(cfg: Settings) -> Any:
    from ..storage import open_store

    return open_store(cfg.store_url)


def _download(key: str, dest_dir: Path, cfg: Settings, store: Any = None) -> Path:
    store = store or _open_store(cfg)
    dest = ensure_dir(dest_dir) / key.rsplit("/", 1)[-1]
    if dest.is_file():
        return dest
    return store.get_file(key, dest)


# -- build ----------------------------------------------------------------------------------
def build_masters(gathered: dict[str, Any], *, context: str | None = None,
                  out_dir: str | os.PathLike[str] | None = None, min_frames: int | None = None,
                  cfg: Settings | None = None) -> list[str]:
    """Master darks, IFS instrument models, flats (dark-subtracted with the new darks), then
    one telluric reference per standard's cube and one imager zero point (``photom``) per
    imager standard's ``_cal``; returns their paths, plus a ``*.failed.json`` for every IFS
    model or standard that could not be built.

    IFS lamp flats are modelled with the night's new instrument model of their configuration,
    else the ``ifstrace`` reference ``context`` selects for each frame. Dark and flat groups
    with fewer than ``min_frames`` (default ``IRIS_MIN_MASTER_FRAMES``, 3) are skipped; an IFS
    model needs one lamp flat and one arc."""
    from .. import calib
    from ..pipelines.recipes import build_nightly

    cfg = cfg or settings()
    min_frames = cfg.min_master_frames if min_frames is None else min_frames
    calib.cache_dir()  # configures crds once per process
    calib.follow_store(context)  # IRIS_CRDS_STORE: hosts sharing no disk
    ctx = calib.resolve_context(context) if context else calib.operational_context()
    night = gathered["night"]
    out = ensure_dir(out_dir or cfg.work_dir / "nightly" / night / "masters")
    arcs = gathered.get("arc") or []
    tellurics = gathered.get("telluric") or []
    photometric = gathered.get("photom") or []
    built, failures = build_nightly(gathered["dark"], gathered["flat"], arcs, out, context=ctx,
                                    min_frames=min_frames, tellurics=tellurics,
                                    photometric=photometric, night=night,
                                    telluric_limits=thresholds().get("telluric"))
    failed = [_write_failure(f, out) for f in failures]
    masters = [str(p) for p in built]
    from .. import lineage

    lineage.record([*gathered["dark"], *gathered["flat"], *arcs, *tellurics, *photometric], masters,
                   job="iris_nightly_calibrations.build")
    masters += [str(p) for p in failed]
    log.info("night %s: built %d master(s) with context %s", night, len(masters), ctx)
    return masters


def _write_failure(failure: Any, out: Path) -> Path:
    """A ``*.failed.json`` naming a master that could not be built and why (its QA fails):
    per configuration for an IFS model, per standard's product for a telluric or photom
    reference."""
    key = failure.key
    if failure.reftype in ("telluric", "photom"):
        name = Path(failure.inputs[0]).name.removesuffix(".fits")
    else:
        name = "_".join(str(key.get(k, "")) for k in ("DETECTOR", "IFSMODE", "IFSSCALE", "FILTER"))
    path = out / f"iris_{name.lower()}_{failure.reftype}{FAILED_SUFFIX}"
    doc = {"reftype": failure.reftype, "key": key, "inputs": failure.inputs,
           "reason": failure.reason}
    if failure.metrics:  # a standard built but left out by QA: its numbers
        doc.update(metrics=failure.metrics, failed=failure.failed or [])
    path.write_text(json.dumps(doc, indent=1))
    return path


# -- QA -------------------------------------------------------------------------------------
def _robust(x: Any) -> tuple[float, float]:
    import numpy as np

    if x.size == 0:
        return float("nan"), float("nan")
    med = float(np.median(x))
    return med, float(1.4826 * np.median(np.abs(x - med)))


def _plane(data: Any) -> Any:
    """2-D view of a reference array (per-read cubes are averaged over the leading axes)."""
    import numpy as np

    arr = np.asarray(data, dtype=np.float64)
    while arr.ndim > 2:
        arr = arr.mean(axis=0)
    return arr


def previous_reference(master: str | os.PathLike[str], context: str) -> str | None:
    """The reference ``context`` selects for the master's own parameters (None if none)."""
    from astropy.io import fits

    from .. import calib

    h = fits.getheader(os.fspath(master), 0)
    reftype = str(h["REFTYPE"]).strip().lower()
    params = {k: h[k] for k in ("INSTRUME", "DETECTOR", "READPATT", "FILTER", "IFSMODE", "IFSSCALE")
              if h.get(k) is not None}
    params["DATE-OBS"] = str(h.get("USEAFTER"))
    try:
        return calib.get_references(params, [reftype], context=context)[reftype]
    except calib.CalibrationError as exc:
        log.info("no previous %s for %s under %s: %s", reftype, Path(master).name, context, exc)
        return None


def qa_metrics(new: dict[str, Any], old: dict[str, Any], reftype: str) -> dict[str, float]:
    """QA numbers of one master (arrays in ``new``/``old``: sci, err, dq) - see QA_THRESHOLDS."""
    import numpy as np

    from ..datamodels.dqflags import pixel

    a, b = _plane(new["sci"]), _plane(old["sci"])
    if a.shape != b.shape:
        raise QAError({"master": new.get("name"), "previous": old.get("name"),
                       "metrics": {"shape": float("nan")}, "thresholds": {"shape": f"{b.shape}"},
                       "failed": ["shape"]})
    dqa = np.asarray(new["dq"]) if new.get("dq") is not None else np.zeros(a.shape, np.uint32)
    dqb = np.asarray(old["dq"]) if old.get("dq") is not None else np.zeros(a.shape, np.uint32)
    dqa, dqb = _plane(dqa).astype(np.uint32), _plane(dqb).astype(np.uint32)
    # Reference pixels see no light and no dark current; both masters' conventions for
    # flagging them differ (NO_FLAT_FIELD or not), so they are left out of every metric.
    science = ((dqa | dqb) & pixel["REFERENCE_PIXEL"]) == 0
    good = science & ((dqa & pixel["DO_NOT_USE"]) == 0) & ((dqb & pixel["DO_NOT_USE"]) == 0) \
        & np.isfinite(a) & np.isfinite(b)
    npix = int(np.count_nonzero(science)) or 1
    dqa, dqb = np.where(science, dqa, 0), np.where(science, dqb, 0)
    if reftype == "dark":
        med_a, rms_a = _robust(a[good])
        med_b, rms_b = _robust(b[good])
        err = _plane(new["err"]) if new.get("err") is not None else None
        e = float(np.median(err[good & (err > 0)])) if err is not None and np.any(good & (err > 0)) else rms_a
        _, rms_diff = _robust((a - b)[good])
        flagged = pixel["HOT"] | pixel["WARM"]
        return {
            "median_new": med_a, "median_old": med_b, "rms_new": rms_a, "rms_old": rms_b,
            "median_shift": abs(med_a - med_b) / rms_a if rms_a > 0 else float("inf"),
            "residual_rms": rms_diff / e if e > 0 else float("inf"),
            "hot_new": float(np.count_nonzero(dqa & flagged)),
            "hot_old": float(np.count_nonzero(dqb & flagged)),
            "hot_change": abs(float(np.count_nonzero(dqa & flagged))
                              - float(np.count_nonzero(dqb & flagged))) / npix,
        }
    # A trace-lit IFS flat has no value where the lamp gives no light (UNRELIABLE_FLAT, value
    # 1): compare the two flats only where both were measured.
    unlit = np.uint32(pixel["UNRELIABLE_FLAT"])
    measured = science & ((dqa & unlit) == 0) & ((dqb & unlit) == 0)
    good &= measured
    npix = int(np.count_nonzero(measured)) or 1
    dqa, dqb = np.where(measured, dqa, 0), np.where(measured, dqb, 0)
    med_a, rms_a = _robust(a[good])
    med_b, rms_b = _robust(b[good])
    bad = pixel["DO_NOT_USE"] | pixel["NO_FLAT_FIELD"] | pixel["DEAD"] | pixel["LOW_QE"]
    return {
        "median_new": med_a, "median_old": med_b, "rms_new": rms_a, "rms_old": rms_b,
        "median_ratio": med_a / med_b if med_b else float("inf"),
        "rms_ratio": rms_a / rms_b if rms_b else float("inf"),
        "bad_new": float(np.count_nonzero(dqa & bad)), "bad_old": float(np.count_nonzero(dqb & bad)),
        "bad_change": abs(float(np.count_nonzero(dqa & bad)) - float(np.count_nonzero(dqb & bad))) / npix,
        "compared_fraction": float(np.count_nonzero(measured)) / (int(np.count_nonzero(science)) or 1),
    }


def ifstrace_change(new: str, old: str) -> dict[str, float]:
    """How far a new instrument model moved the traces from the previous one, compared at the
    wavelengths both cover (see QA_THRESHOLDS: offset_change, shape_change)."""
    import numpy as np

    from ..datamodels import IfsTraceModel, open_model

    a, b = open_model(new, IfsTraceModel), open_model(old, IfsTraceModel)
    try:
        ax, ay = np.asarray(a.trace_x, np.float64), np.asarray(a.trace_y, np.float64)
        bx, by = np.asarray(b.trace_x, np.float64), np.asarray(b.trace_y, np.float64)
        if ax.shape[:2] != bx.shape[:2]:
            return {"shape_change": float("inf"), "offset_change": float("inf")}
        wa, wb = np.asarray(a.wavelength, np.float64), np.asarray(b.wavelength, np.float64)
        common = (wa >= wb[0]) & (wa <= wb[-1])
        if common.sum() < 2:
            return {"shape_change": float("inf"), "offset_change": float("inf")}
        w = wa[common]

        def at(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
            flat = values.reshape(-1, values.shape[-1])
            return np.stack([np.interp(w, grid, row) for row in flat]).reshape(
                values.shape[:2] + (w.size,))

        dx = ax[..., common] - at(bx, wb)
        dy = ay[..., common] - at(by, wb)
    finally:
        a.close()
        b.close()
    offset = np.array([np.median(dx), np.median(dy)])
    shape = float(np.sqrt(np.mean((dx - offset[0]) ** 2 + (dy - offset[1]) ** 2)))
    return {"offset_x": float(offset[0]), "offset_y": float(offset[1]),
            "offset_change": float(np.hypot(*offset)), "shape_change": shape}


def telluric_metrics(new: str, old: str | None) -> dict[str, float]:
    """QA numbers of a telluric reference read from its arrays (see QA_THRESHOLDS): the share
    of bins without a response and, against the previous standard of its configuration, the
    median ratio of the two responses where both are defined (on the new one's wavelengths)."""
    import numpy as np

    from ..datamodels import TelluricModel, open_model
    from ..datamodels.dqflags import pixel

    a = open_model(new, TelluricModel)
    try:
        wave = np.asarray(a.wavelength, np.float64)
        resp = np.asarray(a.data, np.float64)
        undefined = ((np.asarray(a.dq, np.uint32) & pixel["DO_NOT_USE"]) != 0) \
            | ~np.isfinite(resp) | ~(resp > 0)
        worst = float(np.mean(undefined)) if resp.size else 1.0
        if a.std_response is not None and a.std_dq is not None:  # format 2: every standard
            rows = np.asarray(a.std_response, np.float64)
            bad = ((np.asarray(a.std_dq, np.uint32) & pixel["DO_NOT_USE"]) != 0) \
                | ~np.isfinite(rows) | ~(rows > 0)
            worst = max([worst, *(float(np.mean(b)) for b in bad)])
    finally:
        a.close()
    metrics = {"masked_fraction": worst}
    if old is None:
        return metrics
    b = open_model(old, TelluricModel)
    try:
        bwave, bresp = np.asarray(b.wavelength, np.float64), np.asarray(b.data, np.float64)
    finally:
        b.close()
    ok = np.isfinite(bresp) & (bresp > 0)
    if ok.sum() < 2:
        return metrics
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = resp / np.interp(wave, bwave[ok], bresp[ok], left=np.nan, right=np.nan)
    ratio = ratio[~undefined & np.isfinite(ratio)]
    if ratio.size:
        metrics["response_ratio"] = float(np.median(ratio))
    return metrics


def photom_metrics(new: str, old: str | None) -> dict[str, float]:
    """Against the previous zero point of its DETECTOR/FILTER: ``zero_point_change`` (new -
    old PHOTZP, mag; shown, no threshold: a standard measures tonight's sky)."""
    from astropy.io import fits

    if old is None:
        return {}
    ha, hb = fits.getheader(new, 0), fits.getheader(old, 0)
    # at airmass 1 where both have it (since 2026-12-07), so standards at other airmasses compare
    key = "PHOTZP1" if ha.get("PHOTZP1") is not None and hb.get("PHOTZP1") is not None \
        else "PHOTZP"
    a, b = ha.get(key), hb.get(key)
    return {} if a is None or b is None else {"zero_point_change": float(a) - float(b)}


def _arrays(path: str) -> dict[str, Any]:
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        return {"name": Path(path).name,
                "sci": hdul["SCI"].data if "SCI" in hdul else hdul[0].data,
                "err": hdul["ERR"].data if "ERR" in hdul else None,
                "dq": hdul["DQ"].data if "DQ" in hdul else None}


def qa_master(master: str, *, context: str | None = None,
              limits: dict[str, dict[str, tuple[float | None, float | None]]] | None = None) -> dict[str, Any]:
    """QA one master against the reference ``context`` (default operational) selects for it.

    Returns the report (``passed`` True); raises :class:`QAError` with the same report when a
    metric is outside its threshold. A master with no predecessor is accepted as the first of
    its kind if the numbers it carries about itself (:data:`HEADER_METRICS`) pass.
    """
    from astropy.io import fits

    from .. import calib

    if str(master).endswith(FAILED_SUFFIX):
        failure = json.loads(Path(master).read_text())
        rtype = failure.get("reftype")
        raise QAError({"master": master, "reftype": rtype, "previous": None,
                       "metrics": failure.get("metrics") or {},
                       "thresholds": thresholds().get(rtype, {}) if failure.get("metrics") else {},
                       "failed": failure.get("failed") or ["build"], "passed": False,
                       "reason": f"not built from {', '.join(Path(p).name for p in failure['inputs'])}: "
                                 f"{failure['reason']}"})
    calib.cache_dir()  # configures crds once per process
    calib.follow_store(context)  # IRIS_CRDS_STORE: hosts sharing no disk
    ctx = calib.resolve_context(context) if context else calib.operational_context()
    header = fits.getheader(master, 0)
    reftype = str(header["REFTYPE"]).strip().lower()
    limits = (limits or thresholds()).get(reftype, {})
    previous = previous_reference(master, ctx)
    metrics: dict[str, float] = {name: float(header[key])
                                 for name, key in HEADER_METRICS.get(reftype, {}).items()
                                 if header.get(key) is not None}
    report: dict[str, Any] = {"master": master, "reftype": reftype, "previous": previous,
                              "context": ctx, "metrics": metrics, "thresholds": limits, "failed": []}
    if reftype == "telluric":
        # A standard's response measures tonight's atmosphere: it is judged on its own numbers;
        # the previous standard's only gives the throughput ratio (shown, no threshold).
        metrics.update(telluric_metrics(master, previous))
    elif reftype == "photom":
        metrics.update(photom_metrics(master, previous))  # the same for a zero point
    if previous is None:
        report["note"] = "no previous reference of this kind: accepted as the first"
    elif reftype in ("telluric", "photom"):
        pass
    elif reftype == "ifstrace":
        metrics.update(ifstrace_change(master, previous))
    else:
        metrics.update(qa_metrics(_arrays(master), _arrays(previous), reftype))
    for name, (low, high) in limits.items():
        value = metrics.get(name)
        if value is None:
            continue
        if (low is not None and not value >= low) or (high is not None and not value <= high):
            report["failed"].append(name)
    report["passed"] = not report["failed"]
    log.info("QA %s vs %s: %s", Path(master).name, Path(previous).name if previous else "nothing",
             {k: round(v, 4) for k, v in metrics.items()})
    if report["failed"]:
        raise QAError(report)
    return report


# -- publish / archive ----------------------------------------------------------------------
def publish_masters(reports: list[dict[str, Any]], night: str, *, ledger: FrameLedger | None = None,
                    cfg: Settings | None = None,
                    decision: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Publish the masters that passed QA (and were approved) as a new operational CRDS context.

    ``decision`` (:func:`iris_tasks.orchestration.approval.decide`): the approval of the
    night's masters; only its ``approved`` masters are published, a rejection publishes nothing
    and keeps the previous context. Either way the decision is recorded (ledger, a JSON
    document, lineage). Without one every master that passed QA is published.

    Returns ``{"context", "previous", "night", "references"}`` (the asset event's extra), or
    None when nothing is published (nothing passed, or the masters were rejected).
    """
    from .. import calib, lineage
    from .approval import record_decision

    cfg = cfg or settings()
    ledger = ledger or open_ledger(cfg.ledger_path)
    passed = [r for r in reports if r and r.get("passed")]
    if decision is not None:
        approved = set(decision["approved"])
        passed = [r for r in passed if r["master"] in approved]
    run = run_info()
    if not passed:
        status = "rejected" if decision is not None and decision["decision"] == "rejected" \
            else "nothing-published"
        if decision is None:
            ledger.record_calibration(night, status=status, qa=reports, dag_id=run["dag_id"],
                                      run_id=run["run_id"])
            return None
        calib.cache_dir()  # configures crds once per process
        calibration_id = ledger.record_calibration(
            night, status=status, previous_context=calib.operational_context(),
            masters=decision["offered"], qa=reports, dag_id=run["dag_id"], run_id=run["run_id"])
        record_decision(decision, work_dir=cfg.work_dir, ledger=ledger,
                        calibration_id=calibration_id, run=run)
        log.info("night %s: nothing published (%s by %s); %s stays operational", night,
                 decision["decision"], decision["by"], calib.operational_context())
        return None
    calib.cache_dir()  # configures crds once per process
    previous = calib.operational_context()
    files = [r["master"] for r in passed]
    description = f"IRIS nightly masters for {night}: " + ", ".join(Path(f).name for f in files)
    if decision is not None:
        description += f" (approved by {decision['by']})"
    context = calib.publish_references(files, description)
    calibration_id = ledger.record_calibration(
        night, status="published", context=context, previous_context=previous, masters=files,
        qa=reports, dag_id=run["dag_id"], run_id=run["run_id"])
    if decision is not None:
        record_decision(decision, work_dir=cfg.work_dir, ledger=ledger,
                        calibration_id=calibration_id, run=run)
    ctx_uri = lineage.reference_uris({"CRDS_CTX": context}).get("CRDS_CTX")
    lineage.record(files, [ctx_uri] if ctx_uri else [], job="iris_nightly_calibrations.publish")
    log.info("night %s: published %d master(s) as %s (was %s)", night, len(files), context, previous)
    return {"context": context, "previous": previous, "night": night,
            "references": [Path(f).name for f in files]}


def archive_masters(masters: list[str], night: str, *, cfg: Settings | None = None,
                    store: Any = None) -> list[str]:
    """Copy masters to the store: ``references/<night>/<detector>/<REFTYPE>/<file>``."""
    from astropy.io import fits

    from ..storage import product_key

    cfg = cfg or settings()
    store = store or _open_store(cfg)
    urls = []
    for path in masters:
        h = fits.getheader(path, 0)
        key = product_key(night, str(h.get("DETECTOR", "unknown")), str(h["REFTYPE"]).upper(),
                          Path(path).name, "references")
        info = store.put_file(path, key, ascii_meta({"night": night, "reftype": h["REFTYPE"]}),
                              overwrite=True)
        urls.append(info.url)
    return urls
