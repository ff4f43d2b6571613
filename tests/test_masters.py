"""Master dark and flat builders on small synthetic rate images with known truth."""

import math

import numpy as np
import pytest
from astropy.io import fits
from test_steps_support import READ_NOISE, READ_TIME, active, write_rate

from iris_tasks.datamodels import open_model
from iris_tasks.datamodels.dqflags import pixel
from iris_tasks.masters import (
    MasterBuildError,
    build_master_dark,
    build_master_flat,
    save_master_dark,
    save_master_flat,
)
from iris_tasks.masters.combine import clip_variance_factor, clipped_stats, combine_files
from iris_tasks.masters.common import night_start_utc
from iris_tasks.masters.dark import rate_variance_coefficients

N = 64
C_READ = rate_variance_coefficients("UTR", 5, READ_TIME)[0]
SIGMA_RATE = math.sqrt(C_READ) * READ_NOISE  # per-frame rate noise of a UTR5 dark


def _border_dq():
    dq = np.zeros((N, N), np.uint32)
    dq[~active(N)] = pixel["REFERENCE_PIXEL"] | pixel["DO_NOT_USE"]
    return dq


def _darks(tmp_path, rng, nframes=8, times=None):
    truth = np.full((N, N), 0.02, np.float32)
    truth[10, 10] = truth[20, 30] = 12.0  # hot
    truth[40, 40] = 2.8  # warm
    paths = []
    for i in range(nframes):
        data = truth + rng.normal(0, SIGMA_RATE, (N, N)).astype(np.float32)
        if i == 2:
            data[50, 50] += 300.0  # a cosmic-ray residue in one frame
        paths.append(write_rate(tmp_path / f"drk{i}_rate.fits", data, dq=_border_dq(),
                                err=np.full((N, N), SIGMA_RATE),
                                obsname="IMG1-DRK", obstype="CAL", filt="N/A", exp_no=i,
                                time=(times or {}).get(i, f"0{i}:00:00")))
    return truth, paths


def test_master_dark_values_hot_pixels_readnoise_and_keywords(tmp_path, rng):
    truth, paths = _darks(tmp_path, rng)
    master = build_master_dark(paths, gain=2.0)
    model = master.model
    a = active(N)
    resid = (model.data - truth)[a]
    # median of the residual: 3 sigma of a median of ~3100 pixels of std sigma/sqrt(8)
    assert abs(np.median(resid)) < 3 * 1.25 * SIGMA_RATE / math.sqrt(8 * 3100)
    assert np.std(resid) == pytest.approx(SIGMA_RATE / math.sqrt(8), rel=0.1)
    assert model.data[50, 50] == pytest.approx(truth[50, 50], abs=5 * SIGMA_RATE)  # CR clipped
    assert model.dq[10, 10] & pixel["HOT"] and model.dq[20, 30] & pixel["HOT"]
    assert model.dq[40, 40] & pixel["WARM"] and not model.dq[40, 40] & pixel["HOT"]
    assert master.n_hot == 2 and master.n_warm <= 2
    assert model.dq[0, 0] == pixel["REFERENCE_PIXEL"]  # static bits carried, not "unreliable"
    assert np.median(model.err[a]) == pytest.approx(SIGMA_RATE / math.sqrt(8), rel=0.15)
    assert master.readnoise == pytest.approx(READ_NOISE, rel=0.08)

    path = save_master_dark(master, tmp_path / "out")
    assert path.name == "iris_img1_utr5_6s_2026-11-22_dark.fits"
    header = fits.getheader(path)
    assert header["REFTYPE"] == "DARK" and header["DETECTOR"] == "IMG1"
    assert header["READPATT"] == "UTR5" and header["NCOMBINE"] == 8
    assert header["USEAFTER"] == "2026-11-22T22:00:00"  # local noon of the night, in UTC
    assert header["PEDIGREE"] == "INFLIGHT 2026-11-23 2026-11-23"
    assert "RN" in header["DESCRIP"] and header["QA_NBAD"] >= 3
    from iris_tasks.calib import read_reference

    read_reference(path)  # publishable: every CRDS keyword present


def test_master_dark_input_errors(tmp_path, rng):
    _, paths = _darks(tmp_path, rng, nframes=3)
    with pytest.raises(MasterBuildError, match="at least 4"):
        build_master_dark(paths, min_frames=4)
    other = write_rate(tmp_path / "drk_cds_rate.fits", np.zeros((N, N)), obsname="IMG1-DRK",
                       obstype="CAL", nreads=2, sampmode="CDS")
    with pytest.raises(MasterBuildError, match="mix several groups"):
        build_master_dark([*paths, other])
    sci = write_rate(tmp_path / "sci_rate.fits", np.zeros((N, N)))
    with pytest.raises(MasterBuildError, match="not a dark"):
        build_master_dark([*paths, sci])
    ramp = tmp_path / "ramp.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((2, 4, 4), np.uint16), name="SCI")]).writeto(ramp)
    with pytest.raises(MasterBuildError, match="readout"):
        build_master_dark([*paths, ramp])


