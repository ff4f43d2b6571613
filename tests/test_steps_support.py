"""Small synthetic IRIS inputs shared by the steps/pipelines/masters tests (no tests here).

Frames are 64 x 64 with the 4-pixel reference border of a full H4RG (bias only), so the
readout kernels run their reference-pixel correction on them as on real frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iris_tasks import datamodels as dm

N = 64
READ_TIME = 1.5
NREADS = 5
BIAS = 10000.0
GAIN = 2.0
READ_NOISE = 4.0
DATE = "2026-11-23"


def fill_meta(model, *, obsname="IMG1-SCI", obstype="SCI", filt="Kbb", detector="IMG1",
              nreads=NREADS, sampmode="UTR", time="06:00:00", exp_no=1):
    m = model.meta
    m.instrument.name = "IRIS"
    m.instrument.detector = detector
    m.instrument.filter = filt
    m.instrument.ifsmode = "N/A" if obsname.startswith("IMG1") else (
        "LENSLET" if obsname.startswith("LEN") else "SLICER")
    m.observation.obstype = obstype
    m.observation.obsname = obsname
    m.observation.exp_no = exp_no
    m.observation.date = DATE
    m.observation.time = time
    m.exposure.sampmode = sampmode
    m.exposure.nreads = nreads
    m.exposure.nramps = 1
    m.exposure.read_time = READ_TIME
    m.exposure.exposure_time = READ_TIME * (nreads - 1)
    m.exposure.readpatt = f"{sampmode}{nreads}"
    m.exposure.gain = GAIN
    m.pointing.ra = 150.0
    m.pointing.dec = 2.0
    m.pointing.pa = 0.0
    return model


def active(n: int = N) -> np.ndarray:
    mask = np.zeros((n, n), bool)
    mask[4:-4, 4:-4] = True
    return mask


def write_ramp(path, rate, *, nramps=1, nreads=NREADS, seed=0, noise=True, **meta) -> Path:
    """Raw ramp of ``rate`` DN/s (scalar or map) on the active pixels."""
    rng = np.random.default_rng(seed)
    rate = np.broadcast_to(np.asarray(rate, np.float64), (N, N)) * active()
    t = (np.arange(nreads) + 1) * READ_TIME
    reads = BIAS + rate[None, None] * t[None, :, None, None]
    reads = np.broadcast_to(reads, (nramps, nreads, N, N)).copy()
    if noise:
        reads += rng.normal(0.0, READ_NOISE, reads.shape)
    model = fill_meta(dm.RampModel(data=np.round(reads).astype(np.uint16)), nreads=nreads, **meta)
    model.meta.exposure.nramps = nramps
    model.save(str(path))
    return Path(path)


def write_rate(path, data, *, err=None, dq=None, **meta) -> Path:
    """A _rate image (as stage 1 writes it) with ERR = VAR_* consistent."""
    data = np.asarray(data, np.float32)
    err = np.full(data.shape, 0.1, np.float32) if err is None else np.asarray(err, np.float32)
    dq = np.zeros(data.shape, np.uint32) if dq is None else np.asarray(dq, np.uint32)
    model = fill_meta(dm.ImageModel(data=data, err=err, dq=dq, var_poisson=err**2 / 2,
                                    var_rnoise=err**2 / 2, var_flat=np.zeros_like(data)), **meta)
    model.meta.cal_step.readout = "COMPLETE"
    model.save(str(path))
    return Path(path)


def reference(reftype: str, *, useafter="2020-01-01T00:00:00", detector="IMG1", filt="N/A",
              readpatt="N/A", ifsmode="N/A", **arrays):
    cls = dm.REFERENCE_MODELS[reftype]
    model = cls(**arrays)
    m = model.meta
    m.instrument.name = "IRIS"
    m.instrument.detector = detector
    m.instrument.filter = filt
    m.instrument.ifsmode = ifsmode
    m.exposure.readpatt = readpatt
    m.reftype = reftype.upper()
    m.useafter = useafter
    m.pedigree = "SIMULATION"
    m.description = f"test {reftype}"
    m.author = "tests"
    return model


def detector_references(directory, *, dark_level=0.5, flat=None, n=N) -> dict[str, Path]:
    """One file per stage-1/stage-2 reference type for IMG1 (dark for UTR5, flat for Kbb)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = np.ones((n, n), np.float32) if flat is None else flat
    coeffs = np.zeros((2, n, n), np.float32)
    coeffs[1] = 1.0
    models = {
        "mask": reference("mask", dq=np.zeros((n, n), np.uint32)),
        "saturation": reference("saturation", data=np.full((n, n), 60000.0, np.float32)),
        "linearity": reference("linearity", coeffs=coeffs),
        "readnoise": reference("readnoise", data=np.full((n, n), READ_NOISE, np.float32)),
        "gain": reference("gain", data=np.full((n, n), GAIN, np.float32)),
        "dark": reference("dark", readpatt=f"UTR{NREADS}",
                          data=np.full((n, n), dark_level, np.float32),
                          err=np.full((n, n), 0.01, np.float32)),
        "flat": reference("flat", filt="Kbb", data=np.asarray(flat, np.float32),
                          err=np.full((n, n), 0.001, np.float32)),
    }
    paths = {}
    for reftype, model in models.items():
        paths[reftype] = directory / f"test_{reftype}.fits"
        model.save(str(paths[reftype]))
    return paths
