"""The "pre-night" reference files of the simulated detectors, made from the truth.

A freshly bootstrapped CRDS cache can reduce simulated data with these before any nightly
master exists: mask, saturation, linearity, readnoise, gain, dark (per READPATT) and flat (per
FILTER and IFSMODE) for every detector.

The IFS trace (ifstrace) is written only for the *ideal* IFS optics, as a truth-derived
legacy reference (the extraction's own model, for unit tests of solver mechanics). The
realistic instrument gets its ifstrace from the nightly builder, measured on lamp flats and
arcs, never from the simulator's truth.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..datamodels import dqflags
from ..metadata import DETECTORS, IMAGER_DETECTORS
from .detector import DetectorModel
from .frames import FrameFactory, write_atomic

log = logging.getLogger(__name__)

DEFAULT_USEAFTER = "2020-01-01T00:00:00"
DEFAULT_IMAGER_FILTERS = ("Ks", "H")
DEFAULT_IFS_CONFIGS = (("LENSLET", "4", "Kbb"), ("SLICER", "25", "Kbb"))
AUTHOR = "iris_tasks.simulate"

_DQ = dqflags.pixel


def reference_name(reftype: str, detector: str, *parts: str) -> str:
    """``iris_sim_<reftype>_<DETECTOR>[_<part>...].fits`` (parts: filter, mode, readpatt...)."""
    extra = "".join(f"_{p}" for p in parts if p)
    return f"iris_sim_{reftype}_{detector}{extra}.fits"


def _set_meta(model, det: DetectorModel, description: str, useafter: str, *,
              filter_name: str = "N/A", ifsmode: str = "N/A", readpatt: str = "N/A",
              ifsscale: str | None = None) -> None:
    meta = model.meta
    meta.instrument.name = "IRIS"
    meta.instrument.detector = det.name
    meta.instrument.det_id = det.det_id
    meta.instrument.filter = filter_name
    meta.instrument.ifsmode = ifsmode
    if ifsscale is not None:
        meta.instrument.ifsscale = ifsscale
    meta.exposure.readpatt = readpatt
    meta.useafter = useafter
    meta.pedigree = "SIMULATION"
    meta.description = description
    meta.author = AUTHOR
    meta.subarray.name = "FULL"
    meta.subarray.xstart = 1
    meta.subarray.ystart = 1
    meta.subarray.xsize = det.nx
    meta.subarray.ysize = det.ny


def mask_dq(det: DetectorModel) -> np.ndarray:
    """Bad-pixel flags of the true detector: reference border (and the bad reference pixels
    the mask knows of), dead, hot, low QE."""
    dq = np.zeros(det.shape, np.uint32)
    dq[~det.active] |= _DQ["REFERENCE_PIXEL"]
    dq[det.bad_refpix_mask()] |= _DQ["BAD_REF_PIXEL"] | _DQ["DO_NOT_USE"]
    dq[det.dead] |= _DQ["DEAD"] | _DQ["DO_NOT_USE"]
    dq[det.hot] |= _DQ["HOT"]
    dq[det.low_qe] |= _DQ["LOW_QE"]
    return dq


def flat_reference(det: DetectorModel, filter_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(data, dq) of a flat reference, 1.0 where it cannot be used.

    The data are the response a DN/s flat measures, QE / gain normalised to median 1
    (:meth:`DetectorModel.flat_dn`), not the QE flat alone: the flat_field step divides rates
    in DN/s, and the nightly master flats (built from DN/s lamp rates) contain the gain too.
    """
    data = det.flat_dn(filter_name).copy()
    dq = np.zeros(det.shape, np.uint32)
    border = ~det.active
    data[border] = 1.0
    dq[border] |= _DQ["REFERENCE_PIXEL"] | _DQ["NO_FLAT_FIELD"]
    data[det.dead] = 1.0
    dq[det.dead] |= _DQ["DEAD"] | _DQ["NO_FLAT_FIELD"] | _DQ["DO_NOT_USE"]
    dq[det.low_qe] |= _DQ["LOW_QE"]
    return data, dq