def _flats(tmp_path, rng, dark_level=0.5):
    yy, xx = np.mgrid[:N, :N]
    truth = (1.0 + 0.05 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.float32)
    truth *= rng.normal(1.0, 0.01, (N, N)).astype(np.float32)
    truth[12, 12] = 0.0  # dead
    truth[33, 44] = 0.45  # low QE
    paths = []
    noise = 0.002
    for i, level in enumerate((1000.0, 1100.0, 950.0, 1020.0, 990.0)):
        data = level * truth * (1 + rng.normal(0, noise, (N, N))) + dark_level
        paths.append(write_rate(tmp_path / f"flat{i}_rate.fits", data.astype(np.float32),
                                err=np.maximum(level * truth * noise, 0.1), dq=_border_dq(),
                                obsname="IMG1-NFF", obstype="CAL", exp_no=i))
    return truth, paths, noise


def test_master_flat_pattern_flags_and_dark(tmp_path, rng):
    truth, paths, noise = _flats(tmp_path, rng)
    from test_steps_support import reference

    dark = reference("dark", readpatt="UTR5", data=np.full((N, N), 0.5, np.float32))
    dark.meta.exposure.readpatt = "UTR5"
    dark.save(str(tmp_path / "master_dark.fits"))
    master = build_master_flat(paths, darks=[tmp_path / "master_dark.fits"])
    flat = master.model
    a = active(N)
    good = a & (truth > 0.7)
    expected = truth / np.median(truth[good])
    resid = flat.data[good] / expected[good] - 1
    assert np.std(resid) < 2 * noise / math.sqrt(5)
    assert abs(np.median(flat.data[good]) - 1) < 1e-3
    assert flat.dq[12, 12] & pixel["DEAD"] and flat.dq[12, 12] & pixel["NO_FLAT_FIELD"]
    assert flat.data[12, 12] == 1.0
    assert flat.dq[33, 44] == pixel["LOW_QE"]
    assert flat.data[33, 44] == pytest.approx(0.45 / np.median(truth[good]), rel=0.01)
    assert master.darks == {"UTR5": str(tmp_path / "master_dark.fits")}
    assert np.median(flat.err[good]) == pytest.approx(noise / math.sqrt(5), rel=0.3)
    path = save_master_flat(master, tmp_path / "out")
    header = fits.getheader(path)
    assert path.name == "iris_img1_kbb_img_2026-11-22_flat.fits"
    assert (header["REFTYPE"], header["FILTER"], header["IFSMODE"]) == ("FLAT", "Kbb", "N/A")
    assert header["QA_MED"] == pytest.approx(1.0, abs=1e-3)
    # without dark subtraction the 0.5 DN/s offset biases the normalisation slightly
    raw = build_master_flat(paths, subtract_dark=False)
    assert not np.allclose(raw.model.data[good], flat.data[good], rtol=1e-5)


def test_master_flat_needs_a_dark(tmp_path, rng):
    _, paths, _ = _flats(tmp_path, rng)
    from iris_tasks.calib.testing import temporary_cache

    with temporary_cache(tmp_path / "crds"), pytest.raises(MasterBuildError, match="no dark for"):
        build_master_flat(paths)


def test_chunked_threaded_combine_equals_one_band(tmp_path, rng):
    paths = [write_rate(tmp_path / f"f{i}.fits", rng.normal(5, 1, (N, N)), err=np.ones((N, N)),
                        dq=(rng.random((N, N)) < 0.05) * pixel["DO_NOT_USE"]) for i in range(5)]
    whole = combine_files(paths, max_memory_mb=1e3, threads=1)
    bands = combine_files(paths, max_memory_mb=0.05, threads=2)  # a few rows per band
    np.testing.assert_array_equal(whole.mean, bands.mean)
    np.testing.assert_array_equal(whole.nused, bands.nused)
    stack = np.stack([open_model(p).data for p in paths])
    dq = np.stack([open_model(p).dq for p in paths])
    m, _, c = clipped_stats(np.where(dq > 0, np.nan, stack).astype(np.float32),
                            np.ones(stack.shape, np.float32))
    np.testing.assert_allclose(whole.mean, m, rtol=1e-6)
    np.testing.assert_array_equal(whole.nused, c)


def test_small_helpers():
    assert clip_variance_factor(3.0) == pytest.approx(0.9733, abs=1e-4)
    assert night_start_utc("2026-11-22") == "2026-11-22T22:00:00"
    c_read, c_p = rate_variance_coefficients("CDS", 2, 2.0)
    assert (c_read, c_p) == (pytest.approx(0.5), pytest.approx(0.5))  # 2 rn^2 / dt^2, D/(g dt)
    c_read, _ = rate_variance_coefficients("MCDS", 8, 1.0, nfowler=4)
    assert c_read == pytest.approx(2 / (4 * 16))


def test_clipping_on_own_errors():
    from iris_tasks.masters.combine import clip_with_errors

    values = np.array([0.82, 0.89, -0.62, -0.05, 0.88, 0.3, 5.0], np.float32)[:, None]
    err = np.full(values.shape, 0.4, np.float32)
    err[5] = np.nan  # no error: never clipped
    kept = clip_with_errors(values.copy(), err, sigma=4.0, maxiters=3)
    # only 5.0 (more than 4 x 0.4 from the median) goes; the ~3-sigma scatter of the rest stays
    assert np.isnan(kept[6, 0]) and np.isfinite(kept[:6, 0]).all()
    m, s, c = clipped_stats(values.copy(), err)
    assert c[0] == 6 and m[0] == pytest.approx(np.mean(values[:6]), rel=1e-6)