def write_reference_files(out_dir: str | os.PathLike, detectors: Iterable[str] = DETECTORS,
                          size: int = 1024, seed: int = 0, useafter: str = DEFAULT_USEAFTER, *,
                          readpatts: Sequence[str] = ("UTR10",),
                          imager_filters: Sequence[str] = DEFAULT_IMAGER_FILTERS,
                          ifs_configs: Sequence[tuple[str, str, str]] = DEFAULT_IFS_CONFIGS,
                          factory: FrameFactory | None = None, nchan: int = 32,
                          ifs_optics: str | None = None) -> list[Path]:
    """Write the pre-night reference set for ``detectors``; returns the paths written.

    ``readpatts`` selects the dark references (one per READPATT), ``imager_filters`` the imager
    flats, ``ifs_configs`` the (IFSMODE, IFSSCALE, FILTER) of IFS flats and traces.
    ``ifs_optics`` ("realistic" or "ideal"; default: the factory's, else "realistic"): the
    ifstrace references are written only for "ideal" (truth-derived legacy traces).
    """
    from .. import datamodels as dm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if factory is None:
        factory = FrameFactory(size=size, seed=seed, nchan=nchan, optics=ifs_optics or "realistic")
    if factory.size != size or factory.seed != seed:
        raise ValueError("factory size/seed differ from the requested size/seed")
    if ifs_optics is not None and ifs_optics != factory.optics:
        raise ValueError(f"ifs_optics={ifs_optics!r} differs from the factory's "
                         f"optics={factory.optics!r}")
    paths: list[Path] = []

    def save(model, name: str) -> None:
        paths.append(write_atomic(model, out / name))
        log.info("wrote %s", paths[-1])

    for name in detectors:
        det = factory.detector(name)
        active = det.active
        dq = mask_dq(det)

        m = dm.MaskModel(dq=dq)
        _set_meta(m, det, f"Simulated bad-pixel mask of {name} (truth)", useafter)
        m.meta.qa.nbad = int(np.count_nonzero(dq & ~np.uint32(_DQ["REFERENCE_PIXEL"])))
        save(m, reference_name("mask", name))

        sat_dq = np.zeros(det.shape, np.uint32)
        sat_dq[~active] |= _DQ["REFERENCE_PIXEL"]
        m = dm.SaturationModel(data=det.saturation_reference(), dq=sat_dq)
        _set_meta(m, det, f"Simulated saturation of {name}: full-well plateau - "
                  f"{det.sat_margin:g} DN (raw DN incl. bias)", useafter)
        save(m, reference_name("saturation", name))

        coeffs, err = det.linearity_coefficients()
        lin_dq = np.zeros(det.shape, np.uint32)
        lin_dq[~active] |= _DQ["REFERENCE_PIXEL"]
        lin_dq[det.dead] |= _DQ["NO_LIN_CORR"]
        m = dm.LinearityModel(coeffs=coeffs, dq=lin_dq)
        _set_meta(m, det, f"Simulated non-linearity of {name}: linear = sum c_k raw^k, raw = DN "
                  f"above bias; inverse fit max rel err {err:.1e}", useafter)
        save(m, reference_name("linearity", name))

        m = dm.ReadnoiseModel(data=det.read_noise.copy())
        _set_meta(m, det, f"Simulated white read noise per read of {name} (DN)", useafter)
        save(m, reference_name("readnoise", name))

        m = dm.GainModel(data=det.gain.copy())
        _set_meta(m, det, f"Simulated gain of {name} (e-/DN)", useafter)
        save(m, reference_name("gain", name))

        dark_dn = (det.dark_current / det.gain).astype(np.float32)
        dark_dq = np.zeros(det.shape, np.uint32)
        dark_dq[~active] |= _DQ["REFERENCE_PIXEL"]
        dark_dq[det.hot] |= _DQ["HOT"]
        for patt in readpatts:
            m = dm.DarkModel(data=dark_dn, err=np.zeros(det.shape, np.float32), dq=dark_dq)
            _set_meta(m, det, f"Simulated dark current of {name} (truth, DN/s)", useafter,
                      readpatt=patt)
            save(m, reference_name("dark", name, patt))

        if name in IMAGER_DETECTORS:
            flat_cfgs = [(f, "N/A") for f in imager_filters]
        else:
            flat_cfgs = sorted({(f, mode) for mode, _scale, f in ifs_configs})
        for filt, mode in flat_cfgs:
            data, fdq = flat_reference(det, filt)
            m = dm.FlatModel(data=data, err=np.zeros(det.shape, np.float32), dq=fdq)
            _set_meta(m, det, f"Simulated pixel flat of {name} in {filt} in DN/s "
                      "(truth QE / gain, median 1)", useafter,
                      filter_name=filt, ifsmode=mode)
            save(m, reference_name("flat", name, filt, "" if mode == "N/A" else mode))

        if name not in IMAGER_DETECTORS and factory.optics == "ideal":
            for mode, scale, filt in ifs_configs:
                trace = factory.trace(mode, scale, filt)
                m = trace.to_model()
                _set_meta(m, det, f"Truth-derived legacy {mode} trace of the ideal simulated IFS "
                          f"({scale} mas, {filt}); 0-based pixel centres", useafter,
                          filter_name=filt, ifsmode=mode, ifsscale=scale)
                save(m, reference_name("ifstrace", name, mode, scale, filt))
        elif name not in IMAGER_DETECTORS and ifs_configs:
            log.info("realistic IFS optics: no truth-derived ifstrace for %s (the nightly "
                     "instrument-model builder makes it from lamp flats and arcs)", name)
    return paths
